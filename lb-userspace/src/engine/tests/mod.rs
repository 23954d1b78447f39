use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use http::{StatusCode, header};
use lb_common::backend_identity;

use super::*;
use crate::{
    balancer::{Previous, assign_ids},
    cookie::{CookieKeys, CookiePayload, Reject},
    state::{SharedSnapshot, Snapshot},
};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const KEY_NEW: &str = "0202020202020202020202020202020202020202020202020202020202020202";
const KEY_OLD: &str = "0101010101010101010101010101010101010101010101010101010101010101";

fn config(profile: &str) -> Arc<Config> {
    Arc::new(
        Config::parse(&format!(
            r#"{{"interface":"lo",
            "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}},
                                {{"name":"other","vip":"127.0.0.1","port":8081,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}}],
            "pools":[{{"name":"web","backends":[{{"name":"b1","address":"10.0.0.1"}},{{"name":"b2","address":"10.0.0.2"}},{{"name":"b3","address":"10.0.0.3"}}]}}],
            "persistence_profiles":[{profile}]}}"#
        ))
        .expect("valid test config"),
    )
}

fn shared(cfg: &Arc<Config>, states: &[BackendState]) -> SharedSnapshot {
    let ids = assign_ids(cfg, &Previous::default()).unwrap();
    let mut s = Snapshot::empty(cfg.clone(), SystemTime::now());
    s.service_index = ids.services;
    s.backend_ids = ids.backends;
    s.backend_state = vec![states.to_vec()];
    s.health = vec![vec![None; states.len()]];
    Arc::new(ArcSwap::from_pointee(s))
}

fn set_states(snap: &SharedSnapshot, states: &[BackendState]) {
    let mut s = (**snap.load()).clone();
    s.backend_state = vec![states.to_vec()];
    s.generation += 1;
    snap.store(Arc::new(s));
}

const UP: [BackendState; 3] = [BackendState::Up; 3];

fn conn(ip: &str) -> ConnInfo {
    ConnInfo {
        client: SocketAddr::new(ip.parse().unwrap(), 40000),
        local: "127.0.0.1:8080".parse().unwrap(),
        tls: false,
        alpn_h2: false,
        session: None,
    }
}

fn request(uri: &str, cookie: Option<&str>) -> http::request::Parts {
    let mut b = http::Request::builder().uri(uri);
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    b.body(()).unwrap().into_parts().0
}

fn response(set_cookie: Option<&str>) -> http::response::Parts {
    let mut b = http::Response::builder().status(200);
    if let Some(c) = set_cookie {
        b = b.header(header::SET_COOKIE, c);
    }
    b.body(()).unwrap().into_parts().0
}

/// One exchange: the backend chosen, the request as forwarded, Set-Cookie values added.
fn exchange(
    r: &Engine,
    c: &ConnInfo,
    uri: &str,
    cookie: Option<&str>,
    backend_sets: Option<&str>,
) -> (SocketAddr, http::request::Parts, Vec<String>) {
    let mut req = request(uri, cookie);
    let route = r.route(&mut req, c, &[]).expect("routed");
    let mut resp = response(backend_sets);
    r.on_response(&route, c, &mut resp);
    let set: Vec<String> = resp
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    (route.backend, req, set)
}

fn srv(set: &[String]) -> String {
    let v = set
        .iter()
        .find(|s| s.starts_with("SRV="))
        .expect("a SRV cookie was set");
    v.split(';').next().unwrap().to_string()
}

fn rejected(r: &Engine, reason: Reject) -> u64 {
    r.stats.rejected[Reject::ALL.iter().position(|x| *x == reason).unwrap()].load(Ordering::Relaxed)
}

fn cookie_profile(extra: &str) -> String {
    format!(
        r#"{{"name":"p","type":"http-cookie","cookie_name":"SRV","keys":[{{"id":2,"secret":"{KEY_NEW}"}},{{"id":1,"secret":"{KEY_OLD}"}}]{extra}}}"#
    )
}

fn router(cfg: &Arc<Config>, snap: &SharedSnapshot, svc: usize) -> Engine {
    Engine::new(cfg, &cfg.services[svc], snap.clone()).expect("router")
}

#[test]
fn active_cookie_is_issued_then_honoured_and_stripped() {
    let cfg = config(&cookie_profile(""));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    let (first, _, set) = exchange(&r, &c, "/", None, None);
    let cookie = srv(&set);
    assert!(
        set[0].contains("HttpOnly")
            && set[0].contains("SameSite=Lax")
            && !set[0].contains("Secure"),
        "{}",
        set[0]
    );
    assert!(
        !cookie.contains("10.0.0."),
        "the cookie must not reveal the backend address"
    );
    for i in 0..100 {
        let (b, fwd, set) = exchange(&r, &c, "/", Some(&format!("a=1; {cookie}; z=2")), None);
        assert_eq!(b, first, "request {i} left its backend");
        assert!(set.is_empty(), "no Set-Cookie while the cookie is valid");
        assert_eq!(
            fwd.headers.get(header::COOKIE).unwrap(),
            "a=1; z=2",
            "the persistence cookie is stripped"
        );
    }
    assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 100);
    assert_eq!(r.stats.cookies_issued.load(Ordering::Relaxed), 1);
    // Without cookies, new clients spread over all backends (round robin).
    let seen: std::collections::HashSet<SocketAddr> = (0..9)
        .map(|_| exchange(&r, &c, "/", None, None).0)
        .collect();
    assert_eq!(seen.len(), 3);
}

#[test]
fn bad_cookies_count_as_absent_by_reason_and_are_reissued() {
    let cfg = config(&cookie_profile(""));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let other = router(&cfg, &snap, 1);
    let c = conn("192.0.2.1");
    let good = srv(&exchange(&r, &c, "/", None, None).2);
    let (name, value) = good.split_once('=').unwrap();
    let mut bytes = value.as_bytes().to_vec();
    bytes[40] = if bytes[40] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{name}={}", String::from_utf8(bytes).unwrap());
    assert_eq!(
        srv(&exchange(&r, &c, "/", Some(&tampered), None).2).len(),
        good.len(),
        "tampered: re-issued"
    );
    assert_eq!(rejected(&r, Reject::Tampered), 1);
    // A cookie web issued, presented to the other service.
    assert!(
        !exchange(&other, &c, "/", Some(&good), None).2.is_empty(),
        "foreign: re-issued"
    );
    assert_eq!(rejected(&other, Reject::ForeignService), 1);
    exchange(&r, &c, "/", Some("SRV=garbage"), None);
    assert_eq!(rejected(&r, Reject::Malformed), 1);
    // Expired: a cookie issued long ago with a 10-minute lifetime.
    let keys = CookieKeys::from_config(&[(2u8, KEY_NEW)]).unwrap();
    let id = backend_identity("web", "b1");
    let old = cookie::encode(
        &keys,
        "SRV",
        "web",
        &CookiePayload::issue(id, cookie::pool_id("web"), 1_000, Some(600)),
    );
    assert!(
        !exchange(&r, &c, "/", Some(&format!("SRV={old}")), None)
            .2
            .is_empty()
    );
    assert_eq!(rejected(&r, Reject::Expired), 1);
}

#[test]
fn rotated_keys_keep_old_cookies_valid() {
    let cfg = config(&cookie_profile(""));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let old_keys = CookieKeys::from_config(&[(1u8, KEY_OLD)]).unwrap();
    let id = backend_identity("web", "b3");
    let v = cookie::encode(
        &old_keys,
        "SRV",
        "web",
        &CookiePayload::issue(id, cookie::pool_id("web"), unix_now(), None),
    );
    let (b, _, set) = exchange(&r, &conn("192.0.2.9"), "/", Some(&format!("SRV={v}")), None);
    assert_eq!(b, "10.0.0.3:8080".parse().unwrap());
    assert!(set.is_empty(), "an old-key cookie is still valid");
}

#[test]
fn down_backend_moves_with_immediate_and_refuses_with_never() {
    for policy in ["immediate", "never"] {
        let cfg = Arc::new(Config::parse(&policy_config(policy)).expect("valid"));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let (first, _, set) = exchange(&r, &c, "/", None, None);
        assert!(set[0].contains("Max-Age=600"), "{}", set[0]);
        let cookie = srv(&set);
        let i = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
            .iter()
            .position(|a| a.parse::<SocketAddr>().unwrap() == first)
            .unwrap();
        let mut states = UP;
        states[i] = BackendState::Down;
        set_states(&snap, &states);
        let mut req = request("/", Some(&cookie));
        let got = r.route(&mut req, &c, &[]);
        if policy == "immediate" {
            let route = got.expect("moved");
            assert_ne!(route.backend, first);
            let mut resp = response(None);
            r.on_response(&route, &c, &mut resp);
            assert!(
                resp.headers.get(header::SET_COOKIE).is_some(),
                "the moved client gets a new cookie"
            );
            assert_eq!(r.stats.reassigned_down.load(Ordering::Relaxed), 1);
        } else {
            assert_eq!(got.unwrap_err(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.stats.refused_down.load(Ordering::Relaxed), 1);
            set_states(&snap, &UP);
            assert_eq!(
                exchange(&r, &c, "/", Some(&cookie), None).0,
                first,
                "back on its backend once it recovers"
            );
        }
    }
}

/// One service with a 10-minute cookie and the given down policy.
fn policy_config(policy: &str) -> String {
    format!(
        r#"{{"interface":"lo",
        "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}}],
        "pools":[{{"name":"web","backends":[{{"name":"b1","address":"10.0.0.1"}},{{"name":"b2","address":"10.0.0.2"}},{{"name":"b3","address":"10.0.0.3"}}]}}],
        "persistence_profiles":[{{"name":"p","type":"http-cookie","cookie_name":"SRV","max_lifetime_min":10,"select_new_server_when_down":"{policy}","keys":[{{"id":2,"secret":"{KEY_NEW}"}}]}}]}}"#
    )
}

#[test]
fn draining_keeps_bound_clients_and_takes_no_new_ones() {
    let cfg = config(&cookie_profile(""));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    let bound: Vec<(SocketAddr, String)> = (0..3)
        .map(|_| {
            let (b, _, set) = exchange(&r, &c, "/", None, None);
            (b, srv(&set))
        })
        .collect();
    set_states(
        &snap,
        &[BackendState::Draining, BackendState::Up, BackendState::Up],
    );
    let drained: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    let (_, ck) = bound
        .iter()
        .find(|(b, _)| *b == drained)
        .expect("one client on b1");
    assert_eq!(
        exchange(&r, &c, "/", Some(ck), None).0,
        drained,
        "a bound client stays on a draining backend"
    );
    for _ in 0..30 {
        assert_ne!(
            exchange(&r, &c, "/", None, None).0,
            drained,
            "no new client on a draining backend"
        );
    }
}

#[test]
fn app_cookie_is_learned_and_found_in_cookie_query_and_path() {
    let cfg =
        config(r#"{"name":"p","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":60}"#);
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    let (b, _, _) = exchange(
        &r,
        &c,
        "/login",
        None,
        Some("JSESSIONID=abc123; Path=/; HttpOnly"),
    );
    assert_eq!(r.stats.cookies_learned.load(Ordering::Relaxed), 1);
    for (uri, cookie) in [
        ("/x", Some("JSESSIONID=abc123")),
        ("/x?a=1&JSESSIONID=abc123", None),
        ("/app;JSESSIONID=abc123/x", None),
    ] {
        for _ in 0..10 {
            assert_eq!(
                exchange(&r, &conn("198.51.100.7"), uri, cookie, None).0,
                b,
                "{uri} {cookie:?}"
            );
        }
    }
    assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 30);
}

#[test]
fn app_cookie_names_in_the_url_match_in_any_case_and_the_cookie_exactly() {
    let cfg =
        config(r#"{"name":"p","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":60}"#);
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let (b, _, _) = exchange(
        &r,
        &conn("192.0.2.1"),
        "/login",
        None,
        Some("JSESSIONID=abc123; Path=/"),
    );
    // Servlet containers write the path parameter in lower case.
    for uri in [
        "/app;jsessionid=abc123/x",
        "/x;JSessionId=abc123",
        "/x?jsessionid=abc123",
    ] {
        for i in 0..10 {
            assert_eq!(
                exchange(&r, &conn(&format!("198.51.100.{}", i + 1)), uri, None, None).0,
                b,
                "{uri}"
            );
        }
    }
    assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 30);
    // A cookie's name is case-sensitive (RFC 6265): `jsessionid` is another cookie.
    let spread: std::collections::HashSet<SocketAddr> = (0..9)
        .map(|_| exchange(&r, &conn("192.0.2.1"), "/", Some("jsessionid=abc123"), None).0)
        .collect();
    assert_eq!(spread.len(), 3, "balanced as without a session");
}

#[test]
fn source_ip_fallback_engages_when_cookies_are_refused() {
    let cfg = config(&cookie_profile(
        r#","fallback":{"type":"client-ip","timeout_s":60}"#,
    ));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.44");
    let (first, _, _) = exchange(&r, &c, "/", None, None);
    for _ in 0..20 {
        // The client never returns the cookie.
        assert_eq!(exchange(&r, &c, "/", None, None).0, first);
    }
    assert_eq!(r.stats.fallback_hits.load(Ordering::Relaxed), 20);
    // Another address is balanced on its own.
    let others: std::collections::HashSet<SocketAddr> = (1..=12)
        .map(|i| exchange(&r, &conn(&format!("192.0.2.{i}")), "/", None, None).0)
        .collect();
    assert!(others.len() > 1);
}

#[test]
fn client_ip_sticks_and_a_failed_backend_is_not_retried() {
    let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let c = conn("203.0.113.5");
    let (first, _, _) = exchange(&r, &c, "/", None, None);
    for _ in 0..50 {
        assert_eq!(exchange(&r, &c, "/", None, None).0, first);
    }
    let mut req = request("/", None);
    let retry = r.route(&mut req, &c, &[first]).expect("another backend");
    assert_ne!(retry.backend, first);
    set_states(&snap, &[BackendState::Down; 3]);
    assert_eq!(
        r.route(&mut request("/", None), &conn("203.0.113.99"), &[])
            .unwrap_err(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn least_connections_counts_requests_until_they_finish() {
    let cfg = Arc::new(
        Config::parse(
            r#"{"interface":"lo",
            "virtual_services":[{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web"}],
            "pools":[{"name":"web","algorithm":"least-connections","backends":[{"name":"b1","address":"10.0.0.1"},{"name":"b2","address":"10.0.0.2"}]}]}"#,
        )
        .unwrap(),
    );
    let snap = shared(&cfg, &[BackendState::Up; 2]);
    let r = Engine::new(&cfg, &cfg.services[0], snap).unwrap();
    let c = conn("192.0.2.1");
    // One long request holds a backend.
    let long = r.route(&mut request("/", None), &c, &[]).unwrap();
    for i in 0..10 {
        let short = r.route(&mut request("/", None), &c, &[]).unwrap();
        assert_ne!(
            short.backend, long.backend,
            "request {i} went to the busy backend"
        );
        r.finished(&short);
    }
    r.finished(&long);
}

#[test]
fn a_retry_after_a_connect_failure_still_sees_the_stripped_cookie() {
    for policy in ["immediate", "never"] {
        let cfg = Arc::new(Config::parse(&policy_config(policy)).expect("valid"));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let (first, _, set) = exchange(&r, &c, "/", None, None);
        let cookie = srv(&set);
        // The proxy's first attempt strips the cookie, then the backend refuses the
        // connection and the same request is routed again with `tried`.
        let mut req = request("/", Some(&format!("{cookie}; other=1")));
        let a = r.route(&mut req, &c, &[]).expect("first attempt");
        assert_eq!(a.backend, first);
        assert_eq!(req.headers.get(header::COOKIE).unwrap(), "other=1");
        r.finished(&a);
        let retry = r.route(&mut req, &c, &[first]);
        if policy == "never" {
            assert_eq!(
                retry.unwrap_err(),
                StatusCode::SERVICE_UNAVAILABLE,
                "never: the client waits for its server"
            );
            assert_eq!(r.stats.refused_down.load(Ordering::Relaxed), 1);
        } else {
            let b = retry.expect("moved");
            assert_ne!(b.backend, first);
            assert_eq!(
                r.stats.reassigned_down.load(Ordering::Relaxed),
                1,
                "counted as a move, not a new client"
            );
            assert_eq!(
                r.stats.new_assignments.load(Ordering::Relaxed),
                2,
                "the first client plus this move"
            );
            let mut resp = response(None);
            r.on_response(&b, &c, &mut resp);
            assert!(
                resp.headers.get(header::SET_COOKIE).is_some(),
                "the moved client gets a cookie for its new server"
            );
        }
    }
}

mod cookies;
mod inputs;
mod keys;
mod remote;
mod saved;
