//! Backends: minimal keep-alive HTTP/1.1 servers (GET without body, Content-Length bodies;
//! any other framing closes the connection), pipelining-safe, each answering 200 with its
//! name; and blocking probe requests.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::COOKIE;

/// Timeout of the probe requests (cookie capture, sanity checks).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Backends {
    pub rt: Option<tokio::runtime::Runtime>,
    pub addrs: Vec<SocketAddrV4>,
    pub requests: Vec<Arc<AtomicU64>>,
}

impl Backends {
    pub fn start(ips: &[Ipv4Addr]) -> Backends {
        // As many workers as cores: on this 2-core machine the backends must not be the limit.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("bench-backend")
            .enable_io()
            .enable_time()
            .build()
            .expect("backend runtime");
        let mut addrs = Vec::new();
        let mut requests = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let l = TcpListener::bind((*ip, 0)).expect("backend listener");
            l.set_nonblocking(true).expect("nonblocking");
            let SocketAddr::V4(addr) = l.local_addr().expect("local addr") else {
                unreachable!("bound to IPv4")
            };
            let count = Arc::new(AtomicU64::new(0));
            let body = format!("b{}\n", i + 1);
            let resp: Arc<[u8]> = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
            .into();
            let c = count.clone();
            rt.spawn(async move {
                let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                // Runs until the runtime is shut down (when `Backends` drops).
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            tokio::spawn(serve(s, resp.clone(), c.clone()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
            addrs.push(addr);
            requests.push(count);
        }
        Backends {
            rt: Some(rt),
            addrs,
            requests,
        }
    }

    pub fn counts(&self) -> Vec<u64> {
        self.requests
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// `(content length, close after this one)` of a request head; `None`: framing we don't serve.
pub fn request_framing(head: &[u8]) -> Option<(usize, bool)> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut close = lines.next()?.ends_with("HTTP/1.0");
    let mut len = 0usize;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse().ok()?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        } else if k.eq_ignore_ascii_case("connection") {
            let v = v.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    Some((len, close))
}

pub async fn serve(mut s: tokio::net::TcpStream, resp: Arc<[u8]>, count: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0usize;
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    // Ends when the peer closes, on an error, a request we don't serve, or runtime shutdown.
    loop {
        match s.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        let mut pos = 0;
        let mut close = false;
        while let Some(end) = buf[pos..len].windows(4).position(|w| w == b"\r\n\r\n") {
            let head_end = pos + end + 4;
            let Some((body, c)) = request_framing(&buf[pos..head_end]) else {
                return;
            };
            if head_end + body > len {
                break; // the body is still coming
            }
            pos = head_end + body;
            out.extend_from_slice(&resp);
            count.fetch_add(1, Ordering::Relaxed);
            if c {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            let _ = s.shutdown().await;
            return;
        }
        buf.copy_within(pos..len, 0);
        len -= pos;
        if len == buf.len() {
            return; // a head or body larger than the buffer
        }
    }
}

// Probe requests (blocking, one per connection).

pub struct Probe {
    pub status: u16,
    pub set_cookie: Option<String>,
    pub body: String,
}

/// One `GET /` with `Connection: close`, optionally with a cookie.
pub fn probe(addr: SocketAddrV4, cookie: Option<&str>) -> Result<Probe, String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), PROBE_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(PROBE_TIMEOUT)).ok();
    s.set_write_timeout(Some(PROBE_TIMEOUT)).ok();
    let mut req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut resp = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut resp)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: incomplete response {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: bad status line in {head:?}"))?;
    let set_cookie = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        let v = v.trim();
        (k.trim().eq_ignore_ascii_case("set-cookie") && v.starts_with(&format!("{COOKIE}=")))
            .then(|| v.to_string())
    });
    Ok(Probe {
        status,
        set_cookie,
        body: body.trim().to_string(),
    })
}

/// Sends one request without a cookie; returns the `SRV=value` pair the proxy set (for the hit
/// path) and the backend that answered. Checks that a request with that cookie gets no new
/// Set-Cookie and lands on the same backend (notes what differs).
pub fn capture_cookie(
    addr: SocketAddrV4,
    who: &str,
    notes: &mut Vec<String>,
) -> Result<String, String> {
    let p = probe(addr, None)?;
    if p.status != 200 {
        return Err(format!("{who}: status {} without a cookie", p.status));
    }
    let sc = p
        .set_cookie
        .ok_or_else(|| format!("{who}: no Set-Cookie {COOKIE}=… on a request without cookie"))?;
    let pair = sc
        .split(';')
        .next()
        .expect("split has a first")
        .trim()
        .to_string();
    let again = probe(addr, Some(&pair))?;
    if again.status != 200 {
        return Err(format!(
            "{who}: status {} with its own cookie",
            again.status
        ));
    }
    if again.body != p.body {
        notes.push(format!(
            "{who}: the cookie for {} sent {} (not persistent?)",
            p.body, again.body
        ));
    }
    if let Some(sc2) = again.set_cookie {
        notes.push(format!(
            "{who}: a request with a valid cookie still got a Set-Cookie ({sc2})"
        ));
    }
    notes.push(format!("{who}: hit-path cookie pins {}: `{sc}`", p.body));
    Ok(pair)
}
