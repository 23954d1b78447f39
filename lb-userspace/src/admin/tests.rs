use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use lb_common::{MAP_BACKEND_STATS, MAP_SERVICE_STATS, TrafficCounters, event, reason};

use super::{
    metrics::{KernelCounters, TableFacts},
    *,
};
use crate::{
    config::Config,
    dataplane::persist_table::testpins::TestPins,
    state::{BackendState, Health},
};

const CONFIG: &str = r#"{"interface":"eth0",
  "virtual_services":[
    {"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web","persistence":"p"},
    {"name":"dns","vip":"2001:db8::53","port":53,"protocol":"udp","mode":"l4-dsr","pool":"dns"}],
  "pools":[
    {"name":"web","backends":[{"name":"a","address":"10.0.0.1"},{"name":"b","address":"10.0.0.2","weight":3},
                              {"name":"c","address":"10.0.0.3","admin_state":"draining"}]},
    {"name":"dns","backends":[{"name":"d","address":"2001:db8::1"}]},
    {"name":"alt","backends":[{"name":"a","address":"10.0.9.1"}]}],
  "persistence_profiles":[{"name":"p","type":"client-ip","timeout_s":60,"ipv4_prefix":24,"ipv6_prefix":48,
                           "select_new_server_when_down":"never"}]}"#;

fn snapshot(pin_dir: PathBuf) -> Snapshot {
    let mut cfg = Config::parse(CONFIG).unwrap_or_else(|e| panic!("test config: {e}"));
    cfg.pin_dir = pin_dir;
    Snapshot {
        config: Arc::new(cfg),
        service_index: vec![0, 1],
        backend_ids: vec![vec![0, 1, 2], vec![3], vec![4]],
        backend_state: vec![
            vec![BackendState::Up, BackendState::Down, BackendState::Draining],
            vec![BackendState::Up],
            vec![BackendState::Disabled],
        ],
        health: vec![
            vec![
                Some(Health {
                    up: true,
                    detail: String::new(),
                    since: UNIX_EPOCH + Duration::from_secs(900),
                }),
                Some(Health {
                    up: false,
                    detail: "connect: connection refused".into(),
                    since: UNIX_EPOCH + Duration::from_secs(1000),
                }),
                None,
            ],
            vec![None],
            vec![None],
        ],
        xdp_mode: "native",
        generation: 7,
        started: UNIX_EPOCH + Duration::from_secs(100),
        l7: Vec::new(),
    }
}

fn tc(packets: u64) -> TrafficCounters {
    TrafficCounters {
        packets,
        bytes: packets * 100,
        persist_hits: packets / 2,
        new_assignments: 3,
        expired: 2,
        reassigned_down: 1,
        no_backend: 4,
        flow_hits: 0,
    }
}

fn counters() -> KernelCounters {
    let mut c = KernelCounters::default();
    c.services.insert(0, tc(100));
    c.services.insert(1, tc(10));
    c.backends.insert(0, tc(60));
    c.backends.insert(1, tc(40));
    c.reasons[reason::TX as usize] = 110;
    c.reasons[reason::PASS_NOT_VIP as usize] = 5;
    c.events[event::BINDING_CREATED as usize] = 30;
    c.events[event::USER_DELETED as usize] = 6;
    c.events[event::BINDING_RATE_LIMITED as usize] = 4;
    c.events[event::BINDING_EVENT_DROPPED as usize] = 7;
    c.table = TableFacts {
        capacity: 1 << 20,
        possible_cpus: 4,
        new_bindings_per_cpu_s: 4096,
    };
    c
}

fn census() -> Census {
    Census {
        entries: 9,
        live: HashMap::from([((0, 0), 5), ((0, 1), 2), ((1, 3), 1)]),
    }
}

#[test]
fn metrics_exact_lines() {
    let snap = snapshot(PathBuf::from("/sys/fs/bpf/unused"));
    let text = metrics::render(&snap, &counters(), Some(&census()));
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "# HELP tether_service_packets_total Packets forwarded to a backend of the virtual service.",
        "# TYPE tether_service_packets_total counter",
        r#"tether_service_packets_total{service="web",vip="192.0.2.10",port="80",protocol="tcp"} 100"#,
        r#"tether_service_bytes_total{service="web",vip="192.0.2.10",port="80",protocol="tcp"} 10000"#,
        r#"tether_service_persist_hits_total{service="web",vip="192.0.2.10",port="80",protocol="tcp"} 50"#,
        r#"tether_service_new_assignments_total{service="dns",vip="2001:db8::53",port="53",protocol="udp"} 3"#,
        r#"tether_service_expired_total{service="web",vip="192.0.2.10",port="80",protocol="tcp"} 2"#,
        r#"tether_service_reassigned_down_total{service="web",vip="192.0.2.10",port="80",protocol="tcp"} 1"#,
        r#"tether_service_no_backend_total{service="web",vip="192.0.2.10",port="80",protocol="tcp"} 4"#,
        "# TYPE tether_xdp_events_total counter",
        "tether_xdp_events_total{event=\"binding_rate_limited\"} 4",
        "tether_xdp_events_total{event=\"binding_event_dropped\"} 7",
        "# TYPE tether_backend_packets_total counter",
        r#"tether_backend_packets_total{pool="web",backend="a",address="10.0.0.1"} 60"#,
        r#"tether_backend_bytes_total{pool="web",backend="b",address="10.0.0.2"} 4000"#,
        r#"tether_backend_packets_total{pool="alt",backend="a",address="10.0.9.1"} 0"#,
        "# TYPE tether_backend_up gauge",
        r#"tether_backend_up{pool="web",backend="a",address="10.0.0.1"} 1"#,
        r#"tether_backend_up{pool="web",backend="b",address="10.0.0.2"} 0"#,
        r#"tether_backend_up{pool="web",backend="c",address="10.0.0.3"} 0"#,
        "# TYPE tether_backend_state gauge",
        r#"tether_backend_state{pool="web",backend="b",address="10.0.0.2",state="up"} 0"#,
        r#"tether_backend_state{pool="web",backend="b",address="10.0.0.2",state="down"} 1"#,
        r#"tether_backend_state{pool="web",backend="c",address="10.0.0.3",state="draining"} 1"#,
        r#"tether_backend_state{pool="alt",backend="a",address="10.0.9.1",state="disabled"} 1"#,
        r#"tether_backend_weight{pool="web",backend="b",address="10.0.0.2"} 3"#,
        "# TYPE tether_backend_bound_clients gauge",
        r#"tether_backend_bound_clients{pool="web",backend="a",address="10.0.0.1"} 5"#,
        r#"tether_backend_bound_clients{pool="dns",backend="d",address="2001:db8::1"} 1"#,
        r#"tether_backend_bound_clients{pool="web",backend="c",address="10.0.0.3"} 0"#,
        "# TYPE tether_xdp_packets_total counter",
        r#"tether_xdp_packets_total{reason="tx"} 110"#,
        r#"tether_xdp_packets_total{reason="pass_not_vip"} 5"#,
        r#"tether_xdp_packets_total{reason="aborted"} 0"#,
        "# TYPE tether_config_generation gauge",
        "tether_config_generation 7",
        "# TYPE tether_persist_entries gauge",
        "tether_persist_entries 9",
    ] {
        assert!(lines.contains(&want), "missing line {want:?} in:\n{text}");
    }
    // Every sample follows the HELP and TYPE of its family, each family declared once.
    let mut declared = Vec::new();
    let mut current = "";
    for l in &lines {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or_default();
            assert!(!declared.contains(&name), "family {name} declared twice");
            declared.push(name);
            current = name;
        } else if !l.starts_with("# HELP ") {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            assert_eq!(name, current, "sample outside its family: {l}");
        }
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("tether_backend_state{"))
            .count(),
        5 * 4,
        "four states per backend"
    );

    let without = metrics::render(&snap, &counters(), None);
    assert!(
        !without.contains("bound_clients"),
        "no census, no bound clients"
    );
    assert!(!without.contains("tether_persist_entries"));
}

#[test]
fn label_escaping() {
    assert_eq!(metrics::escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
    assert_eq!(metrics::escape_label("x\ny"), r"x\ny");
    assert_eq!(metrics::escape_label("2001:db8::1"), "2001:db8::1");
}

#[test]
fn status_json_shape() {
    let snap = snapshot(PathBuf::from("/sys/fs/bpf/unused"));
    let now = UNIX_EPOCH + Duration::from_secs(160);
    let s = status::build(&snap, &counters(), Some(&census()), now);
    let v = serde_json::to_value(&s).expect("serializes");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"))
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&v),
        [
            "generation",
            "persist_entries",
            "persist_table",
            "reasons",
            "services",
            "uptime_s",
            "xdp_mode"
        ]
    );
    // 30 created, 9 in the table, 6 deleted by tether: 15 evicted.
    let t = &v["persist_table"];
    assert_eq!(
        (
            &t["capacity"],
            &t["per_cpu_capacity"],
            &t["new_bindings_per_cpu_s"],
            &t["bindings_rate_limited"],
            &t["binding_events_dropped"],
            &t["evictions_estimate"]
        ),
        (
            &serde_json::json!(1 << 20),
            &serde_json::json!(1 << 18),
            &serde_json::json!(4096),
            &serde_json::json!(4),
            &serde_json::json!(7),
            &serde_json::json!(15)
        )
    );
    assert_eq!(v["generation"], 7);
    assert_eq!(v["uptime_s"], 60);
    assert_eq!(v["xdp_mode"], "native");
    assert_eq!(v["persist_entries"], 9);
    assert_eq!(v["reasons"]["tx"], 110);
    assert_eq!(
        v["reasons"].as_object().map(|o| o.len()),
        Some(reason::COUNT as usize)
    );
    let web = &v["services"][0];
    assert_eq!(
        keys(web),
        [
            "backends",
            "counters",
            "name",
            "persistence",
            "pool",
            "port",
            "protocol",
            "vip"
        ]
    );
    assert_eq!(
        (
            &web["name"],
            &web["vip"],
            &web["port"],
            &web["protocol"],
            &web["pool"]
        ),
        (
            &"web".into(),
            &"192.0.2.10".into(),
            &80.into(),
            &"tcp".into(),
            &"web".into()
        )
    );
    assert_eq!(
        web["persistence"],
        serde_json::json!({"profile":"p","timeout_s":60,"ipv4_prefix":24,"ipv6_prefix":48,"policy":"never"})
    );
    assert_eq!(
        web["counters"],
        serde_json::json!({"packets":100,"bytes":10000,"persist_hits":50,"new_assignments":3,
                           "expired":2,"reassigned_down":1,"no_backend":4})
    );
    let b = &web["backends"][1];
    assert_eq!(
        keys(b),
        [
            "address",
            "admin_state",
            "bound_clients",
            "counters",
            "health",
            "id",
            "name",
            "state",
            "weight"
        ]
    );
    assert_eq!(
        (
            &b["name"],
            &b["state"],
            &b["admin_state"],
            &b["weight"],
            &b["bound_clients"]
        ),
        (
            &"b".into(),
            &"down".into(),
            &"enabled".into(),
            &3.into(),
            &2.into()
        )
    );
    assert_eq!(
        b["health"],
        serde_json::json!({"up":false,"detail":"connect: connection refused","since_unix":1000})
    );
    assert_eq!(web["backends"][2]["admin_state"], "draining");
    assert!(web["backends"][2]["health"].is_null());
    let dns = &v["services"][1];
    assert!(dns["persistence"].is_null());
    assert_eq!(dns["backends"][0]["bound_clients"], 1);
    assert_eq!(dns["backends"][0]["address"], "2001:db8::1");
    // The CLI reads what the server writes.
    let back: api::Status = serde_json::from_value(v).expect("deserializes");
    assert_eq!(back, s);
    let no_census =
        serde_json::to_value(status::build(&snap, &counters(), None, now)).expect("serializes");
    assert!(no_census["persist_entries"].is_null());
    assert!(no_census["services"][0]["backends"][0]["bound_clients"].is_null());
}

#[test]
fn query_parsing() {
    let snap = snapshot(PathBuf::from("/sys/fs/bpf/unused"));
    let f = |q: &str| query::filter(&snap, Some(q));
    let err = |q: &str| f(q).expect_err(q).0;
    assert_eq!(query::filter(&snap, None), Ok(persist::Filter::default()));
    assert_eq!(f(""), Ok(persist::Filter::default()));
    let ok = f("service=dns&client=2001%3Adb8%3A%3A7&backend=d").expect("valid");
    assert_eq!(
        ok,
        persist::Filter {
            service_index: Some(1),
            client: Some("2001:db8::7".parse().expect("addr")),
            backend_id: Some(3),
        }
    );
    assert_eq!(
        f("client=10.0.0.7").expect("v4").client,
        Some(IpAddr::from([10, 0, 0, 7]))
    );
    assert_eq!(f("backend=web%2Fa").expect("pool/name").backend_id, Some(0));
    assert_eq!(f("backend=alt/a").expect("pool/name").backend_id, Some(4));
    assert_eq!(
        f("service=web&backend=a").expect("in pool").backend_id,
        Some(0)
    );
    assert_eq!(f("backend=b").expect("unique").backend_id, Some(1));

    assert!(
        err("service=nope").starts_with("service: "),
        "{}",
        err("service=nope")
    );
    assert!(err("backend=zz").starts_with("backend: "));
    assert!(
        err("service=dns&backend=a").contains("pool \"dns\""),
        "{}",
        err("service=dns&backend=a")
    );
    let amb = err("backend=a");
    assert!(amb.contains("several pools (web, alt)"), "{amb}");
    assert!(err("client=10.0.0.300").starts_with("client: "));
    assert!(err("client=").starts_with("client: empty"));
    assert!(err("service=web&service=dns").contains("more than once"));
    assert!(err("pool=web").contains("unknown parameter \"pool\""));
    assert!(err("client=%zz").starts_with("client: malformed"));
    assert_eq!(query::percent_decode("a+b%3A"), Some("a b:".into()));
    assert_eq!(query::percent_encode("2001:db8::1"), "2001%3Adb8%3A%3A1");
}

#[test]
fn cli_rendering_and_http_parsing() {
    let snap = snapshot(PathBuf::from("/sys/fs/bpf/unused"));
    let s = status::build(
        &snap,
        &counters(),
        Some(&census()),
        UNIX_EPOCH + Duration::from_secs(3_823),
    );
    let out = cli::render_status(&s);
    assert!(
        out.starts_with("tether: generation 7, native XDP, up 1h02m03s, 9 persistence entries"),
        "{out}"
    );
    assert!(
        out.contains("mirroring: 7 new XDP bindings not sent to the mirror (ring buffer full)"),
        "{out}"
    );
    assert!(out.contains("service web  192.0.2.10:80/tcp  pool web  persistence p (60s, /24 /48, when down: never)"), "{out}");
    assert!(
        out.contains("service dns  [2001:db8::53]:53/udp  pool dns  no persistence"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == [
                "b", "10.0.0.2", "down", "3", "2", "40", "3.9", "KiB", "20", "3", "2", "1"
            ]),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            .split_whitespace()
            .take(3)
            .eq(["c", "10.0.0.3", "draining"])),
        "{out}"
    );
    assert!(
        out.contains("b: health check failing: connect: connection refused"),
        "{out}"
    );
    assert!(out.contains("forwarded: 110 (tx 110, redirect 0)"), "{out}");
    assert!(out.contains("  pass_not_vip  5"), "{out}");
    assert!(!out.contains("aborted"), "zero reasons are left out: {out}");

    assert_eq!(cli::duration(7), "7s");
    assert_eq!(cli::duration(245), "4m05s");
    assert_eq!(cli::duration(90_061), "1d01h01m");
    assert_eq!(cli::bytes(512), "512 B");
    assert_eq!(cli::bytes(1536), "1.5 KiB");

    let r = cli::parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcdef").expect("cl");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
    let r = cli::parse_response(
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .expect("chunked");
    assert_eq!((r.status, r.body.as_slice()), (400, &b"abcde"[..]));
    assert!(cli::parse_response(b"garbage").is_err());
}

// ---- End to end: serve over real pins ----

struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

/// The bearer token of the test servers.
const TOKEN: &str = "0123456789abcdef0123456789abcdef-test";

fn tcp_endpoint(addr: SocketAddr) -> cli::Endpoint {
    cli::Endpoint::Tcp {
        addr,
        token: TOKEN.into(),
    }
}

async fn send(addr: SocketAddr, method: &str, path: &str) -> Reply {
    send_with(
        addr,
        method,
        path,
        &[
            ("host", &addr.to_string()),
            ("authorization", &format!("Bearer {TOKEN}")),
        ],
    )
    .await
}

async fn send_with(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).expect("request");
    let resp = tx
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
    }
}

fn parse<T: serde::de::DeserializeOwned>(r: &Reply) -> T {
    assert_eq!(r.status, 200, "body: {}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

/// Whole seconds of CLOCK_MONOTONIC, the clock bindings' ages are measured on.
fn mono_s() -> u64 {
    crate::dataplane::persist_table::monotonic_ns().expect("clock") / 1_000_000_000
}

fn setup_pins() -> TestPins {
    let mut pins = TestPins::new("admin");
    let ip = |s: &str| s.parse::<IpAddr>().expect("addr");
    pins.add_service(ip("192.0.2.10"), 80, 0, 24, 48, 60);
    pins.add_service(ip("2001:db8::53"), 53, 1, 32, 128, 0);
    pins.bind(0, ip("10.0.0.0"), 0, 3);
    pins.bind(0, ip("10.0.1.0"), 0, 1);
    pins.bind(0, ip("10.0.2.0"), 1, 10);
    pins.bind(0, ip("10.0.3.0"), 1, 500); // expired
    pins.bind(0, ip("2001:db8:5::"), 2, 2);
    pins.set_counters(MAP_SERVICE_STATS, 0, tc(70), tc(30));
    pins.set_counters(MAP_BACKEND_STATS, 0, tc(50), TrafficCounters::default());
    pins.set_counters(MAP_BACKEND_STATS, 1, tc(20), tc(10));
    pins.set_reason(reason::TX, 100);
    pins.set_reason(reason::MALFORMED_L4, 3);
    pins
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_end_to_end() {
    // IPv4 bindings keep their last-seen time in whole seconds, so an age read back is the
    // bound age plus the second boundaries crossed since binding: the clock read before
    // binding and after each read bounds that exactly, whatever the machine's load.
    let bound_at = mono_s();
    let ages = |age: u64| age..=age + (mono_s() - bound_at);
    let pins = setup_pins();
    let shared: SharedSnapshot = Arc::new(ArcSwap::from_pointee(snapshot(pins.dir.clone())));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(
        Listeners {
            tcp: Some((listener, Access::new(addr, TOKEN.into()))),
            unix: None,
        },
        Arc::clone(&shared),
        None,
        stop_rx,
    ));

    // /metrics
    let m = send(addr, "GET", "/metrics").await;
    assert_eq!(m.status, 200, "{}", m.body);
    assert_eq!(m.headers[CONTENT_TYPE], metrics::CONTENT_TYPE);
    let two_cpus = aya::util::nr_cpus().expect("nr_cpus") > 1;
    for want in [
        format!(
            r#"tether_service_packets_total{{service="web",vip="192.0.2.10",port="80",protocol="tcp"}} {}"#,
            if two_cpus { 100 } else { 70 }
        ),
        r#"tether_backend_packets_total{pool="web",backend="a",address="10.0.0.1"} 50"#.into(),
        r#"tether_backend_bound_clients{pool="web",backend="a",address="10.0.0.1"} 2"#.into(),
        r#"tether_backend_bound_clients{pool="web",backend="b",address="10.0.0.2"} 1"#.into(),
        r#"tether_backend_bound_clients{pool="web",backend="c",address="10.0.0.3"} 1"#.into(),
        r#"tether_xdp_packets_total{reason="tx"} 100"#.into(),
        r#"tether_xdp_packets_total{reason="malformed_l4"} 3"#.into(),
        "tether_persist_entries 5".into(),
        "tether_config_generation 7".into(),
    ] {
        assert!(
            m.body.lines().any(|l| l == want),
            "missing {want:?} in:\n{}",
            m.body
        );
    }

    // /status
    let s: api::Status = parse(&send(addr, "GET", "/status").await);
    assert_eq!(s.generation, 7);
    assert_eq!(s.persist_entries, Some(5));
    assert_eq!(s.services[0].backends[0].bound_clients, Some(2));
    assert_eq!(
        s.services[0].backends[1].counters.packets,
        if two_cpus { 30 } else { 20 }
    );
    assert_eq!(s.reasons["malformed_l4"], 3);

    // /persist with filters
    let all: api::PersistList = parse(&send(addr, "GET", "/persist").await);
    assert_eq!((all.entries.len(), all.truncated), (5, false));
    let one: api::PersistList =
        parse(&send(addr, "GET", "/persist?service=web&client=10.0.2.99").await);
    assert_eq!(one.entries.len(), 1, "{one:?}");
    let e = &one.entries[0];
    assert_eq!(
        (
            e.service.as_deref(),
            e.client,
            e.prefix_len,
            e.backend.as_deref(),
            e.backend_address,
            e.expired
        ),
        (
            Some("web"),
            "10.0.2.0".parse().expect("addr"),
            24,
            Some("b"),
            Some("10.0.0.2".parse().expect("addr")),
            false
        )
    );
    let want = ages(10);
    assert!(want.contains(&e.age_s), "age {} not in {want:?}", e.age_s);
    let by_backend: api::PersistList = parse(&send(addr, "GET", "/persist?backend=web/b").await);
    assert_eq!(by_backend.entries.len(), 2);
    assert!(
        by_backend
            .entries
            .iter()
            .any(|e| e.expired && e.client == "10.0.3.0".parse::<IpAddr>().expect("addr"))
    );
    let v6: api::PersistList = parse(&send(addr, "GET", "/persist?client=2001:db8:5::77").await);
    assert_eq!(v6.entries.len(), 1);
    assert_eq!(v6.entries[0].prefix_len, 48);

    // The CLI against the same server (blocking calls off the runtime threads).
    let cli_out = tokio::task::spawn_blocking(move || {
        let addr = &tcp_endpoint(addr);
        (
            cli::status(addr).expect("cli status"),
            cli::persist_list(
                addr,
                Some("web"),
                Some("10.0.0.5".parse().expect("addr")),
                None,
            )
            .expect("cli persist list"),
            cli::persist_list(addr, Some("nope"), None, None).expect_err("unknown service"),
        )
    })
    .await
    .expect("cli thread");
    let want = ages(3);
    assert!(cli_out.0.contains("service web"), "{}", cli_out.0);
    assert!(
        cli_out.1.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[..f.len().min(4)] == ["web", "10.0.0.0/24", "a", "(10.0.0.1)"]
                && f.get(4)
                    .is_some_and(|a| want.clone().any(|s| *a == cli::duration(s)))
        }),
        "age not in {want:?}s: {}",
        cli_out.1
    );
    assert!(cli_out.1.ends_with("1 entry\n"), "{}", cli_out.1);
    assert!(
        cli_out
            .2
            .to_string()
            .contains("400: service: no virtual service named \"nope\""),
        "{}",
        cli_out.2
    );

    // Errors.
    let r = send(addr, "GET", "/nope").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = send(addr, "POST", "/metrics").await;
    assert_eq!(
        (r.status, r.headers[ALLOW].to_str().ok()),
        (405, Some("GET, HEAD"))
    );
    let r = send(addr, "GET", "/persist/flush").await;
    assert_eq!(
        (r.status, r.headers[ALLOW].to_str().ok()),
        (405, Some("POST"))
    );
    for (q, param) in [
        ("service=zz", "service: "),
        ("backend=zz", "backend: "),
        ("client=not-an-ip", "client: "),
        ("color=red", "unknown parameter"),
    ] {
        let r = send(addr, "POST", &format!("/persist/flush?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert!(r.body.starts_with(param), "{q}: {}", r.body);
    }
    let r = send(addr, "GET", "/persist?backend=a").await;
    assert_eq!(r.status, 400, "ambiguous backend: {}", r.body);

    // Flush one client, then a backend, then everything.
    let f: api::FlushReply = parse(&send(addr, "POST", "/persist/flush?client=10.0.1.200").await);
    assert_eq!(f.flushed, 1);
    let s: api::Status = parse(&send(addr, "GET", "/status").await);
    assert_eq!(
        (s.persist_entries, s.services[0].backends[0].bound_clients),
        (Some(4), Some(1)),
        "a flush invalidates the census"
    );
    let f: api::FlushReply =
        parse(&send(addr, "POST", "/persist/flush?service=web&backend=b").await);
    assert_eq!(f.flushed, 2);
    let out = tokio::task::spawn_blocking(move || {
        cli::persist_flush(&tcp_endpoint(addr), None, None, None)
    })
    .await
    .expect("cli thread")
    .expect("cli flush");
    assert_eq!(out, "flushed 2 persistence entries\n");
    let all: api::PersistList = parse(&send(addr, "GET", "/persist").await);
    assert!(all.entries.is_empty());

    // Oversized request head: refused, server keeps serving.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET /status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES + 1)
        );
        let _ = s.write_all(req.as_bytes()).await;
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp).await;
        let head = String::from_utf8_lossy(&resp);
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    }
    assert_eq!(send(addr, "GET", "/status").await.status, 200);

    stop_tx.send(true).expect("server listening");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns on shutdown")
        .expect("serve task");
    drop(pins);
}

#[test]
fn cli_unreachable_names_admin_listen() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    let e = cli::status(&tcp_endpoint(addr)).expect_err("nothing listens");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("is tether running? admin_listen is {addr}")),
        "{msg}"
    );
}

#[tokio::test]
async fn missing_maps_are_503() {
    let srv = Arc::new(Server {
        snapshot: Arc::new(ArcSwap::from_pointee(snapshot(PathBuf::from(
            "/sys/fs/bpf/tether-test-absent",
        )))),
        access: None,
        census: Arc::default(),
        walks: Arc::new(Semaphore::new(1)),
        objects: None,
    });
    for (m, p) in [
        (Method::GET, "/metrics"),
        (Method::GET, "/status"),
        (Method::GET, "/persist"),
        (Method::POST, "/persist/flush"),
    ] {
        let r = route(&srv, &m, p, None).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{m} {p}");
    }
}

mod auth;
