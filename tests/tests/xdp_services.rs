//! Services as the daemon's loader writes them: `Dataplane::load` and `Dataplane::apply` from
//! a config (not the fixtures' direct map writes), then packets through `tether_xdp` with
//! BPF_PROG_TEST_RUN. IPv4 packets find their service in `TETHER_SVC4` (8-byte key),
//! IPv6 packets in `TETHER_SERVICES`, and each CPU keeps copies of IPv4 services in
//! `TETHER_SVCCACHE` while `TETHER_SVC_GEN` is unchanged: these cases prove the loader keeps
//! the maps in step and raises the generation (a service written, changed, removed; pins of
//! a build without the IPv4 map) and that the IPv4 path honours what the service and its
//! backends say.
//!
//! Needs root (BPF). Run with `cargo test -p tether-tests --test xdp_services`.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::Xdp,
};
use lb_common::{
    MAGLEV_TABLE_SIZE, MAP_SERVICES4, PROG_XDP, PROTO_TCP, PersistKey4, PersistValue4, Service,
    ServiceKey4, backend_identity, hash::client_hash, identity_tag16, mono_seconds, reason,
    v4_mapped,
};
use tether::{
    balancer::{self, L2, Plan},
    config::Config,
    dataplane::{Dataplane, Removed},
    state::BackendState,
};
use tether_tests::{
    fixture::*,
    packet::{PacketBuilder, TCP_ACK},
    pinned,
};

const V4_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const V6_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];
const B_MACS: [[u8; 6]; 2] = [[0x02, 0xbe, 0, 0, 0, 0x0b], [0x02, 0xbe, 0, 0, 0, 0x0c]];
/// A client bound to b2 before the first step.
const BOUND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// A client without a binding.
const FRESH: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

fn config(pin_dir: &Path, down_policy: &str) -> Config {
    Config::parse(&format!(
        r#"{{"interface":"lo","pin_dir":"{}","persist_new_bindings_per_cpu_s":0,
        "virtual_services":[
            {{"name":"web","vip":"{V4_VIP}","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"p","persistence":"ip"}},
            {{"name":"web6","vip":"{V6_VIP}","port":443,"protocol":"tcp","mode":"l4-dsr","pool":"p","persistence":"ip"}}],
        "pools":[{{"name":"p","backends":[
            {{"name":"b1","address":"10.99.0.11","mac":"02:be:00:00:00:0b"}},
            {{"name":"b2","address":"10.99.0.12","mac":"02:be:00:00:00:0c"}}]}}],
        "persistence_profiles":[{{"name":"ip","type":"client-ip","timeout_s":3600,
            "ipv4_prefix":32,"ipv6_prefix":128,"select_new_server_when_down":"{down_policy}"}}]}}"#,
        pin_dir.display()
    ))
    .expect("test config is valid")
}

/// The kernel maps' contents for `cfg` with b2 in `b2` state; without the IPv4 service when
/// `v4_service` is false (as a config that dropped it).
fn plan(cfg: &Config, b2: BackendState, v4_service: bool) -> Plan {
    let ids = balancer::assign_ids(cfg, &balancer::Previous::default()).expect("ids");
    let states = vec![vec![BackendState::Up, b2]];
    let mut plan = balancer::plan(cfg, &ids, &states, |p, b| {
        Ok::<_, ()>(L2 {
            mac_dst: cfg.pools[p].backends[b].mac.expect("mac"),
            mac_src: LB_MAC,
            ifindex: LOOPBACK_IFINDEX,
        })
    })
    .expect("plan");
    if !v4_service {
        plan.services.retain(|s| s.key.to_v4().is_none());
    }
    plan
}

/// A pin directory of its own, removed when dropped (also when a step panics).
struct Pins(PathBuf);

impl Pins {
    fn new(tag: &str) -> Pins {
        ensure_bpffs();
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/tether-services-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Pins(dir)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Keep this thread on one CPU: its runs then share that CPU's cached copies of services
/// (`TETHER_SVCCACHE`), which every step after the first must not serve stale.
fn stay_on_one_cpu() {
    // SAFETY: cpu_set_t is plain data; sched_getcpu and sched_setaffinity act on this thread.
    unsafe {
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pinning the test thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn xdp(dp: &mut Dataplane) -> &Xdp {
    let p: &mut Xdp = dp
        .ebpf_mut()
        .program_mut(PROG_XDP)
        .expect("tether_xdp")
        .try_into()
        .expect("XDP program");
    p
}

fn services4(pin_dir: &Path) -> HashMap<MapData, ServiceKey4, Service> {
    let md = MapData::from_pin(pin_dir.join(MAP_SERVICES4)).expect("TETHER_SVC4 pin");
    HashMap::try_from(Map::HashMap(md)).expect("hash map")
}

fn bind(pin_dir: &Path, client: Ipv4Addr, service: u32, backend: u32, identity: u32) {
    let mut m = tether::dataplane::persist_table::Table4::open(pin_dir).expect("IPv4 shards");
    let key = PersistKey4 {
        addr_be: client.octets(),
        service,
    };
    let value = PersistValue4 {
        backend: backend as u16,
        identity_tag: identity_tag16(identity),
        last_seen_s: mono_seconds(coarse_now_ns()),
    };
    m.insert(&key, &value, 0).expect("binding");
}

/// Where a packet should go.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// XDP_TX to backend b1 (0) or b2 (1) of the pool.
    To(usize),
    /// XDP_TX to the backend the service's Maglev table gives the client.
    Maglev,
    /// XDP_PASS, counted under this reason.
    Pass(u32),
}

struct Step {
    what: &'static str,
    b2: BackendState,
    down_policy: &'static str,
    v4_service: bool,
    packet: PacketBuilder,
    expect: Expect,
}

fn to_vip(client: Ipv4Addr) -> PacketBuilder {
    PacketBuilder::tcp4(client, 40000, V4_VIP, 80).macs([0x02, 0xc1, 0, 0, 0, 1], LB_MAC)
}

/// Every step applies its config to the kernel maps (as a reload does) and then sends one
/// packet: the IPv4 service is found through `TETHER_SVC4` with the current value.
#[test]
fn ipv4_services_written_by_the_loader_forward_and_follow_changes() {
    use BackendState::{Down, Draining, Up};
    let steps = [
        Step {
            what: "bound client, backends up: stays on its backend (b2)",
            b2: Up,
            down_policy: "immediate",
            v4_service: true,
            packet: to_vip(BOUND),
            expect: Expect::To(1),
        },
        Step {
            what: "new client: the Maglev choice",
            b2: Up,
            down_policy: "immediate",
            v4_service: true,
            packet: to_vip(FRESH),
            expect: Expect::Maglev,
        },
        Step {
            what: "b2 draining: the bound client stays",
            b2: Draining,
            down_policy: "immediate",
            v4_service: true,
            packet: to_vip(BOUND).tcp_flags(TCP_ACK, 1, 1),
            expect: Expect::To(1),
        },
        Step {
            what: "b2 down, policy never: the bound client stays",
            b2: Down,
            down_policy: "never",
            v4_service: true,
            packet: to_vip(BOUND),
            expect: Expect::To(1),
        },
        Step {
            what: "b2 down, policy immediate: the bound client moves to b1",
            b2: Down,
            down_policy: "immediate",
            v4_service: true,
            packet: to_vip(BOUND),
            expect: Expect::To(0),
        },
        Step {
            what: "IPv4 service removed: its packets go to the stack",
            b2: Up,
            down_policy: "immediate",
            v4_service: false,
            packet: to_vip(BOUND),
            expect: Expect::Pass(reason::PASS_NOT_VIP),
        },
        Step {
            what: "IPv4 service removed: the IPv6 service still forwards",
            b2: Up,
            down_policy: "immediate",
            v4_service: false,
            packet: PacketBuilder::tcp6(CLIENT_6, 40000, V6_VIP, 443)
                .macs([0x02, 0xc1, 0, 0, 0, 1], LB_MAC),
            expect: Expect::Maglev,
        },
        Step {
            what: "IPv4 service back: its bindings were flushed, the client is new",
            b2: Up,
            down_policy: "immediate",
            v4_service: true,
            packet: to_vip(BOUND),
            expect: Expect::Maglev,
        },
    ];
    stay_on_one_cpu();
    let pins = Pins::new("steps");
    let mut dp = Dataplane::load(&pins.0, 1024).expect("loading the XDP program");
    let first = config(&pins.0, "immediate");
    let ids = balancer::assign_ids(&first, &balancer::Previous::default()).expect("ids");
    let (svc4, b2_id) = (ids.services[0], ids.backends[0][1]);
    dp.apply(&plan(&first, Up, true)).expect("apply");
    bind(&pins.0, BOUND, svc4, b2_id, backend_identity("p", "b2"));
    for (i, s) in steps.iter().enumerate() {
        let cfg = config(&pins.0, s.down_policy);
        let plan = plan(&cfg, s.b2, s.v4_service);
        let removed: Removed = dp.apply(&plan).expect("apply");
        // As the daemon does after an apply: bindings of removed services go.
        dp.forget(&removed).expect("forget");
        let frame = s.packet.build();
        let reasons = pinned::Pins::new(&pins.0);
        let count = |r| reasons.reason(r).expect("reason counter");
        let want_reason = match s.expect {
            Expect::Pass(r) => r,
            Expect::To(_) | Expect::Maglev => reason::TX,
        };
        let before = count(want_reason);
        let (action, out) = run_xdp(xdp(&mut dp), &frame.bytes, 0);
        let ctx = format!("step {i} ({}): action {action}", s.what);
        assert_eq!(
            count(want_reason),
            before + 1,
            "{ctx}: counted under reason {want_reason}"
        );
        let b = match s.expect {
            Expect::Pass(_) => {
                assert_eq!(action, XDP_PASS, "{ctx}");
                assert_eq!(out, frame.bytes, "{ctx}: a passed frame is unchanged");
                continue;
            }
            Expect::To(b) => b,
            Expect::Maglev => {
                let sp = plan
                    .services
                    .iter()
                    .find(|sp| {
                        let v6 = sp.key.to_v4().is_none();
                        v6 == (frame.bytes[12..14] == [0x86, 0xdd])
                    })
                    .expect("the packet's service in the plan");
                // Prefixes /32 and /128: the whole client address.
                let client = if sp.key.to_v4().is_some() {
                    v4_mapped(frame.bytes[26..30].try_into().expect("IPv4 source"))
                } else {
                    CLIENT_6.octets()
                };
                let h = client_hash(sp.value.index, &client);
                let id = sp.table[(h % MAGLEV_TABLE_SIZE) as usize];
                (0..2)
                    .find(|b| ids.backends[0][*b] == id)
                    .expect("a pool backend in the table")
            }
        };
        assert_eq!(action, XDP_TX, "{ctx}");
        assert_eq!(
            out,
            frame.with_macs(LB_MAC, B_MACS[b]).bytes,
            "{ctx}: to b{}",
            b + 1
        );
    }
}

/// Pins of a build without `TETHER_SVC4` (and one left with a stale entry): loading
/// fills it from `TETHER_SERVICES` and drops what that map does not hold, before the
/// program runs, so IPv4 packets find exactly the services the daemon knows.
#[test]
fn loading_over_pins_without_the_ipv4_service_map_fills_it() {
    let pins = Pins::new("upgrade");
    let cfg = config(&pins.0, "immediate");
    {
        let mut dp = Dataplane::load(&pins.0, 1024).expect("first load");
        dp.apply(&plan(&cfg, BackendState::Up, true))
            .expect("apply");
    }
    // As an older build left them: no IPv4 service map.
    std::fs::remove_file(pins.0.join(MAP_SERVICES4)).expect("removing the IPv4 map's pin");
    let stale = ServiceKey4 {
        addr_be: [10, 0, 0, 200],
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    let mut dp = Dataplane::load(&pins.0, 1024).expect("load over old pins");
    let m = services4(&pins.0);
    let keys: Vec<ServiceKey4> = m.keys().map(|k| k.expect("key")).collect();
    assert_eq!(
        keys,
        vec![ServiceKey4 {
            addr_be: V4_VIP.octets(),
            port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        }],
        "the IPv4 service, and only it, in TETHER_SVC4"
    );
    let frame = to_vip(FRESH).build();
    let (action, _) = run_xdp(xdp(&mut dp), &frame.bytes, 0);
    assert_eq!(action, XDP_TX, "the IPv4 VIP is served before any apply");

    // An entry TETHER_SERVICES does not hold (a daemon died between the two removals).
    let mut m = services4(&pins.0);
    let any = m.iter().next().expect("an entry").expect("entry").1;
    m.insert(stale, any, 0).expect("stale entry");
    drop(dp);
    let mut dp = Dataplane::load(&pins.0, 1024).expect("reload");
    assert!(
        services4(&pins.0).get(&stale, 0).is_err(),
        "a stale IPv4 service entry is removed at load"
    );
    let frame = PacketBuilder::tcp4(FRESH, 40000, Ipv4Addr::new(10, 0, 0, 200), 80).build();
    let (action, out) = run_xdp(xdp(&mut dp), &frame.bytes, 0);
    assert_eq!(
        (action, out),
        (XDP_PASS, frame.bytes.clone()),
        "no service at the stale entry's VIP"
    );
}

/// An operator removed only `TETHER_PERSIST4` of a split table to resize (as an earlier
/// warning told them), leaving shards 1 and 2 pinned at the old size: the load creates the
/// table the config asks for, and a binding userspace writes (as `tether persist` or a
/// mirror does) is found by the program, for clients in every shard. Had the leftover pins
/// been reused, userspace would read one shard back while the program uses three.
#[test]
fn after_removing_only_shard_0_userspace_bindings_are_found_by_xdp() {
    use lb_common::{MAP_PERSIST4, Persist4Layout};
    stay_on_one_cpu();
    let pins = Pins::new("stale-shard");
    drop(Dataplane::load(&pins.0, 3 * 8192).expect("the old 3 x 8192 table"));
    std::fs::remove_file(pins.0.join(MAP_PERSIST4)).expect("removing shard 0's pin");
    let entries = 3 * 4096;
    assert_eq!(Persist4Layout::for_entries(entries).shards, 3);
    let mut dp = Dataplane::load(&pins.0, entries).expect("load over the leftover shards");
    let cfg = config(&pins.0, "immediate");
    let plan = plan(&cfg, BackendState::Up, true);
    dp.apply(&plan).expect("apply");
    let ids = balancer::assign_ids(&cfg, &balancer::Previous::default()).expect("ids");
    let sp = plan
        .services
        .iter()
        .find(|sp| sp.key.to_v4().is_some())
        .expect("the IPv4 service");
    let mut shards_used = [false; 3];
    for i in 0..48u8 {
        let client = Ipv4Addr::new(198, 18, i, 9);
        // Bound to the backend Maglev would not choose: only a binding found sends there.
        let h = client_hash(sp.value.index, &v4_mapped(client.octets()));
        let maglev = sp.table[(h % MAGLEV_TABLE_SIZE) as usize];
        let b = (0..2)
            .find(|&b| ids.backends[0][b] != maglev)
            .expect("the other backend");
        let id = ids.backends[0][b];
        let name = ["b1", "b2"][b];
        bind(
            &pins.0,
            client,
            sp.value.index,
            id,
            backend_identity("p", name),
        );
        let key = PersistKey4 {
            addr_be: client.octets(),
            service: sp.value.index,
        };
        shards_used[key.shard(3) as usize] = true;
        let frame = to_vip(client).tcp_flags(TCP_ACK, 1, 1).build();
        let (action, out) = run_xdp(xdp(&mut dp), &frame.bytes, 0);
        assert_eq!(action, XDP_TX, "client {client}");
        assert_eq!(
            out,
            frame.with_macs(LB_MAC, B_MACS[b]).bytes,
            "client {client}: sent to its bound b{}",
            b + 1
        );
    }
    assert_eq!(shards_used, [true; 3], "clients in every shard");
}
