//! Mirroring through a Redis deployment built for availability: two tether instances find
//! the master through Redis Sentinel (`mirroring.sentinel`), a binding made on one reaches
//! the other, and when the master dies and the sentinel promotes its replica both
//! instances move to the new master, lose no binding they hold, and keep mirroring.

use std::{net::Ipv4Addr, time::Duration};

use serde_json::json;
use tether_tests::{
    daemon::ConfigBuilder,
    l7lab::PORT,
    multilab::{Fleet, instance_name},
    netns::wait_until,
    redisha::{MASTER_NAME, MASTER_PORT, REPLICA_PORT, SENTINEL_PORT, SentinelSet},
};

/// L4 DSR source IP on [`PORT`] (the XDP table) and L7 client IP on `PORT + 1`.
fn services(b: ConfigBuilder) -> ConfigBuilder {
    b.service("l4", PORT, Some(600))
        .profile(json!({"name": "cip", "type": "client-ip", "timeout_s": 600}))
        .l7_service("cip", PORT + 1, Some("cip"), json!({}))
}

/// (L4 backend, L7 backend) of client `src` through instance `i`.
fn via(f: &Fleet, i: usize, src: Ipv4Addr) -> (String, String) {
    (
        f.backend_via(i, src, PORT, "/", &[]),
        f.backend_via(i, src, PORT + 1, "/", &[]),
    )
}

/// Instance `i`'s XDP table holds client `src` on `backend` (`tether persist list`): it
/// learnt the binding from the other instance, not from the client.
fn xdp_holds(f: &Fleet, i: usize, src: Ipv4Addr, backend: &str, when: &str) {
    let c = src.to_string();
    let cfg = f.d(i).config_path().to_string_lossy().into_owned();
    let listed = f
        .d(i)
        .cli(&["persist", "list", "--client", &c, "--config", &cfg])
        .unwrap_or_else(|e| f.fail(format!("tether persist list on {i}: {e:#}")));
    let line = listed
        .lines()
        .find(|l| l.contains(&format!("{c}/32")) && l.contains("l4"));
    if !line.is_some_and(|l| l.contains(&format!("{backend} "))) {
        f.fail(format!(
            "{when}: instance {i}'s XDP table should hold {c} on {backend}:\n{listed}"
        ));
    }
}

fn wait_metric(f: &Fleet, i: usize, name: &str, at_least: f64, what: &str) {
    if !wait_until(Duration::from_secs(30), || {
        f.metric(i, name, &[]) >= at_least
    }) {
        f.fail(format!(
            "{what}: instance {i}'s {name} stayed below {at_least} ({})",
            f.metric(i, name, &[])
        ));
    }
}

/// Every binding key (`tether:b:*`) a server holds.
fn binding_keys(server: &tether_tests::redisha::RedisProc) -> Vec<String> {
    let out = server
        .cli(&["--scan", "--pattern", "tether:b:*"])
        .unwrap_or_else(|e| panic!("redis-cli --scan on port {}: {e:#}", server.port));
    let mut keys: Vec<String> = out.lines().map(str::to_string).collect();
    keys.sort();
    keys
}

/// A master, a replica and a sentinel; instances A and B configured with two sentinels,
/// the first one down, and the master's name only. Bindings made on A reach B; the replica is then made to lag (its copies deleted,
/// as if replication had not caught up) and the master is killed. The sentinel promotes
/// the replica; A and B reconnect to it and write every binding they hold again, so the
/// new master holds them all; a new B started from nothing learns them from it; and a
/// binding made on B after the failover reaches A.
#[test]
fn sentinel_failover_keeps_mirroring() {
    let mut f = Fleet::new(8, 3, 2, false, |_, b| services(b));
    let mut ha = SentinelSet::start(&f.topo.lb.ns, &f.topo.ns_prefix)
        .unwrap_or_else(|e| panic!("starting master, replica and sentinel: {e:#}"));
    // The first sentinel listed is down (nothing listens there): the next one answers.
    let down = format!(
        "redis://{}:{}",
        tether_tests::netns::LB_ADDR,
        SENTINEL_PORT - 1
    );
    for i in 0..2 {
        let b = f.builders[i].clone().top_field(
            "mirroring",
            json!({"sentinel": {"nodes": [down, ha.sentinel_url()], "master": MASTER_NAME},
                   "instance": instance_name(i)}),
        );
        f.builders[i] = b;
    }
    f.start(0);
    f.start(1);
    let clients = f.topo.client_addrs.clone();

    // Before the failover: A's bindings reach B through the master.
    let mut bound = Vec::new();
    for &src in &clients[..4] {
        bound.push(via(&f, 0, src));
    }
    wait_metric(
        &f,
        1,
        "tether_mirror_applied_total",
        8.0,
        "A's bindings applied on B",
    );
    for (n, &src) in clients[..4].iter().enumerate() {
        xdp_holds(&f, 1, src, &bound[n].0, "before the failover");
        let got = via(&f, 1, src);
        if got != bound[n] {
            f.fail(format!(
                "before the failover: {src} via B reached {got:?}, bound {:?}",
                bound[n]
            ));
        }
    }
    let before = binding_keys(&ha.master);
    assert_eq!(before.len(), 8, "the master holds 4 clients x 2 tables");

    // Replication carries them to the replica; then the replica loses them, as a replica
    // that had not caught up when its master died.
    let replicated = wait_until(Duration::from_secs(10), || {
        binding_keys(&ha.replica) == before
    });
    assert!(replicated, "the replica holds the master's bindings");
    let mut del = vec!["del"];
    del.extend(before.iter().map(String::as_str));
    ha.replica
        .cli(&del)
        .unwrap_or_else(|e| panic!("deleting the replica's copies: {e:#}"));
    assert_eq!(ha.replica.dbsize(), 0, "the replica lags behind");

    // The master dies; the sentinel promotes the replica.
    assert_eq!(ha.master_port(), Some(MASTER_PORT));
    for i in 0..2 {
        assert_eq!(
            f.metric(i, "tether_mirror_connections_total", &[]),
            1.0,
            "instance {i} connected once before the failover"
        );
    }
    ha.fail_over()
        .unwrap_or_else(|e| f.fail(format!("failing over: {e:#}")));
    for i in 0..2 {
        wait_metric(
            &f,
            i,
            "tether_mirror_connections_total",
            2.0,
            "reconnecting to the new master",
        );
        wait_metric(&f, i, "tether_mirror_connected", 1.0, "connected again");
    }
    // Both wrote every binding they hold again: the new master has them all.
    let resynced = wait_until(Duration::from_secs(20), || {
        binding_keys(&ha.replica) == before
    });
    if !resynced {
        f.fail(format!(
            "the new master (port {REPLICA_PORT}) should hold every binding again: {:?}, want {before:?}",
            binding_keys(&ha.replica)
        ));
    }
    // Both serve every client as before.
    for i in 0..2 {
        for (n, &src) in clients[..4].iter().enumerate() {
            let got = via(&f, i, src);
            if got != bound[n] {
                f.fail(format!(
                    "after the failover: {src} via instance {i} reached {got:?}, bound {:?}",
                    bound[n]
                ));
            }
        }
    }

    // A new B, started from nothing, finds the master through the sentinel and learns
    // every binding from it before it saw the clients.
    f.stop(1);
    f.start(1);
    for (n, &src) in clients[..4].iter().enumerate() {
        xdp_holds(&f, 1, src, &bound[n].0, "a new B after the failover");
    }

    // After the failover: B's new bindings reach A through the new master.
    let applied = f.metric(0, "tether_mirror_applied_total", &[]);
    let mut later = Vec::new();
    for &src in &clients[4..] {
        later.push(via(&f, 1, src));
    }
    wait_metric(
        &f,
        0,
        "tether_mirror_applied_total",
        applied + 8.0,
        "B's bindings made after the failover applied on A",
    );
    for (n, &src) in clients[4..].iter().enumerate() {
        xdp_holds(&f, 0, src, &later[n].0, "made on B after the failover");
        let got = via(&f, 0, src);
        if got != later[n] {
            f.fail(format!(
                "after the failover: {src} bound on B reached {got:?} via A, bound {:?}",
                later[n]
            ));
        }
    }
    assert_eq!(
        binding_keys(&ha.replica).len(),
        16,
        "the new master holds 8 clients x 2 tables"
    );
    f.stop(1);
    f.stop(0);
    drop(ha);
}
