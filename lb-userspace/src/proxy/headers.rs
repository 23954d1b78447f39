//! Request and response head rewriting: hop-by-hop headers, forwarding headers, Host and
//! Cookie normalisation.
//!
//! # Forwarding headers: trusted hops
//!
//! A backend reads the client's address from `X-Forwarded-For` (or `X-Real-IP`,
//! `Forwarded`), so only a hop the operator trusts may set them (HAProxy's `option forwardfor`
//! behind `http-request del-header` for untrusted sources, Envoy's `xff_num_trusted_hops`):
//!
//! | header | client not in `trusted_forwarders` (default) | trusted client |
//! |---|---|---|
//! | `X-Forwarded-For` | replaced by the client's address | client appended to the list |
//! | `X-Real-IP` | replaced by the client's address | kept; set when absent |
//! | `Forwarded` | removed | kept |
//! | `X-Forwarded-Proto`, `X-Forwarded-Host` | set by tether | kept; set when absent |
//!
//! "The client" is the connection's peer, or the address a trusted PROXY protocol header
//! carries.

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version,
    header::{CONNECTION, CONTENT_LENGTH, COOKIE, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE},
    request,
    uri::PathAndQuery,
};

use super::ConnInfo;

pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(super) const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers a `Connection` token may not remove: the message's framing and routing, and the
/// forwarding headers a trusted proxy in front of us added.
fn protected(name: &HeaderName) -> bool {
    [
        &HOST,
        &CONTENT_LENGTH,
        &COOKIE,
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &X_REAL_IP,
        &FORWARDED,
    ]
    .contains(&name)
}

/// Whether `Connection` lists `token` (case-insensitive).
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// An HTTP/1.1 upgrade request (WebSocket and friends).
pub(super) fn wants_upgrade(parts: &request::Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(UPGRADE)
        && connection_has(&parts.headers, "upgrade")
}

/// Removes hop-by-hop headers: the fixed list and those `Connection` names. With
/// `keep_upgrade`, `Upgrade` stays and `Connection` becomes `upgrade`.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if protected(&name) || (keep_upgrade && name == UPGRADE) {
            continue;
        }
        headers.remove(&name);
    }
    for name in [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER] {
        headers.remove(name);
    }
    // With Transfer-Encoding, Content-Length is meaningless (RFC 9112 6.3) and forwarding it
    // next to a re-framed body would be a smuggling vector: hyper frames from the body.
    if headers.remove(TRANSFER_ENCODING).is_some() {
        headers.remove(CONTENT_LENGTH);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// Several `Cookie` fields (HTTP/2 sends one per crumb) become one joined by `"; "`
/// (RFC 9113 8.2.3).
pub(super) fn merge_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

/// Turns a client request head into the HTTP/1.1 head sent upstream: origin-form URI, `Host`
/// from the authority, hop-by-hop headers gone, cookies merged, forwarding headers set by the
/// trusted-hop policy (module docs; `trusted`: the client is in `trusted_forwarders`).
/// `Err(400)` for a request with no host to forward (HTTP/1.1 without `Host`).
#[cfg(test)]
pub(super) fn prepare_request(
    parts: &mut request::Parts,
    conn: &ConnInfo,
    upgrade: bool,
    trusted: bool,
) -> Result<(), StatusCode> {
    let client = client_value(conn).ok_or(StatusCode::BAD_REQUEST)?;
    prepare_request_for(parts, conn, &client, upgrade, trusted)
}

/// The client's address as a header value (an IPv4-mapped IPv6 address as IPv4), rendered
/// once per connection rather than once per request.
pub(super) fn client_value(conn: &ConnInfo) -> Option<HeaderValue> {
    HeaderValue::from_str(&conn.client.ip().to_canonical().to_string()).ok()
}

/// [`prepare_request`] with the connection's [`client_value`].
pub(super) fn prepare_request_for(
    parts: &mut request::Parts,
    conn: &ConnInfo,
    client_value: &HeaderValue,
    upgrade: bool,
    trusted: bool,
) -> Result<(), StatusCode> {
    // Host: HTTP/2's :authority, or an absolute-form request target, wins over a Host field
    // (RFC 9112 3.2.2, RFC 9113 8.3.1).
    let host = match parts.uri.authority() {
        Some(auth) => {
            let v = HeaderValue::from_str(auth.as_str()).map_err(|_| StatusCode::BAD_REQUEST)?;
            parts.headers.insert(HOST, v.clone());
            Some(v)
        }
        None => {
            let mut hosts = parts.headers.get_all(HOST).iter();
            match (hosts.next(), hosts.next()) {
                (Some(h), None) => Some(h.clone()),
                (Some(_), Some(_)) => return Err(StatusCode::BAD_REQUEST),
                (None, _) if parts.version == Version::HTTP_10 => None,
                (None, _) => return Err(StatusCode::BAD_REQUEST),
            }
        }
    };
    if parts.method != Method::OPTIONS || parts.uri.path() != "*" {
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .filter(|pq| pq.as_str().starts_with('/'))
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
    } else {
        parts.uri = Uri::from_static("*");
    }
    if host.is_none() {
        // HTTP/1.0 without Host: name the address the client connected to.
        let v =
            HeaderValue::from_str(&conn.local.to_string()).map_err(|_| StatusCode::BAD_REQUEST)?;
        parts.headers.insert(HOST, v);
    }
    parts.version = Version::HTTP_11;

    strip_hop_by_hop(&mut parts.headers, upgrade);
    merge_cookies(&mut parts.headers);

    if !trusted {
        for h in [
            &X_FORWARDED_FOR,
            &X_REAL_IP,
            &FORWARDED,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
        ] {
            parts.headers.remove(h);
        }
    }
    // X-Forwarded-For: a trusted hop's list (all fields, in order), then the client.
    let xff = if parts.headers.contains_key(X_FORWARDED_FOR) {
        let mut xff = Vec::new();
        for v in parts.headers.get_all(X_FORWARDED_FOR) {
            xff.extend_from_slice(v.as_bytes());
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(client_value.as_bytes());
        HeaderValue::from_bytes(&xff).map_err(|_| StatusCode::BAD_REQUEST)?
    } else {
        client_value.clone()
    };
    parts.headers.insert(X_FORWARDED_FOR, xff);
    if !parts.headers.contains_key(X_REAL_IP) {
        parts.headers.insert(X_REAL_IP, client_value.clone());
    }
    if !parts.headers.contains_key(X_FORWARDED_PROTO) {
        parts.headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
    }
    if !parts.headers.contains_key(X_FORWARDED_HOST)
        && let Some(h) = host
    {
        parts.headers.insert(X_FORWARDED_HOST, h);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn conn(tls: bool) -> ConnInfo {
        ConnInfo {
            client: "[::ffff:192.0.2.9]:5000".parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
            tls,
            alpn_h2: false,
            session: None,
        }
    }

    fn all(h: &HeaderMap, name: impl http::header::AsHeaderName) -> Vec<&str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn h1_request_is_rewritten() {
        let (mut p, ()) = Request::get("/a?b=1")
            .header("host", "example.com")
            .header("connection", "keep-alive, X-Foo, host")
            .header("x-foo", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-connection", "keep-alive")
            .header("upgrade", "websocket")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2, 10.0.0.3")
            .header("x-forwarded-proto", "ftp")
            .header("transfer-encoding", "chunked")
            .header("content-length", "5")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut p, &conn(false), false, false).unwrap();
        let h = &p.headers;
        for gone in [
            "connection",
            "x-foo",
            "keep-alive",
            "te",
            "proxy-connection",
            "upgrade",
            "transfer-encoding",
            "content-length",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(
            all(h, HOST),
            ["example.com"],
            "Connection may not name Host"
        );
        assert_eq!(
            all(h, X_FORWARDED_FOR),
            ["192.0.2.9"],
            "an untrusted client's list is replaced"
        );
        assert_eq!(all(h, X_FORWARDED_PROTO), ["http"]);
        assert_eq!(all(h, X_FORWARDED_HOST), ["example.com"]);
        assert_eq!(p.uri, "/a?b=1");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn h2_request_gets_host_and_one_cookie() {
        let (mut p, ()) = Request::get("https://example.com:8443/p")
            .version(Version::HTTP_2)
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("cookie", "c=3")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut p, &conn(true), false, false).unwrap();
        assert_eq!(all(&p.headers, HOST), ["example.com:8443"]);
        assert_eq!(all(&p.headers, COOKIE), ["a=1; b=2; c=3"]);
        assert_eq!(all(&p.headers, X_FORWARDED_PROTO), ["https"]);
        assert_eq!(all(&p.headers, X_FORWARDED_HOST), ["example.com:8443"]);
        assert_eq!(p.uri, "/p");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn upgrade_keeps_upgrade() {
        let (mut p, ()) = Request::get("/ws")
            .header("host", "h")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap()
            .into_parts();
        assert!(wants_upgrade(&p));
        prepare_request(&mut p, &conn(false), true, false).unwrap();
        assert_eq!(all(&p.headers, UPGRADE), ["websocket"]);
        assert_eq!(all(&p.headers, CONNECTION), ["upgrade"]);
    }

    #[test]
    fn missing_or_duplicate_host() {
        let (mut p, ()) = Request::get("/").body(()).unwrap().into_parts();
        assert_eq!(
            prepare_request(&mut p, &conn(false), false, false),
            Err(StatusCode::BAD_REQUEST)
        );
        let (mut p, ()) = Request::get("/")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            prepare_request(&mut p, &conn(false), false, false),
            Err(StatusCode::BAD_REQUEST)
        );
        let (mut p, ()) = Request::get("/")
            .version(Version::HTTP_10)
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut p, &conn(false), false, false).unwrap();
        assert_eq!(all(&p.headers, HOST), ["127.0.0.1:80"]);
        assert!(!p.headers.contains_key(X_FORWARDED_HOST));
    }

    #[test]
    fn forwarding_headers_follow_trust() {
        let spoofed = || {
            Request::get("/")
                .header("host", "app.example")
                .header("x-forwarded-for", "10.0.0.1")
                .header("x-forwarded-for", "10.0.0.2, 10.0.0.3")
                .header("x-real-ip", "10.9.9.9")
                .header("forwarded", "for=10.8.8.8;proto=https")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "other.example")
                .header("connection", "x-real-ip, forwarded")
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        // Untrusted (the default): whatever the client claimed is gone.
        let mut p = spoofed();
        prepare_request(&mut p, &conn(false), false, false).unwrap();
        let h = &p.headers;
        assert_eq!(all(h, X_FORWARDED_FOR), ["192.0.2.9"]);
        assert_eq!(all(h, X_REAL_IP), ["192.0.2.9"]);
        assert!(!h.contains_key(FORWARDED), "Forwarded removed");
        assert_eq!(all(h, X_FORWARDED_PROTO), ["http"]);
        assert_eq!(all(h, X_FORWARDED_HOST), ["app.example"]);
        // Trusted hop: its list is kept and the client appended; its other headers stand.
        let mut p = spoofed();
        prepare_request(&mut p, &conn(false), false, true).unwrap();
        let h = &p.headers;
        assert_eq!(
            all(h, X_FORWARDED_FOR),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.9"]
        );
        assert_eq!(all(h, X_REAL_IP), ["10.9.9.9"]);
        assert_eq!(all(h, FORWARDED), ["for=10.8.8.8;proto=https"]);
        assert_eq!(all(h, X_FORWARDED_PROTO), ["https"]);
        assert_eq!(all(h, X_FORWARDED_HOST), ["other.example"]);
        // A trusted hop without headers gets them set.
        let (mut p, ()) = Request::get("/")
            .header("host", "h")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut p, &conn(true), false, true).unwrap();
        assert_eq!(all(&p.headers, X_FORWARDED_FOR), ["192.0.2.9"]);
        assert_eq!(all(&p.headers, X_REAL_IP), ["192.0.2.9"]);
        assert_eq!(all(&p.headers, X_FORWARDED_PROTO), ["https"]);
    }
}
