//! BPF_PROG_TEST_RUN fixtures for tether's XDP program.
//!
//! Each case loads the compiled object into a fresh, unique pin directory under /sys/fs/bpf
//! (removed afterwards), writes map state with aya's userspace map types, runs one or more
//! packets through `tether_xdp` and checks the verdict, the output bytes (the whole rewritten
//! frame, or the unchanged input), the reason counters (summed over CPUs: every packet counts
//! exactly one reason) and, where it matters, the persistence table and traffic counters.
//!
//! Needs root (BPF). Run with `cargo test -p tether-tests --test xdp_fixtures`.

use std::{
    cell::Cell,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    rc::Rc,
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, Map, MapInfo, MapType, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    ALL_MAPS, BACKEND_DISABLED, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UNUSED, BACKEND_UP,
    Backend, BindBudget, DOWN_POLICY_IMMEDIATE, DOWN_POLICY_NEVER, FLOW_DEFAULT_ENTRIES, FlowKey,
    FlowValue, MAGLEV_ENTRIES, MAGLEV_TABLE_SIZE, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_BIND_BUDGET,
    MAP_FLOWS, MAP_MAGLEV, MAP_PERSIST, MAP_REASONS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_TX_PORTS,
    MAX_BACKENDS, MAX_SERVICES, MAX_TX_PORTS, NO_BACKEND, PERSIST_REFRESH_NS, PROG_DROP, PROG_PASS,
    PROG_SWAP_TX, PROG_XDP, PROTO_TCP, PROTO_UDP, PersistKey, PersistValue, SERVICE_F_L7, Service,
    ServiceKey, TrafficCounters,
    hash::{client_hash, flow_hash},
    maglev_index, prefix_mask, reason, v4_mapped,
};
use tether::dataplane::EBPF_OBJECT;
use tether_tests::packet::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, Frame, IPPROTO_ICMP, IPPROTO_ICMPV6, Mac, PacketBuilder,
    TCP_ACK, TCP_SYN,
};

// XDP actions (linux/bpf.h).
const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// Small persistence table: the tests need a handful of entries, not the default million.
const PERSIST_ENTRIES: u32 = 1024;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// BPF_PROG_TEST_RUN's minimum input (an Ethernet header).
const MIN_TEST_RUN_LEN: usize = 14;

// The test topology: clients, VIPs and backends.
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT_SAME_24: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const CLIENT_OTHER_24: Ipv4Addr = Ipv4Addr::new(192, 0, 3, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 0x10);
const CLIENT6_SAME_64: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const HTTP: u16 = 80;
const HTTPS: u16 = 443;
const DNS: u16 = 53;
const SPORT: u16 = 40000;

const SVC_TCP: u32 = 0;
const SVC_UDP: u32 = 1;
const SVC_TCP6: u32 = 2;
const SVC_UDP6: u32 = 3;

const BE_A: u32 = 1;
const BE_B: u32 = 2;
const BE_C: u32 = 7;
/// The interface the test runs see as ingress: BPF_PROG_TEST_RUN without an ingress ifindex
/// uses the loopback device of the caller's namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// A devmap key that is not the ingress interface, pointing at the loopback device (which
/// exists in every namespace): the program redirects through `TETHER_TX_PORTS[ifindex]`.
const OTHER_IFINDEX: u32 = 1000;

fn be_mac_dst(id: u32) -> Mac {
    [0x02, 0xbe, 0, 0, 0, id as u8]
}
fn be_mac_src(id: u32) -> Mac {
    [0x02, 0x1b, 0, 0, 0, id as u8]
}

// ---------------------------------------------------------------------------------------
// Fixture: one loaded object with its own pin directory.
// ---------------------------------------------------------------------------------------

fn ensure_bpffs() {
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

struct Fixture {
    ebpf: Ebpf,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Unpinning is enough: the maps go away when the last fd (in `ebpf`) closes.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fixture {
    fn new() -> Self {
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
        let ebpf = tether::dataplane::pinned_loader(&dir, PERSIST_ENTRIES).load(EBPF_OBJECT);
        let mut ebpf = match ebpf {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("loading the XDP object: {e:?}");
            }
        };
        for name in [PROG_XDP, PROG_PASS, PROG_SWAP_TX, PROG_DROP] {
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

    fn add_service(&mut self, key: ServiceKey, svc: Service) {
        let mut m: HashMap<_, ServiceKey, Service> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SERVICES).unwrap()).unwrap();
        m.insert(key, svc, 0).expect("insert service");
    }

    fn set_backend(&mut self, id: u32, be: Backend) {
        let mut m: Array<_, Backend> =
            Array::try_from(self.ebpf.map_mut(MAP_BACKENDS).unwrap()).unwrap();
        m.set(id, be, 0).expect("set backend");
    }

    /// Fill a whole Maglev table: entry `i` gets `ids[i % ids.len()]` (one batch update, as
    /// the daemon writes tables).
    fn fill_table(&mut self, svc: u32, slot: u32, ids: &[u32]) {
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
    fn set_entry(&mut self, svc: u32, slot: u32, hash: u32, id: u32) {
        let mut m: Array<_, u32> = Array::try_from(self.ebpf.map_mut(MAP_MAGLEV).unwrap()).unwrap();
        m.set(maglev_index(svc, slot, hash), id, 0)
            .expect("set maglev entry");
    }

    fn set_persist(&mut self, key: PersistKey, value: PersistValue) {
        let mut m: HashMap<_, PersistKey, PersistValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_PERSIST).unwrap()).unwrap();
        m.insert(key, value, 0).expect("insert persist entry");
    }

    fn persist(&self, key: &PersistKey) -> Option<PersistValue> {
        let m: HashMap<_, PersistKey, PersistValue> =
            HashMap::try_from(self.ebpf.map(MAP_PERSIST).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    fn persist_len(&self) -> usize {
        let m: HashMap<_, PersistKey, PersistValue> =
            HashMap::try_from(self.ebpf.map(MAP_PERSIST).unwrap()).unwrap();
        m.keys().count()
    }

    fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(MAP_FLOWS).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    fn flows_len(&self) -> usize {
        let m: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(MAP_FLOWS).unwrap()).unwrap();
        m.keys().count()
    }

    /// The same binding budget on every CPU.
    fn set_bind_budget(&mut self, b: BindBudget) {
        let ncpu = aya::util::nr_cpus().expect("nr_cpus");
        let mut m: PerCpuArray<_, BindBudget> =
            PerCpuArray::try_from(self.ebpf.map_mut(MAP_BIND_BUDGET).unwrap()).unwrap();
        let v = aya::maps::PerCpuValues::try_from(vec![b; ncpu]).expect("per-cpu values");
        m.set(0, v, 0).expect("set budget");
    }

    fn bind_refused(&self) -> u64 {
        let m: PerCpuArray<_, BindBudget> =
            PerCpuArray::try_from(self.ebpf.map(MAP_BIND_BUDGET).unwrap()).unwrap();
        m.get(&0, 0)
            .expect("budget")
            .iter()
            .map(|b| b.refused)
            .sum()
    }

    fn add_tx_port(&mut self, key: u32, ifindex: u32) {
        let mut m = DevMapHash::try_from(self.ebpf.map_mut(MAP_TX_PORTS).unwrap()).unwrap();
        m.insert(key, ifindex, None, 0).expect("insert tx port");
    }

    fn reasons(&self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_REASONS).unwrap()).unwrap();
        (0..reason::COUNT)
            .map(|r| m.get(&r, 0).expect("reason slot").iter().sum())
            .collect()
    }

    fn counters(&self, map: &str, index: u32) -> TrafficCounters {
        let m: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).unwrap();
        TrafficCounters::sum(m.get(&index, 0).expect("counter slot").iter())
    }

    fn svc_stat(&self, index: u32) -> TrafficCounters {
        self.counters(MAP_SERVICE_STATS, index)
    }

    fn be_stat(&self, id: u32) -> TrafficCounters {
        self.counters(MAP_BACKEND_STATS, id)
    }

    /// Run `prog` once on `frame` (repeat=1: `repeat` would reuse the rewritten buffer).
    /// Returns the action and the output frame.
    ///
    /// BPF_PROG_TEST_RUN refuses inputs shorter than an Ethernet header, so a shorter frame
    /// is passed as the linear part (`xdp_md.data_end`) of a 14-byte input whose zero tail
    /// goes into a fragment the program cannot see: to the program it is a `len`-byte frame.
    fn run_prog(&self, prog: &str, frame: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
        let prog: &Xdp = self.ebpf.program(prog).unwrap().try_into().unwrap();
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

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_prog(PROG_XDP, frame, 0)
    }
}

fn coarse_now_ns() -> u64 {
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

fn skey4(addr: Ipv4Addr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr_be: v4_mapped(addr.octets()),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

fn skey6(addr: Ipv6Addr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr_be: addr.octets(),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

/// A service with persistence `timeout_s` seconds (0: none), prefixes /24 and /64.
fn service(index: u32, timeout_s: u64) -> Service {
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

fn backend(id: u32, state: u32, ifindex: u32) -> Backend {
    Backend {
        addr_be: v4_mapped([10, 0, 1, id as u8]),
        mac_dst: be_mac_dst(id),
        mac_src: be_mac_src(id),
        ifindex,
        state,
        identity: 0,
    }
}

fn masked4(addr: Ipv4Addr, prefix: u8) -> [u8; 16] {
    let m = prefix_mask::<4>(prefix);
    let o = addr.octets();
    v4_mapped([o[0] & m[0], o[1] & m[1], o[2] & m[2], o[3] & m[3]])
}

fn masked6(addr: Ipv6Addr, prefix: u8) -> [u8; 16] {
    let m = prefix_mask::<16>(prefix);
    let mut o = addr.octets();
    for (b, m) in o.iter_mut().zip(m) {
        *b &= m;
    }
    o
}

fn pkey4(svc: u32, client: Ipv4Addr, prefix: u8) -> PersistKey {
    PersistKey {
        service: svc,
        addr_be: masked4(client, prefix),
    }
}

fn fkey4(svc: u32, client: Ipv4Addr, sport: u16) -> FlowKey {
    FlowKey {
        service: svc,
        addr_be: v4_mapped(client.octets()),
        sport_be: sport.to_be(),
        _pad: 0,
    }
}

/// `backend(id, state, 0)` carrying the identity of the server in the slot.
fn backend_ident(id: u32, state: u32, identity: u32) -> Backend {
    Backend {
        identity,
        ..backend(id, state, 0)
    }
}

fn pval(backend: u32, last_seen_ns: u64) -> PersistValue {
    PersistValue {
        backend,
        backend_identity: 0,
        last_seen_ns,
    }
}

// ---------------------------------------------------------------------------------------
// Packets.
// ---------------------------------------------------------------------------------------

fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> PacketBuilder {
    PacketBuilder::tcp4(src, sport, dst, dport).payload(b"GET / HTTP/1.0\r\n\r\n")
}

fn vip_tcp4(sport: u16) -> PacketBuilder {
    tcp4(CLIENT, sport, VIP, HTTP)
}

fn vip_tcp6(sport: u16) -> PacketBuilder {
    PacketBuilder::tcp6(CLIENT6, sport, VIP6, HTTPS).payload(b"\x16\x03\x01")
}

/// The frame the balancer should send to backend `id`.
fn to_backend(f: &Frame, id: u32) -> Vec<u8> {
    f.with_macs(be_mac_src(id), be_mac_dst(id)).bytes
}

// ---------------------------------------------------------------------------------------
// Table-driven cases.
// ---------------------------------------------------------------------------------------

type Hook = Box<dyn Fn(&mut Fixture)>;

enum Out {
    Unchanged,
    Bytes(Vec<u8>),
}

struct Step {
    /// Map changes just before this packet.
    before: Option<Hook>,
    packet: Vec<u8>,
    ingress: u32,
    action: u32,
    out: Out,
    reason: u32,
}

fn step(packet: Vec<u8>, action: u32, out: Out, reason: u32) -> Step {
    Step {
        before: None,
        packet,
        ingress: 0,
        action,
        out,
        reason,
    }
}

fn tx(f: &Frame, id: u32) -> Step {
    step(
        f.bytes.clone(),
        XDP_TX,
        Out::Bytes(to_backend(f, id)),
        reason::TX,
    )
}

fn pass(packet: Vec<u8>, reason: u32) -> Step {
    step(packet, XDP_PASS, Out::Unchanged, reason)
}

fn drop_(packet: Vec<u8>, reason: u32) -> Step {
    step(packet, XDP_DROP, Out::Unchanged, reason)
}

impl Step {
    fn before(mut self, h: impl Fn(&mut Fixture) + 'static) -> Self {
        self.before = Some(Box::new(h));
        self
    }
    fn ingress(mut self, ifindex: u32) -> Self {
        self.ingress = ifindex;
        self
    }
}

struct Case {
    name: &'static str,
    setup: Hook,
    steps: Vec<Step>,
    check: Hook,
}

fn case(
    name: &'static str,
    setup: impl Fn(&mut Fixture) + 'static,
    steps: Vec<Step>,
    check: impl Fn(&mut Fixture) + 'static,
) -> Case {
    Case {
        name,
        setup: Box::new(setup),
        steps,
        check: Box::new(check),
    }
}

fn no_check(_: &mut Fixture) {}

fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown",
    }
}

fn run_case(c: &Case) {
    let mut fx = Fixture::new();
    (c.setup)(&mut fx);
    let mut want = vec![0u64; reason::COUNT as usize];
    for (i, s) in c.steps.iter().enumerate() {
        if let Some(h) = &s.before {
            h(&mut fx);
        }
        let (action, out) = fx.run_prog(PROG_XDP, &s.packet, s.ingress);
        assert_eq!(
            action_name(action),
            action_name(s.action),
            "{} step {i}: action (reasons so far {:?})",
            c.name,
            named(&fx.reasons())
        );
        let expected = match &s.out {
            Out::Unchanged => &s.packet,
            Out::Bytes(b) => b,
        };
        assert_eq!(&out, expected, "{} step {i}: output frame", c.name);
        want[s.reason as usize] += 1;
        assert_eq!(
            named(&fx.reasons()),
            named(&want),
            "{} step {i}: reason counters",
            c.name
        );
    }
    (c.check)(&mut fx);
}

fn named(counts: &[u64]) -> Vec<(&'static str, u64)> {
    counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 0)
        .map(|(i, n)| (reason::NAMES[i], *n))
        .collect()
}

/// Run every case, report all failures at once.
fn run_table(cases: Vec<Case>) {
    let mut failed = Vec::new();
    for c in &cases {
        if catch_unwind(AssertUnwindSafe(|| run_case(c))).is_err() {
            failed.push(c.name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed: {failed:?}",
        failed.len(),
        cases.len()
    );
}

// Common setups.

/// TCP VIP:80 (persistence `timeout_s`), UDP VIP:53 (no persistence), both with backends A
/// and B up behind tables that send everything to A.
fn setup_v4(fx: &mut Fixture, timeout_s: u64) {
    fx.add_service(skey4(VIP, HTTP, PROTO_TCP), service(SVC_TCP, timeout_s));
    fx.add_service(skey4(VIP, DNS, PROTO_UDP), service(SVC_UDP, 0));
    fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, 0));
    fx.set_backend(BE_B, backend(BE_B, BACKEND_UP, 0));
    fx.fill_table(SVC_TCP, 0, &[BE_A]);
    fx.fill_table(SVC_UDP, 0, &[BE_A]);
}

fn setup_v6(fx: &mut Fixture, timeout_s: u64) {
    fx.add_service(skey6(VIP6, HTTPS, PROTO_TCP), service(SVC_TCP6, timeout_s));
    fx.add_service(skey6(VIP6, DNS, PROTO_UDP), service(SVC_UDP6, timeout_s));
    fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, 0));
    fx.set_backend(BE_B, backend(BE_B, BACKEND_UP, 0));
    fx.fill_table(SVC_TCP6, 0, &[BE_A]);
    fx.fill_table(SVC_UDP6, 0, &[BE_A]);
}

fn assert_counters(what: &str, got: TrafficCounters, want: TrafficCounters) {
    assert_eq!(got, want, "{what} counters");
}

fn traffic(packets: u64, bytes: u64) -> TrafficCounters {
    TrafficCounters {
        packets,
        bytes,
        ..Default::default()
    }
}

#[test]
fn forwarding_and_parsing() {
    let hit = vip_tcp4(SPORT).build();
    let hit_len = hit.bytes.len() as u64;
    let udp = PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS)
        .payload(b"query")
        .build();
    let v6 = vip_tcp6(SPORT).build();
    let v6_udp = PacketBuilder::udp6(CLIENT6, SPORT, VIP6, DNS).build();
    let vlan = vip_tcp4(SPORT).vlan(42).build();
    let qinq_single = vip_tcp4(SPORT).vlan_tag(ETH_P_8021AD, 7).build();
    let vlan6 = vip_tcp6(SPORT).vlan(42).build();
    let double = vip_tcp4(SPORT)
        .vlan_tag(ETH_P_8021AD, 7)
        .vlan_tag(ETH_P_8021Q, 42)
        .build();
    let double_q = vip_tcp4(SPORT).vlan(1).vlan(2).build();
    // NOP, NOP, then a 10-byte option (type 0x88 with 8 data bytes): IHL 8.
    let opts = vip_tcp4(SPORT)
        .ipv4_options(&[1, 1, 0x88, 10, 1, 2, 3, 4, 5, 6, 7, 8])
        .build();
    let opts_max = PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS)
        .ipv4_options(&[1; 40])
        .build();
    let first_frag = vip_tcp4(SPORT).fragment(true, 0).build();
    let later_frag = vip_tcp4(SPORT).fragment(true, 185).build();
    let last_frag = vip_tcp4(SPORT).fragment(false, 370).build();
    let padded = PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS)
        .build()
        .padded(60);
    let hit_pad = vip_tcp4(SPORT).build().padded(hit.bytes.len() + 7);

    let cases = vec![
        case(
            "vip hit rewrites MACs, XDP_TX, counts packets and bytes",
            |fx| setup_v4(fx, 0),
            vec![tx(&hit, BE_A)],
            move |fx| {
                assert_counters("service", fx.svc_stat(SVC_TCP), traffic(1, hit_len));
                assert_counters("backend", fx.be_stat(BE_A), traffic(1, hit_len));
                assert_counters("other backend", fx.be_stat(BE_B), traffic(0, 0));
            },
        ),
        case(
            "udp vip hit",
            |fx| setup_v4(fx, 0),
            vec![tx(&udp, BE_A)],
            no_check,
        ),
        case(
            "short udp frame padded to 60 bytes is balanced, padding kept",
            |fx| setup_v4(fx, 0),
            vec![tx(&padded, BE_A)],
            no_check,
        ),
        case(
            "tcp frame with trailing padding is balanced",
            |fx| setup_v4(fx, 0),
            vec![tx(&hit_pad, BE_A)],
            no_check,
        ),
        case(
            "non-vip address passes untouched",
            |fx| setup_v4(fx, 0),
            vec![pass(
                tcp4(CLIENT, SPORT, NOT_VIP, HTTP).bytes(),
                reason::PASS_NOT_VIP,
            )],
            move |fx| assert_counters("service", fx.svc_stat(SVC_TCP), traffic(0, 0)),
        ),
        case(
            "non-vip port passes untouched",
            |fx| setup_v4(fx, 0),
            vec![pass(
                tcp4(CLIENT, SPORT, VIP, 8080).bytes(),
                reason::PASS_NOT_VIP,
            )],
            no_check,
        ),
        case(
            "non-vip protocol (udp to a tcp-only port) passes untouched",
            |fx| setup_v4(fx, 0),
            vec![pass(
                PacketBuilder::udp4(CLIENT, SPORT, VIP, HTTP).bytes(),
                reason::PASS_NOT_VIP,
            )],
            no_check,
        ),
        case(
            "vip address as ipv6 does not match the ipv4 service",
            |fx| setup_v4(fx, 0),
            vec![pass(
                PacketBuilder::tcp6(
                    CLIENT6,
                    SPORT,
                    Ipv6Addr::from(v4_mapped(VIP.octets())),
                    HTTP,
                )
                .bytes(),
                reason::PASS_NOT_VIP,
            )],
            no_check,
        ),
        case(
            "icmp to the vip passes (not tcp/udp)",
            |fx| setup_v4(fx, 0),
            vec![pass(
                PacketBuilder::raw4(CLIENT, VIP, IPPROTO_ICMP, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
                    .bytes(),
                reason::PASS_NOT_TCP_UDP,
            )],
            no_check,
        ),
        case(
            "arp passes (not ip)",
            |fx| setup_v4(fx, 0),
            vec![pass(
                PacketBuilder::ethertype(ETH_P_ARP, &[0, 1, 8, 0, 6, 4, 0, 1]).bytes(),
                reason::PASS_NOT_IP,
            )],
            no_check,
        ),
        case(
            "l7 service passes untouched",
            |fx| {
                setup_v4(fx, 0);
                let mut s = service(SVC_TCP, 0);
                s.flags = SERVICE_F_L7;
                fx.add_service(skey4(VIP, HTTP, PROTO_TCP), s);
            },
            vec![pass(hit.bytes.clone(), reason::PASS_L7)],
            move |fx| assert_counters("service", fx.svc_stat(SVC_TCP), traffic(0, 0)),
        ),
        case(
            "ipv6 tcp hit",
            |fx| setup_v6(fx, 300),
            vec![tx(&v6, BE_A)],
            |fx| {
                let key = PersistKey {
                    service: SVC_TCP6,
                    addr_be: masked6(CLIENT6, 64),
                };
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
            },
        ),
        case(
            "ipv6 udp hit",
            |fx| setup_v6(fx, 0),
            vec![tx(&v6_udp, BE_A)],
            no_check,
        ),
        case(
            "ipv6 icmpv6 passes (not tcp/udp)",
            |fx| setup_v6(fx, 0),
            vec![pass(
                PacketBuilder::raw6(CLIENT6, VIP6, IPPROTO_ICMPV6, &[128, 0, 0, 0, 0, 0, 0, 0])
                    .bytes(),
                reason::PASS_NOT_TCP_UDP,
            )],
            no_check,
        ),
        case(
            "ipv6 with hop-by-hop, routing, fragment, destination-options headers passes",
            |fx| setup_v6(fx, 0),
            [0u8, 43, 44, 60, 51, 50, 135, 139, 140]
                .iter()
                .map(|&nh| {
                    pass(
                        PacketBuilder::raw6(CLIENT6, VIP6, nh, &[6, 0, 0, 0, 0, 0, 0, 0]).bytes(),
                        reason::PASS_IPV6_EXT,
                    )
                })
                .collect(),
            no_check,
        ),
        case(
            "802.1q tagged hit keeps the tag",
            |fx| setup_v4(fx, 0),
            vec![tx(&vlan, BE_A)],
            no_check,
        ),
        case(
            "802.1ad tagged hit keeps the tag",
            |fx| setup_v4(fx, 0),
            vec![tx(&qinq_single, BE_A)],
            no_check,
        ),
        case(
            "802.1q tagged ipv6 hit keeps the tag",
            |fx| setup_v6(fx, 0),
            vec![tx(&vlan6, BE_A)],
            no_check,
        ),
        case(
            "double vlan (802.1ad + 802.1q, and q-in-q 0x8100 twice) passes",
            |fx| setup_v4(fx, 0),
            vec![
                pass(double.bytes.clone(), reason::PASS_VLAN_STACK),
                pass(double_q.bytes.clone(), reason::PASS_VLAN_STACK),
            ],
            no_check,
        ),
        case(
            "ipv4 with options (ihl 8) is balanced by its ports",
            |fx| {
                setup_v4(fx, 0);
                // Everything to A except the entry of this exact flow: proves the ports were
                // read at IHL*4, not at 20.
                let h = flow_hash(
                    SVC_TCP,
                    &v4_mapped(CLIENT.octets()),
                    SPORT.to_be(),
                    HTTP.to_be(),
                );
                fx.set_entry(SVC_TCP, 0, h, BE_B);
            },
            vec![tx(&opts, BE_B)],
            no_check,
        ),
        case(
            "ipv4 with 40 bytes of options (ihl 15), udp",
            |fx| setup_v4(fx, 0),
            vec![tx(&opts_max, BE_A)],
            no_check,
        ),
        case(
            "first fragment (MF, offset 0) is balanced, later fragments pass",
            |fx| setup_v4(fx, 0),
            vec![
                tx(&first_frag, BE_A),
                pass(later_frag.bytes.clone(), reason::PASS_FRAGMENT),
                pass(last_frag.bytes.clone(), reason::PASS_FRAGMENT),
            ],
            no_check,
        ),
        case(
            "no backend in the pool drops and counts no_backend",
            |fx| {
                setup_v4(fx, 300);
                fx.fill_table(SVC_TCP, 0, &[NO_BACKEND]);
            },
            vec![drop_(hit.bytes.clone(), reason::DROP_NO_BACKEND)],
            |fx| {
                assert_counters(
                    "service",
                    fx.svc_stat(SVC_TCP),
                    TrafficCounters {
                        no_backend: 1,
                        ..Default::default()
                    },
                );
                assert_eq!(fx.persist_len(), 0, "no binding without a backend");
            },
        ),
        case(
            "table entry naming an unused backend slot drops",
            |fx| {
                setup_v4(fx, 0);
                fx.fill_table(SVC_TCP, 0, &[BE_C]);
            },
            vec![drop_(hit.bytes.clone(), reason::DROP_BAD_BACKEND)],
            no_check,
        ),
        case(
            "table entry outside the backend array aborts",
            |fx| {
                setup_v4(fx, 0);
                fx.fill_table(SVC_TCP, 0, &[MAX_BACKENDS]);
            },
            vec![step(
                hit.bytes.clone(),
                XDP_ABORTED,
                Out::Unchanged,
                reason::ABORTED,
            )],
            no_check,
        ),
        case(
            "service index outside the tables aborts",
            |fx| {
                setup_v4(fx, 0);
                fx.add_service(skey4(VIP, HTTP, PROTO_TCP), service(MAX_SERVICES, 0));
            },
            vec![step(
                hit.bytes.clone(),
                XDP_ABORTED,
                Out::Unchanged,
                reason::ABORTED,
            )],
            no_check,
        ),
        case(
            "the live maglev slot is read (slot 1 after a flip)",
            |fx| {
                setup_v4(fx, 0);
                fx.fill_table(SVC_TCP, 1, &[BE_B]);
                let mut s = service(SVC_TCP, 0);
                s.maglev_slot = 1;
                fx.add_service(skey4(VIP, HTTP, PROTO_TCP), s);
            },
            vec![tx(&hit, BE_B)],
            no_check,
        ),
    ];
    run_table(cases);
}

#[test]
fn egress_interfaces() {
    let hit = vip_tcp4(SPORT).build();
    let cases = vec![
        case(
            "backend on another interface: devmap redirect",
            |fx| {
                setup_v4(fx, 0);
                fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, OTHER_IFINDEX));
                fx.add_tx_port(OTHER_IFINDEX, LOOPBACK_IFINDEX);
            },
            // BPF_PROG_TEST_RUN (without live frames) only runs the program: it returns
            // XDP_REDIRECT with the rewritten frame, the redirect itself is not performed.
            vec![step(
                hit.bytes.clone(),
                XDP_REDIRECT,
                Out::Bytes(to_backend(&hit, BE_A)),
                reason::REDIRECT,
            )],
            {
                let n = hit.bytes.len() as u64;
                move |fx: &mut Fixture| {
                    assert_counters("backend", fx.be_stat(BE_A), traffic(1, n));
                }
            },
        ),
        case(
            "backend on another interface missing from the devmap drops",
            |fx| {
                setup_v4(fx, 0);
                fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, OTHER_IFINDEX + 1));
            },
            vec![drop_(hit.bytes.clone(), reason::DROP_BAD_BACKEND)],
            |fx| assert_counters("backend", fx.be_stat(BE_A), traffic(0, 0)),
        ),
        case(
            "backend on the ingress interface: XDP_TX, not a redirect",
            |fx| {
                setup_v4(fx, 0);
                fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, LOOPBACK_IFINDEX));
                fx.add_tx_port(LOOPBACK_IFINDEX, LOOPBACK_IFINDEX);
            },
            vec![tx(&hit, BE_A), tx(&hit, BE_A).ingress(LOOPBACK_IFINDEX)],
            no_check,
        ),
    ];
    run_table(cases);
}

#[test]
fn persistence() {
    let p1 = vip_tcp4(SPORT).build();
    let p2 = vip_tcp4(SPORT + 1).build();
    let same24 = tcp4(CLIENT_SAME_24, SPORT + 2, VIP, HTTP).build();
    let other24 = tcp4(CLIENT_OTHER_24, SPORT, VIP, HTTP).build();
    let v6a = vip_tcp6(SPORT).build();
    let v6b = PacketBuilder::tcp6(CLIENT6_SAME_64, SPORT + 9, VIP6, HTTPS).build();
    let key = pkey4(SVC_TCP, CLIENT, 24);
    let written = Rc::new(Cell::new(0u64));

    // A bound, fresh entry for `key` plus a table that would now choose A.
    let bound = move |fx: &mut Fixture, be: u32, state: u32, policy: u32, age_ns: u64| {
        setup_v4(fx, 300);
        let mut s = service(SVC_TCP, 300);
        s.down_policy = policy;
        fx.add_service(skey4(VIP, HTTP, PROTO_TCP), s);
        if be < MAX_BACKENDS {
            fx.set_backend(be, backend(be, state, 0));
        }
        fx.set_persist(key, pval(be, coarse_now_ns().wrapping_sub(age_ns)));
    };
    let p1_len = p1.bytes.len() as u64;
    let counted = move |hits, new, expired, down| TrafficCounters {
        packets: 1,
        bytes: p1_len,
        persist_hits: hits,
        new_assignments: new,
        expired,
        reassigned_down: down,
        ..Default::default()
    };

    let cases = vec![
        case(
            "same client sticks across flows even after the table changes",
            |fx| setup_v4(fx, 300),
            vec![
                tx(&p1, BE_A),
                // The pool is rebuilt so that new clients go to B; this one stays on A.
                tx(&p2, BE_A).before(|fx| fx.fill_table(SVC_TCP, 0, &[BE_B])),
            ],
            move |fx| {
                let t0 = coarse_now_ns();
                let v = fx.persist(&key).expect("binding exists");
                assert_eq!(v.backend, BE_A);
                assert!(v.last_seen_ns <= t0 && v.last_seen_ns + 10_000_000_000 > t0);
                assert_eq!(fx.persist_len(), 1);
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.persist_hits, s.new_assignments, s.packets), (1, 1, 2));
                let b = fx.be_stat(BE_A);
                assert_eq!((b.persist_hits, b.new_assignments, b.packets), (1, 1, 2));
            },
        ),
        case(
            "client in the same /24 shares the binding",
            |fx| setup_v4(fx, 300),
            vec![
                tx(&p1, BE_A),
                tx(&same24, BE_A).before(|fx| fx.fill_table(SVC_TCP, 0, &[BE_B])),
                tx(&other24, BE_B),
            ],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                assert_eq!(
                    fx.persist(&pkey4(SVC_TCP, CLIENT_OTHER_24, 24))
                        .map(|v| v.backend),
                    Some(BE_B)
                );
                assert_eq!(fx.persist_len(), 2);
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.persist_hits, s.new_assignments), (1, 2));
            },
        ),
        case(
            "with prefix /32 clients of one /24 are bound separately",
            |fx| {
                setup_v4(fx, 300);
                let mut s = service(SVC_TCP, 300);
                s.v4_mask_be = prefix_mask::<4>(32);
                fx.add_service(skey4(VIP, HTTP, PROTO_TCP), s);
            },
            vec![
                tx(&p1, BE_A),
                tx(&same24, BE_B).before(|fx| fx.fill_table(SVC_TCP, 0, &[BE_B])),
            ],
            |fx| {
                assert_eq!(
                    fx.persist(&pkey4(SVC_TCP, CLIENT, 32)).map(|v| v.backend),
                    Some(BE_A)
                );
                assert_eq!(
                    fx.persist(&pkey4(SVC_TCP, CLIENT_SAME_24, 32))
                        .map(|v| v.backend),
                    Some(BE_B)
                );
            },
        ),
        case(
            "ipv6 client in the same /64 shares the binding",
            |fx| setup_v6(fx, 300),
            vec![
                tx(&v6a, BE_A),
                tx(&v6b, BE_A).before(|fx| fx.fill_table(SVC_TCP6, 0, &[BE_B])),
            ],
            |fx| {
                let key = PersistKey {
                    service: SVC_TCP6,
                    addr_be: masked6(CLIENT6, 64),
                };
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                assert_eq!(fx.persist_len(), 1);
            },
        ),
        case(
            "new client gets the maglev entry userspace predicts (client_hash)",
            move |fx| {
                setup_v4(fx, 300);
                let h = client_hash(SVC_TCP, &key.addr_be);
                fx.set_entry(SVC_TCP, 0, h, BE_B);
            },
            vec![tx(&p1, BE_B)],
            move |fx| assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_B)),
        ),
        case(
            "expired binding is re-chosen, overwritten and counted",
            move |fx| bound(fx, BE_B, BACKEND_UP, DOWN_POLICY_IMMEDIATE, 301_000_000_000),
            vec![tx(&p1, BE_A)],
            move |fx| {
                let t0 = coarse_now_ns();
                let v = fx.persist(&key).expect("binding");
                assert_eq!(v.backend, BE_A);
                assert!(v.last_seen_ns + 10_000_000_000 > t0, "last_seen renewed");
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(0, 0, 1, 0));
                assert_counters("backend A", fx.be_stat(BE_A), counted(0, 0, 1, 0));
            },
        ),
        case(
            "fresh binding to a down backend moves (policy immediate)",
            move |fx| bound(fx, BE_B, BACKEND_DOWN, DOWN_POLICY_IMMEDIATE, 0),
            vec![tx(&p1, BE_A)],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(0, 0, 0, 1));
                assert_counters("backend B", fx.be_stat(BE_B), traffic(0, 0));
            },
        ),
        case(
            "binding to a disabled backend moves (policy immediate)",
            move |fx| bound(fx, BE_B, BACKEND_DISABLED, DOWN_POLICY_IMMEDIATE, 0),
            vec![tx(&p1, BE_A)],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(0, 0, 0, 1));
            },
        ),
        case(
            "binding to a down backend stays (policy never)",
            move |fx| bound(fx, BE_B, BACKEND_DOWN, DOWN_POLICY_NEVER, 0),
            vec![tx(&p1, BE_B)],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_B));
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(1, 0, 0, 0));
                assert_counters("backend B", fx.be_stat(BE_B), counted(1, 0, 0, 0));
            },
        ),
        case(
            "binding to a draining backend stays (policy immediate)",
            move |fx| bound(fx, BE_B, BACKEND_DRAINING, DOWN_POLICY_IMMEDIATE, 0),
            vec![tx(&p1, BE_B)],
            move |fx| {
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(1, 0, 0, 0));
            },
        ),
        case(
            "binding to a cleared slot moves even with policy never",
            move |fx| bound(fx, BE_C, BACKEND_UNUSED, DOWN_POLICY_NEVER, 0),
            vec![tx(&p1, BE_A)],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(0, 0, 0, 1));
            },
        ),
        case(
            "binding to an id outside the backend array moves",
            move |fx| bound(fx, MAX_BACKENDS + 5, BACKEND_UP, DOWN_POLICY_NEVER, 0),
            vec![tx(&p1, BE_A)],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(0, 0, 0, 1));
            },
        ),
        case(
            "hit older than the refresh step renews last_seen in place",
            move |fx| bound(fx, BE_B, BACKEND_UP, DOWN_POLICY_IMMEDIATE, 5_000_000_000),
            vec![tx(&p1, BE_B)],
            move |fx| {
                let t0 = coarse_now_ns();
                let v = fx.persist(&key).expect("binding");
                assert!(
                    v.last_seen_ns + PERSIST_REFRESH_NS > t0,
                    "last_seen {} not renewed (now {t0})",
                    v.last_seen_ns
                );
            },
        ),
        case(
            "hit within the refresh step leaves last_seen alone",
            {
                let written = written.clone();
                move |fx: &mut Fixture| {
                    bound(fx, BE_B, BACKEND_UP, DOWN_POLICY_IMMEDIATE, 0);
                    let t = coarse_now_ns().wrapping_sub(PERSIST_REFRESH_NS / 2);
                    written.set(t);
                    fx.set_persist(key, pval(BE_B, t));
                }
            },
            vec![tx(&p1, BE_B)],
            {
                let written = written.clone();
                move |fx: &mut Fixture| {
                    let v = fx.persist(&key).expect("binding");
                    assert_eq!(v, pval(BE_B, written.get()), "entry untouched");
                    assert_counters("service", fx.svc_stat(SVC_TCP), counted(1, 0, 0, 0));
                }
            },
        ),
        case(
            "last_seen ahead of this CPU's clock counts as age 0 (a hit)",
            move |fx| {
                bound(fx, BE_B, BACKEND_UP, DOWN_POLICY_IMMEDIATE, 0);
                fx.set_persist(key, pval(BE_B, coarse_now_ns() + 3_600_000_000_000));
            },
            vec![tx(&p1, BE_B)],
            move |fx| {
                let v = fx.persist(&key).expect("binding");
                assert!(v.last_seen_ns > coarse_now_ns() + 3_000_000_000_000);
                assert_counters("service", fx.svc_stat(SVC_TCP), counted(1, 0, 0, 0));
            },
        ),
        case(
            "timeout 0: no binding, each flow hashed on its own (flow_hash)",
            |fx| {
                setup_v4(fx, 0);
                let src = v4_mapped(CLIENT.octets());
                let h = flow_hash(SVC_TCP, &src, (SPORT + 1).to_be(), HTTP.to_be());
                fx.set_entry(SVC_TCP, 0, h, BE_B);
            },
            vec![tx(&p1, BE_A), tx(&p2, BE_B), tx(&p1, BE_A)],
            |fx| {
                assert_eq!(fx.persist_len(), 0, "no entry without persistence");
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.packets, s.persist_hits, s.new_assignments), (3, 0, 0));
            },
        ),
    ];
    run_table(cases);
}

/// Services without persistence: the connection table keeps each established flow on the
/// backend it started on while the Maglev table changes; only a SYN (or a UDP datagram)
/// creates an entry; entries of a backend that is gone or whose slot was reused are misses.
#[test]
fn connection_table() {
    let syn1 = vip_tcp4(SPORT).build();
    let ack1 = vip_tcp4(SPORT).tcp_flags(TCP_ACK, 1, 1).build();
    let syn2 = vip_tcp4(SPORT + 1).build();
    let synack1 = vip_tcp4(SPORT).tcp_flags(TCP_SYN | TCP_ACK, 1, 1).build();
    let udp1 = PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS)
        .payload(b"q")
        .build();
    let f1 = fkey4(SVC_TCP, CLIENT, SPORT);
    let fu = fkey4(SVC_UDP, CLIENT, SPORT);
    let to_b = |fx: &mut Fixture| fx.fill_table(SVC_TCP, 0, &[BE_B]);
    let cases = vec![
        case(
            "an established flow keeps its backend when the table changes",
            |fx| setup_v4(fx, 0),
            vec![
                tx(&syn1, BE_A),
                tx(&ack1, BE_A).before(to_b),
                tx(&syn2, BE_B),
            ],
            move |fx| {
                assert_eq!(fx.flow(&f1).map(|v| v.backend), Some(BE_A));
                assert_eq!(fx.flows_len(), 2, "one entry per SYN");
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.packets, s.flow_hits, s.persist_hits), (3, 1, 0));
                assert_eq!(fx.be_stat(BE_A).flow_hits, 1);
                assert_eq!(fx.persist_len(), 0, "no persistence entries");
            },
        ),
        case(
            "a draining backend keeps its flows and gets no new ones",
            |fx| setup_v4(fx, 0),
            vec![
                tx(&syn1, BE_A),
                tx(&ack1, BE_A).before(move |fx| {
                    fx.set_backend(BE_A, backend(BE_A, BACKEND_DRAINING, 0));
                    to_b(fx);
                }),
                tx(&syn2, BE_B),
            ],
            no_check,
        ),
        case(
            "a SYN is balanced afresh even when its ports had an entry",
            |fx| setup_v4(fx, 0),
            vec![tx(&syn1, BE_A), tx(&syn1, BE_B).before(to_b)],
            move |fx| assert_eq!(fx.flow(&f1).map(|v| v.backend), Some(BE_B)),
        ),
        case(
            "a mid-stream packet without an entry goes by Maglev and creates none",
            |fx| setup_v4(fx, 0),
            vec![
                tx(&ack1, BE_A),
                tx(&synack1, BE_A),
                tx(&ack1, BE_B).before(to_b),
            ],
            |fx| assert_eq!(fx.flows_len(), 0, "only a SYN creates a TCP entry"),
        ),
        case(
            "a down backend's flows move, and the entry follows",
            |fx| setup_v4(fx, 0),
            vec![
                tx(&syn1, BE_A),
                tx(&ack1, BE_B).before(move |fx| {
                    fx.set_backend(BE_A, backend(BE_A, BACKEND_DOWN, 0));
                    to_b(fx);
                }),
                tx(&ack1, BE_B).before(|fx| fx.fill_table(SVC_TCP, 0, &[BE_A])),
            ],
            move |fx| assert_eq!(fx.flow(&f1).map(|v| v.backend), Some(BE_B)),
        ),
        case(
            "a slot reused by another backend does not inherit the flow",
            |fx| {
                setup_v4(fx, 0);
                fx.set_backend(BE_A, backend_ident(BE_A, BACKEND_UP, 11));
                fx.set_backend(BE_B, backend_ident(BE_B, BACKEND_UP, 12));
            },
            vec![
                tx(&syn1, BE_A),
                // A crash left the entry; slot A now holds a new server.
                tx(&ack1, BE_B).before(move |fx| {
                    fx.set_backend(BE_A, backend_ident(BE_A, BACKEND_UP, 99));
                    to_b(fx);
                }),
            ],
            move |fx| {
                let v = fx.flow(&f1).expect("entry rewritten");
                assert_eq!((v.backend, v.backend_identity), (BE_B, 12));
            },
        ),
        case(
            "udp: the first datagram creates the entry",
            |fx| setup_v4(fx, 0),
            vec![
                tx(&udp1, BE_A),
                tx(&udp1, BE_A).before(|fx| fx.fill_table(SVC_UDP, 0, &[BE_B])),
            ],
            move |fx| {
                assert_eq!(fx.flow(&fu).map(|v| v.backend), Some(BE_A));
                assert_eq!(fx.svc_stat(SVC_UDP).flow_hits, 1);
            },
        ),
        case(
            "services with persistence do not use the connection table",
            |fx| setup_v4(fx, 300),
            vec![tx(&syn1, BE_A), tx(&ack1, BE_A)],
            |fx| {
                // Only the UDP service (no persistence) could have entries, and it saw nothing.
                assert_eq!(fx.flows_len(), 0);
            },
        ),
    ];
    run_table(cases);
}

/// Source-IP persistence under spoofed traffic: a TCP packet that is not a SYN, from a source
/// without a binding, goes where Maglev says and creates no binding (so a flood of them evicts
/// no real client); a SYN does create one, and an existing binding is honoured for any packet.
#[test]
fn persistence_bindings_only_from_syn() {
    let syn = vip_tcp4(SPORT).build();
    let ack = vip_tcp4(SPORT).tcp_flags(TCP_ACK, 1, 1).build();
    let rst = vip_tcp4(SPORT + 3).tcp_flags(0x04, 1, 0).build();
    let key = pkey4(SVC_TCP, CLIENT, 24);
    let cases = vec![
        case(
            "non-SYN from an unseen source: forwarded, no binding",
            |fx| setup_v4(fx, 300),
            vec![tx(&ack, BE_A), tx(&rst, BE_A)],
            |fx| {
                assert_eq!(fx.persist_len(), 0, "no binding from non-SYN packets");
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.packets, s.new_assignments), (2, 0));
            },
        ),
        case(
            "the SYN makes the binding and later packets keep it",
            |fx| setup_v4(fx, 300),
            vec![
                tx(&syn, BE_A),
                tx(&ack, BE_A).before(|fx| fx.fill_table(SVC_TCP, 0, &[BE_B])),
            ],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.new_assignments, s.persist_hits), (1, 1));
            },
        ),
    ];
    run_table(cases);
}

/// The per-CPU cap on new bindings: with a budget of 2, the third new client is forwarded by
/// Maglev without a binding and counted; a client already bound is served as before.
#[test]
fn new_bindings_are_capped_per_cpu() {
    // One CPU for every run: each CPU has its own bucket.
    // SAFETY: cpu_set_t is plain data; this thread's own affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread to CPU 0"
        );
    }
    let c1 = tcp4(CLIENT, SPORT, VIP, HTTP).build();
    let c2 = tcp4(CLIENT_OTHER_24, SPORT, VIP, HTTP).build();
    let c3 = tcp4(Ipv4Addr::new(198, 51, 100, 7), SPORT, VIP, HTTP).build();
    let c1_again = tcp4(CLIENT, SPORT + 1, VIP, HTTP).build();
    let budget = |rate| BindBudget {
        rate_per_s: rate,
        ..BindBudget::default()
    };
    let cases = vec![
        case(
            "past the budget new clients get no binding; bound ones keep theirs",
            move |fx| {
                setup_v4(fx, 300);
                fx.set_bind_budget(budget(2));
            },
            vec![
                tx(&c1, BE_A),
                tx(&c2, BE_A),
                tx(&c3, BE_A),
                tx(&c1_again, BE_A).before(|fx| fx.fill_table(SVC_TCP, 0, &[BE_B])),
            ],
            |fx| {
                assert_eq!(fx.persist_len(), 2, "two bindings within the budget");
                assert_eq!(fx.bind_refused(), 1, "the third new client is counted");
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.new_assignments, s.persist_hits, s.packets), (2, 1, 4));
            },
        ),
        case(
            "rate 0 means no cap",
            move |fx| {
                setup_v4(fx, 300);
                fx.set_bind_budget(budget(0));
            },
            vec![tx(&c1, BE_A), tx(&c2, BE_A), tx(&c3, BE_A)],
            |fx| {
                assert_eq!(fx.persist_len(), 3);
                assert_eq!(fx.bind_refused(), 0);
            },
        ),
    ];
    run_table(cases);
}

/// Crash-safe id reuse: a binding made for one server is a miss once its slot holds another
/// (the daemon reuses a removed backend's id; a crash kept it from deleting the bindings).
#[test]
fn reused_backend_slot_inherits_no_clients() {
    let p1 = vip_tcp4(SPORT).build();
    let key = pkey4(SVC_TCP, CLIENT, 24);
    let cases = vec![
        case(
            "a binding tagged with another identity is re-chosen",
            move |fx| {
                setup_v4(fx, 300);
                fx.set_backend(BE_A, backend_ident(BE_A, BACKEND_UP, 11));
                fx.set_backend(BE_B, backend_ident(BE_B, BACKEND_UP, 22));
                fx.fill_table(SVC_TCP, 0, &[BE_A]);
                // Made for the server that had slot B before (identity 7).
                fx.set_persist(
                    key,
                    PersistValue {
                        backend: BE_B,
                        backend_identity: 7,
                        last_seen_ns: coarse_now_ns(),
                    },
                );
            },
            vec![tx(&p1, BE_A)],
            move |fx| {
                let v = fx.persist(&key).expect("binding rewritten");
                assert_eq!((v.backend, v.backend_identity), (BE_A, 11));
                assert_eq!(fx.svc_stat(SVC_TCP).reassigned_down, 1);
            },
        ),
        case(
            "the same identity keeps its clients; new bindings carry it",
            move |fx| {
                setup_v4(fx, 300);
                fx.set_backend(BE_B, backend_ident(BE_B, BACKEND_UP, 22));
                fx.set_persist(
                    key,
                    PersistValue {
                        backend: BE_B,
                        backend_identity: 22,
                        last_seen_ns: coarse_now_ns(),
                    },
                );
            },
            vec![tx(&p1, BE_B)],
            move |fx| assert_eq!(fx.svc_stat(SVC_TCP).persist_hits, 1),
        ),
    ];
    run_table(cases);
}

/// Truncation at every length up to the end of the L4 header, and broken IP headers: the
/// program must pass (never forward, abort or change) them, with the right reason.
#[test]
fn malformed_frames_pass_unchanged() {
    let mut fx = Fixture::new();
    setup_v4(&mut fx, 300);
    setup_v6(&mut fx, 300);

    let mut checked = 0;
    let mut check = |fx: &Fixture, what: &str, frame: &[u8], want_reason: u32| {
        let before = fx.reasons();
        let (action, out) = fx.run(frame);
        assert!(
            action == XDP_PASS,
            "{what} ({} bytes): {}, expected XDP_PASS",
            frame.len(),
            action_name(action)
        );
        assert_eq!(out, frame, "{what} ({} bytes): frame changed", frame.len());
        let mut want = before.clone();
        want[want_reason as usize] += 1;
        assert_eq!(
            named(&fx.reasons()),
            named(&want),
            "{what} ({} bytes): reasons",
            frame.len()
        );
        checked += 1;
    };

    let frames = [
        ("ipv4 tcp", vip_tcp4(SPORT).build()),
        (
            "ipv4 udp",
            PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS).build(),
        ),
        (
            "ipv4 tcp with options, vlan",
            vip_tcp4(SPORT).vlan(5).ipv4_options(&[1, 1, 1, 0]).build(),
        ),
        ("ipv6 tcp", vip_tcp6(SPORT).build()),
        (
            "ipv6 udp, vlan",
            PacketBuilder::udp6(CLIENT6, SPORT, VIP6, DNS)
                .vlan(9)
                .build(),
        ),
    ];
    // Sanity: the whole frames are balanced.
    for (what, f) in &frames {
        assert_eq!(fx.run(&f.bytes).0, XDP_TX, "{what}: complete frame");
    }
    let svcs = [SVC_TCP, SVC_UDP, SVC_TCP6, SVC_UDP6];
    let forwarded: Vec<u64> = svcs.iter().map(|&s| fx.svc_stat(s).packets).collect();

    for (what, f) in &frames {
        let v6 = f.bytes[f.l3 - 2..f.l3] == [0x86, 0xdd];
        let malformed_ip = if v6 {
            reason::MALFORMED_IPV6
        } else {
            reason::MALFORMED_IPV4
        };
        for len in 0..f.payload {
            let r = if len < f.l3 {
                reason::MALFORMED_ETH
            } else {
                // The IP header is cut, or says the datagram is longer than the frame.
                malformed_ip
            };
            check(&fx, &format!("{what} cut"), &f.truncated(len), r);
            if len >= f.l4 && len < f.payload {
                // Consistent IP lengths, short L4 header.
                let t = f.truncated_consistent(len);
                check(
                    &fx,
                    &format!("{what} cut at L4"),
                    &t.bytes,
                    reason::MALFORMED_L4,
                );
            }
        }
    }

    // IPv4 header fields.
    let f = vip_tcp4(SPORT).build();
    for ihl in 0..5 {
        let mut g = f.clone();
        g.set_ipv4_ihl(ihl);
        check(&fx, &format!("ihl {ihl}"), &g.bytes, reason::MALFORMED_IPV4);
    }
    // IHL 15 (60 bytes) with a 40-byte datagram (total length < IHL*4).
    let mut g = f.clone();
    g.set_ipv4_ihl(15).set_ipv4_total_len(40);
    check(
        &fx,
        "total length < ihl*4",
        &g.bytes,
        reason::MALFORMED_IPV4,
    );
    // IHL past the end of a frame that is only the fixed header plus 4 bytes.
    let short = vip_tcp4(SPORT).build().truncated_consistent(f.l3 + 24);
    let mut g = short.clone();
    g.set_ipv4_ihl(15);
    check(&fx, "ihl past the frame", &g.bytes, reason::MALFORMED_IPV4);
    for v in [0u8, 5, 6, 15] {
        let mut g = f.clone();
        g.set_ip_version(v);
        check(
            &fx,
            &format!("ipv4 version {v}"),
            &g.bytes,
            reason::MALFORMED_IPV4,
        );
    }
    for extra in [1u16, 100, 0xffff - f.bytes.len() as u16] {
        let mut g = f.clone();
        g.set_ipv4_total_len((f.bytes.len() - f.l3) as u16 + extra);
        check(
            &fx,
            &format!("total length {extra} beyond the frame"),
            &g.bytes,
            reason::MALFORMED_IPV4,
        );
    }
    // Ports beyond the IP datagram though inside the frame (trailing garbage): the datagram
    // says 20 + 10 bytes, the frame carries a whole TCP header.
    let mut g = f.clone();
    g.set_ipv4_total_len(30);
    check(
        &fx,
        "tcp header past total length",
        &g.bytes,
        reason::MALFORMED_L4,
    );

    // IPv6 header fields.
    let f6 = vip_tcp6(SPORT).build();
    for v in [0u8, 4, 7] {
        let mut g = f6.clone();
        g.set_ip_version(v);
        check(
            &fx,
            &format!("ipv6 version {v}"),
            &g.bytes,
            reason::MALFORMED_IPV6,
        );
    }
    let mut g = f6.clone();
    g.set_ipv6_payload_len((f6.bytes.len() - f6.l3 - 40 + 1) as u16);
    check(
        &fx,
        "ipv6 payload beyond the frame",
        &g.bytes,
        reason::MALFORMED_IPV6,
    );

    // VLAN tag cut in the middle.
    let v = vip_tcp4(SPORT).vlan(3).build();
    for len in 14..18 {
        check(
            &fx,
            "vlan tag cut",
            &v.truncated(len),
            reason::MALFORMED_ETH,
        );
    }
    assert!(checked > 300, "only {checked} frames checked");

    // Nothing more was forwarded.
    let after: Vec<u64> = svcs.iter().map(|&s| fx.svc_stat(s).packets).collect();
    assert_eq!(after, forwarded, "services counted malformed frames");
}

/// The auxiliary programs of the object.
#[test]
fn auxiliary_programs() {
    let fx = Fixture::new();
    let f = vip_tcp4(SPORT).build();
    assert_eq!(
        fx.run_prog(PROG_PASS, &f.bytes, 0),
        (XDP_PASS, f.bytes.clone())
    );
    assert_eq!(fx.run_prog(PROG_DROP, &f.bytes, 0).0, XDP_DROP);
    let swapped = f.with_macs(
        f.bytes[0..6].try_into().unwrap(),
        f.bytes[6..12].try_into().unwrap(),
    );
    assert_eq!(
        fx.run_prog(PROG_SWAP_TX, &f.bytes, 0),
        (XDP_TX, swapped.bytes)
    );
    // Too short for an Ethernet header: passed untouched.
    assert_eq!(
        fx.run_prog(PROG_SWAP_TX, &[1, 2, 3], 0),
        (XDP_PASS, vec![1, 2, 3])
    );
}

/// Every map in `ALL_MAPS` exists in the object, is pinned by name, and has the layout the
/// daemon expects.
#[test]
fn maps_match_the_contract() {
    let fx = Fixture::new();
    let expect: [(&str, MapType, usize, usize, u32); 10] = [
        (
            MAP_SERVICES,
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            MAX_SERVICES,
        ),
        (
            MAP_BACKENDS,
            MapType::Array,
            4,
            size_of::<Backend>(),
            MAX_BACKENDS,
        ),
        (MAP_MAGLEV, MapType::Array, 4, 4, MAGLEV_ENTRIES),
        (
            MAP_PERSIST,
            MapType::LruHash,
            size_of::<PersistKey>(),
            size_of::<PersistValue>(),
            PERSIST_ENTRIES,
        ),
        // Devmap values are struct bpf_devmap_val (ifindex + program fd/id).
        (MAP_TX_PORTS, MapType::DevMapHash, 4, 8, MAX_TX_PORTS),
        (
            MAP_SERVICE_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<TrafficCounters>(),
            MAX_SERVICES,
        ),
        (
            MAP_BACKEND_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<TrafficCounters>(),
            MAX_BACKENDS,
        ),
        (MAP_REASONS, MapType::PerCpuArray, 4, 8, reason::COUNT),
        (
            MAP_FLOWS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            FLOW_DEFAULT_ENTRIES,
        ),
        (
            MAP_BIND_BUDGET,
            MapType::PerCpuArray,
            4,
            size_of::<BindBudget>(),
            1,
        ),
    ];
    assert_eq!(
        expect.iter().map(|e| e.0).collect::<Vec<_>>(),
        ALL_MAPS.to_vec()
    );
    for (name, ty, k, v, max) in expect {
        assert!(fx.ebpf.map(name).is_some(), "{name} not in the object");
        let info = MapInfo::from_pin(fx.dir.join(name))
            .unwrap_or_else(|e| panic!("{name} not pinned in {}: {e}", fx.dir.display()));
        assert_eq!(info.map_type().unwrap(), ty, "{name} type");
        assert_eq!(info.key_size() as usize, k, "{name} key size");
        assert_eq!(info.value_size() as usize, v, "{name} value size");
        assert_eq!(info.max_entries(), max, "{name} max entries");
    }
    let flags = |n: &str| MapInfo::from_pin(fx.dir.join(n)).unwrap().map_flags();
    assert_eq!(flags(MAP_SERVICES) & 1, 1, "services: BPF_F_NO_PREALLOC");
    assert_eq!(flags(MAP_PERSIST) & 2, 2, "persist: BPF_F_NO_COMMON_LRU");
    assert_eq!(flags(MAP_FLOWS) & 2, 2, "flows: BPF_F_NO_COMMON_LRU");
}
