//! End-to-end tests on 127.0.0.1: a test router, echo backends (hyper servers), and clients
//! speaking HTTP/1.1, HTTP/2 over TLS, raw bytes, PROXY headers and upgrades. Every wait is
//! bounded.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use super::*;

/// Upper bound for any one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one read or one exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

/// Polls `cond` every 10 ms for at most `IO_TIMEOUT`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < IO_TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Backends

#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Wait before answering.
    delay: Duration,
    /// Answer with `Connection: close`.
    close: bool,
}

struct Backend {
    addr: SocketAddr,
    /// TCP connections accepted.
    conns: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Answers every request with a JSON echo of it; upgrade requests get a 101 and an echo
    /// of every byte on the upgraded connection.
    async fn echo(name: &'static str, how: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| echo(name, how, req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend { addr, conns, task }
    }

    /// Accepts, reads the start of a request, then resets the connection.
    async fn reset() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 64];
                let _ = tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf)).await;
                let _ = tcp.set_zero_linger();
                drop(tcp);
            }
        });
        Backend { addr, conns, task }
    }

    /// Answers the first request on each connection with 200 "ok", then closes the
    /// connection when the second request arrives, without answering it (a keep-alive
    /// timeout racing a reused connection).
    async fn one_shot() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = read_head(&mut tcp).await;
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    let _ = tcp.write_all(ok).await;
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf)).await;
                });
            }
        });
        Backend { addr, conns, task }
    }
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn echo(
    name: &'static str,
    how: Behaviour,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !how.delay.is_zero() {
        tokio::time::sleep(how.delay).await;
    }
    if req.headers().contains_key(header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            while let Ok(Ok(n)) = tokio::time::timeout(IO_TIMEOUT, io.read(&mut buf)).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
        return Ok(resp);
    }
    let headers: Vec<Value> = req
        .headers()
        .iter()
        .map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let doc = json!({
        "backend": name,
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut resp = Response::builder()
        .header("x-backend", name)
        .header(header::CONTENT_TYPE, "application/json")
        .header("keep-alive", "timeout=5");
    if how.close {
        resp = resp.header(header::CONNECTION, "close");
    }
    Ok(resp.body(Full::new(Bytes::from(doc.to_string()))).unwrap())
}

/// Values of header `name` in an echo document.
fn seen(doc: &Value, name: &str) -> Vec<String> {
    doc["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Router

#[derive(Default)]
struct TestRouter {
    backends: Vec<SocketAddr>,
    next: AtomicUsize,
    /// Answer every request with this status.
    fail: Option<StatusCode>,
    /// Per route() call: the client, `tried`.
    calls: Mutex<Vec<(ConnInfo, Vec<SocketAddr>)>>,
    opened: AtomicUsize,
    closed: AtomicUsize,
}

impl TestRouter {
    fn new(backends: Vec<SocketAddr>) -> Arc<TestRouter> {
        Arc::new(TestRouter {
            backends,
            ..TestRouter::default()
        })
    }

    fn calls(&self) -> Vec<(ConnInfo, Vec<SocketAddr>)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Router for TestRouter {
    fn route(
        &self,
        _req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
    ) -> Result<Route, StatusCode> {
        self.calls.lock().unwrap().push((*conn, tried.to_vec()));
        if let Some(status) = self.fail {
            return Err(status);
        }
        for _ in 0..self.backends.len() {
            let i = self.next.fetch_add(1, Ordering::SeqCst) % self.backends.len();
            if !tried.contains(&self.backends[i]) {
                return Ok(Route {
                    backend: self.backends[i],
                    token: i as u64,
                    tag: Some(Arc::new(format!("tag{i}"))),
                });
            }
        }
        Err(StatusCode::SERVICE_UNAVAILABLE)
    }

    fn on_response(&self, route: &Route, _conn: &ConnInfo, resp: &mut http::response::Parts) {
        let tag = route
            .tag
            .as_ref()
            .and_then(|t| t.downcast_ref::<String>())
            .unwrap();
        let v = format!("{}/{tag}", route.token);
        resp.headers.insert("x-routed", v.parse().unwrap());
    }

    fn connection_opened(&self, _conn: &ConnInfo) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }

    fn connection_closed(&self, _conn: &ConnInfo) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy under test

pub(super) fn test_limits() -> Limits {
    Limits {
        max_connections: 64,
        max_header_bytes: 8 * 1024,
        request_header_timeout: Duration::from_secs(3),
        idle_timeout: Duration::from_secs(5),
        upstream_connect_timeout: Duration::from_secs(1),
        upstream_response_timeout: Duration::from_secs(3),
        shutdown_grace: Duration::from_secs(3),
        ..Limits::default()
    }
}

/// The test clients' source: trusted to send a PROXY header.
fn loopback() -> crate::cidr::Cidrs {
    crate::cidr::Cidrs::parse(&["127.0.0.0/8"]).expect("loopback prefix")
}

struct Proxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), ProxyError>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Proxy {
    async fn start(
        router: Arc<TestRouter>,
        tls: Option<TlsFiles>,
        proxy_protocol: Option<crate::cidr::Cidrs>,
        limits: Limits,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = ProxyConfig {
            listen: addr,
            tls: tls.map(|f| TlsHandle::load(&f).unwrap()),
            proxy_protocol,
            trusted_forwarders: crate::cidr::Cidrs::default(),
            limits,
        };
        let stats = Arc::new(ProxyStats::default());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve_with_stats(listener, cfg, router, rx, stats.clone()));
        Proxy {
            addr,
            stats,
            stop,
            task: Some(task),
        }
    }

    async fn plain(router: Arc<TestRouter>) -> Proxy {
        Proxy::start(router, None, None, test_limits()).await
    }

    fn stats(&self) -> ProxyStatsSnapshot {
        self.stats.snapshot()
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1_over<T>(io: T) -> H1
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn h1(addr: SocketAddr) -> H1 {
    h1_over(TcpStream::connect(addr).await.unwrap()).await
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header(header::HOST, "app.example")
}

/// Sends one request; returns status, headers and body.
async fn send(tx: &mut H1, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    tokio::time::timeout(IO_TIMEOUT, async {
        tx.ready().await.unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    })
    .await
    .expect("response in time")
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

fn doc(body: &Bytes) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not an echo ({e}): {}", String::from_utf8_lossy(body)))
}

/// Writes `bytes`, then reads until EOF (or `IO_TIMEOUT`); returns what was read.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    read_to_close(&mut tcp).await
}

async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {IO_TIMEOUT:?}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads up to the end of a response head; returns it and any bytes after it.
async fn read_head(tcp: &mut TcpStream) -> (String, Vec<u8>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf))
            .await
            .expect("head in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
        assert!(out.len() < 64 * 1024);
    }
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let rest = out.split_off(end);
    (String::from_utf8_lossy(&out).into_owned(), rest)
}

/// Body of a raw `Connection: close` response.
fn raw_body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

// ---------------------------------------------------------------------------------------------
// TLS

struct Certs {
    files: TlsFiles,
    der: CertificateDer<'static>,
    dir: PathBuf,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `der` as a PEM block with `label`; also used by the frontends tests.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn certs() -> Certs {
    static N: AtomicUsize = AtomicUsize::new(0);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "tether-proxy-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_pem = dir.join("cert.pem");
    let key_pem = dir.join("key.pem");
    std::fs::write(&cert_pem, pem("CERTIFICATE", cert.cert.der())).unwrap();
    std::fs::write(
        &key_pem,
        pem("PRIVATE KEY", &cert.signing_key.serialize_der()),
    )
    .unwrap();
    Certs {
        files: TlsFiles { cert_pem, key_pem },
        der: cert.cert.der().clone(),
        dir,
    }
}

async fn tls_connect(
    addr: SocketAddr,
    certs: &Certs,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        IO_TIMEOUT,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_round_trips_reuse_one_backend_connection() {
    bounded(async {
        let b = Backend::echo("b1", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let proxy = Proxy::plain(router.clone()).await;
        let mut tx = h1(proxy.addr).await;
        for i in 0..5 {
            let req = get(&format!("/item/{i}?q=1"))
                .header("x-forwarded-for", "198.51.100.1")
                .header("x-forwarded-proto", "gopher")
                .header(header::CONNECTION, "X-Foo")
                .header("x-foo", "secret")
                .header("keep-alive", "timeout=99")
                .header(header::TE, "trailers")
                .header("x-kept", "yes")
                .body(empty())
                .unwrap();
            let (status, headers, body) = send(&mut tx, req).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers["x-backend"], "b1");
            assert_eq!(headers["x-routed"], "0/tag0", "on_response ran");
            assert!(
                !headers.contains_key("keep-alive"),
                "hop-by-hop from the backend"
            );
            let d = doc(&body);
            assert_eq!(d["uri"], format!("/item/{i}?q=1"));
            assert_eq!(d["version"], "HTTP/1.1");
            assert_eq!(seen(&d, "host"), ["app.example"]);
            // The client is not a trusted forwarder: its own list is replaced.
            assert_eq!(seen(&d, "x-forwarded-for"), ["127.0.0.1"]);
            assert_eq!(seen(&d, "x-forwarded-proto"), ["http"]);
            assert_eq!(seen(&d, "x-forwarded-host"), ["app.example"]);
            assert_eq!(seen(&d, "x-kept"), ["yes"]);
            for gone in ["connection", "x-foo", "keep-alive", "te"] {
                assert!(seen(&d, gone).is_empty(), "{gone} was forwarded: {d}");
            }
        }
        let (status, _, body) = send(
            &mut tx,
            Request::post("/upload")
                .header(header::HOST, "app.example")
                .body(Full::new(Bytes::from_static(b"hello body")))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let d = doc(&body);
        assert_eq!(
            (d["method"].as_str(), d["body"].as_str()),
            (Some("POST"), Some("hello body"))
        );
        assert_eq!(seen(&d, "content-length"), ["10"]);
        assert_eq!(b.conns(), 1, "6 requests, one backend connection");
        let s = proxy.stats();
        assert_eq!(s.requests, 6);
        assert_eq!(s.responses, [0, 6, 0, 0, 0]);
        assert_eq!(router.opened.load(Ordering::SeqCst), 1);
        drop(tx);
        eventually("connection_closed", || {
            router.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(proxy.stats().connections_active(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connection_close_is_not_reused_nor_forwarded() {
    bounded(async {
        let b = Backend::echo(
            "closing",
            Behaviour {
                close: true,
                ..Behaviour::default()
            },
        )
        .await;
        let proxy = Proxy::plain(TestRouter::new(vec![b.addr])).await;
        let mut tx = h1(proxy.addr).await;
        for _ in 0..3 {
            let (status, headers, _) = send(&mut tx, get("/").body(empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
            assert!(!headers.contains_key(header::CONNECTION), "{headers:?}");
        }
        assert_eq!(b.conns(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_with_alpn_merges_cookies() {
    bounded(async {
        let certs = certs();
        let b = Backend::echo("h2b", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let proxy = Proxy::start(
            router.clone(),
            Some(certs.files.clone()),
            None,
            test_limits(),
        )
        .await;
        let tls = tls_connect(proxy.addr, &certs, &[b"h2", b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut pending = Vec::new();
        for i in 0..3 {
            let req = Request::get(format!("https://localhost:8443/h2/{i}"))
                .header(header::COOKIE, "a=1")
                .header(header::COOKIE, "b=2")
                .body(empty())
                .unwrap();
            pending.push(tx.send_request(req));
        }
        for (i, fut) in pending.into_iter().enumerate() {
            let resp = tokio::time::timeout(IO_TIMEOUT, fut)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.headers()["x-backend"], "h2b");
            let d = doc(&resp.into_body().collect().await.unwrap().to_bytes());
            assert_eq!(d["uri"], format!("/h2/{i}"));
            assert_eq!(d["version"], "HTTP/1.1");
            assert_eq!(seen(&d, "cookie"), ["a=1; b=2"]);
            assert_eq!(seen(&d, "host"), ["localhost:8443"]);
            assert_eq!(seen(&d, "x-forwarded-proto"), ["https"]);
            assert_eq!(seen(&d, "x-forwarded-host"), ["localhost:8443"]);
            assert_eq!(seen(&d, "x-forwarded-for"), ["127.0.0.1"]);
        }
        let calls = router.calls();
        assert_eq!(calls.len(), 3);
        assert!(calls.iter().all(|(c, _)| c.tls && c.alpn_h2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_http11_only_client() {
    bounded(async {
        let certs = certs();
        let b = Backend::echo("tls1", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let proxy = Proxy::start(
            router.clone(),
            Some(certs.files.clone()),
            None,
            test_limits(),
        )
        .await;
        let tls = tls_connect(proxy.addr, &certs, &[b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut tx = h1_over(tls).await;
        for _ in 0..2 {
            let (status, _, body) = send(&mut tx, get("/secure").body(empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
            let d = doc(&body);
            assert_eq!(seen(&d, "x-forwarded-proto"), ["https"]);
            assert_eq!(seen(&d, "host"), ["app.example"]);
        }
        // No ALPN at all: HTTP/1.1.
        let tls = tls_connect(proxy.addr, &certs, &[]).await;
        let mut tx = h1_over(tls).await;
        let (status, _, _) = send(&mut tx, get("/noalpn").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(router.calls().iter().all(|(c, _)| c.tls && !c.alpn_h2));
        // A cleartext request to the TLS port is a failed handshake, nothing more.
        let out = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(!out.contains("HTTP/1.1 200"), "{out}");
        eventually("handshake error counted", || {
            proxy.stats().handshake_errors >= 1
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_v2_set_the_client_and_garbage_closes() {
    bounded(async {
        let b = Backend::echo("pp", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let proxy = Proxy::start(router.clone(), None, Some(loopback()), test_limits()).await;
        let req = b"GET /pp HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n";

        // v1, header and request in one segment.
        let mut v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n".to_vec();
        v1.extend_from_slice(req);
        let out = raw(proxy.addr, &v1).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(
            seen(
                &doc(&Bytes::from(raw_body(&out).to_string())),
                "x-forwarded-for"
            ),
            ["203.0.113.7"]
        );
        let (conn, _) = router.calls().pop().unwrap();
        assert_eq!(
            conn.client,
            "203.0.113.7:56324".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(conn.local, "192.0.2.1:443".parse::<SocketAddr>().unwrap());

        // v2 over IPv6, header and request written separately.
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
        let src: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        v2.extend_from_slice(&src.octets());
        v2.extend_from_slice(&dst.octets());
        v2.extend_from_slice(&40000u16.to_be_bytes());
        v2.extend_from_slice(&80u16.to_be_bytes());
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(&v2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tcp.write_all(req).await.unwrap();
        let out = read_to_close(&mut tcp).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(
            seen(
                &doc(&Bytes::from(raw_body(&out).to_string())),
                "x-forwarded-for"
            ),
            ["2001:db8::7"]
        );
        let (conn, _) = router.calls().pop().unwrap();
        assert_eq!(
            conn.client,
            "[2001:db8::7]:40000".parse::<SocketAddr>().unwrap()
        );

        // No header: closed without an answer, and the router never hears of it.
        let calls = router.calls().len();
        let opened = router.opened.load(Ordering::SeqCst);
        let out = raw(proxy.addr, req).await;
        assert_eq!(out, "", "a request without a PROXY header is not answered");
        let out = raw(proxy.addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n").await;
        assert_eq!(out, "");
        assert_eq!(router.calls().len(), calls);
        assert_eq!(router.opened.load(Ordering::SeqCst), opened);
        assert_eq!(proxy.stats().handshake_errors, 2);
        assert_eq!(
            b.conns(),
            1,
            "the client's Connection: close is hop-by-hop: the backend connection is pooled"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_bytes_both_ways() {
    bounded(async {
        let b = Backend::echo("ws", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let proxy = Proxy::plain(router.clone()).await;
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(
            b"GET /chat HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let (head, rest) = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("upgrade: websocket"), "{head}");
        assert!(lower.contains("connection: upgrade"), "{head}");
        assert!(lower.contains("x-routed: 0/tag0"), "{head}");
        assert!(rest.is_empty());
        for msg in [&b"ping"[..], b"\x00\x01binary\xff", b"last"] {
            tcp.write_all(msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            tokio::time::timeout(IO_TIMEOUT, tcp.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, msg);
        }
        assert_eq!(proxy.stats().upgrades, 1);
        assert_eq!(router.closed.load(Ordering::SeqCst), 0, "tunnel still open");
        drop(tcp);
        eventually("tunnel closed", || {
            router.closed.load(Ordering::SeqCst) == 1
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnel_closes_when_idle() {
    bounded(async {
        let b = Backend::echo("ws", Behaviour::default()).await;
        let limits = Limits {
            idle_timeout: Duration::from_millis(300),
            ..test_limits()
        };
        let proxy = Proxy::start(TestRouter::new(vec![b.addr]), None, None, limits).await;
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // Closed by the proxy's idle timer (`bounded` fails the test if it never is).
        assert_eq!(read_to_close(&mut tcp).await, "");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_error_answers_with_its_status() {
    bounded(async {
        let router = Arc::new(TestRouter {
            fail: Some(StatusCode::SERVICE_UNAVAILABLE),
            ..TestRouter::default()
        });
        let proxy = Proxy::plain(router).await;
        let mut tx = h1(proxy.addr).await;
        let (status, headers, body) = send(&mut tx, get("/").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "503 Service Unavailable\n");
        assert_eq!(headers[header::CONNECTION], "close");
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(proxy.stats().responses, [0, 0, 0, 0, 1]);
        // No backend at all: the router's own 503.
        let proxy = Proxy::plain(TestRouter::new(vec![])).await;
        let out = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        // HTTP/1.1 without Host.
        let out = raw(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert_eq!(raw_body(&out), "400 Bad Request\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_once_on_another_backend() {
    bounded(async {
        let down = dead_addr().await;
        let good = Backend::echo("good", Behaviour::default()).await;
        let router = TestRouter::new(vec![down, good.addr]);
        let proxy = Proxy::plain(router.clone()).await;
        let mut tx = h1(proxy.addr).await;
        let (status, headers, _) = send(&mut tx, get("/").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-backend"], "good");
        let calls = router.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].1, Vec::<SocketAddr>::new());
        assert_eq!(calls[1].1, vec![down]);
        let s = proxy.stats();
        assert_eq!((s.retries, s.upstream_connect_errors), (1, 1));

        // Both down: one retry, then 502.
        let router = TestRouter::new(vec![down, dead_addr().await]);
        let proxy = Proxy::plain(router.clone()).await;
        let out = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
        assert_eq!(router.calls().len(), 2);
        let s = proxy.stats();
        assert_eq!((s.retries, s.upstream_connect_errors), (1, 2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_once_the_request_was_sent() {
    bounded(async {
        let reset = Backend::reset().await;
        let good = Backend::echo("good", Behaviour::default()).await;
        let router = TestRouter::new(vec![reset.addr, good.addr]);
        let proxy = Proxy::plain(router.clone()).await;
        let mut tx = h1(proxy.addr).await;
        let req = Request::post("/pay")
            .header(header::HOST, "x")
            .body(Full::new(Bytes::from_static(b"amount=1")))
            .unwrap();
        let (status, headers, body) = send(&mut tx, req).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body, "502 Bad Gateway\n");
        assert_eq!(headers[header::CONNECTION], "close");
        assert_eq!(reset.conns(), 1);
        assert_eq!(good.conns(), 0, "not retried");
        assert_eq!(router.calls().len(), 1);
        let s = proxy.stats();
        assert_eq!((s.retries, s.upstream_errors), (0, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pooled_connection_replays_only_safe_requests() {
    bounded(async {
        let b = Backend::one_shot().await;
        let router = TestRouter::new(vec![b.addr]);
        let proxy = Proxy::plain(router.clone()).await;
        let mut tx = h1(proxy.addr).await;
        for _ in 0..2 {
            let (status, _, body) = send(&mut tx, get("/").body(empty()).unwrap()).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        }
        assert_eq!(
            b.conns(),
            2,
            "the GET failed on the reused connection and was replayed"
        );
        let req = Request::post("/")
            .header(header::HOST, "x")
            .body(Full::new(Bytes::from_static(b"x=1")))
            .unwrap();
        let (status, _, _) = send(&mut tx, req).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "a POST is not replayed");
        assert_eq!(b.conns(), 2);
        assert_eq!(router.calls().len(), 3, "replays are not re-routed");
        let s = proxy.stats();
        assert_eq!((s.retries, s.upstream_errors), (0, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gets_504_within_the_timeout() {
    bounded(async {
        let slow = Backend::echo(
            "slow",
            Behaviour {
                delay: Duration::from_secs(10),
                ..Behaviour::default()
            },
        )
        .await;
        let limits = Limits {
            upstream_response_timeout: Duration::from_millis(300),
            ..test_limits()
        };
        let proxy = Proxy::start(TestRouter::new(vec![slow.addr]), None, None, limits).await;
        let mut tx = h1(proxy.addr).await;
        let start = Instant::now();
        let (status, _, body) = send(&mut tx, get("/").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body, "504 Gateway Timeout\n");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert_eq!(proxy.stats().upstream_timeouts, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let limits = Limits {
            max_header_bytes: 2048,
            ..test_limits()
        };
        let proxy = Proxy::start(TestRouter::new(vec![b.addr]), None, None, limits).await;
        let big = "v".repeat(4096);
        let out = raw(
            proxy.addr,
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        let out = raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Small: 1\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(b.conns(), 1);
        assert_eq!(proxy.stats().client_errors, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400_and_others_are_served() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let proxy = Proxy::plain(TestRouter::new(vec![b.addr])).await;
        for garbage in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        ] {
            let out = raw(proxy.addr, garbage).await;
            assert!(out.starts_with("HTTP/1.1 400"), "{garbage:?}: {out}");
        }
        let out = raw(
            proxy.addr,
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(proxy.stats().requests, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_closes_the_excess() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let limits = Limits {
            max_connections: 2,
            ..test_limits()
        };
        let proxy = Proxy::start(TestRouter::new(vec![b.addr]), None, None, limits).await;
        let mut first = h1(proxy.addr).await;
        let mut second = h1(proxy.addr).await;
        for tx in [&mut first, &mut second] {
            let (status, _, _) = send(tx, get("/").body(empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
        }
        let out = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(out, "", "third connection closed without an answer");
        assert_eq!(proxy.stats().connections_rejected, 1);
        drop(first);
        eventually("a slot freed", || proxy.stats().connections_active() == 1).await;
        let out = raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let (status, _, _) = send(&mut second, get("/").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_head_and_idle_connections_are_closed() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let limits = Limits {
            request_header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..test_limits()
        };
        let proxy = Proxy::start(TestRouter::new(vec![b.addr]), None, None, limits).await;

        // A head that never completes.
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let start = Instant::now();
        assert_eq!(read_to_close(&mut tcp).await, "");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );

        // Idle after a response: kept for the idle timeout, then closed.
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let start = Instant::now();
        let _ = read_to_close(&mut tcp).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(3),
            "{took:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    bounded(async {
        let slow = Backend::echo(
            "slow",
            Behaviour {
                delay: Duration::from_millis(500),
                ..Behaviour::default()
            },
        )
        .await;
        let router = TestRouter::new(vec![slow.addr]);
        let mut proxy = Proxy::plain(router.clone()).await;
        let mut idle = h1(proxy.addr).await;
        let (status, _, _) = send(&mut idle, get("/").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let mut busy = h1(proxy.addr).await;
        let in_flight =
            tokio::spawn(async move { send(&mut busy, get("/slow").body(empty()).unwrap()).await });
        eventually("request in flight", || router.calls().len() == 2).await;
        proxy.stop.send(true).unwrap();
        let (status, headers, _) = in_flight.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-backend"], "slow");
        assert_eq!(
            headers.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "the answer in flight closes its connection: {headers:?}"
        );
        let task = proxy.task.take().unwrap();
        let res = tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("serve returned in time");
        assert!(res.unwrap().is_ok());
        assert!(
            TcpStream::connect(proxy.addr).await.is_err(),
            "listener closed"
        );
        assert_eq!(
            router.opened.load(Ordering::SeqCst),
            router.closed.load(Ordering::SeqCst)
        );
        eventually("the idle connection closed", || idle.is_closed()).await;
    })
    .await;
}

/// A keep-alive client may send its next request just as the proxy starts draining: it must
/// get an answer (with `Connection: close`), not a reset, while the listening socket (shared
/// with the next server) keeps queueing new connections for whoever accepts next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_a_request_sent_on_an_idle_connection() {
    bounded(async {
        let b = Backend::echo("b1", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // What the next server would hold: a duplicate of the listening socket.
        let next = listener.into_std().unwrap();
        let served = tokio::net::TcpListener::from_std(next.try_clone().unwrap()).unwrap();
        let stats = Arc::new(ProxyStats::default());
        let (stop, rx) = watch::channel(false);
        let cfg = ProxyConfig {
            listen: addr,
            tls: None,
            proxy_protocol: None,
            trusted_forwarders: crate::cidr::Cidrs::default(),
            limits: test_limits(),
        };
        let task = tokio::spawn(serve_with_stats(served, cfg, router.clone(), rx, stats));
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tcp.write_all(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut tcp).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("serve returned in time")
            .unwrap()
            .unwrap();
        // The socket stayed open: a connection made now waits in its queue.
        let _queued = TcpStream::connect(addr).await.expect("queued, not refused");
        let (_conn, peer) = next.accept().expect("the next server accepts it");
        assert_eq!(peer.ip(), addr.ip());
    })
    .await;
}

/// HTTP/2 drains with a GOAWAY: the stream in flight is answered, then the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_h2_answers_streams_in_flight_then_goes_away() {
    bounded(async {
        let certs = certs();
        let slow = Backend::echo(
            "slow",
            Behaviour {
                delay: Duration::from_millis(500),
                ..Behaviour::default()
            },
        )
        .await;
        let router = TestRouter::new(vec![slow.addr]);
        let mut proxy = Proxy::start(
            router.clone(),
            Some(certs.files.clone()),
            None,
            test_limits(),
        )
        .await;
        let tls = tls_connect(proxy.addr, &certs, &[b"h2"]).await;
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get("https://localhost/slow")
            .body(empty())
            .unwrap();
        let in_flight = tx.send_request(req);
        let in_flight = tokio::spawn(in_flight);
        eventually("stream in flight", || router.calls().len() == 1).await;
        proxy.stop.send(true).unwrap();
        let resp = tokio::time::timeout(IO_TIMEOUT, in_flight)
            .await
            .expect("answer in time")
            .unwrap()
            .expect("the stream in flight is answered");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-backend"], "slow");
        resp.into_body().collect().await.unwrap();
        tokio::time::timeout(IO_TIMEOUT, conn)
            .await
            .expect("the connection ends after the GOAWAY")
            .unwrap()
            .expect("a graceful end");
        let task = proxy.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("serve returned in time")
            .unwrap()
            .unwrap();
    })
    .await;
}

/// An idle keep-alive connection is closed once draining has waited a moment for a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_idle_connections() {
    bounded(async {
        let b = Backend::echo("b1", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let mut proxy = Proxy::plain(router.clone()).await;
        let mut idle = h1(proxy.addr).await;
        let (status, _, _) = send(&mut idle, get("/").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        proxy.stop.send(true).unwrap();
        let task = proxy.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("serve returned in time")
            .unwrap()
            .unwrap();
        eventually("the idle connection closed", || idle.is_closed()).await;
        assert_eq!(
            router.opened.load(Ordering::SeqCst),
            router.closed.load(Ordering::SeqCst)
        );
    })
    .await;
}

/// A TLS configuration replaced while serving is what new connections see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_tls_configuration_serves_new_connections() {
    bounded(async {
        let b = Backend::echo("b1", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        let (first, second) = (certs(), certs());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = TlsHandle::load(&first.files).unwrap();
        let cfg = ProxyConfig {
            listen: addr,
            tls: Some(handle.clone()),
            proxy_protocol: None,
            trusted_forwarders: crate::cidr::Cidrs::default(),
            limits: test_limits(),
        };
        let (_stop, rx) = watch::channel(false);
        let _task = tokio::spawn(serve_with_stats(
            listener,
            cfg,
            router,
            rx,
            Arc::new(ProxyStats::default()),
        ));
        let tls = tls_connect(addr, &first, &[b"http/1.1"]).await;
        let seen = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(seen, first.der);
        handle.replace(load_tls(&second.files).unwrap());
        let tls = tls_connect(addr, &second, &[b"http/1.1"]).await;
        let seen = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(seen, second.der, "new connections get the new certificate");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_what_outlives_the_grace() {
    bounded(async {
        let slow = Backend::echo(
            "slow",
            Behaviour {
                delay: Duration::from_secs(10),
                ..Behaviour::default()
            },
        )
        .await;
        let limits = Limits {
            shutdown_grace: Duration::from_millis(300),
            upstream_response_timeout: Duration::from_secs(20),
            ..test_limits()
        };
        let router = TestRouter::new(vec![slow.addr]);
        let mut proxy = Proxy::start(router.clone(), None, None, limits).await;
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        eventually("request in flight", || router.calls().len() == 1).await;
        let start = Instant::now();
        proxy.stop.send(true).unwrap();
        let task = proxy.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("serve returned")
            .unwrap()
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(read_to_close(&mut tcp).await, "");
        assert_eq!(router.closed.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn load_tls_reports_bad_files() {
    let missing = TlsFiles {
        cert_pem: "/nonexistent/cert.pem".into(),
        key_pem: "/nonexistent/key.pem".into(),
    };
    let e = load_tls(&missing).expect_err("missing files load");
    assert_eq!(
        (e.part, e.path.as_path()),
        (TlsPart::Cert, missing.cert_pem.as_path())
    );
    let c = certs();
    let swapped = TlsFiles {
        cert_pem: c.files.key_pem.clone(),
        key_pem: c.files.cert_pem.clone(),
    };
    let e = load_tls(&swapped).expect_err("swapped files load");
    assert_eq!(e.part, TlsPart::Cert, "{e}");
    let no_key = TlsFiles {
        cert_pem: c.files.cert_pem.clone(),
        key_pem: c.files.cert_pem.clone(),
    };
    let e = load_tls(&no_key).expect_err("a certificate as key loads");
    assert_eq!(e.part, TlsPart::Key, "{e}");
    let config = load_tls(&c.files).unwrap();
    assert_eq!(
        config.alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

mod backend_h1;
mod security;
mod workers;
