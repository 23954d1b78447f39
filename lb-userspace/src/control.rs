//! The daemon's control loop: start (or take over from an earlier run), then react to health
//! transitions and SIGHUP reloads by reprogramming the kernel, until SIGINT/SIGTERM.
//!
//! Continuity rules (what operators rely on):
//! - ids carry over: services keep their index (by VIP, port, protocol) and backends their id
//!   (by pool and name), read back from the pinned maps, so persisted clients keep their server
//!   across restarts and reloads;
//! - the XDP program stays attached through a pinned link while the daemon is down, and a new
//!   daemon replaces the program on that link atomically;
//! - a reload that fails validation (or resolution, or a TLS file that does not load)
//!   changes nothing that runs; L7 listening sockets are kept across reloads
//!   ([`crate::frontends`]);
//! - a starting daemon takes the listening sockets over from a running one, which drains
//!   and exits ([`crate::handoff`]): an L7 restart refuses no connection.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd as _,
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
    admin::objects::store::{ApplyRequest, Refused, Store, write_atomic},
    balancer::{self, IdError, Ids, L2},
    config::{BackendConfig, Config, LoadError},
    dataplane::{Attached, Dataplane, DataplaneError, Removed, net},
    frontends::{FrontendError, Frontends, Inherited},
    handoff::{self, HandoffError},
    health::{self, HealthEvent, PoolMonitor},
    state::{BackendState, Health, SharedSnapshot, Snapshot},
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
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    #[error("admin API socket {path}: {source}")]
    AdminSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    AdminToken(#[from] crate::admin::access::TokenError),
    #[error("writing the config back to {path}: {source}")]
    WriteBack {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("{field} cannot change while running (it is {old}, the new config says {new}): {how}")]
    NeedsRestart {
        field: &'static str,
        old: String,
        new: String,
        /// How to apply the change.
        how: &'static str,
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
    /// The L7 virtual services' listeners, routers and proxies.
    frontends: Frontends,
    /// The admin API's listening socket (kept open across a handoff's stop and resume).
    admin_socket: std::net::TcpListener,
    /// Who may use the TCP admin API (the bearer token, Host and Origin checks).
    admin_access: crate::admin::access::Access,
    /// The CLI's 0600 Unix socket, and the guard that removes its file on exit.
    admin_unix: std::os::unix::net::UnixListener,
    _admin_unix_file: crate::admin::access::SocketFile,
    admin: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    /// The config file as the admin API's object store; its changes come back to the
    /// control loop as [`ApplyRequest`]s.
    objects: Arc<Store>,
    /// While a starting daemon has not committed, persistence entries of removed services
    /// and backends are kept (a failed start must lose nothing): they collect here.
    deferred_forget: Option<Removed>,
    /// The Redis mirror, once a config had `mirroring`.
    mirror: mirroring::MirrorSlot,
}

impl Daemon {
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
            l7: self.frontends.counters(),
        }
    }

    /// Write the current config, ids and health to the kernel and publish the snapshot.
    fn program(&mut self) -> Result<()> {
        let st = states(&self.cfg, &self.health);
        let plan = balancer::plan(&self.cfg, &self.ids, &st, |p, b| {
            Ok::<_, ControlError>(self.l2[p][b])
        })?;
        let removed = self.dp.apply(&plan)?;
        if let Some(d) = &mut self.deferred_forget {
            d.services.extend(removed.services);
            d.backends.extend(removed.backends);
        } else {
            self.forget(&removed)?;
        }
        self.generation += 1;
        self.shared.store(Arc::new(self.snapshot()));
        Ok(())
    }

    /// Delete the persistence entries of removed services and backends.
    fn forget(&mut self, removed: &Removed) -> Result<()> {
        let forgotten = self.dp.forget(removed)?;
        if forgotten > 0 {
            log::info!(
                "removed {forgotten} persistence entries of removed services {:?} / backends {:?}",
                removed.services,
                removed.backends
            );
        }
        Ok(())
    }

    /// Serve the admin API on a duplicate of its socket.
    fn start_admin(&mut self) -> Result<()> {
        let addr = self.cfg.admin_listen;
        let err = |source| ControlError::Admin { addr, source };
        let dup = self.admin_socket.try_clone().map_err(err)?;
        dup.set_nonblocking(true).map_err(err)?;
        let listener = tokio::net::TcpListener::from_std(dup).map_err(err)?;
        let unix_err = |source| ControlError::AdminSocket {
            path: crate::admin::access::socket_path(&self.cfg.pin_dir),
            source,
        };
        let unix = self.admin_unix.try_clone().map_err(unix_err)?;
        unix.set_nonblocking(true).map_err(unix_err)?;
        let unix = tokio::net::UnixListener::from_std(unix).map_err(unix_err)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(crate::admin::serve(
            crate::admin::Listeners {
                tcp: Some((listener, self.admin_access.clone())),
                unix: Some(unix),
            },
            self.shared.clone(),
            Some(Arc::clone(&self.objects)),
            stopped,
        ));
        self.admin = Some((stop, task));
        Ok(())
    }

    /// Stop serving the admin API (the socket stays open); returns the task to await.
    fn stop_admin(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let (stop, task) = self.admin.take()?;
        let _ = stop.send(true);
        Some(task)
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
        self.apply(new, None).await
    }

    /// Apply a validated config, or change nothing and say why. With `write_back` (a change
    /// made through the admin API) the config file is replaced with that text once
    /// everything is prepared and before anything changes: a restart or a SIGHUP then
    /// finds what runs.
    async fn apply(&mut self, new: Arc<Config>, write_back: Option<&str>) -> Result<()> {
        let fixed: [(&'static str, String, String); 7] = [
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
            (
                "admin_token_file",
                self.cfg.admin_token_path().display().to_string(),
                new.admin_token_path().display().to_string(),
            ),
        ];
        if let Some((field, old, new)) = fixed.into_iter().find(|(_, o, n)| o != n) {
            let how = if field == "persist_table_entries" {
                // The loader reuses pinned tables whatever their size.
                "a restart keeps the pinned tables' size and layout; to resize, run `tether stop --detach` (or remove the pins TETHER_PERSIST, TETHER_PERSIST4 and every TETHER_PERS4_*) and start tether (the bindings are lost)"
            } else {
                "restart tether to apply it"
            };
            return Err(ControlError::NeedsRestart {
                field,
                old,
                new,
                how,
            });
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
        // Routers, TLS configurations (read again: a certificate renewed in place is taken)
        // and sockets for new addresses, before anything changes.
        let prepared = self
            .frontends
            .prepare(&new, &self.shared, &mut Inherited::default())?;
        if let Some(text) = write_back {
            write_atomic(&self.config_path, text).map_err(|source| ControlError::WriteBack {
                path: self.config_path.clone(),
                source,
            })?;
        }
        let rekeyed = rekey::rekeyed_l4(&self.cfg, &self.ids, &new, &ids);
        // Everything is known: switch over.
        self.cfg = new;
        self.ids = ids;
        self.l2 = l2;
        self.health = health;
        self.program()?;
        rekey::flush(&self.cfg.pin_dir, &rekeyed);
        self.start_monitors();
        self.frontends.commit(prepared);
        let engines = self.frontends.routers().map(|(_, e)| e);
        self.mirror.apply(&self.cfg, &self.shared, engines);
        self.shared.store(Arc::new(self.snapshot()));
        Ok(())
    }
}

impl handoff::Handing for Daemon {
    fn sockets(&self) -> handoff::Sockets<'_> {
        handoff::Sockets {
            listeners: self.frontends.sockets(),
            admin: Some((self.cfg.admin_listen, self.admin_socket.as_fd())),
            udp: self.frontends.udp_sockets(),
        }
    }

    fn stop_accepting(&mut self) {
        self.frontends.stop_accepting("handed over");
        // Its connections finish in the background; the next process answers new ones.
        drop(self.stop_admin());
        if let Err(e) = handoff::save_l7_state(&self.cfg, self.frontends.routers()) {
            log::error!("saving the L7 persistence state for the next process: {e}");
        }
    }

    fn resume(&mut self, stopped: bool) {
        if stopped {
            self.frontends.resume(&self.cfg);
            if let Err(e) = self.start_admin() {
                log::error!("{e}");
            }
        }
        // The new process may have written the maps and replaced the program: ours again.
        self.dp.forget_written_tables();
        let restored = self
            .program()
            .and_then(|()| Ok(self.dp.pin_program()?))
            .and_then(|()| Ok(self.dp.attach(&self.cfg.interface, self.cfg.xdp_mode)?));
        if let Err(e) = restored {
            log::error!("restoring the kernel state after a failed handoff: {e}");
        }
    }
}

/// How long a starting daemon with `mirroring` waits to read Redis' bindings before it
/// says it is ready.
const MIRROR_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(3);

/// Run the daemon until SIGINT/SIGTERM, or until a new daemon took over (see
/// [`crate::handoff`]).
pub async fn run(config_path: &Path, workers: crate::workers::Workers) -> Result<()> {
    let cfg = Arc::new(Config::load(config_path)?);
    let l2 = resolve_l2_async(cfg.clone()).await?;
    // A running daemon hands its sockets over and waits (frozen) until we commit or fail.
    let socket_path = handoff::socket_path(&cfg.pin_dir);
    let mut takeover = match handoff::connect(&socket_path).await? {
        Some(chan) => {
            log::info!(
                "a tether runs for {}: taking its listening sockets over ({})",
                cfg.pin_dir.display(),
                socket_path.display()
            );
            Some(handoff::Takeover::begin(chan).await?)
        }
        None => None,
    };
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
    let admin_socket = match takeover.as_mut().and_then(|t| t.admin.take()) {
        Some((addr, s)) if addr == cfg.admin_listen => s,
        _ => {
            std::net::TcpListener::bind(cfg.admin_listen).map_err(|source| ControlError::Admin {
                addr: cfg.admin_listen,
                source,
            })?
        }
    };
    let token = crate::admin::access::load_or_create_token(&cfg.admin_token_path())?;
    let unix_path = crate::admin::access::socket_path(&cfg.pin_dir);
    let admin_unix = crate::admin::access::bind_unix(&unix_path).map_err(|source| {
        ControlError::AdminSocket {
            path: unix_path.clone(),
            source,
        }
    })?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (apply_tx, mut applies) = mpsc::channel::<ApplyRequest>(16);
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
        frontends: Frontends::new(workers),
        admin_socket,
        admin_access: crate::admin::access::Access::new(cfg.admin_listen, token),
        admin_unix,
        _admin_unix_file: crate::admin::access::SocketFile::new(unix_path),
        admin: None,
        objects: Arc::new(Store::new(config_path.to_owned(), apply_tx)),
        deferred_forget: takeover.as_ref().map(|_| Removed::default()),
        mirror: Default::default(),
    };
    let shared = d.shared.clone();
    // Tables before the attach: the first packet the new program sees finds complete services.
    d.program()?;
    d.dp.pin_program()?;
    d.mode = d.dp.attach(&cfg.interface, cfg.xdp_mode)?;
    shared.store(Arc::new(d.snapshot()));
    let mode = d.mode;
    let mut inherited = takeover
        .as_mut()
        .map(|t| Inherited {
            listeners: std::mem::take(&mut t.listeners),
            udp: std::mem::take(&mut t.udp),
        })
        .unwrap_or_default();
    let prepared = d.frontends.prepare(&cfg, &d.shared, &mut inherited)?;
    // Sockets of services this config no longer has: the old daemon's copies drain.
    drop(inherited);
    if let Some(t) = &takeover {
        t.stop_old().await?;
    }
    if let Err(e) = handoff::load_l7_state(&cfg, prepared.routers()) {
        log::error!("loading the L7 persistence state: {e}; starting with empty tables");
    }
    if let Some(t) = &takeover {
        t.commit().await?;
    }
    if let Some(removed) = d.deferred_forget.take() {
        d.forget(&removed)?;
    }
    d.frontends.commit(prepared);
    let engines = d.frontends.routers().map(|(_, e)| e);
    d.mirror.apply(&cfg, &d.shared, engines);
    d.start_admin()?;
    d.start_monitors();
    shared.store(Arc::new(d.snapshot()));

    let (requests, mut handoffs) = mpsc::channel(4);
    let server = match handoff::Server::start(&socket_path, requests) {
        Ok(s) => Some(s),
        Err(e) => {
            log::error!("{e}: `tether restart` and seamless takeovers are unavailable");
            None
        }
    };
    let pid_path = handoff::pid_path(&cfg.pin_dir);
    if let Err(e) = write_pid(&pid_path) {
        log::error!("writing {}: {e}", pid_path.display());
    }
    if let Some(m) = d.mirror.mirror()
        && !m.wait_caught_up(MIRROR_CATCH_UP).await
    {
        log::warn!(
            "mirroring: not caught up with Redis within {MIRROR_CATCH_UP:?}; serving from local tables meanwhile"
        );
    }
    if let Err(e) = crate::notify::ready() {
        log::warn!("telling the service manager we are ready: {e}");
    }
    if let Some(t) = takeover {
        t.ready().await;
    }
    let (ready_tx, ready_rx) = watch::channel(None);
    let mut restarts = tokio::task::JoinSet::new();

    let mut term = signal(SignalKind::terminate()).map_err(ControlError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ControlError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ControlError::Signal)?;
    log::info!(
        "tether ready: {} virtual services, {} backends on {} ({mode:?} XDP), maps pinned in {}, admin API on {} and http://{}",
        cfg.services.len(),
        cfg.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
        cfg.interface,
        cfg.pin_dir.display(),
        crate::admin::access::socket_path(&cfg.pin_dir).display(),
        cfg.admin_listen
    );
    // The L7 tables go to disk every second: a crash loses at most the last second's.
    let mut save_tick = tokio::time::interval(L7_SAVE_INTERVAL);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended = loop {
        tokio::select! {
            _ = save_tick.tick(), if d.frontends.has_l7_tables() => {
                let r = tokio::task::block_in_place(|| {
                    // What a predecessor learned while it drained, once it has finished.
                    if let Err(e) = handoff::merge_drained_l7_state(&d.cfg, d.frontends.routers()) {
                        log::warn!("merging the previous process's L7 tables: {e}");
                    }
                    handoff::save_l7_state(&d.cfg, d.frontends.routers())
                });
                if let Err(e) = r {
                    log::warn!("saving the L7 tables to {}: {e}", d.cfg.state_dir.display());
                }
                // Engines a reload replaced or added.
                d.mirror.set_engines(d.frontends.routers().map(|(_, e)| e));
            }
            _ = term.recv() => break Ended::Signal("SIGTERM"),
            _ = int.recv() => break Ended::Signal("SIGINT"),
            _ = hup.recv() => match d.reload().await {
                Ok(()) => log::info!("reloaded {}: generation {}", d.config_path.display(), d.generation),
                Err(e) => log::error!("reload refused, still serving generation {}: {e}", d.generation),
            },
            Some(req) = applies.recv() => {
                if !req.base_is_current(&d.config_path) {
                    log::warn!(
                        "admin API change refused: {} changed since the change read it",
                        d.config_path.display()
                    );
                    let _ = req.reply.send(Err(Refused::Stale));
                    continue;
                }
                let r = d.apply(req.config, Some(&req.text)).await;
                match &r {
                    Ok(()) => log::info!(
                        "applied a change made through the admin API and wrote {}: generation {}",
                        d.config_path.display(),
                        d.generation
                    ),
                    Err(e) => log::warn!(
                        "admin API change refused, still serving generation {}: {e}",
                        d.generation
                    ),
                }
                let _ = req
                    .reply
                    .send(r.map(|()| d.generation).map_err(|e| Refused::Failed(e.to_string())));
            }
            Some(ev) = rx.recv() => {
                if let Err(e) = d.on_health(ev) {
                    log::error!("reprogramming after a health change failed: {e}");
                }
            }
            Some(req) = handoffs.recv() => match req {
                handoff::Request::Restart { chan, config, exe } => {
                    restarts.spawn(handoff::spawn_restart(chan, &config, &exe, ready_rx.clone()));
                }
                handoff::Request::Takeover { chan, pid } => {
                    match handoff::hand_over(&chan, pid, &mut d).await {
                        handoff::Outcome::Committed { pid, ready } => {
                            if ready {
                                let _ = ready_tx.send(Some(pid));
                            }
                            break Ended::HandedOver(pid);
                        }
                        handoff::Outcome::Aborted(why) => log::error!(
                            "handoff to process {pid} failed; still serving generation {}: {why}",
                            d.generation
                        ),
                    }
                }
            },
            Some(_) = restarts.join_next(), if !restarts.is_empty() => {}
        }
    };
    d.monitors.clear();
    // Our successor listens at the handoff path now (or nobody should).
    drop(server);
    match ended {
        Ended::Signal(signal) => {
            d.frontends.stop_accepting(signal);
            if let Err(e) = handoff::save_l7_state(&d.cfg, d.frontends.routers()) {
                log::error!("saving the L7 persistence state: {e}");
            }
        }
        Ended::HandedOver(pid) => {
            // Answer `tether restart` before draining.
            let answered = async { while restarts.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(handoff::STEP_TIMEOUT, answered).await;
            log::info!(
                "process {pid} took over; draining L7 connections for up to {:?}",
                d.cfg.drain_timeout
            );
            // SIGTERM or SIGINT cut the drain short.
            tokio::select! {
                () = d.frontends.drain(d.cfg.drain_timeout) => {}
                _ = term.recv() => log::info!("SIGTERM: connections still draining are cut"),
                _ = int.recv() => log::info!("SIGINT: connections still draining are cut"),
            }
            // Bindings learned on the connections that drained, which the successor loaded
            // before they were: it merges them on its next save tick.
            if let Err(e) = handoff::save_drained_l7_state(&d.cfg, d.frontends.routers()) {
                log::error!("saving the L7 tables learned while draining: {e}");
            }
        }
    }
    if let Some(admin) = d.stop_admin() {
        let _ = admin.await;
    }
    remove_pid_if_ours(&pid_path);
    match ended {
        Ended::Signal(signal) => log::info!(
            "tether stopped ({signal}): XDP stays attached to {} through {} and keeps forwarding with the last tables; `tether stop --detach --config {}` removes it",
            cfg.interface,
            crate::dataplane::link_pin(&cfg.pin_dir, &cfg.interface).display(),
            config_path.display()
        ),
        Ended::HandedOver(pid) => log::info!("tether stopped: handed over to process {pid}"),
    }
    Ok(())
}

/// Why the control loop ended.
#[derive(Clone, Copy)]
enum Ended {
    Signal(&'static str),
    HandedOver(u32),
}

fn write_pid(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("pid.new");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Remove the pid file unless a successor has written its own.
fn remove_pid_if_ours(path: &Path) {
    let ours =
        std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

mod mirroring;
mod rekey;
#[cfg(test)]
mod tests;
