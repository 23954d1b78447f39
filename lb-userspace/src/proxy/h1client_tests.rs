use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use super::{Conn, ExchangeError, Recycle, ResponseBody};
use crate::proxy::body::ProxyBody;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Collects the connections given back.
#[derive(Default)]
struct Returned(Mutex<Vec<Conn>>);

impl Recycle for Returned {
    fn put(&self, _: SocketAddr, conn: Conn) {
        self.0.lock().unwrap().push(conn);
    }
}

impl Returned {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A connection to a one-shot backend that reads one request head (and `body_len` body
/// bytes), hands the request bytes back, then writes each of `answer`'s pieces (flushed
/// apart) and keeps the connection open until the client closes it.
async fn backend(
    answer: Vec<&'static [u8]>,
) -> (Conn, tokio::task::JoinHandle<Vec<u8>>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !request_complete(&got) {
            let n = tokio::time::timeout(TIMEOUT, tcp.read(&mut buf))
                .await
                .expect("backend: request within the timeout")
                .unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        for piece in answer {
            tcp.write_all(piece).await.unwrap();
            tcp.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = tokio::time::timeout(TIMEOUT, tcp.read(&mut buf)).await;
        got
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    (Conn::new(tcp, permit), task, addr)
}

/// A connection to a backend that reads once, writes `pieces` and closes: a close-delimited
/// body, a body cut short, or (no pieces) a connection closed without a response.
async fn closing_backend(pieces: &'static [&'static [u8]]) -> (Conn, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tcp.read(&mut buf).await;
        for p in pieces {
            tcp.write_all(p).await.unwrap();
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    (Conn::new(tcp, permit), addr)
}

/// A head, plus a body framed by Content-Length or chunked, fully received.
fn request_complete(got: &[u8]) -> bool {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let body = &got[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    body.len() >= len
}

fn get() -> Request<ProxyBody> {
    Request::get("/x")
        .header(header::HOST, "app")
        .body(ProxyBody::empty())
        .unwrap()
}

async fn exchange(
    conn: Conn,
    req: Request<ProxyBody>,
    addr: SocketAddr,
    pool: &Arc<Returned>,
) -> Result<http::Response<ResponseBody<ProxyBody>>, ExchangeError<ProxyBody>> {
    let weak: Weak<dyn Recycle> = Arc::downgrade(pool) as Weak<dyn Recycle>;
    tokio::time::timeout(
        TIMEOUT,
        conn.exchange(req, Duration::from_secs(2), addr, weak),
    )
    .await
    .expect("exchange within the timeout")
}

fn failed(
    res: Result<http::Response<ResponseBody<ProxyBody>>, ExchangeError<ProxyBody>>,
) -> (String, bool) {
    match res {
        Err(ExchangeError::Failed { why, replay }) => (why, replay.is_some()),
        Err(ExchangeError::Timeout) => panic!("timeout, not a failure"),
        Err(ExchangeError::NotSent(..)) => panic!("not sent, not a failure"),
        Ok(r) => panic!("a response: {:?}", r.status()),
    }
}

async fn collect(body: ResponseBody<ProxyBody>) -> Result<Bytes, super::BodyError> {
    tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .expect("body within the timeout")
        .map(|c| c.to_bytes())
}

#[tokio::test]
async fn chunked_response_split_across_reads_returns_the_connection() {
    let (conn, task, addr) = backend(vec![
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r",
        b"\nhel",
        b"lo\r\n6\r\n world\r\n0\r\n",
        b"\r\n",
    ])
    .await;
    let pool = Arc::new(Returned::default());
    let resp = exchange(conn, get(), addr, &pool).await.ok().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the 100 was skipped");
    assert_eq!(collect(resp.into_body()).await.unwrap(), "hello world");
    assert_eq!(
        pool.count(),
        1,
        "a keep-alive connection goes back to the pool"
    );
    drop(pool);
    let got = task.await.unwrap();
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "GET /x HTTP/1.1\r\nhost: app\r\n\r\n"
    );
}

#[tokio::test]
async fn content_length_body_and_request_body() {
    let (conn, task, addr) = backend(vec![
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nd",
        b"one",
    ])
    .await;
    let pool = Arc::new(Returned::default());
    let req = Request::post("/up")
        .header(header::HOST, "app")
        .body(ProxyBody::text("payload"))
        .unwrap();
    let resp = exchange(conn, req, addr, &pool).await.ok().unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body = resp.into_body();
    assert_eq!(body.size_hint().exact(), Some(4));
    assert_eq!(collect(body).await.unwrap(), "done");
    assert_eq!(pool.count(), 1);
    drop(pool);
    let got = String::from_utf8(task.await.unwrap()).unwrap();
    assert_eq!(
        got,
        "POST /up HTTP/1.1\r\nhost: app\r\ncontent-length: 7\r\n\r\npayload"
    );
}

#[tokio::test]
async fn connection_close_and_close_delimited_are_not_reused() {
    let (conn, _task, addr) = backend(vec![
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    let pool = Arc::new(Returned::default());
    let resp = exchange(conn, get(), addr, &pool).await.ok().unwrap();
    assert_eq!(collect(resp.into_body()).await.unwrap(), "ok");
    assert_eq!(pool.count(), 0, "Connection: close");

    // Read to EOF: the backend closes after the body.
    let (conn, addr) = closing_backend(&[b"HTTP/1.0 200 OK\r\n\r\nuntil the ", b"end"]).await;
    let resp = exchange(conn, get(), addr, &pool).await.ok().unwrap();
    assert_eq!(collect(resp.into_body()).await.unwrap(), "until the end");
    assert_eq!(pool.count(), 0, "close-delimited");
}

#[tokio::test]
async fn head_and_204_have_no_body_and_reuse() {
    let (conn, _task, addr) =
        backend(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"]).await;
    let pool = Arc::new(Returned::default());
    let req = Request::head("/")
        .header(header::HOST, "app")
        .body(ProxyBody::empty())
        .unwrap();
    let resp = exchange(conn, req, addr, &pool).await.ok().unwrap();
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "100");
    assert!(resp.body().is_end_stream());
    assert_eq!(pool.count(), 1, "given back with the head: nothing to read");
    assert_eq!(collect(resp.into_body()).await.unwrap(), "");

    let (conn, _task, addr) = backend(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]).await;
    let resp = exchange(conn, get(), addr, &pool).await.ok().unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(collect(resp.into_body()).await.unwrap(), "");
    assert_eq!(pool.count(), 2);
}

#[tokio::test]
async fn a_body_dropped_early_or_cut_short_closes_the_connection() {
    let (conn, _task, addr) =
        backend(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]).await;
    let pool = Arc::new(Returned::default());
    let resp = exchange(conn, get(), addr, &pool).await.ok().unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "abc");
    drop(body);
    assert_eq!(pool.count(), 0, "dropped early");

    // The backend closes in the middle of the body: an error, not a short success.
    let (conn, addr) =
        closing_backend(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"]).await;
    let resp = exchange(conn, get(), addr, &pool).await.ok().unwrap();
    assert!(collect(resp.into_body()).await.is_err());
    assert_eq!(pool.count(), 0);
}

#[tokio::test]
async fn malformed_head_and_silent_close_fail() {
    let (conn, _task, addr) = backend(vec![b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"]).await;
    let pool = Arc::new(Returned::default());
    let (why, replay) = failed(exchange(conn, get(), addr, &pool).await);
    assert!(why.contains("malformed"), "{why}");
    assert!(!replay, "the backend answered: no replay");

    // Closed without a byte: a candidate for a replay.
    let (conn, addr) = closing_backend(&[]).await;
    let (_, replay) = failed(exchange(conn, get(), addr, &pool).await);
    assert!(replay, "the bodiless request comes back to be replayed");

    // The same with a body: it may have been acted on, no replay.
    let (conn, addr) = closing_backend(&[]).await;
    let post = Request::post("/")
        .header(header::HOST, "app")
        .body(ProxyBody::text("x=1"))
        .unwrap();
    let (_, replay) = failed(exchange(conn, post, addr, &pool).await);
    assert!(!replay, "a request with a body is not handed back");
}

#[tokio::test]
async fn no_head_within_the_response_timeout() {
    let (conn, _task, addr) = backend(vec![]).await;
    let weak: Weak<dyn Recycle> = Arc::downgrade(&Arc::new(Returned::default())) as Weak<_>;
    let res = tokio::time::timeout(
        TIMEOUT,
        conn.exchange(get(), Duration::from_millis(100), addr, weak),
    )
    .await
    .expect("the exchange's own timeout fires first");
    assert!(matches!(res, Err(ExchangeError::Timeout)));
}

#[tokio::test]
async fn upgrade_hands_over_the_stream_and_bytes_read_past_the_head() {
    let (conn, _task, addr) = backend(vec![
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nhi",
    ])
    .await;
    let pool = Arc::new(Returned::default());
    let req = Request::get("/ws")
        .header(header::HOST, "app")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .body(ProxyBody::empty())
        .unwrap();
    let resp = exchange(conn, req, addr, &pool).await.ok().unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut up = resp
        .into_body()
        .into_upgrade()
        .expect("an upgraded connection");
    let mut read = up.read.to_vec();
    while read.len() < 2 {
        let mut buf = [0u8; 16];
        let n = up.io.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "EOF before the backend's first bytes");
        read.extend_from_slice(&buf[..n]);
    }
    assert_eq!(read, b"hi");
    assert_eq!(pool.count(), 0);
}

#[tokio::test]
async fn idle_connection_closed_by_the_backend_is_stale() {
    let (conn, task, _) = backend(vec![]).await;
    assert!(!conn.is_stale(), "open and quiet");
    // The backend gets a complete (empty) request, answers nothing and closes.
    let mut conn = conn;
    conn.io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    task.abort();
    let mut stale = false;
    for _ in 0..200 {
        if conn.is_stale() {
            stale = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stale, "a closed connection is seen as stale");
}
