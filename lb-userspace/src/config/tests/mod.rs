use super::*;

const GOOD: &str = r#"{
  "interface": "eth0",
  "virtual_services": [{"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web","persistence":"src-ip"}],
  "pools": [{"name":"web","backends":[{"name":"b1","address":"10.0.0.11","weight":2},{"name":"b2","address":"10.0.0.12","mac":"02:00:00:00:00:12"}]}],
  "persistence_profiles": [{"name":"src-ip","type":"client-ip","timeout_s":1800,"ipv4_prefix":24,"ipv6_prefix":64,"select_new_server_when_down":"never"}]
}"#;

fn err(text: &str) -> ConfigError {
    Config::parse(text).expect_err("config should have been refused")
}

/// GOOD with one substring replaced (the replacement must apply).
fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "test bug: {from:?} not in GOOD");
    GOOD.replacen(from, to, 1)
}

#[test]
fn good_config_validates_into_typed_values() {
    let c = Config::parse(GOOD).expect("valid");
    assert_eq!(c.interface, "eth0");
    assert_eq!(c.xdp_mode, XdpMode::Auto);
    assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/tether"));
    assert_eq!(
        c.persist_new_bindings_per_cpu_s, None,
        "unset: derived from the table's per-CPU share"
    );
    assert_eq!(c.persist_table_entries, lb_common::PERSIST_DEFAULT_ENTRIES);
    let s = &c.services[0];
    assert_eq!(
        (s.vip, s.port, s.protocol),
        ("192.0.2.10".parse().unwrap(), 80, Protocol::Tcp)
    );
    assert_eq!(c.pools[s.pool].backends[0].weight, 2);
    assert_eq!(
        c.pools[s.pool].backends[1].weight, 1,
        "weight defaults to 1"
    );
    assert_eq!(c.pools[s.pool].backends[1].mac, Some([2, 0, 0, 0, 0, 0x12]));
    let p = c.profile(s).expect("profile");
    assert_eq!(
        (p.timeout_s, p.ipv4_prefix, p.ipv6_prefix, p.down_policy),
        (1800, 24, 64, DownPolicy::Never)
    );
}

#[test]
fn errors_name_the_field_and_the_reason() {
    let cases: &[(String, &str, &str)] = &[
        (
            with(r#""port":80"#, r#""port":80,"colour":"red""#),
            "virtual_services[0].colour",
            "unknown field `colour`",
        ),
        (
            with(
                r#""interface": "eth0","#,
                r#""interface": "eth0", "extra": 1,"#,
            ),
            "extra",
            "unknown field `extra`",
        ),
        (
            with(r#""port":80"#, r#""port":70000"#),
            "virtual_services[0].port",
            "invalid value",
        ),
        (
            with(r#""port":80"#, r#""port":0"#),
            "virtual_services[0].port",
            "1 to 65535",
        ),
        (
            with("192.0.2.10", "192.0.2.300"),
            "virtual_services[0].vip",
            "not an IPv4 or IPv6 address",
        ),
        (
            with(r#""protocol":"tcp""#, r#""protocol":"sctp""#),
            "virtual_services[0].protocol",
            "expected \"tcp\" or \"udp\"",
        ),
        (
            with(r#""mode":"l4-dsr""#, r#""mode":"nat""#),
            "virtual_services[0].mode",
            "expected \"l4-dsr\"",
        ),
        (
            with(
                r#""pool":"web","persistence""#,
                r#""pool":"api","persistence""#,
            ),
            "virtual_services[0].pool",
            "no pool named \"api\"",
        ),
        (
            with(r#""persistence":"src-ip""#, r#""persistence":"cookie""#),
            "virtual_services[0].persistence",
            "no persistence profile named",
        ),
        (
            with("10.0.0.12", "10.0.0.11"),
            "pools[0].backends[1].address",
            "appears twice",
        ),
        (
            with(r#""name":"b2""#, r#""name":"b1""#),
            "pools[0].backends[1].name",
            "duplicate backend name",
        ),
        (
            with(r#""weight":2"#, r#""weight":5000"#),
            "pools[0].backends[0].weight",
            "0 to 1000",
        ),
        (
            with(r#""weight":2"#, r#""weight":-1"#),
            "pools[0].backends[0].weight",
            "invalid value",
        ),
        (
            with("02:00:00:00:00:12", "02:00:00:00:12"),
            "pools[0].backends[1].mac",
            "not a MAC address",
        ),
        (
            with(r#""ipv4_prefix":24"#, r#""ipv4_prefix":33"#),
            "persistence_profiles[0].ipv4_prefix",
            "0 to 32",
        ),
        (
            with(r#""ipv6_prefix":64"#, r#""ipv6_prefix":129"#),
            "persistence_profiles[0].ipv6_prefix",
            "0 to 128",
        ),
        (
            with(r#""timeout_s":1800"#, r#""timeout_s":99999999"#),
            "persistence_profiles[0].timeout_s",
            "must be 0",
        ),
        (
            with(r#""type":"client-ip""#, r#""type":"magic""#),
            "persistence_profiles[0].type",
            "expected \"client-ip\"",
        ),
        (
            with(r#""never""#, r#""sometimes""#),
            "persistence_profiles[0].select_new_server_when_down",
            "\"immediate\" or \"never\"",
        ),
        (
            with(
                r#""interface": "eth0""#,
                r#""interface": "a-very-long-interface-name""#,
            ),
            "interface",
            "not a valid interface name",
        ),
        (
            with(
                r#""interface": "eth0""#,
                r#""interface": "eth0", "xdp_mode": "turbo""#,
            ),
            "xdp_mode",
            "\"auto\", \"native\" or \"generic\"",
        ),
        (
            with(
                r#""interface": "eth0""#,
                r#""interface": "eth0", "pin_dir": "/tmp/x""#,
            ),
            "pin_dir",
            "below /sys/fs/bpf",
        ),
        (
            with(
                r#""interface": "eth0""#,
                r#""interface": "eth0", "pin_dir": "/sys/fs/bpf/../../tmp/x""#,
            ),
            "pin_dir",
            "without `..`",
        ),
        (
            with(
                r#""interface": "eth0""#,
                r#""interface": "eth0", "persist_table_entries": 0"#,
            ),
            "persist_table_entries",
            "must be 1 to",
        ),
        (
            with(
                r#""interface": "eth0""#,
                r#""interface": "eth0", "persist_new_bindings_per_cpu_s": 2000000000"#,
            ),
            "persist_new_bindings_per_cpu_s",
            "must be 0 (no cap) to",
        ),
        (
            with(r#""name":"web","vip""#, r#""name":"","vip""#),
            "virtual_services[0].name",
            "must not be empty",
        ),
        (
            with(r#""interface": "eth0","#, ""),
            "<root>",
            "missing field `interface`",
        ),
    ];
    for (text, path, reason) in cases {
        let e = err(text);
        assert_eq!(&e.path, path, "wrong path for {reason:?}: {e}");
        assert!(
            e.reason.contains(reason),
            "{path}: reason {:?} lacks {reason:?}",
            e.reason
        );
    }
}

#[test]
fn duplicate_listener_is_refused() {
    let text = with(
        r#"{"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web","persistence":"src-ip"}"#,
        r#"{"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web"},{"name":"web2","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web"}"#,
    );
    let e = err(&text);
    assert_eq!(e.path, "virtual_services[1].port");
    assert!(e.reason.contains("already served by \"web\""), "{e}");
}

#[test]
fn same_vip_port_with_other_protocol_is_fine_and_defaults_apply() {
    let text = with(
        r#"{"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web","persistence":"src-ip"}"#,
        r#"{"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web"},{"name":"dns","vip":"2001:db8::10","port":80,"protocol":"udp","mode":"l4-dsr","pool":"web"},{"name":"web-u","vip":"192.0.2.10","port":80,"protocol":"udp","mode":"l4-dsr","pool":"web"}"#,
    );
    let c = Config::parse(&text).expect("valid");
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.services[0].persistence, None);
    let text = with(
        r#","timeout_s":1800,"ipv4_prefix":24,"ipv6_prefix":64,"select_new_server_when_down":"never""#,
        "",
    );
    let c = Config::parse(&text).expect("valid");
    let p = &c.profiles[0];
    assert_eq!(
        (p.timeout_s, p.ipv4_prefix, p.ipv6_prefix, p.down_policy),
        (300, 32, 128, DownPolicy::Immediate)
    );
}

#[test]
fn not_json_is_an_error_not_a_panic() {
    for text in ["", "{", "[]", "null", "{\"interface\": 5}"] {
        let e = err(text);
        assert!(!e.reason.is_empty(), "{text:?}");
    }
}

#[test]
fn mac_parser() {
    assert_eq!(
        parse_mac("aa:BB:0c:00:00:ff"),
        Some([0xaa, 0xbb, 0x0c, 0, 0, 0xff])
    );
    for bad in [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "aa:bb:cc:dd:ee:fg",
        "a:bb:cc:dd:ee:ff",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad:?}");
    }
}

/// GOOD with a health monitor on pool "web".
fn with_monitor(monitor: &str) -> String {
    with(
        r#"{"name":"web","backends":["#,
        &format!(r#"{{"name":"web","health_monitor":{monitor},"backends":["#),
    )
}

#[test]
fn health_monitors_validate_into_typed_checks() {
    let c = Config::parse(&with_monitor(r#"{"type":"http","port":8080,"interval_ms":500,"timeout_ms":200,"rise":1,"fall":2,"http_path":"/health","expect_status":["200","3xx"]}"#)).expect("valid");
    let m = c.pools[0].health_monitor.as_ref().expect("monitor");
    assert_eq!(
        (
            m.port,
            m.interval.as_millis(),
            m.timeout.as_millis(),
            m.rise,
            m.fall
        ),
        (8080, 500, 200, 1, 2)
    );
    match &m.kind {
        HealthCheckKind::Http {
            tls, path, expect, ..
        } => {
            assert!(!tls);
            assert_eq!(path, "/health");
            assert_eq!(expect, &vec![StatusMatch::Code(200), StatusMatch::Class(3)]);
            assert!(expect[1].matches(302) && !expect[1].matches(200) && expect[0].matches(200));
        }
        k => panic!("expected an HTTP check, got {k:?}"),
    }
    let c = Config::parse(&with_monitor(
        r#"{"type":"udp","port":53,"udp_send":"ping","udp_expect":"pong"}"#,
    ))
    .expect("valid");
    let m = c.pools[0].health_monitor.as_ref().unwrap();
    assert_eq!(
        (
            m.interval.as_millis(),
            m.timeout.as_millis(),
            m.rise,
            m.fall
        ),
        (5000, 2000, 2, 3),
        "defaults"
    );
    assert_eq!(
        m.kind,
        HealthCheckKind::Udp {
            send: b"ping".to_vec(),
            expect: Some(b"pong".to_vec())
        }
    );
    let c = Config::parse(&with_monitor(r#"{"type":"https","port":443}"#)).expect("valid");
    assert!(
        matches!(&c.pools[0].health_monitor.as_ref().unwrap().kind, HealthCheckKind::Http { tls: true, expect, .. } if expect.len() == 2)
    );
}

#[test]
fn bad_health_monitors_name_the_field() {
    let base = "pools[0].health_monitor";
    let cases = [
        (r#"{"type":"icmp","port":1}"#, "type", "expected \"tcp\""),
        (r#"{"type":"tcp","port":0}"#, "port", "1 to 65535"),
        (r#"{"type":"tcp"}"#, "", "missing field `port`"),
        (
            r#"{"type":"tcp","port":80,"interval_ms":50}"#,
            "interval_ms",
            "100 to",
        ),
        (
            r#"{"type":"tcp","port":80,"interval_ms":1000,"timeout_ms":2000}"#,
            "timeout_ms",
            "must not exceed interval_ms",
        ),
        (r#"{"type":"tcp","port":80,"rise":0}"#, "rise", "1 to 100"),
        (r#"{"type":"tcp","port":80,"fall":101}"#, "fall", "1 to 100"),
        (
            r#"{"type":"tcp","port":80,"http_path":"/x"}"#,
            "http_path",
            "does not apply",
        ),
        (
            r#"{"type":"http","port":80,"udp_send":"x"}"#,
            "udp_send",
            "does not apply",
        ),
        (
            r#"{"type":"http","port":80,"http_path":"health"}"#,
            "http_path",
            "must start with '/'",
        ),
        (
            r#"{"type":"http","port":80,"expect_status":["2yy"]}"#,
            "expect_status",
            "a class such as",
        ),
        (
            r#"{"type":"http","port":80,"expect_status":["700"]}"#,
            "expect_status",
            "a status such as",
        ),
        (
            r#"{"type":"http","port":80,"expect_status":[]}"#,
            "expect_status",
            "must not be empty",
        ),
        (r#"{"type":"udp","port":53}"#, "udp_send", "required"),
        (
            r#"{"type":"tcp","port":80,"colour":1}"#,
            "colour",
            "unknown field",
        ),
    ];
    for (monitor, field, reason) in cases {
        let e = err(&with_monitor(monitor));
        let want = if field.is_empty() {
            base.to_string()
        } else {
            format!("{base}.{field}")
        };
        assert_eq!(e.path, want, "{monitor}: {e}");
        assert!(
            e.reason.contains(reason),
            "{monitor}: {:?} lacks {reason:?}",
            e.reason
        );
    }
}

#[test]
fn admin_state_and_listen() {
    let c = Config::parse(&with(
        r#""weight":2"#,
        r#""weight":2,"admin_state":"draining""#,
    ))
    .expect("valid");
    assert_eq!(c.pools[0].backends[0].admin_state, AdminState::Draining);
    assert_eq!(c.pools[0].backends[1].admin_state, AdminState::Enabled);
    assert_eq!(c.admin_listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
    let e = err(&with(r#""weight":2"#, r#""weight":2,"admin_state":"off""#));
    assert_eq!(e.path, "pools[0].backends[0].admin_state");
    let e = err(&with(
        r#""interface": "eth0""#,
        r#""interface": "eth0", "admin_listen": "localhost""#,
    ));
    assert_eq!(e.path, "admin_listen");
    let c = Config::parse(&with(
        r#""interface": "eth0""#,
        r#""interface": "eth0", "admin_listen": "[::1]:9999""#,
    ))
    .expect("valid");
    assert_eq!(c.admin_listen.port(), 9999);
    assert_eq!(c.drain_timeout, std::time::Duration::from_secs(30));
    let c = Config::parse(&with(
        r#""interface": "eth0""#,
        r#""interface": "eth0", "drain_timeout_ms": 0"#,
    ))
    .expect("valid");
    assert_eq!(c.drain_timeout, std::time::Duration::ZERO);
    let e = err(&with(
        r#""interface": "eth0""#,
        r#""interface": "eth0", "drain_timeout_ms": 3600001"#,
    ));
    assert_eq!(e.path, "drain_timeout_ms");
}

const L7: &str = r#"{
  "interface": "eth0",
  "virtual_services": [{"name":"app","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l7","pool":"app",
                        "limits":{"max_connections":100,"idle_timeout_ms":5000},"persistence":"ck"}],
  "pools": [{"name":"app","algorithm":"least-connections","backends":[{"name":"b1","address":"10.0.0.11","port":8080}]}],
  "persistence_profiles": [
    {"name":"ck","type":"http-cookie","cookie_name":"SRV","max_lifetime_min":30,"always_send":true,"same_site":"strict",
     "keys":[{"id":2,"secret":"0000000000000000000000000000000000000000000000000000000000000002"}],
     "fallback":{"type":"client-ip","timeout_s":120,"ipv4_prefix":24}},
    {"name":"js","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":1800},
    {"name":"anon","type":"http-cookie"}]
}"#;

fn l7_with(from: &str, to: &str) -> String {
    assert!(L7.contains(from), "test bug: {from:?} not in L7");
    L7.replacen(from, to, 1)
}

#[test]
fn l7_services_and_cookie_profiles_validate() {
    let c = Config::parse(L7).expect("valid");
    let s = &c.services[0];
    let ServiceMode::L7(o) = &s.mode else {
        panic!("expected l7, got {:?}", s.mode)
    };
    assert_eq!((o.tls.is_none(), o.proxy_protocol.is_none()), (true, true));
    assert_eq!(o.limits.max_connections, 100);
    assert_eq!(o.limits.idle_timeout.as_millis(), 5000);
    assert_eq!(o.limits.connect_timeout.as_millis(), 3000, "default");
    assert_eq!(c.pools[0].algorithm, Algorithm::LeastConnections);
    assert_eq!(c.pools[0].backends[0].port, Some(8080));
    let PersistenceKind::HttpCookie(ck) = &c.profiles[0].kind else {
        panic!("http-cookie")
    };
    assert_eq!(ck.cookie_name, "SRV");
    assert_eq!(ck.max_lifetime, Some(std::time::Duration::from_secs(1800)));
    assert!(ck.always_send && ck.http_only && !ck.add_port);
    assert_eq!(
        (ck.secure, ck.same_site, ck.path.as_str()),
        (None, Some(SameSiteMode::Strict), "/")
    );
    assert_eq!(ck.keys.len(), 1);
    assert_eq!(
        ck.fallback,
        Some(ClientIpFallback {
            timeout_s: 120,
            ipv4_prefix: 24,
            ipv6_prefix: 128
        })
    );
    let PersistenceKind::AppCookie(js) = &c.profiles[1].kind else {
        panic!("app-cookie")
    };
    assert_eq!(
        (js.cookie_name.as_str(), c.profiles[1].timeout_s),
        ("JSESSIONID", 1800)
    );
    let PersistenceKind::HttpCookie(anon) = &c.profiles[2].kind else {
        panic!("http-cookie")
    };
    assert_eq!(anon.cookie_name.len(), 8, "a blank name gets 8 characters");
    assert!(anon.cookie_name.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(
        Config::parse(L7).unwrap().profiles[2].kind,
        c.profiles[2].kind,
        "and the same one every time"
    );
    assert_eq!(
        (anon.max_lifetime, anon.same_site),
        (None, Some(SameSiteMode::Lax)),
        "session cookie, Lax by default"
    );
}

#[test]
fn l7_errors_name_the_field() {
    let cases: &[(String, &str, &str)] = &[
        (
            l7_with(
                r#""protocol":"tcp","mode":"l7""#,
                r#""protocol":"udp","mode":"l7""#,
            ),
            "virtual_services[0].protocol",
            "HTTP over TCP",
        ),
        (
            l7_with(r#""mode":"l7""#, r#""mode":"l4-dsr""#),
            "virtual_services[0].limits",
            "applies to mode \"l7\" only",
        ),
        (
            l7_with(
                r#""limits":{"max_connections":100,"idle_timeout_ms":5000},"#,
                "",
            )
            .replacen(r#""mode":"l7""#, r#""mode":"l4-dsr""#, 1),
            "virtual_services[0].persistence",
            "needs mode \"l7\"",
        ),
        (
            l7_with(r#""max_connections":100"#, r#""max_connections":0"#),
            "virtual_services[0].limits.max_connections",
            "must be 1",
        ),
        (
            l7_with(
                r#""max_connections":100"#,
                r#""max_connections":1,"tls":{"cert_file":"/nonexistent.pem","key_file":"/x"}"#,
            ),
            "virtual_services[0].limits.tls",
            "unknown field",
        ),
        (
            l7_with(
                r#""mode":"l7","#,
                r#""mode":"l7","tls":{"cert_file":"/nonexistent.pem","key_file":"/x"},"#,
            ),
            "virtual_services[0].tls.cert_file",
            "no such readable file",
        ),
        (
            l7_with(
                r#""algorithm":"least-connections""#,
                r#""algorithm":"random""#,
            ),
            "pools[0].algorithm",
            "round-robin",
        ),
        (
            l7_with(r#""port":8080"#, r#""port":0"#),
            "pools[0].backends[0].port",
            "1 to 65535",
        ),
        (
            l7_with(r#""max_lifetime_min":30"#, r#""max_lifetime_min":5"#),
            "persistence_profiles[0].max_lifetime_min",
            "10 to 720",
        ),
        (
            l7_with(r#""same_site":"strict""#, r#""same_site":"sometimes""#),
            "persistence_profiles[0].same_site",
            "\"lax\"",
        ),
        (
            l7_with(r#""cookie_name":"SRV""#, r#""cookie_name":"S R V""#),
            "persistence_profiles[0].cookie_name",
            "not a valid cookie name",
        ),
        (
            l7_with(r#""secret":"0000"#, r#""secret":"00"#),
            "persistence_profiles[0].keys",
            "cookie key 2: the secret is 31 bytes, need 32",
        ),
        (
            l7_with(
                r#""type":"client-ip","timeout_s":120"#,
                r#""type":"server-ip","timeout_s":120"#,
            ),
            "persistence_profiles[0].fallback.type",
            "\"client-ip\"",
        ),
        (
            l7_with(r#""cookie_name":"JSESSIONID","#, ""),
            "persistence_profiles[1].cookie_name",
            "required",
        ),
        (
            l7_with(
                r#""cookie_name":"JSESSIONID","#,
                r#""cookie_name":"JSESSIONID","always_send":true,"#,
            ),
            "persistence_profiles[1].always_send",
            "does not apply",
        ),
        (
            l7_with(
                r#""type":"http-cookie"}"#,
                r#""type":"http-cookie","timeout_s":60}"#,
            ),
            "persistence_profiles[2].timeout_s",
            "does not apply",
        ),
        (
            l7_with(r#""type":"http-cookie"}"#, r#""type":"cookie-jar"}"#),
            "persistence_profiles[2].type",
            "\"app-cookie\"",
        ),
    ];
    for (text, path, reason) in cases {
        let e = err(text);
        assert_eq!(&e.path, path, "wrong path for {reason:?}: {e}");
        assert!(
            e.reason.contains(reason),
            "{path}: reason {:?} lacks {reason:?}",
            e.reason
        );
    }
}

/// The README's JSON examples: the whole config validates as it stands; the L7 service
/// snippet validates inside a config that gives it its pool, profile and certificate files.
#[test]
fn readme_examples_validate() {
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let blocks: Vec<&str> = readme
        .split("```json\n")
        .skip(1)
        .map(|b| b.split("```").next().expect("closed block"))
        .collect();
    assert!(blocks.len() >= 2, "the README has its JSON examples");
    let mut configs = 0;
    let mut services = 0;
    let dir = std::env::temp_dir().join(format!("tether-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (cert, name) in [("app.pem", "cert"), ("app.key", "key")] {
        std::fs::write(dir.join(cert), name).unwrap();
    }
    // The README's Lua example is the script its `script` profile names.
    let lua = readme
        .split("```lua\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the README has its Lua example");
    std::fs::write(dir.join("by-user.lua"), lua).unwrap();
    for block in blocks {
        let v: serde_json::Value =
            serde_json::from_str(block).unwrap_or_else(|e| panic!("README JSON: {e}\n{block}"));
        if v.get("interface").is_some() {
            let text = block.replace("/etc/tether/", &format!("{}/", dir.display()));
            Config::parse(&text).unwrap_or_else(|e| panic!("README config: {e}\n{block}"));
            configs += 1;
        } else if v.get("vip").is_some() {
            let svc = block.replace("/etc/tether/", &format!("{}/", dir.display()));
            let text = format!(
                r#"{{"interface":"eth0","virtual_services":[{svc}],
                "pools":[{{"name":"app","backends":[{{"name":"b1","address":"10.0.0.11"}}]}}],
                "persistence_profiles":[{{"name":"session","type":"http-cookie"}}]}}"#
            );
            Config::parse(&text).unwrap_or_else(|e| panic!("README service: {e}\n{block}"));
            services += 1;
        } else {
            panic!("README JSON example of an unknown kind:\n{block}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        configs >= 1 && services >= 1,
        "{configs} configs, {services} services"
    );
}

#[test]
fn state_dir_defaults_and_must_be_absolute() {
    let c = Config::parse(GOOD).expect("valid");
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    let c = Config::parse(&with(
        r#""interface": "eth0""#,
        r#""interface": "eth0", "state_dir": "/srv/tether""#,
    ))
    .expect("valid");
    assert_eq!(c.state_dir, PathBuf::from("/srv/tether"));
    let e = err(&with(
        r#""interface": "eth0""#,
        r#""interface": "eth0", "state_dir": "var/lib/tether""#,
    ));
    assert_eq!(e.path, "state_dir");
    assert!(e.reason.contains("absolute"), "{e}");
}

mod gslb;
mod mirroring;
mod profiles;
