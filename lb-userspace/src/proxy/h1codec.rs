//! The backend side's HTTP/1.1 wire format, without I/O: the request head, chunked
//! encoding of a request body, the response head (parsed with `httparse`), response framing
//! (RFC 9112 6.3) and the chunked decoder.

use bytes::{Buf, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, StatusCode, Version,
    header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING},
    request, response,
};

/// Largest response head (status line and fields) accepted from a backend.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
pub(super) const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) or trailer line.
const MAX_LINE: usize = 4096;
/// Most trailer bytes read (and discarded) after the last chunk.
const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum CodecError {
    #[error("malformed response head: {0}")]
    Head(&'static str),
    #[error("response head over {MAX_HEAD} bytes or {MAX_HEADERS} fields")]
    HeadTooLarge,
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

/// How the request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReqFraming {
    /// No body.
    None,
    /// As many raw bytes as the `Content-Length` the head carries.
    Length,
    /// `Transfer-Encoding: chunked`, added to the head.
    Chunked,
}

/// The request framing: the head's own `Content-Length` when it has one (the client side
/// checked the body against it); otherwise a body of known size gets a `Content-Length`, one
/// of unknown size is chunked, and no body means no framing field.
pub(super) fn request_framing(
    headers: &HeaderMap,
    end_stream: bool,
    exact: Option<u64>,
) -> (ReqFraming, Option<u64>) {
    if headers.contains_key(CONTENT_LENGTH) {
        return (ReqFraming::Length, None);
    }
    if end_stream {
        return (ReqFraming::None, None);
    }
    match exact {
        Some(n) => (ReqFraming::Length, Some(n)),
        None => (ReqFraming::Chunked, None),
    }
}

/// Appends the request head to `out`: method, origin-form target, `HTTP/1.1`, the fields as
/// given, then the framing field the body needs.
pub(super) fn encode_head(
    parts: &request::Parts,
    framing: ReqFraming,
    add_length: Option<u64>,
    out: &mut Vec<u8>,
) {
    let uri = &parts.uri;
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path(), |pq| pq.as_str());
    let target = if target.is_empty() { "/" } else { target };
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = add_length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    } else if framing == ReqFraming::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The size line of one chunk of `len` bytes (`len` > 0).
pub(super) fn chunk_size_line(len: usize) -> Bytes {
    Bytes::from(format!("{len:x}\r\n"))
}

pub(super) const CRLF: &[u8] = b"\r\n";
/// The last chunk with no trailers.
pub(super) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A parsed response head.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) parts: response::Parts,
    pub(super) framing: RespFraming,
    /// The connection may carry another request once this response's body is done.
    pub(super) keep_alive: bool,
}

/// How the response body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RespFraming {
    /// No body: a response to HEAD, 204, 304.
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    Close,
    /// 101 Switching Protocols: what follows the head is the new protocol's.
    Upgrade,
}

/// What parsing found in the buffer.
#[derive(Debug)]
pub(super) enum Parsed {
    /// A final head; its bytes were removed from the buffer.
    Final(Box<Head>),
    /// An interim 1xx response (not 101), removed from the buffer: another head follows.
    Interim,
    /// More bytes are needed.
    Partial,
}

/// What the in-task client makes of `data` from a backend: `Ok(None)` while the final head
/// is incomplete, else its status, the body bytes its framing delimits within `data`, and
/// whether the body ended there. For the fuzz target (through `proxy::parse_backend_response`).
pub(super) fn parse_response(
    data: &[u8],
    head_request: bool,
) -> Result<Option<(u16, Vec<u8>, bool)>, CodecError> {
    let mut buf = BytesMut::from(data);
    let head = loop {
        match parse_head(&mut buf, head_request)? {
            Parsed::Final(head) => break head,
            Parsed::Interim => {}
            Parsed::Partial => return Ok(None),
        }
    };
    let mut body = Vec::new();
    let complete = match head.framing {
        RespFraming::Empty | RespFraming::Upgrade => true,
        RespFraming::Length(n) => {
            let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
            body.extend_from_slice(&buf[..take]);
            take as u64 == n
        }
        RespFraming::Close => {
            body.extend_from_slice(&buf);
            false
        }
        RespFraming::Chunked(mut dec) => loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => {
                    body.extend_from_slice(&d);
                    if dec.is_done() {
                        break true;
                    }
                }
                Decoded::More => break false,
                Decoded::Done => break true,
            }
        },
    };
    Ok(Some((head.parts.status.as_u16(), body, complete)))
}

/// Parses the response head at the start of `buf`. `head_request`: the request was HEAD
/// (its response has no body whatever its fields say).
pub(super) fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, CodecError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(CodecError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(CodecError::HeadTooLarge),
        Err(_) => return Err(CodecError::Head("syntax")),
    };
    if len > MAX_HEAD {
        return Err(CodecError::HeadTooLarge);
    }
    let code = resp.code.ok_or(CodecError::Head("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| CodecError::Head("status code"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Offsets into the head, so that the values share its allocation (no copy per field),
    // kept on the stack (no allocation per response).
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = resp.headers.len();
    for (span, f) in spans.iter_mut().zip(resp.headers.iter()) {
        let name = f.name.as_ptr() as usize - base;
        let value = f.value.as_ptr() as usize - base;
        // Within MAX_HEAD (checked above), so u32 holds them.
        *span = (
            name as u32,
            f.name.len() as u32,
            value as u32,
            f.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(name, name_len, value, value_len) in &spans[..count] {
        let (name, value) = (name as usize, value as usize);
        let name = HeaderName::from_bytes(&head[name..name + name_len as usize])
            .map_err(|_| CodecError::Head("field name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len as usize))
            .map_err(|_| CodecError::Head("field value"))?;
        headers.append(name, value);
    }
    let keep_alive = keep_alive(version, &headers);
    let (framing, keep_alive) = framing(status, head_request, &mut headers, keep_alive)?;
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    // The client hears the proxy's version: an HTTP/1.0 backend's version (which decided
    // `keep_alive` above) would make the client side close its connection.
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Ok(Parsed::Final(Box::new(Head {
        parts,
        framing,
        keep_alive,
    })))
}

/// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with
/// `Connection: keep-alive`.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut close = false;
    let mut keep = false;
    for token in headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let token = token.trim();
        close |= token.eq_ignore_ascii_case("close");
        keep |= token.eq_ignore_ascii_case("keep-alive");
    }
    !close && (version == Version::HTTP_11 || keep)
}

/// The body's framing and whether the connection stays reusable after it.
fn framing(
    status: StatusCode,
    head_request: bool,
    headers: &mut HeaderMap,
    keep_alive: bool,
) -> Result<(RespFraming, bool), CodecError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((RespFraming::Upgrade, false));
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((RespFraming::Empty, keep_alive));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        // Transfer-Encoding overrides Content-Length, which must not be forwarded with it.
        headers.remove(CONTENT_LENGTH);
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => {
                (RespFraming::Chunked(Chunked::default()), keep_alive)
            }
            // Another final coding: the body ends with the connection.
            _ => (RespFraming::Close, false),
        });
    }
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        let s = v.to_str().map_err(|_| CodecError::ContentLength)?;
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CodecError::ContentLength);
            }
            let n: u64 = part.parse().map_err(|_| CodecError::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(CodecError::ContentLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (RespFraming::Empty, keep_alive),
        Some(n) => (RespFraming::Length(n), keep_alive),
        None => (RespFraming::Close, false),
    })
}

/// The chunked decoder's place in the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one; bytes read so far.
    Trailers(usize),
    Done,
}

/// One step of the chunked decoder.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decoded {
    Data(Bytes),
    /// More input is needed.
    More,
    Done,
}

impl Chunked {
    pub(super) fn is_done(&self) -> bool {
        *self == Chunked::Done
    }

    /// Consumes from `buf` up to the next data (or the end, or the end of the input). After
    /// data, whatever framing follows in `buf` is consumed too, so that [`Chunked::is_done`]
    /// says at once when that data was the last.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, CodecError> {
        let mut data = None;
        loop {
            match *self {
                Chunked::Done => break,
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else { break };
                    let size = chunk_size(&line)?;
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if data.is_some() || buf.is_empty() {
                        break;
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    data = Some(buf.split_to(n).freeze());
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(CodecError::Chunked("no CRLF after chunk data"));
                        }
                        break;
                    }
                    if &buf[..2] != CRLF {
                        return Err(CodecError::Chunked("no CRLF after chunk data"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers(seen) => {
                    let Some(line) = take_line(buf)? else { break };
                    let seen = seen + line.len() + 2;
                    if seen > MAX_TRAILERS {
                        return Err(CodecError::Chunked("trailers too large"));
                    }
                    *self = if line.is_empty() {
                        Chunked::Done
                    } else {
                        Chunked::Trailers(seen)
                    };
                }
            }
        }
        Ok(match data {
            Some(d) => Decoded::Data(d),
            None if self.is_done() => Decoded::Done,
            None => Decoded::More,
        })
    }
}

/// One CRLF-terminated line from `buf` (without the CRLF), or `None` until it is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i == 0 || window[i - 1] != b'\r' => Err(CodecError::Chunked("bare LF")),
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i - 1);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(CodecError::Chunked("line too long")),
        None => Ok(None),
    }
}

/// The hexadecimal size at the start of a chunk-size line (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Result<u64, CodecError> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(end);
    if digits.is_empty() || digits.len() > 15 {
        return Err(CodecError::Chunked("chunk size"));
    }
    // Only whitespace may come between the size and an extension.
    let rest = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .map_or(&[][..], |i| &rest[i..]);
    if !rest.is_empty() && rest[0] != b';' {
        return Err(CodecError::Chunked("chunk size"));
    }
    let mut n = 0u64;
    for &d in digits {
        let v = (d as char)
            .to_digit(16)
            .ok_or(CodecError::Chunked("chunk size"))?;
        n = n * 16 + u64::from(v);
    }
    Ok(n)
}

#[cfg(test)]
#[path = "h1codec_tests.rs"]
mod tests;
