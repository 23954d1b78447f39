//! Several tether instances behind one client (scale-out behind ECMP, anycast or DNS): one
//! LB namespace per instance on the same segment, each with the VIP, the same config but
//! its interface and pins, and a copy of the first instance's generated cookie key (as an
//! operator copies `state_dir/cookie-key`). The client is steered to one instance at a time
//! ([`Topology::steer_client`]). Optionally a real `redis-server` for mirroring, in the
//! first LB's namespace on its own address.

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, time::Duration};

use anyhow::Result;
use serde_json::json;

use crate::{
    daemon::{ConfigBuilder, Daemon, metric_value, state_dir_for, tether_bin},
    http::{BackendServers, HttpResponse, Reply},
    l7lab::{IO_TIMEOUT, PORT},
    netns::{LB_ADDR, Topology, wait_until},
    redisha::RedisProc,
};

/// The port of the tests' Redis (inside the first LB's namespace only).
pub const REDIS_PORT: u16 = 6380;
/// Instance names in the `mirroring` config: `lb-a`, `lb-b`, ...
pub fn instance_name(i: usize) -> String {
    format!("lb-{}", (b'a' + i as u8) as char)
}

/// A `redis-server` (Debian's package) in a namespace: no persistence (`--save ''
/// --appendonly no`), so a restart starts empty, as after losing the server.
pub struct RedisServer {
    ns: String,
    proc: RedisProc,
}

impl RedisServer {
    const ARGS: [&str; 4] = ["--save", "", "--appendonly", "no"];

    pub fn start(ns: &str) -> Result<RedisServer> {
        Ok(RedisServer {
            ns: ns.to_string(),
            proc: RedisProc::start(ns, REDIS_PORT, &Self::ARGS)?,
        })
    }

    pub fn url() -> String {
        format!("redis://{LB_ADDR}:{REDIS_PORT}")
    }

    /// `redis-cli` in the namespace, its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        self.proc.cli(args)
    }

    /// Number of keys Redis holds.
    pub fn dbsize(&self) -> u64 {
        self.proc.dbsize()
    }

    /// SIGKILL, as a crash: everything it held is gone.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Kill and start again, empty.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = RedisProc::start(&self.ns, REDIS_PORT, &Self::ARGS)?;
        Ok(())
    }
}

/// The instances, backends, namespaces and Redis of one test. Fields drop in order: the
/// daemons, Redis, the backends, the namespaces.
pub struct Fleet {
    pub daemons: Vec<Option<Daemon>>,
    pub redis: Option<RedisServer>,
    pub servers: BackendServers,
    pub topo: Topology,
    /// Instance `i`'s config.
    pub builders: Vec<ConfigBuilder>,
}

impl Fleet {
    /// `instances` LB namespaces (none running yet), `backends` echo backends on [`PORT`],
    /// `clients` source addresses; with `redis`, a Redis server and a `mirroring` section in
    /// every instance's config. `configure(i, builder)` adds instance `i`'s services and
    /// profiles (the same for every instance, unless the test models sites).
    pub fn new(
        clients: usize,
        backends: usize,
        instances: usize,
        redis: bool,
        configure: impl Fn(usize, ConfigBuilder) -> ConfigBuilder,
    ) -> Fleet {
        let topo = Topology::builder()
            .client_addrs(clients)
            .backends(backends)
            .extra_lbs(instances - 1)
            .build()
            .unwrap_or_else(|e| panic!("building the namespace topology: {e:#}"));
        let servers = BackendServers::start_with(&topo, PORT, Reply::Echo)
            .unwrap_or_else(|e| panic!("starting backend servers: {e:#}"));
        let redis = redis.then(|| {
            RedisServer::start(&topo.lb.ns).unwrap_or_else(|e| panic!("starting Redis: {e:#}"))
        });
        let builders = (0..instances)
            .map(|i| {
                let mut b = ConfigBuilder::new(&topo, &topo.pin_dir(&format!("pins{i}")))
                    .user_defaults_own_pins()
                    .interface(&topo.lb_node(i).ifname);
                for n in 0..topo.backends.len() {
                    b = b.backend_field(&topo.backend_name(n), "port", json!(PORT));
                }
                if redis.is_some() {
                    b = b.top_field(
                        "mirroring",
                        json!({"redis": RedisServer::url(), "instance": instance_name(i)}),
                    );
                }
                configure(i, b)
            })
            .collect();
        Fleet {
            daemons: (0..instances).map(|_| None).collect(),
            redis,
            servers,
            topo,
            builders,
        }
    }

    fn state_dir(&self, i: usize) -> PathBuf {
        let cfg = self.builders[i].build();
        state_dir_for(&PathBuf::from(cfg["pin_dir"].as_str().expect("pin_dir")))
    }

    /// Starts instance `i` in its namespace (`ip netns exec`, as users do). Instances after
    /// the first get a copy of the first one's generated cookie key, if it has one.
    pub fn start(&mut self, i: usize) {
        let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let cfg = self.builders[i].build();
        let pin_dir = PathBuf::from(cfg["pin_dir"].as_str().expect("pin_dir"));
        let state = self.state_dir(i);
        let _ = std::fs::remove_dir_all(&pin_dir);
        let _ = std::fs::remove_dir_all(&state);
        let key = self.state_dir(0).join("cookie-key");
        if i > 0 && key.exists() {
            std::fs::create_dir_all(&state).expect("state dir");
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
                .expect("chmod state dir");
            let copy = state.join("cookie-key");
            std::fs::copy(&key, &copy).expect("copying the cookie key");
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))
                .expect("chmod cookie key");
        }
        let d = Daemon::start_with_existing_pins(&bin, &self.topo.lb_node(i).ns, &cfg, false)
            .unwrap_or_else(|e| panic!("starting instance {i}: {e:#}"));
        self.daemons[i] = Some(d);
    }

    /// Stops instance `i` (SIGTERM) and starts it again with its pins and state directory
    /// (its cookie key) and the config in `builders[i]`, as an operator's restart does.
    pub fn restart(&mut self, i: usize) {
        let d = self.daemons[i]
            .take()
            .unwrap_or_else(|| panic!("instance {i} is not running"));
        d.stop_keep_pins()
            .unwrap_or_else(|e| panic!("stopping instance {i}: {e:#}"));
        let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let cfg = self.builders[i].build();
        let d = Daemon::start_with_existing_pins(&bin, &self.topo.lb_node(i).ns, &cfg, false)
            .unwrap_or_else(|e| panic!("restarting instance {i}: {e:#}"));
        self.daemons[i] = Some(d);
    }

    pub fn d(&self, i: usize) -> &Daemon {
        self.daemons[i]
            .as_ref()
            .unwrap_or_else(|| panic!("instance {i} is not running"))
    }

    /// Every running daemon's output.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, d) in self.daemons.iter().enumerate() {
            if let Some(d) = d {
                s.push_str(&format!("--- instance {i} ---\n{}\n", d.logs()));
            }
        }
        s
    }

    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!("{msg}\n{}", self.logs())
    }

    /// Stops instance `i` with SIGTERM (its exit checked), as when an instance is removed.
    pub fn stop(&mut self, i: usize) {
        if let Some(d) = self.daemons[i].take() {
            d.stop()
                .unwrap_or_else(|e| panic!("stopping instance {i}: {e:#}"));
        }
    }

    /// One request from `src` through instance `i`.
    pub fn request_via(
        &self,
        i: usize,
        src: std::net::Ipv4Addr,
        port: u16,
        target: &str,
        headers: &[(&str, &str)],
    ) -> HttpResponse {
        self.topo
            .steer_client(i)
            .unwrap_or_else(|e| self.fail(format!("steering the client to instance {i}: {e:#}")));
        self.topo
            .request(src, port, target, headers, IO_TIMEOUT)
            .unwrap_or_else(|e| self.fail(format!("request via instance {i}: {e:#}")))
    }

    /// The backend that answered a request through instance `i`.
    pub fn backend_via(
        &self,
        i: usize,
        src: std::net::Ipv4Addr,
        port: u16,
        target: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let r = self.request_via(i, src, port, target, headers);
        if r.status != 200 {
            self.fail(format!(
                "via instance {i}: status {} ({})",
                r.status, r.body
            ));
        }
        r.echo()
            .unwrap_or_else(|e| self.fail(format!("via instance {i}: {e}")))
            .backend
    }

    /// Waits (30 s at most) until instance `i`'s metric `name` satisfies `ok`; fails the test
    /// with its value otherwise.
    pub fn wait_metric_until(&self, i: usize, name: &str, ok: impl Fn(f64) -> bool, what: &str) {
        if !wait_until(Duration::from_secs(30), || ok(self.metric(i, name, &[]))) {
            self.fail(format!(
                "{what}: instance {i}'s {name} is {}",
                self.metric(i, name, &[])
            ));
        }
    }

    /// Waits until instance `i`'s metric `name` reaches `at_least`.
    pub fn wait_metric(&self, i: usize, name: &str, at_least: f64, what: &str) {
        self.wait_metric_until(
            i,
            name,
            |v| v >= at_least,
            &format!("{what} (at least {at_least})"),
        );
    }

    /// Instance `i`'s XDP table holds client `src` on `backend` (`tether persist list`), as
    /// when it learnt the binding from another instance rather than from the client.
    pub fn xdp_holds(&self, i: usize, src: std::net::Ipv4Addr, backend: &str, when: &str) {
        let c = src.to_string();
        let cfg = self.d(i).config_path().to_string_lossy().into_owned();
        let listed = self
            .d(i)
            .cli(&["persist", "list", "--client", &c, "--config", &cfg])
            .unwrap_or_else(|e| self.fail(format!("tether persist list on {i}: {e:#}")));
        let line = listed
            .lines()
            .find(|l| l.contains(&format!("{c}/32")) && l.contains("l4"));
        if !line.is_some_and(|l| l.contains(&format!("{backend} "))) {
            self.fail(format!(
                "{when}: instance {i}'s XDP table should hold {c} on {backend}:\n{listed}"
            ));
        }
    }

    /// Value of metric `name` (with `labels`) on instance `i`, 0 when absent.
    pub fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self
            .d(i)
            .metrics()
            .unwrap_or_else(|e| self.fail(format!("GET /metrics of instance {i}: {e:#}")));
        metric_value(&text, name, labels).unwrap_or(0.0)
    }
}
