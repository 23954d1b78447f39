//! End to end, operations: health checks and the down policies, draining, restarts under
//! traffic, config reloads (good and bad), the admin API and CLI, and `tether stop --detach`.
//! The real daemon runs in the LB namespace of a namespace topology (see `e2e_l4.rs`).
//!
//! Needs root and `TETHER_BIN` (the daemon binary): run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_ops -- --test-threads=1`.
//! Every test builds its own namespaces (unique names) and removes them, also on failure.
//! Every wait is bounded; failures panic with what was seen and the daemon's output.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::maps::{
    BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, PROTO_TCP, PROTO_UDP, PersistValue,
};
use serde_json::{Value, json};
use tether_tests::{
    daemon::{ConfigBuilder, Daemon, Reload, metric_value, tether_cli},
    http::{KeepAlive, UdpSinks, spawn_seq_sender},
    l4lab::{IO_TIMEOUT, L4Lab, PORT},
    netns::VIP,
    pinned::mapped_v4,
};

const UDP_PORT: u16 = 9000;
/// Connect timeout for connections that are expected to fail.
const FAIL_TIMEOUT: Duration = Duration::from_millis(600);
/// Health monitor timing used by the health tests.
const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;
const RISE: u64 = 2;
/// Allowance on top of fall/rise x interval for scheduling, the probe timeout and
/// reprogramming (the machine may be busy with other builds).
const HEALTH_MARGIN: Duration = Duration::from_millis(1500);
/// The admin API counts bound clients from a census cached for up to 5 s.
const CENSUS_WAIT: Duration = Duration::from_secs(15);

fn http_monitor() -> Value {
    json!({
        "type": "http",
        "port": PORT,
        "interval_ms": INTERVAL_MS,
        "timeout_ms": 100,
        "rise": RISE,
        "fall": FALL,
        "http_path": "/",
        "expect_status": ["2xx"],
    })
}

/// The shared L4 lab plus this file's operations helpers.
struct Ops(L4Lab);

impl std::ops::Deref for Ops {
    type Target = L4Lab;
    fn deref(&self) -> &L4Lab {
        &self.0
    }
}

impl std::ops::DerefMut for Ops {
    fn deref_mut(&mut self) -> &mut L4Lab {
        &mut self.0
    }
}

impl Ops {
    /// Service `web` (VIP:80/tcp, persistence 1800 s) plus whatever `configure` adds.
    fn new(
        clients: usize,
        backends: usize,
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Ops {
        Ops(L4Lab::start(clients, backends, |b| {
            configure(b.service("web", PORT, Some(1800)))
        }))
    }

    /// `state` of backend `name` in TETHER_BACKENDS.
    fn kernel_state(&self, name: &str) -> u32 {
        let addr = self.backend_addr(name);
        self.ok(self.pins.backends(), "reading TETHER_BACKENDS")
            .into_iter()
            .find(|(_, b)| mapped_v4(&b.addr_be) == Some(addr))
            .map(|(_, b)| b.state)
            .unwrap_or_else(|| self.fail(format!("backend {name} is not in TETHER_BACKENDS")))
    }

    /// The backend the persistence entry of `client` (service `svc`) names, if any.
    fn entry_backend_in(&self, svc: u32, client: Ipv4Addr) -> Option<String> {
        self.ok(self.pins.persist_get(svc, client), "reading TETHER_PERSIST")
            .map(|v| self.backend_name_of_id(v.backend))
    }

    fn entry_backend(&self, client: Ipv4Addr) -> Option<String> {
        self.entry_backend_in(self.svc, client)
    }

    /// Entries of the web service, per backend name.
    fn entries_per_backend(&self) -> BTreeMap<String, u64> {
        let mut m: BTreeMap<String, u64> =
            self.backend_names().into_iter().map(|n| (n, 0)).collect();
        for (k, v) in self.ok(self.pins.persist_entries(), "reading TETHER_PERSIST") {
            if k.service == self.svc {
                *m.entry(self.backend_name_of_id(v.backend)).or_default() += 1;
            }
        }
        m
    }

    fn status(&self) -> Value {
        self.ok(self.d().admin_json("/status"), "GET /status")
    }

    /// Backend `name` of service `service` in a `/status` answer.
    fn status_backend(&self, status: &Value, service: &str, name: &str) -> Value {
        status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == service))
            .and_then(|s| s["backends"].as_array())
            .and_then(|b| b.iter().find(|b| b["name"] == name))
            .cloned()
            .unwrap_or_else(|| {
                self.fail(format!(
                    "/status has no backend {name} in service {service}: {status:#}"
                ))
            })
    }

    /// Rewrites the config from `self.builder` and reloads; the reload must be applied.
    fn reload_ok(&self) -> String {
        let d = self.d();
        self.ok(d.write_config(&self.builder.build()), "writing the config");
        match self.ok(d.reload(), "reloading") {
            Reload::Applied(line) => line,
            Reload::Refused(line) => self.fail(format!("a valid reload was refused: {line}")),
        }
    }

    /// Writes `config` (text) and reloads; the reload must be refused, the daemon keep running.
    fn reload_refused(&mut self, config: &str, what: &str) -> String {
        let d = self.d();
        self.ok(d.write_config_text(config), "writing the config");
        let line = match self.ok(d.reload(), "reloading") {
            Reload::Refused(line) => line,
            Reload::Applied(line) => self.fail(format!("{what}: the reload was applied: {line}")),
        };
        std::thread::sleep(Duration::from_millis(100));
        if !self.daemon.as_mut().expect("running").is_running() {
            self.fail(format!("{what}: tether exited after a refused reload"));
        }
        line
    }

    fn stop(self) {
        self.0.stop()
    }
}

/// Clients per backend name.
fn spread(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// Client `src` bound to backend X (its first fetch); X's server stops; shared by the health
/// tests. Returns X after checking it went DOWN in time: in TETHER_BACKENDS, out of the
/// Maglev table, and in `/status`.
fn bind_and_take_down(ops: &mut Ops, src: Ipv4Addr) -> String {
    for name in ops.backend_names() {
        assert_eq!(
            ops.kernel_state(&name),
            BACKEND_UP,
            "backend {name} is up after the start-up probe round"
        );
    }
    let x = ops.fetch(src);
    assert_eq!(
        ops.entry_backend(src).as_deref(),
        Some(x.as_str()),
        "the first connection from {src} binds it to the backend that answered"
    );
    let x_id = ops.backend_id_of_name(&x);
    let r = ops.servers.stop_backend(&x);
    ops.ok(r, "stopping a backend server");
    let limit = Duration::from_millis(FALL * INTERVAL_MS) + HEALTH_MARGIN;
    let took = ops.wait_for(
        limit,
        &format!("backend {x} marked DOWN in TETHER_BACKENDS"),
        || ops.kernel_state(&x) == BACKEND_DOWN,
    );
    eprintln!("{x} marked down {took:?} after its server stopped (limit {limit:?})");
    // The backend's state is written before its service's new Maglev table is flipped in:
    // poll for the table too.
    ops.wait_for(
        Duration::from_secs(2),
        &format!("down backend {x} (id {x_id}) out of the live Maglev table"),
        || {
            !ops.ok(ops.pins.maglev_table(ops.svc), "reading TETHER_MAGLEV")
                .contains(&x_id)
        },
    );
    ops.wait_for(
        Duration::from_secs(2),
        "/status shows the backend down",
        || {
            let b = ops.status_backend(&ops.status(), "web", &x);
            b["state"] == "down" && b["health"]["up"] == false
        },
    );
    x
}

/// Brings X's server back and checks it is UP again in time, in the kernel and `/status`.
fn bring_back(ops: &mut Ops, x: &str) {
    let r = ops.servers.start_backend(x);
    ops.ok(r, "restarting a backend server");
    let limit = Duration::from_millis(RISE * INTERVAL_MS) + HEALTH_MARGIN;
    let took = ops.wait_for(
        limit,
        &format!("backend {x} UP again in TETHER_BACKENDS"),
        || ops.kernel_state(x) == BACKEND_UP,
    );
    eprintln!("{x} up again {took:?} after its server restarted (limit {limit:?})");
    let x_id = ops.backend_id_of_name(x);
    ops.wait_for(
        Duration::from_secs(2),
        &format!("recovered backend {x} (id {x_id}) back in the live Maglev table"),
        || {
            ops.ok(ops.pins.maglev_table(ops.svc), "reading TETHER_MAGLEV")
                .contains(&x_id)
        },
    );
    ops.wait_for(
        Duration::from_secs(2),
        "/status shows the backend up",
        || {
            let b = ops.status_backend(&ops.status(), "web", x);
            b["state"] == "up" && b["health"]["up"] == true
        },
    );
}

/// (1) HTTP health monitor, policy `immediate`: a client bound to a backend whose server
/// stops is moved to another backend (entry rewritten, `reassigned_down` counted) and stays
/// there when the first one recovers; new clients use all three again.
#[test]
fn health_down_immediate_moves_client_and_it_stays() {
    const NEW_CLIENTS: usize = 30;
    let mut ops = Ops::new(1 + NEW_CLIENTS, 3, |b| {
        b.health_monitor(http_monitor()).down_policy("immediate")
    });
    let a = ops.client(0);
    let x = bind_and_take_down(&mut ops, a);
    assert_eq!(ops.svc_counters().reassigned_down, 0);

    let y = ops.fetch(a);
    assert_ne!(y, x, "with {x} down, {a}'s next connection goes elsewhere");
    assert_eq!(
        ops.entry_backend(a).as_deref(),
        Some(y.as_str()),
        "{a}'s entry now names its new backend"
    );
    let c = ops.svc_counters();
    assert!(
        c.reassigned_down >= 1,
        "the move is counted in reassigned_down: {c:?}"
    );
    assert_eq!(ops.fetch(a), y, "{a} sticks to its new backend");
    // A reload (same config) keeps the health the monitors found: X stays down.
    ops.reload_ok();
    assert_eq!(
        ops.kernel_state(&x),
        BACKEND_DOWN,
        "after a reload, {x} (server still stopped) is still DOWN"
    );

    bring_back(&mut ops, &x);
    let again = ops.fetch_all(&[a; 5]);
    assert!(
        again.iter().all(|b| *b == y),
        "after {x} recovered, {a} stays on {y} (its entry is sticky): {again:?}"
    );
    assert_eq!(ops.entry_backend(a).as_deref(), Some(y.as_str()));

    let fresh: Vec<Ipv4Addr> = (1..=NEW_CLIENTS).map(|i| ops.client(i)).collect();
    let got = ops.fetch_all(&fresh);
    let per = spread(&got);
    eprintln!("new clients per backend after recovery: {per:?}");
    for name in ops.backend_names() {
        assert!(
            per.get(&name).copied().unwrap_or(0) > 0,
            "{NEW_CLIENTS} new clients after the recovery spread over all 3 backends, {name} got none: {per:?}"
        );
    }
    ops.assert_no_drops();
    ops.stop();
}

/// (2) Policy `never`: a client bound to a down backend stays bound to it (its connections
/// fail while the backend is down) and reaches it again once it recovers; nothing is
/// reassigned. New clients avoid the down backend.
#[test]
fn health_down_never_keeps_client_on_its_backend() {
    const NEW_CLIENTS: usize = 12;
    let mut ops = Ops::new(1 + NEW_CLIENTS, 3, |b| {
        b.health_monitor(http_monitor()).down_policy("never")
    });
    let a = ops.client(0);
    assert_eq!(
        ops.status()["services"][0]["persistence"]["policy"],
        "never",
        "/status shows the service's down policy"
    );
    let x = bind_and_take_down(&mut ops, a);

    for attempt in 0..2 {
        let r = ops.topo.fetch(a, PORT, FAIL_TIMEOUT);
        assert!(
            r.is_err(),
            "policy never: {a} is still sent to down {x}, whose server is stopped, so its connection (attempt {attempt}) must fail; got {r:?}"
        );
        assert_eq!(
            ops.entry_backend(a).as_deref(),
            Some(x.as_str()),
            "policy never: {a}'s entry still names {x} while it is down"
        );
    }
    let fresh: Vec<Ipv4Addr> = (1..=NEW_CLIENTS).map(|i| ops.client(i)).collect();
    let got = ops.fetch_all(&fresh);
    assert!(
        got.iter().all(|b| *b != x),
        "new clients never reach down {x}: {got:?}"
    );

    bring_back(&mut ops, &x);
    assert_eq!(ops.fetch(a), x, "after {x} recovered, {a} reaches it again");
    assert_eq!(ops.entry_backend(a).as_deref(), Some(x.as_str()));
    let c = ops.svc_counters();
    assert_eq!(
        c.reassigned_down, 0,
        "policy never reassigns nothing: {c:?}"
    );
    ops.assert_no_drops();
    ops.stop();
}

/// (3) Draining by admin state and by weight 0 (each applied by SIGHUP): clients bound to
/// the backend keep reaching it, new clients never do, and `/status` reports it draining
/// with a bound-client count equal to the live entries naming it.
#[test]
fn draining_keeps_bound_clients_and_takes_no_new_ones() {
    const BOUND: usize = 20;
    const NEW: usize = 30;
    let mut ops = Ops::new(BOUND + 2 * NEW, 3, |b| b);
    let first: Vec<Ipv4Addr> = (0..BOUND).map(|i| ops.client(i)).collect();
    let got = ops.fetch_all(&first);
    let per = spread(&got);
    // X: the backend with the most clients (at least 7 of 20 over 3).
    let x = per
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, _)| b.clone())
        .expect("some backend");
    let on_x: Vec<Ipv4Addr> = first
        .iter()
        .zip(&got)
        .filter(|(_, b)| **b == x)
        .map(|(c, _)| *c)
        .collect();
    eprintln!(
        "first clients per backend: {per:?}; draining {x} with {} bound clients",
        on_x.len()
    );
    let x_id = ops.backend_id_of_name(&x);

    for (phase, admin_state, weight, new_range) in [
        ("admin_state draining", "draining", 1, BOUND..BOUND + NEW),
        ("weight 0", "enabled", 0, BOUND + NEW..BOUND + 2 * NEW),
    ] {
        ops.builder = ops
            .builder
            .clone()
            .backend_field(&x, "admin_state", json!(admin_state))
            .backend_field(&x, "weight", json!(weight));
        let line = ops.reload_ok();
        eprintln!("{phase}: {line}");
        assert_eq!(
            ops.kernel_state(&x),
            BACKEND_DRAINING,
            "{phase}: {x} is DRAINING in TETHER_BACKENDS"
        );
        let table = ops.ok(ops.pins.maglev_table(ops.svc), "reading TETHER_MAGLEV");
        assert!(
            !table.contains(&x_id),
            "{phase}: draining {x} is out of the live Maglev table"
        );

        let plan: Vec<Ipv4Addr> = on_x.iter().chain(on_x.iter()).copied().collect();
        let bound = ops.fetch_all(&plan);
        assert!(
            bound.iter().all(|b| *b == x),
            "{phase}: clients bound to {x} keep reaching it: {:?}",
            plan.iter().zip(&bound).collect::<Vec<_>>()
        );
        let fresh: Vec<Ipv4Addr> = new_range.map(|i| ops.client(i)).collect();
        let got = ops.fetch_all(&fresh);
        let to_x: Vec<_> = fresh.iter().zip(&got).filter(|(_, b)| **b == x).collect();
        assert!(
            to_x.is_empty(),
            "{phase}: {} of {NEW} new clients reached draining {x}: {to_x:?}",
            to_x.len()
        );

        let live_on_x = ops.entries_per_backend()[&x];
        assert_eq!(
            live_on_x,
            on_x.len() as u64,
            "{phase}: the entries naming {x} are exactly its earlier clients"
        );
        let mut last = Value::Null;
        ops.wait_for(
            CENSUS_WAIT,
            &format!("{phase}: /status shows {x} draining with {live_on_x} bound clients"),
            || {
                last = ops.status_backend(&ops.status(), "web", &x);
                last["state"] == "draining"
                    && last["admin_state"] == admin_state
                    && last["weight"] == weight
                    && last["bound_clients"] == live_on_x
            },
        );
        eprintln!("{phase}: /status backend {x}: {last}");
    }
    let c = ops.svc_counters();
    assert_eq!(c.reassigned_down, 0, "draining moves nobody: {c:?}");
    ops.assert_no_drops();
    ops.stop();
}

/// (4) Restart under a steady stream: UDP datagrams (sequence-numbered, 2000/s) from one client
/// to a persistent UDP service, and one keep-alive TCP connection, while the daemon is
/// stopped (SIGTERM) and started again. Every datagram arrives, all at one backend, the
/// client's entry is unchanged, and the TCP connection keeps exchanging data.
#[test]
fn restart_under_steady_stream_loses_nothing() {
    const RATE: u32 = 2000;
    const MAX_DATAGRAMS: u64 = 40_000;
    let mut ops = Ops::new(2, 3, |b| {
        b.udp_service("stream", UDP_PORT, Some(1800))
            .health_monitor(json!({
                "type": "tcp", "port": PORT, "interval_ms": INTERVAL_MS, "timeout_ms": 100,
                "rise": RISE, "fall": FALL,
            }))
    });
    let sinks = ops.ok(UdpSinks::start(&ops.topo, UDP_PORT), "starting UDP sinks");
    let udp_svc = ops.ok(
        ops.pins.service_index(VIP, UDP_PORT, PROTO_UDP),
        "finding the UDP service",
    );
    let (u, t) = (ops.client(0), ops.client(1));

    // The long-lived TCP connection (from the other client address).
    let tcp_backend = ops.fetch(t);
    let conn = ops.ok(
        ops.topo.connect_vip(t, PORT, IO_TIMEOUT),
        "opening the keep-alive connection",
    );
    let mut ka = KeepAlive::new(conn, IO_TIMEOUT);
    assert_eq!(
        ops.ok(ka.get(), "first request on the keep-alive connection"),
        tcp_backend
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sender = ops.ok(
        spawn_seq_sender(
            &ops.topo.client.ns,
            u,
            ops.topo.vip_addr(UDP_PORT),
            RATE,
            MAX_DATAGRAMS,
            stop.clone(),
        ),
        "starting the UDP sender",
    );
    // Requests on the keep-alive connection every 20 ms until told to stop (bounded).
    let ka_stop = stop.clone();
    let exchanger = std::thread::spawn(move || {
        let mut log: Vec<(Instant, Result<String, String>)> = Vec::new();
        for _ in 0..2000 {
            if ka_stop.load(Ordering::Relaxed) {
                break;
            }
            log.push((Instant::now(), ka.get().map_err(|e| e.to_string())));
            std::thread::sleep(Duration::from_millis(20));
        }
        log
    });

    std::thread::sleep(Duration::from_millis(1000));
    let before: PersistValue = ops
        .ok(ops.pins.persist_get(udp_svc, u), "reading TETHER_PERSIST")
        .unwrap_or_else(|| {
            ops.fail(format!(
                "no UDP persistence entry for {u} after 1 s of stream"
            ))
        });
    let svc_before = ops.svc;

    let prog_before = ops.ok(ops.topo.lb_xdp_prog_id(), "ip link show");
    let t_stop = Instant::now();
    let old = ops.daemon.take().expect("running");
    ops.ok(old.stop_keep_pins(), "stopping tether (SIGTERM)");
    let stopped_for = Instant::now();
    let xdp_while_stopped = ops.ok(ops.topo.lb_xdp_mode(), "ip link show");
    let prog_while_stopped = ops.ok(ops.topo.lb_xdp_prog_id(), "ip link show");
    std::thread::sleep(Duration::from_millis(300));
    let config = ops.builder.build();
    ops.daemon = Some(ops.ok(
        Daemon::start_with_existing_pins(&ops.bin, &ops.topo.lb.ns, &config, false),
        "restarting tether",
    ));
    let ready = Instant::now();
    eprintln!(
        "restart: SIGTERM to exit {:?}, daemon down for {:?}, back ready {:?} after the SIGTERM",
        stopped_for - t_stop,
        ready - stopped_for,
        ready - t_stop
    );
    let prog_after = ops.ok(ops.topo.lb_xdp_prog_id(), "ip link show");
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);
    let sent = match sender.join() {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => ops.fail(format!("the UDP sender failed: {e}")),
        Err(_) => ops.fail("the UDP sender panicked"),
    };
    let exchanges = exchanger
        .join()
        .unwrap_or_else(|_| ops.fail("the keep-alive thread panicked"));
    assert!(
        sent < MAX_DATAGRAMS,
        "the stream ran until after the restart, not to its cap"
    );
    assert_eq!(
        xdp_while_stopped.as_deref(),
        Some("xdpgeneric"),
        "XDP stays attached while the daemon is stopped"
    );
    assert!(
        prog_before.is_some() && prog_while_stopped == prog_before,
        "the old program keeps running while no daemon does: {prog_before:?} then {prog_while_stopped:?}"
    );
    assert!(
        prog_after.is_some() && prog_after != prog_before,
        "the restarted daemon's program replaced the old one on the link: {prog_before:?} then {prog_after:?}"
    );

    // Every datagram arrived, at one backend, none twice.
    let _ = ops.wait_for(Duration::from_secs(3), "all datagrams at the sinks", || {
        sinks.total() as u64 >= sent
    });
    let received = sinks.received();
    let at: Vec<(&String, usize)> = received
        .iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(n, s)| (n, s.len()))
        .collect();
    if at.len() != 1 {
        ops.fail(format!(
            "the stream from {u} reached {} backends (datagrams per backend {at:?}); it must stay on one",
            at.len()
        ));
    }
    let (udp_backend, seqs) = received
        .iter()
        .find(|(_, s)| !s.is_empty())
        .expect("one backend");
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    let missing: Vec<u64> = (0..sent)
        .filter(|s| !distinct.contains(s))
        .take(20)
        .collect();
    if seqs.len() as u64 != sent || distinct.len() as u64 != sent || !missing.is_empty() {
        ops.fail(format!(
            "sent {sent} datagrams (0..{sent}), {udp_backend} received {} ({} distinct); first missing: {missing:?}",
            seqs.len(),
            distinct.len()
        ));
    }
    eprintln!("{sent} datagrams, all received by {udp_backend}, none missing or doubled");

    let after = ops
        .ok(ops.pins.persist_get(udp_svc, u), "reading TETHER_PERSIST")
        .unwrap_or_else(|| ops.fail(format!("the UDP entry of {u} is gone after the restart")));
    assert_eq!(
        after.backend, before.backend,
        "the UDP entry of {u} names the same backend after the restart"
    );
    assert_eq!(
        &ops.backend_name_of_id(after.backend),
        udp_backend,
        "the entry names the backend that received the stream"
    );
    assert_eq!(
        ops.ok(ops.pins.service_index(VIP, PORT, PROTO_TCP), "finding web"),
        svc_before,
        "the service keeps its index"
    );

    // The keep-alive connection kept working across the restart.
    let failures: Vec<_> = exchanges.iter().filter(|(_, r)| r.is_err()).collect();
    if !failures.is_empty() {
        ops.fail(format!(
            "{} of {} requests on the keep-alive connection failed across the restart; first: {:?}",
            failures.len(),
            exchanges.len(),
            failures[0].1
        ));
    }
    let during = exchanges
        .iter()
        .filter(|(at, _)| *at >= stopped_for && *at <= ready)
        .count();
    let after_ready = exchanges.iter().filter(|(at, _)| *at > ready).count();
    assert!(
        after_ready >= 5,
        "the keep-alive connection exchanged data after the restart ({after_ready} requests)"
    );
    let wrong: Vec<_> = exchanges
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|b| **b != tcp_backend)
        .collect();
    assert!(
        wrong.is_empty(),
        "the keep-alive connection stayed on {tcp_backend}: {wrong:?}"
    );
    eprintln!(
        "keep-alive connection: {} requests, {during} while no daemon ran, {after_ready} after the restart",
        exchanges.len()
    );

    // The restarted daemon took over the known backends' health: nobody flapped.
    let logs = ops.logs();
    assert!(
        logs.contains("from an earlier run"),
        "the restarted daemon found the earlier run's state:\n{logs}"
    );
    for name in ops.backend_names() {
        assert_eq!(
            ops.kernel_state(&name),
            BACKEND_UP,
            "{name} is up after the restart"
        );
    }
    assert!(
        !logs.contains("is down"),
        "no backend was marked down across the restart:\n{logs}"
    );
    assert!(
        sinks.other().iter().all(|(_, n)| *n == 0),
        "only sequence datagrams reached the sinks: {:?}",
        sinks.other()
    );
    ops.assert_no_drops();
    drop(sinks);
    ops.stop();
}

/// (5) A bad config on SIGHUP is refused with a message naming the field; the daemon keeps
/// running and nothing changes (maps, generation, clients' backends). A valid reload that
/// adds a backend is applied, and existing clients keep their backends.
#[test]
fn bad_reload_is_refused_and_changes_nothing() {
    const CLIENTS: usize = 20;
    let mut ops = Ops::new(2 * CLIENTS, 4, |b| b.without_backend("b4"));
    let first: Vec<Ipv4Addr> = (0..CLIENTS).map(|i| ops.client(i)).collect();
    let got = ops.fetch_all(&first);
    let bound: BTreeMap<Ipv4Addr, String> = first.iter().copied().zip(got.clone()).collect();
    assert!(
        got.iter().all(|b| b != "b4"),
        "b4 is not configured yet: {got:?}"
    );

    let services = ops.ok(ops.pins.services(), "reading TETHER_SERVICES");
    let backends = ops.ok(ops.pins.backends(), "reading TETHER_BACKENDS");
    let maglev = ops.ok(ops.pins.maglev_table(ops.svc), "reading TETHER_MAGLEV");
    let generation = ops.status()["generation"].clone();
    let ids_before: BTreeMap<String, u32> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| (n.to_string(), ops.backend_id_of_name(n)))
        .collect();

    let good = ops.builder.build();
    let mut unknown = good.clone();
    unknown["pools"][0]["backends"][0]["colour"] = json!("blue");
    let mut port0 = good.clone();
    port0["virtual_services"][0]["port"] = json!(0);
    let mut bad_policy = good.clone();
    bad_policy["persistence_profiles"][0]["select_new_server_when_down"] = json!("sometimes");
    // Valid on its own, but not applicable without a restart.
    let mut admin_moved = good.clone();
    admin_moved["admin_listen"] = json!("127.0.0.1:9181");
    let cases = [
        (
            "an unknown field",
            unknown.to_string(),
            vec!["colour", "pools[0].backends[0]"],
        ),
        (
            "port 0",
            port0.to_string(),
            vec!["virtual_services[0].port"],
        ),
        (
            "a bad down policy",
            bad_policy.to_string(),
            vec![
                "persistence_profiles[0].select_new_server_when_down",
                "sometimes",
            ],
        ),
        ("broken JSON", "{\"interface\": ".to_string(), vec![]),
        (
            "a new admin_listen",
            admin_moved.to_string(),
            vec!["admin_listen", "restart"],
        ),
    ];
    for (what, text, names) in cases {
        let line = ops.reload_refused(&text, what);
        eprintln!("{what}: {line}");
        for n in names {
            assert!(line.contains(n), "{what}: the refusal names {n:?}: {line}");
        }
        assert_eq!(
            ops.ok(ops.pins.services(), "reading TETHER_SERVICES"),
            services,
            "{what}: TETHER_SERVICES unchanged"
        );
        assert_eq!(
            ops.ok(ops.pins.backends(), "reading TETHER_BACKENDS"),
            backends,
            "{what}: TETHER_BACKENDS unchanged"
        );
        assert!(
            ops.ok(ops.pins.maglev_table(ops.svc), "reading TETHER_MAGLEV") == maglev,
            "{what}: the live Maglev table is unchanged"
        );
        assert_eq!(
            ops.status()["generation"],
            generation,
            "{what}: the published generation is unchanged"
        );
    }
    let again = ops.fetch_all(&first);
    for (c, b) in first.iter().zip(&again) {
        assert_eq!(
            b, &bound[c],
            "after the refused reloads {c} still reaches its backend"
        );
    }

    // A valid reload adding b4.
    ops.builder = ConfigBuilder::new(&ops.topo, ops.d().pin_dir()).service("web", PORT, Some(1800));
    let line = ops.reload_ok();
    eprintln!("adding b4: {line}");
    assert_eq!(
        ops.ok(ops.pins.service_index(VIP, PORT, PROTO_TCP), "finding web"),
        ops.svc,
        "the service keeps its index"
    );
    for (n, id) in &ids_before {
        assert_eq!(ops.backend_id_of_name(n), *id, "{n} keeps its backend id");
    }
    assert_eq!(
        ops.kernel_state("b4"),
        BACKEND_UP,
        "b4 is configured and up"
    );
    let b4_id = ops.backend_id_of_name("b4");
    assert!(
        ops.ok(ops.pins.maglev_table(ops.svc), "reading TETHER_MAGLEV")
            .contains(&b4_id),
        "b4 is in the live Maglev table"
    );
    let again = ops.fetch_all(&first);
    for (c, b) in first.iter().zip(&again) {
        assert_eq!(b, &bound[c], "after adding b4, {c} keeps its backend");
        assert_eq!(ops.entry_backend(*c).as_deref(), Some(b.as_str()));
    }
    let fresh: Vec<Ipv4Addr> = (CLIENTS..2 * CLIENTS).map(|i| ops.client(i)).collect();
    let per = spread(&ops.fetch_all(&fresh));
    eprintln!("new clients per backend after adding b4: {per:?}");
    assert!(
        per.get("b4").copied().unwrap_or(0) > 0,
        "some of {CLIENTS} new clients reach the added b4: {per:?}"
    );
    let st = ops.status();
    assert_eq!(ops.status_backend(&st, "web", "b4")["state"], "up");
    ops.assert_no_drops();
    ops.stop();
}

/// Parses the backend rows of one service in `tether status` output:
/// name -> (state, weight, bound).
fn parse_status_rows(out: &str, service: &str) -> BTreeMap<String, (String, String, String)> {
    let mut rows = BTreeMap::new();
    let mut in_service = false;
    for line in out.lines() {
        if line.starts_with("service ") {
            in_service = line.split_whitespace().nth(1) == Some(service);
            continue;
        }
        if !in_service || !line.starts_with("  ") {
            continue;
        }
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() >= 5 && t[1].parse::<Ipv4Addr>().is_ok() {
            rows.insert(
                t[0].to_string(),
                (t[2].to_string(), t[3].to_string(), t[4].to_string()),
            );
        }
    }
    rows
}

/// (6) Inspection: `tether status` (over TCP with the token) lists every backend with its
/// state and a bound-client count equal to TETHER_PERSIST's; `tether persist list/flush
/// --client` (over the daemon's Unix socket, the CLI's default) show and remove one entry;
/// TCP without the token is refused; `/metrics` agrees with the kernel counters.
#[test]
fn status_persist_and_metrics_agree_with_the_maps() {
    const CLIENTS: usize = 10;
    let ops = Ops::new(CLIENTS, 3, |b| b);
    let d = ops.d();
    let admin = d.admin_addr().to_string();
    let token = d.admin_token_file().to_string_lossy().into_owned();
    let cfg = d.config_path().display().to_string();
    let plan: Vec<Ipv4Addr> = (0..CLIENTS).map(|i| ops.client(i)).collect();
    let got = ops.fetch_all(&plan);

    // tether status
    let want = ops.entries_per_backend();
    assert_eq!(want.values().sum::<u64>(), CLIENTS as u64);
    let mut out = String::new();
    let mut rows = BTreeMap::new();
    ops.wait_for(
        CENSUS_WAIT,
        "`tether status` bound counts match TETHER_PERSIST",
        || {
            out = ops.ok(
                d.cli(&["status", "--admin", &admin, "--token-file", &token]),
                "tether status",
            );
            rows = parse_status_rows(&out, "web");
            ops.backend_names().iter().all(|n| {
                rows.get(n)
                    .is_some_and(|(_, _, bound)| *bound == want[n].to_string())
            })
        },
    );
    eprintln!("tether status:\n{out}");
    for n in ops.backend_names() {
        let (state, weight, _) = &rows[&n];
        assert_eq!(state, "up", "{n}'s state in `tether status`:\n{out}");
        assert_eq!(weight, "1", "{n}'s weight in `tether status`:\n{out}");
    }
    assert!(
        out.contains("persistence sticky-web"),
        "the service's persistence profile is shown:\n{out}"
    );

    // tether persist list --client A
    let a = plan[0];
    let a_backend = got[0].clone();
    let a_s = a.to_string();
    let list = ops.ok(
        d.cli(&["persist", "list", "--client", &a_s, "--config", &cfg]),
        "tether persist list --client",
    );
    let a_addr = ops.backend_addr(&a_backend);
    assert!(
        list.contains(&format!("{a}/32"))
            && list.contains(&format!("{a_backend} ({a_addr})"))
            && list.contains("web")
            && list.contains("1 entry"),
        "`tether persist list --client {a}` shows its one entry, bound to {a_backend}:\n{list}"
    );
    let all = ops.ok(
        d.cli(&["persist", "list", "--config", &cfg]),
        "tether persist list",
    );
    assert!(
        all.contains(&format!("{CLIENTS} entries")),
        "`tether persist list` shows all {CLIENTS} entries:\n{all}"
    );

    // Without the token, TCP reveals no client and flushes nothing.
    for (m, p) in [("GET", "/persist"), ("POST", "/persist/flush")] {
        let r = ops.ok(
            tether_tests::daemon::admin_request(d.ns(), d.admin_addr(), m, p),
            "admin request without a token",
        );
        assert_eq!(r.status, 401, "{m} {p} without a token: {}", r.body);
    }
    let again = ops.ok(
        d.cli(&["persist", "list", "--config", &cfg]),
        "tether persist list",
    );
    assert!(
        again.contains(&format!("{CLIENTS} entries")),
        "the flush without a token removed nothing:\n{again}"
    );
    let sock = std::path::Path::new("/run/tether").join(format!(
        "{}.sock",
        d.pin_dir()
            .file_name()
            .expect("pin dir name")
            .to_string_lossy()
    ));
    for (f, what) in [
        (sock.as_path(), "admin socket"),
        (d.admin_token_file(), "admin token"),
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(f)
                .unwrap_or_else(|e| ops.fail(format!("{what} {}: {e}", f.display())))
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{what} {} mode", f.display());
    }

    // tether persist flush --client A
    let new_before = ops.svc_counters().new_assignments;
    let flushed = ops.ok(
        d.cli(&["persist", "flush", "--client", &a_s, "--config", &cfg]),
        "tether persist flush --client",
    );
    assert!(
        flushed.contains("flushed 1 persistence entry"),
        "flush --client {a} removes one entry: {flushed}"
    );
    assert_eq!(
        ops.ok(ops.pins.persist_get(ops.svc, a), "reading TETHER_PERSIST"),
        None,
        "{a}'s entry is gone from TETHER_PERSIST"
    );
    let list = ops.ok(
        d.cli(&["persist", "list", "--client", &a_s, "--config", &cfg]),
        "tether persist list --client",
    );
    assert!(
        list.contains("0 entries"),
        "no entry listed for {a}:\n{list}"
    );
    let b = ops.fetch(a);
    assert_eq!(
        ops.entry_backend(a).as_deref(),
        Some(b.as_str()),
        "the next connection from {a} makes a new entry"
    );
    assert_eq!(
        ops.svc_counters().new_assignments,
        new_before + 1,
        "and counts a new assignment"
    );

    // tether persist flush --backend B: every entry naming B goes, and /status counts it at
    // once (a flush invalidates the cached census).
    let per = ops.entries_per_backend();
    let (victim, n) = per
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, n)| (b.clone(), *n))
        .expect("some backend");
    assert!(n > 0, "some backend has clients: {per:?}");
    let flushed = ops.ok(
        d.cli(&[
            "persist",
            "flush",
            "--service",
            "web",
            "--backend",
            &victim,
            "--config",
            &cfg,
        ]),
        "tether persist flush --backend",
    );
    let plural = if n == 1 { "entry" } else { "entries" };
    assert!(
        flushed.contains(&format!("flushed {n} persistence {plural}")),
        "flush --backend {victim} removes its {n} entries: {flushed}"
    );
    let per_after = ops.entries_per_backend();
    assert_eq!(per_after[&victim], 0, "no entry names {victim} any more");
    for (b, k) in &per {
        if *b != victim {
            assert_eq!(per_after[b], *k, "the entries of {b} are untouched");
        }
    }
    let st = ops.status();
    assert_eq!(
        ops.status_backend(&st, "web", &victim)["bound_clients"],
        0,
        "right after the flush /status counts no client bound to {victim}"
    );

    // /metrics
    let before = ops.svc_counters();
    let metrics = ops.ok(d.metrics(), "GET /metrics");
    let after = ops.svc_counters();
    let packets = metric_value(
        &metrics,
        "tether_service_packets_total",
        &[("service", "web")],
    )
    .unwrap_or_else(|| {
        ops.fail(format!(
            "/metrics has no tether_service_packets_total{{service=\"web\"}}:\n{metrics}"
        ))
    }) as u64;
    assert!(
        packets > 0 && before.packets <= packets && packets <= after.packets,
        "tether_service_packets_total{{service=\"web\"}} = {packets}, TETHER_SVC_STAT packets {} .. {}",
        before.packets,
        after.packets
    );
    if before.packets == after.packets {
        assert_eq!(
            packets, before.packets,
            "no traffic meanwhile: the values are equal"
        );
    }
    let new = metric_value(
        &metrics,
        "tether_service_new_assignments_total",
        &[("service", "web")],
    );
    assert_eq!(
        new,
        Some(after.new_assignments as f64),
        "new assignments in /metrics"
    );
    for n in ops.backend_names() {
        let up = metric_value(
            &metrics,
            "tether_backend_up",
            &[("pool", "web"), ("backend", &n)],
        );
        assert_eq!(
            up,
            Some(1.0),
            "tether_backend_up for {n} in /metrics:\n{metrics}"
        );
        let id = ops.backend_id_of_name(&n);
        let kernel = ops
            .ok(ops.pins.backend_counters(id), "reading TETHER_BE_STAT")
            .packets;
        let m = metric_value(&metrics, "tether_backend_packets_total", &[("backend", &n)]);
        assert_eq!(
            m,
            Some(kernel as f64),
            "tether_backend_packets_total for {n} equals TETHER_BE_STAT"
        );
    }
    ops.stop();
}

/// (7) `tether stop --detach` stops the daemon, detaches XDP from the LB's interface and
/// removes the pin directory; the VIP no longer reaches a backend.
#[test]
fn stop_detach_removes_xdp_and_pins() {
    let mut ops = Ops::new(1, 2, |b| b);
    let a = ops.client(0);
    ops.fetch(a);
    assert_eq!(
        ops.ok(ops.topo.lb_xdp_mode(), "ip link show").as_deref(),
        Some("xdpgeneric"),
        "XDP is attached (generic: the default on a veth)"
    );
    let pin_dir = ops.d().pin_dir().to_path_buf();
    let link = pin_dir.join(format!("link_{}", ops.topo.lb.ifname));
    assert!(
        link.exists(),
        "the XDP link is pinned at {}",
        link.display()
    );

    // `tether stop` waits for the daemon's pid to disappear: reap it meanwhile.
    let (bin, ns, dir) = (
        ops.bin.clone(),
        ops.topo.lb.ns.clone(),
        pin_dir.to_string_lossy().into_owned(),
    );
    let cli =
        std::thread::spawn(move || tether_cli(&bin, &ns, &["stop", "--detach", "--pin-dir", &dir]));
    let status = {
        let d = ops.daemon.as_mut().expect("running");
        d.wait_exit(Duration::from_secs(20))
    };
    let status = ops.ok(status, "waiting for tether to exit after `tether stop`");
    let out = cli
        .join()
        .unwrap_or_else(|_| ops.fail("the `tether stop` thread panicked"));
    let out = ops.ok(out, "tether stop --detach");
    eprintln!("tether stop --detach:\n{out}");
    assert!(status.success(), "tether exited with {status}");
    assert!(
        ops.logs().contains("tether stopped"),
        "tether logged its stop:\n{}",
        ops.logs()
    );
    assert!(
        out.contains("stopped tether") && out.contains("detached"),
        "`tether stop --detach` says what it did:\n{out}"
    );
    assert_eq!(
        ops.ok(ops.topo.lb_xdp_mode(), "ip link show"),
        None,
        "no XDP program on {} after stop --detach",
        ops.topo.lb.ifname
    );
    assert!(
        !pin_dir.exists(),
        "{} is removed by stop --detach",
        pin_dir.display()
    );
    let r = ops.topo.fetch(a, PORT, FAIL_TIMEOUT);
    assert!(
        r.is_err(),
        "without XDP the VIP is the LB's own address again, no backend answers: {r:?}"
    );
}

/// (7b) `tether stop --detach` after the daemon already stopped (SIGTERM, XDP left attached
/// through its pinned link): detaches and removes the pins.
#[test]
fn stop_detach_after_sigterm() {
    let mut ops = Ops::new(1, 2, |b| b);
    let a = ops.client(0);
    let x = ops.fetch(a);
    let pin_dir = ops.d().pin_dir().to_path_buf();
    let d = ops.daemon.take().expect("running");
    ops.ok(d.stop_keep_pins(), "stopping tether (SIGTERM)");
    assert_eq!(
        ops.ok(ops.topo.lb_xdp_mode(), "ip link show").as_deref(),
        Some("xdpgeneric"),
        "XDP stays attached after SIGTERM"
    );
    assert_eq!(ops.fetch(a), x, "and keeps forwarding");
    let out = ops.ok(
        tether_cli(
            &ops.bin,
            &ops.topo.lb.ns,
            &["stop", "--detach", "--pin-dir", &pin_dir.to_string_lossy()],
        ),
        "tether stop --detach",
    );
    assert!(
        out.contains("no running tether") && out.contains("detached"),
        "`tether stop --detach` without a daemon says what it did:\n{out}"
    );
    assert_eq!(
        ops.ok(ops.topo.lb_xdp_mode(), "ip link show"),
        None,
        "no XDP program on {} after stop --detach",
        ops.topo.lb.ifname
    );
    assert!(!pin_dir.exists(), "{} is removed", pin_dir.display());
    let r = ops.topo.fetch(a, PORT, FAIL_TIMEOUT);
    assert!(r.is_err(), "the VIP no longer reaches a backend: {r:?}");
}

/// (8) A restart keeps a down backend down (its state is taken from the pinned maps, not
/// assumed healthy): no new client reaches it, and it comes back through the monitor.
#[test]
fn restart_keeps_down_backend_down() {
    const NEW_CLIENTS: usize = 20;
    let mut ops = Ops::new(1 + NEW_CLIENTS, 3, |b| b.health_monitor(http_monitor()));
    let a = ops.client(0);
    let x = bind_and_take_down(&mut ops, a);
    let y = ops.fetch(a);
    assert_ne!(y, x);

    let d = ops.daemon.take().expect("running");
    ops.ok(d.stop_keep_pins(), "stopping tether (SIGTERM)");
    let config = ops.builder.build();
    ops.daemon = Some(ops.ok(
        Daemon::start_with_existing_pins(&ops.bin, &ops.topo.lb.ns, &config, false),
        "restarting tether",
    ));
    let x_id = ops.backend_id_of_name(&x);
    // Watch for a while (longer than rise x interval): X must never be UP or in the table.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(RISE * INTERVAL_MS * 3) {
        let st = ops.kernel_state(&x);
        assert_eq!(
            st,
            BACKEND_DOWN,
            "{x} (server still stopped) is DOWN after the restart, state {st} after {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !ops.ok(ops.pins.maglev_table(ops.svc), "reading TETHER_MAGLEV")
            .contains(&x_id),
        "{x} is not in the live Maglev table after the restart"
    );
    let b = ops.status_backend(&ops.status(), "web", &x);
    assert_eq!(b["state"], "down", "/status after the restart: {b}");
    let fresh: Vec<Ipv4Addr> = (1..=NEW_CLIENTS).map(|i| ops.client(i)).collect();
    let got = ops.fetch_all(&fresh);
    assert!(
        got.iter().all(|b| *b != x),
        "no new client reaches down {x} after the restart: {got:?}"
    );
    assert_eq!(ops.fetch(a), y, "{a} stays on {y}");
    bring_back(&mut ops, &x);
    ops.assert_no_drops();
    ops.stop();
}
