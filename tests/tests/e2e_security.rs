//! Hostile clients against the real daemon (started as users do, default config plus the
//! fields under test): a PROXY protocol header is honoured only from a trusted source, and a
//! client's own forwarding headers only from a trusted forwarder.
//!
//! Clients are 10.99.0.100 (trusted for nothing), 10.99.0.101 (may send PROXY headers) and
//! 10.99.0.102 (a trusted forwarder).

use std::io::{Read as _, Write as _};

use serde_json::json;
use tether_tests::{
    http::Echo,
    l7lab::{IO_TIMEOUT, L7Lab, PORT},
};

/// Sends `bytes` from `src` to the service and reads the answer to its end ("" when the proxy
/// closed without one).
fn exchange(lab: &L7Lab, src: std::net::Ipv4Addr, bytes: &[u8]) -> String {
    let mut s = lab.ok(
        lab.topo.connect_vip(src, PORT, IO_TIMEOUT),
        &format!("connecting from {src}"),
    );
    lab.ok(s.write_all(bytes), "writing the request");
    let mut out = Vec::new();
    // A reset (the proxy closing with unread bytes) also ends the answer.
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn echo_of(lab: &L7Lab, answer: &str) -> Echo {
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    if !answer.starts_with("HTTP/1.1 200") {
        lab.fail(format!("expected a 200 from an echo backend: {answer:?}"));
    }
    Echo::parse(body).unwrap_or_else(|| lab.fail(format!("not an echo body: {body:?}")))
}

#[test]
fn proxy_headers_and_forwarding_headers_only_from_trusted_sources() {
    let lab = L7Lab::start(3, 1, |b| {
        b.l7_service(
            "web",
            PORT,
            None,
            json!({"proxy_protocol": ["10.99.0.101"], "trusted_forwarders": ["10.99.0.102/32"]}),
        )
    });
    let (untrusted, proxy, forwarder) = (lab.client(0), lab.client(1), lab.client(2));
    let get =
        "GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 192.0.2.7\r\nConnection: close\r\n\r\n";
    let header = "PROXY TCP4 203.0.113.9 10.99.0.10 40000 8080\r\n";
    let with_header = format!("{header}{get}");

    // An untrusted client's PROXY header closes its connection and is counted.
    let out = exchange(&lab, untrusted, with_header.as_bytes());
    assert_eq!(out, "", "a PROXY header from {untrusted} is refused");
    assert_eq!(
        lab.metric(
            "tether_l7_refused_total",
            &[("service", "web"), ("reason", "proxy_header_untrusted")]
        ),
        1
    );
    // Without a header it is served as itself; its X-Forwarded-For is replaced.
    let e = echo_of(&lab, &exchange(&lab, untrusted, get.as_bytes()));
    assert_eq!(e.x_forwarded_for, Some(untrusted.to_string()));

    // The trusted PROXY source speaks for its client, whose own header is still replaced.
    let e = echo_of(&lab, &exchange(&lab, proxy, with_header.as_bytes()));
    assert_eq!(e.x_forwarded_for.as_deref(), Some("203.0.113.9"));

    // A trusted forwarder's list is kept and it is appended.
    let e = echo_of(&lab, &exchange(&lab, forwarder, get.as_bytes()));
    assert_eq!(
        e.x_forwarded_for,
        Some(format!("192.0.2.7, {forwarder}")),
        "a trusted forwarder's X-Forwarded-For"
    );
    lab.stop();
}
