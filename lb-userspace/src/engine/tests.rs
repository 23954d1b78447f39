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

/// A pool of `n` backends behind one l7 service with `profile` (named "p").
fn key_config(n: usize, profile: &str) -> Arc<Config> {
    let backends: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name":"b{i}","address":"10.0.1.{}","header_value":"tenant-{i}"}}"#,
                i + 1
            )
        })
        .collect();
    Arc::new(
        Config::parse(&format!(
            r#"{{"interface":"lo",
            "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}}],
            "pools":[{{"name":"web","backends":[{}]}}],
            "persistence_profiles":[{profile}]}}"#,
            backends.join(",")
        ))
        .unwrap_or_else(|e| panic!("test config: {e}")),
    )
}

fn req_with(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn pick(r: &Engine, c: &ConnInfo, uri: &str, headers: &[(&str, &str)]) -> SocketAddr {
    let mut req = req_with(uri, headers);
    let route = r.route(&mut req, c, &[]).expect("routed");
    r.finished(&route);
    route.backend
}

/// (profile, request for key i) for every key-based method.
/// Builds the request (URI, headers) that carries key number `i`.
type KeyedRequest = Box<dyn Fn(usize) -> (String, Vec<(String, String)>)>;

fn key_methods() -> Vec<(&'static str, KeyedRequest)> {
    vec![
        (
            r#"{"name":"p","type":"all-cookies","timeout_s":60}"#,
            Box::new(|i| ("/".into(), vec![("cookie".into(), format!("a={i}; b=x"))])),
        ),
        (
            r#"{"name":"p","type":"super-http","timeout_s":60}"#,
            Box::new(|i| {
                (
                    "/".into(),
                    vec![("user-agent".into(), format!("Browser/{i}"))],
                )
            }),
        ),
        (
            r#"{"name":"p","type":"url-hash","timeout_s":60}"#,
            Box::new(|i| (format!("/page/{i}?x=1"), vec![])),
        ),
        (
            r#"{"name":"p","type":"host-header","timeout_s":60}"#,
            Box::new(|i| {
                (
                    "/".into(),
                    vec![("host".into(), format!("site{i}.example"))],
                )
            }),
        ),
        (
            r#"{"name":"p","type":"query-item","item":"sid","timeout_s":60}"#,
            Box::new(|i| (format!("/x?a=1&sid={i}"), vec![])),
        ),
        (
            r#"{"name":"p","type":"header","item":"X-Session","timeout_s":60}"#,
            Box::new(|i| ("/".into(), vec![("x-session".into(), format!("s{i}"))])),
        ),
        (
            r#"{"name":"p","type":"consistent-hash","hash_key":"url"}"#,
            Box::new(|i| (format!("/c/{i}"), vec![])),
        ),
    ]
}

fn headers_of(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn every_key_method_sticks_per_key_and_spreads_keys() {
    for (profile, make) in key_methods() {
        let cfg = key_config(3, profile);
        let snap = shared(&cfg, &[BackendState::Up; 3]);
        let r = router(&cfg, &snap, 0);
        let (uri, h) = make(7);
        let first = pick(&r, &conn("192.0.2.1"), &uri, &headers_of(&h));
        for i in 0..100 {
            // Other connections and addresses: the key alone decides.
            let c = conn(&format!("198.51.100.{}", i % 200 + 1));
            assert_eq!(
                pick(&r, &c, &uri, &headers_of(&h)),
                first,
                "{profile}: request {i}"
            );
        }
        let spread: std::collections::HashSet<SocketAddr> = (0..60)
            .map(|k| {
                let (uri, h) = make(1000 + k);
                pick(&r, &conn("192.0.2.1"), &uri, &headers_of(&h))
            })
            .collect();
        assert_eq!(
            spread.len(),
            3,
            "{profile}: 60 keys should reach all 3 backends"
        );
    }
}

#[test]
fn super_http_msrpc_rule_in_both_branches() {
    let cfg = key_config(5, r#"{"name":"p","type":"super-http","timeout_s":60}"#);
    let snap = shared(&cfg, &[BackendState::Up; 5]);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    // MSRPC with Authorization: the Authorization value is the key, whatever the UA says.
    let by_auth: std::collections::HashSet<SocketAddr> = (0..20)
        .map(|i| {
            pick(
                &r,
                &c,
                "/",
                &[
                    ("user-agent", &format!("MSRPC client {i}")),
                    ("authorization", "Basic dXNlcjE="),
                ],
            )
        })
        .collect();
    assert_eq!(by_auth.len(), 1, "same Authorization, one backend");
    let auths: std::collections::HashSet<SocketAddr> = (0..40)
        .map(|i| {
            pick(
                &r,
                &c,
                "/",
                &[
                    ("user-agent", "MSRPC"),
                    ("authorization", &format!("Basic {i}")),
                ],
            )
        })
        .collect();
    assert!(auths.len() > 1, "different Authorization values spread");
    // MSRPC without Authorization: a blank key, so all such clients share one backend.
    let blank: std::collections::HashSet<SocketAddr> = (0..20)
        .map(|i| {
            pick(
                &r,
                &conn(&format!("198.51.100.{}", i + 1)),
                "/",
                &[("user-agent", &format!("x MSRPC {i}"))],
            )
        })
        .collect();
    assert_eq!(blank.len(), 1);
    // Without MSRPC the Authorization header is ignored: the UA is the key.
    let ua: std::collections::HashSet<SocketAddr> = (0..20)
        .map(|i| {
            pick(
                &r,
                &c,
                "/",
                &[
                    ("user-agent", "Mozilla/5.0"),
                    ("authorization", &format!("{i}")),
                ],
            )
        })
        .collect();
    assert_eq!(ua.len(), 1);
    // "Super HTTP and source IP": the same UA from different addresses spreads.
    let cfg = key_config(
        5,
        r#"{"name":"p","type":"super-http","with_source_ip":true,"timeout_s":60}"#,
    );
    let snap = shared(&cfg, &[BackendState::Up; 5]);
    let r = router(&cfg, &snap, 0);
    let per_ip: std::collections::HashSet<SocketAddr> = (0..40)
        .map(|i| {
            pick(
                &r,
                &conn(&format!("198.51.100.{}", i + 1)),
                "/",
                &[("user-agent", "Mozilla/5.0")],
            )
        })
        .collect();
    assert!(per_ip.len() > 1);
    // The key is User-Agent and address alone: a second instance, whose table has never
    // seen these clients, sends each (address, User-Agent) where the first one did.
    let other = router(&cfg, &shared(&cfg, &[BackendState::Up; 5]), 0);
    for i in 0..40 {
        let c = conn(&format!("198.51.100.{}", i + 1));
        assert_eq!(
            pick(&other, &c, "/", &[("user-agent", "Mozilla/5.0")]),
            pick(&r, &c, "/", &[("user-agent", "Mozilla/5.0")]),
            "client {c:?}: the instances disagree"
        );
    }
}

#[test]
fn missing_key_falls_back_to_the_pool_or_the_source_address() {
    let cfg = key_config(
        3,
        r#"{"name":"p","type":"query-item","item":"sid","timeout_s":60}"#,
    );
    let snap = shared(&cfg, &[BackendState::Up; 3]);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    let no_key: std::collections::HashSet<SocketAddr> =
        (0..9).map(|_| pick(&r, &c, "/x?other=1", &[])).collect();
    assert_eq!(no_key.len(), 3, "without the item: round robin");
    let cfg = key_config(
        3,
        r#"{"name":"p","type":"all-cookies","timeout_s":60,"fallback":{"type":"client-ip","timeout_s":60}}"#,
    );
    let snap = shared(&cfg, &[BackendState::Up; 3]);
    let r = router(&cfg, &snap, 0);
    let first = pick(&r, &c, "/", &[]);
    for _ in 0..20 {
        assert_eq!(
            pick(&r, &c, "/", &[]),
            first,
            "no cookies: the source address decides"
        );
    }
    assert_eq!(r.stats.fallback_hits.load(Ordering::Relaxed), 20);
}

#[test]
fn two_instances_agree_on_every_key() {
    let cfg = key_config(
        7,
        r#"{"name":"p","type":"header","item":"X-User","timeout_s":60}"#,
    );
    let a = router(&cfg, &shared(&cfg, &[BackendState::Up; 7]), 0);
    let b = router(&cfg, &shared(&cfg, &[BackendState::Up; 7]), 0);
    for k in 0..300 {
        let v = format!("user-{k}");
        assert_eq!(
            pick(&a, &conn("192.0.2.1"), "/", &[("x-user", &v)]),
            pick(&b, &conn("203.0.113.9"), "/", &[("x-user", &v)]),
            "key {v}"
        );
    }
}

#[test]
fn removing_one_of_ten_moves_about_a_tenth_and_nothing_bound_elsewhere() {
    for profile in [
        r#"{"name":"p","type":"consistent-hash","hash_key":"url"}"#,
        r#"{"name":"p","type":"url-hash","timeout_s":600}"#,
    ] {
        let cfg = key_config(10, profile);
        let snap = shared(&cfg, &[BackendState::Up; 10]);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let keys = 2000;
        let before: Vec<SocketAddr> = (0..keys)
            .map(|k| pick(&r, &c, &format!("/k/{k}"), &[]))
            .collect();
        let victim: SocketAddr = "10.0.1.4:8080".parse().unwrap();
        let mut st = [BackendState::Up; 10];
        st[3] = BackendState::Down;
        set_states(&snap, &st);
        let after: Vec<SocketAddr> = (0..keys)
            .map(|k| pick(&r, &c, &format!("/k/{k}"), &[]))
            .collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let on_victim = before.iter().filter(|b| **b == victim).count();
        let extra = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && **b != victim)
            .count();
        if profile.contains("consistent-hash") {
            // Maglev alone: besides the victim's keys, a small disruption (< 2% of keys).
            assert!(
                extra * 50 < keys,
                "{profile}: {extra} keys on surviving backends moved"
            );
        } else {
            // With the table on top, a key bound to a surviving backend never moves.
            assert_eq!(extra, 0, "{profile}: a key on a surviving backend moved");
            assert_eq!(
                moved, on_victim,
                "{profile}: exactly the victim's keys move"
            );
        }
        let pct = moved as f64 * 100.0 / keys as f64;
        assert!((5.0..15.0).contains(&pct), "{profile}: {pct:.1}% moved");
        assert!(after.iter().all(|a| *a != victim));
    }
}

#[test]
fn sticky_entries_survive_a_backend_set_change_until_they_expire() {
    let cfg = key_config(
        3,
        r#"{"name":"p","type":"header","item":"X-User","timeout_s":1}"#,
    );
    let snap = shared(&cfg, &[BackendState::Up; 3]);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    let first = pick(&r, &c, "/", &[("x-user", "alice")]);
    let i = (first
        .ip()
        .to_string()
        .rsplit('.')
        .next()
        .unwrap()
        .parse::<usize>()
        .unwrap())
        - 1;
    let mut st = [BackendState::Up; 3];
    st[i] = BackendState::Draining;
    set_states(&snap, &st);
    assert_eq!(
        pick(&r, &c, "/", &[("x-user", "alice")]),
        first,
        "a live key keeps its draining backend"
    );
    std::thread::sleep(Duration::from_millis(1300));
    assert_ne!(
        pick(&r, &c, "/", &[("x-user", "alice")]),
        first,
        "after the timeout the key is balanced anew"
    );
    assert_eq!(r.stats.expired.load(Ordering::Relaxed), 1);
}

#[test]
fn custom_header_maps_to_the_backend_with_that_value() {
    let cfg = key_config(
        4,
        r#"{"name":"p","type":"custom-header","item":"X-Tenant"}"#,
    );
    let snap = shared(&cfg, &[BackendState::Up; 4]);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    for _ in 0..100 {
        assert_eq!(
            pick(&r, &c, "/", &[("x-tenant", "tenant-2")]),
            "10.0.1.3:8080".parse().unwrap()
        );
    }
    let others: std::collections::HashSet<SocketAddr> = (0..8)
        .map(|_| pick(&r, &c, "/", &[("x-tenant", "nobody")]))
        .collect();
    assert_eq!(others.len(), 4, "unmatched values are balanced normally");
    // A value longer than any backend's is no match either: balanced over all four.
    let huge = "v".repeat(100_000);
    let spread: std::collections::HashSet<SocketAddr> = (0..8)
        .map(|_| pick(&r, &c, "/", &[("x-tenant", &huge)]))
        .collect();
    assert_eq!(
        spread.len(),
        4,
        "a huge unmatched value is balanced normally"
    );
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

/// A method keyed on what a TLS client or a SIP message names: the SNI, or the Call-ID (as
/// the TLS and SIP methods of later work will be), sticky in a table of its own.
struct Named {
    table: table::Table<u128>,
}

impl Method for Named {
    fn kind(&self) -> &'static str {
        "test-named"
    }

    fn lookup(
        &self,
        input: &mut Input<'_>,
        _: &crate::config::Pool,
        cx: &Context<'_>,
    ) -> methods::Lookup {
        let Some(k) = input
            .sni()
            .map(str::as_bytes)
            .or(input.sip_header("call-id"))
        else {
            return methods::Lookup {
                binding: None,
                key: Key::Missing,
            };
        };
        let k = k.to_vec();
        methods::Lookup {
            binding: self
                .table
                .get(&table::digest(&k), cx.now)
                .ok()
                .map(Binding::Identity),
            key: Key::Hash(k),
        }
    }

    fn record(&self, _: &Input<'_>, l: &methods::Lookup, identity: u32, cx: &Context<'_>) {
        if let Key::Hash(k) = &l.key {
            self.table.insert(table::digest(k), identity, cx.now);
        }
    }
}

fn named_engine(cfg: &Arc<Config>, snap: &SharedSnapshot) -> Engine {
    let method = Named {
        table: table::Table::new(1024, Duration::from_secs(60)),
    };
    Engine::with_method(cfg, &cfg.services[0], snap.clone(), Some(Box::new(method)))
}

#[test]
fn a_method_keyed_on_sni_or_a_sip_header_works_through_the_engine() {
    let cfg = key_config(5, r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let snap = shared(&cfg, &[BackendState::Up; 5]);
    let e = named_engine(&cfg, &snap);
    let other = named_engine(&cfg, &shared(&cfg, &[BackendState::Up; 5]));
    let client = |i: usize| -> SocketAddr { format!("198.51.100.{}:5060", i + 1).parse().unwrap() };
    // TLS: the server name decides, whoever the client is, on either instance.
    let hello = |sni: &str| input::ClientHello {
        sni: Some(sni.to_string()),
        ..Default::default()
    };
    let a = hello("a.example");
    let first = e.decide(&mut Input::tls_hello(&a, client(0)), &[]).unwrap();
    for i in 1..30 {
        let c = e.decide(&mut Input::tls_hello(&a, client(i)), &[]).unwrap();
        assert_eq!(c.backend, first.backend, "SNI a.example from client {i}");
        assert!(c.decision.by_method, "bound by the method's table");
    }
    assert_eq!(
        other
            .decide(&mut Input::tls_hello(&a, client(7)), &[])
            .unwrap()
            .backend,
        first.backend,
        "a second instance places the name where the first did"
    );
    let names: std::collections::HashSet<SocketAddr> = (0..60)
        .map(|i| {
            let h = hello(&format!("site{i}.example"));
            e.decide(&mut Input::tls_hello(&h, client(0)), &[])
                .unwrap()
                .backend
        })
        .collect();
    assert_eq!(names.len(), 5, "60 names reach all 5 backends");
    // SIP: the Call-ID (full or compact header name) decides.
    let invite = |call_id: &str, compact: bool| {
        let name = if compact { "i" } else { "Call-ID" };
        input::SipMessage::parse(
            format!("INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9\r\n{name}: {call_id}\r\nCSeq: 1 INVITE\r\n\r\nv=0\r\n")
                .as_bytes(),
        )
        .expect("a SIP head")
    };
    let call = invite("abc@10.0.0.9", false);
    let to = e
        .decide(&mut Input::sip(&call, client(3)), &[])
        .unwrap()
        .backend;
    for (i, compact) in [(4, true), (9, false), (20, true)] {
        let m = invite("abc@10.0.0.9", compact);
        assert_eq!(
            e.decide(&mut Input::sip(&m, client(i)), &[])
                .unwrap()
                .backend,
            to,
            "the same call from client {i}"
        );
    }
    // An input with neither is balanced by the pool's algorithm.
    let bare = input::ClientHello::default();
    let spread: std::collections::HashSet<SocketAddr> = (0..10)
        .map(|i| {
            e.decide(&mut Input::tls_hello(&bare, client(i)), &[])
                .unwrap()
                .backend
        })
        .collect();
    assert_eq!(spread.len(), 5);
    // The engine's policy applies to these inputs too: the bound backend down, a move.
    let i = (1..=5)
        .position(|n| first.backend == format!("10.0.1.{n}:8080").parse().unwrap())
        .unwrap();
    let mut st = [BackendState::Up; 5];
    st[i] = BackendState::Down;
    set_states(&snap, &st);
    let moved = e.decide(&mut Input::tls_hello(&a, client(0)), &[]).unwrap();
    assert_ne!(moved.backend, first.backend);
    assert_eq!(e.stats.reassigned_down.load(Ordering::Relaxed), 1);
}

#[test]
fn bindings_follow_backend_identity_when_a_reload_reorders_the_pool() {
    let cfg = config(&cookie_profile(""));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    let mut bound = std::collections::HashMap::new();
    for _ in 0..3 {
        let (b, _, set) = exchange(&r, &c, "/", None, None);
        bound.insert(b, srv(&set));
    }
    assert_eq!(bound.len(), 3);
    // Reload: the same backends listed in reverse order (indexes change, identities not).
    let mut reordered = (*cfg).clone();
    reordered.pools[0].backends.reverse();
    let mut s = (**snap.load()).clone();
    s.config = Arc::new(reordered);
    s.generation += 1;
    snap.store(Arc::new(s));
    for (backend, cookie) in &bound {
        assert_eq!(
            exchange(&r, &c, "/", Some(cookie), None).0,
            *backend,
            "a cookie follows its backend to its new index"
        );
    }
}

#[test]
fn sip_heads_parse_with_compact_names() {
    let m = input::SipMessage::parse(b"REGISTER sip:x SIP/2.0\r\ni: 42@h\r\nf: <sip:a@b>\r\n\r\n")
        .expect("parsed");
    assert_eq!(m.start_line, "REGISTER sip:x SIP/2.0");
    assert_eq!(m.header("Call-ID"), Some(&b"42@h"[..]));
    assert_eq!(m.header("from"), Some(&b"<sip:a@b>"[..]));
    assert_eq!(m.header("To"), None);
    assert_eq!(
        input::SipMessage::parse(b"INVITE x\r\nno colon\r\n\r\n"),
        None
    );
    assert_eq!(input::SipMessage::parse(b""), None);
}
