//! `cargo xtask bench l7`: the L7 proxy with cookie persistence, measured with wrk on loopback
//! side by side with a direct connection to the backends and with HAProxy doing the same job.
//!
//! Rows, every one against the same two backends (b1 on 127.0.0.1, b2 on 127.0.0.2, small
//! keep-alive HTTP/1.1 servers running in this process on a tokio runtime):
//! - direct: wrk straight to b1;
//! - tether, miss: mode `l7` with an `http-cookie` profile, no cookie sent, so every response
//!   carries a Set-Cookie;
//! - tether, hit: the cookie tether issued (captured with one request first) sent on every
//!   request;
//! - HAProxy, miss and hit: `cookie SRV insert indirect nocache`, `nbthread 1`, roundrobin.
//!
//! The tether daemon runs with `TETHER_WORKER_THREADS=1`, to match HAProxy's one thread; the
//! daemon's threads are listed under the table. HAProxy is also told to add the forwarding
//! headers tether adds (`X-Forwarded-For`, `-Proto`, `-Host`), so both do the same edits.
//! tether's XDP program sits on `lo` (generic mode) for the whole run, so every row pays the
//! same per-packet hook; a `direct, before tether started` row shows what the hook costs.
//!
//! Each round runs every row once (the order rotates between rounds), after one warm-up run per
//! row; the table shows the median of the rounds for each figure. wrk reports latency with
//! coordinated omission (closed loop), which is fine for comparing rows, not as an SLO figure.
//! Results go to stdout and target/bench/l7.md. Nothing here asserts on time.
//!
//! Every process started here (backends are threads of this process; HAProxy, the daemon,
//! wrk) is stopped by pid when its guard drops, also on panic; every wait is bounded.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const COOKIE: &str = "SRV";
/// How long the daemon may take to print `tether ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped process may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of the probe requests (cookie capture, sanity checks).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Captured daemon output is capped (the oldest half is dropped past this).
const MAX_LOG: usize = 1 << 20;

struct Opts {
    rounds: usize,
    secs: u64,
    warmup_secs: u64,
    connections: u32,
    threads: u32,
}

const USAGE: &str = "--rounds N --duration SECS --connections N --threads N --quick";

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 3,
        secs: 5,
        warmup_secs: 1,
        connections: 32,
        threads: 1,
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{a} needs a value ({USAGE})"))
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{a} needs a number"))
        };
        match a.as_str() {
            "--rounds" => o.rounds = val().max(1) as usize,
            "--duration" => o.secs = val().max(1),
            "--connections" => o.connections = val().max(1) as u32,
            "--threads" => o.threads = val().max(1) as u32,
            "--quick" => {
                o.rounds = 1;
                o.secs = 2;
            }
            other => panic!("unknown argument {other} ({USAGE})"),
        }
    }
    assert!(
        o.connections >= o.threads,
        "wrk needs at least one connection per thread"
    );
    o
}

// ---------------------------------------------------------------------------------------------
// Processes and files, cleaned up on drop.

/// A child process, stopped by pid when dropped: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc, String> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("wait failed: {e}")),
        }
    }

    /// Waits up to `timeout` for the process to exit on its own; kills it otherwise.
    fn wait_for(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(format!("{} did not finish within {timeout:?}", self.name))
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: a signal to our own child, which has not been reaped (try_wait said running).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} ignored SIGTERM for {STOP_TIMEOUT:?}: SIGKILL",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The bench's scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!("tether-bench-l7-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch directory");
        Scratch(p)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until `addr` accepts TCP connections (bounded).
fn wait_listening(addr: SocketAddrV4, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Backends: minimal keep-alive HTTP/1.1 servers (GET without body, Content-Length bodies; any
// other framing closes the connection), pipelining-safe, each answering 200 with its name.

struct Backends {
    rt: Option<tokio::runtime::Runtime>,
    addrs: Vec<SocketAddrV4>,
    requests: Vec<Arc<AtomicU64>>,
}

impl Backends {
    fn start(ips: &[Ipv4Addr]) -> Backends {
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

    fn counts(&self) -> Vec<u64> {
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
fn request_framing(head: &[u8]) -> Option<(usize, bool)> {
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

async fn serve(mut s: tokio::net::TcpStream, resp: Arc<[u8]>, count: Arc<AtomicU64>) {
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

// ---------------------------------------------------------------------------------------------
// Probe requests (blocking, one per connection).

struct Probe {
    status: u16,
    set_cookie: Option<String>,
    body: String,
}

/// One `GET /` with `Connection: close`, optionally with a cookie.
fn probe(addr: SocketAddrV4, cookie: Option<&str>) -> Result<Probe, String> {
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
fn capture_cookie(
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

// ---------------------------------------------------------------------------------------------
// wrk

/// Prints one machine-readable line when wrk is done.
const WRK_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_WRK %f %f %f %f %f %f\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"#;

#[derive(Clone, Copy, Debug)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Socket errors and timeouts.
    errors: f64,
    /// Responses other than 2xx/3xx.
    bad_status: f64,
    requests: f64,
    /// CPU time (user + system) the proxy process used per request; NaN: no proxy.
    proxy_cpu_us: f64,
}

fn wrk(
    o: &Opts,
    script: &Path,
    addr: SocketAddrV4,
    cookie: Option<&str>,
    secs: u64,
) -> Result<Sample, String> {
    let out_path = script.with_file_name(format!("wrk-{}.out", std::process::id()));
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &o.threads.to_string()])
        .args(["-c", &o.connections.to_string()])
        .args(["-d", &format!("{secs}s")])
        .args(["--timeout", "5s", "-s"])
        .arg(script);
    if let Some(c) = cookie {
        cmd.args(["-H", &format!("Cookie: {c}")]);
    }
    cmd.arg(format!("http://{addr}/"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::inherit());
    let mut p = Proc::spawn("wrk", &mut cmd)?;
    p.wait_for(Duration::from_secs(secs + 30))?;
    let status = p.exited().unwrap_or_default();
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_WRK "))
        .ok_or_else(|| format!("wrk ({status}) printed no summary:\n{text}"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    if v.len() != 6 || v[1] <= 0.0 {
        return Err(format!("wrk: bad summary {line:?}"));
    }
    Ok(Sample {
        rps: v[0] / (v[1] / 1e6),
        p50_us: v[2],
        p99_us: v[3],
        errors: v[4],
        bad_status: v[5],
        requests: v[0],
        proxy_cpu_us: f64::NAN,
    })
}

// ---------------------------------------------------------------------------------------------
// HAProxy

fn haproxy_config(port: u16, backends: &[SocketAddrV4]) -> String {
    // Written out in full instead of the Debian defaults: no syslog, no chroot, no stats
    // socket, no user switch, foreground (-db), one thread, listening on 127.0.0.1 only.
    let mut s = format!(
        "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    option http-keep-alive
    # The forwarding headers tether adds, so both proxies edit the same.
    option forwardfor

frontend bench
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend web

backend web
    balance roundrobin
    cookie {COOKIE} insert indirect nocache
"
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(s, "    server b{n} {b} cookie b{n}", n = i + 1);
    }
    s
}

fn start_haproxy(scratch: &Scratch, port: u16, backends: &[SocketAddrV4]) -> Result<Proc, String> {
    let cfg = scratch.write("haproxy.cfg", &haproxy_config(port, backends));
    let check = Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(&cfg)
        .output()
        .map_err(|e| format!("haproxy -c: {e}"))?;
    if !check.status.success() {
        return Err(format!(
            "haproxy rejects the config: {}",
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    let log = std::fs::File::create(scratch.0.join("haproxy.log")).map_err(|e| e.to_string())?;
    let mut p = Proc::spawn(
        "haproxy",
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    if !wait_listening(addr, Duration::from_secs(10)) {
        let log = std::fs::read_to_string(scratch.0.join("haproxy.log")).unwrap_or_default();
        p.stop();
        return Err(format!("haproxy is not listening on {addr}:\n{log}"));
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// tether

struct Tether {
    proc: Proc,
    bin: PathBuf,
    pin_dir: PathBuf,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Tether {
    fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        log[start..].to_string()
    }

    /// The daemon's threads by name (`comm`), with counts.
    fn threads(&self) -> String {
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let dir = format!("/proc/{}/task", self.proc.pid());
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Ok(c) = std::fs::read_to_string(e.path().join("comm")) {
                *names.entry(c.trim().to_string()).or_default() += 1;
            }
        }
        names
            .iter()
            .map(|(n, c)| format!("{n} x{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        self.proc.stop();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        // The XDP link and maps stay pinned after the daemon exits: detach and remove them.
        match Command::new(&self.bin)
            .args(["stop", "--detach", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "tether stop --detach: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("tether stop --detach: {e}"),
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn tether_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tether")
}

fn tether_config(pin_dir: &Path, admin: u16, port: u16, backends: &[SocketAddrV4]) -> String {
    let mut secret = [0u8; 32];
    let f = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut secret));
    f.expect("random cookie key");
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let backends: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                r#"{{"name":"b{}","address":"{}","port":{},"mac":"00:00:00:00:00:00"}}"#,
                i + 1,
                b.ip(),
                b.port()
            )
        })
        .collect();
    format!(
        r#"{{"interface":"lo","xdp_mode":"generic","pin_dir":"{pin}","admin_listen":"127.0.0.1:{admin}",
 "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":{port},"protocol":"tcp","mode":"l7","pool":"web","persistence":"ck"}}],
 "pools":[{{"name":"web","backends":[{b}]}}],
 "persistence_profiles":[{{"name":"ck","type":"http-cookie","cookie_name":"{COOKIE}","keys":[{{"id":1,"secret":"{secret}"}}]}}]}}"#,
        pin = pin_dir.display(),
        b = backends.join(",")
    )
}

fn start_tether(scratch: &Scratch, port: u16, backends: &[SocketAddrV4]) -> Result<Tether, String> {
    let bin = tether_bin();
    if !bin.is_file() {
        return Err(format!(
            "{} is missing: run `cargo xtask bench l7` (it builds the release daemon) or set TETHER_BIN",
            bin.display()
        ));
    }
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/tether-bench-l7-{}",
        std::process::id()
    ));
    let cfg = scratch.write(
        "tether.json",
        &tether_config(&pin_dir, free_port(), port, backends),
    );
    let mut proc = Proc::spawn(
        "tether",
        Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .env("TETHER_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let log = Arc::new(Mutex::new(String::new()));
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let mut readers = Vec::new();
    let outputs: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(proc.child.stdout.take().expect("piped")),
        Box::new(proc.child.stderr.take().expect("piped")),
    ];
    for out in outputs {
        let (log, tx) = (log.clone(), ready_tx.clone());
        readers.push(std::thread::spawn(move || {
            // Ends at EOF, when the daemon exits.
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.contains("tether ready") {
                    let _ = tx.send(());
                }
                let mut l = log.lock().expect("log lock");
                if l.len() > MAX_LOG {
                    let cut = (l.len() / 2..l.len())
                        .find(|&i| l.is_char_boundary(i))
                        .unwrap_or(l.len());
                    l.drain(..cut);
                }
                l.push_str(&line);
                l.push('\n');
            }
        }));
    }
    drop(ready_tx);
    let mut t = Tether {
        proc,
        bin,
        pin_dir,
        log,
        readers,
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match ready_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100));
                let st = t.proc.exited().unwrap_or_default();
                return Err(format!(
                    "tether exited ({st}) before `tether ready`:\n{}",
                    t.log_tail()
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(st) = t.proc.exited() {
                    return Err(format!(
                        "tether exited ({st}) before `tether ready`:\n{}",
                        t.log_tail()
                    ));
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "no `tether ready` within {READY_TIMEOUT:?}:\n{}",
                        t.log_tail()
                    ));
                }
            }
        }
    }
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    if !wait_listening(addr, Duration::from_secs(5)) {
        return Err(format!(
            "tether is ready but nothing listens on {addr}: the daemon does not serve mode \"l7\" yet\n{}",
            t.log_tail()
        ));
    }
    Ok(t)
}

// ---------------------------------------------------------------------------------------------

/// The median of the finite values, `None` when there are none.
fn median(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// One row of the table: where wrk sends requests, and with which cookie.
struct Row {
    label: &'static str,
    addr: SocketAddrV4,
    cookie: Option<String>,
    /// `Some(reason)`: not measured.
    pending: Option<String>,
    samples: Vec<Sample>,
    /// Requests each backend answered during the measured runs.
    per_backend: Vec<u64>,
    /// The proxy's process, for its CPU time.
    pid: Option<u32>,
}

impl Row {
    fn new(label: &'static str, addr: SocketAddrV4, cookie: Result<Option<String>, String>) -> Row {
        let (cookie, pending) = match cookie {
            Ok(c) => (c, None),
            Err(e) => (None, Some(e)),
        };
        Row {
            label,
            addr,
            cookie,
            pending,
            samples: Vec::new(),
            per_backend: Vec::new(),
            pid: None,
        }
    }

    fn med(&self, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        median(self.samples.iter().map(f))
    }
}

/// User + system CPU time of process `pid` so far, in µs.
fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): state first, utime 12th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 * 1e6 / hz)
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

fn main() {
    let o = opts();
    assert!(
        Command::new("wrk").arg("-v").output().is_ok(),
        "wrk is missing: run `cargo xtask bench l7` (its bootstrap installs wrk and haproxy)"
    );
    let scratch = Scratch::new();
    let script = scratch.write("report.lua", WRK_LUA);
    let backends = Backends::start(&[Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2)]);
    let b = backends.addrs.clone();
    let mut notes: Vec<String> = Vec::new();
    for (i, a) in b.iter().enumerate() {
        let p = probe(*a, None).unwrap_or_else(|e| panic!("backend b{}: {e}", i + 1));
        assert_eq!(p.status, 200, "backend b{}", i + 1);
    }

    // Direct, before tether's XDP program is on lo: what the generic XDP hook costs every row.
    let mut before = Row::new(
        "direct, before tether started (no XDP on lo)",
        b[0],
        Ok(None),
    );
    let _ = wrk(&o, &script, b[0], None, o.warmup_secs);
    for round in 0..o.rounds {
        match wrk(&o, &script, b[0], None, o.secs) {
            Ok(s) => {
                eprintln!(
                    "round {}/{}: {}: {:.0} req/s, p50 {}, p99 {}",
                    round + 1,
                    o.rounds,
                    before.label,
                    s.rps,
                    fmt_us(s.p50_us),
                    fmt_us(s.p99_us)
                );
                before.samples.push(s);
            }
            Err(e) => notes.push(format!("direct before tether: {e}")),
        }
    }

    let haproxy_port = free_port();
    let haproxy = start_haproxy(&scratch, haproxy_port, &b);
    let haproxy_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, haproxy_port);
    let haproxy_cookie = match &haproxy {
        Ok(_) => capture_cookie(haproxy_addr, "HAProxy", &mut notes),
        Err(e) => Err(e.clone()),
    };

    let tether_port = free_port();
    let tether_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, tether_port);
    let tether = start_tether(&scratch, tether_port, &b);
    let tether_cookie = match &tether {
        Ok(_) => capture_cookie(tether_addr, "tether", &mut notes),
        Err(e) => Err(e.clone()),
    };
    if let Ok(t) = &tether {
        let env_ok = std::fs::read(format!("/proc/{}/environ", t.proc.pid())).is_ok_and(|e| {
            e.split(|&c| c == 0)
                .any(|v| v == b"TETHER_WORKER_THREADS=1")
        });
        notes.push(format!(
            "tether ran with TETHER_WORKER_THREADS=1 in its environment: {env_ok}"
        ));
    }

    for (who, r) in [("HAProxy", &haproxy_cookie), ("tether", &tether_cookie)] {
        if let Err(e) = r {
            notes.push(format!("{who} rows pending: {e}"));
        }
    }
    let pending_or = |r: &Result<String, String>, hit: bool| -> Result<Option<String>, String> {
        match r {
            Ok(c) => Ok(hit.then(|| c.clone())),
            Err(e) => Err(e.clone()),
        }
    };
    let mut rows = [
        Row::new("direct (wrk → b1)", b[0], Ok(None)),
        Row::new(
            "tether, cookie miss (Set-Cookie on every response)",
            tether_addr,
            pending_or(&tether_cookie, false),
        ),
        Row::new(
            "tether, cookie hit",
            tether_addr,
            pending_or(&tether_cookie, true),
        ),
        Row::new(
            "HAProxy, cookie miss",
            haproxy_addr,
            pending_or(&haproxy_cookie, false),
        ),
        Row::new(
            "HAProxy, cookie hit",
            haproxy_addr,
            pending_or(&haproxy_cookie, true),
        ),
    ];
    for (i, r) in rows.iter_mut().enumerate() {
        r.pid = match i {
            1 | 2 => tether.as_ref().ok().map(|t| t.proc.pid()),
            3 | 4 => haproxy.as_ref().ok().map(Proc::pid),
            _ => None,
        };
        r.per_backend = vec![0; b.len()];
        if r.pending.is_none() {
            // Warm-up: connections (and the proxies' pools to the backends) open.
            let _ = wrk(&o, &script, r.addr, r.cookie.as_deref(), o.warmup_secs);
        }
    }

    let n = rows.len();
    for round in 0..o.rounds {
        // The order rotates, so no row always runs right after the same one.
        for k in 0..n {
            let r = &mut rows[(k + round) % n];
            if r.pending.is_some() {
                continue;
            }
            let c0 = backends.counts();
            let cpu0 = r.pid.and_then(cpu_us);
            match wrk(&o, &script, r.addr, r.cookie.as_deref(), o.secs) {
                Ok(mut s) => {
                    if let (Some(a), Some(b)) = (cpu0, r.pid.and_then(cpu_us))
                        && s.requests > 0.0
                    {
                        s.proxy_cpu_us = (b - a) / s.requests;
                    }
                    eprintln!(
                        "round {}/{}: {}: {:.0} req/s, p50 {}, p99 {}",
                        round + 1,
                        o.rounds,
                        r.label,
                        s.rps,
                        fmt_us(s.p50_us),
                        fmt_us(s.p99_us)
                    );
                    r.samples.push(s);
                }
                Err(e) => notes.push(format!("{} round {}: {e}", r.label, round + 1)),
            }
            for (i, (a, z)) in backends.counts().iter().zip(&c0).enumerate() {
                r.per_backend[i] += a - z;
            }
        }
    }

    if let Ok(t) = &tether {
        notes.push(format!("tether daemon threads: {}", t.threads()));
    }
    drop(tether);
    drop(haproxy);
    drop(backends);

    // The table.
    let direct = rows[0].med(|s| s.rps);
    let mut md = format!(
        "wrk -t{} -c{} -d{}s on loopback, median of {} round(s); {} cores; tether with \
         TETHER_WORKER_THREADS=1, HAProxy `nbthread 1`, both `cookie {COOKIE}` insert.\n\n\
         | path | req/s | p50 | p99 | req/s vs direct | req/s vs HAProxy | p99 vs HAProxy | \
         proxy CPU/req | errors |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        o.threads,
        o.connections,
        o.secs,
        o.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let haproxy_of = |i: usize| match i {
        1 => Some(3),
        2 => Some(4),
        _ => None,
    };
    let mut all: Vec<&Row> = rows.iter().collect();
    all.push(&before);
    for (i, r) in all.iter().enumerate() {
        if let Some(why) = &r.pending {
            let why = why.lines().next().unwrap_or_default().replace('|', "/");
            let _ = writeln!(md, "| {} | pending: {why} | | | | | | | |", r.label);
            continue;
        }
        let h = haproxy_of(i).map(|j| &rows[j]);
        let errors: f64 = r.samples.iter().map(|s| s.errors + s.bad_status).sum();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.med(|s| s.rps).map_or("–".into(), |v| format!("{v:.0}")),
            r.med(|s| s.p50_us).map_or("–".into(), fmt_us),
            r.med(|s| s.p99_us).map_or("–".into(), fmt_us),
            if i == 0 {
                "1.00x".into()
            } else {
                ratio(r.med(|s| s.rps), direct)
            },
            h.map_or("–".into(), |h| ratio(r.med(|s| s.rps), h.med(|s| s.rps))),
            h.map_or("–".into(), |h| ratio(
                r.med(|s| s.p99_us),
                h.med(|s| s.p99_us)
            )),
            r.med(|s| s.proxy_cpu_us)
                .map_or("–".into(), |v| format!("{v:.1} µs")),
            errors
        );
    }
    let _ = writeln!(md, "\nRequests per backend during the measured runs:");
    for r in rows.iter().filter(|r| r.pending.is_none()) {
        let per: Vec<String> = r
            .per_backend
            .iter()
            .enumerate()
            .map(|(i, n)| format!("b{} {n}", i + 1))
            .collect();
        let _ = writeln!(md, "- {}: {}", r.label, per.join(", "));
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\nNotes:");
        for n in &notes {
            let _ = writeln!(md, "- {}", n.replace('\n', "\n  "));
        }
    }
    println!("\n{md}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(out.join("l7.md"), &md).expect("write l7.md");
    println!("written to target/bench/l7.md");
    drop(scratch);
}
