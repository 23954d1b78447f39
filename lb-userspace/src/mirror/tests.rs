use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::codec;
use crate::engine::table::Table;

#[test]
fn keys_and_values_round_trip() {
    let k = codec::key("web", "app-cookie:JSESSIONID", 0xdead_beef);
    assert_eq!(
        k,
        "tether:b:web:app-cookie:JSESSIONID:000000000000000000000000deadbeef"
    );
    assert_eq!(
        codec::parse_key(&k),
        Some(("web", "app-cookie:JSESSIONID", 0xdead_beef))
    );
    assert_eq!(codec::parse_key("tether:b:web:client-ip:zz"), None);
    assert_eq!(codec::parse_key("other:web:x:00"), None);
    let v = codec::value(42, "lb-a");
    assert_eq!(codec::parse_value(&v), Some((42, "lb-a")));
    assert_eq!(codec::parse_value("x:lb-a"), None);
    assert_eq!(
        codec::parse_message(&format!("{k}\n{v}")),
        Some((k.as_str(), v.as_str()))
    );
}

#[test]
fn the_watcher_hears_new_and_moved_bindings_not_refreshes_nor_applied_ones() {
    let t: Table<u128> = Table::new(64, Duration::from_secs(10));
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    assert!(t.watch(Box::new(move |k, b, p| h.lock().unwrap().push((*k, b, p)))));
    assert!(!t.watch(Box::new(|_, _, _| {})), "one watcher per table");
    let now = Instant::now();
    t.insert(1, 7, now);
    t.insert(1, 7, now);
    t.insert(1, 8, now);
    assert!(t.apply(2, 9, now), "a new key applied");
    assert!(
        !t.apply(2, 9, now),
        "the same binding again changes nothing"
    );
    assert!(
        t.apply(1, 5, now),
        "another instance's binding replaces ours"
    );
    assert_eq!(t.get(&1, now), Ok(5));
    assert_eq!(t.get(&2, now), Ok(9));
    assert_eq!(
        *heard.lock().unwrap(),
        vec![(1, 7, None), (1, 8, Some(7))],
        "new, then moved; the refresh and the applied ones are not heard"
    );
}

#[test]
fn logged_urls_hide_the_password() {
    assert_eq!(
        super::redact("redis://:secret@10.0.0.5:6379/0"),
        "redis://***@10.0.0.5:6379/0"
    );
    assert_eq!(super::redact("redis://10.0.0.5"), "redis://10.0.0.5");
}

#[test]
fn a_lookup_takes_the_first_binding_mget_returns() {
    use super::lookup::found;
    assert_eq!(found(&[None, Some("7:lb-a".into())]), Some((1, 7)));
    assert_eq!(
        found(&[Some("3:lb-b".into()), Some("7:lb-a".into())]),
        Some((0, 3)),
        "the method's key before the fallback's"
    );
    assert_eq!(
        found(&[Some("garbage".into()), None]),
        None,
        "a value not written by tether is no binding"
    );
    assert_eq!(found(&[]), None);
}

#[test]
fn lookups_are_skipped_while_disconnected_and_not_made_when_off() {
    use std::sync::atomic::Ordering;

    use super::{MirrorStats, lookup::Lookups};
    use crate::engine::mirrored::Remote;

    let stats = Arc::new(MirrorStats::default());
    let keys = [("client-ip".to_string(), 1u128)];
    let l = Lookups::new(Duration::from_millis(50), stats.clone());
    assert!(l.lookup("web", &keys).is_none(), "no connection: not asked");
    assert_eq!(stats.lookups_skipped.load(Ordering::Relaxed), 1);
    assert_eq!(stats.lookups.load(Ordering::Relaxed), 0);
    l.set_timeout(Duration::ZERO);
    assert!(l.lookup("web", &keys).is_none());
    assert_eq!(
        stats.lookups_skipped.load(Ordering::Relaxed),
        1,
        "lookups off: nothing to count"
    );
}

#[test]
fn lookups_beyond_the_cap_are_shed_and_counted() {
    use std::sync::atomic::Ordering;

    use super::{
        MirrorStats,
        lookup::{Lookups, MAX_IN_FLIGHT},
    };
    use crate::engine::mirrored::Remote;

    let stats = Arc::new(MirrorStats::default());
    let keys = [("cookie".to_string(), 7u128)];
    let l = Lookups::new(Duration::from_millis(50), stats.clone());
    let held = l
        .in_flight
        .clone()
        .try_acquire_many_owned(MAX_IN_FLIGHT as u32)
        .expect("all permits free at start");
    assert!(l.lookup("web", &keys).is_none(), "cap reached: not asked");
    assert_eq!(
        stats.lookups_shed.load(Ordering::Relaxed),
        1,
        "shed counted"
    );
    assert_eq!(stats.lookups.load(Ordering::Relaxed), 0, "no lookup made");
    assert_eq!(stats.lookups_skipped.load(Ordering::Relaxed), 0);
    drop(held);
    assert!(l.lookup("web", &keys).is_none(), "no connection: not asked");
    assert_eq!(
        stats.lookups_shed.load(Ordering::Relaxed),
        1,
        "a freed permit is not shed"
    );
    assert_eq!(stats.lookups_skipped.load(Ordering::Relaxed), 1);
    assert_eq!(
        l.in_flight.available_permits(),
        MAX_IN_FLIGHT,
        "a lookup not made gives its permit back"
    );
}

/// Waits (bounded) until `cond` holds, yielding to the mirror's task.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within 5 s");
}

/// A reload's `mirroring` reaches the running mirror: a change is taken (and only a
/// change), and with the section removed the task discards what the tables send instead
/// of queueing it for Redis.
#[tokio::test]
async fn a_reloaded_mirroring_is_taken_and_removing_it_discards_bindings() {
    use std::sync::atomic::Ordering;

    use crate::config::mirroring::{Mirroring, Redis};
    // Nothing listens on port 1 of loopback: every connection fails at once.
    let down = Mirroring {
        redis: Redis::Server("redis://127.0.0.1:1".into()),
        instance: "lb-a".into(),
        lookup_timeout: Duration::from_millis(50),
    };
    let m = super::Mirror::start(&down, None);
    let tx = m.sender();
    let send = |n: u128| {
        super::offer(
            &tx,
            &m.stats,
            super::Event {
                service: "web".into(),
                table: "client-ip".into(),
                key: n,
                backend: 1,
                previous: None,
                ttl_ms: 1000,
                at: Instant::now(),
            },
        )
    };
    for n in 0..10 {
        send(n);
    }
    eventually("bindings wait for the Redis that is down", || {
        m.stats.pending.load(Ordering::Relaxed) >= 10
    })
    .await;
    assert!(!m.reconfigure(Some(&down)), "the same section is no change");
    assert!(m.reconfigure(None), "the section removed");
    assert!(!m.reconfigure(None), "removed twice is no change");
    eventually("nothing waits once mirroring is removed", || {
        m.stats.pending.load(Ordering::Relaxed) == 0
    })
    .await;
    for n in 0..10 {
        send(n);
    }
    eventually("the task discards what the tables send", || {
        tx.capacity() == super::QUEUE_CAPACITY
    })
    .await;
    assert_eq!(m.stats.pending.load(Ordering::Relaxed), 0);
    let renamed = Mirroring {
        instance: "lb-b".into(),
        ..down.clone()
    };
    assert!(
        m.reconfigure(Some(&renamed)),
        "added back under another name"
    );
}

/// With Sentinel, each session asks the sentinels for the master: none answering is a
/// failed connection (retried with backoff like a standalone server that is down), within
/// the sentinel timeout, not a hang.
#[tokio::test]
async fn sentinels_down_is_a_failed_connection() {
    use crate::config::mirroring::{Redis, Sentinel};
    let redis = Redis::Sentinel(Sentinel {
        nodes: vec!["redis://127.0.0.1:1".into(), "redis://127.0.0.1:2".into()],
        master: "mymaster".into(),
        username: None,
        password: Some("secret".into()),
        db: 0,
    });
    assert_eq!(
        super::describe(&redis),
        "master \"mymaster\" of the sentinels redis://127.0.0.1:1, redis://127.0.0.1:2"
    );
    let mut source = super::worker::Source::new(&redis).expect("a valid Sentinel client");
    let r = tokio::time::timeout(Duration::from_secs(10), source.client())
        .await
        .expect("the sentinel lookup is bounded");
    assert!(
        r.is_err(),
        "no sentinel answers: {:?}",
        r.map(|c| c.get_connection_info().addr().to_string())
    );

    let server = Redis::Server("redis://127.0.0.1:1/2".into());
    let mut source = super::worker::Source::new(&server).expect("a valid URL");
    let c = source
        .client()
        .await
        .expect("a standalone server is not looked up");
    assert_eq!(c.get_connection_info().addr().to_string(), "127.0.0.1:1");
}

/// A reload that removes `mirroring` stops the lookups (nothing asked, nothing counted);
/// one that adds it back starts them again, skipped while that Redis is not connected.
#[tokio::test]
async fn removing_mirroring_by_a_reload_stops_the_lookups() {
    use std::sync::atomic::Ordering;

    use crate::{
        config::mirroring::{Mirroring, Redis},
        engine::mirrored::Remote,
    };
    let down = Mirroring {
        redis: Redis::Server("redis://127.0.0.1:1".into()),
        instance: "lb-a".into(),
        lookup_timeout: Duration::from_millis(50),
    };
    let m = super::Mirror::start(&down, None);
    let keys = [("client-ip".to_string(), 1u128)];
    let skipped = || m.stats.lookups_skipped.load(Ordering::Relaxed);
    let before = skipped();
    assert!(m.lookups.lookup("web", &keys).is_none(), "not connected");
    assert_eq!(skipped(), before + 1, "skipped while Redis is down");
    assert!(m.reconfigure(None));
    eventually("lookups off once mirroring is removed", || {
        let n = skipped();
        m.lookups.lookup("web", &keys).is_none() && skipped() == n
    })
    .await;
    assert!(m.reconfigure(Some(&down)));
    eventually("lookups back with the section", || {
        let n = skipped();
        m.lookups.lookup("web", &keys).is_none() && skipped() == n + 1
    })
    .await;
}

#[test]
fn the_catch_up_scans_every_live_master_cluster_nodes_lists() {
    let nodes = "\
0b38 10.0.0.7:7002@17002 master - 0 1796046362034 3 connected 10923-16383
59a7 10.0.0.5:7000@17000,n1.example master - 0 1796046361030 1 connected 0-5460
cec6 10.0.0.6:7001@17001 myself,master - 0 1796046362000 2 connected 5461-10922
d001 10.0.0.8:7003@17003 slave 59a7 0 1796046362000 1 connected
d002 10.0.0.9:7004@17004 master,fail - 0 1796046362000 4 disconnected
d003 [::1]:7005@17005 master - 0 1796046362000 5 connected
";
    assert_eq!(
        super::worker::masters(nodes),
        vec![
            ("10.0.0.7".to_string(), 7002),
            ("10.0.0.5".to_string(), 7000),
            ("10.0.0.6".to_string(), 7001),
            ("::1".to_string(), 7005),
        ],
        "masters only, not failed ones nor replicas"
    );
}
