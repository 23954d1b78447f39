//! What the control loop publishes for readers (admin API, metrics, status): an immutable
//! snapshot swapped atomically with arc-swap, so readers never wait on the control loop.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
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
    /// Invalid cookies, by `Reject` (treated as absent and re-issued).
    pub rejected: [AtomicU64; 5],
}

impl RouterStats {
    pub fn reject(&self, r: Reject) {
        let i = Reject::ALL.iter().position(|x| *x == r).expect("listed");
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
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
