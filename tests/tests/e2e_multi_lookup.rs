//! Mirroring's lookup on a local miss: an L7 request whose key no local table holds reads
//! Redis (bounded by `mirroring.lookup_timeout_ms`) before it is decided, so a binding
//! reaches every instance even when the channel's announcement never did. Two instances
//! and a real `redis-server`; bindings are written straight into Redis with `redis-cli`
//! (a `SET`, no `PUBLISH`), in the format the instances write, so only a lookup can find
//! them.

use std::net::Ipv4Addr;

use lb_common::backend_identity;
use serde_json::json;
use tether::engine::table::digest;
use tether_tests::{
    l7lab::PORT,
    multilab::{Fleet, RedisServer, instance_name},
    netns::wait_until,
};

const CIP: u16 = PORT + 1;
const APP: u16 = PORT + 2;

/// An L7 client-IP service on [`CIP`] and an app-cookie service (the backends'
/// JSESSIONID) on [`APP`], over pool `web` (b1, b2, b3).
fn services(b: tether_tests::daemon::ConfigBuilder) -> tether_tests::daemon::ConfigBuilder {
    b.profile(json!({"name": "cip", "type": "client-ip", "timeout_s": 600}))
        .profile(json!({"name": "app", "type": "app-cookie", "cookie_name": "JSESSIONID", "timeout_s": 600}))
        .l7_service("cip", CIP, Some("cip"), json!({}))
        .l7_service("app", APP, Some("app"), json!({}))
}

/// The Redis key of a binding: `tether:b:<service>:<table id>:<key as 32 hex digits>`.
fn redis_key(service: &str, table: &str, key: u128) -> String {
    format!("tether:b:{service}:{table}:{key:032x}")
}

/// The client-IP table's key of `src` (its address, IPv4-mapped, the profile's /32).
fn client_key(src: Ipv4Addr) -> u128 {
    u128::from_be_bytes(src.to_ipv6_mapped().octets())
}

/// Binds `key` to backend `backend` of pool `web` in Redis, as instance `lb-z` would have
/// (value `<backend identity>:<instance>`, the profile's timeout as TTL), without announcing
/// it.
fn write_binding(redis: &RedisServer, key: &str, backend: &str) {
    let value = format!("{}:lb-z", backend_identity("web", backend));
    let out = redis
        .cli(&["set", key, &value, "px", "600000"])
        .unwrap_or_else(|e| panic!("redis-cli set {key}: {e:#}"));
    assert_eq!(out.trim(), "OK", "redis-cli set {key}: {out}");
}

/// Bindings written into Redis after both instances started (and caught up) are found by
/// each instance on its first request for the key: the client-IP table (4 clients) and the
/// app-cookie table (4 sessions, from another address), each on the backend Redis names,
/// as persistence hits and lookup hits, with no new choice. A key Redis does not hold is
/// decided locally and then written to Redis by the instance that decided it.
#[test]
fn a_local_miss_finds_the_binding_in_redis_without_the_channel() {
    let mut f = Fleet::new(5, 3, 2, true, |i, b| {
        // A loaded test machine may take longer than the default 50 ms to answer; this
        // test asserts where requests go, not how fast Redis is.
        services(b).top_field(
            "mirroring",
            json!({"redis": RedisServer::url(), "instance": instance_name(i),
                   "lookup_timeout_ms": 1000}),
        )
    });
    f.start(0);
    f.start(1);
    let clients = f.topo.client_addrs.clone();
    let backends = ["b3", "b1", "b2", "b3"];
    {
        let redis = f.redis.as_ref().expect("redis");
        for (n, want) in backends.iter().enumerate() {
            write_binding(
                redis,
                &redis_key("cip", "client-ip", client_key(clients[n])),
                want,
            );
            let session = format!("sess-{n}");
            write_binding(
                redis,
                &redis_key("app", "app-cookie:JSESSIONID", digest(session.as_bytes())),
                want,
            );
        }
    }
    // Each client's first request on B, then again on A and on B.
    for (n, want) in backends.iter().enumerate() {
        let cookie = format!("JSESSIONID=sess-{n}");
        for via in [1, 0, 1] {
            let got = f.backend_via(via, clients[n], CIP, "/", &[]);
            if got != *want {
                f.fail(format!(
                    "client {} via instance {via} reached {got}, Redis binds it to {want}",
                    clients[n]
                ));
            }
            let other = clients[(n + 1) % clients.len()];
            let got = f.backend_via(via, other, APP, "/", &[("Cookie", &cookie)]);
            if got != *want {
                f.fail(format!(
                    "session sess-{n} via instance {via} reached {got}, Redis binds it to {want}"
                ));
            }
        }
    }
    for i in 0..2 {
        for svc in ["cip", "app"] {
            let hits = f.metric(i, "tether_l7_persist_hits_total", &[("service", svc)]);
            let fresh = f.metric(i, "tether_l7_new_assignments_total", &[("service", svc)]);
            let want = if i == 1 { 8.0 } else { 4.0 };
            assert_eq!(
                (hits, fresh),
                (want, 0.0),
                "instance {i}, {svc}: every request honoured Redis' binding (hits, new)"
            );
        }
        // 4 clients + 4 sessions, the first time each instance saw them.
        assert_eq!(
            f.metric(i, "tether_mirror_lookup_hits_total", &[]),
            8.0,
            "instance {i}'s lookup hits"
        );
        assert_eq!(
            f.metric(i, "tether_mirror_lookups_total", &[]),
            8.0,
            "instance {i} looked up each key once: later requests hit its own table"
        );
        assert_eq!(
            f.metric(i, "tether_mirror_applied_total", &[]),
            0.0,
            "instance {i}: nothing came through the channel"
        );
    }

    // A client Redis knows nothing of: looked up, decided on B, and published by B.
    let src = clients[4];
    let lookups = f.metric(1, "tether_mirror_lookups_total", &[]);
    let chosen = f.backend_via(1, src, CIP, "/", &[]);
    assert_eq!(
        f.metric(1, "tether_mirror_lookups_total", &[]),
        lookups + 1.0,
        "the new client was looked up"
    );
    assert_eq!(
        f.metric(1, "tether_l7_new_assignments_total", &[("service", "cip")]),
        1.0
    );
    let key = redis_key("cip", "client-ip", client_key(src));
    let want = format!("{}:lb-b", backend_identity("web", &chosen));
    let redis = f.redis.as_ref().expect("redis");
    let published = wait_until(std::time::Duration::from_secs(10), || {
        redis.cli(&["get", &key]).is_ok_and(|v| v.trim() == want)
    });
    assert!(
        published,
        "B's choice is in Redis: {key} = {:?}, want {want}",
        redis.cli(&["get", &key])
    );
    f.stop(1);
    f.stop(0);
}

/// Redis stopped: an instance knows it is disconnected and decides a miss locally at once
/// (counted as skipped, never as a lookup or a timeout), serving every client and keeping
/// them on their backends. Default config (`lookup_timeout_ms` not set).
#[test]
fn with_redis_down_a_miss_is_decided_locally_without_asking() {
    let mut f = Fleet::new(6, 3, 2, true, |_, b| services(b));
    f.start(0);
    f.start(1);
    // A first client while Redis runs: a lookup that finds nothing.
    let first = f.backend_via(1, f.topo.client_addrs[0], CIP, "/", &[]);
    assert_eq!(f.metric(1, "tether_mirror_lookups_total", &[]), 1.0);
    f.redis.as_mut().expect("redis").kill();
    let noticed = wait_until(std::time::Duration::from_secs(20), || {
        f.metric(1, "tether_mirror_connected", &[]) == 0.0
    });
    if !noticed {
        f.fail("B never noticed Redis was gone");
    }
    let clients = f.topo.client_addrs.clone();
    let mut bound = vec![first];
    for &src in &clients[1..] {
        bound.push(f.backend_via(1, src, CIP, "/", &[]));
    }
    for (n, &src) in clients.iter().enumerate() {
        let again = f.backend_via(1, src, CIP, "/", &[]);
        assert_eq!(again, bound[n], "client {src} stays on its backend");
    }
    assert_eq!(
        f.metric(1, "tether_mirror_lookups_skipped_total", &[]),
        5.0,
        "the 5 new clients were decided without asking Redis"
    );
    assert_eq!(
        f.metric(1, "tether_mirror_lookups_total", &[]),
        1.0,
        "no lookup while disconnected"
    );
    assert_eq!(f.metric(1, "tether_mirror_lookup_timeouts_total", &[]), 0.0);
    assert_eq!(
        f.metric(1, "tether_l7_new_assignments_total", &[("service", "cip")]),
        6.0
    );
    assert_eq!(
        f.metric(1, "tether_l7_persist_hits_total", &[("service", "cip")]),
        6.0
    );
    f.stop(1);
    f.stop(0);
}

/// Redis' `process_id` (`INFO server`).
fn redis_pid(redis: &RedisServer) -> i32 {
    let info = redis
        .cli(&["info", "server"])
        .unwrap_or_else(|e| panic!("redis-cli info: {e:#}"));
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process_id in INFO server:\n{info}"))
}

/// Redis alive but not answering (SIGSTOP): a miss waits for the lookup's timeout only
/// (default 50 ms, counted), then is decided locally and served; once the mirror notices
/// the silence (its 1 s command timeout) misses are not looked up at all. After SIGCONT
/// the mirror reconnects and the bindings made meanwhile reach Redis.
#[test]
fn a_silent_redis_costs_a_miss_the_lookup_timeout_only() {
    let mut f = Fleet::new(6, 3, 2, true, |_, b| services(b));
    f.start(0);
    f.start(1);
    let pid = redis_pid(f.redis.as_ref().expect("redis"));
    // SAFETY: plain libc calls on the redis-server this test started.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGSTOP) },
        0,
        "SIGSTOP redis"
    );
    let clients = f.topo.client_addrs.clone();
    let mut bound = Vec::new();
    for &src in &clients {
        bound.push(f.backend_via(1, src, CIP, "/", &[]));
    }
    let timeouts = f.metric(1, "tether_mirror_lookup_timeouts_total", &[]);
    let skipped = f.metric(1, "tether_mirror_lookups_skipped_total", &[]);
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGCONT) },
        0,
        "SIGCONT redis"
    );
    assert!(
        timeouts >= 1.0,
        "the first miss waited for the timeout and was counted: {timeouts}"
    );
    assert_eq!(
        timeouts + skipped,
        clients.len() as f64,
        "every miss timed out or was skipped (timeouts {timeouts}, skipped {skipped})"
    );
    assert_eq!(f.metric(1, "tether_mirror_lookup_hits_total", &[]), 0.0);
    for (n, &src) in clients.iter().enumerate() {
        assert_eq!(
            f.backend_via(1, src, CIP, "/", &[]),
            bound[n],
            "client {src} stays on its backend"
        );
    }
    // Back: B's bindings reach Redis.
    let redis = f.redis.as_ref().expect("redis");
    let written = wait_until(std::time::Duration::from_secs(30), || {
        redis.dbsize() >= clients.len() as u64
    });
    assert!(written, "B's bindings in Redis: {} keys", redis.dbsize());
    f.stop(1);
    f.stop(0);
}
