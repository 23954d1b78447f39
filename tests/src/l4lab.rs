//! Shared setup of the L4 end-to-end tests: a namespace topology, HTTP backends on [`PORT`]
//! (the VIP's port, direct server return), tether with service `web` on VIP:80/tcp, and the
//! checks every L4 test makes against the pinned maps.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_common::{
    maps::PROTO_TCP,
    stats::{TrafficCounters, reason},
};

use crate::{
    daemon::{ConfigBuilder, Daemon, tether_bin},
    http::{BackendServers, Fetch},
    netns::{Topology, VIP, wait_until},
    pinned::Pins,
};

/// The `web` service's port (backends listen on it too).
pub const PORT: u16 = 80;
/// Bound on every client connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything one test runs. Fields drop in order: the daemon first, then the servers, then
/// the namespaces.
pub struct L4Lab {
    pub daemon: Option<Daemon>,
    pub servers: BackendServers,
    pub topo: Topology,
    pub pins: Pins,
    /// Index of the `web` service (VIP:80/tcp) in the daemon's maps.
    pub svc: u32,
    pub bin: PathBuf,
    /// The config the daemon runs (edited and rewritten for reloads and restarts).
    pub builder: ConfigBuilder,
}

impl L4Lab {
    /// `clients` source addresses, `backends` backends with HTTP servers on [`PORT`], and
    /// tether with the config `configure` makes; it must define service `web` on [`PORT`].
    pub fn start(
        clients: usize,
        backends: usize,
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> L4Lab {
        let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let topo = Topology::builder()
            .client_addrs(clients)
            .backends(backends)
            .build()
            .unwrap_or_else(|e| panic!("building the namespace topology: {e:#}"));
        let servers = BackendServers::start(&topo, PORT)
            .unwrap_or_else(|e| panic!("starting backend servers: {e:#}"));
        let builder = configure(ConfigBuilder::new(&topo, &topo.pin_dir("pins")));
        let daemon = Daemon::start(&bin, &topo.lb.ns, &builder.build(), false)
            .unwrap_or_else(|e| panic!("starting tether: {e:#}"));
        let pins = Pins::new(daemon.pin_dir());
        let mut lab = L4Lab {
            daemon: Some(daemon),
            servers,
            topo,
            pins,
            svc: 0,
            bin,
            builder,
        };
        lab.svc = lab.ok(
            lab.pins.service_index(VIP, PORT, PROTO_TCP),
            "finding the web service in TETHER_SERVICES",
        );
        lab
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

    pub fn client(&self, i: usize) -> Ipv4Addr {
        self.topo.client_addrs[i]
    }

    /// One connection from `src` to VIP:80: the name of the backend that answered.
    pub fn fetch(&self, src: Ipv4Addr) -> String {
        self.ok(
            self.topo.fetch(src, PORT, IO_TIMEOUT),
            &format!("fetching through the VIP from {src}"),
        )
    }

    /// Runs the plan; every fetch must succeed. Returns the backend names in plan order.
    pub fn fetch_all(&self, plan: &[Ipv4Addr]) -> Vec<String> {
        let fetches: Vec<Fetch> =
            self.ok(self.topo.fetch_all(plan, PORT, IO_TIMEOUT), "client thread");
        let failed: Vec<&Fetch> = fetches.iter().filter(|f| f.result.is_err()).collect();
        if !failed.is_empty() {
            self.fail(format!(
                "{} of {} connections to {VIP}:{PORT} failed; first ones: {:?}\nreasons: {:?}",
                failed.len(),
                fetches.len(),
                &failed[..failed.len().min(5)],
                self.pins.reasons().ok()
            ));
        }
        fetches
            .into_iter()
            .map(|f| f.result.expect("checked"))
            .collect()
    }

    pub fn svc_counters(&self) -> TrafficCounters {
        self.ok(
            self.pins.service_counters(self.svc),
            "reading TETHER_SVC_STAT",
        )
    }

    pub fn backend_names(&self) -> Vec<String> {
        (0..self.topo.backends.len())
            .map(|i| self.topo.backend_name(i))
            .collect()
    }

    pub fn backend_addr(&self, name: &str) -> Ipv4Addr {
        let i = self
            .topo
            .backend_index_by_name(name)
            .unwrap_or_else(|| self.fail(format!("no backend {name}")));
        self.topo.backends[i].addr
    }

    pub fn backend_name_of_id(&self, id: u32) -> String {
        let addr = self.ok(self.pins.backend_addr(id), "reading TETHER_BACKENDS");
        let i = self.topo.backend_index_by_addr(addr).unwrap_or_else(|| {
            self.fail(format!(
                "backend id {id} has address {addr}, not a backend of the topology"
            ))
        });
        self.topo.backend_name(i)
    }

    pub fn backend_id_of_name(&self, name: &str) -> u32 {
        self.ok(
            self.pins.backend_id(self.backend_addr(name)),
            "reading TETHER_BACKENDS",
        )
    }

    /// Polls `cond` for up to `timeout`; fails with `what` if it never holds. Returns how
    /// long it took.
    pub fn wait_for(&self, timeout: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
        let t = Instant::now();
        if !wait_until(timeout, cond) {
            self.fail(format!("{what}: not within {timeout:?}"));
        }
        t.elapsed()
    }

    /// No drops or aborts in the verdict counters.
    pub fn assert_no_drops(&self) {
        let reasons = self.ok(self.pins.reasons(), "reading TETHER_REASONS");
        for r in [
            reason::DROP_NO_BACKEND,
            reason::DROP_BAD_BACKEND,
            reason::ABORTED,
        ] {
            if reasons[r as usize].1 != 0 {
                self.fail(format!(
                    "verdict counter {} is not 0: {reasons:?}",
                    reasons[r as usize].0
                ));
            }
        }
    }

    /// Stop tether cleanly (its exit is checked).
    pub fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop()
                .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
        }
    }
}
