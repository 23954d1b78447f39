//! Running the real `tether` daemon inside a topology's LB namespace.
//!
//! The daemon is started with `nsenter --net=/run/netns/<lb-ns> -- $TETHER_BIN run --config
//! FILE` (not `ip netns exec`, which remounts /sys and would hide the host's bpffs pins). Its
//! output is captured; `start` returns once it prints `tether ready`. Dropping a [`Daemon`]
//! kills it if still running and removes its config file and pin directory.

use std::{
    io::{BufRead as _, BufReader, Read},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::netns::{Topology, netns_path};

/// Environment variable with the daemon binary's path (set by `cargo xtask test|run`).
pub const TETHER_BIN_ENV: &str = "TETHER_BIN";
/// How long `start` waits for `tether ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the daemon to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
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
/// (`b1`.. at their addresses, weight 1), services added with [`ConfigBuilder::service`].
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    interface: String,
    pin_dir: PathBuf,
    xdp_mode: String,
    persist_table_entries: u32,
    backends: Vec<(String, Ipv4Addr)>,
    services: Vec<Value>,
    profiles: Vec<Value>,
}

impl ConfigBuilder {
    /// Defaults: xdp_mode `native`, 65536 persistence entries.
    pub fn new(topo: &Topology, pin_dir: &Path) -> ConfigBuilder {
        ConfigBuilder {
            interface: topo.lb.ifname.clone(),
            pin_dir: pin_dir.to_path_buf(),
            xdp_mode: "native".into(),
            persist_table_entries: 65536,
            backends: topo
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| (topo.backend_name(i), b.addr))
                .collect(),
            services: Vec::new(),
            profiles: Vec::new(),
        }
    }

    /// `auto`, `native` or `generic`.
    pub fn xdp_mode(mut self, mode: &str) -> Self {
        self.xdp_mode = mode.into();
        self
    }

    pub fn persist_table_entries(mut self, n: u32) -> Self {
        self.persist_table_entries = n;
        self
    }

    /// A TCP L4 DSR service on VIP:`port` over pool `web`, with client-IP persistence (/32)
    /// timing out after `persistence_timeout_s`, or none.
    pub fn service(mut self, name: &str, port: u16, persistence_timeout_s: Option<u64>) -> Self {
        let mut svc = json!({
            "name": name,
            "vip": crate::netns::VIP.to_string(),
            "port": port,
            "protocol": "tcp",
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

    pub fn build(&self) -> Value {
        json!({
            "interface": self.interface,
            "xdp_mode": self.xdp_mode,
            "pin_dir": self.pin_dir.to_string_lossy(),
            "persist_table_entries": self.persist_table_entries,
            "virtual_services": self.services,
            "pools": [{
                "name": "web",
                "backends": self.backends.iter().map(|(n, a)| json!({
                    "name": n, "address": a.to_string(), "weight": 1,
                })).collect::<Vec<_>>(),
            }],
            "persistence_profiles": self.profiles,
        })
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
        let pin_dir = PathBuf::from(
            config["pin_dir"]
                .as_str()
                .context("the config must set pin_dir (tests must use a unique one)")?,
        );
        crate::netns::ensure_bpffs()?;
        if !reuse_pins && pin_dir.exists() {
            std::fs::remove_dir_all(&pin_dir)
                .with_context(|| format!("removing stale {}", pin_dir.display()))?;
        }
        let config_path = std::env::temp_dir().join(format!(
            "tether-{}-{}-config.json",
            std::process::id(),
            CONFIG_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let log = Arc::new(Mutex::new(Log::default()));
        let mut me = Daemon {
            child: None,
            pin_dir,
            config_path,
            log: log.clone(),
            readers: Vec::new(),
            keep_pins: false,
        };

        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(ns).display()))
            .arg("--")
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
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
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

    fn terminate(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            bail!("tether is not running; output:\n{}", self.logs());
        };
        if let Some(status) = child.try_wait()? {
            self.join_readers();
            bail!(
                "tether had already exited with {status}; output:\n{}",
                self.logs()
            );
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.join_readers();
                bail!(
                    "tether did not exit within {}s of SIGTERM (killed); output:\n{}",
                    STOP_TIMEOUT.as_secs(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.join_readers();
        let logs = self.logs();
        if !status.success() {
            bail!("tether exited with {status} after SIGTERM; output:\n{logs}");
        }
        if !logs.contains("tether stopped") {
            bail!("tether exited without logging `tether stopped`; output:\n{logs}");
        }
        Ok(logs)
    }

    fn join_readers(&mut self) {
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_readers();
        let _ = std::fs::remove_file(&self.config_path);
        if !self.keep_pins
            && self.pin_dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.pin_dir)
        {
            eprintln!("warning: removing {}: {e}", self.pin_dir.display());
        }
    }
}
