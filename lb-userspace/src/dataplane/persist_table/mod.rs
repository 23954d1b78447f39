//! The persistence tables (`TETHER_PERSIST4` and its shards for IPv4 clients,
//! `TETHER_PERSIST` for IPv6) seen from userspace: list, filter and flush client bindings, read and write one binding,
//! and count live bindings per backend. Callers see one layout (`PersistKey` with IPv4 as a
//! mapped address, `PersistValue`); the IPv4 table's compact form is converted here.
//!
//! Everything here walks the pinned LRU hash with one `get_next_key` and one lookup per entry:
//! about a second for a million entries. Callers on a hot path (metrics scrapes) must cache
//! [`census`] results instead of walking per request.
//!
//! A walk is bounded to the table's capacity in visits: when the kernel evicts or a flush
//! deletes the key the walk stands on, `get_next_key` restarts from the first key, so under
//! heavy churn a walk may see an entry twice (deduplicated where it matters) or miss some.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, Map, MapData, MapError};
use lb_common::{
    MAP_PERSIST, MAP_SERVICES, PersistKey, PersistValue, PersistValue4, Service, ServiceKey,
};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("opening pinned map {}: {source}", path.display())]
    Open { path: PathBuf, source: MapError },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(std::io::Error),
    #[error("backend id {0} does not fit the IPv4 table's 16-bit field")]
    BackendId(u32),
}

type Result<T> = std::result::Result<T, PersistError>;

/// One client binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Kernel service index.
    pub service_index: u32,
    /// The stored (masked) client address; IPv4 clients as IPv4.
    pub client: IpAddr,
    /// Prefix length of the service's mask for this family.
    pub prefix_len: u8,
    pub backend_id: u32,
    /// Since the data path last refreshed the entry (which it does at most every second).
    pub age: Duration,
    /// Older than the service's timeout, or its service no longer persists: the next packet
    /// from this client gets a new choice.
    pub expired: bool,
}

/// Which entries an operation applies to; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub service_index: Option<u32>,
    /// Any address of the client: it is masked with each service's prefix before comparing,
    /// so `10.0.0.7` finds the entry `10.0.0.0/24`.
    pub client: Option<IpAddr>,
    pub backend_id: Option<u32>,
}

/// What the data path needs to interpret an entry of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceParams {
    pub v4_mask: [u8; 4],
    pub v6_mask: [u8; 16],
    /// 0: the service does not persist.
    pub timeout_ns: u64,
}

impl ServiceParams {
    /// Parameters for entries whose service is gone: exact addresses, always expired.
    pub const STALE: ServiceParams = ServiceParams {
        v4_mask: [0xff; 4],
        v6_mask: [0xff; 16],
        timeout_ns: 0,
    };

    pub fn from_service(s: &Service) -> ServiceParams {
        ServiceParams {
            v4_mask: s.v4_mask_be,
            v6_mask: s.v6_mask_be,
            timeout_ns: s.timeout_ns,
        }
    }
}

/// Live bindings per (service index, backend id), and the table's size, from one walk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Entries seen, expired included.
    pub entries: u64,
    /// Non-expired entries per (service index, backend id).
    pub live: HashMap<(u32, u32), u64>,
}

impl Census {
    /// Live entries per backend id, over all services.
    pub fn by_backend(&self) -> HashMap<u32, u64> {
        let mut m = HashMap::new();
        for (&(_, b), &n) in &self.live {
            *m.entry(b).or_insert(0) += n;
        }
        m
    }
}

// ---- Pure logic (unit-tested without BPF) ----

/// The address as the data path stores it for a client of a service with `p`: IPv4-mapped
/// with the IPv4 mask on the last word, or IPv6 with the IPv6 mask.
pub fn masked_key_addr(client: IpAddr, p: &ServiceParams) -> [u8; 16] {
    crate::balancer::masked_addr(client.to_canonical(), &p.v4_mask, &p.v6_mask)
}

/// A stored address for display: IPv4-mapped becomes IPv4.
pub fn entry_addr(addr_be: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(addr_be).to_canonical()
}

/// Number of leading one bits of a mask.
pub fn mask_len(mask: &[u8]) -> u8 {
    let mut n = 0u32;
    for b in mask {
        n += b.leading_ones();
        if *b != 0xff {
            break;
        }
    }
    n as u8
}

/// Prefix length that applies to a stored address under `p`.
pub fn prefix_len(addr: IpAddr, p: &ServiceParams) -> u8 {
    match addr {
        IpAddr::V4(_) => mask_len(&p.v4_mask),
        IpAddr::V6(_) => mask_len(&p.v6_mask),
    }
}

/// Age of an entry; a last-seen from another CPU's coarse clock may be ahead of ours.
pub fn age(now_ns: u64, last_seen_ns: u64) -> Duration {
    Duration::from_nanos(lb_common::elapsed_ns(now_ns, last_seen_ns))
}

/// Expired as the data path decides it (`age > timeout`); an entry of a service without
/// persistence is never used again, so it counts as expired too.
pub fn is_expired(age: Duration, p: &ServiceParams) -> bool {
    p.timeout_ns == 0 || age.as_nanos() > p.timeout_ns as u128
}

/// Whether an entry matches `f`; `p` are the parameters of the entry's service.
pub fn matches(f: &Filter, key: &PersistKey, value: &PersistValue, p: &ServiceParams) -> bool {
    f.service_index.is_none_or(|s| s == key.service)
        && f.backend_id.is_none_or(|b| b == value.backend)
        && f.client
            .is_none_or(|c| masked_key_addr(c, p) == key.addr_be)
}

/// Build an [`Entry`].
pub fn to_entry(key: &PersistKey, value: &PersistValue, p: &ServiceParams, now_ns: u64) -> Entry {
    let client = entry_addr(key.addr_be);
    let age = age(now_ns, value.last_seen_ns);
    Entry {
        service_index: key.service,
        client,
        prefix_len: prefix_len(client, p),
        backend_id: value.backend,
        age,
        expired: is_expired(age, p),
    }
}

// ---- Map access ----

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(PersistError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The map `name` pinned in `pin_dir`, as the typed map `T` (a `HashMap`, `Array`,
/// `PerCpuArray`, ... over `MapData`). Shared with the test harness's pinned-map reads.
pub fn open_pinned<T>(pin_dir: &Path, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_dir.join(name);
    let md = MapData::from_pin(&path).map_err(|source| PersistError::Open { path, source })?;
    let err = |source| PersistError::Map { name, source };
    T::try_from(Map::from_map_data(md).map_err(err)?).map_err(err)
}

type PersistMap = BpfHashMap<MapData, PersistKey, PersistValue>;

fn open_persist(pin_dir: &Path) -> Result<PersistMap> {
    open_pinned(pin_dir, MAP_PERSIST)
}

/// A lookup or delete found no entry: aya reports a lookup's miss as `KeyNotFound` but a
/// delete's as the syscall's ENOENT.
pub fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> PersistError {
    move |source| PersistError::Map { name, source }
}

/// The binding stored under `key` (IPv4 clients as mapped addresses), if any.
pub fn get(pin_dir: &Path, key: &PersistKey) -> Result<Option<PersistValue>> {
    let found = match key.to_v4() {
        Some(k4) => match Table4::open(pin_dir)?.get(&k4) {
            Ok(v) => Ok(v.to_value(monotonic_ns()?)),
            Err(e) => Err(e),
        },
        None => open_persist(pin_dir)?
            .get(key, 0)
            .map_err(|e| (MAP_PERSIST, e)),
    };
    match found {
        Ok(v) => Ok(Some(v)),
        Err((_, MapError::KeyNotFound)) => Ok(None),
        Err((name, source)) => Err(PersistError::Map { name, source }),
    }
}

/// Create or replace the binding under `key` (IPv4 clients as mapped addresses; the IPv4
/// table keeps the age in whole seconds and 16 bits of the identity).
pub fn insert(pin_dir: &Path, key: &PersistKey, value: &PersistValue) -> Result<()> {
    match key.to_v4() {
        Some(k4) => {
            let v4 = PersistValue4::from_value(value, monotonic_ns()?)
                .ok_or(PersistError::BackendId(value.backend))?;
            Table4::open(pin_dir)?
                .insert(&k4, &v4, 0)
                .map_err(|(name, source)| PersistError::Map { name, source })
        }
        None => open_persist(pin_dir)?
            .insert(key, value, 0)
            .map_err(map_err(MAP_PERSIST)),
    }
}

/// Delete the binding under `key`; `false` if there was none.
pub fn remove(pin_dir: &Path, key: &PersistKey) -> Result<bool> {
    let r = match key.to_v4() {
        Some(k4) => Table4::open(pin_dir)?.remove(&k4),
        None => open_persist(pin_dir)?
            .remove(key)
            .map_err(|e| (MAP_PERSIST, e)),
    };
    match r {
        Ok(()) => Ok(true),
        Err((_, e)) if is_not_found(&e) => Ok(false),
        Err((name, source)) => Err(PersistError::Map { name, source }),
    }
}

/// Parameters of every service in `TETHER_SERVICES`, by kernel index.
pub fn service_params(pin_dir: &Path) -> Result<HashMap<u32, ServiceParams>> {
    let services: BpfHashMap<MapData, ServiceKey, Service> = open_pinned(pin_dir, MAP_SERVICES)?;
    let err = |source| PersistError::Map {
        name: MAP_SERVICES,
        source,
    };
    let mut out = HashMap::new();
    for r in services.iter() {
        let (_, s) = r.map_err(err)?;
        out.insert(s.index, ServiceParams::from_service(&s));
    }
    Ok(out)
}

/// Where a walk found an entry: the IPv4 table's shard `Some(i)`, or the IPv6 table.
type Found = Option<usize>;

/// Visit every entry of both tables once (each walk bounded by its table's capacity), with
/// its service's parameters and where it was found; IPv4 entries in the one-layout form.
fn walk(
    pin_dir: &Path,
    mut visit: impl FnMut(&PersistKey, &PersistValue, &ServiceParams, Found),
) -> Result<()> {
    let params = service_params(pin_dir)?;
    let p = |service: u32| *params.get(&service).unwrap_or(&ServiceParams::STALE);
    let now = monotonic_ns()?;
    Table4::open(pin_dir)?.for_each(|shard, key, value| {
        visit(
            &key.to_mapped(),
            &value.to_value(now),
            &p(key.service),
            Some(shard),
        )
    })?;
    let map = open_persist(pin_dir)?;
    let err = map_err(MAP_PERSIST);
    let capacity = map.map().info().map_err(&err)?.max_entries() as usize;
    for key in map.keys().take(capacity.max(1)) {
        let key = key.map_err(&err)?;
        let value = match map.get(&key, 0) {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(err(e)),
        };
        visit(&key, &value, &p(key.service), None);
    }
    Ok(())
}

/// Entries matching `f`, sorted by service, client and backend.
pub fn list(pin_dir: &Path, f: &Filter) -> Result<Vec<Entry>> {
    list_capped(pin_dir, f, usize::MAX).map(|(v, _)| v)
}

/// Like [`list`] but keeps at most `max` entries; the flag says whether more matched.
pub fn list_capped(pin_dir: &Path, f: &Filter, max: usize) -> Result<(Vec<Entry>, bool)> {
    let now = monotonic_ns()?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut truncated = false;
    walk(pin_dir, |k, v, p, _| {
        if !matches(f, k, v, p) || !seen.insert(*k) {
            return;
        }
        if out.len() < max {
            out.push(to_entry(k, v, p, now));
        } else {
            truncated = true;
        }
    })?;
    out.sort_by(|a, b| {
        (a.service_index, a.client, a.backend_id).cmp(&(b.service_index, b.client, b.backend_id))
    });
    Ok((out, truncated))
}

/// Delete the entries matching `f` (all of them for an empty filter); returns how many were
/// deleted. The affected clients get a new choice on their next packet.
pub fn flush(pin_dir: &Path, f: &Filter) -> Result<usize> {
    // Collect first: deleting the key a walk stands on would restart the walk.
    let mut keys = HashMap::new();
    walk(pin_dir, |k, v, p, found| {
        if matches(f, k, v, p) {
            keys.insert(*k, found);
        }
    })?;
    let (mut map, mut map4) = (open_persist(pin_dir)?, Table4::open(pin_dir)?);
    let mut deleted = 0;
    for (k, found) in &keys {
        // Removed from where the walk found it; evicted or deleted since: not an error.
        let r = match (k.to_v4(), found) {
            (Some(k4), Some(shard)) => map4.remove_in(*shard, &k4),
            _ => match map.remove(k) {
                Ok(()) => Ok(true),
                Err(e) if is_not_found(&e) => Ok(false),
                Err(e) => Err((MAP_PERSIST, e)),
            },
        };
        match r {
            Ok(true) => deleted += 1,
            Ok(false) => {}
            Err((name, source)) => {
                crate::dataplane::note_deleted(pin_dir, deleted as u64);
                return Err(PersistError::Map { name, source });
            }
        }
    }
    crate::dataplane::note_deleted(pin_dir, deleted as u64);
    Ok(deleted)
}

/// One walk's counts: all entries, and live ones per (service, backend).
pub fn census(pin_dir: &Path) -> Result<Census> {
    let now = monotonic_ns()?;
    let mut c = Census::default();
    walk(pin_dir, |k, v, p, _| {
        c.entries += 1;
        if !is_expired(age(now, v.last_seen_ns), p) {
            *c.live.entry((k.service, v.backend)).or_insert(0) += 1;
        }
    })?;
    Ok(c)
}

/// Live (non-expired) entries per backend id.
pub fn bound_clients(pin_dir: &Path) -> Result<HashMap<u32, u64>> {
    Ok(census(pin_dir)?.by_backend())
}

mod bind;
pub use bind::{Binder, Binding, BindingEvents, live_bindings};
mod shards;
pub use shards::{PersistMap4, Table4, layout_from_sizes, load_layout, pinned_layout};

#[cfg(test)]
pub(crate) mod testpins;

#[cfg(test)]
mod tests;
