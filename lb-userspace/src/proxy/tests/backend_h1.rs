//! The backend side's HTTP/1.1 through the whole proxy: request framing, response framing
//! (chunked, close-delimited, interim 1xx), early answers and malformed backends.

use super::*;

/// A backend that answers every request on a connection with the same bytes, written in
/// `pieces` a little apart (so the proxy reads them in several reads); with `close`, it
/// closes the connection after each answer.
async fn scripted(pieces: &'static [&'static [u8]], close: bool) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                loop {
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    got.clear();
                    for p in pieces {
                        if tcp.write_all(p).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    Backend { addr, conns, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_reaches_the_backend_chunked() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let proxy = Proxy::plain(TestRouter::new(vec![b.addr])).await;
        let out = raw(
            proxy.addr,
            b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let d = doc(&Bytes::from(raw_body(&out).to_string()));
        assert_eq!(d["body"], "hello world");
        assert_eq!(seen(&d, "transfer-encoding"), ["chunked"]);
        assert!(seen(&d, "content-length").is_empty(), "{d}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_after_100_continue_is_forwarded_and_reused() {
    bounded(async {
        let b = scripted(
            &[
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-B: 1\r\n\r\n4\r\nab",
                b"cd\r\n3\r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n",
            ],
            false,
        )
        .await;
        let proxy = Proxy::plain(TestRouter::new(vec![b.addr])).await;
        let mut tx = h1(proxy.addr).await;
        for _ in 0..3 {
            let (status, headers, body) = send(&mut tx, get("/").body(empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers["x-b"], "1");
            assert_eq!(body, "abcdefg");
        }
        assert_eq!(
            b.conns(),
            1,
            "the chunked response left the connection reusable"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_response_is_forwarded_whole_and_not_reused() {
    bounded(async {
        let b = scripted(
            &[b"HTTP/1.0 200 OK\r\nX-B: 1\r\n\r\nuntil ", b"the close"],
            true,
        )
        .await;
        let proxy = Proxy::plain(TestRouter::new(vec![b.addr])).await;
        let mut tx = h1(proxy.addr).await;
        for _ in 0..2 {
            let (status, _, body) = send(&mut tx, get("/").body(empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, "until the close");
        }
        assert_eq!(b.conns(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_backend_head_is_a_502_and_the_proxy_keeps_serving() {
    bounded(async {
        let bad = scripted(&[b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"], false).await;
        let conflicting = scripted(
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"],
            false,
        )
        .await;
        for b in [&bad, &conflicting] {
            let proxy = Proxy::plain(TestRouter::new(vec![b.addr])).await;
            let out = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(out.starts_with("HTTP/1.1 502"), "{out}");
            assert_eq!(proxy.stats().upstream_errors, 1);
        }
        let good = Backend::echo("good", Behaviour::default()).await;
        let proxy = Proxy::plain(TestRouter::new(vec![good.addr])).await;
        let out = raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    })
    .await;
}

/// A backend that refuses a large upload answers before reading the body: the answer reaches
/// the client without the proxy waiting for the rest of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_end_of_the_request_body_is_forwarded() {
    bounded(async {
        let b = scripted(
            &[b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig"],
            true,
        )
        .await;
        let proxy = Proxy::plain(TestRouter::new(vec![b.addr])).await;
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nfirst bytes")
            .await
            .unwrap();
        let (head, _) = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    })
    .await;
}

/// A backend that answers at once and then reads the rest of the upload before it ends its
/// answer (a progress or streaming endpoint): the proxy keeps sending the request body while
/// it forwards the response, so the answer completes with every byte counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_body_keeps_going_after_an_early_answer() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _backend = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "backend: closed before the head");
                got.extend_from_slice(&buf[..n]);
            }
            let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut body = got.len() - end;
            tcp.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            while body < 10 {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(
                    n > 0,
                    "backend: the rest of the body never came ({body} of 10)"
                );
                body += n;
            }
            let count = format!("got {body}");
            let answer = format!("{:x}\r\n{count}\r\n0\r\n\r\n", count.len());
            tcp.write_all(answer.as_bytes()).await.unwrap();
            let _ = tcp.read(&mut buf).await;
        });
        let proxy = Proxy::plain(TestRouter::new(vec![addr])).await;
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(
            b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\nfirst",
        )
        .await
        .unwrap();
        let (head, _) = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // The rest of the body only after the answer's head came back.
        tcp.write_all(b"-last").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, tcp.read_to_end(&mut rest))
            .await
            .expect("the answer ends in time")
            .unwrap();
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.contains("got 10"),
            "the backend got the whole body: {rest:?}"
        );
    })
    .await;
}
