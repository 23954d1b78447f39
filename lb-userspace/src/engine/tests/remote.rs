//! A local miss of a stored table asks the remote (mirroring) where the input can wait.

use std::sync::Mutex;

use futures_util::future::BoxFuture;

use super::*;
use crate::engine::{
    mirrored::{Found, Remote},
    table::digest,
};

/// What a remote was asked: the service and its (table id, key) pairs.
type Asked = (String, Vec<(String, u128)>);

/// Answers every lookup with `answer` (`None` for "not connected"), and keeps what it was
/// asked.
struct FakeRemote {
    answer: Option<Found>,
    asked: Mutex<Vec<Asked>>,
}

impl FakeRemote {
    fn new(answer: Option<Found>) -> Arc<FakeRemote> {
        Arc::new(FakeRemote {
            answer,
            asked: Mutex::new(Vec::new()),
        })
    }

    fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

impl Remote for FakeRemote {
    fn lookup(&self, service: &str, keys: &[(String, u128)]) -> Option<BoxFuture<'static, Found>> {
        self.asked
            .lock()
            .unwrap()
            .push((service.to_string(), keys.to_vec()));
        let answer = self.answer?;
        Some(Box::pin(async move { answer }))
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// Route one request the way the proxy does: ask, wait, resume.
fn route_waiting(r: &Engine, c: &ConnInfo, uri: &str, cookie: Option<&str>) -> SocketAddr {
    let mut req = request(uri, cookie);
    match r.route_or_wait(&mut req, c, &[]).expect("routed") {
        Routed::Now(route) => route.backend,
        Routed::Wait(w) => {
            let answer = block_on(w.answer);
            r.resume(&mut req, c, &[], answer).expect("resumed").backend
        }
    }
}

fn addr(i: u8) -> SocketAddr {
    format!("10.0.0.{i}:8080").parse().unwrap()
}

#[test]
fn a_client_ip_miss_takes_the_remote_binding_and_a_hit_asks_nothing() {
    let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let b3 = backend_identity("web", "b3");
    let remote = FakeRemote::new(Some(Some((0, b3))));
    r.set_remote(Some(remote.clone()));
    let c = conn("203.0.113.5");
    for i in 0..5 {
        assert_eq!(route_waiting(&r, &c, "/", None), addr(3), "request {i}");
    }
    let asked = remote.asked();
    assert_eq!(asked.len(), 1, "only the first request missed: {asked:?}");
    let key = u128::from_be_bytes(
        std::net::Ipv4Addr::new(203, 0, 113, 5)
            .to_ipv6_mapped()
            .octets(),
    );
    assert_eq!(
        asked[0],
        ("web".to_string(), vec![("client-ip".into(), key)])
    );
    assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 5);
    assert_eq!(r.stats.new_assignments.load(Ordering::Relaxed), 0);
}

#[test]
fn not_found_or_not_asked_decides_locally_and_binds() {
    let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    for answer in [Some(None), None] {
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let remote = FakeRemote::new(answer);
        r.set_remote(Some(remote.clone()));
        let c = conn("198.51.100.9");
        let mut req = request("/", None);
        if answer.is_none() {
            assert!(
                matches!(r.route_or_wait(&mut req, &c, &[]), Ok(Routed::Now(_))),
                "a remote that does not ask: decided at once"
            );
        }
        let first = route_waiting(&r, &c, "/", None);
        for _ in 0..5 {
            assert_eq!(route_waiting(&r, &c, "/", None), first, "{answer:?}");
        }
        assert_eq!(
            r.stats.new_assignments.load(Ordering::Relaxed),
            1,
            "{answer:?}"
        );
    }
}

#[test]
fn a_remote_binding_outside_the_pool_is_not_taken() {
    let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let gone = backend_identity("web", "b9");
    r.set_remote(Some(FakeRemote::new(Some(Some((0, gone))))));
    route_waiting(&r, &conn("192.0.2.3"), "/", None);
    assert_eq!(r.stats.new_assignments.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 0);
}

#[test]
fn a_remote_binding_to_a_down_backend_follows_the_down_policy() {
    let b2 = backend_identity("web", "b2");
    let states = [BackendState::Up, BackendState::Down, BackendState::Up];
    // Moved (the re-binding names b2 as the backend replaced, for the mirror's
    // compare-and-swap), or refused with `never`.
    let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let r = router(&cfg, &shared(&cfg, &states), 0);
    r.set_remote(Some(FakeRemote::new(Some(Some((0, b2))))));
    assert_ne!(route_waiting(&r, &conn("192.0.2.3"), "/", None), addr(2));
    assert_eq!(r.stats.reassigned_down.load(Ordering::Relaxed), 1);

    let cfg = config(
        r#"{"name":"p","type":"client-ip","timeout_s":60,"select_new_server_when_down":"never"}"#,
    );
    let r = router(&cfg, &shared(&cfg, &states), 0);
    r.set_remote(Some(FakeRemote::new(Some(Some((0, b2))))));
    let mut req = request("/", None);
    let c = conn("192.0.2.3");
    let Ok(Routed::Wait(w)) = r.route_or_wait(&mut req, &c, &[]) else {
        panic!("a miss waits");
    };
    let answer = block_on(w.answer);
    assert_eq!(
        r.resume(&mut req, &c, &[], answer).unwrap_err(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the client waits for its server"
    );
}

#[test]
fn app_cookie_asks_by_its_table_and_value_digest_then_the_fallback() {
    let cfg = config(
        r#"{"name":"p","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":60,"fallback":{"type":"client-ip","timeout_s":60}}"#,
    );
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let b1 = backend_identity("web", "b1");
    let remote = FakeRemote::new(Some(Some((0, b1))));
    r.set_remote(Some(remote.clone()));
    let c = conn("192.0.2.7");
    for _ in 0..3 {
        assert_eq!(
            route_waiting(&r, &c, "/", Some("JSESSIONID=abc123")),
            addr(1)
        );
    }
    // Without the cookie: the fallback's client key.
    route_waiting(&r, &c, "/", None);
    let asked = remote.asked();
    assert_eq!(asked.len(), 2, "{asked:?}");
    let fallback_key = u128::from_be_bytes(
        std::net::Ipv4Addr::new(192, 0, 2, 7)
            .to_ipv6_mapped()
            .octets(),
    );
    // An unknown value counts as no session here: the fallback's key is asked too, after it.
    assert_eq!(
        asked[0].1,
        vec![
            ("app-cookie:JSESSIONID".to_string(), digest(b"abc123")),
            ("fallback".to_string(), fallback_key)
        ]
    );
    assert_eq!(asked[1].1, vec![("fallback".to_string(), fallback_key)]);
}

#[test]
fn methods_without_a_table_and_retries_never_ask() {
    let cfg = config(&cookie_profile(""));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let remote = FakeRemote::new(Some(None));
    r.set_remote(Some(remote.clone()));
    let c = conn("192.0.2.8");
    assert!(matches!(
        r.route_or_wait(&mut request("/", None), &c, &[]),
        Ok(Routed::Now(_))
    ));

    let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    r.set_remote(Some(remote.clone()));
    assert!(matches!(
        r.route_or_wait(&mut request("/", None), &c, &[addr(1)]),
        Ok(Routed::Now(_))
    ));
    assert!(remote.asked().is_empty(), "{:?}", remote.asked());
}

#[test]
fn an_ssl_session_miss_asks_for_the_ticket_then_the_session_id() {
    let cfg = Arc::new(
        Config::parse(
            r#"{"interface":"lo",
            "virtual_services":[{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web",
                                 "tls_passthrough":true,"persistence":"p"}],
            "pools":[{"name":"web","backends":[{"name":"b1","address":"10.0.0.1"},{"name":"b2","address":"10.0.0.2"},{"name":"b3","address":"10.0.0.3"}]}],
            "persistence_profiles":[{"name":"p","type":"ssl-session-id","timeout_s":60}]}"#,
        )
        .expect("valid test config"),
    );
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let b2 = backend_identity("web", "b2");
    let remote = FakeRemote::new(Some(Some((1, b2))));
    r.set_remote(Some(remote.clone()));
    let hello = crate::tlswire::ClientHello {
        session_id: vec![7; 32],
        session_ticket: Some(vec![9; 40]),
        ..Default::default()
    };
    let client: SocketAddr = "192.0.2.9:5000".parse().unwrap();
    let choice =
        block_on(r.decide_asking(&mut Input::tls_hello(&hello, client), &[])).expect("decided");
    assert_eq!(choice.backend, addr(2));
    assert!(choice.decision.by_method, "the session's binding, taken");
    let asked = remote.asked();
    let tid = "ssl-session-id".to_string();
    assert_eq!(
        asked[0].1,
        vec![
            (tid.clone(), digest(&[b"tk:".as_slice(), &[9; 40]].concat())),
            (tid, digest(&[b"id:".as_slice(), &[7; 32]].concat())),
        ]
    );
}

#[test]
fn a_mirror_that_ends_unsets_only_its_own_remote() {
    let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let (old, new) = (FakeRemote::new(Some(None)), FakeRemote::new(Some(None)));
    let old_dyn: Arc<dyn Remote> = old.clone();
    let new_dyn: Arc<dyn Remote> = new.clone();
    r.set_remote(Some(old_dyn.clone()));
    r.set_remote(Some(new_dyn.clone()));
    // The old mirror is dropped after its successor took over.
    r.unset_remote(&old_dyn);
    route_waiting(&r, &conn("192.0.2.20"), "/", None);
    assert_eq!(new.asked().len(), 1, "the successor is still asked");
    r.unset_remote(&new_dyn);
    route_waiting(&r, &conn("192.0.2.21"), "/", None);
    assert_eq!(new.asked().len(), 1, "nobody is asked any more");
    assert!(old.asked().is_empty());
}

/// The `script` method built from its profile, counting its lookups (each runs the Lua
/// script once).
struct CountingScript {
    inner: Box<dyn Method>,
    runs: Arc<std::sync::atomic::AtomicUsize>,
}

impl Method for CountingScript {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn lookup(
        &self,
        input: &mut Input<'_>,
        pool: &crate::config::Pool,
        cx: &Context<'_>,
    ) -> methods::Lookup {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.inner.lookup(input, pool, cx)
    }

    fn record(&self, input: &Input<'_>, lookup: &methods::Lookup, identity: u32, cx: &Context<'_>) {
        self.inner.record(input, lookup, identity, cx)
    }

    fn stored_keys(&self, input: &Input<'_>, lookup: &methods::Lookup) -> Vec<u128> {
        self.inner.stored_keys(input, lookup)
    }

    fn table_id(&self) -> String {
        self.inner.table_id()
    }

    fn tables(&self) -> Vec<methods::TableRef<'_>> {
        self.inner.tables()
    }
}

#[test]
fn a_script_runs_once_for_a_request_that_waits_for_the_remote() {
    let file =
        std::env::temp_dir().join(format!("tether-remote-script-{}.lua", std::process::id()));
    std::fs::write(
        &file,
        "function persist(req) return req.headers['x-user'] end\n",
    )
    .expect("writing the script");
    let cfg = config(&format!(
        r#"{{"name":"p","type":"script","file":"{}","timeout_s":60}}"#,
        file.display()
    ));
    let _ = std::fs::remove_file(&file);
    let svc = &cfg.services[0];
    let inner = methods::build(
        &svc.name,
        cfg.profile(svc).expect("a profile"),
        &cfg.state_dir,
    )
    .expect("the script method");
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let method = CountingScript {
        inner,
        runs: runs.clone(),
    };
    let r = Engine::with_method(&cfg, svc, shared(&cfg, &UP), Some(Box::new(method)));
    let b3 = backend_identity("web", "b3");
    let remote = FakeRemote::new(Some(Some((0, b3))));
    r.set_remote(Some(remote.clone()));
    let c = conn("192.0.2.10");
    let alice = || {
        http::Request::builder()
            .uri("/")
            .header("x-user", "alice")
            .body(())
            .unwrap()
            .into_parts()
            .0
    };

    // A miss: asked, waited for, decided with the remote's binding; the script ran once.
    let mut req = alice();
    let Ok(Routed::Wait(w)) = r.route_or_wait(&mut req, &c, &[]) else {
        panic!("a key bound nowhere here waits for the remote");
    };
    let answer = block_on(w.answer);
    let route = r.resume(&mut req, &c, &[], answer).expect("resumed");
    assert_eq!(route.backend, addr(3), "the remote's binding");
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "the script ran once for the request"
    );
    assert_eq!(
        remote.asked(),
        vec![(
            "web".to_string(),
            vec![("script".to_string(), digest(b"alice"))]
        )]
    );
    // The binding was taken under the script's key: the next request is a local hit.
    let mut req = alice();
    let Ok(Routed::Now(route)) = r.route_or_wait(&mut req, &c, &[]) else {
        panic!("a local hit asks nothing");
    };
    assert_eq!(route.backend, addr(3));
    assert_eq!(remote.asked().len(), 1);
    assert_eq!(runs.load(Ordering::Relaxed), 2, "one run per request");
}
