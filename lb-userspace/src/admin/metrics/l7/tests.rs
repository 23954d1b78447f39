//! The per-method lines and the status figures, over a real engine that routed requests.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use arc_swap::ArcSwap;

use crate::{
    admin::{cli, metrics, status},
    balancer::{Previous, assign_ids},
    config::Config,
    engine::Engine,
    proxy::{ConnInfo, ProxyStats, Route, Router},
    state::{BackendState, L7Counters, Snapshot},
};

const CONFIG: &str = r#"{"interface":"eth0",
  "virtual_services":[
    {"name":"shop","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l7","pool":"shop","persistence":"ck"}],
  "pools":[{"name":"shop","backends":[{"name":"x","address":"10.0.0.1"},{"name":"y","address":"10.0.0.2"}]}],
  "persistence_profiles":[{"name":"ck","type":"http-cookie","cookie_name":"srv","table_capacity":64,
    "keys":[{"id":1,"secret":"9f3c1e7a5b2d4f6081a3c5e7f9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a1c3e5b7"}],
    "fallback":{"type":"client-ip","timeout_s":60}}]}"#;

struct Lab {
    shared: Arc<ArcSwap<Snapshot>>,
    engine: Arc<Engine>,
}

impl Lab {
    fn new() -> Lab {
        let cfg = Arc::new(Config::parse(CONFIG).unwrap_or_else(|e| panic!("test config: {e}")));
        let ids = assign_ids(&cfg, &Previous::default()).expect("ids");
        let mut snap = Snapshot::empty(cfg.clone(), UNIX_EPOCH + Duration::from_secs(100));
        snap.service_index = ids.services;
        snap.backend_ids = ids.backends;
        snap.backend_state = vec![vec![BackendState::Up; 2]];
        snap.health = vec![vec![None; 2]];
        snap.generation = 1;
        let shared = Arc::new(ArcSwap::from_pointee(snap));
        let engine = Arc::new(Engine::new(&cfg, &cfg.services[0], shared.clone()).expect("engine"));
        let mut snap = (**shared.load()).clone();
        snap.l7 = vec![L7Counters {
            service: "shop".into(),
            router: engine.stats.clone(),
            proxy: Arc::new(ProxyStats::default()),
            tables: engine.clone(),
            udp: None,
        }];
        shared.store(Arc::new(snap));
        Lab { shared, engine }
    }

    /// One request from `client` with `cookie` (a `Cookie` header value); the route and the
    /// persistence cookie the response set, if any.
    fn request(&self, client: &str, cookie: Option<&str>) -> (Route, Option<String>) {
        let conn = ConnInfo {
            client: SocketAddr::new(client.parse().unwrap(), 40000),
            local: "192.0.2.10:80".parse().unwrap(),
            tls: false,
            alpn_h2: false,
            session: None,
        };
        let mut req = http::Request::get("/");
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let mut parts = req.body(()).unwrap().into_parts().0;
        let route = self.engine.route(&mut parts, &conn, &[]).expect("routed");
        let mut resp = http::Response::builder().body(()).unwrap().into_parts().0;
        self.engine.on_response(&route, &conn, &mut resp);
        self.engine.finished(&route);
        let set = resp
            .headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string());
        (route, set)
    }

    fn set_down(&self, backend: usize) {
        let mut snap = (**self.shared.load()).clone();
        snap.backend_state[0][backend] = BackendState::Down;
        snap.generation += 1;
        self.shared.store(Arc::new(snap));
    }

    fn metrics(&self) -> String {
        metrics::render(
            &self.shared.load(),
            &metrics::KernelCounters::default(),
            None,
        )
    }
}

fn line(text: &str, prefix: &str) -> u64 {
    let l = text
        .lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no line {prefix}:\n{text}"));
    l[prefix.len() + 1..]
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {l}"))
}

/// Client A: new (balanced to x), then back with its cookie (a hit on x). Client B with a
/// tampered cookie: counted by reason, new on y. x goes down: A's cookie is moved off x.
fn routed() -> Lab {
    let lab = Lab::new();
    let (first, cookie) = lab.request("198.51.100.1", None);
    assert_eq!(
        first.backend,
        "10.0.0.1:80".parse().unwrap(),
        "round robin starts at x"
    );
    let cookie = cookie.expect("a new client gets the cookie");
    let (again, _) = lab.request("198.51.100.1", Some(&cookie));
    assert_eq!(again.backend, first.backend, "the cookie keeps A on x");
    let (b, _) = lab.request(
        "198.51.100.2",
        Some("srv=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    );
    assert_eq!(b.backend, "10.0.0.2:80".parse().unwrap());
    lab.set_down(0);
    let (moved, _) = lab.request("198.51.100.1", Some(&cookie));
    assert_eq!(
        moved.backend,
        "10.0.0.2:80".parse().unwrap(),
        "moved off the down x"
    );
    lab
}

#[test]
fn per_method_lines_count_each_decision_by_service_method_and_backend() {
    let lab = routed();
    let m = lab.metrics();
    let svc = r#"{service="shop",method="http-cookie"}"#;
    assert_eq!(
        line(&m, &format!("tether_l7_persistence_hits_total{svc}")),
        1
    );
    assert_eq!(
        line(
            &m,
            &format!("tether_l7_persistence_new_bindings_total{svc}")
        ),
        3
    );
    assert_eq!(
        line(&m, &format!("tether_l7_persistence_expirations_total{svc}")),
        0
    );
    assert_eq!(
        line(
            &m,
            &format!("tether_l7_persistence_table_evictions_total{svc}")
        ),
        0
    );
    let invalid = |reason: &str| {
        line(
            &m,
            &format!(
                r#"tether_l7_persistence_invalid_cookies_total{{service="shop",method="http-cookie",reason="{reason}"}}"#
            ),
        )
    };
    let rejected: u64 = [
        "malformed",
        "unknown_key",
        "foreign_service",
        "tampered",
        "expired",
    ]
    .iter()
    .map(|r| invalid(r))
    .sum();
    assert_eq!(
        rejected, 1,
        "B's cookie, counted once under one reason:\n{m}"
    );
    assert_eq!(invalid("expired"), 0);
    let be = |b: &str, extra: &str| {
        format!(r#"{{service="shop",method="http-cookie",pool="shop",backend="{b}"{extra}}}"#)
    };
    let req = |b: &str, d: &str| {
        line(
            &m,
            &format!(
                "tether_l7_backend_requests_total{}",
                be(b, &format!(r#",decision="{d}""#))
            ),
        )
    };
    assert_eq!(
        (req("x", "hit"), req("x", "new")),
        (1, 1),
        "A's two requests on x"
    );
    assert_eq!(
        (req("y", "hit"), req("y", "new")),
        (0, 2),
        "B, then A moved"
    );
    assert_eq!(
        line(
            &m,
            &format!("tether_l7_backend_reassigned_down_total{}", be("x", ""))
        ),
        1
    );
    assert_eq!(
        line(
            &m,
            &format!("tether_l7_backend_reassigned_down_total{}", be("y", ""))
        ),
        0
    );
    // The fallback table: A (bound on its first, cookieless request) on x, B on y.
    assert_eq!(
        line(
            &m,
            &format!("tether_l7_backend_bound_clients{}", be("x", ""))
        ),
        1
    );
    assert_eq!(
        line(
            &m,
            &format!("tether_l7_backend_bound_clients{}", be("y", ""))
        ),
        1
    );
    let table = r#"{service="shop",method="http-cookie",table="fallback"}"#;
    assert_eq!(
        line(&m, &format!("tether_l7_persistence_table_entries{table}")),
        2
    );
    assert_eq!(
        line(&m, &format!("tether_l7_persistence_table_capacity{table}")),
        64
    );
    // Every family is declared once, before its lines.
    for fam in [
        "tether_l7_persistence_hits_total",
        "tether_l7_persistence_invalid_cookies_total",
        "tether_l7_persistence_table_entries",
        "tether_l7_backend_requests_total",
        "tether_l7_backend_bound_clients",
    ] {
        assert_eq!(m.matches(&format!("# TYPE {fam} ")).count(), 1, "{fam}");
    }
    // The existing per-service lines keep their format.
    assert_eq!(
        line(&m, r#"tether_l7_persist_hits_total{service="shop"}"#),
        1
    );
    assert_eq!(
        line(&m, r#"tether_l7_reassigned_down_total{service="shop"}"#),
        1
    );
}

#[test]
fn status_shows_the_method_tables_and_each_backends_decisions() {
    let lab = routed();
    let s = status::build(
        &lab.shared.load(),
        &metrics::KernelCounters::default(),
        None,
        UNIX_EPOCH + Duration::from_secs(200),
    );
    let shop = &s.services[0];
    let l7 = shop.l7.as_ref().expect("L7 status");
    assert_eq!(l7.method, "http-cookie");
    assert_eq!(l7.tables.len(), 1);
    assert_eq!(
        (
            l7.tables[0].table.as_str(),
            l7.tables[0].entries,
            l7.tables[0].capacity
        ),
        ("fallback", 2, 64)
    );
    let x = shop.backends.iter().find(|b| b.name == "x").unwrap();
    let xl7 = x.l7.expect("per-backend L7 figures");
    assert_eq!(
        (xl7.hits, xl7.new_assignments, xl7.reassigned_down),
        (1, 1, 1)
    );
    let out = cli::render_status(&s);
    assert!(
        out.contains("  l7 method http-cookie: requests 0  hits 1  new 3  hit ratio 25.0%  expired 0  reassigned (backend down) 1"),
        "{out}"
    );
    assert!(out.contains("  l7 table size: fallback 2/64\n"), "{out}");
    assert!(out.contains("  l7 invalid cookies: 1 ("), "{out}");
    let words = |name: &str| {
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&name))
            .unwrap_or_else(|| panic!("no row {name}:\n{out}"))
    };
    // ... L7 BOUND, L7 HITS, L7 NEW, L7 MOVED OFF, HEALTH (no monitor).
    assert_eq!(
        words("x")[words("x").len() - 5..],
        ["1", "1", "1", "1", "-"],
        "{out}"
    );
    assert_eq!(
        words("y")[words("y").len() - 5..],
        ["1", "0", "2", "0", "-"],
        "{out}"
    );
}
