//! The admin API's view of the L7 tables: listing, flushing, status and their rendering,
//! over a real engine that has routed requests.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use arc_swap::ArcSwap;

use super::{metrics::KernelCounters, *};
use crate::{
    balancer::{Previous, assign_ids},
    config::Config,
    engine::Engine,
    proxy::{ConnInfo, ProxyStats, Router},
    state::{BackendState, L7Counters, L7Tables},
};

const CONFIG: &str = r#"{"interface":"eth0",
  "virtual_services":[
    {"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l7","pool":"web","persistence":"js"}],
  "pools":[{"name":"web","backends":[{"name":"a","address":"10.0.0.1"},{"name":"b","address":"10.0.0.2"}]}],
  "persistence_profiles":[{"name":"js","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":60,
                           "fallback":{"type":"client-ip","timeout_s":60,"ipv4_prefix":24}}]}"#;

/// A snapshot whose web service has an engine that routed: one client without a session
/// (bound through the fallback) and one session learned from backend `b`'s Set-Cookie.
fn lab() -> (Arc<Snapshot>, Arc<Engine>) {
    let cfg = Arc::new(Config::parse(CONFIG).unwrap_or_else(|e| panic!("test config: {e}")));
    let ids = assign_ids(&cfg, &Previous::default()).expect("ids");
    let mut snap = Snapshot::empty(cfg.clone(), UNIX_EPOCH + Duration::from_secs(100));
    snap.service_index = ids.services;
    snap.backend_ids = ids.backends;
    snap.backend_state = vec![vec![BackendState::Up; 2]];
    snap.health = vec![vec![None; 2]];
    let shared = Arc::new(ArcSwap::from_pointee(snap.clone()));
    let engine = Arc::new(Engine::new(&cfg, &cfg.services[0], shared).expect("engine"));
    let conn = |ip: &str| ConnInfo {
        client: SocketAddr::new(ip.parse().unwrap(), 40000),
        local: "192.0.2.10:80".parse().unwrap(),
        tls: false,
        alpn_h2: false,
        session: None,
    };
    let request = |uri: &str| http::Request::get(uri).body(()).unwrap().into_parts().0;
    // A client without a session: the fallback binds 198.51.100.0/24.
    let first = engine
        .route(&mut request("/"), &conn("198.51.100.7"), &[])
        .expect("routed");
    engine.finished(&first);
    // A session learned from backend b.
    let c = conn("203.0.113.5");
    let mut route = engine.route(&mut request("/"), &c, &[]).expect("routed");
    while route.backend != "10.0.0.2:80".parse().unwrap() {
        engine.finished(&route);
        route = engine.route(&mut request("/"), &c, &[]).expect("routed");
    }
    let mut resp = http::Response::builder()
        .header("set-cookie", "JSESSIONID=s1; Path=/")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    engine.on_response(&route, &c, &mut resp);
    engine.finished(&route);
    snap.l7 = vec![L7Counters {
        service: "web".into(),
        router: engine.stats.clone(),
        proxy: Arc::new(ProxyStats::default()),
        tables: engine.clone(),
        udp: None,
    }];
    (Arc::new(snap), engine)
}

fn filter(snap: &Snapshot, q: &str) -> persist::Filter {
    query::filter(snap, Some(q)).unwrap_or_else(|e| panic!("{q}: {e}"))
}

#[test]
fn persist_lists_l7_bindings_by_table_with_names() {
    let (snap, _engine) = lab();
    let (rows, truncated) = l7_rows(&snap, &persist::Filter::default(), MAX_PERSIST_ROWS);
    assert!(!truncated);
    let app: Vec<&api::L7Row> = rows.iter().filter(|r| r.table == "app-cookie").collect();
    assert_eq!(app.len(), 1, "{rows:?}");
    assert_eq!(app[0].backend.as_deref(), Some("b"));
    assert_eq!(app[0].backend_address, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(
        app[0].key_digest.as_deref().map(str::len),
        Some(32),
        "the key is shown as its digest"
    );
    assert_eq!(app[0].client, None);
    let fb: Vec<&api::L7Row> = rows.iter().filter(|r| r.table == "fallback").collect();
    assert!(
        fb.iter()
            .any(|r| r.client == Some("198.51.100.0".parse().unwrap())
                && r.prefix_len == Some(24)
                && !r.expired),
        "{rows:?}"
    );
    // A client filter finds the fallback binding of its /24 and no key binding.
    let (by_client, _) = l7_rows(&snap, &filter(&snap, "client=198.51.100.200"), 10);
    assert_eq!(by_client.len(), 1, "{by_client:?}");
    assert_eq!(by_client[0].table, "fallback");
    // A backend filter.
    let (on_b, _) = l7_rows(&snap, &filter(&snap, "backend=b"), 10);
    assert!(on_b.iter().all(|r| r.backend.as_deref() == Some("b")));
    assert!(on_b.iter().any(|r| r.table == "app-cookie"));
    // The cap.
    let (capped, truncated) = l7_rows(&snap, &persist::Filter::default(), 1);
    assert_eq!((capped.len(), truncated), (1, true));
    let text = cli::render_persist(&api::PersistList {
        entries: Vec::new(),
        truncated: false,
        l7: rows.clone(),
    });
    assert!(
        text.contains("app-cookie") && text.contains("b (10.0.0.2)"),
        "{text}"
    );
    assert!(text.contains("198.51.100.0/24"), "{text}");
    assert!(
        text.contains(&format!("{} L7 bindings", rows.len())),
        "{text}"
    );
}

#[test]
fn flush_removes_l7_bindings_by_client_and_backend() {
    let (snap, engine) = lab();
    let all = |e: &Engine| e.bindings(&crate::state::L7Filter::default()).len();
    let before = all(&engine);
    let (engines, f) = l7_targets(&snap, &filter(&snap, "client=198.51.100.9"));
    assert_eq!(engines.iter().map(|l| l.tables.flush(&f)).sum::<usize>(), 1);
    assert_eq!(all(&engine), before - 1);
    let (engines, f) = l7_targets(&snap, &filter(&snap, "service=web&backend=b"));
    let n: usize = engines.iter().map(|l| l.tables.flush(&f)).sum();
    assert!(n >= 1, "b's bindings flushed");
    assert!(
        engine
            .bindings(&crate::state::L7Filter::default())
            .iter()
            .all(|b| b.table != "app-cookie"),
        "the learned session is gone"
    );
    assert_eq!(
        cli::render_flush(&api::FlushReply {
            flushed: 0,
            l7_flushed: 1
        }),
        "flushed 0 persistence entries\nflushed 1 L7 binding\n"
    );
}

#[test]
fn status_shows_l7_counters_and_bound_clients() {
    let (snap, engine) = lab();
    let s = status::build(
        &snap,
        &KernelCounters::default(),
        None,
        UNIX_EPOCH + Duration::from_secs(200),
    );
    let web = &s.services[0];
    let l7 = web.l7.as_ref().expect("an l7 service has L7 status");
    assert_eq!(l7.counters["cookies_learned"], 1);
    assert_eq!(
        l7.counters["new_assignments"],
        engine
            .stats
            .new_assignments
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(l7.counters["rejected_tampered"], 0);
    assert_eq!(
        l7.entries,
        engine.bindings(&crate::state::L7Filter::default()).len() as u64
    );
    let bound: u64 = web.backends.iter().filter_map(|b| b.l7_bound_clients).sum();
    assert_eq!(
        bound, l7.entries,
        "every live binding counted on its backend"
    );
    let b = web.backends.iter().find(|b| b.name == "b").unwrap();
    assert!(b.l7_bound_clients >= Some(1), "the session on b");
    let out = cli::render_status(&s);
    assert!(out.contains("  l7: ") && out.contains("learned 1"), "{out}");
    assert!(out.contains("L7 BOUND"), "{out}");
}
