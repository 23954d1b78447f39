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

/// Two servers, one master and its replica, and one sentinel (quorum 1, a master down
/// after 1 s): killing the master promotes the replica within seconds, and `SENTINEL
/// FAILOVER` swaps them. Fields drop in order: the sentinel first (so it promotes nothing
/// while the rest stops), then the servers, then the config directory.
pub struct SentinelSet {
    pub sentinel: RedisProc,
    /// On [`MASTER_PORT`] (master at first) and [`REPLICA_PORT`].
    pub servers: [RedisProc; 2],
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
        // Writable even as a replica, so a test can make one lag behind its master.
        let args = [
            "--save",
            "",
            "--appendonly",
            "no",
            "--replica-read-only",
            "no",
        ];
        // A replica writes the master's snapshot to its directory (and a server loads what
        // it finds there at start): each server gets its own, in the test's directory.
        let server_dir = |port: u16| -> Result<String> {
            let d = dir.0.join(port.to_string());
            std::fs::create_dir_all(&d).context("creating a server's directory")?;
            Ok(d.to_string_lossy().into_owned())
        };
        let (master_dir, replica_dir) = (server_dir(MASTER_PORT)?, server_dir(REPLICA_PORT)?);
        let mut master_args = args.to_vec();
        master_args.extend(["--dir", &master_dir]);
        let master = RedisProc::start(ns, MASTER_PORT, &master_args)?;
        let replica_of = format!("{LB_ADDR} {MASTER_PORT}");
        let mut replica_args = args.to_vec();
        replica_args.extend(["--dir", &replica_dir, "--replicaof", &replica_of]);
        let replica = RedisProc::start(ns, REPLICA_PORT, &replica_args)?;
        // The sentinel rewrites its config file: it lives in the test's directory.
        let conf = dir.0.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {MASTER_NAME} {LB_ADDR} {MASTER_PORT} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 3000\n"
            ),
        )
        .context("writing sentinel.conf")?;
        let conf = conf.to_string_lossy().into_owned();
        let sentinel_dir = dir.0.to_string_lossy().into_owned();
        let sentinel = RedisProc::start(
            ns,
            SENTINEL_PORT,
            &[&conf, "--sentinel", "--dir", &sentinel_dir],
        )?;
        let set = SentinelSet {
            sentinel,
            servers: [master, replica],
            _dir: dir,
        };
        set.wait_linked(REPLICA_PORT)?;
        Ok(set)
    }

    /// Waits (30 s at most) until the sentinel lists the server on `port` as a replica
    /// whose link to the master is up: a failover can pick it.
    fn wait_linked(&self, port: u16) -> Result<()> {
        let linked = wait_until(Duration::from_secs(30), || {
            self.sentinel
                .cli(&["sentinel", "replicas", MASTER_NAME])
                .is_ok_and(|o| {
                    // One replica at most: its fields are "name value" lines.
                    let words: Vec<&str> = o.split_whitespace().collect();
                    words
                        .windows(2)
                        .any(|w| w[0] == "master-link-status" && w[1] == "ok")
                        && words
                            .windows(2)
                            .any(|w| w[0] == "port" && w[1] == port.to_string())
                })
        });
        if !linked {
            bail!(
                "the sentinel did not see the replica on port {port} linked within 30 s: {}",
                self.sentinel
                    .cli(&["sentinel", "replicas", MASTER_NAME])
                    .unwrap_or_default()
            );
        }
        Ok(())
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

    /// The server on `port`.
    pub fn server(&self, port: u16) -> &RedisProc {
        self.servers
            .iter()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no server on port {port}"))
    }

    fn other(port: u16) -> u16 {
        if port == MASTER_PORT {
            REPLICA_PORT
        } else {
            MASTER_PORT
        }
    }

    /// Waits (30 s at most) until the sentinel names the server on `port` master and that
    /// server says it is.
    fn wait_master(&self, port: u16) -> Result<()> {
        let promoted = wait_until(Duration::from_secs(30), || {
            self.master_port() == Some(port)
                && self
                    .server(port)
                    .cli(&["role"])
                    .is_ok_and(|o| o.lines().next() == Some("master"))
        });
        if !promoted {
            bail!(
                "the sentinel did not promote the server on port {port} within 30 s (master now {:?})",
                self.master_port()
            );
        }
        Ok(())
    }

    /// A planned switchover (`SENTINEL FAILOVER`, both servers up): the replica becomes
    /// master, the old master its replica (the sentinel disconnects the old master's
    /// clients as it demotes it). Returns the new master's port once the demoted server
    /// is linked to it.
    pub fn switch_over(&self) -> Result<u16> {
        let old = self.master_port().context("no master named")?;
        let new = Self::other(old);
        self.sentinel
            .cli(&["sentinel", "failover", MASTER_NAME])
            .context("SENTINEL FAILOVER")?;
        self.wait_master(new)?;
        self.wait_linked(old)?;
        Ok(new)
    }

    /// Kills the master (SIGKILL) and waits until the sentinel has promoted the replica;
    /// returns its port.
    pub fn crash_master(&mut self) -> Result<u16> {
        let old = self.master_port().context("no master named")?;
        let new = Self::other(old);
        self.servers
            .iter_mut()
            .find(|s| s.port == old)
            .expect("the master's server")
            .kill();
        self.wait_master(new)?;
        Ok(new)
    }
}

/// The ports of the [`ClusterSet`]'s nodes (their bus ports are 10000 above).
pub const CLUSTER_PORTS: [u16; 3] = [7001, 7002, 7003];

/// A Redis Cluster of three masters (no replicas), each a `redis-server --cluster-enabled
/// yes` on one of [`CLUSTER_PORTS`], the slots split between them by `redis-cli --cluster
/// create`. Fields drop in order: the nodes, then their directory.
pub struct ClusterSet {
    pub nodes: Vec<RedisProc>,
    _dir: TempDir,
}

impl ClusterSet {
    /// Starts the nodes in `ns` (`name` names their directory under the temp dir), creates
    /// the cluster and waits until every node says `cluster_state:ok`.
    pub fn start(ns: &str, name: &str) -> Result<ClusterSet> {
        let dir = TempDir(std::env::temp_dir().join(format!("{name}-cluster")));
        let _ = std::fs::remove_dir_all(&dir.0);
        let mut nodes = Vec::new();
        for port in CLUSTER_PORTS {
            // Each node keeps its cluster state file (and nothing else) in its own directory.
            let d = dir.0.join(port.to_string());
            std::fs::create_dir_all(&d).context("creating a cluster node's directory")?;
            let d = d.to_string_lossy().into_owned();
            nodes.push(RedisProc::start(
                ns,
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--dir",
                    &d,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
            )?);
        }
        let set = ClusterSet { nodes, _dir: dir };
        let addrs: Vec<String> = CLUSTER_PORTS
            .iter()
            .map(|p| format!("{LB_ADDR}:{p}"))
            .collect();
        let out = Command::new("timeout")
            .args([
                "30",
                "ip",
                "netns",
                "exec",
                ns,
                "redis-cli",
                "--cluster",
                "create",
            ])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ok = wait_until(Duration::from_secs(30), || {
            set.nodes.iter().all(|n| {
                n.cli(&["cluster", "info"])
                    .is_ok_and(|o| o.lines().any(|l| l.trim() == "cluster_state:ok"))
            })
        });
        if !ok {
            bail!("the cluster did not reach cluster_state:ok within 30 s");
        }
        Ok(set)
    }

    /// The nodes' URLs, for `mirroring.cluster.nodes`, starting with the node `first`.
    pub fn urls(&self, first: usize) -> Vec<String> {
        let n = CLUSTER_PORTS.len();
        (0..n)
            .map(|i| format!("redis://{LB_ADDR}:{}", CLUSTER_PORTS[(first + i) % n]))
            .collect()
    }
}
