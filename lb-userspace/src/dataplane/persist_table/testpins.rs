//! Real kernel maps for tests: the XDP object's maps created (no program loaded) and pinned
//! in a directory of their own under /sys/fs/bpf, removed on drop. Needs root.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuValues},
};
use lb_common::{
    MAP_PERSIST, MAP_REASONS, MAP_SERVICES, PersistKey, PersistValue, PersistValue4, Service,
    ServiceKey, TrafficCounters,
};

use crate::dataplane::EBPF_OBJECT;

pub(crate) struct TestPins {
    pub dir: PathBuf,
    ebpf: Ebpf,
}

impl TestPins {
    pub fn new(tag: &str) -> TestPins {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/tether-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating {} (bpffs, root?): {e}", dir.display()));
        let ebpf = crate::dataplane::pinned_loader(&dir, 1024)
            .load(EBPF_OBJECT)
            .unwrap_or_else(|e| panic!("creating the maps in {}: {e}", dir.display()));
        TestPins { dir, ebpf }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map_mut(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name} missing from the object"))
    }

    /// A service entry with the given index, prefixes and timeout.
    pub fn add_service(
        &mut self,
        vip: IpAddr,
        port: u16,
        index: u32,
        v4: u8,
        v6: u8,
        timeout_s: u64,
    ) {
        let mut m: HashMap<&mut MapData, ServiceKey, Service> =
            HashMap::try_from(self.map_mut(MAP_SERVICES)).expect("services map type");
        let key = ServiceKey {
            addr_be: crate::balancer::addr_bytes(vip),
            port_be: port.to_be(),
            proto: lb_common::PROTO_TCP,
            _pad: 0,
        };
        let value = Service {
            index,
            timeout_ns: timeout_s * 1_000_000_000,
            v4_mask_be: lb_common::prefix_mask::<4>(v4),
            v6_mask_be: lb_common::prefix_mask::<16>(v6),
            ..Service::default()
        };
        m.insert(key, value, 0).expect("insert service");
    }

    /// A binding as the data path writes it: `addr` must already be masked.
    pub fn bind(&mut self, service: u32, addr: IpAddr, backend: u32, age_s: u64) {
        let now = super::monotonic_ns().expect("clock");
        let key = PersistKey {
            service,
            addr_be: crate::balancer::addr_bytes(addr),
        };
        // Wrapping: on a machine up for less than the age this is a time "before boot",
        // which `lb_common::elapsed_ns` still reads as that age.
        let value = PersistValue {
            backend,
            backend_identity: 0,
            last_seen_ns: now.wrapping_sub(age_s * 1_000_000_000),
        };
        if let Some(k4) = key.to_v4() {
            let mut m = super::Table4::open(&self.dir).expect("IPv4 shards");
            let v4 = PersistValue4::from_value(&value, now).expect("backend id fits");
            m.insert(&k4, &v4, 0).expect("insert binding");
        } else {
            let mut m: HashMap<&mut MapData, PersistKey, PersistValue> =
                HashMap::try_from(self.map_mut(MAP_PERSIST)).expect("persist map type");
            m.insert(key, value, 0).expect("insert binding");
        }
    }

    /// Counters on CPU 0 (and `extra` on CPU 1 when there is one) of a service or backend.
    pub fn set_counters(
        &mut self,
        map: &str,
        index: u32,
        c: TrafficCounters,
        extra: TrafficCounters,
    ) {
        let ncpu = aya::util::nr_cpus().expect("nr_cpus");
        let mut m: PerCpuArray<&mut MapData, TrafficCounters> =
            PerCpuArray::try_from(self.map_mut(map)).expect("stats map type");
        let mut v = vec![TrafficCounters::default(); ncpu];
        v[0] = c;
        if ncpu > 1 {
            v[1] = extra;
        }
        m.set(index, PerCpuValues::try_from(v).expect("per-cpu values"), 0)
            .expect("set counters");
    }

    pub fn set_reason(&mut self, reason: u32, n: u64) {
        let ncpu = aya::util::nr_cpus().expect("nr_cpus");
        let mut m: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map_mut(MAP_REASONS)).expect("reasons map type");
        let mut v = vec![0u64; ncpu];
        v[0] = n;
        m.set(
            reason,
            PerCpuValues::try_from(v).expect("per-cpu values"),
            0,
        )
        .expect("set reason");
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
