//! Mirroring of the stored persistence tables between instances through Redis (Avi's
//! persistence mirroring), so that a client moved to another instance (ECMP change,
//! scale-out, an instance's loss) keeps its backend.
//!
//! - **Binding never waits on Redis.** A binding is made locally; the table's watcher
//!   ([`crate::engine::table::Watcher`]) queues it on a bounded channel (full: dropped and
//!   counted, `tether_mirror_dropped_total`), and one task writes batches to Redis.
//! - **One write rule, the same on every instance** ([`codec::BIND_SCRIPT`]): a key absent
//!   from Redis takes the first binding written (first writer wins); a re-binding replaces
//!   Redis' value only when that value is the backend the writer moved the client off
//!   (compare-and-swap); otherwise the writer adopts Redis' value into its own table
//!   (`tether_mirror_conflicts_total`). Every written binding is announced on a channel, and
//!   every instance applies the others' announcements to its tables.
//! - **Refreshes** keep a used binding alive in Redis: every table is swept at a quarter of
//!   its timeout (1 s to 60 s) and the keys used since are written again (TTL = the
//!   profile's timeout).
//! - **Redis down or slow** (1 s connect and command timeouts): tether serves from its own
//!   tables; bindings wait in a bounded queue (`tether_mirror_pending`, the oldest one's age
//!   in `tether_mirror_lag_seconds`), failures are counted, and the task reconnects with
//!   backoff (0.1 s doubling to 5 s). On every (re)connection it writes what waited, then
//!   every live binding of its tables (a restarted Redis has lost everything), then reads
//!   every binding Redis holds (what the others wrote meanwhile).
//! - **Sentinel** (`mirroring.sentinel`): every (re)connection first asks the sentinels
//!   which server is master, so a failover is one more reconnection, and the full write
//!   on connecting restores what a lagging replica had not received.
//! - **Cluster** (`mirroring.cluster`, `con`): a script call per key (a call's keys must
//!   share a hash slot), the channel subscribed on one node (a cluster passes every
//!   `PUBLISH` to every node), the catch-up's `SCAN` sent to every master, `MGET` split by
//!   slot by the cluster client.
//! - **A local miss asks Redis where the input can wait** (L7 HTTP requests, TLS
//!   pass-through connections, SIP over UDP in a task of its own; [`lookup`]): one `MGET` of the
//!   keys the request was looked up by, bounded by `mirroring.lookup_timeout_ms`; a binding found is taken into the
//!   local table and honoured. So a client reaches its backend on another instance even
//!   before (or without) the channel's announcement. Not while disconnected: the request is
//!   decided locally at once (`tether_mirror_lookups_skipped_total`); nor beyond
//!   `lookup::MAX_IN_FLIGHT` lookups at once (`tether_mirror_lookups_shed_total`).
//! - **Reloads** ([`Mirror::reconfigure`]): the mirror lives as long as the daemon (the
//!   tables keep the watcher it installed); another Redis or instance name reconnects it, a
//!   removed section idles it (what the tables send is discarded).

pub mod codec;
mod con;
mod lookup;
#[cfg(test)]
mod tests;
mod worker;
pub mod xdp;

use std::{
    collections::HashSet,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::{
    config::mirroring::{Mirroring, Redis, redact},
    engine::{Engine, methods::TableRef},
};

/// Bindings waiting for Redis, in the channel and in the task's own queue each.
pub const QUEUE_CAPACITY: usize = 65536;

/// The mirror's counters, shown in `/metrics`.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Bindings written to Redis (new, re-bound or refreshed).
    pub published: AtomicU64,
    /// Bindings not queued because the queue was full.
    pub dropped: AtomicU64,
    /// Other instances' bindings taken into this instance's tables.
    pub applied: AtomicU64,
    /// Local bindings replaced by Redis' (another instance bound the key first).
    pub conflicts: AtomicU64,
    /// Failed connections and commands.
    pub failures: AtomicU64,
    /// Successful (re)connections.
    pub connections: AtomicU64,
    /// 1 while connected.
    pub connected: AtomicU64,
    /// Bindings waiting to be written.
    pub pending: AtomicU64,
    /// Age of the oldest binding waiting, in milliseconds.
    pub lag_ms: AtomicU64,
    /// XDP new-binding events read from the ring buffer.
    pub xdp_events: AtomicU64,
    /// L7 local misses looked up in Redis.
    pub lookups: AtomicU64,
    /// Lookups that found a binding.
    pub lookup_hits: AtomicU64,
    /// Lookups Redis did not answer within the timeout.
    pub lookup_timeouts: AtomicU64,
    /// Lookups that failed (connection lost, command error).
    pub lookup_errors: AtomicU64,
    /// Local misses not looked up because Redis was not connected.
    pub lookups_skipped: AtomicU64,
    /// Local misses not looked up because `lookup::MAX_IN_FLIGHT` lookups were already
    /// waiting for Redis.
    pub lookups_shed: AtomicU64,
}

impl MirrorStats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// One binding to write.
#[derive(Debug, Clone)]
pub struct Event {
    pub service: Arc<str>,
    pub table: Arc<str>,
    pub key: u128,
    pub backend: u32,
    /// The backend the key was bound to before, locally (a re-binding).
    pub previous: Option<u32>,
    pub ttl_ms: u64,
    /// When it was queued (for the lag).
    pub at: Instant,
}

/// A live binding of the XDP table, for the sweeps.
#[derive(Debug, Clone)]
pub struct XdpBinding {
    pub service: String,
    pub key: u128,
    pub backend: u32,
    pub ttl_ms: u64,
    /// Since the data path last used it.
    pub age: std::time::Duration,
}

/// Where other instances' bindings go, besides the L7 engines: the XDP persistence table.
pub trait XdpTarget: Send + Sync {
    /// Bind `key` (a masked client address, IPv4-mapped) of L4 service `service` to
    /// backend identity `backend`.
    fn apply(&self, service: &str, key: u128, backend: u32) -> bool;
    /// Every live binding, for the sweeps: (service, key, backend, TTL in ms, age). A walk
    /// of the kernel table: blocking, about a second per million entries.
    fn live(&self) -> Vec<XdpBinding>;
}

/// The running mirror of one daemon.
pub struct Mirror {
    tx: mpsc::Sender<Event>,
    /// The `mirroring` in force (`None`: removed by a reload; the task idles).
    target: tokio::sync::watch::Sender<Option<Mirroring>>,
    /// True once the task has connected and read what Redis holds.
    caught_up: tokio::sync::watch::Receiver<bool>,
    engines: Arc<ArcSwap<Vec<Arc<Engine>>>>,
    /// What the engines ask on a local miss.
    lookups: Arc<lookup::Lookups>,
    pub stats: Arc<MirrorStats>,
    task: tokio::task::JoinHandle<()>,
}

/// The running mirror's counters, for `/metrics` (a daemon runs at most one mirror).
static STATS: OnceLock<Arc<MirrorStats>> = OnceLock::new();

impl Mirror {
    /// Start the mirror task (on the current Tokio runtime). It connects in the background:
    /// a Redis that is down delays nothing.
    pub fn start(cfg: &Mirroring, xdp: Option<Arc<dyn XdpTarget>>) -> Mirror {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let stats = STATS.get_or_init(Default::default).clone();
        let engines = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let (caught_tx, caught_up) = tokio::sync::watch::channel(false);
        let lookups = Arc::new(lookup::Lookups::new(cfg.lookup_timeout, stats.clone()));
        let (target, target_rx) = tokio::sync::watch::channel(Some(cfg.clone()));
        let task = tokio::spawn(worker::serve(
            worker::Worker {
                caught_up: caught_tx,
                instance: String::new(),
                rx,
                engines: engines.clone(),
                xdp,
                lookups: lookups.clone(),
                stats: stats.clone(),
            },
            target_rx,
        ));
        log::info!(
            "mirroring stored persistence tables through {} as instance {:?}",
            describe(&cfg.redis),
            cfg.instance
        );
        Mirror {
            tx,
            target,
            caught_up,
            engines,
            lookups,
            stats,
            task,
        }
    }

    /// Take a reloaded `mirroring`: another Redis or instance name reconnects (the local
    /// tables stay, and every live binding is written to the new Redis), `None` stops
    /// mirroring (bindings are no longer sent). Whether anything changed.
    pub fn reconfigure(&self, cfg: Option<&Mirroring>) -> bool {
        let changed = self.target.send_if_modified(|t| {
            if t.as_ref() == cfg {
                return false;
            }
            *t = cfg.cloned();
            true
        });
        if changed {
            match cfg {
                Some(m) => log::info!(
                    "mirroring: now through {} as instance {:?}",
                    describe(&m.redis),
                    m.instance
                ),
                None => log::info!("mirroring: off (removed from the config)"),
            }
        }
        changed
    }

    /// Wait until the first catch-up with Redis is done, at most `limit`; whether it was.
    /// A new instance says it is ready only after it (or the limit), so a client moved to
    /// it by a scale-out finds its binding.
    pub async fn wait_caught_up(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.caught_up.clone();
        tokio::time::timeout(limit, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A sender for bindings made outside the engines (the XDP ring buffer's reader).
    pub fn sender(&self) -> mpsc::Sender<Event> {
        self.tx.clone()
    }

    /// The engines that run now: their tables are watched (new ones from now on) and
    /// other instances' bindings are applied to them.
    pub fn set_engines<'a>(&self, engines: impl Iterator<Item = &'a Arc<Engine>>) {
        let engines: Vec<Arc<Engine>> = engines.cloned().collect();
        let current = self.engines.load();
        let same = current.len() == engines.len()
            && current.iter().zip(&engines).all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return;
        }
        for e in &engines {
            watch_engine(e, &self.tx, &self.stats);
            e.set_remote(Some(self.lookups.clone()));
        }
        self.engines.store(Arc::new(engines));
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
        self.lookups.con.store(None);
        let ours: Arc<dyn crate::engine::mirrored::Remote> = self.lookups.clone();
        for e in self.engines.load().iter() {
            e.unset_remote(&ours);
        }
    }
}

/// Queue `ev`, never waiting: a full queue drops it (counted).
pub fn offer(tx: &mpsc::Sender<Event>, stats: &MirrorStats, ev: Event) {
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(ev) {
        MirrorStats::bump(&stats.dropped);
    }
}

fn watch_engine(e: &Engine, tx: &mpsc::Sender<Event>, stats: &Arc<MirrorStats>) {
    let service: Arc<str> = e.service_name().into();
    let mut seen = HashSet::new();
    for (id, t) in e.tables_by_id() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let table: Arc<str> = id.into();
        let (tx, stats, service) = (tx.clone(), stats.clone(), service.clone());
        let send = move |key: u128, backend: u32, previous: Option<u32>, ttl_ms: u64| {
            offer(
                &tx,
                &stats,
                Event {
                    service: service.clone(),
                    table: table.clone(),
                    key,
                    backend,
                    previous,
                    ttl_ms,
                    at: Instant::now(),
                },
            );
        };
        match t {
            TableRef::Clients { table, .. } => {
                let ttl = table.timeout().as_millis() as u64;
                table.watch(Box::new(move |k, b, p| {
                    send(u128::from_be_bytes(*k), b, p, ttl)
                }));
            }
            TableRef::Keys(table) => {
                let ttl = table.timeout().as_millis() as u64;
                table.watch(Box::new(move |k, b, p| send(*k, b, p, ttl)));
            }
        }
    }
}

/// Which Redis, without passwords, for logs.
fn describe(redis: &Redis) -> String {
    match redis {
        Redis::Server(url) => redact(url),
        Redis::Sentinel(s) => {
            let nodes: Vec<String> = s.nodes.iter().map(|n| redact(n)).collect();
            format!(
                "master {:?} of the sentinels {}",
                s.master,
                nodes.join(", ")
            )
        }
        Redis::Cluster(c) => {
            let nodes: Vec<String> = c.nodes.iter().map(|n| redact(n)).collect();
            format!("the cluster of {}", nodes.join(", "))
        }
    }
}

/// The `tether_mirror_*` metrics, when this daemon mirrors; `ring_drops` is the data
/// path's count of binding events the full ring buffer dropped
/// (`lb_common::event::BINDING_EVENT_DROPPED`).
pub fn render_metrics(out: &mut String, ring_drops: u64) {
    use std::fmt::Write as _;
    let Some(s) = STATS.get() else {
        return;
    };
    let _ = writeln!(
        out,
        "# HELP tether_mirror_xdp_ring_drops_total New XDP bindings not output to the ring buffer because it was full (the reader fell behind); they reach Redis with the next sweep of the table."
    );
    let _ = writeln!(out, "# TYPE tether_mirror_xdp_ring_drops_total counter");
    let _ = writeln!(out, "tether_mirror_xdp_ring_drops_total {ring_drops}");
    let rows: [(&str, &str, &str, &AtomicU64); 16] = [
        (
            "tether_mirror_published_total",
            "counter",
            "Bindings written to Redis (new, re-bound, refreshed).",
            &s.published,
        ),
        (
            "tether_mirror_dropped_total",
            "counter",
            "Bindings not mirrored because the queue to Redis was full.",
            &s.dropped,
        ),
        (
            "tether_mirror_applied_total",
            "counter",
            "Other instances' bindings taken into this instance's tables.",
            &s.applied,
        ),
        (
            "tether_mirror_conflicts_total",
            "counter",
            "Local bindings replaced by the one Redis holds (another instance bound the key first).",
            &s.conflicts,
        ),
        (
            "tether_mirror_failures_total",
            "counter",
            "Failed Redis connections and commands.",
            &s.failures,
        ),
        (
            "tether_mirror_connections_total",
            "counter",
            "Successful connections to Redis.",
            &s.connections,
        ),
        (
            "tether_mirror_connected",
            "gauge",
            "1 while connected to Redis.",
            &s.connected,
        ),
        (
            "tether_mirror_pending",
            "gauge",
            "Bindings waiting to be written to Redis.",
            &s.pending,
        ),
        (
            "tether_mirror_xdp_events_total",
            "counter",
            "New XDP bindings read from the ring buffer.",
            &s.xdp_events,
        ),
        (
            "tether_mirror_lookups_total",
            "counter",
            "L7 requests whose key no local table held, looked up in Redis.",
            &s.lookups,
        ),
        (
            "tether_mirror_lookup_hits_total",
            "counter",
            "Lookups in Redis that found a binding.",
            &s.lookup_hits,
        ),
        (
            "tether_mirror_lookup_timeouts_total",
            "counter",
            "Lookups Redis did not answer within mirroring.lookup_timeout_ms (decided locally).",
            &s.lookup_timeouts,
        ),
        (
            "tether_mirror_lookup_errors_total",
            "counter",
            "Lookups that failed (decided locally).",
            &s.lookup_errors,
        ),
        (
            "tether_mirror_lookups_skipped_total",
            "counter",
            "Local misses not looked up because Redis was not connected (decided locally at once).",
            &s.lookups_skipped,
        ),
        (
            "tether_mirror_lookups_shed_total",
            "counter",
            "Local misses not looked up because the most lookups allowed at once were already waiting for Redis (decided locally at once).",
            &s.lookups_shed,
        ),
        (
            "tether_mirror_lag_seconds",
            "gauge",
            "Age of the oldest binding waiting to be written to Redis.",
            &s.lag_ms,
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let v = v.load(Ordering::Relaxed);
        if name.ends_with("_seconds") {
            let _ = writeln!(out, "{name} {:.3}", v as f64 / 1000.0);
        } else {
            let _ = writeln!(out, "{name} {v}");
        }
    }
}
