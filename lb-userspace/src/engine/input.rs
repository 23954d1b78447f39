//! What a persistence method reads: the head of an HTTP request, a TLS ClientHello or a SIP
//! message, with the client's address. Methods ask for what they need through the accessors
//! (a header, a cookie, a query item, the SNI, ...); an accessor that does not apply to the
//! kind of input answers `None`, so one method can serve several protocols.

use std::net::SocketAddr;

use http::header;

use crate::cookie;

/// The parts of a TLS ClientHello that persistence can key on (read by `tlswire`).
pub use crate::tlswire::ClientHello;

/// A SIP request or response head (RFC 3261): the start line and the header fields in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SipMessage {
    pub start_line: String,
    /// (name as sent, value), values trimmed, folded lines joined with one space.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Most header fields a SIP head may have: more is not a message worth parsing.
pub const SIP_MAX_HEADERS: usize = 256;

/// RFC 3261 7.3.3 compact forms: (compact, full), lower case.
const SIP_COMPACT: [(&str, &str); 10] = [
    ("i", "call-id"),
    ("m", "contact"),
    ("e", "content-encoding"),
    ("l", "content-length"),
    ("c", "content-type"),
    ("f", "from"),
    ("s", "subject"),
    ("k", "supported"),
    ("t", "to"),
    ("v", "via"),
];

/// RFC 3261 25.1 `token` characters.
fn is_sip_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

/// `SIP/2.0` (the version is case-insensitive).
fn is_sip_version(s: &[u8]) -> bool {
    s.eq_ignore_ascii_case(b"SIP/2.0")
}

/// A request line (`METHOD SP Request-URI SP SIP/2.0`) or a status line
/// (`SIP/2.0 SP 3DIGIT SP Reason`).
fn is_sip_start_line(line: &[u8]) -> bool {
    if line.iter().any(|&b| b.is_ascii_control()) {
        return false;
    }
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(a), Some(b), Some(c)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if is_sip_version(a) {
        // Status line: the reason may be empty or contain spaces.
        return b.len() == 3 && b.iter().all(u8::is_ascii_digit) && b[0] != b'0';
    }
    is_sip_token(a) && !b.is_empty() && is_sip_version(c)
}

impl SipMessage {
    /// The head of a SIP datagram (up to the first empty line; the body is not read).
    /// `None` for anything that is not a well-formed SIP head: no request or status line, a
    /// header line without `:` or with a name that is no token, a NUL or other control byte
    /// (but tab), a continuation line before any header, more than [`SIP_MAX_HEADERS`].
    /// Lines end with CRLF or a bare LF.
    pub fn parse(datagram: &[u8]) -> Option<SipMessage> {
        let mut lines = datagram
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let first = lines.next()?;
        if !is_sip_start_line(first) {
            return None;
        }
        let start_line = std::str::from_utf8(first).ok()?.to_string();
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        for line in lines {
            if line.is_empty() {
                break;
            }
            if line.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
                return None;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                // A folded line continues the previous value (RFC 3261 7.3.1).
                let (_, value) = headers.last_mut()?;
                let more = line.trim_ascii();
                if !more.is_empty() {
                    if !value.is_empty() {
                        value.push(b' ');
                    }
                    value.extend_from_slice(more);
                }
                continue;
            }
            let colon = line.iter().position(|&b| b == b':')?;
            let name = line[..colon].trim_ascii_end();
            if !is_sip_token(name) || headers.len() == SIP_MAX_HEADERS {
                return None;
            }
            let name = std::str::from_utf8(name).ok()?;
            headers.push((name.to_string(), line[colon + 1..].trim_ascii().to_vec()));
        }
        Some(SipMessage {
            start_line,
            headers,
        })
    }

    /// A request (not a response).
    pub fn is_request(&self) -> bool {
        !is_sip_version(self.start_line.split(' ').next().unwrap_or("").as_bytes())
    }

    /// The first value of a header, by its full or its compact name (RFC 3261 7.3.3:
    /// `i` is Call-ID, `f` From, `t` To, `v` Via, `m` Contact, ...), case-insensitively.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let other = SIP_COMPACT.iter().find_map(|(short, long)| {
            if name.eq_ignore_ascii_case(short) {
                Some(*long)
            } else if name.eq_ignore_ascii_case(long) {
                Some(*short)
            } else {
                None
            }
        });
        self.headers
            .iter()
            .find(|(n, _)| {
                n.eq_ignore_ascii_case(name) || other.is_some_and(|o| n.eq_ignore_ascii_case(o))
            })
            .map(|(_, v)| v.as_slice())
    }
}

/// The protocol head a decision is made on.
pub enum Head<'a> {
    /// Mutable: a method may edit it before it is forwarded (tether's cookie is stripped).
    Http(&'a mut http::request::Parts),
    TlsHello(&'a ClientHello),
    Sip(&'a SipMessage),
}

/// One input to the engine: a head and the client it came from.
pub struct Input<'a> {
    client: SocketAddr,
    head: Head<'a>,
    /// The backend the connection's TLS session is bound to (TLS persistence).
    session: Option<u32>,
}

impl<'a> Input<'a> {
    pub fn http(req: &'a mut http::request::Parts, client: SocketAddr) -> Self {
        Input {
            client,
            head: Head::Http(req),
            session: None,
        }
    }

    pub fn tls_hello(hello: &'a ClientHello, client: SocketAddr) -> Self {
        Input {
            client,
            head: Head::TlsHello(hello),
            session: None,
        }
    }

    pub fn sip(msg: &'a SipMessage, client: SocketAddr) -> Self {
        Input {
            client,
            head: Head::Sip(msg),
            session: None,
        }
    }

    /// The input came on a connection whose TLS session is bound to backend `session`.
    pub fn in_session(mut self, session: Option<u32>) -> Self {
        self.session = session;
        self
    }

    /// The backend identity the connection's TLS session is bound to.
    pub fn tls_session(&self) -> Option<u32> {
        self.session
    }

    /// The client (with the PROXY protocol, the address it carries).
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The HTTP request head, when this is one.
    pub fn http_request(&self) -> Option<&http::request::Parts> {
        match &self.head {
            Head::Http(r) => Some(r),
            Head::TlsHello(_) | Head::Sip(_) => None,
        }
    }

    /// The HTTP request head to edit, when this is one.
    pub fn http_request_mut(&mut self) -> Option<&mut http::request::Parts> {
        match &mut self.head {
            Head::Http(r) => Some(r),
            Head::TlsHello(_) | Head::Sip(_) => None,
        }
    }

    /// The first value of a header field (HTTP or SIP; names are case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        match &self.head {
            Head::Http(r) => r.headers.get(name).map(|v| v.as_bytes()),
            Head::Sip(m) => m.header(name),
            Head::TlsHello(_) => None,
        }
    }

    /// Every `Cookie` header value of an HTTP request (none for other inputs).
    pub fn cookie_headers(&self) -> impl Iterator<Item = &[u8]> {
        self.http_request().into_iter().flat_map(|r| {
            r.headers
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes())
        })
    }

    /// The value of the first cookie called `name`.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        cookie::find(self.cookie_headers(), name)
    }

    /// The values of every cookie called `name`, in order.
    pub fn cookies_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        cookie::find_all(self.cookie_headers(), name)
    }

    /// The request target's path and query (HTTP).
    pub fn path_and_query(&self) -> Option<&str> {
        self.http_request()?
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
    }

    /// The request's path (HTTP).
    pub fn path(&self) -> Option<&str> {
        Some(self.http_request()?.uri.path())
    }

    /// The `name=value` items of the query string, in order (an item without `=` has an
    /// empty value).
    pub fn query_items(&self) -> impl Iterator<Item = (&str, &str)> {
        self.http_request()
            .and_then(|r| r.uri.query())
            .into_iter()
            .flat_map(|q| q.split('&'))
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
    }

    /// The value of the first query item called `name`.
    pub fn query_item(&self, name: &str) -> Option<&str> {
        self.query_items().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// The `;name=value` parameters of the path's segments, in order (servlet containers put
    /// the session there: `/app;jsessionid=...`). Parameters without `=` are skipped.
    pub fn path_params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.path()
            .into_iter()
            .flat_map(|p| p.split('/'))
            .flat_map(|seg| seg.split(';').skip(1))
            .filter_map(|param| param.split_once('='))
    }

    /// The HTTP Host header, else the request target's authority.
    pub fn host(&self) -> Option<&[u8]> {
        let r = self.http_request()?;
        r.headers
            .get(header::HOST)
            .map(|v| v.as_bytes())
            .or_else(|| r.uri.authority().map(|a| a.as_str().as_bytes()))
    }

    /// The server name a TLS client asked for.
    pub fn sni(&self) -> Option<&str> {
        match &self.head {
            Head::TlsHello(h) => h.sni.as_deref(),
            Head::Http(_) | Head::Sip(_) => None,
        }
    }

    /// The TLS session id a client offered to resume (absent when empty).
    pub fn session_id(&self) -> Option<&[u8]> {
        match &self.head {
            Head::TlsHello(h) if !h.session_id.is_empty() => Some(&h.session_id),
            Head::TlsHello(_) | Head::Http(_) | Head::Sip(_) => None,
        }
    }

    /// The TLS session ticket a client offered.
    pub fn session_ticket(&self) -> Option<&[u8]> {
        match &self.head {
            Head::TlsHello(h) => h.session_ticket.as_deref(),
            Head::Http(_) | Head::Sip(_) => None,
        }
    }

    /// A SIP header (full or compact name).
    pub fn sip_header(&self, name: &str) -> Option<&[u8]> {
        match &self.head {
            Head::Sip(m) => m.header(name),
            Head::Http(_) | Head::TlsHello(_) => None,
        }
    }
}
