//! `mirroring`: off by default, validated with the field named.

use super::{GOOD, err};
use std::time::Duration;

use crate::config::{
    Config,
    mirroring::{Cluster, DEFAULT_LOOKUP_TIMEOUT_MS, Mirroring, Redis, Sentinel},
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
            redis: Redis::Server("redis://10.0.0.5:6379/0".into()),
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
fn sentinel_names_the_sentinels_and_the_master() {
    let c = Config::parse(&with_mirroring(
        r#"{"sentinel": {"nodes": ["redis://10.0.0.5:26379", " redis://10.0.0.6:26379 "],
                         "master": "mymaster", "password": "s3"}, "instance": "lb-a"}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.mirroring,
        Some(Mirroring {
            redis: Redis::Sentinel(Sentinel {
                nodes: vec![
                    "redis://10.0.0.5:26379".into(),
                    "redis://10.0.0.6:26379".into()
                ],
                master: "mymaster".into(),
                username: None,
                password: Some("s3".into()),
                db: 0,
            }),
            instance: "lb-a".into(),
            lookup_timeout: Duration::from_millis(DEFAULT_LOOKUP_TIMEOUT_MS),
        })
    );
}

#[test]
fn cluster_names_its_nodes() {
    let c = Config::parse(&with_mirroring(
        r#"{"cluster": {"nodes": ["redis://10.0.0.5:7000", " redis://u:p@10.0.0.6:7000 "]},
            "instance": "lb-a"}"#,
    ))
    .expect("valid");
    assert_eq!(
        c.mirroring,
        Some(Mirroring {
            redis: Redis::Cluster(Cluster {
                nodes: vec![
                    "redis://10.0.0.5:7000".into(),
                    "redis://u:p@10.0.0.6:7000".into()
                ],
            }),
            instance: "lb-a".into(),
            lookup_timeout: Duration::from_millis(DEFAULT_LOOKUP_TIMEOUT_MS),
        })
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
            // A cluster is `cluster.nodes`: a list of nodes is not a URL.
            r#"{"redis": ["redis://n1:7000", "redis://n2:7000"], "instance": "a"}"#,
            "mirroring.redis",
            "invalid type",
        ),
        (
            r#"{"instance": "a"}"#,
            "mirroring.redis",
            "or a cluster section",
        ),
        (
            r#"{"redis": "redis://h", "cluster": {"nodes": ["redis://n:7000"]}, "instance": "a"}"#,
            "mirroring.cluster",
            "not redis and cluster",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s:26379"], "master": "m"}, "cluster": {"nodes": ["redis://n:7000"]}, "instance": "a"}"#,
            "mirroring.cluster",
            "not sentinel and cluster",
        ),
        (
            r#"{"cluster": {"nodes": []}, "instance": "a"}"#,
            "mirroring.cluster.nodes",
            "at least one cluster node",
        ),
        (
            r#"{"cluster": {"nodes": ["redis://n:7000", "redis+unix:///n"]}, "instance": "a"}"#,
            "mirroring.cluster.nodes[1]",
            "must start with redis://",
        ),
        (
            r#"{"cluster": {"nodes": ["redis://n:port"]}, "instance": "a"}"#,
            "mirroring.cluster.nodes[0]",
            "not a Redis URL",
        ),
        (
            r#"{"cluster": {"nodes": ["redis://n:7000"], "master": "m"}, "instance": "a"}"#,
            "mirroring.cluster.master",
            "unknown field",
        ),
        (
            r#"{"redis": "redis://h", "sentinel": {"nodes": ["redis://s:26379"], "master": "m"}, "instance": "a"}"#,
            "mirroring.sentinel",
            "not redis and sentinel",
        ),
        (
            r#"{"sentinel": {"nodes": [], "master": "m"}, "instance": "a"}"#,
            "mirroring.sentinel.nodes",
            "at least one sentinel",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s:26379", "redis+unix:///s"], "master": "m"}, "instance": "a"}"#,
            "mirroring.sentinel.nodes[1]",
            "must start with redis://",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s:port"], "master": "m"}, "instance": "a"}"#,
            "mirroring.sentinel.nodes[0]",
            "not a Redis URL",
        ),
        (
            r#"{"sentinel": {"nodes": ["rediss://s"], "master": "m"}, "instance": "a"}"#,
            "mirroring.sentinel.nodes[0]",
            "not supported",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s"]}, "instance": "a"}"#,
            "mirroring.sentinel",
            "missing field `master`",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s"], "master": "my master"}, "instance": "a"}"#,
            "mirroring.sentinel.master",
            "A-Z a-z 0-9",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s"], "master": "m", "db": -1}, "instance": "a"}"#,
            "mirroring.sentinel.db",
            "0 or more",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s"], "master": "m", "password": ""}, "instance": "a"}"#,
            "mirroring.sentinel.password",
            "must not be empty",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://s"], "master": "m", "port": 1}, "instance": "a"}"#,
            "mirroring.sentinel.port",
            "unknown field",
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

/// A bad Redis URL's error (logged, and returned by a reload) never shows its password.
#[test]
fn bad_redis_urls_are_reported_without_their_password() {
    for (m, path, reason) in [
        (
            r#"{"redis": "http://u:s3cr3t-pw@h", "instance": "a"}"#,
            "mirroring.redis",
            "must start with redis://",
        ),
        (
            r#"{"redis": "redis://u:s3cr3t-pw@h:notaport", "instance": "a"}"#,
            "mirroring.redis",
            "not a Redis URL",
        ),
        (
            r#"{"sentinel": {"nodes": ["redis://:s3cr3t-pw@s:port"], "master": "m"}, "instance": "a"}"#,
            "mirroring.sentinel.nodes[0]",
            "not a Redis URL",
        ),
        (
            r#"{"sentinel": {"nodes": ["tcp://:s3cr3t-pw@s"], "master": "m"}, "instance": "a"}"#,
            "mirroring.sentinel.nodes[0]",
            "must start with redis://",
        ),
        (
            r#"{"cluster": {"nodes": ["redis://:s3cr3t-pw@n:port"]}, "instance": "a"}"#,
            "mirroring.cluster.nodes[0]",
            "not a Redis URL",
        ),
        (
            r#"{"cluster": {"nodes": [":s3cr3t-pw@n:7000"]}, "instance": "a"}"#,
            "mirroring.cluster.nodes[0]",
            "must start with redis://",
        ),
    ] {
        let e = err(&with_mirroring(m));
        assert!(
            e.path == path && e.reason.contains(reason),
            "{m}: got {}: {} (want {path}: ...{reason}...)",
            e.path,
            e.reason
        );
        assert!(
            !e.reason.contains("s3cr3t-pw") && e.reason.contains("***@"),
            "{m}: the password shows, or no masked URL: {}",
            e.reason
        );
    }
}
