//! Map names and the `#[repr(C)]` layouts of their keys and values.
//!
//! Rules: explicit padding fields (always written as zero), no bool/Option/enum, byte order in
//! the field name. IPv4 addresses are stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so one key
//! layout serves both families.

use core::mem::size_of;

/// Pin directory used by the daemon unless configured otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tether";

/// Name of the XDP program in the object (and of its pin).
pub const PROG_XDP: &str = "tether_xdp";
/// Auxiliary programs in the same object: XDP_PASS for the peer of a veth in native mode,
/// and the trivial MAC-swap XDP_TX baseline for `cargo xtask bench`.
pub const PROG_PASS: &str = "tether_pass";
pub const PROG_SWAP_TX: &str = "tether_swap_tx";
pub const PROG_DROP: &str = "tether_drop";
/// Benchmark floors, never attached by the daemon: one `MAP_PERSIST4` lookup and a MAC swap
/// (XDP_TX on a hit), and the same plus an insert on a miss (XDP_TX after the insert).
pub const PROG_FLOOR_HIT: &str = "floor_hit";
pub const PROG_FLOOR_NEW: &str = "floor_new";

/// Virtual services: `ServiceKey` -> `Service`. Hash map, created with `BPF_F_NO_PREALLOC` so a
/// value update replaces the element atomically (a reader never sees half of a new value).
pub const MAP_SERVICES: &str = "TETHER_SERVICES";
/// The IPv4 services of `MAP_SERVICES` again, under an 8-byte key: `ServiceKey4` ->
/// `Service`, looked up for IPv4 packets so they hash and compare two words instead of
/// five. Same flags; the daemon writes every IPv4 service to both maps (and removes it
/// from both), `MAP_SERVICES` first: it is the list the daemon reads back.
pub const MAP_SERVICES4: &str = "TETHER_SVC4";
/// Per-CPU copies of recently used IPv4 services: array of `SVC_CACHE_SLOTS`
/// `ServiceCache4`, slot chosen by a hash of the `ServiceKey4`. A copy is used only while
/// its generation equals `MAP_SVC_GEN`, so an IPv4 packet usually finds its service without
/// a hash-map call.
pub const MAP_SVC_CACHE: &str = "TETHER_SVCCACHE";
/// Generation of the service maps: array of one u64 the daemon raises after every change
/// to `MAP_SERVICES4` (never 0 once set: 0 means "do not cache").
pub const MAP_SVC_GEN: &str = "TETHER_SVC_GEN";
/// Slots of each CPU's `MAP_SVC_CACHE` (a power of two).
pub const SVC_CACHE_SLOTS: u32 = 16;
/// Backends: array indexed by backend id -> `Backend`.
pub const MAP_BACKENDS: &str = "TETHER_BACKENDS";
/// Maglev tables: array of backend ids, `(service.index * 2 + slot) * MAGLEV_TABLE_SIZE + entry`.
pub const MAP_MAGLEV: &str = "TETHER_MAGLEV";
/// Source-IP persistence of IPv6 clients: LRU hash `PersistKey` -> `PersistValue`, shared by
/// all CPUs.
pub const MAP_PERSIST: &str = "TETHER_PERSIST";
/// Source-IP persistence of IPv4 clients: LRU hash `PersistKey4` -> `PersistValue4` (8-byte
/// key and value: a 64-byte element, one cache line), shared by all CPUs.
pub const MAP_PERSIST4: &str = "TETHER_PERSIST4";
/// The shards of the IPv4 table (`persist4::Persist4Layout`): a key lives in shard
/// `PersistKey4::shard(n)` of the `n` in use. Shard 0 is `MAP_PERSIST4` (the one table of
/// earlier builds, whose pin a new daemon reuses); shards the layout does not use exist with
/// the smallest size.
pub const MAP_PERSIST4_SHARDS: [&str; 8] = [
    MAP_PERSIST4,
    "TETHER_PERS4_1",
    "TETHER_PERS4_2",
    "TETHER_PERS4_3",
    "TETHER_PERS4_4",
    "TETHER_PERS4_5",
    "TETHER_PERS4_6",
    "TETHER_PERS4_7",
];
const _: () = assert!(MAP_PERSIST4_SHARDS.len() == crate::PERSIST4_MAX_SHARDS as usize);
/// The XDP program's read-only global (`.rodata`) holding the number of IPv4 shards in use,
/// set by the loader: with one shard the verifier removes the shard choice.
pub const GLOBAL_PERSIST4_SHARDS: &str = "TETHER_P4_SHARDS";
/// Egress ports for backends behind another interface: devmap-hash keyed by ifindex.
pub const MAP_TX_PORTS: &str = "TETHER_TX_PORTS";
/// Per-CPU counters per service (array indexed by `Service::index`) -> `TrafficCounters`.
pub const MAP_SERVICE_STATS: &str = "TETHER_SVC_STAT";
/// Per-CPU counters per backend (array indexed by backend id) -> `TrafficCounters`.
pub const MAP_BACKEND_STATS: &str = "TETHER_BE_STAT";
/// Per-CPU verdict counters (array indexed by `Reason`) -> u64 packets.
pub const MAP_REASONS: &str = "TETHER_REASONS";
/// Per-CPU event counters that are not verdicts (array indexed by `event::*`) -> u64.
pub const MAP_EVENTS: &str = "TETHER_EVENTS";
/// Settings the daemon writes for the data path: array of one `Globals`.
pub const MAP_GLOBALS: &str = "TETHER_GLOBALS";
/// Per-CPU new-binding rate window: array of one `RateWindow`.
pub const MAP_RATE: &str = "TETHER_RATE";
/// Per-CPU copy of the coarse clock for the current tick: array of one `ClockCache`.
pub const MAP_CLOCK: &str = "TETHER_CLOCK";
/// Ports of IPv4 datagrams whose first fragment went to a VIP: LRU hash `FragKey` -> `FragValue`,
/// so the later fragments (which carry no ports) follow it.
pub const MAP_FRAGS: &str = "TETHER_FRAGS";

/// Connection table of services without persistence: LRU hash `FlowKey` -> `FlowValue`, so
/// an established flow keeps its backend when the Maglev table changes (as Katran's LRU).
pub const MAP_FLOWS: &str = "TETHER_FLOWS";

/// Source-IP bindings the data path writes (new, expired and re-bound ones): a BPF ring
/// buffer of `BindingEvent`s, drained in batches by the daemon when it mirrors its tables
/// to other instances. Written only while `Globals::emit_bindings` is set; an event that
/// finds the ring full is dropped (forwarding goes on) and counted
/// (`event::BINDING_EVENT_DROPPED`).
pub const MAP_BINDINGS: &str = "TETHER_BINDINGS";
/// Size of `MAP_BINDINGS` in bytes (a power of two, a multiple of the page size): 8192
/// events of 32 bytes plus the kernel's 8-byte record headers.
pub const BINDINGS_RING_BYTES: u32 = 512 * 1024;

/// Every map the XDP program owns, for pinning, cleanup and checks.
pub const ALL_MAPS: [&str; 26] = [
    MAP_SERVICES,
    MAP_SERVICES4,
    MAP_SVC_CACHE,
    MAP_SVC_GEN,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_PERSIST,
    MAP_PERSIST4_SHARDS[0],
    MAP_PERSIST4_SHARDS[1],
    MAP_PERSIST4_SHARDS[2],
    MAP_PERSIST4_SHARDS[3],
    MAP_PERSIST4_SHARDS[4],
    MAP_PERSIST4_SHARDS[5],
    MAP_PERSIST4_SHARDS[6],
    MAP_PERSIST4_SHARDS[7],
    MAP_TX_PORTS,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_REASONS,
    MAP_EVENTS,
    MAP_GLOBALS,
    MAP_RATE,
    MAP_FRAGS,
    MAP_FLOWS,
    MAP_BINDINGS,
    MAP_CLOCK,
];
/// Map names fit the kernel's 15 characters (`BPF_OBJ_NAME_LEN`), so bpftool shows them
/// whole.
const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(ALL_MAPS[i].len() <= 15);
        i += 1;
    }
};

/// Maglev lookup table size per service (prime, as in the Maglev paper and Katran).
pub const MAGLEV_TABLE_SIZE: u32 = 65537;
/// Two table slots per service: the XDP program reads `Service::maglev_slot`, userspace
/// writes the other slot completely and then flips the index.
pub const MAGLEV_SLOTS: u32 = 2;
pub const MAX_SERVICES: u32 = 64;
pub const MAX_BACKENDS: u32 = 4096;
pub const MAGLEV_ENTRIES: u32 = MAX_SERVICES * MAGLEV_SLOTS * MAGLEV_TABLE_SIZE;
/// A Maglev entry for a pool with no usable backend.
pub const NO_BACKEND: u32 = u32::MAX;
/// Persistence table capacity unless the config sets `persist_table_entries`.
pub const PERSIST_DEFAULT_ENTRIES: u32 = 1 << 20;
/// last-seen is rewritten only once it has aged by this much (a store, not a map update).
pub const PERSIST_REFRESH_NS: u64 = 1_000_000_000;
/// The same step for the IPv4 table, whose ages are whole seconds: more than one second means
/// at least one full second has passed.
pub const PERSIST_REFRESH_S: u32 = 1;
pub const MAX_TX_PORTS: u32 = 64;
/// Datagrams in flight as fragments that are tracked at once (LRU: the oldest go first).
pub const FRAG_ENTRIES: u32 = 8192;
/// Length of the window in which each CPU may create `Globals::new_bindings_per_cpu` bindings.
pub const RATE_WINDOW_NS: u64 = 1_000_000_000;
/// Capacity of the connection table (`MAP_FLOWS`): flows of services without persistence.
pub const FLOW_DEFAULT_ENTRIES: u32 = 1 << 18;

/// Nanoseconds from `then` to `now` on CLOCK_MONOTONIC, read as a signed difference: a time
/// slightly ahead of `now` (another CPU's coarse clock) is age 0, and a time "before boot"
/// (written as `now.wrapping_sub(age)`, as tests do on a machine up for less than `age`)
/// still has its age. The XDP program and the daemon both use this.
#[inline(always)]
pub const fn elapsed_ns(now: u64, then: u64) -> u64 {
    let d = now.wrapping_sub(then);
    if (d as i64) < 0 { 0 } else { d }
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `Service::flags`: traffic needs the L7 proxy; XDP passes it to the stack.
pub const SERVICE_F_L7: u32 = 1 << 0;

/// `Service::down_policy`: what a persistence hit on a backend that is not usable does.
/// Immediate: choose a new backend now and rewrite the entry.
pub const DOWN_POLICY_IMMEDIATE: u32 = 0;
/// Never: keep sending the client to its backend until the entry expires.
pub const DOWN_POLICY_NEVER: u32 = 1;

/// `Backend::state`. An unused slot is never forwarded to, whatever the policy.
pub const BACKEND_UNUSED: u32 = 0;
pub const BACKEND_UP: u32 = 1;
/// Keeps persisted clients, gets no new ones (not in the Maglev table).
pub const BACKEND_DRAINING: u32 = 2;
pub const BACKEND_DOWN: u32 = 3;
pub const BACKEND_DISABLED: u32 = 4;

/// Key of `TETHER_SERVICES`: the VIP, its port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// IPv6, or IPv4-mapped IPv6, in network byte order.
    pub addr_be: [u8; 16],
    pub port_be: u16,
    /// IP protocol number (`PROTO_TCP`, `PROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// Key of `TETHER_SVC4`: an IPv4 VIP, its port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey4 {
    /// IPv4 address in network byte order.
    pub addr_be: [u8; 4],
    pub port_be: u16,
    /// IP protocol number (`PROTO_TCP`, `PROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey4>() == 8);

#[cfg(feature = "user")]
impl ServiceKey {
    /// The `TETHER_SVC4` key of this key, if its address is IPv4-mapped.
    pub const fn to_v4(&self) -> Option<ServiceKey4> {
        let a = &self.addr_be;
        if !is_v4_mapped(a) {
            return None;
        }
        Some(ServiceKey4 {
            addr_be: [a[12], a[13], a[14], a[15]],
            port_be: self.port_be,
            proto: self.proto,
            _pad: 0,
        })
    }
}

/// Value of `TETHER_SVCCACHE` (per CPU): a copy of the `TETHER_SVC4` entry of `key`, taken
/// when `TETHER_SVC_GEN` was `generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCache4 {
    pub key: ServiceKey4,
    /// 0: empty (or being written).
    pub generation: u64,
    pub service: Service,
}
const _: () = assert!(size_of::<ServiceCache4>() == 64);
const _: () = assert!(SVC_CACHE_SLOTS.is_power_of_two());

/// Whether a 16-byte address is IPv4-mapped (`::ffff:a.b.c.d`).
pub const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Value of `TETHER_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index for per-service counters and Maglev tables, `< MAX_SERVICES`.
    pub index: u32,
    /// `SERVICE_F_*`.
    pub flags: u32,
    /// Persistence timeout; 0 disables persistence (each flow is hashed on its own).
    pub timeout_ns: u64,
    /// Which of the two Maglev slots is live (0 or 1).
    pub maglev_slot: u32,
    /// `DOWN_POLICY_*`.
    pub down_policy: u32,
    /// Mask applied to an IPv4 client address (the profile's IPv4 prefix).
    pub v4_mask_be: [u8; 4],
    pub _pad0: [u8; 4],
    /// Mask applied to an IPv6 client address (the profile's IPv6 prefix).
    pub v6_mask_be: [u8; 16],
}
const _: () = assert!(size_of::<Service>() == 48);

/// Value of `TETHER_BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr_be: [u8; 16],
    /// Backend's MAC (destination of the rewritten frame).
    pub mac_dst: [u8; 6],
    /// Egress interface's MAC (source of the rewritten frame).
    pub mac_src: [u8; 6],
    /// Egress interface; the ingress interface means XDP_TX, another one a devmap redirect.
    pub ifindex: u32,
    /// `BACKEND_*`.
    pub state: u32,
    /// `backend_identity(pool, name)`: lets a restarted daemon find the id it gave this
    /// backend before, so persistence entries keep pointing at the same server. Not read by
    /// the XDP program.
    pub identity: u32,
}
const _: () = assert!(size_of::<Backend>() == 40);

/// Stable identity of a backend for id recovery across restarts and reloads.
#[cfg(feature = "user")]
pub fn backend_identity(pool: &str, name: &str) -> u32 {
    let mut h = crate::hash::hash_bytes(pool.as_bytes(), 0x6964_656e);
    h = crate::hash::hash_bytes(name.as_bytes(), h);
    // 0 is the identity of an unused slot.
    h.max(1)
}

/// Key of `TETHER_PERSIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PersistKey {
    pub service: u32,
    /// Client address masked to the profile's prefix (IPv4-mapped for IPv4).
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<PersistKey>() == 20);

/// Value of `TETHER_PERSIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PersistValue {
    pub backend: u32,
    /// `Backend::identity` of `backend` when the binding was made. A slot later reused by
    /// another backend has another identity, so the binding counts as absent: a new backend
    /// never inherits a removed one's clients, even when the daemon died before deleting
    /// them. 0 (written by tether before this field existed) matches any identity.
    pub backend_identity: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC) of the last packet, refreshed at most
    /// every `PERSIST_REFRESH_NS`.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<PersistValue>() == 16);

/// One record of `MAP_BINDINGS`: a binding the data path wrote to `TETHER_PERSIST` or
/// `TETHER_PERSIST4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BindingEvent {
    /// `PersistKey::service`.
    pub service: u32,
    /// `Backend::identity` of the new backend.
    pub backend_identity: u32,
    /// The identity the key was bound to before (a binding moved off a down backend); 0
    /// for a new or expired one. For IPv4 (`TETHER_PERSIST4`) only its 16-bit tag
    /// (`identity_tag16`) is known: then `flags` has `BINDING_PREVIOUS_TAG16`.
    pub previous_identity: u32,
    pub flags: u32,
    /// `PersistKey::addr_be`.
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<BindingEvent>() == 32);
/// `BindingEvent::flags`: `previous_identity` is a 16-bit identity tag.
pub const BINDING_PREVIOUS_TAG16: u32 = 1;

/// Key of `TETHER_PERSIST4`: an IPv4 client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PersistKey4 {
    /// Client address masked to the profile's IPv4 prefix.
    pub addr_be: [u8; 4],
    pub service: u32,
}
const _: () = assert!(size_of::<PersistKey4>() == 8);

/// Value of `TETHER_PERSIST4`: what a hit needs and nothing more.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PersistValue4 {
    /// Backend id (`< MAX_BACKENDS`).
    pub backend: u16,
    /// `identity_tag16(Backend::identity)` when the binding was made; 0 matches any identity
    /// (as `PersistValue::backend_identity`, with 16 of its bits).
    pub identity_tag: u16,
    /// CLOCK_MONOTONIC seconds (`coarse ns / 1e9`, wrapping) of the last packet, refreshed once
    /// its age exceeds `PERSIST_REFRESH_S`. Ages are whole seconds: timeouts are given in
    /// seconds.
    pub last_seen_s: u32,
}
const _: () = assert!(size_of::<PersistValue4>() == 8);
const _: () = assert!(MAX_BACKENDS <= u16::MAX as u32 + 1);

/// The 16 bits of a backend identity an IPv4 binding keeps: the low half, so a reused slot is
/// told apart from its previous server unless both identities share those bits. A nonzero
/// identity never gets tag 0 (which matches any backend, for bindings written without one).
#[inline(always)]
pub const fn identity_tag16(identity: u32) -> u16 {
    let t = identity as u16;
    if t == 0 && identity != 0 { 1 } else { t }
}

/// Whether an IPv4 binding tagged `tag` still belongs to the backend `be` now in its slot.
#[inline(always)]
pub const fn identity_matches16(tag: u16, be: &Backend) -> bool {
    tag == 0 || tag == identity_tag16(be.identity)
}

/// Whole seconds of a CLOCK_MONOTONIC time in nanoseconds, as `PersistValue4` stores them.
#[inline(always)]
pub const fn mono_seconds(ns: u64) -> u32 {
    (ns / 1_000_000_000) as u32
}

/// Seconds from `then` to `now` (both `mono_seconds`), a signed difference like
/// [`elapsed_ns`]: a time slightly ahead of `now` is age 0.
#[inline(always)]
pub const fn elapsed_s(now: u32, then: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if (d as i32) < 0 { 0 } else { d }
}

#[cfg(feature = "user")]
impl PersistKey {
    /// The IPv4 table's key for this key, if its address is IPv4-mapped.
    pub const fn to_v4(&self) -> Option<PersistKey4> {
        let a = &self.addr_be;
        if !is_v4_mapped(a) {
            return None;
        }
        Some(PersistKey4 {
            addr_be: [a[12], a[13], a[14], a[15]],
            service: self.service,
        })
    }
}

#[cfg(feature = "user")]
impl PersistKey4 {
    /// The same key in the one-layout form (IPv4-mapped address).
    pub const fn to_mapped(&self) -> PersistKey {
        PersistKey {
            service: self.service,
            addr_be: v4_mapped(self.addr_be),
        }
    }
}

#[cfg(feature = "user")]
impl PersistValue4 {
    /// The compact form of `v`: last-seen becomes the whole second it falls in. `now_ns`
    /// (CLOCK_MONOTONIC) anchors the wrapping arithmetic, so a time "before boot" (written as
    /// `now - age`) or slightly ahead of now keeps its distance from now. `None`: a backend id
    /// the compact form cannot hold.
    pub const fn from_value(v: &PersistValue, now_ns: u64) -> Option<PersistValue4> {
        if v.backend > u16::MAX as u32 {
            return None;
        }
        let age = now_ns.wrapping_sub(v.last_seen_ns) as i64;
        let t = now_ns as i128 - age as i128;
        Some(PersistValue4 {
            backend: v.backend as u16,
            identity_tag: identity_tag16(v.backend_identity),
            last_seen_s: t.div_euclid(1_000_000_000) as i64 as u32,
        })
    }

    /// The one-layout form: last-seen as the start of its second, unwrapped around `now_ns`.
    pub const fn to_value(&self, now_ns: u64) -> PersistValue {
        let now_s = mono_seconds(now_ns);
        let age_s = now_s.wrapping_sub(self.last_seen_s) as i32 as i64;
        let t = (now_ns / 1_000_000_000) as i64 - age_s;
        PersistValue {
            backend: self.backend as u32,
            backend_identity: self.identity_tag as u32,
            last_seen_ns: t.wrapping_mul(1_000_000_000) as u64,
        }
    }
}

/// Value of `TETHER_GLOBALS[0]`: data-path settings that are not per service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Globals {
    /// New persistence bindings each CPU may create per `RATE_WINDOW_NS`; 0: no cap. Above
    /// it a new client is still forwarded (by Maglev) but not stored, so a flood of new
    /// sources cannot turn over the whole table.
    pub new_bindings_per_cpu: u32,
    /// 1: the daemon mirrors (`mirroring`) and drains `MAP_BINDINGS`, so every binding
    /// written is also output there; 0: nothing is output (nobody would read it, and a
    /// full ring would only count drops).
    pub emit_bindings: u32,
}
const _: () = assert!(size_of::<Globals>() == 8);

/// Value of `TETHER_RATE[0]` (per CPU): the current window and the bindings made in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateWindow {
    pub start_ns: u64,
    pub count: u64,
}
const _: () = assert!(size_of::<RateWindow>() == 16);

/// Value of `TETHER_CLOCK[0]` (per CPU): `bpf_ktime_get_coarse_ns()` as read during the tick
/// `jiffies`. The coarse clock only moves when the tick advances jiffies, so while jiffies
/// (a plain load for the program) is unchanged this copy serves instead of a helper call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClockCache {
    pub jiffies: u64,
    pub coarse_ns: u64,
}
const _: () = assert!(size_of::<ClockCache>() == 16);

/// Key of `TETHER_FRAGS`: one IPv4 datagram (RFC 791: source, destination, protocol, id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src_be: [u8; 4],
    pub dst_be: [u8; 4],
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragKey>() == 12);

/// Value of `TETHER_FRAGS`: the ports the first fragment carried (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
}
const _: () = assert!(size_of::<FragValue>() == 4);
/// Key of `TETHER_FLOWS`: one TCP or UDP flow of a service (the service stands for VIP,
/// port and protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub service: u32,
    /// Client address (IPv4-mapped for IPv4), not masked.
    pub addr_be: [u8; 16],
    pub sport_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<FlowKey>() == 24);

/// Value of `TETHER_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub backend: u32,
    /// As `PersistValue::backend_identity`: a mismatch means the slot was reused.
    pub backend_identity: u32,
}
const _: () = assert!(size_of::<FlowValue>() == 8);

/// Whether a binding tagged `tag` still belongs to the backend `be` now in its slot.
#[inline(always)]
pub const fn identity_matches(tag: u32, be: &Backend) -> bool {
    tag == 0 || tag == be.identity
}

/// IPv4-mapped IPv6 form of an IPv4 address in network order.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Network-order mask of `prefix` leading one bits over `N` bytes (prefix clamped to N*8).
pub const fn prefix_mask<const N: usize>(prefix: u8) -> [u8; N] {
    let mut m = [0u8; N];
    let mut bits = prefix as usize;
    let mut i = 0;
    while i < N && bits > 0 {
        m[i] = if bits >= 8 {
            0xff
        } else {
            0xffu8 << (8 - bits)
        };
        bits = bits.saturating_sub(8);
        i += 1;
    }
    m
}

/// Index of a Maglev entry in `TETHER_MAGLEV`.
#[inline(always)]
pub const fn maglev_index(service_index: u32, slot: u32, hash: u32) -> u32 {
    (service_index * MAGLEV_SLOTS + slot) * MAGLEV_TABLE_SIZE + hash % MAGLEV_TABLE_SIZE
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceKey4 {}
    unsafe impl aya::Pod for super::ServiceCache4 {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::PersistKey {}
    unsafe impl aya::Pod for super::PersistValue {}
    unsafe impl aya::Pod for super::PersistKey4 {}
    unsafe impl aya::Pod for super::PersistValue4 {}
    unsafe impl aya::Pod for super::Globals {}
    unsafe impl aya::Pod for super::RateWindow {}
    unsafe impl aya::Pod for super::ClockCache {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_mask::<4>(32), [0xff; 4]);
        assert_eq!(prefix_mask::<4>(24), [0xff, 0xff, 0xff, 0]);
        assert_eq!(prefix_mask::<4>(0), [0; 4]);
        assert_eq!(prefix_mask::<4>(20), [0xff, 0xff, 0xf0, 0]);
        assert_eq!(
            prefix_mask::<16>(64),
            [
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(prefix_mask::<16>(128), [0xff; 16]);
    }

    #[test]
    fn elapsed_is_a_signed_difference() {
        assert_eq!(elapsed_ns(10, 4), 6);
        // Ahead of now (another CPU's clock): age 0.
        assert_eq!(elapsed_ns(10, 12), 0);
        // Written as now - age on a machine up for less than age: the age survives.
        assert_eq!(elapsed_ns(5, 5u64.wrapping_sub(500)), 500);
    }

    #[test]
    fn identity_tags() {
        let be = Backend {
            identity: 7,
            ..Backend::default()
        };
        assert!(identity_matches(7, &be));
        assert!(identity_matches(0, &be), "legacy entries match");
        assert!(!identity_matches(8, &be), "a reused slot is a miss");
    }

    #[test]
    fn service_keys_of_ipv4_vips_have_a_compact_form() {
        let k = ServiceKey {
            addr_be: v4_mapped([10, 0, 0, 100]),
            port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        };
        let k4 = k.to_v4().expect("mapped");
        assert_eq!(k4.addr_be, [10, 0, 0, 100]);
        assert_eq!((k4.port_be, k4.proto), (80u16.to_be(), PROTO_TCP));
        let mut v6 = k;
        v6.addr_be[0] = 0xfd;
        assert_eq!(v6.to_v4(), None, "an IPv6 VIP has no IPv4 key");
        let mut zero = k;
        zero.addr_be[10] = 0;
        assert_eq!(zero.to_v4(), None, "::a.b.c.d is not mapped");
    }

    #[test]
    fn v4_forms_round_trip() {
        let k = PersistKey {
            service: 3,
            addr_be: v4_mapped([10, 1, 2, 0]),
        };
        let k4 = k.to_v4().expect("mapped");
        assert_eq!(k4.addr_be, [10, 1, 2, 0]);
        assert_eq!(k4.to_mapped(), k);
        let mut v6 = k;
        v6.addr_be[0] = 0x20;
        assert_eq!(v6.to_v4(), None, "an IPv6 key stays in the IPv6 table");

        let now = 5_000_000_000_000;
        let v = PersistValue {
            backend: 9,
            backend_identity: 0x0001_0022,
            last_seen_ns: now - 7_000_000_000,
        };
        let v4 = PersistValue4::from_value(&v, now).expect("fits");
        assert_eq!((v4.backend, v4.identity_tag), (9, 0x22));
        assert_eq!(elapsed_s(mono_seconds(now), v4.last_seen_s), 7);
        assert_eq!(v4.to_value(now).last_seen_ns, v.last_seen_ns);
        // An age longer than the uptime survives the conversion.
        let old = PersistValue {
            last_seen_ns: 5u64.wrapping_sub(7_200_000_000_000),
            ..v
        };
        let o4 = PersistValue4::from_value(&old, 5).expect("fits");
        assert_eq!(elapsed_s(mono_seconds(5), o4.last_seen_s), 7200);
        assert_eq!(
            o4.to_value(5).last_seen_ns,
            0u64.wrapping_sub(7_200_000_000_000)
        );
        // Ahead of now stays ahead.
        let ahead = PersistValue {
            last_seen_ns: now + 3_600_000_000_000,
            ..v
        };
        let a4 = PersistValue4::from_value(&ahead, now).expect("fits");
        assert_eq!(elapsed_s(mono_seconds(now), a4.last_seen_s), 0);
        assert_eq!(a4.to_value(now + 1).last_seen_ns, ahead.last_seen_ns);
        assert!(identity_matches16(
            0x22,
            &Backend {
                identity: 0x0005_0022,
                ..Backend::default()
            }
        ));
        assert!(!identity_matches16(
            0x23,
            &Backend {
                identity: 0x22,
                ..Backend::default()
            }
        ));
    }

    #[test]
    fn maglev_slots_do_not_overlap() {
        assert_eq!(maglev_index(0, 1, 0), MAGLEV_TABLE_SIZE);
        assert_eq!(
            maglev_index(MAX_SERVICES - 1, 1, u32::MAX),
            MAGLEV_ENTRIES - 1 - (MAGLEV_TABLE_SIZE - 1 - u32::MAX % MAGLEV_TABLE_SIZE)
        );
        assert!(maglev_index(MAX_SERVICES - 1, 1, MAGLEV_TABLE_SIZE - 1) < MAGLEV_ENTRIES);
    }
}
