//! `cargo xtask bench mirror`: the L7 data path's latency and throughput with Redis running
//! and with Redis stopped, side by side. One tether instance with `mirroring`, a sticky URL
//! hash service, one keep-alive client asking for a new URL on every request, so every
//! request is a local miss looked up in Redis (bounded by `lookup_timeout_ms`) and makes a
//! new binding that is queued for Redis (a table watcher and a bounded channel). Rounds
//! alternate: Redis running (each key looked up, each binding written), then Redis killed
//! (no lookups; the mirror fails, queues, counts, reconnects with backoff in the
//! background), then Redis restarted and the mirror reconnected.
//!
//! Not a test: it asserts nothing about speed, it reports medians of rounds. Results go to
//! stdout and target/bench/mirror.md.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use serde_json::json;
use tether_tests::{
    bench::Args,
    http::{KeepAlive, connect_from},
    l7lab::{IO_TIMEOUT, PORT},
    multilab::Fleet,
    netns::wait_until,
};

struct Opts {
    rounds: usize,
    requests: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 5,
        requests: 5000,
    };
    let mut args = Args::from_env("--rounds N --requests N --quick");
    while let Some(a) = args.next_flag() {
        match a.as_str() {
            "--rounds" => o.rounds = args.value(&a),
            "--requests" => o.requests = args.value(&a),
            "--quick" => {
                o.rounds = 3;
                o.requests = 1000;
            }
            other => args.unknown(other),
        }
    }
    o
}

/// One phase: `n` requests for new URLs on one keep-alive connection; (req/s, p50 µs, p99 µs).
fn measure(f: &Fleet, n: usize, round: usize, tag: &str) -> (f64, f64, f64) {
    let src = f.topo.client_addrs[0];
    let dst = SocketAddrV4::new(f.topo.vip, PORT + 1);
    let tag = tag.to_string();
    f.topo
        .in_client(move || {
            let stream = connect_from(src, dst, IO_TIMEOUT).expect("connecting to the VIP");
            let mut ka = KeepAlive::new(stream, IO_TIMEOUT);
            let mut lat = Vec::with_capacity(n);
            let t0 = Instant::now();
            for i in 0..n {
                let t = Instant::now();
                let r = ka
                    .request(&format!("/{tag}/{round}/{i}"), &[])
                    .expect("a request through tether");
                assert_eq!(r.status, 200, "{r:?}");
                lat.push(t.elapsed());
            }
            let secs = t0.elapsed().as_secs_f64();
            lat.sort();
            let q = |p: f64| {
                lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6
            };
            (n as f64 / secs, q(0.5), q(0.99))
        })
        .expect("the client namespace")
}

fn median(v: Vec<f64>) -> f64 {
    tether_tests::bench::median(v).expect("a finite value from at least one round")
}

fn main() {
    let o = opts();
    let mut f = Fleet::new(1, 3, 1, true, |_, b| {
        // No per-source quota: the one client's every request must make a binding.
        b.profile(json!({"name": "url", "type": "url-hash", "timeout_s": 600,
                         "max_new_keys_per_source_per_min": 0}))
            .l7_service("url", PORT + 1, Some("url"), json!({}))
    });
    f.start(0);
    let connected = |f: &Fleet| f.metric(0, "tether_mirror_connected", &[]) == 1.0;
    let mut up = Vec::new();
    let mut down = Vec::new();
    for round in 0..o.rounds {
        assert!(
            wait_until(Duration::from_secs(30), || connected(&f)),
            "the mirror connects to Redis"
        );
        up.push(measure(&f, o.requests, round, "up"));
        f.redis.as_mut().expect("redis").kill();
        assert!(
            wait_until(Duration::from_secs(30), || !connected(&f)),
            "the mirror notices Redis is gone"
        );
        down.push(measure(&f, o.requests, round, "down"));
        f.redis
            .as_mut()
            .expect("redis")
            .restart()
            .expect("restarting Redis");
        eprintln!(
            "round {round}: running {:.0} req/s p50 {:.0} µs p99 {:.0} µs | stopped {:.0} req/s p50 {:.0} µs p99 {:.0} µs",
            up[round].0, up[round].1, up[round].2, down[round].0, down[round].1, down[round].2
        );
    }
    let col =
        |v: &[(f64, f64, f64)], k: usize| median(v.iter().map(|t| [t.0, t.1, t.2][k]).collect());
    let (ur, u50, u99) = (col(&up, 0), col(&up, 1), col(&up, 2));
    let (dr, d50, d99) = (col(&down, 0), col(&down, 1), col(&down, 2));
    let published = f.metric(0, "tether_mirror_published_total", &[]);
    let bound = f.metric(0, "tether_l7_new_assignments_total", &[("service", "url")]);
    let dropped = f.metric(0, "tether_mirror_dropped_total", &[]);
    let failures = f.metric(0, "tether_mirror_failures_total", &[]);
    let text = format!(
        "| `cargo xtask bench mirror` ({} rounds x {} requests, a new binding each) | req/s | p50 | p99 |\n\
         | --- | ---: | ---: | ---: |\n\
         | Redis running (every key looked up, every binding written) | {ur:.0} | {u50:.0} µs | {u99:.0} µs |\n\
         | Redis stopped (no lookups; queued, failures counted) | {dr:.0} | {d50:.0} µs | {d99:.0} µs |\n\
         | stopped / running | {:.2}x | {:.2}x | {:.2}x |\n\n\
         {bound} bindings made; mirror counters at the end: {published} bindings written (new, then \
         again after each Redis restart), {dropped} dropped, {failures} failures\n",
        o.rounds,
        o.requests,
        dr / ur,
        d50 / u50,
        d99 / u99,
    );
    println!("{text}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("mirror.md"), &text);
    f.stop(0);
}
