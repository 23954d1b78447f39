//! End to end, L4 DSR with source-IP persistence: real TCP connections from a client namespace
//! to the VIP, through tether's XDP program attached by the real daemon on the LB's veth, to
//! HTTP servers in backend namespaces that answer the client directly.
//!
//! Needs root and `TETHER_BIN` (the daemon binary): run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_l4 -- --test-threads=1`.
//! Every test builds its own namespaces (unique names) and removes them, also on failure.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_common::maps::{PROTO_TCP, PersistValue};
use lb_common::stats::reason;
use tether_tests::{
    daemon::{ConfigBuilder, Daemon},
    http::{BackendServers, http_get_from},
    l4lab::{IO_TIMEOUT, L4Lab, PORT},
    netns::{Topology, VIP, run_in_netns},
    pinned::monotonic_coarse_ns,
};

/// The shared L4 lab plus this file's checks.
struct Lab(L4Lab);

impl std::ops::Deref for Lab {
    type Target = L4Lab;
    fn deref(&self) -> &L4Lab {
        &self.0
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut L4Lab {
        &mut self.0
    }
}

impl Lab {
    /// `clients` source addresses, `backends` backends, service `web` on VIP:80 with
    /// client-IP persistence timing out after `timeout_s` (None: no persistence), in
    /// `xdp_mode` (None: the default, as users run it).
    fn new(clients: usize, backends: usize, xdp_mode: Option<&str>, timeout_s: Option<u64>) -> Lab {
        Lab(L4Lab::start(clients, backends, |b| {
            let b = b.service("web", PORT, timeout_s);
            match xdp_mode {
                Some(m) => b.xdp_mode(m),
                None => b,
            }
        }))
    }

    fn stop(self) {
        self.0.stop()
    }

    fn assert_xdp_mode(&self, want: &str) {
        let mode = self.ok(self.topo.lb_xdp_mode(), "ip link show");
        if mode.as_deref() != Some(want) {
            self.fail(format!(
                "XDP on {} is attached as {mode:?}, expected {want}",
                self.topo.lb.ifname
            ));
        }
    }
}

/// Groups a plan's results by client: client -> backends seen (with counts).
fn by_client(plan: &[Ipv4Addr], got: &[String]) -> BTreeMap<Ipv4Addr, BTreeMap<String, usize>> {
    let mut m: BTreeMap<Ipv4Addr, BTreeMap<String, usize>> = BTreeMap::new();
    for (src, be) in plan.iter().zip(got) {
        *m.entry(*src).or_default().entry(be.clone()).or_default() += 1;
    }
    m
}

/// The namespaces alone, no daemon: the L2 segment works (client to a backend's own address
/// across the bridge), and without tether the VIP is the LB's (backends ignore ARP for it),
/// so nothing answers on port 80.
#[test]
fn topology_without_daemon() {
    let topo = Topology::builder()
        .client_addrs(2)
        .backends(2)
        .build()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let servers = BackendServers::start(&topo, PORT).unwrap_or_else(|e| panic!("{e:#}"));
    for (i, b) in topo.backends.iter().enumerate() {
        for &src in &topo.client_addrs {
            let dst = SocketAddrV4::new(b.addr, PORT);
            let body = run_in_netns(&topo.client.ns, || http_get_from(src, dst, IO_TIMEOUT))
                .unwrap()
                .unwrap_or_else(|e| panic!("direct GET {dst} from {src}: {e}"));
            assert_eq!(body, topo.backend_name(i), "direct GET {dst} from {src}");
        }
    }
    assert_eq!(
        topo.lb_xdp_mode().unwrap(),
        None,
        "nothing is attached on the LB's veth yet"
    );
    let r = topo.fetch(topo.client.addr, PORT, IO_TIMEOUT);
    assert!(
        r.is_err(),
        "without tether the VIP must not reach a backend, got {r:?}"
    );
    let conns: u64 = servers.connections().iter().map(|(_, n)| n).sum();
    assert_eq!(
        conns,
        (topo.backends.len() * topo.client_addrs.len()) as u64
    );
}

/// (a) 200 connections from one client address all reach one backend, which the persistence
/// table names; the counters add up.
#[test]
fn one_client_sticks_to_one_backend() {
    let lab = Lab::new(1, 3, None, Some(1800));
    // The default mode on a veth whose peer has no XDP program: generic, and the log says why.
    lab.assert_xdp_mode("xdpgeneric");
    if lab.d().log_lines("is a veth").is_empty() {
        lab.fail("the daemon did not log why it chose generic mode on the veth");
    }
    let src = lab.topo.client_addrs[0];
    const N: usize = 200;
    let got = lab.fetch_all(&vec![src; N]);
    let seen: BTreeSet<&String> = got.iter().collect();
    if seen.len() != 1 {
        lab.fail(format!(
            "{N} connections from {src} reached {} backends: {:?}",
            seen.len(),
            by_client(&vec![src; N], &got)
        ));
    }
    let backend = got[0].clone();

    let entry = lab
        .ok(lab.pins.persist_get(lab.svc, src), "reading TETHER_PERSIST")
        .unwrap_or_else(|| lab.fail(format!("no TETHER_PERSIST entry for {src}")));
    assert_eq!(
        lab.backend_name_of_id(entry.backend),
        backend,
        "the persistence entry names the backend that answered"
    );

    // Server side: the chosen backend accepted every connection, the others none.
    for (name, conns) in lab.servers.connections() {
        let want = if name == backend { N as u64 } else { 0 };
        assert_eq!(conns, want, "connections accepted by {name}");
    }

    let c = lab.svc_counters();
    assert_eq!(
        c.new_assignments, 1,
        "one client, one new assignment: {c:?}"
    );
    assert!(
        c.packets >= 3 * N as u64,
        "at least 3 client packets per connection: {c:?}"
    );
    assert_eq!(
        c.persist_hits,
        c.packets - 1,
        "every packet but the first hits the entry: {c:?}"
    );
    assert_eq!(
        (c.expired, c.no_backend, c.reassigned_down),
        (0, 0, 0),
        "{c:?}"
    );
    let id = lab.backend_id_of_name(&backend);
    let bc = lab.ok(lab.pins.backend_counters(id), "reading TETHER_BE_STAT");
    assert_eq!(
        bc.packets, c.packets,
        "all of the service's packets went to {backend}: {bc:?}"
    );
    let tx = lab.ok(lab.pins.reason(reason::TX), "reading TETHER_REASONS");
    assert!(
        tx >= c.packets,
        "XDP_TX verdicts ({tx}) cover the forwarded packets ({})",
        c.packets
    );
    lab.assert_no_drops();
    lab.stop();
}

/// (b) 50 client addresses spread over all 3 backends, and each client stays on its backend
/// over repeated connections; one entry and one new assignment per client.
#[test]
fn many_clients_spread_and_stick() {
    const CLIENTS: usize = 50;
    const ROUNDS: usize = 4;
    let lab = Lab::new(CLIENTS, 3, None, Some(1800));
    let plan: Vec<Ipv4Addr> = (0..ROUNDS)
        .flat_map(|_| lab.topo.client_addrs.iter().copied())
        .collect();
    let got = lab.fetch_all(&plan);
    let clients = by_client(&plan, &got);
    assert_eq!(clients.len(), CLIENTS);
    let moved: Vec<_> = clients.iter().filter(|(_, b)| b.len() != 1).collect();
    if !moved.is_empty() {
        lab.fail(format!(
            "{} clients reached more than one backend: {moved:?}",
            moved.len()
        ));
    }
    let client_backend: BTreeMap<Ipv4Addr, String> = clients
        .iter()
        .map(|(c, b)| (*c, b.keys().next().expect("one").clone()))
        .collect();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for b in client_backend.values() {
        *per_backend.entry(b.clone()).or_default() += 1;
    }
    eprintln!("clients per backend: {per_backend:?}");
    for i in 0..lab.topo.backends.len() {
        let name = lab.topo.backend_name(i);
        if per_backend.get(&name).copied().unwrap_or(0) == 0 {
            lab.fail(format!(
                "backend {name} got no client of {CLIENTS}: {per_backend:?}"
            ));
        }
    }
    // Server side agrees with what the clients saw.
    for (name, conns) in lab.servers.connections() {
        assert_eq!(
            conns,
            (per_backend.get(&name).copied().unwrap_or(0) * ROUNDS) as u64,
            "connections accepted by {name}"
        );
    }

    // The persistence table: one entry per client, naming the backend that answered it.
    let entries: Vec<_> = lab
        .ok(lab.pins.persist_entries(), "reading TETHER_PERSIST")
        .into_iter()
        .filter(|(k, _)| k.service == lab.svc)
        .collect();
    assert_eq!(entries.len(), CLIENTS, "one persistence entry per client");
    for (k, v) in &entries {
        let client = tether_tests::pinned::mapped_v4(&k.addr_be)
            .unwrap_or_else(|| lab.fail(format!("entry key is not an IPv4-mapped address: {k:?}")));
        let want = client_backend
            .get(&client)
            .unwrap_or_else(|| lab.fail(format!("entry for unknown client {client}")));
        assert_eq!(
            &lab.backend_name_of_id(v.backend),
            want,
            "entry of {client}"
        );
    }

    let c = lab.svc_counters();
    assert_eq!(
        c.new_assignments, CLIENTS as u64,
        "one new assignment per distinct client: {c:?}"
    );
    assert_eq!(c.persist_hits, c.packets - CLIENTS as u64, "{c:?}");
    assert_eq!((c.expired, c.no_backend), (0, 0), "{c:?}");
    let mut sum = 0;
    for i in 0..lab.topo.backends.len() {
        let name = lab.topo.backend_name(i);
        let bc = lab.ok(
            lab.pins.backend_counters(lab.backend_id_of_name(&name)),
            "reading TETHER_BE_STAT",
        );
        assert!(
            bc.packets > 0,
            "backend {name} forwarded no packets: {bc:?}"
        );
        sum += bc.packets;
    }
    assert_eq!(
        sum, c.packets,
        "backend packet counters add up to the service's"
    );
    // Direct server return: the replies go from the backends straight to the client, so no
    // IPv4 packet other than client -> VIP reaches the LB's XDP program.
    let not_vip = lab.ok(
        lab.pins.reason(reason::PASS_NOT_VIP),
        "reading TETHER_REASONS",
    );
    assert_eq!(
        not_vip, 0,
        "IPv4 packets not for the VIP reached the LB (replies must bypass it)"
    );
    lab.assert_no_drops();
    lab.stop();
}

/// (c) Expiry: the table is honoured over the hash while fresh, and ignored once older than
/// the profile's timeout (the client is hashed again and `expired` counts it).
#[test]
fn persistence_entry_expires() {
    const TIMEOUT_S: u64 = 2;
    let lab = Lab::new(1, 3, None, Some(TIMEOUT_S));
    let src = lab.topo.client_addrs[0];

    let x = lab.fetch(src);
    let entry = lab
        .ok(lab.pins.persist_get(lab.svc, src), "reading TETHER_PERSIST")
        .unwrap_or_else(|| {
            lab.fail(format!(
                "the first connection from {src} created no TETHER_PERSIST entry"
            ))
        });
    assert_eq!(
        lab.backend_name_of_id(entry.backend),
        x,
        "the new entry names the backend that answered"
    );

    // Point the client at another backend, freshly.
    let y = (0..lab.topo.backends.len())
        .map(|i| lab.topo.backend_name(i))
        .find(|n| *n != x)
        .expect("3 backends");
    let y_id = lab.backend_id_of_name(&y);
    lab.ok(
        lab.pins.persist_set(
            lab.svc,
            src,
            PersistValue {
                backend: y_id,
                backend_identity: 0,
                last_seen_ns: monotonic_coarse_ns(),
            },
        ),
        "writing TETHER_PERSIST",
    );
    let got = lab.fetch(src);
    assert_eq!(got, y, "a fresh entry wins over the hash ({x})");
    assert_eq!(lab.svc_counters().expired, 0);

    // No traffic for longer than the timeout (plus the 1 s refresh step and a margin).
    std::thread::sleep(Duration::from_millis(TIMEOUT_S * 1000 + 1500));
    let got = lab.fetch(src);
    assert_eq!(
        got, x,
        "after {TIMEOUT_S} s without traffic the entry has expired and the client is hashed to {x} again"
    );
    let c = lab.svc_counters();
    assert!(c.expired >= 1, "the expiry is counted: {c:?}");
    let entry = lab
        .ok(lab.pins.persist_get(lab.svc, src), "reading TETHER_PERSIST")
        .unwrap_or_else(|| lab.fail("the re-chosen client has no entry"));
    assert_eq!(
        lab.backend_name_of_id(entry.backend),
        x,
        "the entry was rewritten to the new choice"
    );
    lab.assert_no_drops();
    lab.stop();
}

/// The daemon leaves its maps pinned when it stops; a restarted daemon keeps honouring them.
#[test]
fn persistence_survives_restart() {
    let mut lab = Lab::new(1, 3, None, Some(1800));
    let src = lab.topo.client_addrs[0];
    let x = lab.fetch(src);
    let y = (0..3)
        .map(|i| lab.topo.backend_name(i))
        .find(|n| *n != x)
        .expect("3 backends");
    let y_id = lab.backend_id_of_name(&y);
    lab.ok(
        lab.pins.persist_set(
            lab.svc,
            src,
            PersistValue {
                backend: y_id,
                backend_identity: 0,
                last_seen_ns: monotonic_coarse_ns(),
            },
        ),
        "writing TETHER_PERSIST",
    );
    let svc_before = lab.svc;
    lab.daemon
        .take()
        .expect("running")
        .stop_keep_pins()
        .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
    // The program stays attached through its pinned link and keeps forwarding with the last
    // tables while no daemon runs.
    assert_eq!(
        lab.topo.lb_xdp_mode().unwrap().as_deref(),
        Some("xdpgeneric"),
        "XDP stays attached while the daemon is stopped"
    );
    assert_eq!(
        lab.fetch(src),
        y,
        "with the daemon stopped the client still reaches its backend"
    );
    assert!(
        lab.pins.path(lb_common::maps::MAP_PERSIST).exists(),
        "the persistence table stays pinned after stop"
    );
    lab.daemon = Some(
        Daemon::start_with_existing_pins(&lab.bin, &lab.topo.lb.ns, &lab.builder.build(), false)
            .unwrap_or_else(|e| panic!("restarting tether: {e:#}")),
    );
    let svc = lab.ok(
        lab.pins.service_index(VIP, PORT, PROTO_TCP),
        "finding the web service",
    );
    assert_eq!(
        svc, svc_before,
        "the service keeps its index across a restart"
    );
    assert_eq!(
        lab.backend_id_of_name(&y),
        y_id,
        "backend ids are stable across a restart"
    );
    let got = lab.fetch(src);
    assert_eq!(
        got, y,
        "after a restart the client still follows its (pinned) entry, not the hash ({x})"
    );
    lab.daemon
        .take()
        .unwrap()
        .stop()
        .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
}

/// A table of `persist_table_entries` 3 x 4096 is three shards. The clients' bindings, spread
/// over them, each moved off the hash's choice, are all honoured after every way the daemon
/// restarts: SIGTERM, SIGKILL (with a config asking another size: the pinned layout stays)
/// and `tether restart`.
#[test]
fn a_sharded_table_keeps_every_binding_across_restarts() {
    const CLIENTS: usize = 24;
    let mut lab = Lab(L4Lab::start(CLIENTS, 3, |b| {
        b.service("web", PORT, Some(1800))
            .persist_table_entries(3 * 4096)
    }));
    let clients = lab.topo.client_addrs.clone();
    let hashed = lab.fetch_all(&clients);
    let names = lab.backend_names();
    // Bind every client to the backend after the one the hash gave it.
    let want: BTreeMap<Ipv4Addr, String> = clients
        .iter()
        .zip(&hashed)
        .map(|(c, x)| {
            let i = names.iter().position(|n| n == x).expect("a known backend");
            (*c, names[(i + 1) % names.len()].clone())
        })
        .collect();
    for (c, b) in &want {
        let value = PersistValue {
            backend: lab.backend_id_of_name(b),
            backend_identity: 0,
            last_seen_ns: monotonic_coarse_ns(),
        };
        lab.ok(
            lab.pins.persist_set(lab.svc, *c, value),
            "writing a binding",
        );
    }
    let per_shard = lab.ok(lab.pins.persist4_per_shard(), "counting the shards");
    if per_shard.len() != 3 || per_shard.iter().filter(|&&n| n > 0).count() < 2 {
        lab.fail(format!(
            "bindings of {CLIENTS} clients in a 3 x 4096 table by shard: {per_shard:?}"
        ));
    }
    let check = |lab: &Lab, after: &str| {
        let got = lab.fetch_all(&clients);
        let lost: Vec<_> = clients
            .iter()
            .zip(&got)
            .filter(|(c, g)| want[*c] != **g)
            .collect();
        if !lost.is_empty() {
            lab.fail(format!(
                "after {after}, {} of {CLIENTS} clients lost their binding: {lost:?}",
                lost.len()
            ));
        }
        let now = lab.ok(lab.pins.persist4_per_shard(), "counting the shards");
        assert_eq!(
            now, per_shard,
            "after {after}: the same shards, the same bindings"
        );
    };
    check(&lab, "writing the bindings");

    lab.daemon
        .take()
        .expect("running")
        .stop_keep_pins()
        .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
    lab.daemon = Some(
        Daemon::start_with_existing_pins(&lab.bin, &lab.topo.lb.ns, &lab.builder.build(), false)
            .unwrap_or_else(|e| panic!("restarting tether: {e:#}")),
    );
    check(&lab, "SIGTERM and a new daemon");

    lab.daemon
        .take()
        .expect("running")
        .kill_keep_pins()
        .unwrap_or_else(|e| panic!("killing tether: {e:#}"));
    let bigger = lab.builder.clone().persist_table_entries(1 << 16).build();
    lab.daemon = Some(
        Daemon::start_with_existing_pins(&lab.bin, &lab.topo.lb.ns, &bigger, false)
            .unwrap_or_else(|e| panic!("restarting tether: {e:#}")),
    );
    check(
        &lab,
        "SIGKILL and a new daemon configured for 65536 entries",
    );
    if lab
        .d()
        .log_lines("keeps its layout of 3 shard(s)")
        .is_empty()
    {
        lab.fail("the new daemon does not say the pinned layout is kept");
    }

    let out = lab
        .daemon
        .as_mut()
        .expect("running")
        .restart()
        .unwrap_or_else(|e| panic!("tether restart: {e:#}"));
    eprintln!("{out}");
    check(&lab, "tether restart");
    lab.daemon
        .take()
        .unwrap()
        .stop()
        .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
}

/// Without a persistence profile each connection is hashed on its own: one client's
/// connections spread, and nothing is written to the table.
#[test]
fn no_persistence_hashes_each_flow() {
    let lab = Lab::new(1, 3, None, None);
    let src = lab.topo.client_addrs[0];
    const N: usize = 60;
    let got = lab.fetch_all(&vec![src; N]);
    let seen: BTreeSet<&String> = got.iter().collect();
    assert!(
        seen.len() >= 2,
        "{N} connections (random source ports) should not all hash to one backend: {seen:?}"
    );
    let entries = lab.ok(lab.pins.persist_entries(), "reading TETHER_PERSIST");
    assert!(
        entries.iter().all(|(k, _)| k.service != lab.svc),
        "no persistence entries: {entries:?}"
    );
    let c = lab.svc_counters();
    assert_eq!((c.new_assignments, c.persist_hits), (0, 0), "{c:?}");
    assert!(c.packets >= 3 * N as u64, "{c:?}");
    lab.assert_no_drops();
    lab.stop();
}

/// Explicit `native` on a veth whose peer cannot take XDP frames (it is in another namespace,
/// without an XDP program) would drop every forwarded frame: the daemon refuses to start and
/// says what to do, and attaches nothing.
#[test]
fn native_on_an_unready_veth_is_refused() {
    let topo = Topology::builder()
        .client_addrs(1)
        .backends(1)
        .build()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let bin = tether_tests::daemon::tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let cfg = ConfigBuilder::new(&topo, &topo.pin_dir("native"))
        .xdp_mode("native")
        .service("web", PORT, None)
        .build();
    let err = match Daemon::start(&bin, &topo.lb.ns, &cfg, false) {
        Ok(d) => panic!(
            "tether started in native mode on a veth without a ready peer:\n{}",
            d.logs()
        ),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("xdp_mode \"native\" on veth") && err.contains("\"generic\""),
        "the refusal names the field and the fix: {err}"
    );
    assert_eq!(
        topo.lb_xdp_mode().unwrap(),
        None,
        "nothing is attached after the refusal"
    );
}

/// Generic (skb) mode balances and persists the same way.
#[test]
fn generic_mode_spreads_and_sticks() {
    const CLIENTS: usize = 12;
    let lab = Lab::new(CLIENTS, 3, Some("generic"), Some(1800));
    lab.assert_xdp_mode("xdpgeneric");
    let plan: Vec<Ipv4Addr> = (0..3)
        .flat_map(|_| lab.topo.client_addrs.iter().copied())
        .collect();
    let got = lab.fetch_all(&plan);
    let clients = by_client(&plan, &got);
    assert!(
        clients.values().all(|b| b.len() == 1),
        "every client stays on one backend: {clients:?}"
    );
    let used: BTreeSet<&String> = clients.values().flat_map(|b| b.keys()).collect();
    assert!(
        used.len() >= 2,
        "{CLIENTS} clients spread over more than one backend: {clients:?}"
    );
    assert_eq!(lab.svc_counters().new_assignments, CLIENTS as u64);
    lab.assert_no_drops();
    lab.stop();
}
