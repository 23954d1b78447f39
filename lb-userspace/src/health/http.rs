//! HTTP(S) check: `GET <path>` over HTTP/1.1, healthy when the status line's code matches one
//! of the expected codes or classes. Only the status line is read (bounded in bytes and time);
//! headers and body are ignored.
//!
//! HTTPS does not verify the backend's certificate: backends commonly serve internal or
//! self-signed certificates, and this is a liveness probe, not a trust decision (HAProxy's
//! `check-ssl verify none`). Handshake signatures are still checked against the presented key.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::{CheckFuture, Deadline, HealthCheck, snippet};
use crate::config::StatusMatch;

/// Bytes read while looking for the end of the status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

pub(super) struct HttpCheck {
    timeout: Duration,
    path: String,
    host: Option<String>,
    expect: Vec<StatusMatch>,
    tls: Option<Tls>,
}

struct Tls {
    /// Err when the TLS stack could not be set up: every probe then fails with the reason.
    config: Result<Arc<ClientConfig>, String>,
    /// From the configured host when it names one; otherwise the target's IP (no SNI sent).
    server_name: Option<ServerName<'static>>,
}

impl HttpCheck {
    pub(super) fn new(
        timeout: Duration,
        tls: bool,
        path: &str,
        host: Option<&str>,
        expect: &[StatusMatch],
    ) -> HttpCheck {
        let tls = tls.then(|| Tls {
            config: client_config(),
            server_name: host.and_then(|h| ServerName::try_from(strip_port(h).to_string()).ok()),
        });
        HttpCheck {
            timeout,
            path: path.to_string(),
            host: host.map(str::to_string),
            expect: expect.to_vec(),
            tls,
        }
    }

    fn request(&self, target: SocketAddr) -> Vec<u8> {
        let host = match &self.host {
            Some(h) => h.clone(),
            // SocketAddr prints IPv6 in brackets, as the Host header requires.
            None => target.to_string(),
        };
        format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tether-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path
        )
        .into_bytes()
    }

    async fn probe(&self, target: SocketAddr) -> Result<(), String> {
        let deadline = Deadline::after(self.timeout);
        let tcp = deadline.run("connect", TcpStream::connect(target)).await?;
        // Small request, sent at once.
        let _ = tcp.set_nodelay(true);
        let request = self.request(target);
        let line = match &self.tls {
            None => exchange(&deadline, tcp, &request).await?,
            Some(tls) => {
                let config = tls.config.clone()?;
                let name = tls
                    .server_name
                    .clone()
                    .unwrap_or_else(|| ServerName::IpAddress(target.ip().into()));
                let stream = deadline
                    .run(
                        "tls handshake",
                        TlsConnector::from(config).connect(name, tcp),
                    )
                    .await?;
                exchange(&deadline, stream, &request).await?
            }
        };
        let status = parse_status_line(&line)?;
        if self.expect.iter().any(|m| m.matches(status)) {
            return Ok(());
        }
        let expected: Vec<String> = self.expect.iter().map(|&m| show_match(m)).collect();
        Err(format!("status {status} not in [{}]", expected.join(", ")))
    }
}

impl HealthCheck for HttpCheck {
    fn check<'a>(&'a self, target: SocketAddr) -> CheckFuture<'a> {
        Box::pin(self.probe(target))
    }
}

/// Send the request and return the status line (without its line ending).
async fn exchange<S>(deadline: &Deadline, mut stream: S, request: &[u8]) -> Result<Vec<u8>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    deadline
        .run("send request", async {
            stream.write_all(request).await?;
            // TLS buffers records until flushed.
            stream.flush().await
        })
        .await?;
    let line = read_status_line(deadline, &mut stream).await?;
    // Best effort close (a TLS close_notify); the verdict is already known.
    let _ = tokio::time::timeout_at(deadline.at(), stream.shutdown()).await;
    Ok(line)
}

async fn read_status_line<S>(deadline: &Deadline, stream: &mut S) -> Result<Vec<u8>, String>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let want = chunk.len().min(MAX_STATUS_LINE - buf.len());
        if want == 0 {
            return Err(format!(
                "no status line in the first {MAX_STATUS_LINE} bytes"
            ));
        }
        let n = deadline
            .run("read status line", stream.read(&mut chunk[..want]))
            .await?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "connection closed without a response".to_string()
            } else {
                format!(
                    "connection closed inside the status line \"{}\"",
                    snippet(&buf, 64)
                )
            });
        }
        let searched = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf[searched..].iter().position(|&b| b == b'\n') {
            buf.truncate(searched + end);
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(buf);
        }
    }
}

/// `HTTP/<major>[.<minor>] <3 digits>[ <reason>]` -> the status code.
pub(super) fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let malformed = || format!("malformed status line \"{}\"", snippet(line, 64));
    let rest = line.strip_prefix(b"HTTP/").ok_or_else(malformed)?;
    let (version, rest) = rest
        .iter()
        .position(|&b| b == b' ')
        .map(|sp| (&rest[..sp], &rest[sp + 1..]))
        .ok_or_else(malformed)?;
    let version_ok = match version {
        [major] => major.is_ascii_digit(),
        [major, b'.', minor] => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    };
    let code = rest.get(..3).ok_or_else(malformed)?;
    if !version_ok
        || !code.iter().all(u8::is_ascii_digit)
        || rest.get(3).is_some_and(|&b| b != b' ')
    {
        return Err(malformed());
    }
    Ok(code
        .iter()
        .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0')))
}

fn show_match(m: StatusMatch) -> String {
    match m {
        StatusMatch::Code(c) => c.to_string(),
        StatusMatch::Class(c) => format!("{c}xx"),
    }
}

/// The host part of a Host value: "example.com:8443" -> "example.com", "[::1]:443" -> "::1".
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.split_once(':') {
        // Exactly one colon: name:port. More would be a bare IPv6 literal.
        Some((name, port)) if !port.contains(':') => name,
        _ => host,
    }
}

fn client_config() -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts any server certificate (see the module comment for why) but still verifies the
/// handshake signatures, so the peer holds the key of the certificate it presented.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::Arc,
        time::{Duration, Instant},
    };

    use rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    };
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
        task::JoinHandle,
    };
    use tokio_rustls::TlsAcceptor;

    use super::{HttpCheck, parse_status_line, strip_port};
    use crate::{
        config::StatusMatch,
        health::{HealthCheck, test_support::closed_port},
    };

    const OK_CLASSES: [StatusMatch; 2] = [StatusMatch::Class(2), StatusMatch::Class(3)];

    fn check(timeout_ms: u64, host: Option<&str>, expect: &[StatusMatch]) -> HttpCheck {
        HttpCheck::new(
            Duration::from_millis(timeout_ms),
            false,
            "/health",
            host,
            expect,
        )
    }

    /// Read a request head (bounded), reply with `response`, report the request.
    async fn serve_one<S>(
        mut conn: S,
        response: &'static [u8],
        requests: &mpsc::UnboundedSender<String>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = requests.send(String::from_utf8_lossy(&head).into_owned());
        if !response.is_empty() {
            let _ = conn.write_all(response).await;
        }
        let _ = conn.shutdown().await;
    }

    /// A loopback HTTP server answering every connection with `response`.
    async fn server(
        response: &'static [u8],
    ) -> (SocketAddr, mpsc::UnboundedReceiver<String>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move { serve_one(conn, response, &tx).await });
            }
        });
        (addr, rx, task)
    }

    #[tokio::test]
    async fn ok_status_passes_and_request_is_well_formed() {
        let (addr, mut requests, task) =
            server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let result = check(500, None, &OK_CLASSES).check(addr).await;
        task.abort();
        assert_eq!(result, Ok(()), "200 must pass");
        let req = requests.try_recv().expect("server saw the request");
        assert!(
            req.starts_with("GET /health HTTP/1.1\r\n"),
            "request line: {req:?}"
        );
        assert!(
            req.contains(&format!("\r\nHost: {addr}\r\n")),
            "default Host: {req:?}"
        );
        assert!(
            req.contains("\r\nConnection: close\r\n"),
            "Connection: {req:?}"
        );
        assert!(
            req.contains("\r\nUser-Agent: tether-health\r\n"),
            "User-Agent: {req:?}"
        );
    }

    #[tokio::test]
    async fn configured_host_is_sent() {
        let (addr, mut requests, task) = server(b"HTTP/1.0 204 No Content\r\n\r\n").await;
        let result = check(500, Some("app.internal"), &OK_CLASSES)
            .check(addr)
            .await;
        task.abort();
        assert_eq!(result, Ok(()), "204 over HTTP/1.0 must pass");
        let req = requests.try_recv().expect("server saw the request");
        assert!(req.contains("\r\nHost: app.internal\r\n"), "Host: {req:?}");
    }

    #[tokio::test]
    async fn server_error_fails_with_status() {
        let (addr, _, task) = server(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        let result = check(500, None, &OK_CLASSES).check(addr).await;
        task.abort();
        assert_eq!(
            result,
            Err("status 500 not in [2xx, 3xx]".to_string()),
            "500 must fail naming the status"
        );
    }

    #[tokio::test]
    async fn redirect_matches_class_list_but_not_exact_code() {
        let (addr, _, task) = server(b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n").await;
        let classes = check(500, None, &OK_CLASSES).check(addr).await;
        let exact = check(500, None, &[StatusMatch::Code(200)])
            .check(addr)
            .await;
        task.abort();
        assert_eq!(classes, Ok(()), "302 is in [2xx, 3xx]");
        assert_eq!(
            exact,
            Err("status 302 not in [200]".to_string()),
            "302 is not 200"
        );
    }

    #[tokio::test]
    async fn garbage_response_fails() {
        let (addr, _, task) = server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        let result = check(500, None, &OK_CLASSES).check(addr).await;
        task.abort();
        let err = result.expect_err("garbage must fail");
        assert_eq!(
            err, "malformed status line \"SSH-2.0-OpenSSH_9.6\"",
            "detail quotes the line"
        );
    }

    #[tokio::test]
    async fn empty_response_fails() {
        let (addr, _, task) = server(b"").await;
        let result = check(500, None, &OK_CLASSES).check(addr).await;
        task.abort();
        assert_eq!(
            result,
            Err("connection closed without a response".to_string()),
            "closed without answering"
        );
    }

    #[tokio::test]
    async fn endless_status_line_is_bounded() {
        static HUGE: [u8; 20_000] = [b'A'; 20_000];
        let (addr, _, task) = server(&HUGE).await;
        let result = check(2000, None, &OK_CLASSES).check(addr).await;
        task.abort();
        assert_eq!(
            result,
            Err("no status line in the first 8192 bytes".to_string()),
            "read is capped"
        );
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        // Accept and hold connections without answering.
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let started = Instant::now();
        let result = check(200, None, &OK_CLASSES).check(addr).await;
        let took = started.elapsed();
        task.abort();
        assert_eq!(
            result,
            Err("read status line: timeout after 200 ms".to_string()),
            "silent server"
        );
        // A lower bound only: the check waited for its timeout (an upper bound would
        // measure the machine's load).
        assert!(
            took >= Duration::from_millis(190),
            "took {took:?}, expected at least the 200 ms timeout"
        );
    }

    #[tokio::test]
    async fn refused_connection_fails() {
        let addr = format!("127.0.0.1:{}", closed_port().await)
            .parse()
            .expect("addr");
        let result = check(500, None, &OK_CLASSES).check(addr).await;
        assert_eq!(
            result,
            Err("connect: connection refused".to_string()),
            "no listener"
        );
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 OK"),
            Ok(200),
            "with reason"
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 404"),
            Ok(404),
            "without reason"
        );
        assert_eq!(parse_status_line(b"HTTP/2 503 x"), Ok(503), "major only");
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000",
            b"HTTP/1.1 abc OK",
            b"HTTP/x.y 200 OK",
            b"HTTP/1.1  200 OK",
            b"http/1.1 200 OK",
            b"\x00\xff",
        ] {
            let err = parse_status_line(bad).expect_err("must be rejected");
            assert!(err.starts_with("malformed status line"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn host_port_is_stripped_for_sni() {
        assert_eq!(strip_port("example.com"), "example.com", "plain name");
        assert_eq!(strip_port("example.com:8443"), "example.com", "name:port");
        assert_eq!(strip_port("[::1]:443"), "::1", "bracketed IPv6 with port");
        assert_eq!(strip_port("::1"), "::1", "bare IPv6");
    }

    struct TlsServer {
        addr: SocketAddr,
        /// SNI the server saw per connection (None: no SNI).
        sni: mpsc::UnboundedReceiver<Option<String>>,
        task: JoinHandle<()>,
    }

    /// A loopback HTTPS server with a fresh self-signed certificate for "localhost".
    async fn tls_server(response: &'static [u8]) -> TlsServer {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("generate a self-signed certificate");
        let chain = vec![CertificateDer::from(cert.cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server certificate and key");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        let (sni_tx, sni) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let sni_tx = sni_tx.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(conn).await else {
                        return;
                    };
                    let _ = sni_tx.send(tls.get_ref().1.server_name().map(str::to_string));
                    let (requests, _) = mpsc::unbounded_channel();
                    serve_one(tls, response, &requests).await;
                });
            }
        });
        TlsServer { addr, sni, task }
    }

    fn https(host: Option<&str>) -> HttpCheck {
        HttpCheck::new(Duration::from_millis(2000), true, "/", host, &OK_CLASSES)
    }

    #[tokio::test]
    async fn https_self_signed_passes_with_sni() {
        let mut srv = tls_server(b"HTTP/1.1 200 OK\r\n\r\n").await;
        let result = https(Some("localhost:8443")).check(srv.addr).await;
        srv.task.abort();
        assert_eq!(result, Ok(()), "self-signed cert is accepted");
        assert_eq!(
            srv.sni.try_recv().expect("handshake completed"),
            Some("localhost".to_string()),
            "SNI is the configured host without its port"
        );
    }

    #[tokio::test]
    async fn https_without_host_sends_no_sni() {
        let mut srv = tls_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let result = https(None).check(srv.addr).await;
        srv.task.abort();
        assert_eq!(
            result,
            Err("status 503 not in [2xx, 3xx]".to_string()),
            "status read over TLS"
        );
        assert_eq!(
            srv.sni.try_recv().expect("handshake completed"),
            None,
            "no SNI for an IP target"
        );
    }

    #[tokio::test]
    async fn https_against_plain_http_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        // A plain HTTP server that answers before reading anything.
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let result = https(None).check(addr).await;
        task.abort();
        let err = result.expect_err("plain HTTP is not TLS");
        assert!(err.starts_with("tls handshake: "), "detail: {err}");
        assert!(
            !err.contains("timeout"),
            "fails on the bad record, not by timeout: {err}"
        );
    }
}
