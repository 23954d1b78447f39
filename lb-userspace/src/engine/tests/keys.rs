//! The key-based methods (Kemp's hash methods, Avi's consistent hash, custom header).

use super::*;

/// A pool of `n` backends behind one l7 service with `profile` (named "p").
pub(super) fn key_config(n: usize, profile: &str) -> Arc<Config> {
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
        // Many clients (each within its new-key quota), a few keys each.
        let c = |k: usize| conn(&format!("198.51.100.{}", k % 200));
        let keys = 2000;
        let before: Vec<SocketAddr> = (0..keys)
            .map(|k| pick(&r, &c(k), &format!("/k/{k}"), &[]))
            .collect();
        let victim: SocketAddr = "10.0.1.4:8080".parse().unwrap();
        let mut st = [BackendState::Up; 10];
        st[3] = BackendState::Down;
        set_states(&snap, &st);
        let after: Vec<SocketAddr> = (0..keys)
            .map(|k| pick(&r, &c(k), &format!("/k/{k}"), &[]))
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

/// Client A binds a key, then client B sends `flood` fresh URLs; whether A's next request is
/// still honoured by its binding, and the service's (evictions, refused) counters.
fn flood_after_binding(profile: &str, flood: usize) -> (bool, u64, u64) {
    let cfg = key_config(10, profile);
    let r = router(&cfg, &shared(&cfg, &[BackendState::Up; 10]), 0);
    let a = conn("192.0.2.1");
    pick(&r, &a, "/mine", &[]);
    let b = conn("203.0.113.9");
    for k in 0..flood {
        pick(&r, &b, &format!("/flood/{k}"), &[]);
    }
    let hits = r.stats.persist_hits.load(Ordering::Relaxed);
    pick(&r, &a, "/mine", &[]);
    (
        r.stats.persist_hits.load(Ordering::Relaxed) == hits + 1,
        r.stats.table_evictions.load(Ordering::Relaxed),
        r.stats.keys_refused.load(Ordering::Relaxed),
    )
}

#[test]
fn one_source_flooding_new_keys_cannot_evict_another_clients_binding() {
    // No quota and a small table: the flood evicts A's binding, and evictions are counted.
    let (kept, evictions, refused) = flood_after_binding(
        r#"{"name":"p","type":"url-hash","table_capacity":64,"max_new_keys_per_source_per_min":0}"#,
        2000,
    );
    assert!(!kept, "without a quota the flood evicts A's binding");
    assert!(evictions > 0, "evictions counted");
    assert_eq!(refused, 0);
    // The same table with a quota of 10 new keys a minute: B stores 10, A keeps its binding.
    let (kept, evictions, refused) = flood_after_binding(
        r#"{"name":"p","type":"url-hash","table_capacity":1024,"max_new_keys_per_source_per_min":10}"#,
        2000,
    );
    assert!(kept, "A's binding survives the flood");
    assert_eq!(evictions, 0, "nothing evicted");
    assert_eq!(refused, 1990, "every key beyond the quota refused");
    // The default quota (1000) applies with no field given.
    let (kept, _, refused) =
        flood_after_binding(r#"{"name":"p","type":"url-hash","timeout_s":60}"#, 1500);
    assert!(kept);
    assert_eq!(refused, 500);
}

#[test]
fn keys_refused_by_the_quota_are_still_balanced_by_maglev() {
    // Two engines, one with a quota of one new key a minute: its refused keys land where
    // Maglev puts them, as the unlimited engine's new keys do.
    let limited = key_config(
        10,
        r#"{"name":"p","type":"url-hash","max_new_keys_per_source_per_min":1}"#,
    );
    let open = key_config(
        10,
        r#"{"name":"p","type":"url-hash","max_new_keys_per_source_per_min":0}"#,
    );
    let a = router(&limited, &shared(&limited, &[BackendState::Up; 10]), 0);
    let b = router(&open, &shared(&open, &[BackendState::Up; 10]), 0);
    let c = conn("192.0.2.1");
    for k in 0..200 {
        let uri = format!("/k/{k}");
        assert_eq!(pick(&a, &c, &uri, &[]), pick(&b, &c, &uri, &[]), "{uri}");
    }
    assert_eq!(a.stats.keys_refused.load(Ordering::Relaxed), 199);
    assert_eq!(b.stats.keys_refused.load(Ordering::Relaxed), 0);
}

#[test]
fn the_fallback_table_takes_the_profile_capacity_and_quota() {
    // IPv6 sources of one /64 are one client for the quota: the fallback stores 3 of them.
    let cfg = key_config(
        4,
        r#"{"name":"p","type":"query-item","item":"sid","max_new_keys_per_source_per_min":3,"fallback":{"type":"client-ip"}}"#,
    );
    let r = router(&cfg, &shared(&cfg, &[BackendState::Up; 4]), 0);
    for i in 0..10 {
        pick(&r, &conn(&format!("2001:db8:0:1::{i:x}")), "/", &[]);
    }
    assert_eq!(r.stats.keys_refused.load(Ordering::Relaxed), 7);
}

#[test]
fn client_ip_bindings_of_one_ipv6_64_are_one_source_for_the_quota() {
    let cfg = key_config(
        3,
        r#"{"name":"p","type":"client-ip","max_new_keys_per_source_per_min":4}"#,
    );
    let r = router(&cfg, &shared(&cfg, &[BackendState::Up; 3]), 0);
    for i in 1..=50 {
        pick(&r, &conn(&format!("2001:db8:7:7::{i:x}")), "/", &[]);
    }
    assert_eq!(r.stats.keys_refused.load(Ordering::Relaxed), 46);
    // The four stored ones keep their backends; another /64 is not held back.
    let hits = r.stats.persist_hits.load(Ordering::Relaxed);
    for i in 1..=4 {
        pick(&r, &conn(&format!("2001:db8:7:7::{i:x}")), "/", &[]);
    }
    assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), hits + 4);
    pick(&r, &conn("2001:db8:7:8::1"), "/", &[]);
    assert_eq!(r.stats.keys_refused.load(Ordering::Relaxed), 46);
}
