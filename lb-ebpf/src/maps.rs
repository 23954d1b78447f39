//! The maps of the XDP program. Layouts, names and sizes come from `lb_common`.
//!
//! They are BTF-defined (`.maps` section), so the kernel knows their key and value types and
//! `bpftool map dump` prints fields by name. The daemon pins each one by name
//! (`EbpfLoader::map_pin_path`), reusing an existing pin across restarts.
//!
//! Each static's identifier is the map's name in the object and must equal the lb-common
//! constant (`MAP_*`); the fixture tests check that every name in `ALL_MAPS` exists with the
//! expected type, key and value sizes.

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    btf_maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use lb_common::{
    BINDINGS_RING_BYTES, Backend, BindingEvent, ClockCache, FLOW_DEFAULT_ENTRIES, FRAG_ENTRIES,
    FlowKey, FlowValue, FragKey, FragValue, Globals, MAGLEV_ENTRIES, MAX_BACKENDS, MAX_SERVICES,
    MAX_TX_PORTS, PERSIST_DEFAULT_ENTRIES, PersistKey, PersistKey4, PersistValue, PersistValue4,
    RateWindow, SVC_CACHE_SLOTS, Service, ServiceCache4, ServiceKey, ServiceKey4, TrafficCounters,
    event, reason,
};

const SERVICES: usize = MAX_SERVICES as usize;
const BACKENDS: usize = MAX_BACKENDS as usize;

/// `MAP_SERVICES`: VIP, port and protocol -> service. Not preallocated, so a userspace update
/// swaps the whole value at once.
#[btf_map]
pub static TETHER_SERVICES: HashMap<ServiceKey, Service, SERVICES, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// `MAP_SERVICES4`: the IPv4 entries of `TETHER_SERVICES` under an 8-byte key (VIP, port,
/// protocol), which IPv4 packets look up: two words to hash and compare instead of five.
/// Not preallocated, as `TETHER_SERVICES`.
#[btf_map]
pub static TETHER_SVC4: HashMap<ServiceKey4, Service, SERVICES, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// `MAP_SVC_CACHE`: each CPU's copies of recently used IPv4 services (`service`).
#[btf_map]
pub static TETHER_SVCCACHE: PerCpuArray<ServiceCache4, { SVC_CACHE_SLOTS as usize }> =
    PerCpuArray::new();

/// `MAP_SVC_GEN`: generation of the service maps, raised by the daemon after it changes them;
/// a cached copy of another generation is not used.
#[btf_map]
pub static TETHER_SVC_GEN: Array<u64, 1> = Array::new();

/// `MAP_BACKENDS`: backend id -> backend (state, MACs, egress interface).
#[btf_map]
pub static TETHER_BACKENDS: Array<Backend, BACKENDS> = Array::new();

/// `MAP_MAGLEV`: two Maglev tables per service, entries are backend ids (or `NO_BACKEND`).
#[btf_map]
pub static TETHER_MAGLEV: Array<u32, { MAGLEV_ENTRIES as usize }> = Array::new();

/// `MAP_PERSIST`: service + masked IPv6 client address -> bound backend and last-seen time.
/// One table shared by all CPUs (a client's flows land on different CPUs); per-CPU LRU lists
/// (`BPF_F_NO_COMMON_LRU`) avoid a global lock. Userspace sets the size.
#[btf_map]
pub static TETHER_PERSIST: LruHashMap<
    PersistKey,
    PersistValue,
    { PERSIST_DEFAULT_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// One shard of the IPv4 persistence table: as `TETHER_PERSIST` for IPv4 clients, with an
/// 8-byte key and value so an element is one cache line (64 bytes) and the key hashes and
/// compares in one word. Userspace sets each shard's size (`lb_common::Persist4Layout`);
/// the object's one entry is what a shard the layout does not use keeps.
pub type Persist4Shard =
    LruHashMap<PersistKey4, PersistValue4, 1, { BPF_F_NO_COMMON_LRU as usize }>;

/// `MAP_PERSIST4_SHARDS[0]` (`MAP_PERSIST4`): shard 0 of the IPv4 table, the whole table
/// when it is not split.
#[btf_map]
pub static TETHER_PERSIST4: Persist4Shard = LruHashMap::new();
/// `MAP_PERSIST4_SHARDS[1]`.
#[btf_map]
pub static TETHER_PERS4_1: Persist4Shard = LruHashMap::new();
/// `MAP_PERSIST4_SHARDS[2]`.
#[btf_map]
pub static TETHER_PERS4_2: Persist4Shard = LruHashMap::new();
/// `MAP_PERSIST4_SHARDS[3]`.
#[btf_map]
pub static TETHER_PERS4_3: Persist4Shard = LruHashMap::new();
/// `MAP_PERSIST4_SHARDS[4]`.
#[btf_map]
pub static TETHER_PERS4_4: Persist4Shard = LruHashMap::new();
/// `MAP_PERSIST4_SHARDS[5]`.
#[btf_map]
pub static TETHER_PERS4_5: Persist4Shard = LruHashMap::new();
/// `MAP_PERSIST4_SHARDS[6]`.
#[btf_map]
pub static TETHER_PERS4_6: Persist4Shard = LruHashMap::new();
/// `MAP_PERSIST4_SHARDS[7]`.
#[btf_map]
pub static TETHER_PERS4_7: Persist4Shard = LruHashMap::new();

/// `GLOBAL_PERSIST4_SHARDS`: shards of the IPv4 table in use (1 to 8), set by the loader.
/// Read-only data (`.rodata`, frozen by the loader): the verifier knows its value, so with
/// one shard the shard choice is removed from the program.
#[unsafe(no_mangle)]
pub static TETHER_P4_SHARDS: u32 = 1;

/// `MAP_TX_PORTS`: egress interfaces other than the ingress one, keyed by ifindex.
#[btf_map]
pub static TETHER_TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

/// `MAP_SERVICE_STATS`: per-CPU traffic counters indexed by `Service::index`.
#[btf_map]
pub static TETHER_SVC_STAT: PerCpuArray<TrafficCounters, SERVICES> = PerCpuArray::new();

/// `MAP_BACKEND_STATS`: per-CPU traffic counters indexed by backend id.
#[btf_map]
pub static TETHER_BE_STAT: PerCpuArray<TrafficCounters, BACKENDS> = PerCpuArray::new();

/// `MAP_REASONS`: per-CPU packet count per verdict reason (`lb_common::reason`).
#[btf_map]
pub static TETHER_REASONS: PerCpuArray<u64, { reason::SLOTS as usize }> = PerCpuArray::new();

/// `MAP_EVENTS`: per-CPU counts of events that are not verdicts (`lb_common::event`).
#[btf_map]
pub static TETHER_EVENTS: PerCpuArray<u64, { event::SLOTS as usize }> = PerCpuArray::new();

/// `MAP_GLOBALS`: settings written by the daemon (the new-binding rate cap).
#[btf_map]
pub static TETHER_GLOBALS: Array<Globals, 1> = Array::new();

/// `MAP_RATE`: each CPU's current new-binding window.
#[btf_map]
pub static TETHER_RATE: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// `MAP_CLOCK`: each CPU's copy of the coarse clock for the current tick (`clock`).
#[btf_map]
pub static TETHER_CLOCK: PerCpuArray<ClockCache, 1> = PerCpuArray::new();

/// `MAP_FRAGS`: ports of IPv4 datagrams to a VIP whose first fragment was seen, so later
/// fragments go where the first went. Shared: fragments of one datagram may reach
/// different CPUs.
#[btf_map]
pub static TETHER_FRAGS: LruHashMap<FragKey, FragValue, { FRAG_ENTRIES as usize }> =
    LruHashMap::new();

/// `MAP_FLOWS`: connection table of services without persistence: service + client address
/// and port -> the backend the flow started on. A TCP entry is made only by a SYN, so an
/// established connection keeps its backend when the Maglev table changes (drain, weight 0,
/// scale-out) and spoofed mid-stream packets cannot flush it. Shared by all CPUs with per-CPU
/// LRU lists, like `TETHER_PERSIST`.
#[btf_map]
pub static TETHER_FLOWS: LruHashMap<
    FlowKey,
    FlowValue,
    { FLOW_DEFAULT_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// `MAP_BINDINGS`: every source-IP binding written to `TETHER_PERSIST`, for the daemon's
/// mirror (which drains it in batches, so no wakeup is asked for), while
/// `Globals::emit_bindings` is set; a full ring drops the event and counts it.
#[btf_map]
pub static TETHER_BINDINGS: RingBuf<BindingEvent, { BINDINGS_RING_BYTES as usize }> =
    RingBuf::new();
