//! The two proxies under test: HAProxy and the tether daemon, each serving one cleartext and
//! one TLS frontend (HTTP/1.1 and HTTP/2 by ALPN) with cookie-insert persistence, on a given
//! number of worker threads.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tether_tests::tlslab::pem;

use crate::{
    COOKIE,
    procs::{Proc, Scratch, free_port, wait_listening},
};

/// How long the daemon may take to print `tether ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Captured daemon output is capped (the oldest half is dropped past this).
const MAX_LOG: usize = 1 << 20;

/// Where a proxy listens, and with how many threads it runs.
#[derive(Clone, Copy, Debug)]
pub struct Frontends {
    pub plain: u16,
    pub tls: u16,
    pub workers: u32,
    /// HAProxy only: `cpu-map` thread `i` to the `i`-th CPU, as tether pins its workers.
    pub cpu_map: bool,
    /// HAProxy only: a `mode tcp` frontend on this port relaying bytes to the backends with
    /// no HTTP processing, the floor of any proxy with the same four syscalls per request.
    pub tcp_relay: Option<u16>,
}

/// The certificate both proxies serve (self-signed for 127.0.0.1; the load generators do
/// not verify it).
pub struct Cert {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    /// Certificate then key, as HAProxy's `crt` wants them.
    pub combined_pem: PathBuf,
}

impl Cert {
    pub fn write(scratch: &Scratch) -> Cert {
        let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .unwrap_or_else(|e| panic!("generating a certificate: {e}"));
        let cert = pem("CERTIFICATE", c.cert.der());
        let key = pem("PRIVATE KEY", &c.signing_key.serialize_der());
        Cert {
            cert_pem: scratch.write("cert.pem", &cert),
            key_pem: scratch.write("key.pem", &key),
            combined_pem: scratch.write("combined.pem", &format!("{cert}{key}")),
        }
    }
}

pub fn haproxy_config(fe: Frontends, cert: &Cert, backends: &[SocketAddrV4]) -> String {
    // Written out in full instead of the Debian defaults: no syslog, no chroot, no stats
    // socket, no user switch, foreground (-db), listening on 127.0.0.1 only. `maxconn` well
    // above the 1,000-connection row.
    let mut s = format!(
        "global
    nbthread {workers}
    maxconn 8192
    ssl-default-bind-options ssl-min-ver TLSv1.2

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
    bind 127.0.0.1:{plain}
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend web

frontend bench_tls
    bind 127.0.0.1:{tls} ssl crt {crt} alpn h2,http/1.1
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend web_tls

backend web
    balance roundrobin
    cookie {COOKIE} insert indirect nocache
",
        workers = fe.workers,
        plain = fe.plain,
        tls = fe.tls,
        crt = cert.combined_pem.display(),
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(s, "    server b{n} {b} cookie b{n}", n = i + 1);
    }
    if fe.cpu_map {
        // In the global section, which the text above starts with.
        let cpus = tether::workers::allowed_cpus().unwrap_or_default();
        let map: String = (0..fe.workers as usize)
            .zip(&cpus)
            .map(|(t, c)| format!("    cpu-map 1/{} {c}\n", t + 1))
            .collect();
        s = s.replacen("global\n", &format!("global\n{map}"), 1);
    }
    if let Some(port) = fe.tcp_relay {
        // Each client connection gets its own backend connection for its life: the same
        // recv and send per request on each side as the HTTP frontends, no parsing.
        let _ = write!(
            s,
            "
frontend bench_tcp_relay
    mode tcp
    bind 127.0.0.1:{port}
    default_backend relay

backend relay
    mode tcp
    balance roundrobin
"
        );
        for (i, b) in backends.iter().enumerate() {
            let _ = writeln!(s, "    server b{n} {b}", n = i + 1);
        }
    }
    // tether marks its cookie Secure on TLS connections: HAProxy does the same here.
    let _ = write!(
        s,
        "
backend web_tls
    balance roundrobin
    cookie {COOKIE} insert indirect nocache secure
"
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(s, "    server b{n} {b} cookie b{n}", n = i + 1);
    }
    s
}

pub fn start_haproxy(
    scratch: &Scratch,
    fe: Frontends,
    cert: &Cert,
    backends: &[SocketAddrV4],
) -> Result<Proc, String> {
    let cfg = scratch.write("haproxy.cfg", &haproxy_config(fe, cert, backends));
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
    for port in [fe.plain, fe.tls].into_iter().chain(fe.tcp_relay) {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        if !wait_listening(addr, Duration::from_secs(10)) {
            let log = std::fs::read_to_string(scratch.0.join("haproxy.log")).unwrap_or_default();
            p.stop();
            return Err(format!("haproxy is not listening on {addr}:\n{log}"));
        }
    }
    Ok(p)
}

pub struct Tether {
    pub proc: Proc,
    pub bin: PathBuf,
    pub pin_dir: PathBuf,
    pub log: Arc<Mutex<String>>,
    pub readers: Vec<JoinHandle<()>>,
}

impl Tether {
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        log[start..].to_string()
    }

    /// The daemon's threads by name (`comm`), with counts.
    pub fn threads(&self) -> String {
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

pub fn tether_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tether")
}

/// Services `web` (cleartext) and `web-tls` (TLS, HTTP/1.1 and HTTP/2 by ALPN), both with the
/// same cookie profile. All of the bench's connections come from 127.0.0.1, so `web` allows
/// more than the default 1,000 connections per source (the 1,000-connection row).
pub fn tether_config(
    pin_dir: &Path,
    admin: u16,
    fe: Frontends,
    cert: &Cert,
    backends: &[SocketAddrV4],
) -> String {
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
 "virtual_services":[
  {{"name":"web","vip":"127.0.0.1","port":{plain},"protocol":"tcp","mode":"l7","pool":"web","persistence":"ck",
    "limits":{{"max_connections_per_source":4096}}}},
  {{"name":"web-tls","vip":"127.0.0.1","port":{tls},"protocol":"tcp","mode":"l7","pool":"web","persistence":"ck",
    "tls":{{"cert_file":"{cert}","key_file":"{key}"}}}}],
 "pools":[{{"name":"web","backends":[{b}]}}],
 "persistence_profiles":[{{"name":"ck","type":"http-cookie","cookie_name":"{COOKIE}","keys":[{{"id":1,"secret":"{secret}"}}]}}]}}"#,
        pin = pin_dir.display(),
        plain = fe.plain,
        tls = fe.tls,
        cert = cert.cert_pem.display(),
        key = cert.key_pem.display(),
        b = backends.join(",")
    )
}

pub fn start_tether(
    scratch: &Scratch,
    fe: Frontends,
    cert: &Cert,
    backends: &[SocketAddrV4],
) -> Result<Tether, String> {
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
        &tether_config(&pin_dir, free_port(), fe, cert, backends),
    );
    let mut proc = Proc::spawn(
        "tether",
        Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .env("TETHER_WORKER_THREADS", fe.workers.to_string())
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
    for port in [fe.plain, fe.tls] {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        if !wait_listening(addr, Duration::from_secs(5)) {
            return Err(format!(
                "tether is ready but nothing listens on {addr}\n{}",
                t.log_tail()
            ));
        }
    }
    Ok(t)
}
