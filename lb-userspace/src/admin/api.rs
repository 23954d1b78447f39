//! JSON bodies of the admin API, shared by the server and the CLI client. The schema is
//! documented in the [`admin`](super) module.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::TrafficCounters;
use serde::{Deserialize, Serialize};

/// `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub generation: u64,
    pub xdp_mode: String,
    pub uptime_s: u64,
    /// Entries in the persistence table (expired included) at the last census; `null` when
    /// the table could not be read.
    pub persist_entries: Option<u64>,
    /// The persistence table's capacity, the new-binding cap and what the data path did.
    pub persist_table: PersistTableStatus,
    pub services: Vec<ServiceStatus>,
    /// Packets per verdict reason, every reason present.
    pub reasons: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistTableStatus {
    pub capacity: u32,
    pub possible_cpus: u32,
    /// Each CPU's share: a CPU that fills it evicts its least recently used bindings.
    pub per_cpu_capacity: u32,
    /// New bindings each CPU may create per second (0: no cap).
    pub new_bindings_per_cpu_s: u32,
    pub bindings_created: u64,
    pub bindings_rate_limited: u64,
    /// TCP packets without SYN and without a binding: forwarded by Maglev, not stored.
    pub non_syn_unbound: u64,
    /// New bindings not output to the mirror's ring buffer because it was full.
    #[serde(default)]
    pub binding_events_dropped: u64,
    /// `null` when the table could not be read.
    pub evictions_estimate: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub pool: String,
    pub persistence: Option<PersistenceStatus>,
    pub counters: Counters,
    pub backends: Vec<BackendStatus>,
    /// `l7` services: the proxy's persistence decisions and tables (absent for `l4-dsr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Status>,
}

/// The L7 engine of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L7Status {
    /// Decision counters by name (`persist_hits`, `new_assignments`, `cookies_issued`,
    /// `cookies_learned`, `fallback_hits`, `reassigned_down`, `refused_down`, `expired`,
    /// and `rejected_<reason>` for invalid cookies).
    pub counters: BTreeMap<String, u64>,
    /// Bindings in the service's L7 tables (expired included).
    pub entries: u64,
    /// The persistence method (the profile type; `none` without a profile).
    #[serde(default)]
    pub method: String,
    /// HTTP requests (or TLS connections, SIP datagrams) the proxy received.
    #[serde(default)]
    pub requests: u64,
    /// Bindings that ended by age (table entries and cookies or tickets past their lifetime).
    #[serde(default)]
    pub expirations: u64,
    /// Each table: the method's, then `fallback`.
    #[serde(default)]
    pub tables: Vec<L7TableStatus>,
}

/// One L7 persistence table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7TableStatus {
    pub table: String,
    pub entries: u64,
    pub capacity: u64,
}

/// What a service's L7 engine decided for one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7BackendStatus {
    /// Requests sent by a binding.
    pub hits: u64,
    /// New clients balanced to it.
    pub new_assignments: u64,
    /// Its clients moved elsewhere or refused because it was down or disabled.
    pub reassigned_down: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistenceStatus {
    pub profile: String,
    pub timeout_s: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// `immediate` or `never`: what a binding to a backend that is down does.
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    /// Kernel backend id.
    pub id: u32,
    pub address: IpAddr,
    pub weight: u32,
    /// `enabled`, `draining` or `disabled` (the operator's intent).
    pub admin_state: String,
    /// `up`, `down`, `draining` or `disabled` (what the data path does).
    pub state: String,
    /// `null` when the pool has no health monitor.
    pub health: Option<HealthStatus>,
    /// Live persistence entries of this service bound to this backend; `null` when the
    /// table could not be read.
    pub bound_clients: Option<u64>,
    /// Counters of the backend (shared by every service whose pool holds it).
    pub counters: Counters,
    /// `l7` services: live bindings of the service's L7 tables to this backend (absent for
    /// `l4-dsr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7_bound_clients: Option<u64>,
    /// `l7` services: the engine's decisions for this backend (absent for `l4-dsr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthStatus {
    pub up: bool,
    pub detail: String,
    pub since_unix: u64,
}

/// Summed per-CPU traffic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub persist_hits: u64,
    pub new_assignments: u64,
    pub expired: u64,
    pub reassigned_down: u64,
    pub no_backend: u64,
}

impl From<TrafficCounters> for Counters {
    fn from(c: TrafficCounters) -> Counters {
        Counters {
            packets: c.packets,
            bytes: c.bytes,
            persist_hits: c.persist_hits,
            new_assignments: c.new_assignments,
            expired: c.expired,
            reassigned_down: c.reassigned_down,
            no_backend: c.no_backend,
        }
    }
}

/// `GET /persist`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistList {
    pub entries: Vec<PersistRow>,
    /// More entries matched than the response holds (`MAX_PERSIST_ROWS`).
    pub truncated: bool,
    /// Bindings of the L7 proxies' tables (at most `MAX_PERSIST_ROWS`, then `truncated`);
    /// absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l7: Vec<L7Row>,
}

/// One binding of an L7 table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L7Row {
    pub service: String,
    /// The method's type (`client-ip`, `app-cookie`, `url-hash`, ...) or `fallback`.
    pub table: String,
    /// Client tables: the stored (masked) address and its prefix length.
    pub client: Option<IpAddr>,
    pub prefix_len: Option<u8>,
    /// Key tables: the key's 128-bit digest in hex (the key itself is not kept).
    pub key_digest: Option<String>,
    /// Backend name; `null` for a backend no longer in the service's pool.
    pub backend: Option<String>,
    pub backend_address: Option<IpAddr>,
    pub age_s: u64,
    pub open_connections: u32,
    pub expired: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistRow {
    /// Service name; `null` for an entry of a service no longer configured.
    pub service: Option<String>,
    pub service_index: u32,
    /// The stored (masked) client address.
    pub client: IpAddr,
    pub prefix_len: u8,
    /// Backend name; `null` for a backend id no longer configured.
    pub backend: Option<String>,
    pub backend_id: u32,
    pub backend_address: Option<IpAddr>,
    pub age_s: u64,
    pub expired: bool,
}

/// `POST /persist/flush`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReply {
    /// Kernel (L4) entries deleted.
    pub flushed: usize,
    /// L7 bindings deleted (absent when none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub l7_flushed: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
