//! Running the real `tether` daemon inside a topology's LB namespace.
//!
//! The daemon is started as the README tells users to: `ip netns exec <lb-ns> $TETHER_BIN run
//! --config FILE` (a private mount namespace whose /sys hides the host's bpffs: tether itself
//! must find the host's, or pins would vanish with the process). The CLI is run from the
//! host with `--netns <lb-ns>`. Output is captured; `start` returns once it prints `tether
//! ready`. [`Daemon::restart`] runs `tether restart` and follows the daemon that took over
//! (its output goes to the same pipes). Dropping a [`Daemon`] kills what still runs and
//! removes its config file and pin directory.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value, json};

use crate::netns::{Topology, run_cmd, run_in_netns};

/// Environment variable with the daemon binary's path (set by `cargo xtask test|run`).
pub const TETHER_BIN_ENV: &str = "TETHER_BIN";
/// How long `start` waits for `tether ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the daemon to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Daemon::reload`] waits for the daemon to log the outcome.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// The daemon's admin API address when the config sets none.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
/// The daemon's state directory (its admin token) when the config sets none.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether";
/// Timeout of one admin API request made by the harness.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Captured output is capped (the oldest half is dropped past this).
const MAX_LOG: usize = 4 << 20;

static CONFIG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The daemon binary from `TETHER_BIN`, or an error telling how to run the tests.
pub fn tether_bin() -> Result<PathBuf> {
    let Some(p) = std::env::var_os(TETHER_BIN_ENV) else {
        bail!(
            "{TETHER_BIN_ENV} is not set: run the end-to-end tests with `cargo xtask test` (it builds \
             the daemon and sets {TETHER_BIN_ENV}), or set {TETHER_BIN_ENV}=/path/to/tether"
        );
    };
    let p = PathBuf::from(p);
    if !p.is_file() {
        bail!(
            "{TETHER_BIN_ENV}={} does not exist: run `cargo xtask test`",
            p.display()
        );
    }
    Ok(p)
}

/// A tether config for a topology: the LB's veth, one pool `web` with every backend
/// (`b1`.. at their addresses, weight 1), services added with [`ConfigBuilder::service`] (TCP)
/// or [`ConfigBuilder::udp_service`]. Optional: a health monitor on the pool, per-backend
/// fields (`weight`, `admin_state`), the persistence profiles' down policy, `admin_listen`.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    interface: String,
    pin_dir: Option<PathBuf>,
    xdp_mode: Option<String>,
    persist_table_entries: Option<u32>,
    backends: Vec<(String, Ipv4Addr)>,
    services: Vec<Value>,
    profiles: Vec<Value>,
    down_policy: String,
    health_monitor: Option<Value>,
    backend_fields: BTreeMap<String, Map<String, Value>>,
    pool_fields: Map<String, Value>,
    admin_listen: Option<String>,
    top_fields: Map<String, Value>,
}

impl ConfigBuilder {
    /// Defaults: no `xdp_mode` (the daemon's default, `auto`), 65536 persistence entries.
    pub fn new(topo: &Topology, pin_dir: &Path) -> ConfigBuilder {
        ConfigBuilder {
            interface: topo.lb.ifname.clone(),
            pin_dir: Some(pin_dir.to_path_buf()),
            xdp_mode: None,
            persist_table_entries: Some(65536),
            backends: topo
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| (topo.backend_name(i), b.addr))
                .collect(),
            services: Vec::new(),
            profiles: Vec::new(),
            down_policy: "immediate".into(),
            health_monitor: None,
            backend_fields: BTreeMap::new(),
            pool_fields: Map::new(),
            admin_listen: None,
            top_fields: Map::new(),
        }
    }

    /// Leaves out every optional top-level field (`pin_dir`, `xdp_mode`,
    /// `persist_table_entries`, `admin_listen`): the config a new user writes.
    pub fn user_defaults(mut self) -> Self {
        self.pin_dir = None;
        self.xdp_mode = None;
        self.persist_table_entries = None;
        self.admin_listen = None;
        self
    }

    /// Like [`ConfigBuilder::user_defaults`], but keeps the test's own `pin_dir`: it keeps each
    /// test's daemon, pid file and handoff socket apart from any other tether on the machine.
    pub fn user_defaults_own_pins(self) -> Self {
        let pin_dir = self.pin_dir.clone();
        ConfigBuilder {
            pin_dir,
            ..self.user_defaults()
        }
    }

    /// `auto`, `native` or `generic`.
    pub fn xdp_mode(mut self, mode: &str) -> Self {
        self.xdp_mode = Some(mode.into());
        self
    }

    pub fn persist_table_entries(mut self, n: u32) -> Self {
        self.persist_table_entries = Some(n);
        self
    }

    /// A TCP L4 DSR service on VIP:`port` over pool `web`, with client-IP persistence (/32)
    /// timing out after `persistence_timeout_s`, or none.
    pub fn service(self, name: &str, port: u16, persistence_timeout_s: Option<u64>) -> Self {
        self.add_service(name, port, "tcp", persistence_timeout_s)
    }

    /// Like [`ConfigBuilder::service`], for UDP.
    pub fn udp_service(self, name: &str, port: u16, persistence_timeout_s: Option<u64>) -> Self {
        self.add_service(name, port, "udp", persistence_timeout_s)
    }

    fn add_service(
        mut self,
        name: &str,
        port: u16,
        protocol: &str,
        persistence_timeout_s: Option<u64>,
    ) -> Self {
        let mut svc = json!({
            "name": name,
            "vip": crate::netns::VIP.to_string(),
            "port": port,
            "protocol": protocol,
            "mode": "l4-dsr",
            "pool": "web",
        });
        if let Some(t) = persistence_timeout_s {
            let profile = format!("sticky-{name}");
            self.profiles.push(json!({
                "name": profile,
                "type": "client-ip",
                "timeout_s": t,
                "ipv4_prefix": 32,
                "ipv6_prefix": 128,
                "select_new_server_when_down": "immediate",
            }));
            svc["persistence"] = json!(profile);
        }
        self.services.push(svc);
        self
    }

    /// An L7 service (`mode` `l7`, served by tether's proxy) on VIP:`port` over pool `web`,
    /// with persistence profile `persistence` (add it with [`ConfigBuilder::profile`]) and
    /// the fields of `extra` (an object: `tls`, `limits`, ...) added.
    pub fn l7_service(
        mut self,
        name: &str,
        port: u16,
        persistence: Option<&str>,
        extra: Value,
    ) -> Self {
        let mut svc = json!({
            "name": name,
            "vip": crate::netns::VIP.to_string(),
            "port": port,
            "protocol": "tcp",
            "mode": "l7",
            "pool": "web",
        });
        if let Some(p) = persistence {
            svc["persistence"] = json!(p);
        }
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                svc[k] = v;
            }
        }
        self.services.push(svc);
        self
    }

    /// Adds a persistence profile (an object with at least `name` and `type`). Its
    /// `select_new_server_when_down` is [`ConfigBuilder::down_policy`]'s.
    pub fn profile(mut self, profile: Value) -> Self {
        self.profiles.push(profile);
        self
    }

    /// Sets a field of pool `web` (`algorithm`, ...); `null` removes an earlier setting.
    pub fn pool_field(mut self, field: &str, value: Value) -> Self {
        if value.is_null() {
            self.pool_fields.remove(field);
        } else {
            self.pool_fields.insert(field.to_string(), value);
        }
        self
    }

    /// `select_new_server_when_down` of every persistence profile: `immediate` (default) or
    /// `never`.
    pub fn down_policy(mut self, policy: &str) -> Self {
        self.down_policy = policy.into();
        self
    }

    /// The pool's `health_monitor` object (`{"type": "http", "port": 80, ...}`).
    pub fn health_monitor(mut self, monitor: Value) -> Self {
        self.health_monitor = Some(monitor);
        self
    }

    /// Sets a field of backend `name` in the pool (`weight`, `admin_state`, ...); `null`
    /// removes an earlier setting.
    pub fn backend_field(mut self, name: &str, field: &str, value: Value) -> Self {
        let fields = self.backend_fields.entry(name.to_string()).or_default();
        if value.is_null() {
            fields.remove(field);
        } else {
            fields.insert(field.to_string(), value);
        }
        self
    }

    /// Leaves backend `name` out of the pool.
    pub fn without_backend(mut self, name: &str) -> Self {
        self.backends.retain(|(n, _)| n != name);
        self
    }

    /// Top-level `admin_listen` (the daemon's default is 127.0.0.1:9180, inside the LB
    /// namespace).
    pub fn admin_listen(mut self, addr: &str) -> Self {
        self.admin_listen = Some(addr.into());
        self
    }

    /// The interface tether attaches to (another LB namespace's veth).
    pub fn interface(mut self, ifname: &str) -> Self {
        self.interface = ifname.into();
        self
    }

    /// The pin directory (and so the state directory next to it).
    pub fn pin_dir(mut self, dir: &Path) -> Self {
        self.pin_dir = Some(dir.to_path_buf());
        self
    }

    /// Sets a top-level field (`mirroring`, `gslb`, ...); `null` removes it.
    pub fn top_field(mut self, field: &str, value: Value) -> Self {
        if value.is_null() {
            self.top_fields.remove(field);
        } else {
            self.top_fields.insert(field.to_string(), value);
        }
        self
    }

    pub fn build(&self) -> Value {
        let profiles: Vec<Value> = self
            .profiles
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p["select_new_server_when_down"] = json!(self.down_policy);
                p
            })
            .collect();
        let backends: Vec<Value> = self
            .backends
            .iter()
            .map(|(n, a)| {
                let mut b = json!({ "name": n, "address": a.to_string(), "weight": 1 });
                if let Some(extra) = self.backend_fields.get(n) {
                    for (k, v) in extra {
                        b[k] = v.clone();
                    }
                }
                b
            })
            .collect();
        let mut pool = json!({ "name": "web", "backends": backends });
        if let Some(m) = &self.health_monitor {
            pool["health_monitor"] = m.clone();
        }
        for (k, v) in &self.pool_fields {
            pool[k] = v.clone();
        }
        let mut cfg = json!({
            "interface": self.interface,
            "virtual_services": self.services,
            "pools": [pool],
            "persistence_profiles": profiles,
        });
        if let Some(m) = &self.xdp_mode {
            cfg["xdp_mode"] = json!(m);
        }
        if let Some(d) = &self.pin_dir {
            cfg["pin_dir"] = json!(d.to_string_lossy());
            // A state directory of its own, next to its unique pin directory.
            cfg["state_dir"] = json!(state_dir_for(d).to_string_lossy());
        }
        if let Some(n) = self.persist_table_entries {
            cfg["persist_table_entries"] = json!(n);
        }
        if let Some(a) = &self.admin_listen {
            cfg["admin_listen"] = json!(a);
        }
        for (k, v) in &self.top_fields {
            cfg[k] = v.clone();
        }
        cfg
    }
}

#[derive(Default)]
struct Log {
    text: String,
}

impl Log {
    fn push_line(&mut self, line: &str) {
        if self.text.len() > MAX_LOG {
            let cut = self.text.len() / 2;
            let cut = self.text[cut..].find('\n').map_or(cut, |p| cut + p + 1);
            self.text
                .replace_range(..cut, "[... earlier output dropped ...]\n");
        }
        self.text.push_str(line);
        self.text.push('\n');
    }
}

/// A running `tether run` in a namespace.
pub struct Daemon {
    child: Option<Child>,
    /// After [`Daemon::restart`]: the daemon that took over, started by the one it replaced
    /// and reparented to this process (a child subreaper), which reaps it.
    adopted: Option<u32>,
    /// Daemons replaced by a restart, draining or exited (reaped on drop).
    retired: Vec<Child>,
    /// Adopted daemons replaced by a later restart, and their exit status once reaped.
    retired_pids: Vec<(u32, Option<ExitStatus>)>,
    bin: PathBuf,
    ns: String,
    admin: SocketAddr,
    /// The admin API's bearer token file (the daemon creates it on first start).
    token_file: PathBuf,
    pin_dir: PathBuf,
    config_path: PathBuf,
    log: Arc<Mutex<Log>>,
    readers: Vec<JoinHandle<()>>,
    keep_pins: bool,
}

impl Daemon {
    /// Writes `config` to a temporary file, starts the daemon in namespace `ns` and waits
    /// (up to [`READY_TIMEOUT`]) for `tether ready`. With `echo`, the daemon's output is also
    /// copied to this process's stderr as it arrives. A stale `pin_dir` is removed first.
    pub fn start(bin: &Path, ns: &str, config: &Value, echo: bool) -> Result<Daemon> {
        Self::spawn(bin, ns, config, echo, false)
    }

    /// Like [`Daemon::start`], but keeps the maps already pinned in the config's `pin_dir`
    /// (left by [`Daemon::stop_keep_pins`]): a restart.
    pub fn start_with_existing_pins(
        bin: &Path,
        ns: &str,
        config: &Value,
        echo: bool,
    ) -> Result<Daemon> {
        Self::spawn(bin, ns, config, echo, true)
    }

    fn spawn(bin: &Path, ns: &str, config: &Value, echo: bool, reuse_pins: bool) -> Result<Daemon> {
        // Without pin_dir the daemon uses its default.
        let pin_dir = PathBuf::from(
            config["pin_dir"]
                .as_str()
                .unwrap_or(lb_common::DEFAULT_PIN_DIR),
        );
        crate::netns::ensure_bpffs()?;
        if !reuse_pins && pin_dir.exists() {
            std::fs::remove_dir_all(&pin_dir)
                .with_context(|| format!("removing stale {}", pin_dir.display()))?;
        }
        // The state directory (cookie key, L7 tables' snapshot) lives and dies with the pins.
        let state_dir = state_dir_for(&pin_dir);
        if !reuse_pins && state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)
                .with_context(|| format!("removing stale {}", state_dir.display()))?;
        }
        let config_path = std::env::temp_dir().join(format!(
            "tether-{}-{}-config.json",
            std::process::id(),
            CONFIG_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let admin: SocketAddr = config["admin_listen"]
            .as_str()
            .unwrap_or(DEFAULT_ADMIN_LISTEN)
            .parse()
            .context("the config's admin_listen is not an address:port")?;
        let token_file = match config["admin_token_file"].as_str() {
            Some(f) => PathBuf::from(f),
            None => Path::new(config["state_dir"].as_str().unwrap_or(DEFAULT_STATE_DIR))
                .join("admin.token"),
        };
        let log = Arc::new(Mutex::new(Log::default()));
        let mut me = Daemon {
            child: None,
            adopted: None,
            retired: Vec::new(),
            retired_pids: Vec::new(),
            bin: bin.to_path_buf(),
            ns: ns.to_string(),
            admin,
            token_file,
            pin_dir,
            config_path,
            log: log.clone(),
            readers: Vec::new(),
            keep_pins: false,
        };

        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(bin)
            .arg("run")
            .arg("--config")
            .arg(&me.config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Own process group: a terminal's Ctrl-C reaches the demo, which stops the daemon in
        // order, and not the daemon directly.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // If this thread dies without dropping us (test killed, demo SIGKILLed), the daemon
        // gets SIGTERM and detaches XDP itself. (Keep a Daemon on the thread that started it.)
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;

        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped"));
        me.child = Some(child);
        for (stream, label) in [(out, "stdout"), (err, "stderr")] {
            let (log, tx) = (log.clone(), ready_tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("tether-{label}"))
                .spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        if echo {
                            eprintln!("[tether] {line}");
                        }
                        if line.contains("tether ready") {
                            let _ = tx.send(());
                        }
                        log.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_line(&line);
                    }
                })
                .context("spawning a log reader")?;
            me.readers.push(h);
        }
        drop(ready_tx);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(me),
                Err(mpsc::RecvTimeoutError::Timeout)
                | Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Some(status) = me.child.as_mut().expect("set").try_wait()? {
                me.child = None;
                me.join_readers();
                bail!(
                    "tether exited with {status} before `tether ready` (config {}):\n{}",
                    serde_json::to_string_pretty(config)?,
                    me.logs()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "tether did not print `tether ready` within {}s; output so far:\n{}",
                    READY_TIMEOUT.as_secs(),
                    me.logs()
                );
            }
        }
    }

    /// Where the daemon pins its maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The daemon's output so far (stdout and stderr interleaved by line).
    pub fn logs(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .text
            .clone()
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.adopted.or(self.child.as_ref().map(|c| c.id()))
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        if let Some(pid) = self.adopted {
            return reap(pid).is_none();
        }
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `tether restart --config FILE`, run in the daemon's namespace the way it was started:
    /// the running daemon starts a new one that takes its sockets over, then drains and
    /// exits. From here on this handle follows the new daemon. Returns the CLI's output.
    pub fn restart(&mut self) -> Result<String> {
        if self.pid().is_none() {
            bail!("tether is not running; output:\n{}", self.logs());
        }
        // The new daemon is the old one's child: once the old one exits, it is ours.
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            bail!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            );
        }
        let config = self.config_path.to_string_lossy().into_owned();
        let out = self.cli(&["restart", "--config", &config])?;
        let pid: u32 = out
            .split_whitespace()
            .skip_while(|w| *w != "pid")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no new pid in the output of tether restart: {out:?}"))?;
        if let Some(old) = self.adopted.replace(pid) {
            // An earlier restart's daemon: it drains and exits like a child would.
            self.retired_pids.push((old, None));
        }
        if let Some(child) = self.child.take() {
            self.retired.push(child);
        }
        Ok(out)
    }

    /// Waits (up to `timeout`) until every daemon replaced by a restart has exited; fails
    /// unless each exited with status 0.
    pub fn wait_retired(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for child in &mut self.retired {
            let status = loop {
                if let Some(s) = child.try_wait()? {
                    break s;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "the replaced tether (pid {}) still runs after {timeout:?}",
                        child.id()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !status.success() {
                bail!(
                    "the replaced tether (pid {}) exited with {status}",
                    child.id()
                );
            }
        }
        for (pid, reaped) in &mut self.retired_pids {
            let status = loop {
                if let Some(s) = reaped.or_else(|| reap(*pid)) {
                    *reaped = Some(s);
                    break s;
                }
                if Instant::now() >= deadline {
                    bail!("the replaced tether (pid {pid}) still runs after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !status.success() {
                bail!("the replaced tether (pid {pid}) exited with {status}");
            }
        }
        Ok(())
    }

    /// The namespace the daemon runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The config file the daemon was started with (and rereads on SIGHUP).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The admin API address (inside the daemon's namespace).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Replaces the config file (atomically: write and rename) without signalling the daemon.
    pub fn write_config(&self, config: &Value) -> Result<()> {
        self.write_config_text(&serde_json::to_string_pretty(config)?)
    }

    /// Replaces the config file with `text` (which need not be valid).
    pub fn write_config_text(&self, text: &str) -> Result<()> {
        let tmp = self.config_path.with_extension("json.new");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.config_path)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        Ok(())
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("tether is not running; output:\n{}", self.logs());
        };
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs tether, so it is
        // tether), or on the daemon a restart started.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Lines of the output so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Waits (up to `timeout`) until more than `seen` output lines contain `needle`; returns
    /// the newest such line.
    pub fn wait_for_log(&self, needle: &str, seen: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines(needle);
            if lines.len() > seen {
                return lines.last().cloned();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP, then waits (up to [`RELOAD_TIMEOUT`]) for the daemon to log the outcome: the
    /// `reloaded ...` or `reload refused ...` line.
    pub fn reload(&self) -> Result<Reload> {
        const APPLIED: &str = "reloaded ";
        const REFUSED: &str = "reload refused";
        let (applied, refused) = (self.log_lines(APPLIED).len(), self.log_lines(REFUSED).len());
        self.signal(libc::SIGHUP)?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            let a = self.log_lines(APPLIED);
            if a.len() > applied {
                return Ok(Reload::Applied(a.last().cloned().unwrap_or_default()));
            }
            let r = self.log_lines(REFUSED);
            if r.len() > refused {
                return Ok(Reload::Refused(r.last().cloned().unwrap_or_default()));
            }
            if self.pid().is_none() {
                bail!("tether is gone; output:\n{}", self.logs());
            }
            if Instant::now() >= deadline {
                bail!(
                    "tether logged neither `reloaded` nor `reload refused` within {}s of SIGHUP; output:\n{}",
                    RELOAD_TIMEOUT.as_secs(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to `timeout`) for the daemon to exit by itself (someone else signalled
    /// it, e.g. `tether stop`), reaping it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = if let Some(pid) = self.adopted {
            loop {
                if let Some(s) = reap(pid) {
                    break s;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "tether did not exit within {}s; output:\n{}",
                        timeout.as_secs(),
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            let Some(child) = self.child.as_mut() else {
                bail!("tether is not running; output:\n{}", self.logs());
            };
            loop {
                if let Some(s) = child.try_wait()? {
                    break s;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "tether did not exit within {}s; output:\n{}",
                        timeout.as_secs(),
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        self.adopted = None;
        self.child = None;
        self.end_retired();
        self.join_readers();
        Ok(status)
    }

    /// Kills what is left of replaced daemons (they hold the output pipes) and reaps them.
    fn end_retired(&mut self) {
        for mut c in self.retired.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (pid, reaped) in self.retired_pids.drain(..) {
            if reaped.is_none() {
                kill_and_reap(pid);
            }
        }
    }

    /// Runs `tether --netns NS ARGS` (the same binary) from the host; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        tether_cli(&self.bin, &self.ns, args)
    }

    /// One request to the admin API over TCP, made from the daemon's namespace, with the
    /// bearer token from the daemon's token file.
    pub fn admin(&self, method: &str, path: &str) -> Result<AdminReply> {
        let token = self.admin_token()?;
        let auth = format!("Bearer {token}");
        admin_request_with(
            &self.ns,
            self.admin,
            method,
            path,
            &[("Authorization", auth.as_str())],
        )
    }

    /// The admin API's bearer token, as the daemon stored it.
    pub fn admin_token(&self) -> Result<String> {
        Ok(std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading the admin token {}", self.token_file.display()))?
            .trim()
            .to_string())
    }

    /// The admin token file.
    pub fn admin_token_file(&self) -> &Path {
        &self.token_file
    }

    /// `GET path` on the admin API; fails unless the answer is 200 with a JSON body.
    pub fn admin_json(&self, path: &str) -> Result<Value> {
        let r = self.admin("GET", path)?;
        if r.status != 200 {
            bail!("GET {path}: status {}: {}", r.status, r.body);
        }
        serde_json::from_str(&r.body).with_context(|| format!("GET {path}: not JSON: {}", r.body))
    }

    /// `GET /metrics`; fails unless the answer is 200.
    pub fn metrics(&self) -> Result<String> {
        let r = self.admin("GET", "/metrics")?;
        if r.status != 200 {
            bail!("GET /metrics: status {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// SIGTERM, then wait for exit (up to [`STOP_TIMEOUT`]). Fails unless it exits with 0
    /// after logging `tether stopped`. The pin directory is removed afterwards (on drop).
    pub fn stop(mut self) -> Result<String> {
        self.terminate()
    }

    /// Like [`Daemon::stop`], but leaves the pinned maps for a next daemon to reuse.
    pub fn stop_keep_pins(mut self) -> Result<String> {
        self.keep_pins = true;
        self.terminate()
    }

    /// `kill -9` (a crash: no cleanup runs), reaped; the pinned maps are left for a next
    /// daemon. Returns the output so far.
    pub fn kill_keep_pins(mut self) -> Result<String> {
        self.keep_pins = true;
        let Some(pid) = self.pid() else {
            bail!("tether is not running; output:\n{}", self.logs());
        };
        // SAFETY: kill(2) on our own child's (or adopted daemon's) pid.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let status = self.wait_exit(STOP_TIMEOUT)?;
        if status.code().is_some() {
            bail!(
                "tether exited with {status} before SIGKILL; output:\n{}",
                self.logs()
            );
        }
        Ok(self.logs())
    }

    /// The daemon's state directory (see [`state_dir_for`]).
    pub fn state_dir(&self) -> PathBuf {
        state_dir_for(&self.pin_dir)
    }

    fn terminate(&mut self) -> Result<String> {
        let Some(pid) = self.pid() else {
            bail!("tether is not running; output:\n{}", self.logs());
        };
        if !self.is_running() {
            let _ = self.wait_exit(Duration::ZERO);
            bail!("tether had already exited; output:\n{}", self.logs());
        }
        // A daemon replaced by a restart said it too: this one must add its own line.
        let stopped_before = self.log_lines("tether stopped").len();
        // SAFETY: kill(2) on our own child's (or adopted daemon's) pid.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let status = match self.wait_exit(STOP_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                self.kill_all();
                bail!("{e:#} (killed after SIGTERM)");
            }
        };
        let logs = self.logs();
        if !status.success() {
            bail!("tether exited with {status} after SIGTERM; output:\n{logs}");
        }
        if self.log_lines("tether stopped").len() <= stopped_before {
            bail!("tether exited without logging `tether stopped`; output:\n{logs}");
        }
        Ok(logs)
    }

    fn kill_all(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.adopted.take() {
            kill_and_reap(pid);
        }
        self.end_retired();
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

/// The daemon's `state_dir` for a test's unique `pin_dir`: unique too, so no test reads
/// another's cookie key or L7 tables.
pub fn state_dir_for(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or_else(|| "tether".into(), |n| n.to_string_lossy().into_owned());
    std::env::temp_dir().join(format!("{name}-state"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_file(&self.config_path);
        if !self.keep_pins
            && self.pin_dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.pin_dir)
        {
            eprintln!("warning: removing {}: {e}", self.pin_dir.display());
        }
        let state_dir = state_dir_for(&self.pin_dir);
        if !self.keep_pins && state_dir.exists() {
            let _ = std::fs::remove_dir_all(&state_dir);
        }
    }
}

/// Outcome of [`Daemon::reload`], with the line the daemon logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    Applied(String),
    Refused(String),
}

/// The exit status of child `pid` if it has exited (reaping it); `None` while it runs. For
/// a pid that is not our child (already reaped), only whether it is gone is known: gone
/// counts as status 0.
fn reap(pid: u32) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt as _;
    let mut status = 0;
    // SAFETY: waitpid on one pid with a valid status pointer.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    if r == pid as libc::pid_t {
        return Some(ExitStatus::from_raw(status));
    }
    // Not our child (no subreaper in between): all we can tell is whether it is gone.
    // SAFETY: kill with signal 0 only checks the process.
    if r < 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return Some(ExitStatus::from_raw(0));
    }
    None
}

fn kill_and_reap(pid: u32) {
    // SAFETY: SIGKILL to a daemon this harness started (directly or through a restart).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while reap(pid).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `bin --netns ns ARGS` from the host (tether enters the namespace itself, as users
/// run it); returns its stdout, or fails with its status and stderr.
pub fn tether_cli(bin: &Path, ns: &str, args: &[&str]) -> Result<String> {
    run_cmd(
        Command::new(bin)
            .args(["--netns", ns])
            .args(args)
            .env("RUST_LOG", "warn"),
    )
}

/// An admin API answer.
#[derive(Clone, Debug)]
pub struct AdminReply {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request (`Connection: close`, `Host: addr`, no credential) to `addr` from a
/// thread in namespace `ns`.
pub fn admin_request(ns: &str, addr: SocketAddr, method: &str, path: &str) -> Result<AdminReply> {
    admin_request_with(ns, addr, method, path, &[])
}

/// Like [`admin_request`], with extra header lines.
pub fn admin_request_with(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<AdminReply> {
    let (method, path) = (method.to_string(), path.to_string());
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let raw = run_in_netns(ns, move || -> Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, ADMIN_TIMEOUT)
            .with_context(|| format!("connecting to the admin API at {addr}"))?;
        s.set_read_timeout(Some(ADMIN_TIMEOUT))?;
        s.set_write_timeout(Some(ADMIN_TIMEOUT))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.take(64 << 20)
            .read_to_end(&mut raw)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        Ok(raw)
    })??;
    parse_admin_reply(&raw)
}

fn parse_admin_reply(raw: &[u8]) -> Result<AdminReply> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed admin API answer: {text:?}");
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let head_lc = head.to_ascii_lowercase();
    let body = if head_lc.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest
                .split_once("\r\n")
                .with_context(|| format!("bad chunked body: {body:?}"))?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size in {body:?}"))?;
            if size == 0 {
                break;
            }
            out.push_str(after.get(..size).context("short chunk")?);
            rest = after.get(size + 2..).context("short chunk")?;
        }
        out
    } else {
        body.to_string()
    };
    Ok(AdminReply { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_admin_replies() {
        let r = parse_admin_reply(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n{}\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}\n"));
        let r = parse_admin_reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "abcde");
        let r = parse_admin_reply(b"HTTP/1.1 404 Not Found\r\n\r\nno such path /x\n").unwrap();
        assert_eq!(r.status, 404);
        assert!(parse_admin_reply(b"garbage").is_err());
    }
}

/// The value of the first sample of `name` in Prometheus text whose labels include every
/// `labels` pair (`None` when there is none).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let (metric, label_text) = key
            .split_once('{')
            .map_or((key, ""), |(m, rest)| (m, rest.trim_end_matches('}')));
        if metric != name {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod metric_tests {
    use super::metric_value;

    #[test]
    fn finds_samples_by_name_and_labels() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{service=\"web\",reason=\"tampered\"} 3\na_total{service=\"web\",reason=\"expired\"} 1\nplain 7\n";
        assert_eq!(
            metric_value(text, "a_total", &[("reason", "expired")]),
            Some(1.0)
        );
        assert_eq!(
            metric_value(
                text,
                "a_total",
                &[("service", "web"), ("reason", "tampered")]
            ),
            Some(3.0)
        );
        assert_eq!(metric_value(text, "a_total", &[("service", "api")]), None);
        assert_eq!(metric_value(text, "plain", &[]), Some(7.0));
        assert_eq!(metric_value(text, "a", &[]), None, "a prefix is not a name");
    }
}
