//! Two or more tether instances behind one client (separate LB namespaces on one segment,
//! the same config and pool, a copy of the first instance's cookie key). The client is
//! moved between instances as an ECMP or anycast change moves it, and must reach the same
//! backend every time:
//! - with no shared state at all, for the methods that carry or compute the backend
//!   (encrypted HTTP cookie, consistent hash, a sticky key hash on a new key, custom header);
//! - through Redis mirroring (`mirroring`), for the methods that store bindings.

use std::collections::HashSet;

use serde_json::json;
use tether_tests::{l7lab::PORT, multilab::Fleet};

const COOKIE: &str = "TLB";

/// Three services on the two instances; the client alternates A, B, A, B... with each
/// session's key (cookie, header, URL, tenant header) and always reaches one backend.
#[test]
fn deterministic_methods_agree_across_instances() {
    let mut f = Fleet::new(4, 3, 2, false, |_, b| {
        b.backend_field("b2", "header_value", json!("tenant-b"))
            .profile(json!({"name": "ck", "type": "http-cookie", "cookie_name": COOKIE}))
            .profile(
                json!({"name": "chash", "type": "consistent-hash", "hash_key": "header:X-User"}),
            )
            .profile(json!({"name": "url", "type": "url-hash", "timeout_s": 600}))
            .profile(json!({"name": "tenant", "type": "custom-header", "item": "X-Tenant"}))
            .l7_service("cookie", PORT, Some("ck"), json!({}))
            .l7_service("chash", PORT + 1, Some("chash"), json!({}))
            .l7_service("url", PORT + 2, Some("url"), json!({}))
            .l7_service("tenant", PORT + 3, Some("tenant"), json!({}))
    });
    f.start(0);
    f.start(1);

    // Encrypted cookie: issued by A, honoured by B (same key, same backend identity).
    let mut seen = HashSet::new();
    for s in 0..6 {
        let src = f.topo.client_addrs[s % 4];
        let first = f.request_via(s % 2, src, PORT, "/", &[]);
        let cookie = first
            .set_cookie_value(COOKIE)
            .unwrap_or_else(|| f.fail(format!("session {s}: no {COOKIE} cookie issued")));
        let want = first.echo().expect("echo").backend;
        seen.insert(want.clone());
        let header = format!("{COOKIE}={cookie}");
        for n in 1..8 {
            // Another source address too: the cookie alone decides.
            let b = f.backend_via(
                n % 2,
                f.topo.client_addrs[n % 4],
                PORT,
                "/",
                &[("Cookie", &header)],
            );
            if b != want {
                f.fail(format!(
                    "cookie session {s}: request {n} via instance {} reached {b}, not {want}",
                    n % 2
                ));
            }
        }
    }
    assert!(
        seen.len() > 1,
        "new sessions are balanced over the pool: {seen:?}"
    );

    // Consistent hash on a header, and a sticky URL hash on keys new to both instances: the
    // key's Maglev entry over the same pool, the same on every instance.
    let mut chash = HashSet::new();
    for u in 0..12 {
        let user = format!("user-{u}");
        let path = format!("/doc/{u}");
        let mut want: [Option<String>; 2] = [None, None];
        for n in 0..6 {
            let via = (n + u) % 2;
            let src = f.topo.client_addrs[n % 4];
            let b = f.backend_via(via, src, PORT + 1, "/", &[("X-User", &user)]);
            let w = want[0].get_or_insert_with(|| b.clone());
            if &b != w {
                f.fail(format!(
                    "consistent hash {user}: via {via} reached {b}, not {w}"
                ));
            }
            chash.insert(b);
            let b = f.backend_via(via, src, PORT + 2, &path, &[]);
            let w = want[1].get_or_insert_with(|| b.clone());
            if &b != w {
                f.fail(format!("url hash {path}: via {via} reached {b}, not {w}"));
            }
        }
    }
    assert!(chash.len() > 1, "keys spread over the pool: {chash:?}");

    // Both instances served: the client really moved.
    for i in 0..2 {
        let hits = f.metric(i, "tether_l7_persist_hits_total", &[("service", "cookie")]);
        assert!(hits >= 10.0, "instance {i} honoured {hits} cookies");
    }

    // Custom header: a static mapping, the same everywhere.
    for n in 0..6 {
        let b = f.backend_via(
            n % 2,
            f.topo.client_addrs[n % 4],
            PORT + 3,
            "/",
            &[("X-Tenant", "tenant-b")],
        );
        assert_eq!(b, "b2", "tenant-b via instance {}", n % 2);
    }
    f.stop(1);
    f.stop(0);
}

// ---------------------------------------------------------------------------------------------
// Stored tables mirrored through Redis

/// The services of the mirroring tests: L4 DSR source IP on [`PORT`] (the XDP table), L7
/// client IP on `PORT + 1`, app cookie (the backends' JSESSIONID) on `PORT + 2`.
fn stored(b: tether_tests::daemon::ConfigBuilder) -> tether_tests::daemon::ConfigBuilder {
    b.service("l4", PORT, Some(600))
        .profile(json!({"name": "cip", "type": "client-ip", "timeout_s": 600}))
        .profile(json!({"name": "app", "type": "app-cookie", "cookie_name": "JSESSIONID", "timeout_s": 600}))
        .l7_service("cip", PORT + 1, Some("cip"), json!({}))
        .l7_service("app", PORT + 2, Some("app"), json!({}))
}

/// What one client is bound to by each stored method.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bound {
    l4: String,
    cip: String,
    /// The JSESSIONID the backend set, and that backend.
    session: String,
    app: String,
}

/// Binds client `src` through instance `i` with every stored method.
fn bind_via(f: &Fleet, i: usize, src: std::net::Ipv4Addr) -> Bound {
    let l4 = f.backend_via(i, src, PORT, "/", &[]);
    let cip = f.backend_via(i, src, PORT + 1, "/", &[]);
    let login = f.request_via(i, src, PORT + 2, "/login", &[]);
    let session = login
        .set_cookie_value("JSESSIONID")
        .unwrap_or_else(|| f.fail(format!("{src}: no JSESSIONID from /login: {login:?}")));
    let app = login.echo().expect("echo").backend;
    Bound {
        l4,
        cip,
        session,
        app,
    }
}

/// Client `src` through instance `i` reaches the backends of `want`.
fn check_via(f: &Fleet, i: usize, src: std::net::Ipv4Addr, want: &Bound, when: &str) {
    let l4 = f.backend_via(i, src, PORT, "/", &[]);
    let cip = f.backend_via(i, src, PORT + 1, "/", &[]);
    let cookie = format!("JSESSIONID={}", want.session);
    // From another address: the session cookie alone decides.
    let other = f.topo.client_addrs[(f.topo.client_addrs.iter().position(|a| *a == src).unwrap()
        + 1)
        % f.topo.client_addrs.len()];
    let app = f.backend_via(i, other, PORT + 2, "/", &[("Cookie", &cookie)]);
    let got = Bound {
        l4,
        cip,
        session: want.session.clone(),
        app,
    };
    if &got != want {
        f.fail(format!(
            "{when}: client {src} via instance {i} reached {got:?}, bound {want:?}"
        ));
    }
}

/// Clients bound on instance A are sent to instance B (as after an ECMP change or A's loss)
/// and reach the same backend, for the XDP source-IP table (ring buffer -> Redis -> B's
/// XDP map), the L7 client-IP table and the app-cookie table. Redis is then killed: A keeps
/// serving and binding from its own tables, counts the failures and, once Redis is back
/// (empty: no persistence), writes everything again; a new B started from nothing learns
/// every binding, those made while Redis was down included.
#[test]
fn stored_bindings_follow_the_client_through_redis() {
    let mut f = Fleet::new(12, 3, 2, true, |_, b| stored(b));
    f.start(0);
    f.start(1);
    let clients = f.topo.client_addrs.clone();
    let mut bound = Vec::new();
    for &src in &clients[..6] {
        bound.push(bind_via(&f, 0, src));
    }
    // 6 clients x 3 tables reach B.
    f.wait_metric(
        1,
        "tether_mirror_applied_total",
        18.0,
        "A's bindings applied on B",
    );
    // B has never seen these clients: its XDP table has them from the ring buffer of A.
    for (n, &src) in clients[..6].iter().enumerate() {
        f.xdp_holds(1, src, &bound[n].l4, "before B saw the client");
    }
    for (n, &src) in clients[..6].iter().enumerate() {
        check_via(&f, 1, src, &bound[n], "moved to B");
    }
    for svc in ["cip", "app"] {
        let hits = f.metric(1, "tether_l7_persist_hits_total", &[("service", svc)]);
        assert!(
            hits >= 6.0,
            "B found {svc}'s bindings in its own table: {hits} hits"
        );
    }
    // Redis dies: A serves and binds on, and counts the failures.
    f.redis.as_mut().expect("redis").kill();
    f.wait_metric(
        0,
        "tether_mirror_failures_total",
        1.0,
        "A noticing Redis is gone",
    );
    for &src in &clients[6..] {
        bound.push(bind_via(&f, 0, src));
    }
    for (n, &src) in clients.iter().enumerate() {
        check_via(&f, 0, src, &bound[n], "A while Redis is down");
    }
    assert!(
        f.metric(0, "tether_mirror_pending", &[]) >= 1.0,
        "A's bindings made while Redis is down wait"
    );
    // Redis returns, empty: A writes every binding again (12 clients x 3 tables).
    f.redis
        .as_mut()
        .expect("redis")
        .restart()
        .expect("restarting Redis");
    f.wait_metric(0, "tether_mirror_connections_total", 2.0, "A reconnecting");
    let redis = f.redis.as_ref().expect("redis");
    let filled = tether_tests::netns::wait_until(std::time::Duration::from_secs(20), || {
        redis.dbsize() >= 36
    });
    assert!(
        filled,
        "Redis holds every binding again: {} keys",
        redis.dbsize()
    );
    assert_eq!(
        f.metric(0, "tether_mirror_pending", &[]),
        0.0,
        "nothing waits"
    );

    // A new B, started from nothing, learns them all from Redis before it says ready.
    f.stop(1);
    f.start(1);
    for (n, &src) in clients.iter().enumerate() {
        f.xdp_holds(1, src, &bound[n].l4, "a new B, before it saw the client");
    }
    for (n, &src) in clients.iter().enumerate() {
        check_via(&f, 1, src, &bound[n], "a new B after Redis came back");
    }
    f.stop(1);
    f.stop(0);
}

/// The backends each (client, port) reached.
type Seen = std::collections::HashMap<(String, u16), HashSet<String>>;

/// Scale-out from one instance to three under a steady stream: while clients keep
/// connecting (L4 source IP and L7 client IP), instances B and C start and the stream is
/// moved to each in turn, then back to A. No client ever reaches another backend.
#[test]
fn scale_out_from_one_to_three_moves_no_client() {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::Duration,
    };
    use tether_tests::http::request_from;
    let mut f = Fleet::new(20, 3, 3, true, |_, b| stored(b));
    f.start(0);
    f.topo.steer_client(0).expect("steer");
    let clients = f.topo.client_addrs.clone();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (stop, served, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let vip = f.topo.vip;
    let stream = {
        let (seen, stop, served, failed, clients) = (
            seen.clone(),
            stop.clone(),
            served.clone(),
            failed.clone(),
            clients.clone(),
        );
        tether_tests::netns::spawn_in_netns(&f.topo.client.ns, "stream", move || {
            // Bounded: at most 100000 requests, and it stops when told.
            for n in 0..100_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let src = clients[n % clients.len()];
                let port = if n / clients.len() % 2 == 0 {
                    PORT
                } else {
                    PORT + 1
                };
                let dst = std::net::SocketAddrV4::new(vip, port);
                match request_from(src, dst, "/", &[], tether_tests::l7lab::IO_TIMEOUT) {
                    Ok(r) if r.status == 200 => {
                        if let Ok(e) = r.echo() {
                            served.fetch_add(1, Ordering::Relaxed);
                            seen.lock()
                                .unwrap()
                                .entry((src.to_string(), port))
                                .or_default()
                                .insert(e.backend);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .expect("starting the stream")
    };
    let wait_served = |n: u64| {
        let target = served.load(Ordering::Relaxed) + n;
        tether_tests::netns::wait_until(Duration::from_secs(30), || {
            served.load(Ordering::Relaxed) >= target
        })
    };
    assert!(wait_served(80), "the stream runs through A");
    let mut log = Vec::new();
    for i in [1, 2, 0] {
        if f.daemons[i].is_none() {
            f.start(i);
        }
        f.topo.steer_client(i).expect("steer");
        log.push(format!("moved to instance {i}"));
        if !wait_served(80) {
            f.fail(format!("the stream stalled on instance {i}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    stream.join().expect("the stream thread");
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let moved: Vec<_> = seen.iter().filter(|(_, b)| b.len() > 1).collect();
    if !moved.is_empty() {
        f.fail(format!(
            "clients moved during the scale-out ({log:?}): {moved:?}"
        ));
    }
    assert_eq!(
        seen.len(),
        clients.len() * 2,
        "every client and service was served"
    );
    eprintln!(
        "scale-out: {} requests served, {} failed (connections cut by the move)",
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    for i in [2, 1, 0] {
        f.stop(i);
    }
}

/// The key tables (a sticky URL hash, a script's keys) reach the other instance too: B
/// answers every key A bound from its own table (persistence hits, not new choices).
#[test]
fn stored_key_tables_follow_the_client_through_redis() {
    let script = std::env::temp_dir().join(format!("tether-mirror-{}.lua", std::process::id()));
    std::fs::write(
        &script,
        "function persist(req)\n  return req.headers[\"x-user\"]\nend\n",
    )
    .expect("writing the script");
    let file = script.to_string_lossy().into_owned();
    let mut f = Fleet::new(4, 3, 2, true, |_, b| {
        b.profile(json!({"name": "url", "type": "url-hash", "timeout_s": 600}))
            .profile(json!({"name": "lua", "type": "script", "file": file, "timeout_s": 600}))
            .l7_service("url", PORT + 1, Some("url"), json!({}))
            .l7_service("lua", PORT + 2, Some("lua"), json!({}))
    });
    f.start(0);
    f.start(1);
    let mut want = Vec::new();
    for n in 0..10 {
        let src = f.topo.client_addrs[n % 4];
        let path = format!("/doc/{n}");
        let user = format!("user-{n}");
        want.push((
            path.clone(),
            f.backend_via(0, src, PORT + 1, &path, &[]),
            user.clone(),
            f.backend_via(0, src, PORT + 2, "/", &[("X-User", &user)]),
        ));
    }
    f.wait_metric(
        1,
        "tether_mirror_applied_total",
        20.0,
        "A's keys applied on B",
    );
    for (n, (path, url_b, user, lua_b)) in want.iter().enumerate() {
        let src = f.topo.client_addrs[(n + 1) % 4];
        assert_eq!(
            &f.backend_via(1, src, PORT + 1, path, &[]),
            url_b,
            "{path} via B"
        );
        assert_eq!(
            &f.backend_via(1, src, PORT + 2, "/", &[("X-User", user)]),
            lua_b,
            "{user} via B"
        );
    }
    for svc in ["url", "lua"] {
        let hits = f.metric(1, "tether_l7_persist_hits_total", &[("service", svc)]);
        assert!(
            hits >= 10.0,
            "B found {svc}'s keys in its own table: {hits} hits"
        );
    }
    f.stop(1);
    f.stop(0);
    let _ = std::fs::remove_file(&script);
}

/// TLS persistence in session tickets (same `keys` in the config of both instances): a
/// session started on A resumes on B (TLS 1.2 ticket and TLS 1.3 PSK) and reaches the
/// backend A chose, twice in a row, with no shared state.
#[test]
fn tls_tickets_resume_on_the_other_instance() {
    use tether_tests::{
        http::Echo,
        tlslab::{s_client_send, self_signed},
    };
    const TLS_PORT: u16 = 8443;
    let certs = std::env::temp_dir().join(format!("tether-e2e-multi-{}", std::process::id()));
    let (cert, key) = self_signed(&certs, "tls.test").unwrap_or_else(|e| panic!("{e:#}"));
    let keys = json!([{"id": 3, "secret": "3333333333333333333333333333333333333333333333333333333333333333"}]);
    let mut f = Fleet::new(1, 2, 2, false, |_, b| {
        b.profile(json!({"name": "tk", "type": "tls-ticket", "keys": keys}))
            .l7_service(
                "tls",
                TLS_PORT,
                Some("tk"),
                json!({"tls": {"cert_file": cert, "key_file": key}}),
            )
    });
    f.start(0);
    f.start(1);
    let get = |f: &Fleet, via: usize, args: &[&str]| {
        f.topo.steer_client(via).expect("steer");
        let (h, text) = s_client_send(
            &f.topo.client.ns,
            &format!("{}:{TLS_PORT}", f.topo.vip),
            args,
            b"GET /t HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n",
            tether_tests::l7lab::IO_TIMEOUT,
        )
        .unwrap_or_else(|e| f.fail(format!("{e:#}")));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        // s_client prints its own reports after the body (a TLS 1.3 ticket, the close).
        let body = ["\n---", "\nclosed", "\nread R BLOCK"]
            .iter()
            .filter_map(|m| body.find(m))
            .min()
            .map_or(body, |end| &body[..end + 1]);
        let backend = body.lines().next().unwrap_or("").trim().to_string();
        if Echo::parse(body).is_none() {
            f.fail(format!("via {via}: no echo answer in:\n{text}"));
        }
        (h.reused, backend)
    };
    let session = |n: usize| {
        certs
            .join(format!("s{n}.pem"))
            .to_string_lossy()
            .into_owned()
    };
    let protocols = ["-tls1_2", "-tls1_3"];
    for n in 0..4 {
        let p = protocols[n % 2];
        let (reused, want) = get(&f, 0, &[p, "-sess_out", &session(n)]);
        assert!(!reused, "session {n}: a new session on A");
        for _ in 0..2 {
            let (reused, got) = get(&f, 1, &[p, "-sess_in", &session(n)]);
            assert!(reused, "session {n} ({p}) resumed on B");
            assert_eq!(got, want, "session {n} ({p}) on B reached A's backend");
        }
    }
    f.stop(1);
    f.stop(0);
    let _ = std::fs::remove_dir_all(&certs);
}
