//! Tiny HTTP/1.1 backends for the namespace topologies, and clients that connect to the VIP
//! from a chosen source address.
//!
//! Each backend answers every request with `200 OK` and its own name as the body, so a test
//! (or `curl`) sees which backend served it. Keep-alive works (for wrk); a client that sends
//! nothing gets the response after a short wait, so a raw read works too. Every loop is
//! bounded in count and time, and the servers stop when dropped.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
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
/// Idle keep-alive connections check the stop flag this often.
const IDLE_SLICE: Duration = Duration::from_millis(100);

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
    reply: Reply,
    servers: Vec<Server>,
}

/// How a backend server answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reply {
    /// `200 OK` with the backend's name as the body.
    #[default]
    Name,
    /// `200 OK` with the backend's name and what the request carried (see [`Echo`]); a
    /// request for `/login` (also with a query or `;` parameters) gets a new
    /// `Set-Cookie: JSESSIONID=<name>-<n>` (unique in this process) and `theme=dark`.
    Echo,
}

impl BackendServers {
    /// Starts a server in every backend namespace; backend `i` answers with
    /// `topo.backend_name(i)`. Returns once all are listening.
    pub fn start(topo: &Topology, port: u16) -> Result<BackendServers> {
        Self::start_with(topo, port, Reply::Name)
    }

    /// Like [`BackendServers::start`], answering as `reply` says.
    pub fn start_with(topo: &Topology, port: u16, reply: Reply) -> Result<BackendServers> {
        let mut me = BackendServers {
            port,
            reply,
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
        let (port, reply) = (self.port, self.reply);
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
            accept_loop(listener, &n, reply, &s, &st);
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
    reply: Reply,
    stats: &Arc<ServerStats>,
    stop: &Arc<AtomicBool>,
) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let name = Arc::new(name.to_string());
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
                    let (n, s, st) = (name.clone(), stats.clone(), stop.clone());
                    match std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            serve_conn(conn, &n, reply, &s, &st);
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

/// Sequence of the `JSESSIONID` values echo servers hand out.
static SESSION_SEQ: AtomicU64 = AtomicU64::new(1);

/// The [`Reply::Echo`] answer to request head `head`.
fn echo_response(name: &str, head: &[u8], keep_alive: bool) -> String {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let (mut cookies, mut xff, mut proto) = (Vec::new(), Vec::new(), Vec::new());
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "cookie" => cookies.push(v),
            "x-forwarded-for" => xff.push(v),
            "x-forwarded-proto" => proto.push(v),
            _ => {}
        }
    }
    let field = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(" | ")
        }
    };
    let body = format!(
        "{name}\ntarget: {target}\ncookie: {}\nx-forwarded-for: {}\nx-forwarded-proto: {}\n",
        field(&cookies),
        field(&xff),
        field(&proto)
    );
    let path = target.split(['?', ';']).next().unwrap_or("");
    let set_cookie = if path == "/login" {
        let n = SESSION_SEQ.fetch_add(1, Ordering::Relaxed);
        format!(
            "Set-Cookie: theme=dark; Path=/\r\nSet-Cookie: JSESSIONID={name}-{n}; Path=/; HttpOnly\r\n"
        )
    } else {
        String::new()
    };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{set_cookie}Content-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
}

/// What a [`Reply::Echo`] backend saw, parsed from its answer's body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Echo {
    /// The backend's name.
    pub backend: String,
    /// The request target as received.
    pub target: String,
    /// The `Cookie` fields received (several joined with `" | "`), `None` without any.
    pub cookie: Option<String>,
    pub x_forwarded_for: Option<String>,
    pub x_forwarded_proto: Option<String>,
}

impl Echo {
    /// Parses an echo body; `None` if `body` is not one.
    pub fn parse(body: &str) -> Option<Echo> {
        let mut lines = body.lines();
        let backend = lines.next()?.trim().to_string();
        let mut e = Echo {
            backend,
            ..Echo::default()
        };
        let opt = |v: &str| (v != "-").then(|| v.to_string());
        for l in lines {
            let (k, v) = l.split_once(": ")?;
            match k {
                "target" => e.target = v.to_string(),
                "cookie" => e.cookie = opt(v),
                "x-forwarded-for" => e.x_forwarded_for = opt(v),
                "x-forwarded-proto" => e.x_forwarded_proto = opt(v),
                _ => {}
            }
        }
        (!e.backend.is_empty() && !e.target.is_empty()).then_some(e)
    }
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

fn serve_conn(mut s: TcpStream, name: &str, reply: Reply, stats: &ServerStats, stop: &AtomicBool) {
    let body = format!("{name}\n");
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
        // Waits in slices, so an idle keep-alive connection closes soon after a stop.
        let waiting = Instant::now();
        let _ = s.set_read_timeout(Some(IDLE_SLICE.min(wait)));
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
                    if served > 0 && buf.is_empty() && stop.load(Ordering::Relaxed) {
                        break 'conn;
                    }
                    if waiting.elapsed() >= wait {
                        break None;
                    }
                }
                Err(_) => break 'conn,
            }
        };
        let (keep_alive, head) = match head_end {
            Some(end) => {
                let keep = wants_keep_alive(&buf[..end]);
                (keep, buf.drain(..end).collect::<Vec<u8>>())
            }
            // Nothing (complete) within the first wait: a raw reader; answer and close.
            None if served == 0 => (false, Vec::new()),
            None => break,
        };
        let keep_alive = keep_alive
            && !stop.load(Ordering::Relaxed)
            && started.elapsed() < MAX_CONN_LIFETIME
            && served + 1 < MAX_REQUESTS_PER_CONN;
        let out = match reply {
            Reply::Name => response(&body, keep_alive),
            Reply::Echo => echo_response(name, &head, keep_alive),
        };
        if s.write_all(out.as_bytes()).is_err() {
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

/// A response read by [`request_from`].
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first field named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every field named `name` (lowercase), in order.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the `Set-Cookie` for cookie `cookie` (up to the first `;`), if any.
    pub fn set_cookie_value(&self, cookie: &str) -> Option<String> {
        self.set_cookie(cookie).map(|sc| {
            let pair = sc.split(';').next().unwrap_or("");
            pair.split_once('=')
                .map_or("", |(_, v)| v)
                .trim()
                .to_string()
        })
    }

    /// The whole `Set-Cookie` field for cookie `cookie`, if any.
    pub fn set_cookie(&self, cookie: &str) -> Option<&str> {
        self.headers_named("set-cookie").into_iter().find(|sc| {
            sc.split(';')
                .next()
                .and_then(|p| p.split_once('='))
                .is_some_and(|(n, _)| n.trim() == cookie)
        })
    }

    /// The body as a [`Reply::Echo`] backend wrote it.
    pub fn echo(&self) -> io::Result<Echo> {
        Echo::parse(&self.body).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not an echo answer: status {}, body {:?}",
                    self.status, self.body
                ),
            )
        })
    }
}

/// The head of `GET target` with `headers` (in order) and `Connection: connection`; a
/// `Host` field is added (`default_host`) unless `headers` has one.
fn request_head(
    target: &str,
    default_host: &str,
    headers: &[(&str, &str)],
    connection: &str,
) -> String {
    let mut req = format!("GET {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {default_host}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Connection: {connection}\r\n\r\n"));
    req
}

/// `GET target` with `Connection: close` and the extra header fields `headers` (in order;
/// a name may repeat; a `Host` among them replaces the default, the VIP) from `src` to `dst`,
/// in the calling thread's namespace. Reads the whole response (any status; bodies with a
/// length, chunked or up to EOF).
pub fn request_from(
    src: Ipv4Addr,
    dst: SocketAddrV4,
    target: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let mut s = connect_from(src, dst, timeout)?;
    let req = request_head(target, &dst.ip().to_string(), headers, "close");
    s.write_all(req.as_bytes())?;
    let deadline = Instant::now() + timeout;
    let mut raw = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        if Instant::now() > deadline || raw.len() > 1 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response did not end in time",
            ));
        }
        match s.read(&mut chunk)? {
            0 => break,
            n => raw.extend_from_slice(&chunk[..n]),
        }
    }
    parse_full_response(&raw)
}

fn parse_full_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(300)])
            ),
        )
    };
    let end = find_head_end(raw).ok_or_else(|| bad("no complete response head"))?;
    let head = String::from_utf8_lossy(&raw[..end - 4]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let body: Vec<u8> = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = rest;
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunked body"))?;
            let size = std::str::from_utf8(&rest[..line_end])
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| bad("bad chunk size"))?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).ok_or_else(|| bad("short chunk"))?);
            rest = rest.get(size + 2..).ok_or_else(|| bad("short chunk"))?;
        }
        out
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        rest.get(..len).ok_or_else(|| bad("short body"))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
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

    /// One [`request_from`] client address `src` to VIP:`port`, made in the client namespace.
    pub fn request(
        &self,
        src: Ipv4Addr,
        port: u16,
        target: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<HttpResponse> {
        let dst = self.vip_addr(port);
        self.in_client(move || request_from(src, dst, target, headers, timeout))?
            .with_context(|| format!("GET http://{dst}{target} from {src}"))
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

/// Datagrams of a sequence stream: these 4 bytes, then the sequence number (u64, big endian).
pub const SEQ_MAGIC: [u8; 4] = *b"TSEQ";
/// Receive buffer asked for on each UDP sink (SO_RCVBUFFORCE), so a scheduling hiccup of the
/// sink thread does not drop datagrams in the sink's own socket.
const SINK_RCVBUF: libc::c_int = 8 << 20;

/// What one UDP sink received.
#[derive(Debug, Default)]
struct SinkLog {
    /// Sequence numbers in arrival order.
    seqs: Vec<u64>,
    /// Datagrams that were not sequence datagrams.
    other: u64,
}

struct UdpSink {
    name: String,
    log: Arc<Mutex<SinkLog>>,
    thread: Option<JoinHandle<()>>,
}

/// One UDP sink per backend namespace of a [`Topology`], on `0.0.0.0:<port>`: records the
/// sequence numbers of the [`SEQ_MAGIC`] datagrams it receives (see [`spawn_seq_sender`]).
/// Stopped on drop.
pub struct UdpSinks {
    pub port: u16,
    stop: Arc<AtomicBool>,
    sinks: Vec<UdpSink>,
}

impl UdpSinks {
    /// Starts a sink in every backend namespace; returns once all are bound.
    pub fn start(topo: &Topology, port: u16) -> Result<UdpSinks> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut me = UdpSinks {
            port,
            stop: stop.clone(),
            sinks: Vec::new(),
        };
        for (i, node) in topo.backends.iter().enumerate() {
            let name = topo.backend_name(i);
            let log = Arc::new(Mutex::new(SinkLog::default()));
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
            let (l, st) = (log.clone(), stop.clone());
            let thread = spawn_in_netns(&node.ns, &format!("udp-{name}"), move || {
                let sock = match UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_millis(50)))
                            .map(|()| s)
                    }) {
                    Ok(s) => {
                        force_rcvbuf(&s, SINK_RCVBUF);
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                sink_loop(&sock, &l, &st);
            })?;
            me.sinks.push(UdpSink {
                name: name.clone(),
                log,
                thread: Some(thread),
            });
            match ready_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("backend {name}: binding UDP port {port}: {e}"),
                Err(_) => bail!("backend {name}: UDP sink did not start"),
            }
        }
        Ok(me)
    }

    /// `(backend name, sequence numbers received in arrival order)` per backend.
    pub fn received(&self) -> Vec<(String, Vec<u64>)> {
        self.sinks
            .iter()
            .map(|s| {
                let log = s.log.lock().unwrap_or_else(|p| p.into_inner());
                (s.name.clone(), log.seqs.clone())
            })
            .collect()
    }

    /// Sequence datagrams received by all sinks together.
    pub fn total(&self) -> usize {
        self.sinks
            .iter()
            .map(|s| s.log.lock().unwrap_or_else(|p| p.into_inner()).seqs.len())
            .sum()
    }

    /// `(backend name, datagrams that were not sequence datagrams)` per backend.
    pub fn other(&self) -> Vec<(String, u64)> {
        self.sinks
            .iter()
            .map(|s| {
                let log = s.log.lock().unwrap_or_else(|p| p.into_inner());
                (s.name.clone(), log.other)
            })
            .collect()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &mut self.sinks {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for UdpSinks {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Best effort: SO_RCVBUFFORCE (root), else SO_RCVBUF (capped by rmem_max).
fn force_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a valid socket with a c_int value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

fn sink_loop(sock: &UdpSocket, log: &Mutex<SinkLog>, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                match parse_seq(&buf[..n]) {
                    Some(seq) => l.seqs.push(seq),
                    None => l.other += 1,
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A sequence datagram.
pub fn seq_datagram(seq: u64) -> [u8; 12] {
    let mut d = [0u8; 12];
    d[..4].copy_from_slice(&SEQ_MAGIC);
    d[4..].copy_from_slice(&seq.to_be_bytes());
    d
}

/// The sequence number of a sequence datagram.
pub fn parse_seq(d: &[u8]) -> Option<u64> {
    if d.len() != 12 || d[..4] != SEQ_MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(d[4..].try_into().ok()?))
}

/// Sends sequence datagrams 0, 1, 2... from `src` (one socket, so one source port) to `dst`
/// at `rate` per second, on a thread in namespace `ns`, until `stop` is set or `max` have
/// been sent. A send that fails transiently (ENOBUFS, EAGAIN) is retried (up to 100 times per
/// datagram), so the numbers sent are exactly `0..n`. The thread returns `n`.
pub fn spawn_seq_sender(
    ns: &str,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    rate: u32,
    max: u64,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<io::Result<u64>>> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    spawn_in_netns(ns, "udp-seq-sender", move || -> io::Result<u64> {
        let sock = UdpSocket::bind(SocketAddrV4::new(src, 0))?;
        let t0 = Instant::now();
        let mut seq = 0u64;
        while seq < max && !stop.load(Ordering::Relaxed) {
            let due = t0 + period.mul_f64(seq as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let d = seq_datagram(seq);
            let mut tries = 0;
            loop {
                match sock.send_to(&d, dst) {
                    Ok(_) => break,
                    Err(_) if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            }
            seq += 1;
        }
        Ok(seq)
    })
}

/// An HTTP/1.1 keep-alive connection to a backend server (through the VIP): one
/// `GET /` at a time on the same TCP connection.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl KeepAlive {
    /// Takes an open connection (see [`connect_from`] / [`Topology::connect_vip`]).
    pub fn new(stream: TcpStream, timeout: Duration) -> KeepAlive {
        KeepAlive {
            stream,
            buf: Vec::with_capacity(1024),
            timeout,
        }
    }

    /// The connection's local address (the client side).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// One `GET /` on this connection; returns the body, trimmed (the backend's name). Fails
    /// if the server closes the connection or answers anything but 200 with a length.
    pub fn get(&mut self) -> io::Result<String> {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: tether\r\nConnection: keep-alive\r\n\r\n")?;
        let deadline = Instant::now() + self.timeout;
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = find_head_end(&self.buf) {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len = head
                    .split("\r\n")
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("no length: {head:?}"))
                    })?;
                if self.buf.len() >= end + len {
                    let body = parse_response(&self.buf[..end + len]);
                    self.buf.drain(..end + len);
                    return body;
                }
            }
            if Instant::now() > deadline || self.buf.len() > 64 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "response did not end in time",
                ));
            }
            match self.stream.read(&mut chunk)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

impl KeepAlive {
    /// One `GET target` with `headers` (as [`request_from`] sends them, but keep-alive) on
    /// this connection; the response (any status) must have a length or be chunked. One
    /// request at a time: the buffer holds nothing after a response.
    pub fn request(&mut self, target: &str, headers: &[(&str, &str)]) -> io::Result<HttpResponse> {
        let host = self
            .stream
            .peer_addr()
            .map_or_else(|_| "tether".to_string(), |a| a.ip().to_string());
        let req = request_head(target, &host, headers, "keep-alive");
        self.stream.write_all(req.as_bytes())?;
        self.buf.clear();
        let deadline = Instant::now() + self.timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find_head_end(&self.buf) {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let complete = if head.contains("transfer-encoding: chunked") {
                    self.buf[end..].windows(5).any(|w| w == b"0\r\n\r\n")
                } else {
                    let len = head
                        .split("\r\n")
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("no length: {head:?}"),
                            )
                        })?;
                    self.buf.len() >= end + len
                };
                if complete {
                    let r = parse_full_response(&self.buf);
                    self.buf.clear();
                    return r;
                }
            }
            if Instant::now() > deadline || self.buf.len() > 1 << 20 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "response did not end in time",
                ));
            }
            match self.stream.read(&mut chunk)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            request_head("/x", "10.0.0.1", &[("A", "1")], "close"),
            "GET /x HTTP/1.1\r\nHost: 10.0.0.1\r\nA: 1\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            request_head("/", "10.0.0.1", &[("host", "h.test")], "keep-alive"),
            "GET / HTTP/1.1\r\nhost: h.test\r\nConnection: keep-alive\r\n\r\n",
            "a Host among the fields replaces the default"
        );
    }

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
        let t = std::thread::spawn(move || accept_loop(listener, "b7", Reply::Name, &s2, &st2));
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

    #[test]
    fn echo_answers_parse() {
        let head = b"GET /login?x=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\ncookie: b=2\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
        let raw = echo_response("b3", head, false);
        let r = parse_full_response(raw.as_bytes()).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.set_cookie_value("theme").as_deref(), Some("dark"));
        let session = r.set_cookie_value("JSESSIONID").unwrap();
        assert!(session.starts_with("b3-"), "{session}");
        assert!(r.set_cookie("JSESSIONID").unwrap().contains("HttpOnly"));
        let e = r.echo().unwrap();
        assert_eq!(e.backend, "b3");
        assert_eq!(e.target, "/login?x=1");
        assert_eq!(e.cookie.as_deref(), Some("a=1 | b=2"));
        assert_eq!(e.x_forwarded_for.as_deref(), Some("10.0.0.1"));
        assert_eq!(e.x_forwarded_proto, None);
        let raw = echo_response("b1", b"GET /x HTTP/1.1\r\n\r\n", true);
        let r = parse_full_response(raw.as_bytes()).unwrap();
        assert!(r.headers_named("set-cookie").is_empty());
        assert_eq!(r.echo().unwrap().cookie, None);
        let r = parse_full_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcd"));
        assert!(r.echo().is_err());
    }

    #[test]
    fn seq_datagrams_round_trip() {
        for seq in [0, 1, 4242, u64::MAX] {
            assert_eq!(parse_seq(&seq_datagram(seq)), Some(seq));
        }
        assert_eq!(parse_seq(b"TSEQ1234"), None, "too short");
        assert_eq!(parse_seq(b"XSEQ12345678"), None, "wrong magic");
    }

    /// Several requests on one keep-alive connection, on loopback.
    #[test]
    fn keep_alive_client_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = match listener.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let stats = Arc::new(ServerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (stats.clone(), stop.clone());
        let t = std::thread::spawn(move || accept_loop(listener, "b9", Reply::Name, &s2, &st2));
        let c = connect_from(Ipv4Addr::LOCALHOST, addr, Duration::from_secs(2)).unwrap();
        let mut ka = KeepAlive::new(c, Duration::from_secs(2));
        for _ in 0..5 {
            assert_eq!(ka.get().unwrap(), "b9");
        }
        drop(ka);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 5);
    }
}
