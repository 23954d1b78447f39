//! What the control loop decides on a reload without touching the kernel: which listeners
//! restart, which engines (and their tables) are kept, and the backends' effective states.

use super::*;
use crate::{
    config::ServiceMode, dataplane::net::l4_pools, engine::EngineSpec, frontends::Settings,
};

const KEY_A: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const KEY_B: &str = "0202020202020202020202020202020202020202020202020202020202020202";

/// Two services (one l7 with a cookie profile, one l4) over two pools; `profile` and
/// `limits` are spliced in.
fn config(profile: &str, limits: &str, algorithm: &str) -> Config {
    Config::parse(&format!(
        r#"{{"interface":"lo",
        "virtual_services":[
          {{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p","limits":{limits}}},
          {{"name":"dns","vip":"127.0.0.2","port":53,"protocol":"udp","mode":"l4-dsr","pool":"dns"}}],
        "pools":[
          {{"name":"web","algorithm":"{algorithm}","backends":[{{"name":"b1","address":"10.0.0.1","admin_state":"draining"}},{{"name":"b2","address":"10.0.0.2","weight":0}},{{"name":"b3","address":"10.0.0.3"}}]}},
          {{"name":"dns","backends":[{{"name":"d1","address":"10.0.1.1"}}]}}],
        "persistence_profiles":[{profile}]}}"#
    ))
    .unwrap_or_else(|e| panic!("test config: {e}"))
}

fn cookie(keys: &[(u8, &str)], lifetime: u32) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|(id, s)| format!(r#"{{"id":{id},"secret":"{s}"}}"#))
        .collect();
    format!(
        r#"{{"name":"p","type":"http-cookie","cookie_name":"SRV","max_lifetime_min":{lifetime},"keys":[{}]}}"#,
        keys.join(",")
    )
}

/// What decides whether a reload restarts the serve task (listener settings) and whether it
/// keeps the engine and its tables.
fn specs(cfg: &Config) -> (Settings, EngineSpec) {
    let svc = &cfg.services[0];
    let ServiceMode::L7(o) = &svc.mode else {
        panic!("web is l7")
    };
    (Settings::of(o), EngineSpec::of(cfg, svc))
}

#[test]
fn rotated_keys_keep_the_engine_and_the_listener() {
    let before = config(&cookie(&[(1, KEY_A)], 30), "{}", "round-robin");
    let after = config(&cookie(&[(2, KEY_B), (1, KEY_A)], 30), "{}", "round-robin");
    assert_eq!(specs(&before), specs(&after));
}

#[test]
fn a_changed_profile_or_algorithm_replaces_the_engine_only() {
    let base = config(&cookie(&[(1, KEY_A)], 30), "{}", "round-robin");
    let (listener, engine) = specs(&base);
    for changed in [
        config(&cookie(&[(1, KEY_A)], 60), "{}", "round-robin"),
        config(&cookie(&[(1, KEY_A)], 30), "{}", "least-connections"),
    ] {
        let (l, e) = specs(&changed);
        assert_eq!(l, listener, "the listener stays");
        assert_ne!(e, engine, "the engine is rebuilt");
    }
}

#[test]
fn changed_limits_restart_the_listener_and_keep_the_engine() {
    let base = config(&cookie(&[(1, KEY_A)], 30), "{}", "round-robin");
    let changed = config(
        &cookie(&[(1, KEY_A)], 30),
        r#"{"max_connections":5}"#,
        "round-robin",
    );
    let (l0, e0) = specs(&base);
    let (l1, e1) = specs(&changed);
    assert_ne!(l0, l1);
    assert_eq!(e0, e1);
}

#[test]
fn effective_states_combine_admin_state_weight_and_health() {
    let cfg = config(&cookie(&[(1, KEY_A)], 30), "{}", "round-robin");
    let down = Some(Health {
        up: false,
        detail: "refused".into(),
        since: SystemTime::UNIX_EPOCH,
    });
    let health = vec![vec![None, None, down], vec![None]];
    assert_eq!(
        states(&cfg, &health),
        vec![
            vec![
                BackendState::Draining,
                BackendState::Draining,
                BackendState::Down
            ],
            vec![BackendState::Up]
        ]
    );
}

#[test]
fn only_pools_of_l4_services_need_l2_resolution() {
    let cfg = config(&cookie(&[(1, KEY_A)], 30), "{}", "round-robin");
    assert_eq!(l4_pools(&cfg), vec![false, true]);
}

/// An l4 service `web` at kernel index 7 with `profile` (a client-ip profile `p`, or none).
fn l4_config(profile: Option<&str>) -> (Config, Ids) {
    let (persistence, profiles) = match profile {
        Some(p) => (r#","persistence":"p""#, format!("[{p}]")),
        None => ("", "[]".to_string()),
    };
    let cfg = Config::parse(&format!(
        r#"{{"interface":"lo",
        "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web"{persistence}}}],
        "pools":[{{"name":"web","backends":[{{"name":"b1","address":"10.0.0.1"}}]}}],
        "persistence_profiles":{profiles}}}"#
    ))
    .unwrap_or_else(|e| panic!("test config: {e}"));
    let ids = Ids {
        services: vec![7],
        backends: vec![vec![1]],
    };
    (cfg, ids)
}

#[test]
fn only_a_changed_l4_persistence_key_flushes_the_services_entries() {
    let ip = |extra: &str| format!(r#"{{"name":"p","type":"client-ip","timeout_s":600{extra}}}"#);
    let (base, ids) = l4_config(Some(&ip("")));
    let rekeyed = |p: Option<&str>| {
        let (new, new_ids) = l4_config(p);
        rekey::rekeyed_l4(&base, &ids, &new, &new_ids)
    };
    // The timeout and the policy are read with each lookup: entries stay.
    assert_eq!(rekeyed(Some(&ip(""))), Vec::<u32>::new());
    assert_eq!(
        rekeyed(Some(r#"{"name":"p","type":"client-ip","timeout_s":60}"#)),
        Vec::<u32>::new()
    );
    assert_eq!(
        rekeyed(Some(&ip(r#","select_new_server_when_down":"never""#))),
        Vec::<u32>::new()
    );
    // Another prefix, or persistence off: the entries of index 7 go.
    assert_eq!(rekeyed(Some(&ip(r#","ipv4_prefix":24"#))), vec![7]);
    assert_eq!(rekeyed(Some(&ip(r#","ipv6_prefix":64"#))), vec![7]);
    assert_eq!(
        rekeyed(Some(r#"{"name":"p","type":"client-ip","timeout_s":0}"#)),
        vec![7]
    );
    assert_eq!(rekeyed(None), vec![7]);
    // A service that had no entries has nothing to flush.
    let (none, none_ids) = l4_config(None);
    let (new, new_ids) = l4_config(Some(&ip("")));
    assert_eq!(
        rekey::rekeyed_l4(&none, &none_ids, &new, &new_ids),
        Vec::<u32>::new()
    );
}
