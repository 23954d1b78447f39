//! Mirroring through a Redis deployment built for availability: two tether instances find
//! the master through Redis Sentinel (`mirroring.sentinel`), a binding made on one reaches
//! the other, and when the sentinel switches masters (planned, or after the master's
//! SIGKILL) both instances move to the new master, lose no binding they hold, and keep
//! mirroring. And through a Redis Cluster (`mirroring.cluster`): the bindings spread over
//! its nodes, reach the other instance whichever node each subscribes on, and a new
//! instance learns every one of them from every node.

use std::{net::Ipv4Addr, time::Duration};

use serde_json::json;
use tether_tests::{
    daemon::ConfigBuilder,
    l7lab::PORT,
    multilab::{Fleet, instance_name},
    netns::wait_until,
    redisha::{
        CLUSTER_PORTS, ClusterSet, MASTER_NAME, MASTER_PORT, REPLICA_PORT, SENTINEL_PORT,
        SentinelSet,
    },
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

/// Every binding key (`tether:b:*`) a server holds, sorted.
fn binding_keys(server: &tether_tests::redisha::RedisProc) -> Vec<String> {
    let out = server
        .cli(&["--scan", "--pattern", "tether:b:*"])
        .unwrap_or_else(|e| panic!("redis-cli --scan on port {}: {e:#}", server.port));
    let mut keys: Vec<String> = out.lines().map(str::to_string).collect();
    keys.sort();
    keys
}

/// Instance `to`'s XDP table and both instances serve clients `srcs`, bound through
/// instance `from` as `bound` says.
fn reaches(f: &Fleet, to: usize, srcs: &[Ipv4Addr], bound: &[(String, String)], when: &str) {
    for (n, &src) in srcs.iter().enumerate() {
        f.xdp_holds(to, src, &bound[n].0, when);
    }
    for i in 0..2 {
        for (n, &src) in srcs.iter().enumerate() {
            let got = via(f, i, src);
            if got != bound[n] {
                f.fail(format!(
                    "{when}: {src} via instance {i} reached {got:?}, bound {:?}",
                    bound[n]
                ));
            }
        }
    }
}

/// Binds `srcs` through instance `from` and waits until the other instance applied them
/// (2 tables each).
fn bind_and_mirror(f: &Fleet, from: usize, srcs: &[Ipv4Addr], when: &str) -> Vec<(String, String)> {
    let to = 1 - from;
    let applied = f.metric(to, "tether_mirror_applied_total", &[]);
    let bound: Vec<_> = srcs.iter().map(|&src| via(f, from, src)).collect();
    f.wait_metric(
        to,
        "tether_mirror_applied_total",
        applied + 2.0 * srcs.len() as f64,
        &format!("{when}: instance {from}'s bindings applied on instance {to}"),
    );
    reaches(f, to, srcs, &bound, when);
    bound
}

fn wait_connections(f: &Fleet, n: f64, when: &str) {
    for i in 0..2 {
        f.wait_metric(i, "tether_mirror_connections_total", n, when);
        f.wait_metric(i, "tether_mirror_connected", 1.0, when);
    }
}

/// Two servers and a sentinel; instances A and B configured with two sentinels, the first
/// one down, and the master's name only.
/// 1. Bindings made on A reach B through the master.
/// 2. A planned switchover (`SENTINEL FAILOVER`): both reconnect to the new master, and
///    bindings made on B reach A.
/// 3. A crash: the replica is made to lag (its copies deleted, as if replication had not
///    caught up) and the master is SIGKILLed. The sentinel promotes the replica; A and B
///    reconnect to it and write every binding they hold again, so the new master holds
///    them all; a new B started from nothing learns them from it; and bindings made on B
///    after the failover reach A.
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

    // 1. Through the first master.
    assert_eq!(ha.master_port(), Some(MASTER_PORT));
    let first = bind_and_mirror(&f, 0, &clients[..2], "through the first master");
    for i in 0..2 {
        assert_eq!(
            f.metric(i, "tether_mirror_connections_total", &[]),
            1.0,
            "instance {i} connected once before any failover"
        );
    }
    assert_eq!(
        binding_keys(ha.server(MASTER_PORT)).len(),
        4,
        "2 clients x 2 tables"
    );

    // 2. A planned switchover.
    let port = ha
        .switch_over()
        .unwrap_or_else(|e| f.fail(format!("switching over: {e:#}")));
    assert_eq!(port, REPLICA_PORT);
    wait_connections(&f, 2.0, "reconnecting after the switchover");
    let second = bind_and_mirror(&f, 1, &clients[2..4], "after the switchover");
    reaches(&f, 1, &clients[..2], &first, "after the switchover");
    let before = binding_keys(ha.server(REPLICA_PORT));
    assert_eq!(before.len(), 8, "the master holds 4 clients x 2 tables");

    // 3. A crash with a lagging replica (the first master, demoted by the switchover).
    let replica = ha.server(MASTER_PORT);
    let replicated = wait_until(Duration::from_secs(10), || binding_keys(replica) == before);
    assert!(replicated, "the replica holds the master's bindings");
    let mut del = vec!["del"];
    del.extend(before.iter().map(String::as_str));
    replica
        .cli(&del)
        .unwrap_or_else(|e| panic!("deleting the replica's copies: {e:#}"));
    assert_eq!(replica.dbsize(), 0, "the replica lags behind");
    let port = ha
        .crash_master()
        .unwrap_or_else(|e| f.fail(format!("failing over: {e:#}")));
    assert_eq!(port, MASTER_PORT);
    wait_connections(&f, 3.0, "reconnecting after the crash");
    // Both wrote every binding they hold again: the new master has them all.
    let new_master = ha.server(MASTER_PORT);
    let resynced = wait_until(Duration::from_secs(20), || {
        binding_keys(new_master) == before
    });
    if !resynced {
        f.fail(format!(
            "the new master (port {MASTER_PORT}) should hold every binding again: {:?}, want {before:?}",
            binding_keys(new_master)
        ));
    }
    reaches(&f, 1, &clients[..2], &first, "after the crash");
    reaches(&f, 0, &clients[2..4], &second, "after the crash");

    // A new B, started from nothing, finds the master through the sentinel and learns
    // every binding from it before it saw the clients.
    f.stop(1);
    f.start(1);
    reaches(&f, 1, &clients[..2], &first, "a new B after the crash");
    reaches(&f, 1, &clients[2..4], &second, "a new B after the crash");
    let third = bind_and_mirror(&f, 1, &clients[4..], "made on B after the crash");
    assert_eq!(third.len(), 4);
    assert_eq!(
        binding_keys(ha.server(MASTER_PORT)).len(),
        16,
        "the new master holds 8 clients x 2 tables"
    );
    f.stop(1);
    f.stop(0);
    drop(ha);
}

/// Three cluster masters (no replicas); A lists the nodes from the first, B from the
/// second, so each subscribes to the channel on a different node.
/// 1. Bindings made on A (L4 source IP in XDP, L7 client IP) reach B, and bindings made on
///    B reach A: each node passes every announcement to the others.
/// 2. The keys are spread over more than one node (their slots differ).
/// 3. A new B started from nothing learns every binding before it sees the clients: the
///    catch-up scans every master.
/// 4. Bindings written straight into the cluster (`redis-cli -c SET`, no announcement) are
///    found by B's lookups on a local miss, each on its key's node.
#[test]
fn cluster_mirrors_across_nodes() {
    let mut f = Fleet::new(10, 3, 2, false, |_, b| services(b));
    let cluster = ClusterSet::start(&f.topo.lb.ns, &f.topo.ns_prefix)
        .unwrap_or_else(|e| panic!("starting the Redis Cluster: {e:#}"));
    for i in 0..2 {
        let b = f.builders[i].clone().top_field(
            "mirroring",
            // A loaded test machine may take longer than the default 50 ms to answer a
            // lookup; this test asserts where requests go, not how fast Redis is.
            json!({"cluster": {"nodes": cluster.urls(i)}, "instance": instance_name(i),
                   "lookup_timeout_ms": 1000}),
        );
        f.builders[i] = b;
    }
    f.start(0);
    f.start(1);
    wait_connections(&f, 1.0, "connecting to the cluster");
    let clients = f.topo.client_addrs.clone();

    // 1. Both ways.
    let first = bind_and_mirror(&f, 0, &clients[..4], "made on A");
    let second = bind_and_mirror(&f, 1, &clients[4..8], "made on B");
    reaches(&f, 1, &clients[..4], &first, "made on A, after B's");

    // 2. Spread over the nodes: 8 clients x 2 tables, each key once.
    let per_node: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| binding_keys(n).len())
        .collect();
    assert_eq!(
        per_node.iter().sum::<usize>(),
        16,
        "8 clients x 2 tables over the nodes on ports {CLUSTER_PORTS:?}: {per_node:?}"
    );
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() > 1,
        "the bindings should land on more than one node: {per_node:?}"
    );

    // 3. A new B learns all 16 from the nodes (catch-up) before any client comes.
    f.stop(1);
    f.start(1);
    f.wait_metric(
        1,
        "tether_mirror_applied_total",
        16.0,
        "a new B's catch-up from every node",
    );
    reaches(&f, 1, &clients[..4], &first, "a new B");
    reaches(&f, 1, &clients[4..8], &second, "a new B");

    // 4. Lookups: the L7 client-IP bindings of two new clients, written as instance lb-z
    // would have, without PUBLISH.
    let hits = f.metric(1, "tether_mirror_lookup_hits_total", &[]);
    for (src, backend) in [(clients[8], "b3"), (clients[9], "b1")] {
        let key = format!(
            "tether:b:cip:client-ip:{:032x}",
            u128::from_be_bytes(src.to_ipv6_mapped().octets())
        );
        let value = format!("{}:lb-z", lb_common::backend_identity("web", backend));
        let out = cluster.nodes[0]
            .cli(&["-c", "set", &key, &value, "px", "600000"])
            .unwrap_or_else(|e| panic!("redis-cli -c set {key}: {e:#}"));
        assert_eq!(out.trim(), "OK", "redis-cli -c set {key}: {out}");
        let got = f.backend_via(1, src, PORT + 1, "/", &[]);
        if got != backend {
            f.fail(format!(
                "{src} via B reached {got}; the cluster binds it to {backend}"
            ));
        }
    }
    assert_eq!(
        f.metric(1, "tether_mirror_lookup_hits_total", &[]) - hits,
        2.0,
        "B found both bindings by lookup"
    );
    f.stop(1);
    f.stop(0);
    drop(cluster);
}
