//! Tiny HTTP/1.1 backends for the namespace topologies, and clients that connect to the VIP
//! from a chosen source address.
//!
//! Each backend answers every request with `200 OK` and its own name as the body, so a test
//! (or `curl`) sees which backend served it. Keep-alive works (for wrk); a client that sends
//! nothing gets the response after a short wait, so a raw read works too. Every loop is
//! bounded in count and time, and the servers stop when dropped.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::{Topology, spawn_in_netns};

/// How long a backend waits for a request head before answering anyway (raw-read clients).
const FIRST_REQUEST_WAIT: Duration = Duration::from_millis(300);
/// Idle time after which a keep-alive connection is closed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Hard limits per connection.
const MAX_CONN_LIFETIME: Duration = Duration::from_secs(120);
const MAX_REQUESTS_PER_CONN: u64 = 1_000_000;
const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once per backend; more are closed at once.
const MAX_ACTIVE_CONNS: usize = 1024;
/// Accept loop poll interval (the stop flag is checked this often).
const ACCEPT_POLL_MS: i32 = 50;

/// Counters of one backend server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    active: AtomicUsize,
}

struct Server {
    name: String,
    /// The backend namespace the server runs in.
    ns: String,
    stats: Arc<ServerStats>,
    /// This server's stop flag (each server can be stopped and started on its own).
    stop: Arc<AtomicBool>,
    /// `None` while stopped.
    thread: Option<JoinHandle<()>>,
}

/// One HTTP server per backend namespace of a [`Topology`], on `0.0.0.0:<port>`. Single
/// servers can be stopped (the port then refuses connections) and started again
/// ([`BackendServers::stop_backend`], [`BackendServers::start_backend`]); their counters carry
/// over.
pub struct BackendServers {
    pub port: u16,
    servers: Vec<Server>,
}

impl BackendServers {
    /// Starts a server in every backend namespace; backend `i` answers with
    /// `topo.backend_name(i)`. Returns once all are listening.
    pub fn start(topo: &Topology, port: u16) -> Result<BackendServers> {
        let mut me = BackendServers {
            port,
            servers: Vec::new(),
        };
        for (i, node) in topo.backends.iter().enumerate() {
            me.servers.push(Server {
                name: topo.backend_name(i),
                ns: node.ns.clone(),
                stats: Arc::new(ServerStats::default()),
                stop: Arc::new(AtomicBool::new(false)),
                thread: None,
            });
            me.launch(i)?;
        }
        Ok(me)
    }

    /// Starts server `i` (not running) and waits until it listens.
    fn launch(&mut self, i: usize) -> Result<()> {
        let port = self.port;
        let server = &mut self.servers[i];
        server.stop.store(false, Ordering::Relaxed);
        let name = server.name.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let (n, s, st) = (name.clone(), server.stats.clone(), server.stop.clone());
        let thread = spawn_in_netns(&server.ns, &format!("http-{name}"), move || {
            // std's bind sets SO_REUSEADDR: a restarted server gets its port back at once.
            let listener = match TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
            {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            accept_loop(listener, &n, &s, &st);
        })?;
        server.thread = Some(thread);
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("backend {name}: listening on port {port}: {e}"),
            Err(_) => bail!("backend {name}: server did not start"),
        }
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.servers
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no backend server named {name}"))
    }

    /// Stops the server of backend `name`: once this returns its port is closed (new
    /// connections are refused) and its connections are finished.
    pub fn stop_backend(&mut self, name: &str) -> Result<()> {
        let i = self.index_of(name)?;
        let server = &mut self.servers[i];
        let Some(t) = server.thread.take() else {
            bail!("backend server {name} is not running");
        };
        server.stop.store(true, Ordering::Relaxed);
        t.join()
            .map_err(|_| anyhow::anyhow!("backend server {name} panicked"))?;
        Ok(())
    }

    /// Starts the server of backend `name` again (after [`BackendServers::stop_backend`]);
    /// returns once it listens. Its counters carry over.
    pub fn start_backend(&mut self, name: &str) -> Result<()> {
        let i = self.index_of(name)?;
        if self.servers[i].thread.is_some() {
            bail!("backend server {name} is already running");
        }
        self.launch(i)
    }

    /// Whether the server of backend `name` runs.
    pub fn is_running(&self, name: &str) -> bool {
        self.servers
            .iter()
            .any(|s| s.name == name && s.thread.is_some())
    }

    /// `(backend name, connections accepted)` per backend.
    pub fn connections(&self) -> Vec<(String, u64)> {
        self.servers
            .iter()
            .map(|s| (s.name.clone(), s.stats.connections.load(Ordering::Relaxed)))
            .collect()
    }

    /// `(backend name, requests answered)` per backend.
    pub fn requests(&self) -> Vec<(String, u64)> {
        self.servers
            .iter()
            .map(|s| (s.name.clone(), s.stats.requests.load(Ordering::Relaxed)))
            .collect()
    }

    /// Stops every server and waits for its threads (also done on drop).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for s in &self.servers {
            s.stop.store(true, Ordering::Relaxed);
        }
        for s in &mut self.servers {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for BackendServers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    stats: &Arc<ServerStats>,
    stop: &Arc<AtomicBool>,
) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let body = Arc::new(format!("{name}\n"));
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) };
        if n <= 0 {
            continue;
        }
        // Accept everything that is queued (bounded by the backlog).
        for _ in 0..1024 {
            match listener.accept() {
                Ok((conn, _)) => {
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    if stats.active.load(Ordering::Relaxed) >= MAX_ACTIVE_CONNS {
                        continue; // dropped: closed at once
                    }
                    stats.active.fetch_add(1, Ordering::Relaxed);
                    let (b, s, st) = (body.clone(), stats.clone(), stop.clone());
                    match std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            serve_conn(conn, &b, &s, &st);
                            s.active.fetch_sub(1, Ordering::Relaxed);
                        }) {
                        Ok(h) => workers.push(h),
                        Err(_) => {
                            stats.active.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        workers.retain(|h| !h.is_finished());
    }
    // Close the port first (new connections are refused from here on), then let the
    // connections in progress finish.
    drop(listener);
    for h in workers {
        let _ = h.join();
    }
}

fn response(body: &str, keep_alive: bool) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Whether the client asked to keep the connection open after this request.
fn wants_keep_alive(head: &[u8]) -> bool {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut lines = head.split("\r\n");
    let http11 = lines.next().is_some_and(|l| l.ends_with("http/1.1"));
    let mut keep = http11;
    for l in lines {
        if let Some(v) = l.strip_prefix("connection:") {
            let v = v.trim();
            if v.contains("close") {
                keep = false;
            } else if v.contains("keep-alive") {
                keep = true;
            }
        }
    }
    keep
}

fn serve_conn(mut s: TcpStream, body: &str, stats: &ServerStats, stop: &AtomicBool) {
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let started = Instant::now();
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut served = 0u64;
    'conn: while served < MAX_REQUESTS_PER_CONN {
        let wait = if served == 0 {
            FIRST_REQUEST_WAIT
        } else {
            KEEPALIVE_IDLE
        };
        let _ = s.set_read_timeout(Some(wait));
        // Read one request head.
        let head_end = loop {
            if let Some(end) = find_head_end(&buf) {
                break Some(end);
            }
            if buf.len() > MAX_HEAD {
                break 'conn;
            }
            match s.read(&mut chunk) {
                Ok(0) => break 'conn,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break None;
                }
                Err(_) => break 'conn,
            }
        };
        let keep_alive = match head_end {
            Some(end) => {
                let keep = wants_keep_alive(&buf[..end]);
                buf.drain(..end);
                keep
            }
            // Nothing (complete) within the first wait: a raw reader; answer and close.
            None if served == 0 => false,
            None => break,
        };
        let keep_alive = keep_alive
            && !stop.load(Ordering::Relaxed)
            && started.elapsed() < MAX_CONN_LIFETIME
            && served + 1 < MAX_REQUESTS_PER_CONN;
        if s.write_all(response(body, keep_alive).as_bytes()).is_err() {
            return;
        }
        served += 1;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if !keep_alive {
            break;
        }
    }
    // Close politely: send FIN, then read what the client still sends until its FIN (so the
    // close does not turn into a reset that could eat the response), bounded in bytes and time.
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut drained = 0usize;
    while Instant::now() < deadline && drained < 1 << 20 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Opens a TCP connection from `src` (port chosen by the kernel) to `dst` in the calling
/// thread's network namespace, with a connect timeout; reads and writes time out after
/// `timeout` too.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    sock.connect_timeout(&SocketAddr::V4(dst).into(), timeout)?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One `GET /` with `Connection: close` from `src` to `dst`; returns the body, trimmed (the
/// name of the backend that answered). Fails unless the status is 200.
pub fn http_get_from(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    let mut s = connect_from(src, dst, timeout)?;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        dst.ip()
    );
    s.write_all(req.as_bytes())?;
    let deadline = Instant::now() + timeout;
    let mut resp = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        if Instant::now() > deadline || resp.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response did not end in time",
            ));
        }
        match s.read(&mut chunk)? {
            0 => break,
            n => resp.extend_from_slice(&chunk[..n]),
        }
    }
    parse_response(&resp)
}

fn parse_response(resp: &[u8]) -> io::Result<String> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: {:?}",
                String::from_utf8_lossy(&resp[..resp.len().min(200)])
            ),
        )
    };
    let end = find_head_end(resp).ok_or_else(|| bad("no complete response head"))?;
    let head = String::from_utf8_lossy(&resp[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !head.starts_with("HTTP/1.") || status != "200" {
        return Err(bad("not a 200 response"));
    }
    Ok(String::from_utf8_lossy(&resp[end..]).trim().to_string())
}

/// Result of one fetch in a batch.
#[derive(Debug)]
pub struct Fetch {
    pub src: Ipv4Addr,
    /// The backend name, or the error (as text).
    pub result: Result<String, String>,
}

impl Topology {
    /// A TCP connection from client address `src` to VIP:`port` (opened in the client
    /// namespace; usable from any thread).
    pub fn connect_vip(&self, src: Ipv4Addr, port: u16, timeout: Duration) -> Result<TcpStream> {
        let dst = self.vip_addr(port);
        self.in_client(move || connect_from(src, dst, timeout))?
            .with_context(|| format!("connecting {src} -> {dst}"))
    }

    /// One `GET http://VIP:port/` from client address `src`; returns the backend name.
    pub fn fetch(&self, src: Ipv4Addr, port: u16, timeout: Duration) -> Result<String> {
        let dst = self.vip_addr(port);
        self.in_client(move || http_get_from(src, dst, timeout))?
            .with_context(|| format!("GET http://{dst}/ from {src}"))
    }

    /// One `GET http://VIP:port/` per entry of `sources`, in order, from one thread in the
    /// client namespace. Failures are recorded, not fatal.
    pub fn fetch_all(
        &self,
        sources: &[Ipv4Addr],
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<Fetch>> {
        let dst = self.vip_addr(port);
        self.in_client(move || {
            sources
                .iter()
                .map(|&src| Fetch {
                    src,
                    result: http_get_from(src, dst, timeout).map_err(|e| e.to_string()),
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_rules() {
        assert!(wants_keep_alive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!wants_keep_alive(
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"
        ));
        assert!(!wants_keep_alive(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(wants_keep_alive(
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        ));
    }

    #[test]
    fn parses_responses() {
        assert_eq!(
            parse_response(response("b2\n", false).as_bytes()).unwrap(),
            "b2"
        );
        assert!(parse_response(b"HTTP/1.1 503 Busy\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    /// Server and client on loopback in the test's own namespace.
    #[test]
    fn serves_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = match listener.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let stats = Arc::new(ServerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (stats.clone(), stop.clone());
        let t = std::thread::spawn(move || accept_loop(listener, "b7", &s2, &st2));
        for _ in 0..3 {
            let body = http_get_from(Ipv4Addr::LOCALHOST, addr, Duration::from_secs(2)).unwrap();
            assert_eq!(body, "b7");
        }
        // Raw read: send nothing, get the response after the first-request wait.
        let mut c = connect_from(Ipv4Addr::LOCALHOST, addr, Duration::from_secs(2)).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK") && out.ends_with("b7\n"),
            "{out:?}"
        );
        // Keep-alive: two requests on one connection.
        let mut c = connect_from(Ipv4Addr::LOCALHOST, addr, Duration::from_secs(2)).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert_eq!(out.matches("200 OK").count(), 2, "{out:?}");
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert_eq!(stats.connections.load(Ordering::Relaxed), 5);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 6);
    }
}
