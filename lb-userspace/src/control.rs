//! The daemon's control loop: start (or take over from an earlier run), then react to health
//! transitions and SIGHUP reloads by reprogramming the kernel, until SIGINT/SIGTERM.
//!
//! Continuity rules (what operators rely on):
//! - ids carry over: services keep their index (by VIP, port, protocol) and backends their id
//!   (by pool and name), read back from the pinned maps, so persisted clients keep their server
//!   across restarts and reloads;
//! - the XDP program stays attached through a pinned link while the daemon is down, and a new
//!   daemon replaces the program on that link atomically;
//! - a reload that fails validation (or resolution) changes nothing that runs.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use arc_swap::ArcSwap;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    balancer::{self, IdError, Ids, L2},
    config::{BackendConfig, Config, L7Options, LoadError, ServiceMode, VirtualService},
    dataplane::{Attached, Dataplane, DataplaneError, net},
    engine::{
        Engine, EngineSpec,
        saved::{self, SavedEngine},
    },
    health::{self, HealthEvent, PoolMonitor},
    passthrough,
    proxy::{self, ProxyStats},
    state::{BackendState, Health, L7Counters, SharedSnapshot, Snapshot},
};

/// How often the L7 tables are written to `state_dir` (the bindings a crash can lose).
const L7_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long to wait for a backend's neighbour entry.
const RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Config(#[from] LoadError),
    /// Boxed: aya's load errors are large, and every `Result` here would carry them.
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Ids(#[from] IdError),
    #[error("admin API on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("virtual service {service:?}: listening on {addr}: {source}")]
    Listen {
        service: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("virtual service {service:?}: {reason}")]
    L7 { service: String, reason: String },
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    #[error(
        "{field} cannot change while running (it is {old}, the new config says {new}): restart tether to apply it"
    )]
    NeedsRestart {
        field: &'static str,
        old: String,
        new: String,
    },
}

type Result<T> = std::result::Result<T, ControlError>;

impl From<DataplaneError> for ControlError {
    fn from(e: DataplaneError) -> Self {
        ControlError::Dataplane(Box::new(e))
    }
}

async fn resolve_l2_async(cfg: Arc<Config>) -> Result<Vec<Vec<L2>>> {
    Ok(
        tokio::task::spawn_blocking(move || net::resolve_l2(&cfg, RESOLVE_WAIT))
            .await
            .expect("resolver task panicked")?,
    )
}

/// Health of every backend of `cfg`: `known` gives what is already known of one (from the
/// pinned maps at startup, from the running daemon on reload: a restart or reload must not
/// flap anyone); a pool with any unknown backend gets one round of checks.
async fn health_of(
    cfg: &Config,
    known: impl Fn(&crate::config::Pool, &BackendConfig) -> Option<Health>,
) -> Vec<Vec<Option<Health>>> {
    let mut out = Vec::new();
    for pool in &cfg.pools {
        let Some(monitor) = &pool.health_monitor else {
            out.push(vec![None; pool.backends.len()]);
            continue;
        };
        let known: Vec<Option<Health>> = pool.backends.iter().map(|b| known(pool, b)).collect();
        let probed = if known.iter().any(Option::is_none) {
            health::probe_all(pool, monitor).await
        } else {
            vec![Ok(()); pool.backends.len()]
        };
        let now = SystemTime::now();
        out.push(
            known
                .into_iter()
                .zip(probed)
                .map(|(k, p)| {
                    Some(k.unwrap_or_else(|| match p {
                        Ok(()) => Health {
                            up: true,
                            detail: String::new(),
                            since: now,
                        },
                        Err(detail) => Health {
                            up: false,
                            detail,
                            since: now,
                        },
                    }))
                })
                .collect(),
        );
    }
    out
}

fn states(cfg: &Config, health: &[Vec<Option<Health>>]) -> Vec<Vec<BackendState>> {
    cfg.pools
        .iter()
        .zip(health)
        .map(|(p, hs)| {
            p.backends
                .iter()
                .zip(hs)
                .map(|(b, h)| {
                    BackendState::effective(
                        b.admin_state,
                        b.weight,
                        h.as_ref().is_none_or(|h| h.up),
                    )
                })
                .collect()
        })
        .collect()
}

/// The running daemon's state, owned by the control loop.
struct Daemon {
    config_path: PathBuf,
    cfg: Arc<Config>,
    dp: Dataplane,
    ids: Ids,
    l2: Vec<Vec<L2>>,
    health: Vec<Vec<Option<Health>>>,
    monitors: Vec<PoolMonitor>,
    events: mpsc::UnboundedSender<HealthEvent>,
    shared: SharedSnapshot,
    mode: Attached,
    generation: u64,
    started: SystemTime,
    /// One proxy per L7 virtual service, by name.
    proxies: HashMap<String, L7Service>,
    /// L7 tables read from `state_dir` at start, taken by each service's first engine.
    restored: HashMap<String, SavedEngine>,
}

/// A running L7 proxy and what it was started with.
pub struct L7Service {
    /// Listener settings: a reload that changes them restarts the listener.
    listener_spec: ListenerSpec,
    /// Persistence profile and pool: a reload that keeps them keeps the engine and its tables.
    engine_spec: EngineSpec,
    stop: watch::Sender<bool>,
    pub router: Arc<Engine>,
    pub stats: Arc<ProxyStats>,
}

/// What a listener is started with: a reload that changes it restarts the listener.
#[derive(Debug, Clone, PartialEq)]
struct ListenerSpec {
    listen: SocketAddr,
    options: L7Options,
}

impl ListenerSpec {
    fn of(svc: &VirtualService, o: &L7Options) -> ListenerSpec {
        ListenerSpec {
            listen: SocketAddr::new(svc.vip, svc.port),
            options: o.clone(),
        }
    }
}

fn proxy_config(listen: SocketAddr, o: &L7Options) -> proxy::ProxyConfig {
    proxy::ProxyConfig {
        listen,
        tls: o.tls.as_ref().map(|t| proxy::TlsFiles {
            cert_pem: t.cert_file.clone(),
            key_pem: t.key_file.clone(),
        }),
        proxy_protocol: o.proxy_protocol,
        limits: proxy::Limits {
            max_connections: o.limits.max_connections as usize,
            max_header_bytes: o.limits.max_header_bytes as usize,
            request_header_timeout: o.limits.request_timeout,
            idle_timeout: o.limits.idle_timeout,
            upstream_connect_timeout: o.limits.connect_timeout,
            upstream_response_timeout: o.limits.response_timeout,
            ..proxy::Limits::default()
        },
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Daemon {
    /// Start, keep or restart the proxy of every L7 service; stop those no longer configured.
    /// Routers read the live snapshot, so pool and health changes need no restart.
    async fn sync_proxies(&mut self) -> Result<()> {
        let mut wanted: HashMap<String, ()> = HashMap::new();
        for svc in &self.cfg.services {
            let ServiceMode::L7(o) = &svc.mode else {
                continue;
            };
            wanted.insert(svc.name.clone(), ());
            let listen = SocketAddr::new(svc.vip, svc.port);
            let listener_spec = ListenerSpec::of(svc, o);
            let engine_spec = EngineSpec::of(&self.cfg, svc);
            let keep_router = self
                .proxies
                .get(&svc.name)
                .filter(|p| p.engine_spec == engine_spec);
            if let Some(p) = keep_router {
                // Keys rotate in place; tables and counters stay.
                p.router
                    .update(&self.cfg, svc)
                    .map_err(|e| ControlError::L7 {
                        service: svc.name.clone(),
                        reason: e.to_string(),
                    })?;
                if p.listener_spec == listener_spec {
                    continue;
                }
            }
            let (router, stats) = match keep_router {
                Some(p) => (p.router.clone(), p.stats.clone()),
                None => {
                    let r = Arc::new(Engine::new(&self.cfg, svc, self.shared.clone()).map_err(
                        |e| ControlError::L7 {
                            service: svc.name.clone(),
                            reason: e.to_string(),
                        },
                    )?);
                    // The bindings carry over: from the engine this one replaces (a reload
                    // that changed the profile or the pool), else from the saved state.
                    let saved = match self.proxies.get(&svc.name) {
                        Some(old) => Some(old.router.export()),
                        None => self.restored.remove(&svc.name),
                    };
                    if let Some(saved) = saved {
                        let n = r.import(&self.cfg, &saved);
                        log::info!("L7 tables of {}: {n} bindings carried over", svc.name);
                    }
                    (r, Arc::new(ProxyStats::default()))
                }
            };
            // SO_REUSEPORT: the new listener is bound before the old one stops, so a reload
            // never refuses a connection; the old one's in-flight requests finish.
            let listener = reuseport_listener(listen).map_err(|source| ControlError::Listen {
                service: svc.name.clone(),
                addr: listen,
                source,
            })?;
            if let Some(old) = self.proxies.remove(&svc.name) {
                let _ = old.stop.send(true);
            }
            let (stop, stopped) = watch::channel(false);
            let name = svc.name.clone();
            let cfg = proxy_config(listen, o);
            let task: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = if o.tls_passthrough {
                Box::pin(passthrough::serve(
                    listener,
                    cfg,
                    router.clone(),
                    stopped,
                    stats.clone(),
                ))
            } else {
                Box::pin(proxy::serve_with_stats(
                    listener,
                    cfg,
                    router.clone(),
                    stopped,
                    stats.clone(),
                ))
            };
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    log::error!("L7 proxy of {name} stopped: {e}");
                }
            });
            log::info!(
                "L7 proxy of {} listening on {listen}{}",
                svc.name,
                if o.tls.is_some() {
                    " (TLS)"
                } else if o.tls_passthrough {
                    " (TLS pass-through)"
                } else {
                    ""
                }
            );
            self.proxies.insert(
                svc.name.clone(),
                L7Service {
                    listener_spec,
                    engine_spec,
                    stop,
                    router,
                    stats,
                },
            );
        }
        let gone: Vec<String> = self
            .proxies
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            if let Some(p) = self.proxies.remove(&n) {
                let _ = p.stop.send(true);
                log::info!("L7 proxy of {n} stopped: the service is gone");
            }
        }
        // Publish the proxies' counters.
        self.shared.store(Arc::new(self.snapshot()));
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            config: self.cfg.clone(),
            service_index: self.ids.services.clone(),
            backend_ids: self.ids.backends.clone(),
            backend_state: states(&self.cfg, &self.health),
            health: self.health.clone(),
            xdp_mode: match self.mode {
                Attached::Native => "native",
                Attached::Generic => "generic",
            },
            generation: self.generation,
            started: self.started,
            l7: self
                .proxies
                .iter()
                .map(|(name, p)| L7Counters {
                    service: name.clone(),
                    router: p.router.stats.clone(),
                    proxy: p.stats.clone(),
                    tables: p.router.clone(),
                })
                .collect(),
        }
    }

    /// Write the L7 tables of every running service to `state_dir` (atomically): called every
    /// second, at shutdown, and by anything that hands the daemon over to another process.
    /// Returns the number of bindings written.
    pub fn save_l7_state(&self) -> std::io::Result<usize> {
        let state = saved::collect(self.proxies.values().map(|p| &*p.router));
        let n = state
            .services
            .iter()
            .flat_map(|s| &s.tables)
            .map(|t| t.entries.len())
            .sum();
        saved::write(&self.cfg.state_dir, &state)?;
        Ok(n)
    }

    /// Read the L7 tables saved in `state_dir` for the services' first engines.
    pub fn load_l7_state(&mut self) {
        match saved::read(&self.cfg.state_dir) {
            Ok(Some(state)) => {
                self.restored = state
                    .services
                    .into_iter()
                    .map(|s| (s.service.clone(), s))
                    .collect();
            }
            Ok(None) => {}
            Err(e) => log::warn!("L7 tables not restored: {e}"),
        }
    }

    /// Write the current config, ids and health to the kernel and publish the snapshot.
    fn program(&mut self) -> Result<()> {
        let st = states(&self.cfg, &self.health);
        let plan = balancer::plan(&self.cfg, &self.ids, &st, |p, b| {
            Ok::<_, ControlError>(self.l2[p][b])
        })?;
        let removed = self.dp.apply(&plan)?;
        let forgotten = self.dp.forget(&removed)?;
        if forgotten > 0 {
            log::info!(
                "removed {forgotten} persistence entries of removed services {:?} / backends {:?}",
                removed.services,
                removed.backends
            );
        }
        self.generation += 1;
        self.shared.store(Arc::new(self.snapshot()));
        Ok(())
    }

    fn start_monitors(&mut self) {
        self.monitors = self
            .cfg
            .pools
            .iter()
            .zip(&self.health)
            .filter_map(|(p, hs)| {
                let m = p.health_monitor.as_ref()?;
                let initial: Vec<bool> =
                    hs.iter().map(|h| h.as_ref().is_none_or(|h| h.up)).collect();
                Some(PoolMonitor::start(p, m, &initial, self.events.clone()))
            })
            .collect();
    }

    fn on_health(&mut self, ev: HealthEvent) -> Result<()> {
        let Some(pi) = self.cfg.pools.iter().position(|p| p.name == ev.pool) else {
            return Ok(());
        };
        let Some(bi) = self.cfg.pools[pi]
            .backends
            .iter()
            .position(|b| b.name == ev.backend)
        else {
            return Ok(());
        };
        let slot = &mut self.health[pi][bi];
        if slot.as_ref().is_some_and(|h| h.up == ev.up) {
            return Ok(());
        }
        let b = &self.cfg.pools[pi].backends[bi];
        if ev.up {
            log::info!(
                "backend {} ({}) of pool {} is up",
                b.name,
                b.address,
                ev.pool
            );
        } else {
            log::warn!(
                "backend {} ({}) of pool {} is down: {}",
                b.name,
                b.address,
                ev.pool,
                ev.detail
            );
        }
        *slot = Some(Health {
            up: ev.up,
            detail: ev.detail,
            since: SystemTime::now(),
        });
        self.program()
    }

    /// Apply a new config file, or change nothing and say why.
    async fn reload(&mut self) -> Result<()> {
        let new = Arc::new(Config::load(&self.config_path)?);
        let fixed: [(&'static str, String, String); 6] = [
            (
                "interface",
                self.cfg.interface.clone(),
                new.interface.clone(),
            ),
            (
                "pin_dir",
                self.cfg.pin_dir.display().to_string(),
                new.pin_dir.display().to_string(),
            ),
            (
                "persist_table_entries",
                self.cfg.persist_table_entries.to_string(),
                new.persist_table_entries.to_string(),
            ),
            (
                "xdp_mode",
                format!("{:?}", self.cfg.xdp_mode),
                format!("{:?}", new.xdp_mode),
            ),
            (
                "admin_listen",
                self.cfg.admin_listen.to_string(),
                new.admin_listen.to_string(),
            ),
            (
                "state_dir",
                self.cfg.state_dir.display().to_string(),
                new.state_dir.display().to_string(),
            ),
        ];
        if let Some((field, old, new)) = fixed.into_iter().find(|(_, o, n)| o != n) {
            return Err(ControlError::NeedsRestart { field, old, new });
        }
        let l2 = resolve_l2_async(new.clone()).await?;
        let ks = self.dp.kernel_state()?;
        let ids = balancer::assign_ids(&new, &ks.previous)?;
        // Health carries over by (pool, backend) name while the pool keeps a monitor; new
        // backends are probed once.
        let mut carried: HashMap<(String, String), Health> = HashMap::new();
        for (p, hs) in self.cfg.pools.iter().zip(&self.health) {
            for (b, h) in p.backends.iter().zip(hs) {
                if let Some(h) = h {
                    carried.insert((p.name.clone(), b.name.clone()), h.clone());
                }
            }
        }
        let health = health_of(&new, |p, b| {
            carried.get(&(p.name.clone(), b.name.clone())).cloned()
        })
        .await;
        // Everything is known: switch over.
        self.cfg = new;
        self.ids = ids;
        self.l2 = l2;
        self.health = health;
        self.program()?;
        self.start_monitors();
        self.sync_proxies().await
    }
}

/// Run the daemon until SIGINT/SIGTERM.
pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = Arc::new(Config::load(config_path)?);
    let l2 = resolve_l2_async(cfg.clone()).await?;
    let dp = Dataplane::load(&cfg.pin_dir, cfg.persist_table_entries)?;
    let ks = dp.kernel_state()?;
    let ids = balancer::assign_ids(&cfg, &ks.previous)?;
    if !ks.previous.backends.is_empty() {
        log::info!(
            "found {} services and {} backends from an earlier run in {}: ids and persistence carry over",
            ks.previous.services.len(),
            ks.previous.backends.len(),
            cfg.pin_dir.display()
        );
    }
    let previous: HashMap<u32, u32> = ks.backend_states.iter().copied().collect();
    let started = SystemTime::now();
    let health = health_of(&cfg, |p, b| {
        let state = previous.get(&lb_common::backend_identity(&p.name, &b.name))?;
        Some(Health {
            up: *state != lb_common::BACKEND_DOWN,
            detail: String::new(),
            since: started,
        })
    })
    .await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut d = Daemon {
        config_path: config_path.to_owned(),
        cfg: cfg.clone(),
        dp,
        ids,
        l2,
        health,
        monitors: Vec::new(),
        events: tx,
        // Replaced by the first `program()`; readers start after that.
        shared: Arc::new(ArcSwap::from_pointee(Snapshot::empty(cfg.clone(), started))),
        mode: Attached::Native,
        generation: 0,
        started,
        proxies: HashMap::new(),
        restored: HashMap::new(),
    };
    let shared = d.shared.clone();
    // Tables before the attach: the first packet the new program sees finds complete services.
    d.program()?;
    d.dp.pin_program()?;
    d.mode = d.dp.attach(&cfg.interface, cfg.xdp_mode)?;
    shared.store(Arc::new(d.snapshot()));
    let mode = d.mode;

    let listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|source| ControlError::Admin {
            addr: cfg.admin_listen,
            source,
        })?;
    let (stop_admin, admin_stopped) = watch::channel(false);
    let admin = tokio::spawn(crate::admin::serve(listener, shared.clone(), admin_stopped));
    d.start_monitors();
    d.load_l7_state();
    d.sync_proxies().await?;
    d.restored.clear();

    let mut term = signal(SignalKind::terminate()).map_err(ControlError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ControlError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ControlError::Signal)?;
    log::info!(
        "tether ready: {} virtual services, {} backends on {} ({mode:?} XDP), maps pinned in {}, admin API on http://{}",
        cfg.services.len(),
        cfg.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
        cfg.interface,
        cfg.pin_dir.display(),
        cfg.admin_listen
    );
    // The L7 tables go to disk every second: a crash loses at most the last second's.
    let mut save_tick = tokio::time::interval(L7_SAVE_INTERVAL);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal = loop {
        tokio::select! {
            _ = save_tick.tick(), if !d.proxies.is_empty() => {
                if let Err(e) = tokio::task::block_in_place(|| d.save_l7_state()) {
                    log::warn!("saving the L7 tables to {}: {e}", d.cfg.state_dir.display());
                }
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => match d.reload().await {
                Ok(()) => log::info!("reloaded {}: generation {}", d.config_path.display(), d.generation),
                Err(e) => log::error!("reload refused, still serving generation {}: {e}", d.generation),
            },
            Some(ev) = rx.recv() => {
                if let Err(e) = d.on_health(ev) {
                    log::error!("reprogramming after a health change failed: {e}");
                }
            }
        }
    };
    d.monitors.clear();
    for p in d.proxies.values() {
        let _ = p.stop.send(true);
    }
    if !d.proxies.is_empty() {
        match d.save_l7_state() {
            Ok(n) => log::info!("saved {n} L7 bindings to {}", d.cfg.state_dir.display()),
            Err(e) => log::error!("saving the L7 tables to {}: {e}", d.cfg.state_dir.display()),
        }
    }
    let _ = stop_admin.send(true);
    let _ = admin.await;
    log::info!(
        "tether stopped ({signal}): XDP stays attached to {} through {} and keeps forwarding with the last tables; `tether stop --detach --config {}` removes it",
        cfg.interface,
        crate::dataplane::link_pin(&cfg.pin_dir, &cfg.interface).display(),
        config_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests;
