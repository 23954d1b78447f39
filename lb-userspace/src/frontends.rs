//! The L7 frontends a daemon runs: per `l7` virtual service, its listening socket, TLS
//! configuration, persistence router and serve task.
//!
//! Rules (what operators rely on):
//! - **All or nothing.** [`Frontends::prepare`] builds everything a config needs (routers,
//!   TLS configurations read from disk, sockets for new addresses, bound but listening
//!   only from commit on) without touching what runs; only then [`Frontends::commit`]
//!   switches, and it cannot fail. A certificate that does not load refuses the reload
//!   with the field and the reason (`virtual_services[0].tls.cert_file: ...`) and the old
//!   listener keeps serving.
//! - **Sockets are kept by address.** A service whose address stays keeps its listening
//!   socket, so a reload never refuses a connection. When only its TLS files' contents change
//!   (a certificate renewed in place) the running listener takes the new configuration for
//!   new connections; when its other listener settings change a new serve task starts on the
//!   same socket before the old one drains. A UDP service keeps its socket the same way: a
//!   new serve task reads it once the old one stopped, so datagrams queued in the kernel
//!   meanwhile are read by the new task. A restart hands the same sockets, TCP and UDP, to
//!   the next process ([`crate::handoff`]).
//! - **Engines are kept** while the persistence profile and the pool stay (see
//!   [`EngineSpec`]): their tables and counters carry over; cookie keys rotate in place. A
//!   new engine (the profile or pool changed) takes the old one's bindings of backends that
//!   remain.

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, task::JoinSet};

use crate::{
    config::{Config, ConfigError, L7Options, Protocol, ServiceMode},
    engine::{Engine, EngineSpec},
    proxy::{self, ProxyStats, TlsHandle},
    state::{L7Counters, SharedSnapshot},
    udp_proxy::{self, UdpConfig, UdpStats},
    workers::{self, Workers},
};

/// Backlog of the listening sockets tether creates.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A TLS file that does not load, as a config error (field path and reason).
    #[error(transparent)]
    Tls(ConfigError),
    #[error("virtual service {service:?}: listening on {addr}: {source}")]
    Listen {
        service: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("virtual service {service:?}: {reason}")]
    Router { service: String, reason: String },
}

/// What makes a serve task: a change restarts the task (on the same socket).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Settings {
    tls: bool,
    tls_passthrough: bool,
    proxy_protocol: Option<crate::cidr::Cidrs>,
    trusted_forwarders: crate::cidr::Cidrs,
    limits: crate::config::L7Limits,
}

impl Settings {
    pub(crate) fn of(o: &L7Options) -> Settings {
        Settings {
            tls: o.tls.is_some(),
            tls_passthrough: o.tls_passthrough,
            proxy_protocol: o.proxy_protocol.clone(),
            trusted_forwarders: o.trusted_forwarders.clone(),
            limits: o.limits,
        }
    }
}

/// One L7 virtual service's frontend.
pub struct Frontend {
    pub addr: SocketAddr,
    /// The listening sockets, one `SO_REUSEPORT` socket per worker; serve tasks accept on
    /// duplicates of them, so stopping one never closes a socket (and its queue of
    /// connections not yet accepted).
    sockets: Arc<Vec<std::net::TcpListener>>,
    settings: Settings,
    tls: Option<TlsHandle>,
    engine_spec: EngineSpec,
    /// The serve task's stop switch; `None` while nothing accepts (built but not started,
    /// or stopped for a handoff).
    stop: Option<watch::Sender<bool>>,
    pub router: Arc<Engine>,
    pub stats: Arc<ProxyStats>,
}

/// One UDP (SIP) virtual service's frontend. Its socket is kept by address: a reload that
/// changes the service's settings stops the old serve task and starts the new one on the
/// same socket, and a restart hands it to the next process, so no datagram is steered to a
/// socket that closes. Serve tasks read duplicates of it (stopping one never closes the
/// socket). Flows in progress end with the task that opened them.
pub struct UdpFrontend {
    pub addr: SocketAddr,
    socket: Arc<std::net::UdpSocket>,
    config: UdpConfig,
    engine_spec: EngineSpec,
    stop: Option<watch::Sender<bool>>,
    pub router: Arc<Engine>,
    pub stats: Arc<ProxyStats>,
    pub udp: Arc<UdpStats>,
}

/// A new generation of frontends, built and not yet serving.
pub struct Prepared {
    cfg: Arc<Config>,
    entries: Vec<Entry>,
    udp: Vec<UdpEntry>,
}

struct UdpEntry {
    name: String,
    service: usize,
    fe: UdpFrontend,
    kept_router: bool,
    /// Whether a new serve task starts at commit (the running one, if any, stops first).
    serve: bool,
}

struct Entry {
    name: String,
    /// Index in `cfg.services`.
    service: usize,
    fe: Frontend,
    /// The running frontend's router is kept: its cookie keys are updated on commit.
    kept_router: bool,
    /// `Some`: a new serve task starts on these duplicates of the sockets (and the running
    /// one, if any, drains). `None`: the running task keeps serving (its TLS configuration is
    /// replaced by `new_tls`).
    serve: Option<Vec<std::net::TcpListener>>,
    /// A new address's sockets beyond those it inherited (one per worker): bound, listening
    /// only from commit on, so no connection waits on them before this generation serves
    /// (a restart's handoff that aborts would lose it).
    pending: Vec<socket2::Socket>,
    new_tls: Option<Arc<rustls::ServerConfig>>,
}

impl Prepared {
    /// The routers of the new generation, by service name (to load persistence state into
    /// before anything is accepted).
    pub fn routers(&self) -> impl Iterator<Item = (&str, &Arc<Engine>)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), &e.fe.router))
            .chain(self.udp.iter().map(|e| (e.name.as_str(), &e.fe.router)))
    }
}

/// Sockets a restart's predecessor handed over, by address; the frontends take theirs.
#[derive(Default)]
pub struct Inherited {
    /// The L7 listening sockets (one `SO_REUSEPORT` group per address).
    pub listeners: HashMap<SocketAddr, Vec<std::net::TcpListener>>,
    /// The UDP services' sockets.
    pub udp: HashMap<SocketAddr, std::net::UdpSocket>,
}

/// The frontends that run, and the serve tasks (draining ones included).
#[derive(Default)]
pub struct Frontends {
    running: HashMap<String, Frontend>,
    udp: HashMap<String, UdpFrontend>,
    tasks: JoinSet<()>,
    /// Where the L7 serve tasks accept and serve.
    workers: Workers,
    /// UDP serve tasks started: the next one runs on worker `udp_started % workers`.
    udp_started: usize,
}

/// Duplicates of `sockets`, for one serve task (its workers register them with their
/// runtimes).
fn serve_sockets(sockets: &[std::net::TcpListener]) -> std::io::Result<Vec<std::net::TcpListener>> {
    sockets
        .iter()
        .map(std::net::TcpListener::try_clone)
        .collect()
}

fn proxy_config(fe: &Frontend, o: &L7Options, drain: Duration) -> proxy::ProxyConfig {
    proxy::ProxyConfig {
        listen: fe.addr,
        tls: fe.tls.clone(),
        proxy_protocol: o.proxy_protocol.clone(),
        trusted_forwarders: o.trusted_forwarders.clone(),
        limits: proxy::Limits {
            max_connections: o.limits.max_connections as usize,
            max_connections_per_source: o.limits.max_connections_per_source as usize,
            h2_max_concurrent_streams: o.limits.h2_max_concurrent_streams,
            max_connections_per_backend: o.limits.max_connections_per_backend as usize,
            min_body_rate: o.limits.min_body_rate_bytes_s,
            max_header_bytes: o.limits.max_header_bytes as usize,
            request_header_timeout: o.limits.request_timeout,
            idle_timeout: o.limits.idle_timeout,
            upstream_connect_timeout: o.limits.connect_timeout,
            upstream_response_timeout: o.limits.response_timeout,
            shutdown_grace: drain,
        },
    }
}

fn l7_options(cfg: &Config, service: usize) -> &L7Options {
    match &cfg.services[service].mode {
        ServiceMode::L7(o) => o,
        ServiceMode::L4Dsr => unreachable!("entries are built from l7 services only"),
    }
}

impl Frontends {
    /// No frontends yet; L7 serve tasks will run on `workers`.
    pub fn new(workers: Workers) -> Frontends {
        Frontends {
            workers,
            ..Frontends::default()
        }
    }

    /// Build the frontends `cfg` asks for, reusing what runs where it can; nothing running
    /// changes. A socket for an address nothing here listens on is taken from `inherited`
    /// (a restart's sockets, by address) or bound.
    pub fn prepare(
        &self,
        cfg: &Arc<Config>,
        shared: &SharedSnapshot,
        inherited: &mut Inherited,
    ) -> Result<Prepared, FrontendError> {
        let mut entries = Vec::new();
        let mut udp = Vec::new();
        for (i, svc) in cfg.services.iter().enumerate() {
            let ServiceMode::L7(o) = &svc.mode else {
                continue;
            };
            if svc.protocol == Protocol::Udp {
                udp.push(self.prepare_udp(cfg, shared, i, o, &mut inherited.udp)?);
                continue;
            }
            let addr = SocketAddr::new(svc.vip, svc.port);
            let listen_err = |source| FrontendError::Listen {
                service: svc.name.clone(),
                addr,
                source,
            };
            // Read on every reload: a certificate renewed at the same path is picked up.
            let new_tls = match &o.tls {
                Some(t) => Some(
                    proxy::load_tls(&proxy::TlsFiles {
                        cert_pem: t.cert_file.clone(),
                        key_pem: t.key_file.clone(),
                    })
                    .map_err(|e| {
                        FrontendError::Tls(ConfigError {
                            path: format!("virtual_services[{i}].tls.{}", e.part.field()),
                            reason: e.to_string(),
                        })
                    })?,
                ),
                None => None,
            };
            let current = self.running.get(&svc.name);
            let spec = EngineSpec::of(cfg, svc);
            let kept = current.filter(|c| c.engine_spec == spec);
            let (router, stats) = match kept {
                Some(c) => (c.router.clone(), c.stats.clone()),
                None => {
                    let r = Arc::new(Engine::new(cfg, svc, shared.clone()).map_err(|e| {
                        FrontendError::Router {
                            service: svc.name.clone(),
                            reason: e.to_string(),
                        }
                    })?);
                    // A reload that changed the profile or the pool: the bindings of backends
                    // that remain carry over.
                    if let Some(c) = current {
                        let n = r.import(cfg, &c.router.export());
                        log::info!("L7 tables of {}: {n} bindings carried over", svc.name);
                    }
                    (r, Arc::new(ProxyStats::default()))
                }
            };
            let settings = Settings::of(o);
            // The running task goes on when its socket, settings and router stay.
            let keep_task = current.filter(|c| {
                c.addr == addr
                    && c.settings == settings
                    && c.stop.is_some()
                    && Arc::ptr_eq(&c.router, &router)
            });
            let (sockets, pending) = match self.running.values().find(|f| f.addr == addr) {
                Some(f) => (f.sockets.clone(), Vec::new()),
                None => {
                    let have = inherited.listeners.remove(&addr).unwrap_or_default();
                    let pending = workers::bind_group(addr, have.len(), self.workers.len())
                        .map_err(listen_err)?;
                    (Arc::new(have), pending)
                }
            };
            let (tls, serve, new_tls) = match (keep_task, new_tls) {
                (Some(c), new_tls) => (c.tls.clone(), None, new_tls),
                (None, new_tls) => (
                    new_tls.map(TlsHandle::new),
                    Some(serve_sockets(&sockets).map_err(listen_err)?),
                    None,
                ),
            };
            entries.push(Entry {
                name: svc.name.clone(),
                service: i,
                fe: Frontend {
                    addr,
                    sockets,
                    settings,
                    tls,
                    engine_spec: spec,
                    stop: None,
                    router,
                    stats,
                },
                kept_router: kept.is_some(),
                serve,
                pending,
                new_tls,
            });
        }
        Ok(Prepared {
            cfg: cfg.clone(),
            entries,
            udp,
        })
    }

    fn prepare_udp(
        &self,
        cfg: &Arc<Config>,
        shared: &SharedSnapshot,
        i: usize,
        o: &L7Options,
        inherited: &mut HashMap<SocketAddr, std::net::UdpSocket>,
    ) -> Result<UdpEntry, FrontendError> {
        let svc = &cfg.services[i];
        let addr = SocketAddr::new(svc.vip, svc.port);
        let spec = EngineSpec::of(cfg, svc);
        let current = self.udp.get(&svc.name);
        let kept = current.filter(|c| c.engine_spec == spec);
        let config = UdpConfig {
            max_flows: o.limits.max_connections as usize,
            idle_timeout: o.limits.idle_timeout,
        };
        let (router, stats, udp) = match kept {
            Some(c) => (c.router.clone(), c.stats.clone(), c.udp.clone()),
            None => {
                let r = Arc::new(Engine::new(cfg, svc, shared.clone()).map_err(|e| {
                    FrontendError::Router {
                        service: svc.name.clone(),
                        reason: e.to_string(),
                    }
                })?);
                if let Some(c) = current {
                    r.import(cfg, &c.router.export());
                }
                (r, Arc::new(ProxyStats::default()), Arc::default())
            }
        };
        // The running task goes on when its address, limits and engine stay.
        let keep_task = current.filter(|c| {
            c.addr == addr
                && c.config == config
                && c.stop.is_some()
                && Arc::ptr_eq(&c.router, &router)
        });
        // The socket stays with its address (a queued datagram is read by the next task);
        // one is bound only for an address neither running here nor handed over.
        let socket = match self.udp.values().find(|f| f.addr == addr) {
            Some(f) => f.socket.clone(),
            None => match inherited.remove(&addr) {
                Some(s) => Arc::new(s),
                None => Arc::new(udp_proxy::reuseport_socket(addr).map_err(|source| {
                    FrontendError::Listen {
                        service: svc.name.clone(),
                        addr,
                        source,
                    }
                })?),
            },
        };
        Ok(UdpEntry {
            name: svc.name.clone(),
            service: i,
            fe: UdpFrontend {
                addr,
                socket,
                config,
                engine_spec: spec,
                stop: None,
                router,
                stats,
                udp,
            },
            kept_router: kept.is_some(),
            serve: keep_task.is_none(),
        })
    }

    /// Switch to `prepared`: new serve tasks start before the ones they replace drain;
    /// frontends no longer configured drain and their sockets close once their tasks end.
    pub fn commit(&mut self, prepared: Prepared) {
        let Prepared { cfg, entries, udp } = prepared;
        let mut old_udp = std::mem::take(&mut self.udp);
        for mut e in udp {
            let svc = &cfg.services[e.service];
            let previous = old_udp.remove(&e.name);
            if e.kept_router
                && let Err(err) = e.fe.router.update(&cfg, svc)
            {
                log::error!("virtual service {:?}: cookie keys: {err}", e.name);
            }
            if e.serve {
                // Stopped first: a datagram is read by one task or the other, and the old
                // task reads none once told to stop, so none dies with its flows.
                if let Some(mut p) = previous {
                    stop_udp(&e.name, &mut p, "its settings changed");
                }
                self.spawn_udp(&e.name, &mut e.fe);
            } else {
                let mut previous = previous.expect("a kept task has a running frontend");
                e.fe.stop = previous.stop.take();
            }
            self.udp.insert(e.name, e.fe);
        }
        for (name, mut p) in old_udp {
            stop_udp(&name, &mut p, "the service is gone");
        }
        let mut old = std::mem::take(&mut self.running);
        for mut e in entries {
            let svc = &cfg.services[e.service];
            let previous = old.remove(&e.name);
            if e.kept_router
                && let Err(err) = e.fe.router.update(&cfg, svc)
            {
                // Config validation already decoded these keys: not reached in practice.
                log::error!("virtual service {:?}: cookie keys: {err}", e.name);
            }
            match e.serve.take() {
                None => {
                    let mut previous = previous.expect("a kept task has a running frontend");
                    if let (Some(handle), Some(config)) = (&e.fe.tls, e.new_tls.take()) {
                        handle.replace(config);
                    }
                    e.fe.stop = previous.stop.take();
                }
                Some(mut listener) => {
                    listen_pending(&mut e.fe, std::mem::take(&mut e.pending), &mut listener);
                    let o = l7_options(&cfg, e.service);
                    self.spawn(&e.name, &mut e.fe, listener, o, cfg.drain_timeout);
                    if let Some(mut p) = previous {
                        stop(&e.name, &mut p, "its listener settings changed");
                    }
                }
            }
            self.running.insert(e.name, e.fe);
        }
        for (name, mut p) in old {
            stop(&name, &mut p, "the service is gone");
        }
        while self.tasks.try_join_next().is_some() {}
    }

    fn spawn(
        &mut self,
        name: &str,
        fe: &mut Frontend,
        listeners: Vec<std::net::TcpListener>,
        o: &L7Options,
        drain: Duration,
    ) {
        let (stop, stopped) = watch::channel(false);
        let name = name.to_string();
        let cfg = proxy_config(fe, o, drain);
        let task: std::pin::Pin<Box<dyn Future<Output = Result<(), proxy::ProxyError>> + Send>> =
            if o.tls_passthrough {
                Box::pin(crate::passthrough::serve_on(
                    listeners,
                    self.workers.clone(),
                    cfg,
                    fe.router.clone(),
                    stopped,
                    fe.stats.clone(),
                ))
            } else {
                Box::pin(proxy::serve_on(
                    listeners,
                    self.workers.clone(),
                    cfg,
                    fe.router.clone(),
                    stopped,
                    fe.stats.clone(),
                ))
            };
        log::info!(
            "L7 proxy of {name} listening on {}{}",
            fe.addr,
            if fe.tls.is_some() {
                " (TLS)"
            } else if o.tls_passthrough {
                " (TLS pass-through)"
            } else {
                ""
            }
        );
        self.tasks.spawn(async move {
            if let Err(e) = task.await {
                log::error!("L7 proxy of {name} stopped: {e}");
            }
        });
        fe.stop = Some(stop);
    }

    /// Serve a UDP frontend on one worker's runtime (its flow table, Call-ID lookups and
    /// flows stay together on that thread), never on the control runtime, so a reload, an
    /// admin request or a table save does not hold datagrams back. The task reads a
    /// duplicate of the frontend's socket.
    fn spawn_udp(&mut self, name: &str, fe: &mut UdpFrontend) {
        let socket = match fe.socket.try_clone() {
            Ok(s) => s,
            Err(e) => {
                log::error!("UDP proxy of {name}: cannot read {}: {e}", fe.addr);
                return;
            }
        };
        let (stop, stopped) = watch::channel(false);
        let task = udp_proxy::serve(
            socket,
            fe.config,
            fe.router.clone(),
            stopped,
            fe.udp.clone(),
        );
        let worker = self.udp_started % self.workers.len();
        self.udp_started = self.udp_started.wrapping_add(1);
        log::info!(
            "L7 UDP proxy (SIP) of {name} listening on {} (worker {worker})",
            fe.addr
        );
        let name = name.to_string();
        self.tasks.spawn_on(
            async move {
                if let Err(e) = task.await {
                    log::error!("UDP proxy of {name} stopped: {e}");
                }
            },
            &self.workers.handle(worker),
        );
        fe.stop = Some(stop);
    }

    /// Stop accepting and reading on every frontend (`why` is logged; in a handoff the next
    /// process accepts and reads on the same sockets); open connections drain.
    pub fn stop_accepting(&mut self, why: &str) {
        for (name, fe) in &mut self.running {
            stop(name, fe, why);
        }
        for (name, fe) in &mut self.udp {
            stop_udp(name, fe, why);
        }
    }

    /// Accept again on every frontend [`Frontends::stop_accepting`] stopped (a handoff that
    /// failed).
    pub fn resume(&mut self, cfg: &Config) {
        let names: Vec<String> = self
            .running
            .iter()
            .filter(|(_, f)| f.stop.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(service) = cfg.services.iter().position(|s| s.name == name) else {
                continue;
            };
            let mut fe = self.running.remove(&name).expect("listed above");
            match serve_sockets(&fe.sockets) {
                Ok(listener) => {
                    let o = l7_options(cfg, service);
                    self.spawn(&name, &mut fe, listener, o, cfg.drain_timeout);
                }
                Err(e) => log::error!(
                    "L7 proxy of {name}: cannot accept again on {}: {e}",
                    fe.addr
                ),
            }
            self.running.insert(name, fe);
        }
        self.resume_udp();
    }

    /// Serve again on every UDP frontend [`Frontends::stop_accepting`] stopped (a handoff that
    /// failed), on the same socket: the datagrams that queued meanwhile are read.
    fn resume_udp(&mut self) {
        let names: Vec<String> = self
            .udp
            .iter()
            .filter(|(_, f)| f.stop.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let mut fe = self.udp.remove(&name).expect("listed above");
            self.spawn_udp(&name, &mut fe);
            self.udp.insert(name, fe);
        }
    }

    /// Stop every frontend and wait up to `grace` (plus a second for the tasks to cut what
    /// outlived their own grace) for the serve tasks to finish draining.
    pub async fn drain(&mut self, grace: Duration) {
        self.stop_accepting("stopping");
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace + Duration::from_secs(1), all)
            .await
            .is_err()
        {
            log::warn!("L7 proxies still draining after {grace:?}; exiting");
        }
    }

    /// The listening sockets, by address (handed to the next process on a restart).
    pub fn sockets(&self) -> Vec<(SocketAddr, BorrowedFd<'_>)> {
        self.running
            .values()
            .flat_map(|f| f.sockets.iter().map(|s| (f.addr, s.as_fd())))
            .collect()
    }

    /// The UDP services' sockets, by address (handed to the next process on a restart).
    pub fn udp_sockets(&self) -> Vec<(SocketAddr, BorrowedFd<'_>)> {
        self.udp
            .values()
            .map(|f| (f.addr, f.socket.as_fd()))
            .collect()
    }

    /// The running routers, by service name.
    pub fn routers(&self) -> impl Iterator<Item = (&str, &Arc<Engine>)> {
        self.running
            .iter()
            .map(|(n, f)| (n.as_str(), &f.router))
            .chain(self.udp.iter().map(|(n, f)| (n.as_str(), &f.router)))
    }

    /// Counters of every frontend, for the snapshot.
    pub fn counters(&self) -> Vec<L7Counters> {
        self.running
            .iter()
            .map(|(name, f)| L7Counters {
                service: name.clone(),
                router: f.router.stats.clone(),
                proxy: f.stats.clone(),
                tables: f.router.clone(),
                udp: None,
            })
            .chain(self.udp.iter().map(|(name, f)| L7Counters {
                service: name.clone(),
                router: f.router.stats.clone(),
                proxy: f.stats.clone(),
                tables: f.router.clone(),
                udp: Some(f.udp.clone()),
            }))
            .collect()
    }

    /// Whether any frontend runs (whose engine may keep tables worth saving).
    pub fn has_l7_tables(&self) -> bool {
        !self.running.is_empty() || !self.udp.is_empty()
    }

    /// Whether `name`'s frontend accepts connections now.
    pub fn is_serving(&self, name: &str) -> bool {
        self.running.get(name).is_some_and(|f| f.stop.is_some())
    }

    /// The TLS configuration `name`'s frontend gives new connections.
    pub fn tls_config(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        self.running.get(name)?.tls.as_ref().map(TlsHandle::current)
    }
}

/// Listen on a new address's `pending` sockets and add them to the frontend and to its new
/// serve task's sockets (`serve`).
fn listen_pending(
    fe: &mut Frontend,
    pending: Vec<socket2::Socket>,
    serve: &mut Vec<std::net::TcpListener>,
) {
    if pending.is_empty() {
        return;
    }
    // A new address's sockets belong to its entry alone until they serve.
    let Some(sockets) = Arc::get_mut(&mut fe.sockets) else {
        log::error!(
            "{}: listening sockets shared before commit; extra ones dropped",
            fe.addr
        );
        return;
    };
    for s in workers::listen_bound(fe.addr, pending, BACKLOG) {
        match s.try_clone() {
            Ok(dup) => {
                serve.push(dup);
                sockets.push(s);
            }
            Err(e) => log::error!("{}: duplicating a listening socket: {e}", fe.addr),
        }
    }
}

fn stop(name: &str, fe: &mut Frontend, why: &str) {
    if let Some(s) = fe.stop.take() {
        let _ = s.send(true);
        log::info!("L7 proxy of {name} on {} drains: {why}", fe.addr);
    }
}

fn stop_udp(name: &str, fe: &mut UdpFrontend, why: &str) {
    if let Some(s) = fe.stop.take() {
        let _ = s.send(true);
        log::info!("L7 UDP proxy of {name} on {} stops: {why}", fe.addr);
    }
}
