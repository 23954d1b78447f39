//! Persistence profiles: the key-based types, and errors inside a profile (serde buffers
//! tagged enums, so their field paths are recovered).

use super::*;

#[test]
fn key_based_profiles_validate() {
    let with_profile = |p: &str| l7_with(r#"{"name":"anon","type":"http-cookie"}"#, p);
    let c = Config::parse(&with_profile(
        r#"{"name":"anon","type":"super-http","with_source_ip":true,"timeout_s":60}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.profiles[2].kind,
        PersistenceKind::KeyHash {
            key: KeySource::SuperHttp {
                with_source_ip: true
            },
            sticky: true,
            fallback: None
        }
    );
    let c = Config::parse(&with_profile(
        r#"{"name":"anon","type":"header","item":"X-Session"}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.profiles[2].kind,
        PersistenceKind::KeyHash {
            key: KeySource::Header("x-session".into()),
            sticky: true,
            fallback: None
        }
    );
    let c = Config::parse(&with_profile(
        r#"{"name":"anon","type":"consistent-hash","hash_key":"query:sid"}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.profiles[2].kind,
        PersistenceKind::KeyHash {
            key: KeySource::QueryItem("sid".into()),
            sticky: false,
            fallback: None
        }
    );
    let c =
        Config::parse(&with_profile(r#"{"name":"anon","type":"consistent-hash"}"#)).expect("valid");
    assert_eq!(
        c.profiles[2].kind,
        PersistenceKind::KeyHash {
            key: KeySource::SourceIp,
            sticky: false,
            fallback: None
        }
    );
    let c = Config::parse(&with_profile(
        r#"{"name":"anon","type":"all-cookies","fallback":{"type":"client-ip"}}"#,
    ))
    .expect("valid");
    assert!(matches!(
        &c.profiles[2].kind,
        PersistenceKind::KeyHash {
            key: KeySource::AllCookies,
            fallback: Some(_),
            ..
        }
    ));
    let c = Config::parse(&with_profile(
        r#"{"name":"anon","type":"custom-header","item":"X-Tenant"}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.profiles[2].kind,
        PersistenceKind::CustomHeader {
            header: "x-tenant".into()
        }
    );

    let cases = [
        (
            r#"{"name":"anon","type":"query-item"}"#,
            "persistence_profiles[2].item",
            "required",
        ),
        (
            r#"{"name":"anon","type":"header","item":"bad header"}"#,
            "persistence_profiles[2].item",
            "not a valid",
        ),
        (
            r#"{"name":"anon","type":"url-hash","item":"x"}"#,
            "persistence_profiles[2].item",
            "does not apply",
        ),
        (
            r#"{"name":"anon","type":"url-hash","with_source_ip":true}"#,
            "persistence_profiles[2].with_source_ip",
            "does not apply",
        ),
        (
            r#"{"name":"anon","type":"consistent-hash","hash_key":"moon"}"#,
            "persistence_profiles[2].hash_key",
            "expected source-ip",
        ),
        (
            r#"{"name":"anon","type":"consistent-hash","fallback":{"type":"client-ip"}}"#,
            "persistence_profiles[2].fallback",
            "does not apply",
        ),
        (
            r#"{"name":"anon","type":"http-cookie","item":"x"}"#,
            "persistence_profiles[2].item",
            "does not apply",
        ),
        (
            r#"{"name":"anon","type":"custom-header"}"#,
            "persistence_profiles[2].item",
            "required",
        ),
        (
            r#"{"name":"anon","type":"host-header","cookie_name":"x"}"#,
            "persistence_profiles[2].cookie_name",
            "does not apply",
        ),
    ];
    for (profile, path, reason) in cases {
        let e = err(&with_profile(profile));
        assert_eq!(e.path, path, "{profile}: {e}");
        assert!(
            e.reason.contains(reason),
            "{profile}: {:?} lacks {reason:?}",
            e.reason
        );
    }
    let e = err(&l7_with(
        r#""port":8080"#,
        r#""port":8080,"header_value":"""#,
    ));
    assert_eq!(e.path, "pools[0].backends[0].header_value");
}

#[test]
fn errors_inside_a_profile_name_the_field() {
    let with_profile = |p: &str| l7_with(r#"{"name":"anon","type":"http-cookie"}"#, p);
    let cases = [
        (
            r#"{"name":"anon","type":"http-cookie","always_send":"yes"}"#,
            "persistence_profiles[2].always_send",
            "invalid type",
        ),
        (
            r#"{"name":"anon","type":"http-cookie","fallback":{"type":"client-ip","timeout_s":-1}}"#,
            "persistence_profiles[2].fallback.timeout_s",
            "invalid value",
        ),
        (
            r#"{"name":"anon","type":"client-ip","colour":"red"}"#,
            "persistence_profiles[2].colour",
            "does not apply to a \"client-ip\" profile (unknown field `colour`",
        ),
        (
            r#"{"name":"anon","type":"client-ip","select_new_server_when_down":"later"}"#,
            "persistence_profiles[2].select_new_server_when_down",
            "\"later\": expected \"immediate\" or \"never\"",
        ),
        (
            r#"{"name":"anon"}"#,
            "persistence_profiles[2]",
            "missing field `type`",
        ),
    ];
    for (profile, path, reason) in cases {
        let e = err(&with_profile(profile));
        assert_eq!(e.path, path, "{profile}: {e}");
        assert!(
            e.reason.contains(reason),
            "{profile}: {:?} lacks {reason:?}",
            e.reason
        );
    }
}

#[test]
fn serde_variant_errors_are_worded_like_the_others() {
    assert_eq!(
        reword("unknown variant `x`, expected one of `a`, `b`, `c` at line 1 column 9"),
        "\"x\": expected \"a\", \"b\" or \"c\""
    );
    assert_eq!(
        reword("unknown variant `x`, expected `a` or `b`"),
        "\"x\": expected \"a\" or \"b\""
    );
    assert_eq!(
        reword("unknown variant `x`, expected `a`"),
        "\"x\": expected \"a\""
    );
    assert_eq!(reword("invalid type: string"), "invalid type: string");
}

#[test]
fn table_limits_have_defaults_and_bounds() {
    let with_profile = |p: &str| l7_with(r#"{"name":"anon","type":"http-cookie"}"#, p);
    let c = Config::parse(&with_profile(r#"{"name":"anon","type":"url-hash"}"#)).expect("valid");
    assert_eq!(c.profiles[2].table_capacity, 1 << 20);
    assert_eq!(c.profiles[2].max_new_keys_per_source_per_min, 1000);
    let c = Config::parse(&with_profile(
        r#"{"name":"anon","type":"sip-header","table_capacity":5000,"max_new_keys_per_source_per_min":0}"#,
    ))
    .expect("valid");
    assert_eq!(c.profiles[2].table_capacity, 5000);
    assert_eq!(c.profiles[2].max_new_keys_per_source_per_min, 0);
    for (value, reason) in [
        ("0", "0: must be 1 to 67108864 entries"),
        ("67108865", "67108865: must be 1 to 67108864 entries"),
    ] {
        let e = err(&with_profile(&format!(
            r#"{{"name":"anon","type":"client-ip","table_capacity":{value}}}"#
        )));
        assert_eq!(e.path, "persistence_profiles[2].table_capacity", "{e}");
        assert_eq!(e.reason, reason);
    }
    let e = err(&with_profile(
        r#"{"name":"anon","type":"app-cookie","cookie_name":"S","max_new_keys_per_source_per_min":-1}"#,
    ));
    assert_eq!(
        e.path, "persistence_profiles[2].max_new_keys_per_source_per_min",
        "{e}"
    );
}

#[test]
fn session_max_age_has_a_default_bounds_and_applies_to_session_cookies_only() {
    let with_profile = |p: &str| l7_with(r#"{"name":"anon","type":"http-cookie"}"#, p);
    let age = |c: &Config| match &c.profiles[2].kind {
        PersistenceKind::HttpCookie(p) => p.session_max_age.as_secs(),
        k => panic!("not a cookie profile: {k:?}"),
    };
    let c = Config::parse(&with_profile(r#"{"name":"anon","type":"http-cookie"}"#)).expect("valid");
    assert_eq!(age(&c), 86_400, "24 h by default");
    let c = Config::parse(&with_profile(
        r#"{"name":"anon","type":"http-cookie","session_max_age_s":3600}"#,
    ))
    .expect("valid");
    assert_eq!(age(&c), 3600);
    for (profile, reason) in [
        (
            r#"{"name":"anon","type":"http-cookie","session_max_age_s":59}"#,
            "59: must be 60 to 31536000 seconds",
        ),
        (
            r#"{"name":"anon","type":"http-cookie","max_lifetime_min":60,"session_max_age_s":3600}"#,
            "applies to session cookies only: leave it out with max_lifetime_min",
        ),
    ] {
        let e = err(&with_profile(profile));
        assert_eq!(e.path, "persistence_profiles[2].session_max_age_s", "{e}");
        assert_eq!(e.reason, reason);
    }
}
