//! App-cookie key lookup in the Cookie header, the query and `;name=value` path parameters:
//! never panics, and what it finds is part of the request.
//!
//! Input: the parameter name, a NUL, the request target, a NUL, a Cookie header value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::engine::{input::Input, methods::session_value};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(name), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let cookie = parts.next().unwrap_or_default();
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let mut req = http::Request::get("/");
    if let Ok(uri) = http::Uri::try_from(target) {
        req = req.uri(uri);
    }
    if let Ok(v) = http::HeaderValue::from_bytes(cookie) {
        req = req.header(http::header::COOKIE, v);
    }
    let Ok(req) = req.body(()) else {
        return;
    };
    let (mut head, ()) = req.into_parts();
    let uri = head.uri.to_string();
    let input = Input::http(&mut head, "192.0.2.1:4000".parse().expect("addr"));
    if let Some(v) = session_value(&input, name) {
        assert!(!v.is_empty());
        let in_uri = uri.contains(v);
        let in_cookie = String::from_utf8_lossy(cookie).contains(v);
        assert!(in_uri || in_cookie, "{v:?} is not from the request");
    }
});
