//! TLS pass-through services and the profiles that read the ClientHello.

use super::*;

const PASS: &str = r#"{
  "interface": "eth0",
  "virtual_services": [{"name":"tls","vip":"192.0.2.10","port":443,"protocol":"tcp","mode":"l7","pool":"app",
                        "tls_passthrough":true,"persistence":"sess"}],
  "pools": [{"name":"app","backends":[{"name":"b1","address":"10.0.0.11"}]}],
  "persistence_profiles": [
    {"name":"sess","type":"ssl-session-id","timeout_s":600,"fallback":{"type":"client-ip","timeout_s":60}},
    {"name":"by-sni","type":"consistent-hash","hash_key":"sni"},
    {"name":"ck","type":"http-cookie"},
    {"name":"ip","type":"client-ip"}]
}"#;

fn pass_with(from: &str, to: &str) -> String {
    assert!(PASS.contains(from), "test bug: {from:?} not in PASS");
    PASS.replacen(from, to, 1)
}

fn refused(text: &str) -> ConfigError {
    Config::parse(text).expect_err("config should have been refused")
}

#[test]
fn passthrough_service_with_session_id_profile_validates() {
    let c = Config::parse(PASS).expect("valid");
    let ServiceMode::L7(o) = &c.services[0].mode else {
        panic!("l7")
    };
    assert!(o.tls_passthrough && o.tls.is_none());
    let p = c.profile(&c.services[0]).expect("profile");
    assert_eq!(p.timeout_s, 600);
    let PersistenceKind::SslSessionId { fallback } = &p.kind else {
        panic!("ssl-session-id: {:?}", p.kind)
    };
    assert_eq!(fallback.map(|f| f.timeout_s), Some(60));
    assert_eq!(p.kind.input(), MethodInput::TlsHello);
    assert_eq!(
        c.profiles[1].kind,
        PersistenceKind::KeyHash {
            key: KeySource::Sni,
            sticky: false,
            fallback: None
        }
    );
    // SNI and client-IP profiles serve pass-through services too.
    for p in ["by-sni", "ip"] {
        Config::parse(&pass_with(
            r#""persistence":"sess""#,
            &format!(r#""persistence":"{p}""#),
        ))
        .unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    // Without tls_passthrough, the default is a terminating or cleartext HTTP proxy.
    let c = Config::parse(&pass_with(
        r#""tls_passthrough":true,"persistence":"sess""#,
        r#""persistence":"ck""#,
    ))
    .expect("valid");
    let ServiceMode::L7(o) = &c.services[0].mode else {
        panic!("l7")
    };
    assert!(!o.tls_passthrough);
}

#[test]
fn passthrough_errors_name_the_field_and_the_reason() {
    let cases: &[(String, &str, &str)] = &[
        (
            pass_with(r#""persistence":"sess""#, r#""persistence":"ck""#),
            "virtual_services[0].persistence",
            "inspects HTTP",
        ),
        (
            pass_with(r#""tls_passthrough":true,"#, ""),
            "virtual_services[0].persistence",
            "needs \"tls_passthrough\": true",
        ),
        (
            pass_with(
                r#""tls_passthrough":true,"persistence":"sess""#,
                r#""persistence":"by-sni""#,
            ),
            "virtual_services[0].persistence",
            "reads the TLS ClientHello",
        ),
        (
            pass_with(
                r#""tls_passthrough":true,"#,
                r#""tls_passthrough":true,"proxy_protocol":true,"#,
            ),
            "virtual_services[0].proxy_protocol",
            "not supported",
        ),
        (
            pass_with(r#""mode":"l7""#, r#""mode":"l4-dsr""#),
            "virtual_services[0].tls_passthrough",
            "applies to mode \"l7\" only",
        ),
        (
            pass_with(
                r#""timeout_s":600,"#,
                r#""timeout_s":600,"cookie_name":"x","#,
            ),
            "persistence_profiles[0].cookie_name",
            "does not apply to a \"ssl-session-id\" profile",
        ),
        (
            pass_with(r#""hash_key":"sni""#, r#""hash_key":"snoo""#),
            "persistence_profiles[1].hash_key",
            "sni",
        ),
    ];
    for (text, path, reason) in cases {
        let e = refused(text);
        assert_eq!(&e.path, path, "{e}");
        assert!(
            e.reason.contains(reason),
            "{path}: {:?} lacks {reason:?}",
            e.reason
        );
    }
}

#[test]
fn tls_termination_and_passthrough_exclude_each_other() {
    let dir = std::env::temp_dir().join(format!("tether-tls-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    std::fs::write(&cert, "x").unwrap();
    std::fs::write(&key, "x").unwrap();
    let text = pass_with(
        r#""tls_passthrough":true,"#,
        &format!(
            r#""tls_passthrough":true,"tls":{{"cert_file":"{}","key_file":"{}"}},"#,
            cert.display(),
            key.display()
        ),
    );
    let e = refused(&text);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(e.path, "virtual_services[0].tls_passthrough", "{e}");
    assert!(e.reason.contains("not both"), "{e}");
}

#[test]
fn tls_ticket_profiles_need_a_terminating_service() {
    let dir = std::env::temp_dir().join(format!("tether-tk-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    std::fs::write(&cert, "x").unwrap();
    std::fs::write(&key, "x").unwrap();
    let tls = format!(
        r#""tls":{{"cert_file":"{}","key_file":"{}"}},"persistence":"tk""#,
        cert.display(),
        key.display()
    );
    let profile = r#"{"name":"tk","type":"tls-ticket","timeout_s":3600,
        "keys":[{"id":1,"secret":"0101010101010101010101010101010101010101010101010101010101010101"}]},
    {"name":"ck""#;
    let good = pass_with(r#""tls_passthrough":true,"persistence":"sess""#, &tls).replacen(
        r#"{"name":"ck""#,
        profile,
        1,
    );
    let c = Config::parse(&good).expect("valid");
    let p = c.profile(&c.services[0]).expect("profile");
    assert_eq!(p.timeout_s, 3600);
    assert!(matches!(&p.kind, PersistenceKind::TlsTicket { keys } if keys.len() == 1));
    assert_eq!(p.kind.input(), MethodInput::TlsSession);
    let cases = [
        (
            good.replacen(&tls, r#""persistence":"tk""#, 1),
            "virtual_services[0].persistence",
            "needs \"tls\"",
        ),
        (
            good.replacen(r#""timeout_s":3600"#, r#""timeout_s":0"#, 1),
            "persistence_profiles[2].timeout_s",
            "lifetime",
        ),
        (
            good.replacen("0101010101", "01010101", 1),
            "persistence_profiles[2].keys",
            "64 hex",
        ),
        (
            good.replacen(
                r#""timeout_s":3600,"#,
                r#""timeout_s":3600,"fallback":{"type":"client-ip"},"#,
                1,
            ),
            "persistence_profiles[2].fallback",
            "does not apply",
        ),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    for (text, path, reason) in cases {
        let e = refused(&text);
        assert_eq!(e.path, path, "{e}");
        assert!(
            e.reason.contains(reason),
            "{path}: {:?} lacks {reason:?}",
            e.reason
        );
    }
}
