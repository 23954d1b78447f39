//! Bindings carried to a successor engine: across a reload in memory, across a restart
//! through the snapshot file.

use super::*;
use crate::{
    engine::saved::{self, STATE_FILE, SavedEngine, SavedState, SavedTable},
    state::{L7Filter, L7Tables},
};

/// One l7 service over b1..b3 with `profile`.
fn cfg_with(profile: &str) -> Arc<Config> {
    Arc::new(
        Config::parse(&format!(
            r#"{{"interface":"lo",
            "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}}],
            "pools":[{{"name":"web","backends":[{{"name":"b1","address":"10.0.0.1"}},{{"name":"b2","address":"10.0.0.2"}},{{"name":"b3","address":"10.0.0.3"}}]}}],
            "persistence_profiles":[{profile}]}}"#
        ))
        .unwrap_or_else(|e| panic!("test config: {e}")),
    )
}

const APP: &str = r#"{"name":"p","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":600,"fallback":{"type":"client-ip","timeout_s":600}}"#;

/// An engine that learned a session on each backend and bound one client by the fallback.
fn learned(cfg: &Arc<Config>) -> (Engine, Vec<(SocketAddr, String)>) {
    let snap = shared(cfg, &UP);
    let e = router(cfg, &snap, 0);
    let mut sessions = Vec::new();
    for i in 0..3 {
        let id = format!("s{i}");
        let (b, _, _) = exchange(
            &e,
            &conn(&format!("203.0.113.{}", i + 1)),
            "/login",
            None,
            Some(&format!("JSESSIONID={id}; Path=/")),
        );
        sessions.push((b, id));
    }
    (e, sessions)
}

/// Where each session goes on `e`, from clients it has never seen.
fn followed(e: &Engine, sessions: &[(SocketAddr, String)]) -> bool {
    sessions.iter().enumerate().all(|(i, (b, id))| {
        exchange(
            e,
            &conn(&format!("198.51.100.{}", i + 1)),
            "/",
            Some(&format!("JSESSIONID={id}")),
            None,
        )
        .0 == *b
    })
}

#[test]
fn a_changed_timeout_or_algorithm_keeps_the_bindings() {
    let cfg = cfg_with(APP);
    let (old, sessions) = learned(&cfg);
    // The client that logged in first, without its session: bound by the fallback.
    let client = conn("203.0.113.1");
    let fallback_backend = sessions[0].0;
    let changed = cfg_with(&APP.replace(
        "\"timeout_s\":600,\"fallback\"",
        "\"timeout_s\":900,\"fallback\"",
    ))
    .as_ref()
    .clone();
    let mut changed = changed;
    changed.pools[0].algorithm = crate::config::Algorithm::LeastConnections;
    let changed = Arc::new(changed);
    let new = router(&changed, &shared(&changed, &UP), 0);
    let n = new.import(&changed, &old.export());
    assert_eq!(n, 6, "three sessions and three clients of the fallback");
    assert!(followed(&new, &sessions), "sessions keep their backends");
    assert_eq!(
        exchange(&new, &client, "/", None, None).0,
        fallback_backend,
        "the client without a session keeps its backend"
    );
}

#[test]
fn a_changed_key_source_starts_empty_and_removed_backends_are_dropped() {
    let cfg = cfg_with(APP);
    let (old, sessions) = learned(&cfg);
    let renamed = cfg_with(&APP.replace("JSESSIONID", "SID"));
    let new = router(&renamed, &shared(&renamed, &UP), 0);
    assert_eq!(
        new.import(&renamed, &old.export()),
        3,
        "only the fallback table carries over to another cookie name"
    );
    // b2 leaves the pool: its session is dropped, the others stay.
    let mut fewer = (*cfg).clone();
    fewer.pools[0].backends.remove(1);
    let fewer = Arc::new(fewer);
    let new = router(&fewer, &shared(&fewer, &[BackendState::Up; 2]), 0);
    new.import(&fewer, &old.export());
    let kept: Vec<String> = new
        .bindings(&L7Filter::default())
        .iter()
        .filter(|b| b.table == "app-cookie")
        .map(|b| format!("{:x}", b.backend))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    let gone = sessions
        .iter()
        .find(|(b, _)| *b == "10.0.0.2:8080".parse().unwrap())
        .expect("a session on b2");
    assert!(
        !new.bindings(&L7Filter::default())
            .iter()
            .any(|b| b.backend == lb_common::backend_identity("web", "b2")),
        "{gone:?} was dropped"
    );
}

#[test]
fn ages_survive_and_entries_past_their_timeout_are_left_out() {
    let cfg = cfg_with(r#"{"name":"p","type":"client-ip","timeout_s":60,"ipv4_prefix":24}"#);
    let e = router(&cfg, &shared(&cfg, &UP), 0);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let key = |ip: [u8; 4]| u128::from_be_bytes(lb_common::v4_mapped(ip));
    let b2 = lb_common::backend_identity("web", "b2");
    let saved = SavedEngine {
        service: "web".into(),
        tables: vec![SavedTable {
            id: "client-ip".into(),
            entries: vec![
                (key([192, 0, 2, 0]), b2, now_ms - 30_000),
                (key([192, 0, 3, 0]), b2, now_ms - 120_000),
            ],
        }],
    };
    assert_eq!(
        e.import(&cfg, &saved),
        1,
        "the entry idle 120 s > 60 s is left out"
    );
    let b = &e.bindings(&L7Filter::default())[0];
    assert_eq!(b.client, Some(("192.0.2.0".parse().unwrap(), 24)));
    assert!(
        (30..32).contains(&b.idle.as_secs()),
        "idle since its saved last use: {:?}",
        b.idle
    );
    assert_eq!(
        exchange(&e, &conn("192.0.2.77"), "/", None, None).0,
        "10.0.0.2:8080".parse().unwrap()
    );
    // A shorter prefix after a reload: the address is masked again.
    let wider = cfg_with(r#"{"name":"p","type":"client-ip","timeout_s":60,"ipv4_prefix":16}"#);
    let e2 = router(&wider, &shared(&wider, &UP), 0);
    assert_eq!(e2.import(&wider, &e.export()), 1);
    assert_eq!(
        e2.bindings(&L7Filter::default())[0].client,
        Some(("192.0.0.0".parse().unwrap(), 16))
    );
}

#[test]
fn the_snapshot_file_round_trips_and_a_bad_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("tether-saved-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(saved::read(&dir), Ok(None), "no snapshot yet");
    let cfg = cfg_with(APP);
    let (old, sessions) = learned(&cfg);
    let state = saved::collect([&old]);
    saved::write(&dir, &state).expect("written");
    let back = saved::read(&dir).expect("readable").expect("present");
    assert_eq!(back, state);
    // A restart: a new engine takes the saved bindings.
    let new = router(&cfg, &shared(&cfg, &UP), 0);
    let svc = back.services.iter().find(|s| s.service == "web").unwrap();
    assert_eq!(new.import(&cfg, svc), 6);
    assert!(followed(&new, &sessions));
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from(STATE_FILE)],
        "no temporary file left"
    );
    std::fs::write(dir.join(STATE_FILE), b"{\"version\":1").unwrap();
    assert!(
        saved::read(&dir)
            .unwrap_err()
            .contains("not an L7 tables snapshot")
    );
    let other = SavedState {
        version: 99,
        services: Vec::new(),
    };
    std::fs::write(dir.join(STATE_FILE), serde_json::to_vec(&other).unwrap()).unwrap();
    assert!(saved::read(&dir).unwrap_err().contains("version 99"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_a_predecessor_learned_while_draining_fills_only_the_gaps() {
    let dir = std::env::temp_dir().join(format!("tether-drained-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = cfg_with(APP).as_ref().clone();
    cfg.state_dir = dir.clone();
    let cfg = Arc::new(cfg);
    // The predecessor learned three sessions (and their clients by the fallback) after the
    // successor had loaded its tables.
    let (old, sessions) = learned(&cfg);
    let new = Arc::new(router(&cfg, &shared(&cfg, &UP), 0));
    // Meanwhile the successor bound session s0 itself, to another backend.
    let elsewhere = (1..=3)
        .map(|i| conn(&format!("192.0.2.{i}")))
        .find(|c| exchange(&new, c, "/", None, None).0 != sessions[0].0)
        .expect("round robin reaches another backend");
    let (moved_to, _, _) = exchange(
        &new,
        &elsewhere,
        "/login",
        None,
        Some(&format!("JSESSIONID={}; Path=/", sessions[0].1)),
    );
    assert_ne!(moved_to, sessions[0].0);
    let routers = || std::iter::once(("web", &new));
    assert_eq!(
        crate::handoff::merge_drained_l7_state(&cfg, routers()).expect("nothing to merge"),
        0
    );
    crate::handoff::save_drained_l7_state(&cfg, std::iter::once(("web", &Arc::new(old))))
        .expect("written");
    let added = crate::handoff::merge_drained_l7_state(&cfg, routers()).expect("merged");
    assert_eq!(
        added, 5,
        "s1, s2 and the three clients; s0 is bound here already"
    );
    assert!(
        followed(&new, &sessions[1..]),
        "the predecessor's sessions are followed"
    );
    assert!(
        followed(&new, &[(moved_to, sessions[0].1.clone())],),
        "s0 keeps the successor's binding"
    );
    assert!(
        !dir.join(saved::DRAINED_FILE).exists(),
        "merged once: the file is removed"
    );
    assert_eq!(
        crate::handoff::merge_drained_l7_state(&cfg, routers()).expect("nothing left"),
        0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
