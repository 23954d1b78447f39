//! The `sip-header` and `script` methods through the engine, the SIP parser (with random and
//! truncated input), and their profiles.

use std::{
    collections::{HashMap, HashSet},
    io::Write,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use proptest::prelude::*;

use crate::{
    balancer::{Previous, assign_ids},
    config::Config,
    engine::{
        Engine,
        input::{Input, SipMessage},
    },
    state::{BackendState, SharedSnapshot, Snapshot},
};

fn config(service: &str, profile: &str) -> Arc<Config> {
    Arc::new(
        Config::parse(&format!(
            r#"{{"interface":"lo",
            "virtual_services":[{service}],
            "pools":[{{"name":"p","backends":[{{"name":"b1","address":"10.0.1.1"}},{{"name":"b2","address":"10.0.1.2"}},{{"name":"b3","address":"10.0.1.3"}}]}}],
            "persistence_profiles":[{profile}]}}"#
        ))
        .unwrap_or_else(|e| panic!("test config: {e}")),
    )
}

const SIP_SERVICE: &str = r#"{"name":"sip","vip":"127.0.0.1","port":5060,"protocol":"udp","mode":"l7","pool":"p","persistence":"x"}"#;
const WEB_SERVICE: &str = r#"{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"p","persistence":"x"}"#;

fn engine(cfg: &Arc<Config>) -> (Engine, SharedSnapshot) {
    let ids = assign_ids(cfg, &Previous::default()).unwrap();
    let mut s = Snapshot::empty(cfg.clone(), SystemTime::now());
    s.service_index = ids.services;
    s.backend_ids = ids.backends;
    s.backend_state = vec![vec![BackendState::Up; 3]];
    s.health = vec![vec![None; 3]];
    let snap: SharedSnapshot = Arc::new(ArcSwap::from_pointee(s));
    (
        Engine::new(cfg, &cfg.services[0], snap.clone()).unwrap(),
        snap,
    )
}

fn client(i: usize) -> SocketAddr {
    format!("198.51.100.{}:{}", i % 200 + 1, 5060 + i)
        .parse()
        .unwrap()
}

fn sip(head: &str) -> SipMessage {
    SipMessage::parse(head.as_bytes()).unwrap_or_else(|| panic!("a SIP message: {head:?}"))
}

fn call(header: &str, value: &str) -> SipMessage {
    sip(&format!(
        "BYE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9\r\n{header}: {value}\r\nCSeq: 2 BYE\r\n\r\n"
    ))
}

#[test]
fn sip_heads_parse_strictly() {
    let m = sip(
        "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP a\r\nSubject: one\r\n  two\r\n\tthree\r\nl: 3\r\n\r\nv=0",
    );
    assert!(m.is_request());
    assert_eq!(m.header("subject"), Some(&b"one two three"[..]), "folded");
    assert_eq!(m.header("Content-Length"), Some(&b"3"[..]), "compact l");
    let r = sip("SIP/2.0 180 Ringing\ni: abc\n\n");
    assert!(!r.is_request(), "a response, bare LF line ends");
    assert_eq!(r.header("call-id"), Some(&b"abc"[..]));
    assert!(
        SipMessage::parse(b"SIP/2.0 200 \r\n\r\n").is_some(),
        "empty reason"
    );
    for bad in [
        &b""[..],
        b"\r\n\r\n",
        b"hello",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"INVITE sip:x\r\n\r\n",
        b"INVITE  SIP/2.0\r\n\r\n",
        b"INV ITE sip:x SIP/2.0\r\n\r\n",
        b"SIP/2.0 20 OK\r\n\r\n",
        b"SIP/2.0 099 OK\r\n\r\n",
        b"SIP/3.0 200 OK\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nno colon\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\n: empty name\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nBad Name: x\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\n continuation first\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nCall-ID: a\x00b\r\n\r\n",
        b"INVITE sip:x\x01 SIP/2.0\r\n\r\n",
        b"\xff\xfe sip:x SIP/2.0\r\n\r\n",
    ] {
        assert_eq!(
            SipMessage::parse(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let many: String = (0..=crate::engine::input::SIP_MAX_HEADERS)
        .map(|i| format!("X-{i}: v\r\n"))
        .collect();
    assert_eq!(
        SipMessage::parse(format!("OPTIONS sip:x SIP/2.0\r\n{many}\r\n").as_bytes()),
        None,
        "too many header fields"
    );
}

proptest! {
    /// Random bytes, and every truncation of a real message with random bytes spliced in,
    /// never panic the parser or the method; what parses has a valid start line.
    #[test]
    fn the_parser_and_the_method_survive_any_bytes(
        junk in proptest::collection::vec(any::<u8>(), 0..600),
        cut in 0usize..400,
        at in 0usize..400,
    ) {
        let cfg = config(SIP_SERVICE, r#"{"name":"x","type":"sip-header"}"#);
        let (e, _snap) = engine(&cfg);
        let real = b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9;branch=z9\r\ni: 9f8e@10.0.0.9\r\nSubject: a\r\n folded\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let mut spliced = real[..cut.min(real.len())].to_vec();
        let pos = at.min(spliced.len());
        spliced.splice(pos..pos, junk.iter().copied().take(40));
        for d in [&junk[..], &real[..cut.min(real.len())], &spliced[..]] {
            if let Some(m) = SipMessage::parse(d) {
                prop_assert!(!m.start_line.is_empty());
                prop_assert!(m.headers.len() <= crate::engine::input::SIP_MAX_HEADERS);
                let c = e.decide(&mut Input::sip(&m, client(1)), &[]);
                prop_assert!(c.is_ok(), "every parsed message gets a backend: {:?}", c);
            }
        }
    }
}

#[test]
fn a_call_id_keeps_one_backend_and_calls_spread() {
    let cfg = config(SIP_SERVICE, r#"{"name":"x","type":"sip-header"}"#);
    let (e, _snap) = engine(&cfg);
    let (other, _s2) = engine(&cfg);
    let mut by_call: HashMap<usize, HashSet<SocketAddr>> = HashMap::new();
    for c in 0..60 {
        for (i, name) in ["Call-ID", "i", "call-id", "I"].iter().enumerate() {
            let m = call(name, &format!("{c}-abc@10.0.0.9"));
            let to = e
                .decide(&mut Input::sip(&m, client(c * 4 + i)), &[])
                .unwrap()
                .backend;
            by_call.entry(c).or_default().insert(to);
        }
        // A second instance places a new call where the first did (Maglev).
        let m = call("Call-ID", &format!("{c}-abc@10.0.0.9"));
        let elsewhere = other
            .decide(&mut Input::sip(&m, client(999)), &[])
            .unwrap()
            .backend;
        assert!(by_call[&c].contains(&elsewhere), "call {c} on instance two");
    }
    assert!(by_call.values().all(|b| b.len() == 1), "{by_call:?}");
    let used: HashSet<&SocketAddr> = by_call.values().flatten().collect();
    assert_eq!(used.len(), 3, "60 calls reach all 3 backends");
    assert_eq!(e.stats.persist_hits.load(Ordering::Relaxed), 180);
}

#[test]
fn a_configured_header_or_the_source_address_decides() {
    let cfg = config(
        SIP_SERVICE,
        r#"{"name":"x","type":"sip-header","header":"X-Tenant"}"#,
    );
    let (e, _snap) = engine(&cfg);
    let tenant = |t: &str, i: usize| {
        let m = call("x-tenant", t);
        e.decide(&mut Input::sip(&m, client(i)), &[])
            .unwrap()
            .backend
    };
    let first = tenant("acme", 0);
    assert!((1..30).all(|i| tenant("acme", i) == first));
    // No such header: by source address (same address, any port: same backend).
    let bare = sip("OPTIONS sip:x SIP/2.0\r\nCall-ID: differs\r\n\r\n");
    let src = |port: u16| SocketAddr::new("192.0.2.44".parse().unwrap(), port);
    let by_src = e
        .decide(&mut Input::sip(&bare, src(1)), &[])
        .unwrap()
        .backend;
    for port in 2..40 {
        let m = sip(&format!(
            "OPTIONS sip:x SIP/2.0\r\nCall-ID: c{port}\r\n\r\n"
        ));
        assert_eq!(
            e.decide(&mut Input::sip(&m, src(port)), &[])
                .unwrap()
                .backend,
            by_src
        );
    }
    let spread: HashSet<SocketAddr> = (0..60)
        .map(|i| {
            e.decide(&mut Input::sip(&bare, client(i)), &[])
                .unwrap()
                .backend
        })
        .collect();
    assert!(spread.len() > 1, "sources spread");
}

fn script_file(body: &str) -> tempfile_path::Path {
    tempfile_path::Path::with(body)
}

/// A script file removed on drop.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);

    impl Path {
        pub fn with(body: &str) -> Path {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "tether-script-{}-{}.lua",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let mut f = std::fs::File::create(&p).expect("create a script file");
            super::Write::write_all(&mut f, body.as_bytes()).expect("write the script");
            Path(p)
        }
    }

    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn script_profile(file: &tempfile_path::Path, extra: &str) -> String {
    format!(
        r#"{{"name":"x","type":"script","file":"{}"{extra}}}"#,
        file.0.display()
    )
}

fn get(e: &Engine, client_i: usize, headers: &[(&str, &str)]) -> SocketAddr {
    let mut b = http::Request::builder().uri("/app?x=1");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut parts = b.body(()).unwrap().into_parts().0;
    e.decide(&mut Input::http(&mut parts, client(client_i)), &[])
        .unwrap()
        .backend
}

#[test]
fn a_script_key_sticks_and_spreads_and_a_backend_name_binds() {
    let f = script_file(
        r#"
        function persist(req)
          if req.headers["x-pin"] then return { backend = req.headers["x-pin"] } end
          return req.headers["x-user"] or req.cookies["sid"]
        end
        "#,
    );
    let cfg = config(WEB_SERVICE, &script_profile(&f, ""));
    let (e, _snap) = engine(&cfg);
    let ann = get(&e, 0, &[("x-user", "ann")]);
    for i in 1..40 {
        assert_eq!(get(&e, i, &[("x-user", "ann")]), ann, "request {i}");
    }
    assert_eq!(
        get(&e, 3, &[("cookie", "a=1; sid=ann")]),
        ann,
        "the same key from a cookie"
    );
    let users: HashSet<SocketAddr> = (0..60)
        .map(|u| get(&e, u, &[("x-user", &format!("user{u}"))]))
        .collect();
    assert_eq!(users.len(), 3, "keys spread");
    for (name, addr) in [("b1", "10.0.1.1"), ("b3", "10.0.1.3")] {
        for i in 0..5 {
            assert_eq!(get(&e, i, &[("x-pin", name)]).ip().to_string(), addr);
        }
    }
    // Nothing from the script: the pool's round robin.
    let none: HashSet<SocketAddr> = (0..6)
        .map(|i| get(&e, 0, &[("x-i", &i.to_string())]))
        .collect();
    assert_eq!(none.len(), 3);
    assert_eq!(e.stats.script_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_or_runaway_script_is_counted_and_the_request_still_balanced() {
    let f = script_file(
        r#"
        function persist(req)
          local h = req.headers["x-do"]
          if h == "loop" then while true do end end
          if h == "error" then error("boom") end
          if h == "ghost" then return { backend = "nope" } end
          if h == "bad" then return true end
          return "k"
        end
        "#,
    );
    let cfg = config(
        WEB_SERVICE,
        &script_profile(&f, r#","max_instructions":20000"#),
    );
    let (e, _snap) = engine(&cfg);
    let k = get(&e, 0, &[]);
    let mut seen = HashSet::new();
    for i in 0..6 {
        seen.insert(get(&e, i, &[("x-do", "loop")]));
    }
    assert_eq!(
        seen.len(),
        3,
        "cut off, then balanced by the pool: {seen:?}"
    );
    assert_eq!(e.stats.script_cutoffs.load(Ordering::Relaxed), 6);
    for what in ["error", "ghost", "bad"] {
        get(&e, 1, &[("x-do", what)]);
    }
    assert_eq!(e.stats.script_errors.load(Ordering::Relaxed), 3);
    assert_eq!(
        get(&e, 9, &[]),
        k,
        "the script answers again after the cut-offs"
    );
}

#[test]
fn profiles_are_validated() {
    let refuse = |svc: &str, profile: &str| -> String {
        Config::parse(&format!(
            r#"{{"interface":"lo","virtual_services":[{svc}],
            "pools":[{{"name":"p","backends":[{{"name":"b1","address":"10.0.1.1"}}]}}],
            "persistence_profiles":[{profile}]}}"#
        ))
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string())
    };
    let sip_profile = r#"{"name":"x","type":"sip-header"}"#;
    assert_eq!(
        refuse(SIP_SERVICE, sip_profile),
        "",
        "a UDP SIP service is valid"
    );
    assert_eq!(
        refuse(WEB_SERVICE, sip_profile),
        "virtual_services[0].persistence: a \"sip-header\" profile reads SIP over UDP: it needs protocol \"udp\""
    );
    let udp_client_ip = r#"{"name":"x","type":"client-ip"}"#;
    assert_eq!(
        refuse(SIP_SERVICE, udp_client_ip),
        "virtual_services[0].protocol: mode \"l7\" serves HTTP over TCP, and SIP over UDP with a \"sip-header\" persistence profile"
    );
    let with_tls = SIP_SERVICE.replace(
        r#""persistence":"x""#,
        r#""persistence":"x","proxy_protocol":true"#,
    );
    assert_eq!(
        refuse(&with_tls, sip_profile),
        "virtual_services[0].proxy_protocol: does not apply to a UDP service"
    );
    let with_limit = SIP_SERVICE.replace(
        r#""persistence":"x""#,
        r#""persistence":"x","limits":{"idle_timeout_ms":5000,"request_timeout_ms":100}"#,
    );
    assert_eq!(
        refuse(&with_limit, sip_profile),
        "virtual_services[0].limits.request_timeout_ms: does not apply to a UDP service"
    );
    assert_eq!(
        refuse(
            SIP_SERVICE,
            r#"{"name":"x","type":"sip-header","header":"Bad Name"}"#
        ),
        "persistence_profiles[0].header: \"Bad Name\" is not a valid SIP header name"
    );
    assert_eq!(
        refuse(
            SIP_SERVICE,
            r#"{"name":"x","type":"sip-header","item":"a"}"#
        ),
        "persistence_profiles[0].item: does not apply to a \"sip-header\" profile (unknown field `item`, expected one of `name`, `select_new_server_when_down`, `table_capacity`, `max_new_keys_per_source_per_min`, `timeout_s`, `header`)"
    );
    // Scripts: compiled with the config.
    let bad = script_file("function persist(req)\n  return req.headers[\"x\"\nend\n");
    let msg = refuse(WEB_SERVICE, &script_profile(&bad, ""));
    assert_eq!(
        msg,
        format!(
            "persistence_profiles[0].file: the script is refused: {}:3: ']' expected near 'end'",
            bad.0.display()
        )
    );
    assert_eq!(
        refuse(WEB_SERVICE, r#"{"name":"x","type":"script"}"#),
        "persistence_profiles[0].file: required: the path of the Lua script"
    );
    assert!(
        refuse(
            WEB_SERVICE,
            r#"{"name":"x","type":"script","file":"/nonexistent/x.lua"}"#
        )
        .starts_with("persistence_profiles[0].file: /nonexistent/x.lua: No such file"),
    );
    let ok = script_file("function persist(req) return nil end");
    assert!(
        refuse(
            WEB_SERVICE,
            &script_profile(&ok, r#","max_instructions":10"#)
        )
        .starts_with("persistence_profiles[0].max_instructions: 10: must be"),
    );
    assert_eq!(refuse(WEB_SERVICE, &script_profile(&ok, "")), "");
    assert!(
        refuse(SIP_SERVICE, &script_profile(&ok, ""))
            .contains("SIP over UDP with a \"sip-header\" persistence profile"),
        "a script reads HTTP"
    );
}
