//! `gslb`: site persistence settings, validated with the field named.

use super::{GOOD, L7, err};
use crate::config::{
    Config,
    gslb::{DEFAULT_COOKIE_NAME, WrongSite},
};

fn with_gslb(base: &str, g: &str) -> String {
    base.replacen(
        r#""interface": "eth0","#,
        &format!(r#""interface": "eth0", "gslb": {g},"#),
        1,
    )
}

#[test]
fn gslb_validates_with_defaults() {
    assert_eq!(
        Config::parse(L7).expect("valid").gslb,
        None,
        "off by default"
    );
    let c = Config::parse(&with_gslb(
        L7,
        r#"{"site": "east", "services": ["app"], "peers": [{"site": "west", "address": "198.51.100.10"}]}"#,
    ))
    .expect("valid");
    let g = c.gslb.expect("gslb");
    assert_eq!(g.site, "east");
    assert_eq!(g.on_wrong_site, WrongSite::Proxy);
    assert_eq!(g.cookie_name, DEFAULT_COOKIE_NAME);
    assert_eq!(g.peers[0].address.to_string(), "198.51.100.10");
    assert!(g.covers("app") && !g.covers("web"));
}

#[test]
fn bad_gslb_names_the_field() {
    let peer = r#"{"site": "west", "address": "198.51.100.10"}"#;
    for (base, g, path, reason) in [
        (L7, format!(r#"{{"site": "east", "services": ["nope"], "peers": [{peer}]}}"#), "gslb.services[0]", "no virtual service"),
        (GOOD, format!(r#"{{"site": "east", "services": ["web"], "peers": [{peer}]}}"#), "gslb.services[0]", "needs an l7 HTTP service"),
        (L7, r#"{"site": "east", "services": ["app"], "peers": [{"site": "east", "address": "198.51.100.10"}]}"#.to_string(), "gslb.peers[0].site", "every site is named once"),
        (L7, r#"{"site": "east", "services": ["app"], "peers": [{"site": "west", "address": "west.example"}]}"#.to_string(), "gslb.peers[0].address", "not an IPv4 or IPv6 address"),
        (L7, format!(r#"{{"site": "east", "services": ["app"], "peers": [{peer}], "on_wrong_site": "drop"}}"#), "gslb.on_wrong_site", "expected \"proxy\" or \"redirect\""),
        (L7, format!(r#"{{"site": "east", "services": ["app"], "peers": [{peer}], "cookie_name": "a b"}}"#), "gslb.cookie_name", "not a cookie name"),
        (L7, format!(r#"{{"site": "e st", "services": ["app"], "peers": [{peer}]}}"#), "gslb.site", "A-Z a-z 0-9"),
    ] {
        let e = err(&with_gslb(base, &g));
        assert!(
            e.path == path && e.reason.contains(reason),
            "{g}: got {}: {} (want {path}: ...{reason}...)",
            e.path,
            e.reason
        );
    }
}
