//! TLS persistence through the engine: a connection decided on its ClientHello, its tickets,
//! its requests, and the down policies.

use std::{sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use lb_common::backend_identity;

use super::*;
use crate::{
    balancer::{Previous, assign_ids},
    state::Snapshot,
};

/// A terminating service `tls` over b1..b3 with a `tls-ticket` profile and `down` policy.
fn setup(down: &str, states: &[BackendState]) -> (Arc<Config>, SharedSnapshot, Engine) {
    let dir =
        std::env::temp_dir().join(format!("tether-tls-session-{}-{down}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["c.pem", "k.pem"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
    let cfg = Arc::new(
        Config::parse(&format!(
            r#"{{"interface":"lo",
            "virtual_services":[{{"name":"tls","vip":"127.0.0.1","port":8443,"protocol":"tcp","mode":"l7","pool":"web","persistence":"tk",
               "tls":{{"cert_file":"{d}/c.pem","key_file":"{d}/k.pem"}}}}],
            "pools":[{{"name":"web","backends":[{{"name":"b1","address":"10.0.0.1"}},{{"name":"b2","address":"10.0.0.2"}},{{"name":"b3","address":"10.0.0.3"}}]}}],
            "persistence_profiles":[{{"name":"tk","type":"tls-ticket","select_new_server_when_down":"{down}",
               "keys":[{{"id":1,"secret":"0101010101010101010101010101010101010101010101010101010101010101"}}]}}]}}"#,
            d = dir.display()
        ))
        .expect("valid test config"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let ids = assign_ids(&cfg, &Previous::default()).unwrap();
    let mut s = Snapshot::empty(cfg.clone(), SystemTime::now());
    s.service_index = ids.services;
    s.backend_ids = ids.backends;
    s.backend_state = vec![states.to_vec()];
    s.health = vec![vec![None; states.len()]];
    let snap: SharedSnapshot = Arc::new(ArcSwap::from_pointee(s));
    let engine = Engine::new(&cfg, &cfg.services[0], snap.clone()).expect("engine");
    (cfg, snap, engine)
}

fn set_states(snap: &SharedSnapshot, states: &[BackendState]) {
    let mut s = (**snap.load()).clone();
    s.backend_state = vec![states.to_vec()];
    s.generation += 1;
    snap.store(Arc::new(s));
}

fn conn(session: Option<u32>) -> ConnInfo {
    ConnInfo {
        client: "192.0.2.7:40000".parse().unwrap(),
        local: "127.0.0.1:8443".parse().unwrap(),
        tls: true,
        alpn_h2: false,
        session,
    }
}

fn hello(ticket: Option<Vec<u8>>) -> ClientHello {
    ClientHello {
        session_ticket: ticket,
        ..ClientHello::default()
    }
}

fn id(name: &str) -> u32 {
    backend_identity("web", name)
}

fn route(e: &Engine, session: Option<u32>) -> Result<SocketAddr, StatusCode> {
    let mut req = http::Request::new(()).into_parts().0;
    let r = e.route(&mut req, &conn(session), &[])?;
    e.finished(&r);
    Ok(r.backend)
}

const UP: [BackendState; 3] = [BackendState::Up; 3];

#[test]
fn a_connection_is_bound_and_its_tickets_bring_the_client_back() {
    let (_, _, e) = setup("immediate", &UP);
    assert!(e.uses_tls_sessions());
    let first = e.tls_session(&conn(None), &hello(None)).expect("a session");
    let second = e.tls_session(&conn(None), &hello(None)).expect("a session");
    assert_ne!(first.backend, second.backend, "new sessions are balanced");
    // Every request on the connection goes to its backend, whatever the balancing says.
    let addr = route(&e, Some(first.backend)).expect("routed");
    for _ in 0..5 {
        assert_eq!(route(&e, Some(first.backend)), Ok(addr));
    }
    // The ticket issued on the first connection brings a new connection back to it.
    let ticket = first.ticketer.encrypt(b"state").expect("sealed");
    for _ in 0..3 {
        let again = e
            .tls_session(&conn(None), &hello(Some(ticket.clone())))
            .expect("a session");
        assert_eq!(again.backend, first.backend);
    }
    let stats = &e.stats;
    assert!(
        stats
            .persist_hits
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 8
    );
}

#[test]
fn down_backends_follow_the_profile_policy() {
    let (_, snap, e) = setup("immediate", &UP);
    let s = e.tls_session(&conn(None), &hello(None)).expect("a session");
    let ticket = s.ticketer.encrypt(b"state").expect("sealed");
    let down: Vec<BackendState> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| {
            if id(n) == s.backend {
                BackendState::Down
            } else {
                BackendState::Up
            }
        })
        .collect();
    set_states(&snap, &down);
    let moved = e
        .tls_session(&conn(None), &hello(Some(ticket)))
        .expect("moved");
    assert_ne!(
        moved.backend, s.backend,
        "immediate: moved off the down backend"
    );
    // The tickets of the new connection name the new backend.
    let t2 = moved.ticketer.encrypt(b"state").expect("sealed");
    assert_eq!(
        e.tls_session(&conn(None), &hello(Some(t2)))
            .expect("a session")
            .backend,
        moved.backend
    );

    let (_, snap, e) = setup("never", &UP);
    let s = e.tls_session(&conn(None), &hello(None)).expect("a session");
    let ticket = s.ticketer.encrypt(b"state").expect("sealed");
    let down: Vec<BackendState> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| {
            if id(n) == s.backend {
                BackendState::Down
            } else {
                BackendState::Up
            }
        })
        .collect();
    set_states(&snap, &down);
    let kept = e
        .tls_session(&conn(None), &hello(Some(ticket)))
        .expect("still bound");
    assert_eq!(
        kept.backend, s.backend,
        "never: the session keeps its backend"
    );
    assert_eq!(
        route(&e, Some(kept.backend)),
        Err(StatusCode::SERVICE_UNAVAILABLE),
        "and its requests wait for it"
    );
    set_states(&snap, &UP);
    assert!(route(&e, Some(kept.backend)).is_ok(), "until it is back");
}
