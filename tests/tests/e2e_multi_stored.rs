//! Two tether instances mirroring through a real `redis-server`, for the stored tables the
//! HTTP tests of `e2e_multi` do not cover: SSL session IDs (a TLS pass-through service,
//! `openssl s_server` backends) and SIP Call-IDs (a UDP service, SIP responders in the
//! backend namespaces). A session or call bound on instance A is sent to instance B (as
//! after an ECMP change or A's loss) and reaches the same backend, which B finds in its own
//! table (a persistence hit), not by a new choice.
//!
//! Needs root, `openssl`, `redis-server` and `TETHER_BIN`: run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_multi_stored --
//! --test-threads=1`. Every test builds its own namespaces and removes them; every loop and
//! wait is bounded.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde_json::json;
use tether_tests::{
    l7lab::{IO_TIMEOUT, PORT},
    multilab::Fleet,
    netns::{spawn_in_netns, wait_until},
    tlslab::{Handshake, TlsBackends, s_client},
};

/// Waits until instance `i`'s `tether_mirror_applied_total` reaches `at_least`.
fn wait_applied(f: &Fleet, i: usize, at_least: f64, what: &str) {
    f.wait_metric(i, "tether_mirror_applied_total", at_least, what);
}

/// The pass-through service's port, on the VIP and on the backends.
const TLS_PORT: u16 = 8443;

/// TLS 1.2 sessions started through A resume through B on the backend that holds them:
/// B has from Redis what A learned from the servers' handshakes, the session IDs (clients
/// with `-no_ticket`) and the TLS 1.2 session tickets (the others).
#[test]
fn ssl_session_ids_follow_the_client_through_redis() {
    let mut f = Fleet::new(1, 2, 2, true, |_, mut b| {
        for n in 0..2 {
            b = b.backend_field(&format!("b{}", n + 1), "port", json!(TLS_PORT));
        }
        b.profile(json!({"name": "sess", "type": "ssl-session-id", "timeout_s": 600}))
            .l7_service(
                "tls",
                TLS_PORT,
                Some("sess"),
                json!({"tls_passthrough": true}),
            )
    });
    let servers = TlsBackends::start(&f.topo, TLS_PORT, &[])
        .unwrap_or_else(|e| f.fail(format!("starting s_server backends: {e:#}")));
    f.start(0);
    f.start(1);
    let vip = format!("{}:{TLS_PORT}", f.topo.vip);
    let hs = |f: &Fleet, via: usize, args: &[&str]| -> Handshake {
        f.topo
            .steer_client(via)
            .unwrap_or_else(|e| f.fail(format!("steering to {via}: {e:#}")));
        s_client(&f.topo.client.ns, &vip, args, IO_TIMEOUT)
            .unwrap_or_else(|e| f.fail(format!("via instance {via}: {e:#}")))
    };
    let session = |n: usize| {
        servers
            .dir
            .join(format!("mirror-session-{n}.pem"))
            .to_string_lossy()
            .into_owned()
    };
    const SESSIONS: usize = 8;
    // Even sessions by session ID, odd ones by ticket.
    let mode = |n: usize| -> &'static [&'static str] {
        if n.is_multiple_of(2) {
            &["-tls1_2", "-no_ticket"]
        } else {
            &["-tls1_2"]
        }
    };
    let mut first = Vec::new();
    for n in 0..SESSIONS {
        let h = hs(&f, 0, &[mode(n), &["-sess_out", &session(n)]].concat());
        if h.reused || h.protocol != "TLSv1.2" {
            f.fail(format!("session {n}: a new TLS 1.2 session on A: {h:?}"));
        }
        first.push(h.subject);
    }
    let spread: BTreeSet<&String> = first.iter().collect();
    if spread.len() != 2 {
        f.fail(format!("new sessions use both backends: {first:?}"));
    }
    // Every session ID and ticket A learned (its first handshakes only) reaches B.
    let learned = f.metric(
        0,
        "tether_l7_tls_sessions_learned_total",
        &[("service", "tls")],
    );
    assert!(
        learned >= SESSIONS as f64,
        "A learned every session: {learned}"
    );
    eprintln!("A learned {learned} session IDs and tickets from {SESSIONS} sessions");
    wait_applied(&f, 1, learned, "A's session IDs and tickets applied on B");
    // Each session twice through B, in an order round robin cannot follow.
    for n in (0..SESSIONS).flat_map(|n| [n, n]) {
        let h = hs(&f, 1, &[mode(n), &["-sess_in", &session(n)]].concat());
        if !h.reused || h.subject != first[n] {
            f.fail(format!(
                "session {n} of {} resumed through B as {h:?}",
                first[n]
            ));
        }
    }
    let hits = f.metric(1, "tether_l7_persist_hits_total", &[("service", "tls")]);
    assert!(
        hits >= (2 * SESSIONS) as f64,
        "B found every session ID and ticket in its own table: {hits} hits"
    );
    f.stop(1);
    f.stop(0);
    drop(servers);
}

/// The SIP service's port on the VIP.
const SIP_PORT: u16 = 5060;

/// A SIP responder on UDP [`PORT`] in every backend namespace: it answers each message with
/// `SIP/2.0 200 OK`, its Call-ID, and `X-Backend: <name>`. Stopped and joined on drop.
struct SipResponders {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl SipResponders {
    fn start(f: &Fleet) -> SipResponders {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, node) in f.topo.backends.iter().enumerate() {
            let name = f.topo.backend_name(i);
            let (addr, stop, label) = (node.addr, stop.clone(), format!("sip-{name}"));
            let sock = spawn_in_netns(&node.ns, &label, move || {
                let s = UdpSocket::bind(SocketAddrV4::new(addr, PORT)).expect("binding UDP");
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("read timeout");
                let mut buf = vec![0u8; 65_535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = s.recv_from(&mut buf) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let call_id = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Call-ID:"))
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    let reply = format!(
                        "SIP/2.0 200 OK\r\nCall-ID: {call_id}\r\nX-Backend: {name}\r\nContent-Length: 0\r\n\r\n"
                    );
                    let _ = s.send_to(reply.as_bytes(), from);
                }
            })
            .unwrap_or_else(|e| f.fail(format!("starting {label}: {e:#}")));
            threads.push(sock);
        }
        SipResponders { stop, threads }
    }
}

impl Drop for SipResponders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One SIP OPTIONS with `call_id` from `src` through instance `via`: the backend that
/// answered.
fn sip_backend_via(f: &Fleet, via: usize, src: Ipv4Addr, call_id: &str) -> String {
    f.topo
        .steer_client(via)
        .unwrap_or_else(|e| f.fail(format!("steering to {via}: {e:#}")));
    let vip = f.topo.vip_addr(SIP_PORT);
    let msg = format!(
        "OPTIONS sip:probe@{vip} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5999;branch=z9hG4bK-{call_id}\r\nFrom: <sip:probe@{src}>;tag=1\r\nTo: <sip:probe@{vip}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    let reply = f
        .topo
        .in_client(move || -> std::io::Result<String> {
            let s = UdpSocket::bind(SocketAddrV4::new(src, 0))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.send_to(msg.as_bytes(), vip)?;
            let mut buf = vec![0u8; 65_535];
            let (n, _) = s.recv_from(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .unwrap_or_else(|e| f.fail(format!("{e:#}")))
        .unwrap_or_else(|e| f.fail(format!("call {call_id} via instance {via}: {e}")));
    reply
        .lines()
        .find_map(|l| l.strip_prefix("X-Backend:"))
        .map(|b| b.trim().to_string())
        .unwrap_or_else(|| f.fail(format!("call {call_id}: no X-Backend in {reply:?}")))
}

/// Calls bound on A reach the same backend through B, found in B's own Call-ID table. The
/// SIP method places a new Call-ID by Maglev, the same on every instance with the same
/// pool: so on A the third backend is draining (it takes no new calls there), and a call
/// B's Maglev would send to it can only reach A's backend through the mirrored binding.
#[test]
fn sip_call_ids_follow_the_client_through_redis() {
    let mut f = Fleet::new(2, 3, 2, true, |i, b| {
        let b = if i == 0 {
            b.backend_field("b3", "admin_state", json!("draining"))
        } else {
            b
        };
        b.profile(json!({"name": "calls", "type": "sip-header", "timeout_s": 600}))
            .l7_service("sip", SIP_PORT, Some("calls"), json!({"protocol": "udp"}))
    });
    let responders = SipResponders::start(&f);
    f.start(0);
    f.start(1);
    const CALLS: usize = 24;
    let src = f.topo.client_addrs[0];
    let mut bound = Vec::new();
    for n in 0..CALLS {
        let id = format!("call-{n}@client.test");
        let b = sip_backend_via(&f, 0, src, &id);
        assert_ne!(b, "b3", "A sends no new call to its draining backend");
        bound.push((id, b));
    }
    let spread: BTreeSet<&String> = bound.iter().map(|(_, b)| b).collect();
    assert_eq!(
        spread.len(),
        2,
        "A's calls use both of its backends: {bound:?}"
    );
    wait_applied(&f, 1, CALLS as f64, "A's Call-IDs applied on B");
    // Through B, from another source address: the Call-ID alone decides.
    let other = f.topo.client_addrs[1];
    for (id, want) in &bound {
        for _ in 0..2 {
            let got = sip_backend_via(&f, 1, other, id);
            if &got != want {
                f.fail(format!(
                    "call {id} bound to {want} on A reached {got} through B"
                ));
            }
        }
    }
    let hits = f.metric(1, "tether_l7_persist_hits_total", &[("service", "sip")]);
    assert!(
        hits >= (2 * CALLS) as f64,
        "B found every Call-ID in its own table: {hits} hits"
    );
    f.stop(1);
    f.stop(0);
    drop(responders);
}

/// Waits until Redis holds at least `n` keys.
fn wait_keys(f: &Fleet, n: u64, what: &str) {
    let redis = f.redis.as_ref().expect("redis");
    if !wait_until(Duration::from_secs(20), || redis.dbsize() >= n) {
        f.fail(format!(
            "{what}: Redis holds {} keys, not {n}",
            redis.dbsize()
        ));
    }
}

/// Instance `i` re-reads its config (SIGHUP) with `mirroring` set to `m` (`null`: none).
fn reload_mirroring(f: &mut Fleet, i: usize, m: serde_json::Value) {
    f.builders[i] = f.builders[i].clone().top_field("mirroring", m);
    let cfg = f.builders[i].build();
    f.d(i)
        .write_config(&cfg)
        .unwrap_or_else(|e| f.fail(format!("writing instance {i}'s config: {e:#}")));
    match f.d(i).reload() {
        Ok(tether_tests::daemon::Reload::Applied(_)) => {}
        other => f.fail(format!("reloading instance {i}: {other:?}")),
    }
}

/// `mirroring` changes with a reload, no restart: instance A, started without it, binds
/// clients (XDP source IP and L7 client IP); a SIGHUP that adds the section starts the
/// mirror, which writes those bindings and the new ones to Redis, and B serves A's clients
/// on A's backends. A bad section is refused by name and changes nothing. A reload that
/// removes it disconnects A (its tables stay: its clients
/// keep their backends); one that adds it back under another instance name reconnects and
/// writes what A bound meanwhile.
#[test]
fn a_reload_turns_mirroring_on_off_and_renames_the_instance() {
    let mut f = Fleet::new(6, 3, 2, true, |i, b| {
        let b = if i == 0 {
            b.top_field("mirroring", serde_json::Value::Null)
        } else {
            b
        };
        b.service("l4", PORT, Some(600))
            .profile(json!({"name": "cip", "type": "client-ip", "timeout_s": 600}))
            .l7_service("cip", PORT + 1, Some("cip"), json!({}))
    });
    f.start(0);
    f.start(1);
    let clients = f.topo.client_addrs.clone();
    let bind = |f: &Fleet, via: usize, src: Ipv4Addr| {
        (
            f.backend_via(via, src, PORT, "/", &[]),
            f.backend_via(via, src, PORT + 1, "/", &[]),
        )
    };
    let check = |f: &Fleet, via: usize, src: Ipv4Addr, want: &(String, String), when: &str| {
        let got = bind(f, via, src);
        if &got != want {
            f.fail(format!(
                "{when}: client {src} via instance {via} reached {got:?}, bound {want:?}"
            ));
        }
    };
    let mut bound = Vec::new();
    for &src in &clients[..3] {
        bound.push(bind(&f, 0, src));
    }
    let text = f.d(0).metrics().expect("metrics");
    assert!(
        !text.contains("tether_mirror_"),
        "A does not mirror without the section"
    );
    assert_eq!(
        f.redis.as_ref().expect("redis").dbsize(),
        0,
        "nothing in Redis"
    );

    // On: A writes the 3 clients it bound (2 tables each), then a new one.
    let url = tether_tests::multilab::RedisServer::url();
    reload_mirroring(&mut f, 0, json!({"redis": url, "instance": "lb-a"}));
    f.wait_metric_until(0, "tether_mirror_connected", |v| v == 1.0, "A connecting");
    wait_keys(&f, 6, "A's bindings from before the reload");
    bound.push(bind(&f, 0, clients[3]));
    wait_keys(&f, 8, "A's binding after the reload");
    // The new client's XDP binding came through the ring buffer (the data path writes it
    // since the reload), not a sweep; the ring never filled.
    let events = f.metric(0, "tether_mirror_xdp_events_total", &[]);
    assert!(
        events >= 1.0,
        "A read its new XDP binding from the ring: {events}"
    );
    assert_eq!(f.metric(0, "tether_mirror_xdp_ring_drops_total", &[]), 0.0);
    f.wait_metric_until(
        1,
        "tether_mirror_applied_total",
        |v| v >= 8.0,
        "B applying A's bindings",
    );
    for (n, &src) in clients[..4].iter().enumerate() {
        check(&f, 1, src, &bound[n], "moved to B");
    }
    let hits = f.metric(1, "tether_l7_persist_hits_total", &[("service", "cip")]);
    assert!(hits >= 4.0, "B found A's clients in its own table: {hits}");

    // A bad section is refused, naming the field, and changes nothing.
    let good = f.builders[0].clone();
    let bad = good.clone().top_field(
        "mirroring",
        json!({"redis": "http://10.0.0.5", "instance": "lb-a"}),
    );
    f.d(0)
        .write_config(&bad.build())
        .unwrap_or_else(|e| f.fail(format!("writing A's config: {e:#}")));
    match f.d(0).reload() {
        Ok(tether_tests::daemon::Reload::Refused(line)) if line.contains("mirroring.redis") => {}
        other => f.fail(format!(
            "a bad mirroring.redis is refused by name: {other:?}"
        )),
    }
    f.d(0)
        .write_config(&good.build())
        .unwrap_or_else(|e| f.fail(format!("writing A's config: {e:#}")));
    assert_eq!(
        f.metric(0, "tether_mirror_connected", &[]),
        1.0,
        "A still mirrors"
    );

    // Off: A disconnects and keeps its tables; a client it binds now stays out of Redis.
    reload_mirroring(&mut f, 0, serde_json::Value::Null);
    f.wait_metric_until(
        0,
        "tether_mirror_connected",
        |v| v == 0.0,
        "A disconnecting",
    );
    for (n, &src) in clients[..4].iter().enumerate() {
        check(&f, 0, src, &bound[n], "A after mirroring was removed");
    }
    bound.push(bind(&f, 0, clients[4]));
    // B still mirrors: its new client's 2 bindings are the only new keys.
    bound.push(bind(&f, 1, clients[5]));
    wait_keys(&f, 10, "B's new client");
    assert_eq!(
        f.redis.as_ref().expect("redis").dbsize(),
        10,
        "A wrote nothing while not mirroring"
    );
    assert_eq!(
        f.metric(0, "tether_mirror_xdp_events_total", &[]),
        events,
        "A's data path wrote no binding event while not mirroring"
    );

    // On again as another instance: A reconnects and writes what it bound meanwhile.
    let connections = f.metric(0, "tether_mirror_connections_total", &[]);
    reload_mirroring(&mut f, 0, json!({"redis": url, "instance": "lb-c"}));
    f.wait_metric_until(
        0,
        "tether_mirror_connections_total",
        |v| v > connections,
        "A reconnecting",
    );
    wait_keys(&f, 12, "A's client bound while not mirroring");
    f.wait_metric_until(
        1,
        "tether_mirror_applied_total",
        |v| v >= 10.0,
        "B applying it",
    );
    check(
        &f,
        1,
        clients[4],
        &bound[4],
        "A's client from the pause, on B",
    );
    // B's client reached A through Redis too (A caught up on reconnecting).
    f.wait_metric_until(
        0,
        "tether_mirror_applied_total",
        |v| v >= 2.0,
        "A applying B's client",
    );
    check(&f, 0, clients[5], &bound[5], "B's client, on A");
    f.stop(1);
    f.stop(0);
}
