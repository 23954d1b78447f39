use std::{sync::atomic::Ordering, time::Instant};

use rustls::{HandshakeKind, server::NoServerSessionStorage};

use super::*;
use crate::{
    config::Algorithm,
    cookie::Reject,
    state::RouterStats,
    tlswire::{ClientHello, tests as tls},
};

const KEYS: &str = "5555555555555555555555555555555555555555555555555555555555555555";

fn method(secret: &str) -> TlsTicket {
    // Keys are configured: the state directory (for a generated key) is not read.
    TlsTicket::new(
        "tls",
        &[(5, secret.to_string())],
        300,
        std::path::Path::new("/nonexistent"),
    )
    .expect("keys")
}

fn pool() -> Pool {
    Pool {
        name: "web".into(),
        backends: Vec::new(),
        health_monitor: None,
        algorithm: Algorithm::RoundRobin,
    }
}

static NO_QUOTA: std::sync::LazyLock<crate::engine::quota::SourceQuota> =
    std::sync::LazyLock::new(|| crate::engine::quota::SourceQuota::new(0));

fn context(stats: &RouterStats, pool_id: u32) -> Context<'_> {
    Context {
        service: "tls",
        pool_id,
        stats,
        now: Instant::now(),
        quota: &NO_QUOTA,
    }
}

/// What `m` finds in a ClientHello offering `ticket`.
fn lookup(m: &TlsTicket, ticket: &[u8], cx: &Context<'_>) -> Option<Binding> {
    let hello = ClientHello {
        session_ticket: Some(ticket.to_vec()),
        ..ClientHello::default()
    };
    let client = "192.0.2.1:4000".parse().expect("addr");
    m.lookup(&mut Input::tls_hello(&hello, client), &pool(), cx)
        .binding
}

#[test]
fn a_ticket_of_one_instance_names_the_backend_on_another_with_the_same_keys() {
    let stats = RouterStats::default();
    let cx = context(&stats, 9);
    let a = method(KEYS);
    let b = method(KEYS);
    let ticket = a
        .ticketer(42, &cx)
        .expect("a ticketer")
        .encrypt(b"session state")
        .expect("sealed");
    assert_eq!(lookup(&b, &ticket, &cx), Some(Binding::Identity(42)));
    assert_eq!(
        b.ticketer(7, &cx).expect("ticketer").decrypt(&ticket),
        Some(b"session state".to_vec()),
        "any connection's ticketer opens it for rustls"
    );
    // Other keys, another pool, garbage: no binding, counted by reason.
    let other = method("6666666666666666666666666666666666666666666666666666666666666666");
    assert_eq!(lookup(&other, &ticket, &cx), None);
    assert_eq!(lookup(&b, &ticket, &context(&stats, 10)), None);
    assert_eq!(lookup(&b, b"not a ticket", &cx), None);
    let count = |r: Reject| {
        stats.rejected[Reject::ALL.iter().position(|x| *x == r).expect("listed")]
            .load(Ordering::Relaxed)
    };
    assert_eq!(count(Reject::Tampered), 1, "other secret, same key id");
    assert_eq!(count(Reject::ForeignService), 1, "another pool");
    assert_eq!(count(Reject::Malformed), 1);
    // A request on a bound connection follows the connection.
    let mut req = http::Request::new(()).into_parts().0;
    let client = "192.0.2.1:4000".parse().expect("addr");
    let got = b
        .lookup(
            &mut Input::http(&mut req, client).in_session(Some(3)),
            &pool(),
            &cx,
        )
        .binding;
    assert_eq!(got, Some(Binding::Identity(3)));
}

#[test]
fn rustls_resumes_on_a_second_instance_from_a_ticket_of_the_first() {
    let stats = RouterStats::default();
    let cx = context(&stats, 9);
    for versions in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let (base, client) = tls::configs(&[versions], false);
        let with = |m: &TlsTicket, backend: u32| {
            let mut c = (*base).clone();
            c.ticketer = m.ticketer(backend, &cx).expect("ticketer");
            c.session_storage = Arc::new(NoServerSessionStorage {});
            Arc::new(c)
        };
        let (a, b) = (method(KEYS), method(KEYS));
        let (_, _, kind) = tls::run_handshake(&with(&a, 1), &client);
        assert_eq!(kind, HandshakeKind::Full, "{versions:?}");
        // The client resumes on instance b; the ticket it offers names backend 1.
        let (hello, _, kind) = tls::run_handshake(&with(&b, 2), &client);
        assert_eq!(kind, HandshakeKind::Resumed, "{versions:?}");
        let offered = crate::tlswire::client_hello(&hello)
            .expect("hello")
            .expect("whole");
        let ticket = offered.session_ticket.expect("a ticket offered");
        assert_eq!(
            lookup(&b, &ticket, &cx),
            Some(Binding::Identity(1)),
            "{versions:?}"
        );
    }
}
