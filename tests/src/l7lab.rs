//! Shared setup of the L7 end-to-end tests: a namespace topology, echo backends listening on
//! [`PORT`] at their own addresses, and tether with a config the test builds, plus the
//! checks every L7 test makes (metrics, backend state, reloads).

use std::{net::Ipv4Addr, time::Duration};

use serde_json::json;

use crate::{
    daemon::{ConfigBuilder, Daemon, Reload, metric_value, tether_bin},
    http::{BackendServers, Reply},
    netns::{Topology, wait_until},
};

/// Port of the backends, and of the tests' main L7 service.
pub const PORT: u16 = 8080;
/// Bound on every client request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reload may take to be serving.
pub const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// Everything one test runs. Fields drop in order: the daemon first, then the backend
/// servers, then the namespaces.
pub struct L7Lab {
    pub daemon: Option<Daemon>,
    pub servers: BackendServers,
    pub topo: Topology,
    /// The config the daemon runs (replaced by reloads).
    pub builder: ConfigBuilder,
}

/// A config with every backend's L7 port set to [`PORT`], so services on any port reach them.
pub fn base_builder(topo: &Topology) -> ConfigBuilder {
    let mut b = ConfigBuilder::new(topo, &topo.pin_dir("pins"));
    for i in 0..topo.backends.len() {
        b = b.backend_field(&topo.backend_name(i), "port", json!(PORT));
    }
    b
}

impl L7Lab {
    /// `clients` source addresses, `backends` echo backends, and tether with whatever
    /// `configure` adds to [`base_builder`].
    pub fn start(
        clients: usize,
        backends: usize,
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> L7Lab {
        let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let topo = Topology::builder()
            .client_addrs(clients)
            .backends(backends)
            .build()
            .unwrap_or_else(|e| panic!("building the namespace topology: {e:#}"));
        let servers = BackendServers::start_with(&topo, PORT, Reply::Echo)
            .unwrap_or_else(|e| panic!("starting backend servers: {e:#}"));
        let builder = configure(base_builder(&topo));
        let daemon = Daemon::start(&bin, &topo.lb.ns, &builder.build(), false)
            .unwrap_or_else(|e| panic!("starting tether: {e:#}"));
        L7Lab {
            daemon: Some(daemon),
            servers,
            topo,
            builder,
        }
    }

    pub fn d(&self) -> &Daemon {
        self.daemon
            .as_ref()
            .unwrap_or_else(|| panic!("tether is not running"))
    }

    pub fn logs(&self) -> String {
        self.daemon.as_ref().map(|d| d.logs()).unwrap_or_default()
    }

    /// Panics with `msg` and the daemon's output.
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!("{msg}\n--- tether output ---\n{}", self.logs())
    }

    pub fn ok<T, E: std::fmt::Debug>(&self, r: Result<T, E>, what: &str) -> T {
        r.unwrap_or_else(|e| self.fail(format!("{what}: {e:?}")))
    }

    /// Client address `i` (wrapping around).
    pub fn client(&self, i: usize) -> Ipv4Addr {
        self.topo.client_addrs[i % self.topo.client_addrs.len()]
    }

    pub fn backend_names(&self) -> Vec<String> {
        (0..self.topo.backends.len())
            .map(|i| self.topo.backend_name(i))
            .collect()
    }

    /// Value of metric `name` whose labels include every one of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let text = self.ok(self.d().metrics(), "GET /metrics");
        match metric_value(&text, name, labels) {
            Some(v) => v as u64,
            None => self.fail(format!("/metrics has no {name} with {labels:?}:\n{text}")),
        }
    }

    /// `tether_l7_<name>_total{service}`.
    pub fn l7(&self, name: &str, service: &str) -> u64 {
        self.metric(&format!("tether_l7_{name}_total"), &[("service", service)])
    }

    /// A backend's state as `/status` reports it.
    pub fn backend_state(&self, service: &str, name: &str) -> String {
        let st = self.ok(self.d().admin_json("/status"), "GET /status");
        st["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == service))
            .and_then(|s| s["backends"].as_array())
            .and_then(|b| b.iter().find(|b| b["name"] == name))
            .and_then(|b| b["state"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                self.fail(format!(
                    "/status has no backend {name} in {service}: {st:#}"
                ))
            })
    }

    /// Polls `cond` for up to `timeout`; fails with `what` if it never holds. Returns how
    /// long it took.
    pub fn wait_for(&self, timeout: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
        let t = std::time::Instant::now();
        if !wait_until(timeout, cond) {
            self.fail(format!("{what}: not within {timeout:?}"));
        }
        t.elapsed()
    }

    /// Rewrite the config, SIGHUP, and wait until the main service answers again. Returns the
    /// daemon's `reloaded` line; a refused reload fails the test.
    pub fn reload(&mut self, builder: ConfigBuilder) -> String {
        self.builder = builder;
        let d = self.d();
        self.ok(d.write_config(&self.builder.build()), "writing the config");
        let line = match self.ok(d.reload(), "reloading") {
            Reload::Applied(line) => line,
            Reload::Refused(line) => self.fail(format!("a valid reload was refused: {line}")),
        };
        let src = self.client(0);
        self.wait_for(RELOAD_WAIT, "the proxy answering after the reload", || {
            self.topo
                .request(src, PORT, "/", &[], IO_TIMEOUT)
                .is_ok_and(|r| r.status == 200)
        });
        line
    }

    /// Stop tether (SIGTERM, or SIGKILL with `crash`) and start it again with the same
    /// config, its pins and its state directory, as an operator's restart does.
    pub fn restart(&mut self, crash: bool) {
        let d = self
            .daemon
            .take()
            .unwrap_or_else(|| panic!("tether is not running"));
        let r = if crash {
            d.kill_keep_pins()
        } else {
            d.stop_keep_pins()
        };
        r.unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
        let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let d =
            Daemon::start_with_existing_pins(&bin, &self.topo.lb.ns, &self.builder.build(), false)
                .unwrap_or_else(|e| panic!("restarting tether: {e:#}"));
        self.daemon = Some(d);
    }

    /// Stop tether cleanly (its exit is checked).
    pub fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop()
                .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
        }
    }
}
