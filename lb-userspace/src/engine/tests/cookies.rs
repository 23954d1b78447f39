//! The http-cookie method against hostile or unusual clients: several cookies of the same
//! name, shared caches, old session cookies replayed.

use super::*;

/// A cookie for backend `b` of pool "web" issued `age` seconds ago, sealed with the
/// profile's current key.
fn issued(b: &str, age: u64, lifetime: Option<u64>) -> String {
    let keys = CookieKeys::from_config(&[(2u8, KEY_NEW)]).unwrap();
    let payload = CookiePayload::issue(
        backend_identity("web", b),
        cookie::pool_id("web"),
        unix_now() - age,
        lifetime,
    );
    cookie::encode(&keys, "SRV", "web", &payload)
}

#[test]
fn the_first_cookie_that_authenticates_wins_among_several_of_the_name() {
    let cfg = config(&cookie_profile(""));
    let r = router(&cfg, &shared(&cfg, &UP), 0);
    let c = conn("192.0.2.1");
    let b3 = issued("b3", 10, None);
    let b1 = issued("b1", 10, None);
    let mut tampered = b1.clone().into_bytes();
    tampered[40] = if tampered[40] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let at = |i: usize| -> SocketAddr { format!("10.0.0.{i}:8080").parse().unwrap() };

    // A planted or stale cookie in front does not hide the valid one behind it.
    let (b, fwd, set) = exchange(
        &r,
        &c,
        "/",
        Some(&format!("SRV=garbage; a=1; SRV={tampered}; SRV={b3}")),
        None,
    );
    assert_eq!(b, at(3), "the valid cookie behind two bad ones decides");
    assert!(
        set.is_empty(),
        "nothing re-issued: the client has a valid one"
    );
    assert_eq!(
        fwd.headers.get(header::COOKIE).unwrap(),
        "a=1",
        "all stripped"
    );
    assert_eq!(
        rejected(&r, Reject::Malformed),
        0,
        "a decided request counts no reject"
    );
    assert_eq!(rejected(&r, Reject::Tampered), 0);
    // Two valid ones: the first wins.
    let (b, _, _) = exchange(&r, &c, "/", Some(&format!("SRV={b3}; SRV={b1}")), None);
    assert_eq!(b, at(3));
    let (b, _, _) = exchange(&r, &c, "/", Some(&format!("SRV={b1}; SRV={b3}")), None);
    assert_eq!(b, at(1));
    // None valid: the first one's reason is counted, once, and a cookie is issued.
    let (_, _, set) = exchange(
        &r,
        &c,
        "/",
        Some(&format!("SRV={tampered}; SRV=garbage")),
        None,
    );
    assert_eq!(set.len(), 1);
    assert_eq!(rejected(&r, Reject::Tampered), 1);
    assert_eq!(rejected(&r, Reject::Malformed), 0);
}

/// One exchange whose backend's response carries `cache_control` values; the response's
/// Set-Cookie and Cache-Control values after the engine.
fn cached(r: &Engine, cookie: Option<&str>, cache_control: &[&str]) -> (usize, Vec<String>) {
    let c = conn("192.0.2.1");
    let mut req = request("/", cookie);
    let route = r.route(&mut req, &c, &[]).expect("routed");
    let mut b = http::Response::builder().status(200);
    for v in cache_control {
        b = b.header(header::CACHE_CONTROL, *v);
    }
    let mut resp = b.body(()).unwrap().into_parts().0;
    r.on_response(&route, &c, &mut resp);
    let all = |h| {
        resp.headers
            .get_all(h)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    (all(header::SET_COOKIE).len(), all(header::CACHE_CONTROL))
}

#[test]
fn responses_setting_the_cookie_are_private_to_caches() {
    let cfg = config(&cookie_profile(""));
    let r = router(&cfg, &shared(&cfg, &UP), 0);
    assert_eq!(cached(&r, None, &[]), (1, vec!["private".to_string()]));
    assert_eq!(
        cached(&r, None, &["public, max-age=60", "s-maxage=30"]),
        (1, vec!["private, max-age=60, s-maxage=30".to_string()]),
        "public dropped, private added, the rest kept"
    );
    for kept in ["no-store", "private, max-age=5", "no-cache=\"Set-Cookie\""] {
        assert_eq!(
            cached(&r, None, &[kept]),
            (1, vec![kept.to_string()]),
            "already private to shared caches"
        );
    }
    // A response that sets no cookie is left alone.
    let valid = format!("SRV={}", issued("b2", 10, None));
    assert_eq!(
        cached(&r, Some(&valid), &["public, max-age=60"]),
        (0, vec!["public, max-age=60".to_string()])
    );
    assert_eq!(cached(&r, Some(&valid), &[]), (0, vec![]));
}

#[test]
fn old_session_cookies_stop_pinning_after_the_server_side_max_age() {
    let c = conn("192.0.2.1");
    let b3: SocketAddr = "10.0.0.3:8080".parse().unwrap();
    // Default: 24 h.
    let cfg = config(&cookie_profile(""));
    let r = router(&cfg, &shared(&cfg, &UP), 0);
    let (b, _, set) = exchange(
        &r,
        &c,
        "/",
        Some(&format!("SRV={}", issued("b3", 86_000, None))),
        None,
    );
    assert_eq!(
        (b, set.len()),
        (b3, 0),
        "a day-old-less session cookie pins"
    );
    let (_, _, set) = exchange(
        &r,
        &c,
        "/",
        Some(&format!("SRV={}", issued("b3", 86_401, None))),
        None,
    );
    assert_eq!(set.len(), 1, "older than 24 h: re-issued");
    assert_eq!(rejected(&r, Reject::Expired), 1);
    assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 1);

    // Configured.
    let cfg = config(&cookie_profile(r#","session_max_age_s":600"#));
    let r = router(&cfg, &shared(&cfg, &UP), 0);
    let (b, _, set) = exchange(
        &r,
        &c,
        "/",
        Some(&format!("SRV={}", issued("b3", 500, None))),
        None,
    );
    assert_eq!((b, set.len()), (b3, 0));
    let (_, _, set) = exchange(
        &r,
        &c,
        "/",
        Some(&format!("SRV={}", issued("b3", 700, None))),
        None,
    );
    assert_eq!(set.len(), 1);
    assert_eq!(rejected(&r, Reject::Expired), 1);

    // A cookie with a lifetime keeps its own expiry (not the session maximum).
    let cfg = config(&cookie_profile(r#","max_lifetime_min":720"#));
    let r = router(&cfg, &shared(&cfg, &UP), 0);
    let v = issued("b3", 40_000, Some(43_200));
    let (b, _, set) = exchange(&r, &c, "/", Some(&format!("SRV={v}")), None);
    assert_eq!((b, set.len()), (b3, 0));
}

#[test]
fn fresh_app_cookies_past_the_quota_are_not_learned() {
    let cfg = config(
        r#"{"name":"p","type":"app-cookie","cookie_name":"JSESSIONID","max_new_keys_per_source_per_min":5}"#,
    );
    let r = router(&cfg, &shared(&cfg, &UP), 0);
    let c = conn("192.0.2.1");
    for n in 0..20 {
        exchange(
            &r,
            &c,
            "/login",
            None,
            Some(&format!("JSESSIONID=s{n}; Path=/")),
        );
    }
    assert_eq!(r.stats.cookies_learned.load(Ordering::Relaxed), 5);
    assert_eq!(r.stats.keys_refused.load(Ordering::Relaxed), 15);
    // A session the backend sets again (already known) is refreshed, not refused.
    exchange(
        &r,
        &c,
        "/x",
        Some("JSESSIONID=s0"),
        Some("JSESSIONID=s0; Path=/"),
    );
    assert_eq!(r.stats.keys_refused.load(Ordering::Relaxed), 15);
    assert_eq!(r.stats.cookies_learned.load(Ordering::Relaxed), 6);
    // Another client's sessions are learned.
    exchange(
        &r,
        &conn("192.0.2.2"),
        "/login",
        None,
        Some("JSESSIONID=other; Path=/"),
    );
    assert_eq!(r.stats.cookies_learned.load(Ordering::Relaxed), 7);
}
