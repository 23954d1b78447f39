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
    net::Ipv6Addr,
    panic::{AssertUnwindSafe, catch_unwind},
    rc::Rc,
};

use aya::maps::{MapInfo, MapType};
use lb_common::{
    ALL_MAPS, BACKEND_DISABLED, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UNUSED, BACKEND_UP,
    DOWN_POLICY_IMMEDIATE, DOWN_POLICY_NEVER, Globals, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_BINDINGS, MAP_CLOCK, MAP_EVENTS, MAP_FLOWS, MAP_FRAGS, MAP_GLOBALS, MAP_MAGLEV,
    MAP_PERSIST, MAP_PERSIST4, MAP_PERSIST4_SHARDS, MAP_RATE, MAP_REASONS, MAP_SERVICE_STATS,
    MAP_SERVICES, MAP_SERVICES4, MAP_SVC_CACHE, MAP_SVC_GEN, MAP_TX_PORTS, MAX_BACKENDS,
    MAX_SERVICES, NO_BACKEND, PERSIST_REFRESH_NS, PROG_DROP, PROG_FLOOR_HIT, PROG_FLOOR_NEW,
    PROG_PASS, PROG_SWAP_TX, PROG_XDP, PROTO_TCP, PROTO_UDP, PersistKey, PersistKey4, PersistValue,
    PersistValue4, SERVICE_F_L7, TrafficCounters, event,
    hash::{client_hash, flow_hash},
    prefix_mask, reason, v4_mapped,
};
use tether_tests::packet::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, Frame, IPPROTO_ICMP, IPPROTO_ICMPV6, PacketBuilder,
    TCP_ACK, TCP_SYN,
};

use tether::dataplane::MAP_LAYOUTS;
use tether_tests::fixture::*;

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
    let other_frag = vip_tcp4(SPORT).ip_id(0x4321).fragment(true, 185).build();
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
            "first fragment (MF, offset 0) is balanced; later fragments follow it",
            |fx| {
                setup_v4(fx, 0);
                // This flow's entry names B: the later fragments (no ports of their own)
                // must be sent by the ports their first fragment carried.
                let h = flow_hash(
                    SVC_TCP,
                    &v4_mapped(CLIENT.octets()),
                    SPORT.to_be(),
                    HTTP.to_be(),
                );
                fx.set_entry(SVC_TCP, 0, h, BE_B);
            },
            vec![
                // Another datagram's later fragment, never seen first: passed and counted.
                pass(other_frag.bytes.clone(), reason::PASS_FRAGMENT),
                tx(&first_frag, BE_B),
                step(
                    later_frag.bytes.clone(),
                    XDP_TX,
                    Out::Bytes(to_backend(&later_frag, BE_B)),
                    reason::FWD_FRAGMENT,
                ),
                step(
                    last_frag.bytes.clone(),
                    XDP_TX,
                    Out::Bytes(to_backend(&last_frag, BE_B)),
                    reason::FWD_FRAGMENT,
                ),
            ],
            |fx| assert_eq!(fx.event(event::FRAG_TRACKED), 1, "one datagram tracked"),
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
                    // The IPv4 table keeps whole seconds: the second it was written in.
                    let second = written.get() / 1_000_000_000 * 1_000_000_000;
                    assert_eq!(v, pval(BE_B, second), "entry untouched");
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

/// Every binding the program writes reaches the ring buffer the mirror drains: a SYN's new
/// binding, and a binding moved off a down backend with the identity it replaced; packets
/// that only use a binding write nothing.
#[test]
fn bindings_written_reach_the_ring_buffer() {
    let mut fx = Fixture::new();
    setup_v4(&mut fx, 300);
    fx.set_backend(BE_A, backend_ident(BE_A, BACKEND_UP, 11));
    fx.set_backend(BE_B, backend_ident(BE_B, BACKEND_UP, 22));
    fx.fill_table(SVC_TCP, 0, &[BE_A]);
    fx.set_globals(Globals {
        new_bindings_per_cpu: 0,
        emit_bindings: 1,
    });
    let mut ring = tether::dataplane::persist_table::BindingEvents::open(&fx.dir)
        .expect("the ring buffer is pinned");
    let syn = vip_tcp4(SPORT).build();
    let ack = vip_tcp4(SPORT).tcp_flags(TCP_ACK, 1, 1).build();
    let key = pkey4(SVC_TCP, CLIENT, 24);
    assert_eq!(fx.run(&syn.bytes).0, XDP_TX);
    assert_eq!(fx.run(&ack.bytes).0, XDP_TX);
    let events = ring.drain(16);
    assert_eq!(events.len(), 1, "one binding made: {events:?}");
    let e = events[0];
    assert_eq!(
        (
            e.service,
            e.backend_identity,
            e.previous_identity,
            e.addr_be
        ),
        (SVC_TCP, 11, 0, key.addr_be)
    );
    // A goes down: the next SYN moves the client to B, naming A as the replaced identity.
    fx.set_backend(BE_A, backend_ident(BE_A, BACKEND_DOWN, 11));
    fx.fill_table(SVC_TCP, 0, &[BE_B]);
    assert_eq!(fx.run(&syn.bytes).0, XDP_TX);
    let events = ring.drain(16);
    assert_eq!(events.len(), 1, "one binding moved: {events:?}");
    // IPv4 bindings keep 16 bits of the identity: the replaced one is reported as its tag.
    assert_eq!(
        (
            events[0].backend_identity,
            events[0].previous_identity,
            events[0].flags
        ),
        (22, 11, lb_common::BINDING_PREVIOUS_TAG16)
    );
}

/// The ring buffer is written only while the daemon mirrors (`Globals::emit_bindings`).
/// When its reader falls behind and the ring is full, a new binding is still made and the
/// packet forwarded, and the event is dropped and counted (`binding_event_dropped`); once
/// drained, events flow again.
#[test]
fn a_full_binding_ring_drops_and_counts_events() {
    let mut fx = Fixture::new();
    setup_v4(&mut fx, 300);
    let mut ring = tether::dataplane::persist_table::BindingEvents::open(&fx.dir)
        .expect("the ring buffer is pinned");
    // One client per /24 (the service's prefix): every SYN makes a new binding.
    let client = |n: u32| {
        let [_, _, a, b] = n.to_be_bytes();
        std::net::Ipv4Addr::new(100, a, b, 1)
    };
    let syn_from = |n: u32| tcp4(client(n), SPORT, VIP, HTTP).build();
    // Not mirroring: a binding is made, nothing is written or dropped.
    assert_eq!(fx.run(&syn_from(0).bytes).0, XDP_TX);
    assert_eq!(fx.event(event::BINDING_CREATED), 1);
    assert!(ring.drain(16).is_empty(), "no event without emit_bindings");
    assert_eq!(fx.event(event::BINDING_EVENT_DROPPED), 0);

    fx.set_globals(Globals {
        new_bindings_per_cpu: 0,
        emit_bindings: 1,
    });
    // More bindings than the ring holds (records of 32 bytes and an 8-byte header), with
    // nobody reading.
    let record = (size_of::<lb_common::BindingEvent>() + 8) as u32;
    let sent = lb_common::BINDINGS_RING_BYTES / record + 200;
    for n in 1..=sent {
        assert_eq!(fx.run(&syn_from(n).bytes).0, XDP_TX, "SYN {n} forwarded");
    }
    assert_eq!(
        fx.event(event::BINDING_CREATED),
        u64::from(sent) + 1,
        "every SYN made its binding"
    );
    let mut drained = 0u64;
    for _ in 0..64 {
        let batch = ring.drain(4096);
        if batch.is_empty() {
            break;
        }
        drained += batch.len() as u64;
    }
    let dropped = fx.event(event::BINDING_EVENT_DROPPED);
    assert!(
        dropped >= 200,
        "a full ring drops events: {dropped} dropped"
    );
    assert_eq!(
        drained + dropped,
        u64::from(sent),
        "every binding was either output or counted as dropped ({drained} read)"
    );
    // Drained: the next binding is output again, nothing more is dropped.
    assert_eq!(fx.run(&syn_from(sent + 1).bytes).0, XDP_TX);
    let events = ring.drain(16);
    assert_eq!(events.len(), 1, "an event after the drain: {events:?}");
    assert_eq!(events[0].addr_be, masked4(client(sent + 1), 24));
    assert_eq!(fx.event(event::BINDING_EVENT_DROPPED), dropped);
}

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
/// A router on the path to the client, which sends ICMP errors to the VIP.
const ROUTER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

/// An ICMP error about a packet the VIP sent from `vip_port` to `client:cport` (a DSR
/// backend's reply), quoting its IP header and `quote_l4` bytes of its TCP/UDP header.
fn icmp4_error(
    kind: u8,
    code: u8,
    client: std::net::Ipv4Addr,
    cport: u16,
    vip_port: u16,
    udp: bool,
    quote_l4: usize,
) -> Frame {
    let reply = if udp {
        PacketBuilder::udp4(VIP, vip_port, client, cport)
    } else {
        PacketBuilder::tcp4(VIP, vip_port, client, cport)
    }
    .build();
    // Type, code, checksum (not checked on this path), then "next-hop MTU" 1400.
    let mut msg = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
    msg.extend_from_slice(&reply.bytes[reply.l3..reply.l4 + quote_l4]);
    PacketBuilder::raw4(ROUTER, VIP, IPPROTO_ICMP, &msg).build()
}

/// ICMPv6 "packet too big" about a packet VIP6:443 sent to CLIENT6:SPORT.
fn icmp6_too_big() -> Frame {
    let reply = PacketBuilder::tcp6(VIP6, HTTPS, CLIENT6, SPORT).build();
    let mut msg = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    msg.extend_from_slice(&reply.bytes[reply.l3..reply.l4 + 8]);
    PacketBuilder::raw6(ROUTER6, VIP6, IPPROTO_ICMPV6, &msg).build()
}

fn fwd(f: &Frame, id: u32, reason: u32) -> Step {
    step(
        f.bytes.clone(),
        XDP_TX,
        Out::Bytes(to_backend(f, id)),
        reason,
    )
}

/// What must not create state (TCP without SYN, ICMP errors), the per-CPU cap on new
/// bindings, and ICMP errors about VIP flows reaching the flow's backend.
#[test]
fn hostile_and_control_traffic() {
    let ack = vip_tcp4(SPORT).tcp_flags(TCP_ACK, 100, 200).build();
    let syn_ack = vip_tcp4(SPORT)
        .tcp_flags(TCP_SYN | TCP_ACK, 100, 200)
        .build();
    let syn = vip_tcp4(SPORT).build();
    let syn2 = vip_tcp4(SPORT + 1).build();
    let third = std::net::Ipv4Addr::new(203, 0, 113, 9);
    let syn_other = tcp4(CLIENT_OTHER_24, SPORT, VIP, HTTP).build();
    let syn_third = tcp4(third, SPORT, VIP, HTTP).build();
    let frag_needed = icmp4_error(3, 4, CLIENT, SPORT, HTTP, false, 8);
    let time_exceeded_udp = icmp4_error(11, 0, CLIENT, SPORT, DNS, true, 8);
    let not_vip_flow = icmp4_error(3, 4, CLIENT, SPORT, 9999, false, 8);
    let cut_short = icmp4_error(3, 4, CLIENT, SPORT, HTTP, false, 2);
    let too_big6 = icmp6_too_big();
    let key = pkey4(SVC_TCP, CLIENT, 24);
    let client_entry = client_hash(SVC_TCP, &masked4(CLIENT, 24));

    let cases = vec![
        case(
            "tcp without SYN from an unseen client is forwarded by Maglev and binds nothing",
            |fx| setup_v4(fx, 300),
            vec![
                tx(&ack, BE_A),
                tx(&syn_ack, BE_A),
                // The SYN binds; later the pool changes, and the client's ACKs stay.
                tx(&syn, BE_A),
                tx(&ack, BE_A).before(|fx| fx.fill_table(SVC_TCP, 0, &[BE_B])),
            ],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_A));
                assert_eq!(fx.persist_len(), 1, "only the SYN made a binding");
                assert_eq!(fx.event(event::NON_SYN_UNBOUND), 2);
                assert_eq!(fx.event(event::BINDING_CREATED), 1);
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.new_assignments, s.persist_hits), (1, 1));
            },
        ),
        case(
            "new bindings beyond the per-CPU cap are forwarded but not stored",
            |fx| {
                setup_v4(fx, 300);
                fx.set_globals(Globals {
                    new_bindings_per_cpu: 2,
                    emit_bindings: 0,
                });
                fx.freeze_rate_window();
            },
            vec![
                tx(&syn, BE_A),
                tx(&syn_other, BE_A),
                tx(&syn_third, BE_A),
                // A bound client's new connection is a hit: the cap does not apply.
                tx(&syn2, BE_A),
            ],
            move |fx| {
                assert_eq!(fx.persist_len(), 2, "the third client was not stored");
                assert_eq!(fx.event(event::BINDING_RATE_LIMITED), 1);
                assert_eq!(fx.event(event::BINDING_CREATED), 2);
                let s = fx.svc_stat(SVC_TCP);
                assert_eq!((s.new_assignments, s.persist_hits), (2, 1));
            },
        ),
        case(
            "fragmentation needed for a bound client goes to its backend, unchanged but the MACs",
            move |fx| {
                setup_v4(fx, 300);
                fx.set_backend(BE_B, backend(BE_B, BACKEND_UP, 0));
                fx.set_persist(key, pval(BE_B, coarse_now_ns()));
            },
            vec![fwd(&frag_needed, BE_B, reason::FWD_ICMP_ERROR)],
            move |fx| {
                assert_eq!(fx.persist(&key).map(|v| v.backend), Some(BE_B));
                assert_eq!(fx.persist_len(), 1);
                assert_eq!(fx.be_stat(BE_B).packets, 1);
            },
        ),
        case(
            "an ICMP error for an unbound client goes where its first packet would, binding nothing",
            move |fx| {
                setup_v4(fx, 300);
                fx.set_entry(SVC_TCP, 0, client_entry, BE_B);
            },
            vec![fwd(&frag_needed, BE_B, reason::FWD_ICMP_ERROR)],
            |fx| {
                assert_eq!(fx.persist_len(), 0);
                assert_eq!(fx.event(event::NON_SYN_UNBOUND), 0, "not a TCP packet");
            },
        ),
        case(
            "an ICMP error about a flow of a service without persistence follows the flow hash",
            |fx| {
                setup_v4(fx, 0);
                let h = flow_hash(
                    SVC_UDP,
                    &v4_mapped(CLIENT.octets()),
                    SPORT.to_be(),
                    DNS.to_be(),
                );
                fx.set_entry(SVC_UDP, 0, h, BE_B);
            },
            vec![fwd(&time_exceeded_udp, BE_B, reason::FWD_ICMP_ERROR)],
            no_check,
        ),
        case(
            "ICMP errors about other flows, or cut short, go to the host",
            |fx| setup_v4(fx, 300),
            vec![
                pass(not_vip_flow.bytes.clone(), reason::PASS_NOT_VIP),
                pass(cut_short.bytes.clone(), reason::MALFORMED_ICMP),
            ],
            |fx| assert_eq!(fx.persist_len(), 0),
        ),
        case(
            "an ICMP error about an L7 service's flow is the host's",
            |fx| {
                setup_v4(fx, 300);
                let mut s = service(SVC_TCP, 300);
                s.flags = SERVICE_F_L7;
                fx.add_service(skey4(VIP, HTTP, PROTO_TCP), s);
            },
            vec![pass(frag_needed.bytes.clone(), reason::PASS_L7)],
            no_check,
        ),
        case(
            "ICMPv6 packet too big reaches the bound backend",
            |fx| {
                setup_v6(fx, 300);
                fx.set_persist(
                    PersistKey {
                        service: SVC_TCP6,
                        addr_be: masked6(CLIENT6, 64),
                    },
                    pval(BE_B, coarse_now_ns()),
                );
            },
            vec![fwd(&too_big6, BE_B, reason::FWD_ICMP_ERROR)],
            no_check,
        ),
    ];
    run_table(cases);
}

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

/// The benchmark's floor programs: `floor_new` binds a new client in `TETHER_PERSIST4` under
/// service 0 and sends the frame back (XDP_TX, MACs swapped), and passes a known one;
/// `floor_hit` sends a known client back and passes an unknown one. The bench relies on
/// these verdicts to check which path every packet took.
#[test]
fn floor_programs() {
    let fx = Fixture::new();
    let f = vip_tcp4(SPORT).build();
    let swapped = f
        .with_macs(
            f.bytes[0..6].try_into().unwrap(),
            f.bytes[6..12].try_into().unwrap(),
        )
        .bytes;
    let key = PersistKey4 {
        addr_be: CLIENT.octets(),
        service: 0,
    };
    let table = || -> Option<PersistValue4> {
        let m: aya::maps::HashMap<_, PersistKey4, PersistValue4> =
            aya::maps::HashMap::try_from(fx.ebpf.map(MAP_PERSIST4).unwrap()).unwrap();
        m.get(&key, 0).ok()
    };
    let unchanged = (XDP_PASS, f.bytes.clone());
    assert_eq!(
        fx.run_prog(PROG_FLOOR_HIT, &f.bytes, 0),
        unchanged,
        "floor_hit on an unknown client"
    );
    assert_eq!(table(), None, "floor_hit wrote the table");
    assert_eq!(
        fx.run_prog(PROG_FLOOR_NEW, &f.bytes, 0),
        (XDP_TX, swapped.clone()),
        "floor_new on a new client"
    );
    assert_eq!(
        table(),
        Some(PersistValue4::default()),
        "floor_new's binding of the client under service 0"
    );
    assert_eq!(
        fx.run_prog(PROG_FLOOR_NEW, &f.bytes, 0),
        unchanged,
        "floor_new on a known client"
    );
    assert_eq!(
        fx.run_prog(PROG_FLOOR_HIT, &f.bytes, 0),
        (XDP_TX, swapped),
        "floor_hit on a known client"
    );
    // Shorter than the Ethernet and IPv4 headers up to the source address: passed.
    let short = &f.bytes[..29];
    for prog in [PROG_FLOOR_HIT, PROG_FLOOR_NEW] {
        assert_eq!(
            fx.run_prog(prog, short, 0),
            (XDP_PASS, short.to_vec()),
            "{prog} on a 29-byte frame"
        );
    }
    assert_eq!(fx.persist_len(), 1, "only the one client was bound");
}

/// Every map in `ALL_MAPS` exists in the object, is pinned by name, and has the layout the
/// daemon expects.
#[test]
fn maps_match_the_contract() {
    let fx = Fixture::new();
    // Sizes and capacities: the daemon's own table (it replaces pins that differ from it),
    // so this also proves that table matches the object. Types are checked here.
    let types = [
        (MAP_SERVICES, MapType::Hash),
        (MAP_SERVICES4, MapType::Hash),
        (MAP_SVC_CACHE, MapType::PerCpuArray),
        (MAP_SVC_GEN, MapType::Array),
        (MAP_BACKENDS, MapType::Array),
        (MAP_MAGLEV, MapType::Array),
        (MAP_PERSIST, MapType::LruHash),
        (MAP_PERSIST4_SHARDS[0], MapType::LruHash),
        (MAP_PERSIST4_SHARDS[1], MapType::LruHash),
        (MAP_PERSIST4_SHARDS[2], MapType::LruHash),
        (MAP_PERSIST4_SHARDS[3], MapType::LruHash),
        (MAP_PERSIST4_SHARDS[4], MapType::LruHash),
        (MAP_PERSIST4_SHARDS[5], MapType::LruHash),
        (MAP_PERSIST4_SHARDS[6], MapType::LruHash),
        (MAP_PERSIST4_SHARDS[7], MapType::LruHash),
        (MAP_TX_PORTS, MapType::DevMapHash),
        (MAP_SERVICE_STATS, MapType::PerCpuArray),
        (MAP_BACKEND_STATS, MapType::PerCpuArray),
        (MAP_REASONS, MapType::PerCpuArray),
        (MAP_EVENTS, MapType::PerCpuArray),
        (MAP_GLOBALS, MapType::Array),
        (MAP_RATE, MapType::PerCpuArray),
        (MAP_FRAGS, MapType::LruHash),
        (MAP_FLOWS, MapType::LruHash),
        (MAP_BINDINGS, MapType::RingBuf),
        (MAP_CLOCK, MapType::PerCpuArray),
    ];
    assert_eq!(
        types.iter().map(|e| e.0).collect::<Vec<_>>(),
        ALL_MAPS.to_vec()
    );
    assert_eq!(
        MAP_LAYOUTS.iter().map(|e| e.0).collect::<Vec<_>>(),
        ALL_MAPS.to_vec()
    );
    for ((name, ty), (_, k, v, max)) in types.into_iter().zip(MAP_LAYOUTS) {
        // The persistence table's size is set at load: the fixture's (a power of two: one
        // IPv4 shard; the unused ones are as small as the kernel makes a per-CPU LRU map).
        let unused_shard = MAP_PERSIST4_SHARDS[1..].contains(&name);
        let max = max.unwrap_or(if unused_shard {
            tether::dataplane::possible_cpus()
        } else {
            PERSIST_ENTRIES
        });
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
    assert_eq!(
        flags(MAP_SERVICES4) & 1,
        1,
        "IPv4 services: BPF_F_NO_PREALLOC"
    );
    assert_eq!(flags(MAP_PERSIST) & 2, 2, "persist: BPF_F_NO_COMMON_LRU");
    for name in MAP_PERSIST4_SHARDS {
        assert_eq!(flags(name) & 2, 2, "{name}: BPF_F_NO_COMMON_LRU");
    }
    assert_eq!(flags(MAP_FLOWS) & 2, 2, "flows: BPF_F_NO_COMMON_LRU");
}
