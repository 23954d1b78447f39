//! Reading and writing the daemon's pinned maps from tests and the demo.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::{Result, anyhow};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use lb_common::{
    maps::{
        BACKEND_UNUSED, Backend, MAGLEV_TABLE_SIZE, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_MAGLEV,
        MAP_PERSIST, MAP_REASONS, MAP_SERVICE_STATS, MAP_SERVICES, PersistKey, PersistValue,
        Service, ServiceKey, maglev_index, v4_mapped,
    },
    stats::{TrafficCounters, reason},
};
use tether::dataplane::persist_table::{self, entry_addr, open_pinned};

/// CLOCK_MONOTONIC_COARSE now, in ns: the clock `bpf_ktime_get_coarse_ns()` reads. (The
/// coarse clock never runs ahead of the XDP program's reading, so an entry written with it is
/// never "in the future".)
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The persistence key of an IPv4 client with a /32 profile.
pub fn persist_key_v4(service: u32, client: Ipv4Addr) -> PersistKey {
    PersistKey {
        service,
        addr_be: v4_mapped(client.octets()),
    }
}

/// The IPv4 address in an IPv4-mapped key field, if it is one.
pub fn mapped_v4(addr_be: &[u8; 16]) -> Option<Ipv4Addr> {
    match entry_addr(*addr_be) {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// The maps a daemon pinned in one directory. Each call opens the pin afresh.
#[derive(Clone, Debug)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new(dir: &Path) -> Pins {
        Pins {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, map: &str) -> PathBuf {
        self.dir.join(map)
    }

    /// The pinned map `map` as the typed map `T` (the daemon's own reader).
    fn open<T: TryFrom<Map, Error = MapError>>(&self, map: &'static str) -> Result<T> {
        Ok(open_pinned(&self.dir, map)?)
    }

    /// `Service` entries.
    pub fn services(&self) -> Result<Vec<(ServiceKey, Service)>> {
        let m: HashMap<MapData, ServiceKey, Service> = self.open(MAP_SERVICES)?;
        m.iter().map(|r| r.map_err(Into::into)).collect()
    }

    /// Index of the service on VIP:port/proto (for the per-service counters and keys).
    pub fn service_index(&self, vip: Ipv4Addr, port: u16, proto: u8) -> Result<u32> {
        self.services()?
            .into_iter()
            .find(|(k, _)| {
                k.addr_be == v4_mapped(vip.octets())
                    && u16::from_be(k.port_be) == port
                    && k.proto == proto
            })
            .map(|(_, s)| s.index)
            .ok_or_else(|| {
                anyhow!(
                    "no service {vip}:{port}/{proto} in {}",
                    self.path(MAP_SERVICES).display()
                )
            })
    }

    /// Configured backend slots (state not `BACKEND_UNUSED`), by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        let m: Array<MapData, Backend> = self.open(MAP_BACKENDS)?;
        let mut v = Vec::new();
        for id in 0..m.len() {
            let b = m.get(&id, 0)?;
            if b.state != BACKEND_UNUSED {
                v.push((id, b));
            }
        }
        Ok(v)
    }

    /// Backend id of the backend with this IPv4 address.
    pub fn backend_id(&self, addr: Ipv4Addr) -> Result<u32> {
        self.backends()?
            .into_iter()
            .find(|(_, b)| b.addr_be == v4_mapped(addr.octets()))
            .map(|(id, _)| id)
            .ok_or_else(|| {
                anyhow!(
                    "no backend with address {addr} in {}",
                    self.path(MAP_BACKENDS).display()
                )
            })
    }

    /// IPv4 address of backend `id`.
    pub fn backend_addr(&self, id: u32) -> Result<Ipv4Addr> {
        let m: Array<MapData, Backend> = self.open(MAP_BACKENDS)?;
        let b = m.get(&id, 0)?;
        mapped_v4(&b.addr_be).ok_or_else(|| anyhow!("backend {id} has no IPv4 address: {b:?}"))
    }

    /// The live Maglev table of service `index` (the slot its `Service` entry names): one
    /// backend id (or `NO_BACKEND`) per position.
    pub fn maglev_table(&self, index: u32) -> Result<Vec<u32>> {
        let slot = self
            .services()?
            .into_iter()
            .find(|(_, s)| s.index == index)
            .map(|(_, s)| s.maglev_slot)
            .ok_or_else(|| anyhow!("no service with index {index}"))?;
        let m: Array<MapData, u32> = self.open(MAP_MAGLEV)?;
        (0..MAGLEV_TABLE_SIZE)
            .map(|h| Ok(m.get(&maglev_index(index, slot, h), 0)?))
            .collect()
    }

    /// Every persistence entry of both tables (IPv4 ones in the one-layout form, last-seen at
    /// the start of its second).
    pub fn persist_entries(&self) -> Result<Vec<(PersistKey, PersistValue)>> {
        let now = monotonic_coarse_ns();
        let mut out: Vec<(PersistKey, PersistValue)> = Vec::new();
        persist_table::Table4::open(&self.dir)?
            .for_each(|_, k, v| out.push((k.to_mapped(), v.to_value(now))))?;
        let m: HashMap<MapData, PersistKey, PersistValue> = self.open(MAP_PERSIST)?;
        for r in m.iter() {
            out.push(r?);
        }
        Ok(out)
    }

    /// Entries in each shard of the IPv4 table the pinned layout uses, counted on each
    /// shard's own map.
    pub fn persist4_per_shard(&self) -> Result<Vec<usize>> {
        let layout = persist_table::pinned_layout(&self.dir)
            .ok_or_else(|| anyhow!("no IPv4 table pinned in {}", self.dir.display()))?;
        let mut out = Vec::new();
        for name in &lb_common::MAP_PERSIST4_SHARDS[..layout.shards as usize] {
            let m: HashMap<MapData, lb_common::PersistKey4, lb_common::PersistValue4> =
                self.open(name)?;
            out.push(m.keys().count());
        }
        Ok(out)
    }

    /// The entry of an IPv4 client (/32 profile) in service `service`.
    pub fn persist_get(&self, service: u32, client: Ipv4Addr) -> Result<Option<PersistValue>> {
        Ok(persist_table::get(
            &self.dir,
            &persist_key_v4(service, client),
        )?)
    }

    /// Writes (creates or replaces) the entry of an IPv4 client (/32 profile).
    pub fn persist_set(&self, service: u32, client: Ipv4Addr, value: PersistValue) -> Result<()> {
        persist_table::insert(&self.dir, &persist_key_v4(service, client), &value)?;
        Ok(())
    }

    fn counters(&self, map: &'static str, index: u32) -> Result<TrafficCounters> {
        let m: PerCpuArray<MapData, TrafficCounters> = self.open(map)?;
        let v: PerCpuValues<TrafficCounters> = m.get(&index, 0)?;
        Ok(TrafficCounters::sum(v.iter()))
    }

    /// Counters of service `index`, summed over CPUs.
    pub fn service_counters(&self, index: u32) -> Result<TrafficCounters> {
        self.counters(MAP_SERVICE_STATS, index)
    }

    /// Counters of backend `id`, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<TrafficCounters> {
        self.counters(MAP_BACKEND_STATS, id)
    }

    /// Verdict counters `(name, packets)`, summed over CPUs, in `reason` order.
    pub fn reasons(&self) -> Result<Vec<(&'static str, u64)>> {
        let m: PerCpuArray<MapData, u64> = self.open(MAP_REASONS)?;
        (0..reason::COUNT)
            .map(|i| Ok((reason::NAMES[i as usize], m.get(&i, 0)?.iter().sum())))
            .collect()
    }

    /// One verdict counter.
    pub fn reason(&self, r: u32) -> Result<u64> {
        let m: PerCpuArray<MapData, u64> = self.open(MAP_REASONS)?;
        Ok(m.get(&r, 0)?.iter().sum())
    }
}
