//! `mirroring`: off by default, validated with the field named.

use super::{GOOD, err};
use std::time::Duration;

use crate::config::{
    Config,
    mirroring::{DEFAULT_LOOKUP_TIMEOUT_MS, Mirroring},
};

fn with_mirroring(m: &str) -> String {
    GOOD.replacen(
        r#""interface": "eth0","#,
        &format!(r#""interface": "eth0", "mirroring": {m},"#),
        1,
    )
}

#[test]
fn mirroring_is_off_by_default_and_validates() {
    assert_eq!(Config::parse(GOOD).expect("valid").mirroring, None);
    let c = Config::parse(&with_mirroring(
        r#"{"redis": "redis://10.0.0.5:6379/0", "instance": "lb-a"}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.mirroring,
        Some(Mirroring {
            redis: "redis://10.0.0.5:6379/0".into(),
            instance: "lb-a".into(),
            lookup_timeout: Duration::from_millis(DEFAULT_LOOKUP_TIMEOUT_MS),
        })
    );
    let c = Config::parse(&with_mirroring(
        r#"{"redis": "redis://h", "instance": "lb-a", "lookup_timeout_ms": 0}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.mirroring.expect("mirroring").lookup_timeout,
        Duration::ZERO,
        "0 turns lookups off"
    );
}

#[test]
fn bad_mirroring_names_the_field() {
    for (m, path, reason) in [
        (
            r#"{"redis": "redis://h", "instance": "lb-a", "x": 1}"#,
            "mirroring.x",
            "unknown field",
        ),
        (
            r#"{"redis": "redis://h"}"#,
            "mirroring",
            "missing field `instance`",
        ),
        (
            r#"{"redis": "http://h", "instance": "a"}"#,
            "mirroring.redis",
            "must start with redis://",
        ),
        (
            r#"{"redis": "rediss://h", "instance": "a"}"#,
            "mirroring.redis",
            "not supported",
        ),
        (
            r#"{"redis": "redis://h:notaport", "instance": "a"}"#,
            "mirroring.redis",
            "not a Redis URL",
        ),
        (
            r#"{"redis": "redis://h", "instance": "a b"}"#,
            "mirroring.instance",
            "A-Z a-z 0-9",
        ),
        (
            r#"{"redis": "redis://h", "instance": "a", "lookup_timeout_ms": 1001}"#,
            "mirroring.lookup_timeout_ms",
            "at most 1000",
        ),
        (
            r#"{"redis": "redis://h", "instance": "a", "lookup_timeout_ms": -1}"#,
            "mirroring.lookup_timeout_ms",
            "invalid value",
        ),
        (
            r#"{"redis": "redis://h", "instance": ""}"#,
            "mirroring.instance",
            "must not be empty",
        ),
    ] {
        let e = err(&with_mirroring(m));
        assert!(
            e.path == path && e.reason.contains(reason),
            "{m}: got {}: {} (want {path}: ...{reason}...)",
            e.path,
            e.reason
        );
    }
}
