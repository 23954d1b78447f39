use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Version, header};
use proptest::prelude::*;

use super::{
    Chunked, CodecError, Decoded, MAX_HEAD, Parsed, ReqFraming, RespFraming, encode_head,
    parse_head, request_framing,
};

fn parse(raw: &[u8], head_request: bool) -> (Result<Parsed, CodecError>, BytesMut) {
    let mut buf = BytesMut::from(raw);
    let res = parse_head(&mut buf, head_request);
    (res, buf)
}

/// The final head of `raw`, with the bytes left after it.
fn head(raw: &[u8], head_request: bool) -> (Box<super::Head>, BytesMut) {
    match parse(raw, head_request) {
        (Ok(Parsed::Final(h)), rest) => (h, rest),
        (other, _) => panic!("no final head in {raw:?}: {other:?}"),
    }
}

/// Decodes all of `input` fed in pieces of the given sizes; the data, whether the decoder
/// reached the end, and how many input bytes it left (unconsumed or not fed).
fn decode_split(input: &[u8], splits: &[usize]) -> Result<(Vec<u8>, bool, usize), CodecError> {
    let mut dec = Chunked::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut sizes = splits.iter().copied().chain(std::iter::repeat(usize::MAX));
    loop {
        match dec.decode(&mut buf)? {
            Decoded::Data(d) => out.extend_from_slice(&d),
            Decoded::Done => return Ok((out, true, buf.len() + input.len() - fed)),
            Decoded::More if fed == input.len() => return Ok((out, false, buf.len())),
            Decoded::More => {
                let n = sizes.next().unwrap_or(1).max(1).min(input.len() - fed);
                buf.extend_from_slice(&input[fed..fed + n]);
                fed += n;
            }
        }
    }
}

#[test]
fn request_head_keeps_fields_and_adds_framing() {
    let req = Request::post("/a/b?x=1")
        .header(header::HOST, "app.example")
        .header("x-one", "1")
        .header("x-one", "2")
        .body(())
        .unwrap();
    let (parts, ()) = req.into_parts();
    let mut out = Vec::new();
    encode_head(&parts, ReqFraming::Chunked, None, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "POST /a/b?x=1 HTTP/1.1\r\nhost: app.example\r\nx-one: 1\r\nx-one: 2\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    let mut out = Vec::new();
    encode_head(&parts, ReqFraming::Length, Some(7), &mut out);
    assert!(
        out.ends_with(b"x-one: 2\r\ncontent-length: 7\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let (parts, ()) = Request::options("*").body(()).unwrap().into_parts();
    let mut out = Vec::new();
    encode_head(&parts, ReqFraming::None, None, &mut out);
    assert_eq!(out, b"OPTIONS * HTTP/1.1\r\n\r\n");
}

#[test]
fn request_framing_follows_the_head_then_the_body() {
    let mut with_cl = HeaderMap::new();
    with_cl.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
    let none = HeaderMap::new();
    assert_eq!(
        request_framing(&with_cl, false, Some(3)),
        (ReqFraming::Length, None),
        "the client's own Content-Length, not a second one"
    );
    assert_eq!(
        request_framing(&none, true, Some(0)),
        (ReqFraming::None, None)
    );
    assert_eq!(
        request_framing(&none, false, Some(9)),
        (ReqFraming::Length, Some(9))
    );
    assert_eq!(
        request_framing(&none, false, None),
        (ReqFraming::Chunked, None)
    );
}

#[test]
fn content_length_response_and_reuse() {
    let (h, rest) = head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
        false,
    );
    assert_eq!(h.parts.status, StatusCode::OK);
    assert_eq!(h.parts.version, Version::HTTP_11);
    assert_eq!(h.parts.headers["x-a"], "b");
    assert_eq!(h.framing, RespFraming::Length(5));
    assert!(h.keep_alive);
    assert_eq!(&rest[..], b"hello", "the body stays in the buffer");

    // Repeated equal values are one length; different ones are an error.
    let (h, _) = head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\nContent-Length: 4\r\n\r\n",
        false,
    );
    assert_eq!(h.framing, RespFraming::Length(4));
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
    ] {
        let (res, _) = parse(bad, false);
        assert_eq!(
            res.err(),
            Some(CodecError::ContentLength),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let (h, _) = head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false);
    assert_eq!(h.framing, RespFraming::Empty);
}

#[test]
fn bodiless_responses_ignore_their_length() {
    let (h, rest) = head(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", true);
    assert_eq!(h.framing, RespFraming::Empty, "a response to HEAD");
    assert_eq!(
        h.parts.headers[header::CONTENT_LENGTH],
        "50",
        "kept for the client"
    );
    assert!(h.keep_alive && rest.is_empty());
    for status in ["204 No Content", "304 Not Modified"] {
        let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 50\r\n\r\n");
        let (h, _) = head(raw.as_bytes(), false);
        assert_eq!(h.framing, RespFraming::Empty, "{status}");
        assert!(h.keep_alive, "{status}");
    }
}

#[test]
fn interim_responses_are_skipped_but_not_101() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"[..],
    );
    assert!(matches!(parse_head(&mut buf, false), Ok(Parsed::Interim)));
    assert!(matches!(parse_head(&mut buf, false), Ok(Parsed::Interim)));
    match parse_head(&mut buf, false) {
        Ok(Parsed::Final(h)) => assert_eq!(h.parts.status, StatusCode::CREATED),
        other => panic!("no final head: {other:?}"),
    }
    assert!(buf.is_empty());

    let (h, rest) = head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x02hi",
        false,
    );
    assert_eq!(h.parts.status, StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(h.framing, RespFraming::Upgrade);
    assert!(!h.keep_alive);
    assert_eq!(
        &rest[..],
        b"\x81\x02hi",
        "bytes after the head belong to the tunnel"
    );
}

#[test]
fn chunked_and_close_delimited_framing() {
    let (h, _) = head(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 10\r\n\r\n",
        false,
    );
    assert_eq!(h.framing, RespFraming::Chunked(Chunked::Size));
    assert!(
        !h.parts.headers.contains_key(header::CONTENT_LENGTH),
        "Content-Length next to Transfer-Encoding is dropped"
    );
    let (h, _) = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
    assert_eq!((h.framing, h.keep_alive), (RespFraming::Close, false));
    let (h, _) = head(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n", false);
    assert_eq!((h.framing, h.keep_alive), (RespFraming::Close, false));
}

#[test]
fn keep_alive_decision() {
    for (raw, keep) in [
        (&b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..], true),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            true,
        ),
    ] {
        let (h, _) = head(raw, false);
        assert_eq!(h.keep_alive, keep, "{}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn malformed_or_huge_heads_are_errors() {
    for bad in [
        &b"HTTP/1.1 2x0 OK\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n",
    ] {
        let (res, _) = parse(bad, false);
        assert!(
            matches!(res, Err(CodecError::Head(_))),
            "{}: {res:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(parse(&many, false).0.err(), Some(CodecError::HeadTooLarge));
    let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    long.resize(MAX_HEAD + 10, b'a');
    assert_eq!(parse(&long, false).0.err(), Some(CodecError::HeadTooLarge));
    // Short of the limit, an incomplete head waits for more.
    assert!(matches!(
        parse(b"HTTP/1.1 200 OK\r\nX: ab", false).0,
        Ok(Parsed::Partial)
    ));
}

#[test]
fn chunked_decode_whole_and_byte_by_byte() {
    let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
    for splits in [vec![usize::MAX], vec![1; body.len()]] {
        let (data, done, left) = decode_split(body, &splits).unwrap();
        assert_eq!(data, b"hello, world");
        assert!(done, "reached the end");
        assert_eq!(left, 4, "bytes after the body are not consumed");
    }
}

#[test]
fn chunked_end_is_seen_with_the_last_data() {
    let mut dec = Chunked::default();
    let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\n"[..]);
    assert_eq!(
        dec.decode(&mut buf).unwrap(),
        Decoded::Data(Bytes::from_static(b"abc"))
    );
    assert!(
        dec.is_done(),
        "the last chunk and trailers were read with the data"
    );
}

#[test]
fn chunked_rejects_bad_sizes_and_long_lines() {
    for bad in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"\r\n",
        b"5 x\r\nhello\r\n0\r\n\r\n",
        b"10000000000000000\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\nhello\r\n",
        b"-5\r\nhello\r\n",
    ] {
        let res = decode_split(bad, &[usize::MAX]);
        assert!(
            matches!(res, Err(CodecError::Chunked(_))),
            "{}: {res:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut long = b"5;".to_vec();
    long.resize(10_000, b'a');
    assert!(matches!(
        decode_split(&long, &[usize::MAX]),
        Err(CodecError::Chunked(_))
    ));
    let mut trailers = b"0\r\n".to_vec();
    for _ in 0..40_000 {
        trailers.extend_from_slice(b"x: y\r\n");
    }
    assert!(matches!(
        decode_split(&trailers, &[usize::MAX]),
        Err(CodecError::Chunked(_))
    ));
    // Incomplete but valid: waits for more.
    assert_eq!(
        decode_split(b"5\r\nhel", &[usize::MAX]).unwrap(),
        (b"hel".to_vec(), false, 0)
    );
}

proptest! {
    /// However a chunked body is split across reads, the same data comes out and the end is
    /// found.
    #[test]
    fn chunked_decode_is_independent_of_read_splits(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..8),
        splits in prop::collection::vec(1usize..64, 0..200),
    ) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for c in &chunks {
            wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
            expected.extend_from_slice(c);
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let (data, done, left) = decode_split(&wire, &splits).unwrap();
        prop_assert_eq!(data, expected);
        prop_assert!(done);
        prop_assert_eq!(left, 0);
    }
}

/// Status, body, whether it ended.
type Read<'a> = Option<(u16, &'a [u8], bool)>;

#[test]
fn parse_response_reads_head_framing_and_body_as_the_client_does() {
    let cases: &[(&[u8], bool, Read)] = &[
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false, Some((200, b"hello", true))),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", false, Some((200, b"hel", false))),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\n\r\n",
            false,
            Some((200, b"hello", true)),
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, Some((200, b"", true))),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil close", false, Some((200, b"until close", false))),
        (b"HTTP/1.1 200 OK\r\nContent-Le", false, None),
    ];
    for (data, head, want) in cases {
        let got = super::parse_response(data, *head)
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(data)));
        let want = want.map(|(s, b, c)| (s, b.to_vec(), c));
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(data));
    }
    let bad = super::parse_response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        false,
    );
    assert!(bad.is_err(), "a bad chunk size is an error: {bad:?}");
}
