//! A small reader of the cleartext start of a TLS connection, for pass-through services that
//! route on the handshake without terminating it: the client's ClientHello (SNI, legacy
//! session ID, session ticket) and, in the server's first flights, the ServerHello (session
//! ID, selected version) and a TLS 1.2 NewSessionTicket.
//!
//! Hand-written rather than a crate such as `tls-parser`: three fields of two messages are
//! needed, read incrementally from a socket with a byte limit, and every length is checked
//! against what is left (no indexing can panic; the unit tests feed random and truncated
//! input). Handshake messages may span several records and records may hold several
//! messages (RFC 8446 5.1, RFC 5246 6.2.1).

#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The parts of a TLS ClientHello that persistence can key on, read before the handshake is
/// completed or passed through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// server_name extension (host name), if sent.
    pub sni: Option<String>,
    /// legacy_session_id (0 to 32 bytes).
    pub session_id: Vec<u8>,
    /// The ticket offered to resume: the session_ticket extension (RFC 5077) if sent and not
    /// empty, else TLS 1.3's first pre_shared_key identity (RFC 8446 4.2.11).
    pub session_ticket: Option<Vec<u8>>,
}

/// Record content types (RFC 8446 5.1).
const CT_HANDSHAKE: u8 = 22;
/// Handshake message types.
const HT_CLIENT_HELLO: u8 = 1;
const HT_SERVER_HELLO: u8 = 2;
const HT_NEW_SESSION_TICKET: u8 = 4;
/// Extension types.
const EXT_SERVER_NAME: u16 = 0;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_PRE_SHARED_KEY: u16 = 41;
/// A record's fragment is at most 2^14 bytes (plus 2048 for ciphertext; cleartext here).
const MAX_FRAGMENT: usize = (1 << 14) + 2048;
/// TLS 1.3's version number, as `supported_versions` selects it.
pub const TLS13: u16 = 0x0304;

/// Why bytes are not a usable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first record is not a TLS handshake record (another protocol, or garbage).
    #[error("not a TLS handshake record")]
    NotTls,
    /// A length or field does not fit what was received or what TLS allows.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello is longer than the limit the caller buffers.
    #[error("ClientHello longer than {0} bytes")]
    TooLong(usize),
}

/// A bounds-checked cursor: every read checks what is left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if n > self.buf.len() {
            return Err(HelloError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Reassembles handshake messages from a stream of TLS records.
#[derive(Debug, Default)]
struct Handshakes {
    /// Record bytes not yet a whole record.
    records: Vec<u8>,
    /// Handshake-layer bytes not yet a whole message.
    messages: Vec<u8>,
    /// Bytes seen so far, against the caller's limit.
    seen: usize,
}

/// What the next step of a record stream is.
enum Next {
    /// A whole handshake message: type and body.
    Message(u8, Vec<u8>),
    /// More bytes are needed.
    More,
    /// A record of another content type (ChangeCipherSpec, alert, application data): the
    /// cleartext handshake is over as far as this reader goes.
    Other,
}

impl Handshakes {
    fn push(&mut self, data: &[u8]) {
        self.seen = self.seen.saturating_add(data.len());
        self.records.extend_from_slice(data);
    }

    /// The next message, reading records as needed. `limit` bounds one message.
    fn next(&mut self, limit: usize) -> Result<Next, HelloError> {
        loop {
            if self.messages.len() >= 4 {
                let len =
                    u32::from_be_bytes([0, self.messages[1], self.messages[2], self.messages[3]])
                        as usize;
                if len > limit {
                    return Err(HelloError::TooLong(limit));
                }
                if self.messages.len() >= 4 + len {
                    let kind = self.messages[0];
                    let body = self.messages[4..4 + len].to_vec();
                    self.messages.drain(..4 + len);
                    return Ok(Next::Message(kind, body));
                }
            }
            if self.records.len() < 5 {
                return Ok(Next::More);
            }
            let kind = self.records[0];
            if self.records[1] != 3 {
                return Err(HelloError::NotTls);
            }
            let len = u16::from_be_bytes([self.records[3], self.records[4]]) as usize;
            if len == 0 || len > MAX_FRAGMENT {
                return Err(HelloError::Malformed("record length"));
            }
            if kind != CT_HANDSHAKE {
                return Ok(Next::Other);
            }
            if self.records.len() < 5 + len {
                // A message starting in this record can be refused before it is whole.
                if self.messages.is_empty() && self.records.len() >= 9 {
                    let n =
                        u32::from_be_bytes([0, self.records[6], self.records[7], self.records[8]]);
                    if n as usize > limit {
                        return Err(HelloError::TooLong(limit));
                    }
                }
                return Ok(Next::More);
            }
            self.messages.extend_from_slice(&self.records[5..5 + len]);
            self.records.drain(..5 + len);
        }
    }
}

/// Reads a client's first bytes until its ClientHello is whole.
#[derive(Debug)]
pub struct HelloReader {
    hs: Handshakes,
    limit: usize,
}

impl HelloReader {
    /// A reader that refuses a ClientHello longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        HelloReader {
            hs: Handshakes::default(),
            limit,
        }
    }

    /// Add bytes from the client: `Ok(Some)` once the ClientHello is whole, `Ok(None)` when
    /// more are needed.
    pub fn push(&mut self, data: &[u8]) -> Result<Option<ClientHello>, HelloError> {
        if self.hs.seen == 0 && data.first().is_some_and(|&t| t != CT_HANDSHAKE) {
            return Err(HelloError::NotTls);
        }
        self.hs.push(data);
        if self.hs.seen > self.limit.saturating_add(5 * (1 + self.limit / 512)) {
            // More record overhead than any sane fragmentation of `limit` bytes.
            return Err(HelloError::TooLong(self.limit));
        }
        match self.hs.next(self.limit)? {
            Next::Message(HT_CLIENT_HELLO, body) => parse_client_hello(&body).map(Some),
            Next::Message(..) => Err(HelloError::Malformed("first message is not a ClientHello")),
            Next::More => Ok(None),
            Next::Other => Err(HelloError::Malformed("record before the ClientHello")),
        }
    }
}

/// A whole ClientHello in one buffer of records (for tests and fuzzing).
pub fn client_hello(records: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    HelloReader::new(records.len().max(1 << 16)).push(records)
}

/// The body of a ClientHello message (RFC 8446 4.1.2, RFC 5246 7.4.1.2).
pub fn parse_client_hello(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader::new(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("legacy_session_id longer than 32"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    if r.vec8("compression_methods")?.is_empty() {
        return Err(HelloError::Malformed("compression_methods"));
    }
    let mut hello = ClientHello {
        sni: None,
        session_id: session_id.to_vec(),
        session_ticket: None,
    };
    // SSLv3-era clients may end here: no extensions.
    if r.is_empty() {
        return Ok(hello);
    }
    let mut exts = Reader::new(r.vec16("extensions")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut psk = None;
    while !exts.is_empty() {
        let kind = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if seen.contains(&kind) {
            return Err(HelloError::Malformed("extension sent twice"));
        }
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => hello.sni = server_name(data)?,
            EXT_SESSION_TICKET if !data.is_empty() => hello.session_ticket = Some(data.to_vec()),
            EXT_PRE_SHARED_KEY => psk = Some(first_psk_identity(data)?),
            _ => {}
        }
    }
    if hello.session_ticket.is_none() {
        hello.session_ticket = psk;
    }
    Ok(hello)
}

/// The first identity of a pre_shared_key extension: identities<7..2^16-1> of
/// (identity<1..2^16-1>, obfuscated_ticket_age u32), then the binders.
fn first_psk_identity(data: &[u8]) -> Result<Vec<u8>, HelloError> {
    let mut outer = Reader::new(data);
    let mut ids = Reader::new(outer.vec16("psk identities")?);
    let first = ids.vec16("psk identity")?;
    ids.take(4, "obfuscated_ticket_age")?;
    if first.is_empty() {
        return Err(HelloError::Malformed("empty psk identity"));
    }
    Ok(first.to_vec())
}

/// The host_name of a server_name extension (RFC 6066 3), lowercased.
fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec16("server_name_list")?);
    if !outer.is_empty() {
        return Err(HelloError::Malformed("bytes after server_name_list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8("name_type")?;
        let name = list.vec16("host_name")?;
        if kind == 0 && host.is_none() {
            if name.is_empty()
                || !name
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            {
                return Err(HelloError::Malformed("host_name"));
            }
            host = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
        }
    }
    Ok(host)
}

/// What the server's ServerHello says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The session ID echoed or assigned (TLS 1.3: the client's random legacy ID echoed).
    pub session_id: Vec<u8>,
    /// The negotiated version: `supported_versions` when present, else legacy_version.
    pub version: u16,
}

impl ServerHello {
    /// TLS 1.3: the session ID is the client's random one, never reused for resumption.
    pub fn is_tls13(&self) -> bool {
        self.version == TLS13
    }
}

/// What the server's cleartext flights tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    Hello(ServerHello),
    /// A TLS 1.2 NewSessionTicket's ticket (RFC 5077 3.3), not empty.
    Ticket(Vec<u8>),
}

/// Watches the bytes a server sends until its cleartext handshake is over (its
/// ChangeCipherSpec, any other record type, TLS 1.3's encrypted flight, a malformed record,
/// or `limit` bytes), reporting the ServerHello and a TLS 1.2 ticket.
#[derive(Debug)]
pub struct ServerScan {
    hs: Handshakes,
    limit: usize,
    done: bool,
    /// Why the scan stopped early on bad input, for counting.
    malformed: bool,
}

impl ServerScan {
    pub fn new(limit: usize) -> Self {
        ServerScan {
            hs: Handshakes::default(),
            limit,
            done: false,
            malformed: false,
        }
    }

    /// Scanning is over: the rest of the stream need not be fed.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The server's handshake could not be read (malformed or over the limit).
    pub fn malformed(&self) -> bool {
        self.malformed
    }

    /// Feed bytes the server sent; returns what became known in them.
    pub fn push(&mut self, data: &[u8]) -> Vec<ServerEvent> {
        let mut events = Vec::new();
        if self.done {
            return events;
        }
        self.hs.push(data);
        if self.hs.seen > self.limit {
            self.stop(true);
        }
        while !self.done {
            match self.hs.next(self.limit) {
                Ok(Next::More) => break,
                Ok(Next::Other) => self.stop(false),
                Ok(Next::Message(HT_SERVER_HELLO, body)) => match parse_server_hello(&body) {
                    Ok(h) => {
                        // TLS 1.3: everything after the ServerHello is encrypted.
                        if h.is_tls13() {
                            self.stop(false);
                        }
                        events.push(ServerEvent::Hello(h));
                    }
                    Err(_) => self.stop(true),
                },
                Ok(Next::Message(HT_NEW_SESSION_TICKET, body)) => {
                    let mut r = Reader::new(&body);
                    match (r.take(4, "lifetime"), r.vec16("ticket")) {
                        (Ok(_), Ok(t)) if r.is_empty() => {
                            if !t.is_empty() {
                                events.push(ServerEvent::Ticket(t.to_vec()));
                            }
                        }
                        _ => self.stop(true),
                    }
                }
                Ok(Next::Message(..)) => {}
                Err(_) => self.stop(true),
            }
        }
        events
    }

    fn stop(&mut self, malformed: bool) {
        self.done = true;
        self.malformed |= malformed;
        self.hs = Handshakes::default();
    }
}

/// The body of a ServerHello (RFC 8446 4.1.3, RFC 5246 7.4.1.3).
pub fn parse_server_hello(body: &[u8]) -> Result<ServerHello, HelloError> {
    let mut r = Reader::new(body);
    let legacy = r.u16("legacy_version")?;
    r.take(32, "random")?;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("legacy_session_id longer than 32"));
    }
    r.take(2, "cipher_suite")?;
    r.take(1, "compression_method")?;
    let mut version = legacy;
    if !r.is_empty() {
        let mut exts = Reader::new(r.vec16("extensions")?);
        if !r.is_empty() {
            return Err(HelloError::Malformed("bytes after the extensions"));
        }
        while !exts.is_empty() {
            let kind = exts.u16("extension type")?;
            let data = exts.vec16("extension data")?;
            if kind == EXT_SUPPORTED_VERSIONS {
                let mut d = Reader::new(data);
                version = d.u16("selected_version")?;
            }
        }
    }
    Ok(ServerHello {
        session_id: session_id.to_vec(),
        version,
    })
}

/// How reading a ClientHello from a socket ended without one.
#[derive(Debug)]
pub enum NoHello {
    /// The client closed first.
    Closed,
    /// Not whole within the timeout.
    TimedOut,
    Io(std::io::Error),
    Bad(HelloError),
}

/// Read from `client` until its ClientHello is whole, within `timeout`; returns it with every
/// byte read, after `already` (bytes the caller read before, e.g. past a PROXY header).
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    client: &mut R,
    already: Vec<u8>,
    limit: usize,
    timeout: Duration,
) -> Result<(ClientHello, Vec<u8>), NoHello> {
    let mut reader = HelloReader::new(limit);
    let mut buf = already;
    if !buf.is_empty()
        && let Some(h) = reader.push(&buf).map_err(NoHello::Bad)?
    {
        return Ok((h, buf));
    }
    let mut chunk = vec![0u8; 16 * 1024];
    let read = async {
        loop {
            let n = client.read(&mut chunk).await.map_err(NoHello::Io)?;
            if n == 0 {
                return Err(NoHello::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(h) = reader.push(&chunk[..n]).map_err(NoHello::Bad)? {
                return Ok(h);
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(h)) => Ok((h, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(NoHello::TimedOut),
    }
}
