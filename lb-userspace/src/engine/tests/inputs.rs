//! Inputs beyond HTTP: methods keyed on a TLS ClientHello or a SIP message.

use super::{keys::key_config, *};

/// A method keyed on what a TLS client or a SIP message names: the SNI, or the Call-ID (as
/// the TLS and SIP methods of later work will be), sticky in a table of its own.
struct Named {
    table: table::Table<u128>,
}

impl Method for Named {
    fn kind(&self) -> &'static str {
        "test-named"
    }

    fn lookup(
        &self,
        input: &mut Input<'_>,
        _: &crate::config::Pool,
        cx: &Context<'_>,
    ) -> methods::Lookup {
        let Some(k) = input
            .sni()
            .map(str::as_bytes)
            .or(input.sip_header("call-id"))
        else {
            return methods::Lookup {
                binding: None,
                key: Key::Missing,
            };
        };
        let k = k.to_vec();
        methods::Lookup {
            binding: self
                .table
                .get(&table::digest(&k), cx.now)
                .ok()
                .map(Binding::Identity),
            key: Key::Hash(k),
        }
    }

    fn record(&self, _: &Input<'_>, l: &methods::Lookup, identity: u32, cx: &Context<'_>) {
        if let Key::Hash(k) = &l.key {
            self.table.insert(table::digest(k), identity, cx.now);
        }
    }
}

fn named_engine(cfg: &Arc<Config>, snap: &SharedSnapshot) -> Engine {
    let method = Named {
        table: table::Table::new(1024, Duration::from_secs(60)),
    };
    Engine::with_method(cfg, &cfg.services[0], snap.clone(), Some(Box::new(method)))
}

#[test]
fn a_method_keyed_on_sni_or_a_sip_header_works_through_the_engine() {
    let cfg = key_config(5, r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
    let snap = shared(&cfg, &[BackendState::Up; 5]);
    let e = named_engine(&cfg, &snap);
    let other = named_engine(&cfg, &shared(&cfg, &[BackendState::Up; 5]));
    let client = |i: usize| -> SocketAddr { format!("198.51.100.{}:5060", i + 1).parse().unwrap() };
    // TLS: the server name decides, whoever the client is, on either instance.
    let hello = |sni: &str| input::ClientHello {
        sni: Some(sni.to_string()),
        ..Default::default()
    };
    let a = hello("a.example");
    let first = e.decide(&mut Input::tls_hello(&a, client(0)), &[]).unwrap();
    for i in 1..30 {
        let c = e.decide(&mut Input::tls_hello(&a, client(i)), &[]).unwrap();
        assert_eq!(c.backend, first.backend, "SNI a.example from client {i}");
        assert!(c.decision.by_method, "bound by the method's table");
    }
    assert_eq!(
        other
            .decide(&mut Input::tls_hello(&a, client(7)), &[])
            .unwrap()
            .backend,
        first.backend,
        "a second instance places the name where the first did"
    );
    let names: std::collections::HashSet<SocketAddr> = (0..60)
        .map(|i| {
            let h = hello(&format!("site{i}.example"));
            e.decide(&mut Input::tls_hello(&h, client(0)), &[])
                .unwrap()
                .backend
        })
        .collect();
    assert_eq!(names.len(), 5, "60 names reach all 5 backends");
    // SIP: the Call-ID (full or compact header name) decides.
    let invite = |call_id: &str, compact: bool| {
        let name = if compact { "i" } else { "Call-ID" };
        input::SipMessage::parse(
            format!("INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9\r\n{name}: {call_id}\r\nCSeq: 1 INVITE\r\n\r\nv=0\r\n")
                .as_bytes(),
        )
        .expect("a SIP head")
    };
    let call = invite("abc@10.0.0.9", false);
    let to = e
        .decide(&mut Input::sip(&call, client(3)), &[])
        .unwrap()
        .backend;
    for (i, compact) in [(4, true), (9, false), (20, true)] {
        let m = invite("abc@10.0.0.9", compact);
        assert_eq!(
            e.decide(&mut Input::sip(&m, client(i)), &[])
                .unwrap()
                .backend,
            to,
            "the same call from client {i}"
        );
    }
    // An input with neither is balanced by the pool's algorithm.
    let bare = input::ClientHello::default();
    let spread: std::collections::HashSet<SocketAddr> = (0..10)
        .map(|i| {
            e.decide(&mut Input::tls_hello(&bare, client(i)), &[])
                .unwrap()
                .backend
        })
        .collect();
    assert_eq!(spread.len(), 5);
    // The engine's policy applies to these inputs too: the bound backend down, a move.
    let i = (1..=5)
        .position(|n| first.backend == format!("10.0.1.{n}:8080").parse().unwrap())
        .unwrap();
    let mut st = [BackendState::Up; 5];
    st[i] = BackendState::Down;
    set_states(&snap, &st);
    let moved = e.decide(&mut Input::tls_hello(&a, client(0)), &[]).unwrap();
    assert_ne!(moved.backend, first.backend);
    assert_eq!(e.stats.reassigned_down.load(Ordering::Relaxed), 1);
}

#[test]
fn bindings_follow_backend_identity_when_a_reload_reorders_the_pool() {
    let cfg = config(&cookie_profile(""));
    let snap = shared(&cfg, &UP);
    let r = router(&cfg, &snap, 0);
    let c = conn("192.0.2.1");
    let mut bound = std::collections::HashMap::new();
    for _ in 0..3 {
        let (b, _, set) = exchange(&r, &c, "/", None, None);
        bound.insert(b, srv(&set));
    }
    assert_eq!(bound.len(), 3);
    // Reload: the same backends listed in reverse order (indexes change, identities not).
    let mut reordered = (*cfg).clone();
    reordered.pools[0].backends.reverse();
    let mut s = (**snap.load()).clone();
    s.config = Arc::new(reordered);
    s.generation += 1;
    snap.store(Arc::new(s));
    for (backend, cookie) in &bound {
        assert_eq!(
            exchange(&r, &c, "/", Some(cookie), None).0,
            *backend,
            "a cookie follows its backend to its new index"
        );
    }
}

#[test]
fn sip_heads_parse_with_compact_names() {
    let m = input::SipMessage::parse(b"REGISTER sip:x SIP/2.0\r\ni: 42@h\r\nf: <sip:a@b>\r\n\r\n")
        .expect("parsed");
    assert_eq!(m.start_line, "REGISTER sip:x SIP/2.0");
    assert_eq!(m.header("Call-ID"), Some(&b"42@h"[..]));
    assert_eq!(m.header("from"), Some(&b"<sip:a@b>"[..]));
    assert_eq!(m.header("To"), None);
    assert_eq!(
        input::SipMessage::parse(b"INVITE x\r\nno colon\r\n\r\n"),
        None
    );
    assert_eq!(input::SipMessage::parse(b""), None);
}
