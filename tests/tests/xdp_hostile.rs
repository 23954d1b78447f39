//! The XDP program under hostile input, through BPF_PROG_TEST_RUN:
//! - a million random and mutated frames against configured services: never XDP_ABORTED, a
//!   forwarded frame differs from its input only in the MACs and goes to a configured
//!   backend, anything else leaves unchanged, and the verdict counters add up;
//! - floods against the persistence table: spoofed mid-connection packets create nothing, and
//!   a SYN flood at ten times the per-CPU cap cannot evict legitimate bindings.
//!
//! Needs root (BPF). Run with `cargo test -p tether-tests --test xdp_hostile`.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{
    BACKEND_DRAINING, BACKEND_UP, Globals, PROG_XDP, PROTO_TCP, PROTO_UDP, SERVICE_F_L7, event,
    reason,
};
use tether_tests::{
    fixture::*,
    packet::{IPPROTO_ICMP, IPPROTO_ICMPV6, PacketBuilder, TCP_ACK, TCP_SYN},
};

/// xorshift64*: a reproducible stream for the mutations (the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Pin this thread to the CPU it runs on: every run then uses one CPU's share of the LRU
/// table and one CPU's rate window, as one receive queue would.
fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on this thread with a zeroed, then filled, cpu set.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

const SVC_L7: u32 = 4;
const L7_PORT: u16 = 8443;

/// Services of every kind, backends A and B up and C draining, tables that mix A and B.
fn configured() -> Fixture {
    let mut fx = Fixture::new();
    fx.add_service(skey4(VIP, HTTP, PROTO_TCP), service(SVC_TCP, 300));
    fx.add_service(skey4(VIP, DNS, PROTO_UDP), service(SVC_UDP, 0));
    fx.add_service(skey6(VIP6, HTTPS, PROTO_TCP), service(SVC_TCP6, 300));
    fx.add_service(skey6(VIP6, DNS, PROTO_UDP), service(SVC_UDP6, 0));
    let mut l7 = service(SVC_L7, 0);
    l7.flags = SERVICE_F_L7;
    fx.add_service(skey4(VIP, L7_PORT, PROTO_TCP), l7);
    fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, 0));
    fx.set_backend(BE_B, backend(BE_B, BACKEND_UP, 0));
    fx.set_backend(BE_C, backend(BE_C, BACKEND_DRAINING, 0));
    for svc in [SVC_TCP, SVC_UDP, SVC_TCP6, SVC_UDP6, SVC_L7] {
        fx.fill_table(svc, 0, &[BE_A, BE_B]);
    }
    // Bindings to every backend state, so hits take each path.
    fx.set_persist(pkey4(SVC_TCP, CLIENT, 24), pval(BE_C, coarse_now_ns()));
    fx.set_globals(Globals {
        new_bindings_per_cpu: 200_000,
        emit_bindings: 1,
    });
    fx
}

/// Valid frames of every shape the parser knows, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let reply = PacketBuilder::tcp4(VIP, HTTP, CLIENT, SPORT).build();
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(&reply.bytes[reply.l3..reply.l4 + 8]);
    let reply6 = PacketBuilder::tcp6(VIP6, HTTPS, CLIENT6, SPORT).build();
    let mut icmp6 = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    icmp6.extend_from_slice(&reply6.bytes[reply6.l3..reply6.l4 + 8]);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let router6 = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
    [
        PacketBuilder::tcp4(CLIENT, SPORT, VIP, HTTP),
        PacketBuilder::tcp4(CLIENT, SPORT, VIP, HTTP).tcp_flags(TCP_ACK, 5, 6),
        PacketBuilder::tcp4(CLIENT, SPORT, VIP, HTTP).tcp_flags(TCP_SYN | TCP_ACK, 5, 6),
        PacketBuilder::tcp4(CLIENT, SPORT, VIP, L7_PORT),
        PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS).payload(b"query"),
        PacketBuilder::tcp6(CLIENT6, SPORT, VIP6, HTTPS).payload(b"\x16\x03\x01"),
        PacketBuilder::udp6(CLIENT6, SPORT, VIP6, DNS),
        PacketBuilder::tcp4(CLIENT, SPORT, VIP, HTTP).vlan(42),
        PacketBuilder::tcp4(CLIENT, SPORT, VIP, HTTP).ipv4_options(&[1, 1, 1, 1, 1, 1, 1, 0]),
        PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS).fragment(true, 0),
        PacketBuilder::udp4(CLIENT, SPORT, VIP, DNS).fragment(false, 185),
        PacketBuilder::raw4(router, VIP, IPPROTO_ICMP, &icmp),
        PacketBuilder::raw4(CLIENT, VIP, IPPROTO_ICMP, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]),
        PacketBuilder::raw6(router6, VIP6, IPPROTO_ICMPV6, &icmp6),
        PacketBuilder::tcp4(CLIENT, SPORT, NOT_VIP, HTTP),
    ]
    .iter()
    .map(|b| b.build().bytes)
    .collect()
}

/// One mutated frame: a seed with random source, a few field or byte changes, and perhaps a
/// new length; or, one time in ten, random bytes.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(10) == 0 {
        let len = rng.below(200);
        return (0..len).map(|_| rng.byte()).collect();
    }
    let mut f = seeds[rng.below(seeds.len())].clone();
    // Fields worth hitting on purpose: ethertype, VLAN, IP version/IHL, lengths, fragment
    // bits, protocol, addresses, ports, TCP flags, ICMP type and the quoted header.
    const HOT: [usize; 18] = [
        12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 26, 29, 33, 34, 36, 47, 54,
    ];
    for _ in 0..1 + rng.below(4) {
        if f.is_empty() {
            break;
        }
        let at = if rng.below(2) == 0 {
            HOT[rng.below(HOT.len())]
        } else {
            rng.below(f.len())
        };
        if at < f.len() {
            f[at] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                _ => rng.byte(),
            };
        }
    }
    match rng.below(6) {
        0 => {
            let n = rng.below(f.len() + 1);
            f.truncate(n);
        }
        1 => {
            for _ in 0..rng.below(64) {
                f.push(rng.byte());
            }
        }
        _ => {}
    }
    // Many clients: vary the IPv4 source (bytes 26..30 without VLAN), the common case.
    if f.len() >= 30 && rng.below(2) == 0 {
        f[29] = rng.byte();
        f[28] = rng.byte();
    }
    f
}

#[test]
fn a_million_mutated_frames_are_never_aborted_or_misforwarded() {
    const FRAMES: u64 = 1_000_000;
    let fx = configured();
    let seeds = seeds();
    let seed = 0x7e7e_5eed_u64 ^ std::process::id() as u64;
    let mut rng = Rng(seed);
    let backends = [BE_A, BE_B, BE_C];
    let mut actions = [0u64; 5];
    for i in 0..FRAMES {
        let input = mutate(&mut rng, &seeds);
        let (action, out) = fx.run_prog(PROG_XDP, &input, 0);
        assert_ne!(
            action, XDP_ABORTED,
            "frame {i} (seed {seed:#x}) aborted: {input:02x?}"
        );
        if action == XDP_TX {
            assert_eq!(out.len(), input.len(), "frame {i}: length changed");
            assert_eq!(
                out[12..],
                input[12..],
                "frame {i} (seed {seed:#x}): forwarded with more than the MACs changed"
            );
            let to = backends
                .iter()
                .find(|&&b| out[..6] == be_mac_dst(b))
                .unwrap_or_else(|| panic!("frame {i}: sent to no configured backend"));
            assert_eq!(
                out[6..12],
                be_mac_src(*to),
                "frame {i}: source MAC is not the egress interface's"
            );
        } else {
            assert!(
                action == XDP_PASS || action == XDP_DROP,
                "frame {i}: unexpected action {action}"
            );
            assert_eq!(
                out, input,
                "frame {i} (seed {seed:#x}): changed but not sent"
            );
        }
        actions[action as usize] += 1;
    }
    let reasons = fx.reasons();
    assert_eq!(
        reasons.iter().sum::<u64>(),
        FRAMES,
        "every frame counts exactly one reason: {reasons:?}"
    );
    let forwarded = reasons[reason::TX as usize]
        + reasons[reason::FWD_ICMP_ERROR as usize]
        + reasons[reason::FWD_FRAGMENT as usize];
    assert_eq!(forwarded, actions[XDP_TX as usize], "TX reasons vs actions");
    // The mutations must reach the interesting paths, or this test proves little.
    for r in [
        reason::TX,
        reason::FWD_ICMP_ERROR,
        reason::FWD_FRAGMENT,
        reason::PASS_L7,
        reason::PASS_NOT_VIP,
        reason::MALFORMED_IPV4,
        reason::MALFORMED_L4,
        reason::MALFORMED_ICMP,
    ] {
        assert!(
            reasons[r as usize] > 100,
            "only {} frames reached {}",
            reasons[r as usize],
            reason::NAMES[r as usize]
        );
    }
    eprintln!(
        "{FRAMES} frames (seed {seed:#x}): {} forwarded, {} passed, {} dropped",
        actions[XDP_TX as usize], actions[XDP_PASS as usize], actions[XDP_DROP as usize]
    );
}

/// Legitimate clients: one SYN each from distinct /24s of 10.0.0.0/8 (the service's prefix).
fn legit_client(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 7)
}

/// Spoofed sources, each in its own /24 (so each would be a new binding), from 100.0.0.0
/// upwards: never in the legitimate 10.0.0.0/8.
fn spoofed(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(100 + (i >> 16) as u8, (i >> 8) as u8, i as u8, 1)
}

fn surviving(fx: &Fixture, clients: u32) -> u32 {
    (0..clients)
        .filter(|&i| fx.persist(&pkey4(SVC_TCP, legit_client(i), 24)).is_some())
        .count() as u32
}

/// Send `n` TCP packets with `flags` from spoofed sources; all must be forwarded.
fn flood(fx: &Fixture, n: u32, flags: u8) {
    let template = PacketBuilder::tcp4(spoofed(0), SPORT, VIP, HTTP)
        .tcp_flags(flags, 1, if flags & TCP_ACK != 0 { 1 } else { 0 })
        .build();
    let src = template.l3 + 12;
    let mut frame = template.bytes.clone();
    for i in 0..n {
        frame[src..src + 4].copy_from_slice(&spoofed(i).octets());
        let (action, _) = fx.run_prog(PROG_XDP, &frame, 0);
        assert_eq!(action, XDP_TX, "flood packet {i} was not forwarded");
    }
}

const LEGIT: u32 = 10_000;
/// Small enough that each CPU's share (entries / possible CPUs) overflows under a flood.
const TABLE: u32 = 65_536;

fn with_legit_clients(cap: u32) -> Fixture {
    let mut fx = Fixture::with_persist_entries(TABLE);
    fx.add_service(skey4(VIP, HTTP, PROTO_TCP), service(SVC_TCP, 300));
    fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, 0));
    fx.set_backend(BE_B, backend(BE_B, BACKEND_UP, 0));
    fx.fill_table(SVC_TCP, 0, &[BE_A, BE_B]);
    fx.set_globals(Globals {
        new_bindings_per_cpu: cap,
        emit_bindings: 1,
    });
    // One window for the whole test: the cap is what a CPU may create in it.
    fx.freeze_rate_window();
    for i in 0..LEGIT {
        let f = PacketBuilder::tcp4(legit_client(i), SPORT, VIP, HTTP).build();
        assert_eq!(fx.run_prog(PROG_XDP, &f.bytes, 0).0, XDP_TX);
    }
    assert_eq!(surviving(&fx, LEGIT), LEGIT, "legitimate clients bound");
    fx
}

#[test]
fn floods_do_not_evict_legitimate_bindings() {
    pin_to_current_cpu();
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
    let per_cpu = TABLE / cpus;
    // Room for the legitimate clients and one window of capped new bindings on this CPU.
    let cap = ((per_cpu - LEGIT) / 2).min(5_000);
    assert!(
        cap > 0,
        "{per_cpu} entries per CPU leave no room for a flood test"
    );
    let fx = with_legit_clients(cap + LEGIT);
    let created_before = fx.event(event::BINDING_CREATED);

    // 2M spoofed mid-connection packets: forwarded by Maglev, nothing stored.
    const NON_SYN: u32 = 2_000_000;
    flood(&fx, NON_SYN, TCP_ACK);
    assert_eq!(fx.event(event::NON_SYN_UNBOUND), NON_SYN as u64);
    assert_eq!(fx.event(event::BINDING_CREATED), created_before);
    assert_eq!(
        surviving(&fx, LEGIT),
        LEGIT,
        "a non-SYN flood must leave every binding"
    );
    assert_eq!(fx.persist_len(), LEGIT as usize);

    // A SYN flood at ten times what the cap lets through in this window.
    flood(&fx, 10 * cap, TCP_SYN);
    let refused = fx.event(event::BINDING_RATE_LIMITED);
    assert_eq!(
        refused,
        9 * cap as u64,
        "the cap refused the rest of the flood"
    );
    let survivors = surviving(&fx, LEGIT);
    assert_eq!(
        survivors, LEGIT,
        "with {per_cpu} entries per CPU and a cap of {cap}, every legitimate binding survives"
    );
    eprintln!(
        "table {TABLE} ({per_cpu}/CPU), {LEGIT} legitimate bindings: after {NON_SYN} spoofed non-SYN packets {LEGIT} survive; after {} SYNs against a cap of {cap}/window, {survivors} survive ({refused} refused)",
        10 * cap
    );
}

/// The same SYN flood without a cap overflows this CPU's share and evicts real clients: the
/// case the cap exists for.
#[test]
fn without_the_cap_a_syn_flood_evicts_bindings() {
    pin_to_current_cpu();
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
    let per_cpu = TABLE / cpus;
    let fx = with_legit_clients(0);
    flood(&fx, per_cpu, TCP_SYN);
    let survivors = surviving(&fx, LEGIT);
    assert!(
        survivors < LEGIT,
        "{per_cpu} new sources on one CPU must evict some of the {LEGIT} bindings"
    );
    eprintln!(
        "uncapped SYN flood of {per_cpu}: {survivors} of {LEGIT} legitimate bindings survive"
    );
}
