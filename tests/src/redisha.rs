//! Redis deployments for availability, for the mirroring tests: a master, a replica and a
//! Sentinel watching them (quorum 1), each a real `redis-server` (Debian's package; the
//! sentinel is `redis-server <conf> --sentinel`) on its own port of [`LB_ADDR`] in the first
//! LB namespace. No persistence: a server that dies loses what it held.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{LB_ADDR, wait_until};

/// The master's name in the sentinel's config.
pub const MASTER_NAME: &str = "mymaster";
pub const MASTER_PORT: u16 = 6381;
pub const REPLICA_PORT: u16 = 6382;
pub const SENTINEL_PORT: u16 = 26379;

/// One `redis-server` process (a server or a sentinel) in a namespace.
pub struct RedisProc {
    ns: String,
    pub port: u16,
    child: Option<Child>,
}

impl RedisProc {
    /// Starts `redis-server <args> --bind LB_ADDR --port <port>` in `ns` and waits (10 s at
    /// most) until it answers PING.
    pub fn start(ns: &str, port: u16, args: &[&str]) -> Result<RedisProc> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "redis-server"])
            .args(args)
            .args(["--bind", &LB_ADDR.to_string(), "--port", &port.to_string()])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server; cargo xtask test installs it)")?;
        let p = RedisProc {
            ns: ns.to_string(),
            port,
            child: Some(child),
        };
        if !wait_until(Duration::from_secs(10), || {
            p.cli(&["ping"]).is_ok_and(|o| o.trim() == "PONG")
        }) {
            bail!("redis-server on port {port} in {ns} did not answer PING within 10 s");
        }
        Ok(p)
    }

    /// `redis-cli` against this process, its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "redis-cli", "-h"])
            .arg(LB_ADDR.to_string())
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli")?;
        if !out.status.success() {
            bail!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Number of keys held.
    pub fn dbsize(&self) -> u64 {
        self.cli(&["dbsize"])
            .ok()
            .and_then(|o| o.trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, its replica and one sentinel (quorum 1, a master down after 1 s): killing the
/// master promotes the replica within seconds. Fields drop in order: the sentinel first (so
/// it promotes nothing while the rest stops), then the servers, then the config directory.
pub struct SentinelSet {
    pub sentinel: RedisProc,
    pub master: RedisProc,
    pub replica: RedisProc,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl SentinelSet {
    /// Starts the three in `ns` (`name` names the config directory under the temp dir) and
    /// waits until the sentinel sees the replica linked to the master, so that a failover
    /// can pick it.
    pub fn start(ns: &str, name: &str) -> Result<SentinelSet> {
        let dir = TempDir(std::env::temp_dir().join(format!("{name}-sentinel")));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).context("creating the sentinel's directory")?;
        let no_disk = ["--save", "", "--appendonly", "no"];
        let master = RedisProc::start(ns, MASTER_PORT, &no_disk)?;
        let replica_of = format!("{LB_ADDR} {MASTER_PORT}");
        // Writable, so a test can make it lag behind the master (`lag_replica`).
        let mut args = no_disk.to_vec();
        args.extend(["--replicaof", &replica_of, "--replica-read-only", "no"]);
        let replica = RedisProc::start(ns, REPLICA_PORT, &args)?;
        // The sentinel rewrites its config file: it lives in the test's directory.
        let conf = dir.0.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {MASTER_NAME} {LB_ADDR} {MASTER_PORT} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n"
            ),
        )
        .context("writing sentinel.conf")?;
        let conf = conf.to_string_lossy().into_owned();
        let sentinel = RedisProc::start(ns, SENTINEL_PORT, &[&conf, "--sentinel"])?;
        let set = SentinelSet {
            sentinel,
            master,
            replica,
            _dir: dir,
        };
        let linked = wait_until(Duration::from_secs(30), || {
            set.sentinel
                .cli(&["sentinel", "replicas", MASTER_NAME])
                .is_ok_and(|o| {
                    let words: Vec<&str> = o.split_whitespace().collect();
                    words
                        .windows(2)
                        .any(|w| w[0] == "master-link-status" && w[1] == "ok")
                        && words.contains(&REPLICA_PORT.to_string().as_str())
                })
        });
        if !linked {
            bail!(
                "the sentinel did not see the replica linked within 30 s: {}",
                set.sentinel
                    .cli(&["sentinel", "replicas", MASTER_NAME])
                    .unwrap_or_default()
            );
        }
        Ok(set)
    }

    /// The sentinel's URL, for `mirroring.sentinel.nodes`.
    pub fn sentinel_url(&self) -> String {
        format!("redis://{LB_ADDR}:{SENTINEL_PORT}")
    }

    /// The port of the server the sentinel names master now.
    pub fn master_port(&self) -> Option<u16> {
        let o = self
            .sentinel
            .cli(&["sentinel", "get-master-addr-by-name", MASTER_NAME])
            .ok()?;
        o.lines().nth(1)?.trim().parse().ok()
    }

    /// Kills the master (SIGKILL) and waits (30 s at most) until the sentinel has promoted
    /// the replica and the replica says it is master.
    pub fn fail_over(&mut self) -> Result<()> {
        self.master.kill();
        let promoted = wait_until(Duration::from_secs(30), || {
            self.master_port() == Some(REPLICA_PORT)
                && self
                    .replica
                    .cli(&["role"])
                    .is_ok_and(|o| o.lines().next() == Some("master"))
        });
        if !promoted {
            bail!(
                "the sentinel did not promote the replica within 30 s (master now {:?})",
                self.master_port()
            );
        }
        Ok(())
    }
}
