//! The BPF_PROG_TEST_RUN fixture shared by the packet tests (`xdp_fixtures`, `xdp_hostile`):
//! one loaded object with its own pin directory, map helpers, and the test topology's
//! addresses, map values and packets.
//!
//! Each fixture loads the compiled object into a fresh, unique pin directory under
//! /sys/fs/bpf (removed afterwards) and writes map state with aya's userspace map types.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, Map, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    Backend, DOWN_POLICY_IMMEDIATE, FlowKey, FlowValue, Globals, MAGLEV_TABLE_SIZE,
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_EVENTS, MAP_FLOWS, MAP_GLOBALS, MAP_MAGLEV, MAP_PERSIST,
    MAP_PERSIST4_SHARDS, MAP_RATE, MAP_REASONS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_SERVICES4,
    MAP_SVC_GEN, MAP_TX_PORTS, PROG_DROP, PROG_FLOOR_HIT, PROG_FLOOR_NEW, PROG_PASS, PROG_SWAP_TX,
    PROG_XDP, PersistKey, PersistKey4, PersistValue, PersistValue4, RATE_WINDOW_NS, RateWindow,
    Service, ServiceKey, ServiceKey4, TrafficCounters, maglev_index, prefix_mask, reason,
    v4_mapped,
};
use tether::dataplane::{EBPF_OBJECT, persist_table::Table4};

use crate::packet::{Frame, Mac, PacketBuilder};

// XDP actions (linux/bpf.h).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Small persistence table: the tests need a handful of entries, not the default million.
pub const PERSIST_ENTRIES: u32 = 1024;
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// BPF_PROG_TEST_RUN's minimum input (an Ethernet header).
pub const MIN_TEST_RUN_LEN: usize = 14;

// The test topology: clients, VIPs and backends.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const CLIENT_SAME_24: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
pub const CLIENT_OTHER_24: Ipv4Addr = Ipv4Addr::new(192, 0, 3, 10);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const NOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 0x10);
pub const CLIENT6_SAME_64: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
pub const HTTP: u16 = 80;
pub const HTTPS: u16 = 443;
pub const DNS: u16 = 53;
pub const SPORT: u16 = 40000;

pub const SVC_TCP: u32 = 0;
pub const SVC_UDP: u32 = 1;
pub const SVC_TCP6: u32 = 2;
pub const SVC_UDP6: u32 = 3;

pub const BE_A: u32 = 1;
pub const BE_B: u32 = 2;
pub const BE_C: u32 = 7;
/// The interface the test runs see as ingress: BPF_PROG_TEST_RUN without an ingress ifindex
/// uses the loopback device of the caller's namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;
/// A devmap key that is not the ingress interface, pointing at the loopback device (which
/// exists in every namespace): the program redirects through `TETHER_TX_PORTS[ifindex]`.
pub const OTHER_IFINDEX: u32 = 1000;

pub fn be_mac_dst(id: u32) -> Mac {
    [0x02, 0xbe, 0, 0, 0, id as u8]
}
pub fn be_mac_src(id: u32) -> Mac {
    [0x02, 0x1b, 0, 0, 0, id as u8]
}

// ---------------------------------------------------------------------------------------
// Fixture: one loaded object with its own pin directory.
// ---------------------------------------------------------------------------------------

pub fn ensure_bpffs() {
    static MOUNT: Once = Once::new();
    MOUNT.call_once(|| {
        // SAFETY: plain libc calls with valid, NUL-terminated arguments.
        unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            if libc::statfs(c"/sys/fs/bpf".as_ptr(), &mut st) == 0
                && st.f_type as i64 == BPF_FS_MAGIC
            {
                return;
            }
            let rc = libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            );
            assert_eq!(
                rc,
                0,
                "mounting bpffs on /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
    });
}

pub struct Fixture {
    pub ebpf: Ebpf,
    pub dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Unpinning is enough: the maps go away when the last fd (in `ebpf`) closes.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_persist_entries(PERSIST_ENTRIES)
    }

    /// A fixture whose persistence table has `entries` entries (split evenly over the
    /// possible CPUs by `BPF_F_NO_COMMON_LRU`).
    pub fn with_persist_entries(entries: u32) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        ensure_bpffs();
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/tether-fixtures-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating pin dir {}: {e}", dir.display()));
        // Pinned by name as the daemon does, so the map contract can be checked on the pins.
        let ebpf = tether::dataplane::pinned_loader(&dir, entries).load(EBPF_OBJECT);
        let mut ebpf = match ebpf {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("loading the XDP object: {e:?}");
            }
        };
        for name in [
            PROG_XDP,
            PROG_PASS,
            PROG_SWAP_TX,
            PROG_DROP,
            PROG_FLOOR_HIT,
            PROG_FLOOR_NEW,
        ] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"))
                .try_into()
                .unwrap_or_else(|e| panic!("program {name} is not XDP: {e}"));
            if let Err(e) = prog.load() {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("verifying {name}: {e:?}");
            }
        }
        Fixture { ebpf, dir }
    }

    /// Write a service as the daemon does: to `TETHER_SERVICES`, and an IPv4 VIP's also to
    /// `TETHER_SVC4` (where IPv4 packets look it up).
    pub fn add_service(&mut self, key: ServiceKey, svc: Service) {
        let mut m: HashMap<_, ServiceKey, Service> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SERVICES).unwrap()).unwrap();
        m.insert(key, svc, 0).expect("insert service");
        if let Some(k4) = key.to_v4() {
            let mut m4: HashMap<_, ServiceKey4, Service> =
                HashMap::try_from(self.ebpf.map_mut(MAP_SERVICES4).unwrap()).unwrap();
            m4.insert(k4, svc, 0).expect("insert IPv4 service");
        }
        self.raise_services_generation();
    }

    /// As the daemon after a change to the service maps: per-CPU copies of services are
    /// not used any more.
    pub fn raise_services_generation(&mut self) {
        let mut m: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut(MAP_SVC_GEN).unwrap()).unwrap();
        let g = m.get(&0, 0).expect("generation");
        m.set(0, g + 1, 0).expect("raise generation");
    }

    pub fn set_backend(&mut self, id: u32, be: Backend) {
        let mut m: Array<_, Backend> =
            Array::try_from(self.ebpf.map_mut(MAP_BACKENDS).unwrap()).unwrap();
        m.set(id, be, 0).expect("set backend");
    }

    /// Fill a whole Maglev table: entry `i` gets `ids[i % ids.len()]` (one batch update, as
    /// the daemon writes tables).
    pub fn fill_table(&mut self, svc: u32, slot: u32, ids: &[u32]) {
        let Some(Map::Array(data)) = self.ebpf.map(MAP_MAGLEV) else {
            panic!("{MAP_MAGLEV} is not an array");
        };
        let keys: Vec<u32> = (0..MAGLEV_TABLE_SIZE)
            .map(|h| maglev_index(svc, slot, h))
            .collect();
        let values: Vec<u32> = (0..MAGLEV_TABLE_SIZE as usize)
            .map(|h| ids[h % ids.len()])
            .collect();
        tether::dataplane::batch::update_u32(data.fd().as_fd(), &keys, &values)
            .unwrap_or_else(|e| panic!("batch update of {MAP_MAGLEV}: {e}"));
    }

    /// Set the one Maglev entry a hash selects.
    pub fn set_entry(&mut self, svc: u32, slot: u32, hash: u32, id: u32) {
        let mut m: Array<_, u32> = Array::try_from(self.ebpf.map_mut(MAP_MAGLEV).unwrap()).unwrap();
        m.set(maglev_index(svc, slot, hash), id, 0)
            .expect("set maglev entry");
    }

    /// Write a binding; an IPv4-mapped key goes to the IPv4 table in its compact form.
    pub fn set_persist(&mut self, key: PersistKey, value: PersistValue) {
        if let Some(k4) = key.to_v4() {
            let v4 = PersistValue4::from_value(&value, coarse_now_ns()).expect("backend id fits");
            self.table4()
                .insert(&k4, &v4, 0)
                .expect("insert persist4 entry");
            return;
        }
        let mut m: HashMap<_, PersistKey, PersistValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_PERSIST).unwrap()).unwrap();
        m.insert(key, value, 0).expect("insert persist entry");
    }

    /// A binding in the one-layout form (IPv4: last-seen at the start of its second).
    pub fn persist(&self, key: &PersistKey) -> Option<PersistValue> {
        if let Some(k4) = key.to_v4() {
            let v = self.table4().get(&k4).ok();
            return v.map(|v| v.to_value(coarse_now_ns()));
        }
        let m: HashMap<_, PersistKey, PersistValue> =
            HashMap::try_from(self.ebpf.map(MAP_PERSIST).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    /// Entries in both persistence tables.
    pub fn persist_len(&self) -> usize {
        let m: HashMap<_, PersistKey, PersistValue> =
            HashMap::try_from(self.ebpf.map(MAP_PERSIST).unwrap()).unwrap();
        m.keys().count() + self.persist4_per_shard().iter().sum::<usize>()
    }

    /// The IPv4 table's shards in use, opened from their pins as the daemon opens them.
    pub fn table4(&self) -> Table4 {
        Table4::open(&self.dir).unwrap_or_else(|e| panic!("IPv4 shards: {e}"))
    }

    /// Entries in each shard of the IPv4 table the layout uses, counted on the shard's own
    /// map (not through the shard choice).
    pub fn persist4_per_shard(&self) -> Vec<usize> {
        let n = self.table4().shards() as usize;
        MAP_PERSIST4_SHARDS[..n]
            .iter()
            .map(|name| {
                let m: HashMap<_, PersistKey4, PersistValue4> =
                    HashMap::try_from(self.ebpf.map(name).unwrap()).unwrap();
                m.keys().count()
            })
            .collect()
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(MAP_FLOWS).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    pub fn flows_len(&self) -> usize {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(MAP_FLOWS).unwrap()).unwrap();
        m.keys().count()
    }

    pub fn add_tx_port(&mut self, key: u32, ifindex: u32) {
        let mut m = DevMapHash::try_from(self.ebpf.map_mut(MAP_TX_PORTS).unwrap()).unwrap();
        m.insert(key, ifindex, None, 0).expect("insert tx port");
    }

    pub fn reasons(&self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_REASONS).unwrap()).unwrap();
        (0..reason::COUNT)
            .map(|r| m.get(&r, 0).expect("reason slot").iter().sum())
            .collect()
    }

    pub fn counters(&self, map: &str, index: u32) -> TrafficCounters {
        let m: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).unwrap();
        TrafficCounters::sum(m.get(&index, 0).expect("counter slot").iter())
    }

    /// An event counter (`lb_common::event`), summed over CPUs.
    pub fn event(&self, e: u32) -> u64 {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_EVENTS).unwrap()).unwrap();
        m.get(&e, 0).expect("event slot").iter().sum()
    }

    /// Set the data path's globals (the new-binding rate cap).
    pub fn set_globals(&mut self, g: Globals) {
        let mut m: Array<_, Globals> =
            Array::try_from(self.ebpf.map_mut(MAP_GLOBALS).unwrap()).unwrap();
        m.set(0, g, 0).expect("set globals");
    }

    /// Give every CPU a rate window that began now and lasts an hour, so a cap test does
    /// not depend on how fast the packets are sent.
    pub fn freeze_rate_window(&mut self) {
        let mut m: PerCpuArray<_, RateWindow> =
            PerCpuArray::try_from(self.ebpf.map_mut(MAP_RATE).unwrap()).unwrap();
        let start = coarse_now_ns() + 3600 * 1_000_000_000 - RATE_WINDOW_NS;
        let n = aya::util::nr_cpus().expect("possible CPUs");
        let v = aya::maps::PerCpuValues::try_from(vec![
            RateWindow {
                start_ns: start,
                count: 0
            };
            n
        ])
        .expect("per-CPU values");
        m.set(0, v, 0).expect("set rate windows");
    }

    pub fn svc_stat(&self, index: u32) -> TrafficCounters {
        self.counters(MAP_SERVICE_STATS, index)
    }

    pub fn be_stat(&self, id: u32) -> TrafficCounters {
        self.counters(MAP_BACKEND_STATS, id)
    }

    /// Run `prog` once on `frame` (repeat=1: `repeat` would reuse the rewritten buffer).
    /// Returns the action and the output frame.
    ///
    /// BPF_PROG_TEST_RUN refuses inputs shorter than an Ethernet header, so a shorter frame
    /// is passed as the linear part (`xdp_md.data_end`) of a 14-byte input whose zero tail
    /// goes into a fragment the program cannot see: to the program it is a `len`-byte frame.
    pub fn run_prog(&self, prog: &str, frame: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
        let prog: &Xdp = self.ebpf.program(prog).unwrap().try_into().unwrap();
        run_xdp(prog, frame, ingress_ifindex)
    }

    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_prog(PROG_XDP, frame, 0)
    }
}

/// Run a loaded XDP program once on `frame`, as [`Fixture::run_prog`] describes.
pub fn run_xdp(prog: &Xdp, frame: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
    let mut input = frame.to_vec();
    input.resize(frame.len().max(MIN_TEST_RUN_LEN), 0);
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. No metadata; ingress 0 means the caller's loopback device.
    let md: [u32; 6] = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; input.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e:?}", frame.len()));
    out.truncate(res.data_size_out as usize);
    if frame.len() < MIN_TEST_RUN_LEN {
        assert_eq!(
            out.get(frame.len()..),
            Some(&input[frame.len()..]),
            "hidden tail of a {}-byte frame changed",
            frame.len()
        );
        out.truncate(frame.len());
    }
    (res.return_value, out)
}

pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec. bpf_ktime_get_coarse_ns reads this clock.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------
// Map values.
// ---------------------------------------------------------------------------------------

pub fn skey4(addr: Ipv4Addr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr_be: v4_mapped(addr.octets()),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

pub fn skey6(addr: Ipv6Addr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr_be: addr.octets(),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

/// A service with persistence `timeout_s` seconds (0: none), prefixes /24 and /64.
pub fn service(index: u32, timeout_s: u64) -> Service {
    Service {
        index,
        flags: 0,
        timeout_ns: timeout_s * 1_000_000_000,
        maglev_slot: 0,
        down_policy: DOWN_POLICY_IMMEDIATE,
        v4_mask_be: prefix_mask::<4>(24),
        _pad0: [0; 4],
        v6_mask_be: prefix_mask::<16>(64),
    }
}

pub fn backend(id: u32, state: u32, ifindex: u32) -> Backend {
    Backend {
        addr_be: v4_mapped([10, 0, 1, id as u8]),
        mac_dst: be_mac_dst(id),
        mac_src: be_mac_src(id),
        ifindex,
        state,
        identity: 0,
    }
}

pub fn masked4(addr: Ipv4Addr, prefix: u8) -> [u8; 16] {
    let m = prefix_mask::<4>(prefix);
    let o = addr.octets();
    v4_mapped([o[0] & m[0], o[1] & m[1], o[2] & m[2], o[3] & m[3]])
}

pub fn masked6(addr: Ipv6Addr, prefix: u8) -> [u8; 16] {
    let m = prefix_mask::<16>(prefix);
    let mut o = addr.octets();
    for (b, m) in o.iter_mut().zip(m) {
        *b &= m;
    }
    o
}

pub fn pkey4(svc: u32, client: Ipv4Addr, prefix: u8) -> PersistKey {
    PersistKey {
        service: svc,
        addr_be: masked4(client, prefix),
    }
}

pub fn fkey4(svc: u32, client: Ipv4Addr, sport: u16) -> FlowKey {
    FlowKey {
        service: svc,
        addr_be: v4_mapped(client.octets()),
        sport_be: sport.to_be(),
        _pad: 0,
    }
}

/// `backend(id, state, 0)` carrying the identity of the server in the slot.
pub fn backend_ident(id: u32, state: u32, identity: u32) -> Backend {
    Backend {
        identity,
        ..backend(id, state, 0)
    }
}

pub fn pval(backend: u32, last_seen_ns: u64) -> PersistValue {
    PersistValue {
        backend,
        backend_identity: 0,
        last_seen_ns,
    }
}

// ---------------------------------------------------------------------------------------
// Packets.
// ---------------------------------------------------------------------------------------

pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> PacketBuilder {
    PacketBuilder::tcp4(src, sport, dst, dport).payload(b"GET / HTTP/1.0\r\n\r\n")
}

pub fn vip_tcp4(sport: u16) -> PacketBuilder {
    tcp4(CLIENT, sport, VIP, HTTP)
}

pub fn vip_tcp6(sport: u16) -> PacketBuilder {
    PacketBuilder::tcp6(CLIENT6, sport, VIP6, HTTPS).payload(b"\x16\x03\x01")
}

/// The frame the balancer should send to backend `id`.
pub fn to_backend(f: &Frame, id: u32) -> Vec<u8> {
    f.with_macs(be_mac_src(id), be_mac_dst(id)).bytes
}
