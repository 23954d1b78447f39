//! What the control loop publishes for readers (admin API, metrics, status): an immutable
//! snapshot swapped atomically with arc-swap, so readers never wait on the control loop.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use lb_common::{BACKEND_DISABLED, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP};

use crate::{
    config::{AdminState, Config},
    cookie::Reject,
};

/// Effective state of a backend, as written to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Healthy and enabled with a positive weight: in the Maglev table.
    Up,
    /// Failed its health check: persisted clients move (`immediate`) or stay (`never`).
    Down,
    /// Admin draining, or weight 0: keeps persisted clients, gets no new ones.
    Draining,
    /// Admin disabled: treated as down for persisted clients, gets no new ones.
    Disabled,
}

impl BackendState {
    /// Combine the operator's intent, the weight and health. Disabled wins, then down
    /// (a draining backend that fails its check loses its clients like any down one).
    pub fn effective(admin: AdminState, weight: u32, healthy: bool) -> BackendState {
        match (admin, healthy) {
            (AdminState::Disabled, _) => BackendState::Disabled,
            (_, false) => BackendState::Down,
            (AdminState::Draining, true) => BackendState::Draining,
            (AdminState::Enabled, true) if weight == 0 => BackendState::Draining,
            (AdminState::Enabled, true) => BackendState::Up,
        }
    }

    pub fn to_kernel(self) -> u32 {
        match self {
            BackendState::Up => BACKEND_UP,
            BackendState::Down => BACKEND_DOWN,
            BackendState::Draining => BACKEND_DRAINING,
            BackendState::Disabled => BACKEND_DISABLED,
        }
    }

    pub fn from_kernel(v: u32) -> Option<BackendState> {
        match v {
            BACKEND_UP => Some(BackendState::Up),
            BACKEND_DOWN => Some(BackendState::Down),
            BACKEND_DRAINING => Some(BackendState::Draining),
            BACKEND_DISABLED => Some(BackendState::Disabled),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
        }
    }

    /// Takes new clients (is in the Maglev table).
    pub fn in_table(self) -> bool {
        self == BackendState::Up
    }
}

/// Health of one backend as last reported by its monitor (`None` in `Snapshot::health` when
/// the pool has no monitor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Why the last check failed (empty when it passed).
    pub detail: String,
    pub since: SystemTime,
}

/// One published view of the running configuration and its kernel ids.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// Kernel service index of each `config.services[i]`.
    pub service_index: Vec<u32>,
    /// Kernel backend id of each `config.pools[p].backends[b]`.
    pub backend_ids: Vec<Vec<u32>>,
    /// Effective state of each backend.
    pub backend_state: Vec<Vec<BackendState>>,
    pub health: Vec<Vec<Option<Health>>>,
    /// `native` or `generic`.
    pub xdp_mode: &'static str,
    /// Bumped on every publish (reload, health change).
    pub generation: u64,
    pub started: SystemTime,
    /// Counters of each running L7 proxy and its persistence router, by service name.
    pub l7: Vec<L7Counters>,
}

/// Live counters of one L7 virtual service (shared with its proxy tasks).
#[derive(Debug, Clone)]
pub struct L7Counters {
    pub service: String,
    pub router: Arc<RouterStats>,
    pub proxy: Arc<crate::proxy::ProxyStats>,
    /// The service's persistence tables, for listing and flushing.
    pub tables: Arc<dyn L7Tables>,
    /// A UDP (SIP) service's counters.
    pub udp: Option<Arc<UdpStats>>,
}

/// One binding of an L7 persistence table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7Binding {
    /// The table: the method's type (`client-ip`, `app-cookie`, `url-hash`, ...) or
    /// `fallback` for the "... or source IP" table.
    pub table: &'static str,
    /// Client tables: the stored (masked) address and its prefix length.
    pub client: Option<(IpAddr, u8)>,
    /// Key tables: the 128-bit digest of the key (cookie value, header, ...); the key itself
    /// is never stored.
    pub key_digest: Option<u128>,
    /// Backend identity (`lb_common::backend_identity`).
    pub backend: u32,
    /// Since the binding was last used (or its last connection closed).
    pub idle: Duration,
    /// Open client connections holding it (client tables of `client-ip`).
    pub open_connections: u32,
    /// Idle past the timeout with no connection open: the next request is balanced anew.
    pub expired: bool,
}

/// Which L7 bindings an operation applies to; empty matches all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L7Filter {
    /// Any address of the client, masked with each table's prefix (key tables never match).
    pub client: Option<IpAddr>,
    /// Backend identity.
    pub backend: Option<u32>,
}

/// The L7 persistence tables of one service, as the admin API sees them (implemented by the
/// engine; defined here so that readers of the snapshot need not know the engine).
pub trait L7Tables: Send + Sync + std::fmt::Debug {
    /// Bindings matching `f`.
    fn bindings(&self, f: &L7Filter) -> Vec<L7Binding>;
    /// Remove the bindings matching `f`; returns how many were removed.
    fn flush(&self, f: &L7Filter) -> usize;
    /// Live (not expired) bindings per backend identity.
    fn bound(&self) -> HashMap<u32, u64>;
    /// The persistence method's profile type (`http-cookie`, `client-ip`, ...); `none`
    /// for a service without persistence.
    fn method(&self) -> &'static str {
        "none"
    }
    /// The size of each table, the method's then the fallback's.
    fn sizes(&self) -> Vec<L7TableSize> {
        Vec::new()
    }
}

/// Counters of one L7 service's persistence decisions. Kept here, below the engine that
/// counts and the admin API that reads them, so neither imports the other.
#[derive(Default, Debug)]
pub struct RouterStats {
    /// Requests sent where a cookie, table entry or fallback said.
    pub persist_hits: AtomicU64,
    /// Requests balanced by the pool's algorithm.
    pub new_assignments: AtomicU64,
    /// Active cookies issued (Set-Cookie added).
    pub cookies_issued: AtomicU64,
    /// App-cookie values learned from backends' Set-Cookie.
    pub cookies_learned: AtomicU64,
    /// Requests decided by the source-IP fallback.
    pub fallback_hits: AtomicU64,
    /// Persisted clients moved because their backend was down (policy `immediate`).
    pub reassigned_down: AtomicU64,
    /// Requests refused with 503 because the persisted backend is down (policy `never`).
    pub refused_down: AtomicU64,
    /// Table entries found expired.
    pub expired: AtomicU64,
    /// TLS session IDs and TLS 1.2 tickets learned from passed-through servers.
    pub tls_sessions_learned: AtomicU64,
    /// Passed-through TLS 1.3 handshakes: no session ID to persist on.
    pub tls13_unpersisted: AtomicU64,
    /// Live table entries evicted (least recently used) to make room for a new key.
    pub table_evictions: AtomicU64,
    /// New table entries not stored: the client was over its new-key quota.
    pub keys_refused: AtomicU64,
    /// Invalid cookies, by `Reject` (treated as absent and re-issued).
    pub rejected: [AtomicU64; 5],
    /// Persistence scripts that failed (a Lua error, a bad answer, an unknown backend name):
    /// the request was balanced by the pool.
    pub script_errors: AtomicU64,
    /// Persistence scripts cut off by their instruction budget or memory cap.
    pub script_cutoffs: AtomicU64,
    /// Per-backend counters by backend identity, registered when a snapshot generation is
    /// first prepared (not on the request path, which only adds to the atomics).
    backends: std::sync::Mutex<HashMap<u32, Arc<BackendL7Stats>>>,
}

/// What one L7 service's engine decided for one backend.
#[derive(Default, Debug)]
pub struct BackendL7Stats {
    /// Requests sent to it by a binding (cookie, table entry or fallback).
    pub hits: AtomicU64,
    /// New clients balanced to it.
    pub new_assignments: AtomicU64,
    /// Clients bound to it moved elsewhere (policy `immediate`) or refused (policy `never`)
    /// because it was down or disabled.
    pub reassigned_down: AtomicU64,
}

/// A reading of [`BackendL7Stats`].
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendL7Counts {
    pub hits: u64,
    pub new_assignments: u64,
    pub reassigned_down: u64,
}

impl BackendL7Stats {
    pub fn read(&self) -> BackendL7Counts {
        BackendL7Counts {
            hits: self.hits.load(Ordering::Relaxed),
            new_assignments: self.new_assignments.load(Ordering::Relaxed),
            reassigned_down: self.reassigned_down.load(Ordering::Relaxed),
        }
    }
}

/// Size of one L7 persistence table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7TableSize {
    /// As in [`L7Binding::table`].
    pub table: &'static str,
    /// Entries held, expired ones not yet removed included.
    pub entries: u64,
    pub capacity: u64,
}

/// Reads one counter of [`RouterStats`].
pub type RouterField = fn(&RouterStats) -> u64;

impl RouterStats {
    /// Every counter but `rejected`: (name, help, value).
    pub const FIELDS: [(&'static str, &'static str, RouterField); 14] = [
        (
            "persist_hits",
            "Requests sent where a cookie, table entry or fallback said.",
            |r| r.persist_hits.load(Ordering::Relaxed),
        ),
        (
            "new_assignments",
            "Requests balanced by the pool's algorithm.",
            |r| r.new_assignments.load(Ordering::Relaxed),
        ),
        (
            "cookies_issued",
            "Persistence cookies issued (Set-Cookie added).",
            |r| r.cookies_issued.load(Ordering::Relaxed),
        ),
        (
            "cookies_learned",
            "Server cookie values learned from backends.",
            |r| r.cookies_learned.load(Ordering::Relaxed),
        ),
        (
            "fallback_hits",
            "Requests decided by the source-IP fallback.",
            |r| r.fallback_hits.load(Ordering::Relaxed),
        ),
        (
            "reassigned_down",
            "Persisted clients moved off a down backend.",
            |r| r.reassigned_down.load(Ordering::Relaxed),
        ),
        (
            "refused_down",
            "Requests answered 503 because the persisted backend is down (policy never).",
            |r| r.refused_down.load(Ordering::Relaxed),
        ),
        ("expired", "Persistence table entries found expired.", |r| {
            r.expired.load(Ordering::Relaxed)
        }),
        (
            "table_evictions",
            "Live persistence table entries evicted to make room for a new key (table full).",
            |r| r.table_evictions.load(Ordering::Relaxed),
        ),
        (
            "keys_refused",
            "New persistence keys not stored: the client source was over its per-minute quota.",
            |r| r.keys_refused.load(Ordering::Relaxed),
        ),
        (
            "script_errors",
            "Persistence scripts that failed (error, bad answer, unknown backend); balanced by the pool.",
            |r| r.script_errors.load(Ordering::Relaxed),
        ),
        (
            "script_cutoffs",
            "Persistence scripts cut off by their instruction budget or memory cap; balanced by the pool.",
            |r| r.script_cutoffs.load(Ordering::Relaxed),
        ),
        (
            "tls_sessions_learned",
            "TLS session IDs and tickets learned from passed-through servers.",
            |r| r.tls_sessions_learned.load(Ordering::Relaxed),
        ),
        (
            "tls13_unpersisted",
            "Passed-through TLS 1.3 handshakes, which carry no session ID to persist on.",
            |r| r.tls13_unpersisted.load(Ordering::Relaxed),
        ),
    ];

    pub fn reject(&self, r: Reject) {
        let i = Reject::ALL.iter().position(|x| *x == r).expect("listed");
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of backend `identity` (created on first use).
    pub fn backend(&self, identity: u32) -> Arc<BackendL7Stats> {
        let mut m = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(identity).or_default().clone()
    }

    /// The counters of backend `identity` so far (zero when it never had a decision).
    pub fn backend_counts(&self, identity: u32) -> BackendL7Counts {
        let m = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&identity).map(|b| b.read()).unwrap_or_default()
    }

    /// Bindings that ended by age: table entries found idle past the timeout, and
    /// persistence cookies (or tickets) presented after their lifetime.
    pub fn expirations(&self) -> u64 {
        let cookie = Reject::ALL
            .iter()
            .position(|r| *r == Reject::Expired)
            .expect("listed");
        self.expired.load(Ordering::Relaxed) + self.rejected[cookie].load(Ordering::Relaxed)
    }
}

impl Snapshot {
    /// A snapshot with no ids yet (before the first programming of the kernel).
    pub fn empty(config: Arc<Config>, started: SystemTime) -> Snapshot {
        Snapshot {
            config,
            service_index: Vec::new(),
            backend_ids: Vec::new(),
            backend_state: Vec::new(),
            health: Vec::new(),
            xdp_mode: "native",
            generation: 0,
            started,
            l7: Vec::new(),
        }
    }

    pub fn pin_dir(&self) -> &PathBuf {
        &self.config.pin_dir
    }

    /// (pool index, backend index) of a kernel backend id.
    pub fn backend_by_id(&self, id: u32) -> Option<(usize, usize)> {
        self.backend_ids
            .iter()
            .enumerate()
            .find_map(|(p, ids)| ids.iter().position(|&i| i == id).map(|b| (p, b)))
    }

    /// Config index of a kernel service index.
    pub fn service_by_index(&self, index: u32) -> Option<usize> {
        self.service_index.iter().position(|&i| i == index)
    }
}

/// The shared handle: the control loop stores, readers `load()`.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Counters of one UDP service.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Datagrams received from clients.
    pub received: AtomicU64,
    /// Datagrams sent to a backend.
    pub forwarded: AtomicU64,
    /// Datagrams from backends sent on to their client.
    pub replies: AtomicU64,
    /// Not a SIP message (or a malformed one): dropped.
    pub dropped_malformed: AtomicU64,
    /// No backend could take it (or, policy `never`, its backend is down): dropped.
    pub dropped_no_backend: AtomicU64,
    /// A new client over `max_flows`: dropped.
    pub dropped_flow_limit: AtomicU64,
    /// A datagram to a flow's socket from an address the flow never sent to: dropped.
    pub dropped_foreign: AtomicU64,
    /// A send failed (to a backend or to a client).
    pub send_errors: AtomicU64,
    pub flows_opened: AtomicU64,
    pub flows_closed: AtomicU64,
}

impl UdpStats {
    /// (name, counter) for listings.
    pub fn fields(&self) -> [(&'static str, &AtomicU64); 10] {
        [
            ("received", &self.received),
            ("forwarded", &self.forwarded),
            ("replies", &self.replies),
            ("dropped_malformed", &self.dropped_malformed),
            ("dropped_no_backend", &self.dropped_no_backend),
            ("dropped_flow_limit", &self.dropped_flow_limit),
            ("dropped_foreign", &self.dropped_foreign),
            ("send_errors", &self.send_errors),
            ("flows_opened", &self.flows_opened),
            ("flows_closed", &self.flows_closed),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_state_precedence() {
        use AdminState::*;
        assert_eq!(BackendState::effective(Enabled, 1, true), BackendState::Up);
        assert_eq!(
            BackendState::effective(Enabled, 0, true),
            BackendState::Draining,
            "weight 0 drains"
        );
        assert_eq!(
            BackendState::effective(Enabled, 1, false),
            BackendState::Down
        );
        assert_eq!(
            BackendState::effective(Draining, 1, true),
            BackendState::Draining
        );
        assert_eq!(
            BackendState::effective(Draining, 1, false),
            BackendState::Down
        );
        assert_eq!(
            BackendState::effective(Disabled, 1, true),
            BackendState::Disabled
        );
        assert_eq!(
            BackendState::effective(Disabled, 0, false),
            BackendState::Disabled
        );
        for s in [
            BackendState::Up,
            BackendState::Down,
            BackendState::Draining,
            BackendState::Disabled,
        ] {
            assert_eq!(BackendState::from_kernel(s.to_kernel()), Some(s));
        }
        assert_eq!(BackendState::from_kernel(lb_common::BACKEND_UNUSED), None);
    }
}
