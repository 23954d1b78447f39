//! The maps of the XDP program. Layouts, names and sizes come from `lb_common`; every map is
//! pinned by name so the daemon's `default_map_pin_directory` reuses it across restarts.
//!
//! Each static's identifier is the map's name in the object and must equal the lb-common
//! constant (`MAP_*`); the fixture tests check that every name in `ALL_MAPS` exists with the
//! expected key and value sizes.

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, MAGLEV_ENTRIES, MAX_BACKENDS, MAX_SERVICES, MAX_TX_PORTS, PERSIST_DEFAULT_ENTRIES,
    PersistKey, PersistValue, Service, ServiceKey, TrafficCounters, reason,
};

/// `MAP_SERVICES`: VIP, port and protocol -> service. Not preallocated, so a userspace update
/// swaps the whole value at once.
#[map]
pub static TETHER_SERVICES: HashMap<ServiceKey, Service> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// `MAP_BACKENDS`: backend id -> backend (state, MACs, egress interface).
#[map]
pub static TETHER_BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// `MAP_MAGLEV`: two Maglev tables per service, entries are backend ids (or `NO_BACKEND`).
#[map]
pub static TETHER_MAGLEV: Array<u32> = Array::pinned(MAGLEV_ENTRIES, 0);

/// `MAP_PERSIST`: service + masked client address -> bound backend and last-seen time.
/// One table shared by all CPUs (a client's flows land on different CPUs); per-CPU LRU lists
/// (`BPF_F_NO_COMMON_LRU`) avoid a global lock. Userspace sets the size.
#[map]
pub static TETHER_PERSIST: LruHashMap<PersistKey, PersistValue> =
    LruHashMap::pinned(PERSIST_DEFAULT_ENTRIES, BPF_F_NO_COMMON_LRU);

/// `MAP_TX_PORTS`: egress interfaces other than the ingress one, keyed by ifindex.
#[map]
pub static TETHER_TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_TX_PORTS, 0);

/// `MAP_SERVICE_STATS`: per-CPU traffic counters indexed by `Service::index`.
#[map]
pub static TETHER_SVC_STAT: PerCpuArray<TrafficCounters> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// `MAP_BACKEND_STATS`: per-CPU traffic counters indexed by backend id.
#[map]
pub static TETHER_BE_STAT: PerCpuArray<TrafficCounters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// `MAP_REASONS`: per-CPU packet count per verdict reason (`lb_common::reason`).
#[map]
pub static TETHER_REASONS: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);
