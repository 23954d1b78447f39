//! Kernel counters and their Prometheus text exposition (format 0.0.4).
//!
//! Rendering is a pure function of the snapshot, the summed counters and the persistence
//! census, so it is tested without BPF.

use std::{collections::HashMap, fmt::Write as _, path::Path};

use aya::maps::{Array, Map, MapData, MapError, MapInfo, PerCpuArray};
use lb_common::{
    Globals, MAP_BACKEND_STATS, MAP_EVENTS, MAP_GLOBALS, MAP_PERSIST4, MAP_REASONS,
    MAP_SERVICE_STATS, TrafficCounters, event, reason,
};

use crate::{dataplane::persist_table::Census, state::Snapshot};

mod l7;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Per-CPU counters summed, for the services and backends of one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// By kernel service index.
    pub services: HashMap<u32, TrafficCounters>,
    /// By backend id.
    pub backends: HashMap<u32, TrafficCounters>,
    /// Packets per verdict reason (`lb_common::reason`).
    pub reasons: [u64; reason::COUNT as usize],
    /// Data-path events (`lb_common::event`).
    pub events: [u64; event::COUNT as usize],
    /// The persistence table's size and how the data path fills it.
    pub table: TableFacts,
}

/// The persistence table as created, and the cap on new bindings in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableFacts {
    pub capacity: u32,
    pub possible_cpus: u32,
    /// New bindings each CPU may make per second (0: no cap).
    pub new_bindings_per_cpu_s: u32,
}

impl TableFacts {
    /// Each CPU's share of the table (`BPF_F_NO_COMMON_LRU`).
    pub fn per_cpu(&self) -> u32 {
        self.capacity / self.possible_cpus.max(1)
    }
}

impl KernelCounters {
    /// LRU evictions, estimated: bindings the data path created that are neither in the
    /// table now nor deleted by the daemon (`entries` from a census).
    pub fn evictions_estimate(&self, entries: u64) -> u64 {
        let created = self.events[event::BINDING_CREATED as usize];
        let deleted = self.events[event::USER_DELETED as usize];
        created.saturating_sub(entries + deleted)
    }
}

impl KernelCounters {
    pub fn service(&self, index: u32) -> TrafficCounters {
        self.services.get(&index).copied().unwrap_or_default()
    }

    pub fn backend(&self, id: u32) -> TrafficCounters {
        self.backends.get(&id).copied().unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("opening pinned map {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        source: MapError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
}

fn per_cpu<V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<PerCpuArray<MapData, V>, CountersError> {
    let path = pin_dir.join(name);
    let md = MapData::from_pin(&path).map_err(|source| CountersError::Open { path, source })?;
    let err = |source| CountersError::Map { name, source };
    PerCpuArray::try_from(Map::from_map_data(md).map_err(err)?).map_err(err)
}

/// Read the counters of the services and backends `snap` names (one lookup each).
pub fn read(pin_dir: &Path, snap: &Snapshot) -> Result<KernelCounters, CountersError> {
    let mut out = KernelCounters::default();
    let svc = per_cpu::<TrafficCounters>(pin_dir, MAP_SERVICE_STATS)?;
    for &i in &snap.service_index {
        let v = svc.get(&i, 0).map_err(|source| CountersError::Map {
            name: MAP_SERVICE_STATS,
            source,
        })?;
        out.services.insert(i, TrafficCounters::sum(v.iter()));
    }
    let be = per_cpu::<TrafficCounters>(pin_dir, MAP_BACKEND_STATS)?;
    for &id in snap.backend_ids.iter().flatten() {
        let v = be.get(&id, 0).map_err(|source| CountersError::Map {
            name: MAP_BACKEND_STATS,
            source,
        })?;
        out.backends.insert(id, TrafficCounters::sum(v.iter()));
    }
    let reasons = per_cpu::<u64>(pin_dir, MAP_REASONS)?;
    for (r, slot) in out.reasons.iter_mut().enumerate() {
        let v = reasons
            .get(&(r as u32), 0)
            .map_err(|source| CountersError::Map {
                name: MAP_REASONS,
                source,
            })?;
        *slot = v.iter().sum();
    }
    let events = per_cpu::<u64>(pin_dir, MAP_EVENTS)?;
    for (e, slot) in out.events.iter_mut().enumerate() {
        let v = events
            .get(&(e as u32), 0)
            .map_err(|source| CountersError::Map {
                name: MAP_EVENTS,
                source,
            })?;
        *slot = v.iter().sum();
    }
    // Both families' tables are created for the configured size; the IPv4 one (its shards
    // together: their capacity may round the configured size up) stands for both.
    let path = pin_dir.join(MAP_PERSIST4);
    let shard0 = MapInfo::from_pin(&path)
        .map_err(|source| CountersError::Open { path, source })?
        .max_entries();
    out.table.capacity = crate::dataplane::persist_table::pinned_layout(pin_dir)
        .map_or(shard0 as u64, |l| l.capacity())
        .min(u32::MAX as u64) as u32;
    out.table.possible_cpus = crate::dataplane::possible_cpus();
    let path = pin_dir.join(MAP_GLOBALS);
    let md = MapData::from_pin(&path).map_err(|source| CountersError::Open { path, source })?;
    let err = |source| CountersError::Map {
        name: MAP_GLOBALS,
        source,
    };
    let globals: Array<MapData, Globals> =
        Array::try_from(Map::from_map_data(md).map_err(err)?).map_err(err)?;
    out.table.new_bindings_per_cpu_s = globals.get(&0, 0).map_err(err)?.new_bindings_per_cpu;
    Ok(out)
}

/// Escape a label value: backslash, double quote and newline.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// `{a="x",b="y"}` with escaped values.
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape_label(v));
    }
    s.push('}');
    s
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

type Field = fn(&TrafficCounters) -> u64;

const SERVICE_COUNTERS: [(&str, &str, Field); 8] = [
    (
        "packets",
        "Packets forwarded to a backend of the virtual service.",
        |c| c.packets,
    ),
    (
        "bytes",
        "Bytes (whole frames) forwarded to a backend of the virtual service.",
        |c| c.bytes,
    ),
    (
        "persist_hits",
        "Packets whose client had a live persistence entry.",
        |c| c.persist_hits,
    ),
    (
        "new_assignments",
        "Persistence entries created for new clients.",
        |c| c.new_assignments,
    ),
    (
        "expired",
        "Persistence entries found expired and chosen again.",
        |c| c.expired,
    ),
    (
        "reassigned_down",
        "Persistence entries moved because their backend was not usable.",
        |c| c.reassigned_down,
    ),
    (
        "no_backend",
        "Packets dropped because the pool had no usable backend.",
        |c| c.no_backend,
    ),
    (
        "flow_hits",
        "Packets of a service without persistence sent by their connection-table entry.",
        |c| c.flow_hits,
    ),
];

const BACKEND_COUNTERS: [(&str, &str, Field); 7] = [
    ("packets", "Packets forwarded to the backend.", |c| {
        c.packets
    }),
    (
        "bytes",
        "Bytes (whole frames) forwarded to the backend.",
        |c| c.bytes,
    ),
    (
        "persist_hits",
        "Packets sent to the backend by a live persistence entry.",
        |c| c.persist_hits,
    ),
    (
        "new_assignments",
        "New clients bound to the backend.",
        |c| c.new_assignments,
    ),
    (
        "expired",
        "Clients bound to the backend after their entry expired.",
        |c| c.expired,
    ),
    (
        "reassigned_down",
        "Clients moved to the backend because theirs was not usable.",
        |c| c.reassigned_down,
    ),
    (
        "flow_hits",
        "Packets sent to the backend by their flow's connection-table entry.",
        |c| c.flow_hits,
    ),
];

const STATES: [crate::state::BackendState; 4] = [
    crate::state::BackendState::Up,
    crate::state::BackendState::Down,
    crate::state::BackendState::Draining,
    crate::state::BackendState::Disabled,
];

/// The exposition text. Bound-client and table-size metrics are left out when `census` is
/// `None` (the persistence table could not be read).
pub fn render(snap: &Snapshot, c: &KernelCounters, census: Option<&Census>) -> String {
    let cfg = &snap.config;
    let mut out = String::with_capacity(4096);

    let svc_labels: Vec<(u32, String)> = cfg
        .services
        .iter()
        .zip(&snap.service_index)
        .map(|(s, &index)| {
            let vip = s.vip.to_string();
            let port = s.port.to_string();
            let l = labels(&[
                ("service", &s.name),
                ("vip", &vip),
                ("port", &port),
                ("protocol", protocol(s.protocol)),
            ]);
            (index, l)
        })
        .collect();
    for (name, help, field) in SERVICE_COUNTERS {
        let metric = format!("tether_service_{name}_total");
        family(&mut out, &metric, "counter", help);
        for (index, l) in &svc_labels {
            let _ = writeln!(out, "{metric}{l} {}", field(&c.service(*index)));
        }
    }

    // (backend id, label pairs, pool index, backend index), pool by pool.
    let mut backends = Vec::new();
    for (pi, pool) in cfg.pools.iter().enumerate() {
        for (bi, b) in pool.backends.iter().enumerate() {
            let Some(&id) = snap.backend_ids.get(pi).and_then(|ids| ids.get(bi)) else {
                continue;
            };
            let addr = b.address.to_string();
            let pairs = [
                ("pool", pool.name.clone()),
                ("backend", b.name.clone()),
                ("address", addr),
            ];
            backends.push((id, pairs, pi, bi));
        }
    }
    let base = |pairs: &[(&'static str, String); 3], extra: Option<(&'static str, &str)>| {
        let mut v: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        v.extend(extra);
        labels(&v)
    };
    for (name, help, field) in BACKEND_COUNTERS {
        let metric = format!("tether_backend_{name}_total");
        family(&mut out, &metric, "counter", help);
        for (id, pairs, _, _) in &backends {
            let _ = writeln!(
                out,
                "{metric}{} {}",
                base(pairs, None),
                field(&c.backend(*id))
            );
        }
    }
    let state_of = |pi: usize, bi: usize| {
        snap.backend_state
            .get(pi)
            .and_then(|s| s.get(bi))
            .copied()
            .unwrap_or(crate::state::BackendState::Down)
    };
    family(
        &mut out,
        "tether_backend_up",
        "gauge",
        "1 when the backend takes new clients (healthy, enabled, weight > 0).",
    );
    for (_, pairs, pi, bi) in &backends {
        let up = u8::from(state_of(*pi, *bi).in_table());
        let _ = writeln!(out, "tether_backend_up{} {up}", base(pairs, None));
    }
    family(
        &mut out,
        "tether_backend_state",
        "gauge",
        "Effective state of the backend: 1 for the current state, 0 for the others.",
    );
    for (_, pairs, pi, bi) in &backends {
        let cur = state_of(*pi, *bi);
        for s in STATES {
            let _ = writeln!(
                out,
                "tether_backend_state{} {}",
                base(pairs, Some(("state", s.as_str()))),
                u8::from(s == cur)
            );
        }
    }
    family(
        &mut out,
        "tether_backend_weight",
        "gauge",
        "Configured weight of the backend.",
    );
    for (_, pairs, pi, bi) in &backends {
        let w = cfg.pools[*pi].backends[*bi].weight;
        let _ = writeln!(out, "tether_backend_weight{} {w}", base(pairs, None));
    }
    if let Some(census) = census {
        let bound = census.by_backend();
        family(
            &mut out,
            "tether_backend_bound_clients",
            "gauge",
            "Live persistence entries bound to the backend (all services; refreshed every few seconds).",
        );
        for (id, pairs, _, _) in &backends {
            let n = bound.get(id).copied().unwrap_or(0);
            let _ = writeln!(out, "tether_backend_bound_clients{} {n}", base(pairs, None));
        }
    }

    family(
        &mut out,
        "tether_xdp_packets_total",
        "counter",
        "Packets seen by the XDP program, by verdict reason.",
    );
    for (name, n) in reason::NAMES.iter().zip(c.reasons) {
        let _ = writeln!(
            out,
            "tether_xdp_packets_total{} {n}",
            labels(&[("reason", name)])
        );
    }
    family(
        &mut out,
        "tether_config_generation",
        "gauge",
        "Generation of the published state, bumped on every reload and health change.",
    );
    let _ = writeln!(out, "tether_config_generation {}", snap.generation);
    family(
        &mut out,
        "tether_xdp_events_total",
        "counter",
        "Data-path events that are not verdicts: bindings created, refused by the per-CPU cap, TCP packets without SYN and without a binding (forwarded, not stored), bindings deleted by the daemon, fragments tracked, binding events dropped because the mirror's ring buffer was full.",
    );
    for (name, n) in event::NAMES.iter().zip(c.events) {
        let _ = writeln!(
            out,
            "tether_xdp_events_total{} {n}",
            labels(&[("event", name)])
        );
    }
    family(
        &mut out,
        "tether_persist_capacity",
        "gauge",
        "Entries the persistence table holds: in all, and per CPU (BPF_F_NO_COMMON_LRU gives each possible CPU an equal share).",
    );
    let _ = writeln!(
        out,
        "tether_persist_capacity{} {}",
        labels(&[("scope", "total")]),
        c.table.capacity
    );
    let _ = writeln!(
        out,
        "tether_persist_capacity{} {}",
        labels(&[("scope", "per_cpu")]),
        c.table.per_cpu()
    );
    family(
        &mut out,
        "tether_persist_new_bindings_per_cpu_s",
        "gauge",
        "New bindings each CPU may create per second (0: no cap).",
    );
    let _ = writeln!(
        out,
        "tether_persist_new_bindings_per_cpu_s {}",
        c.table.new_bindings_per_cpu_s
    );
    render_l7(&mut out, snap);
    if let Some(census) = census {
        family(
            &mut out,
            "tether_persist_entries",
            "gauge",
            "Entries in the persistence table, expired ones included (refreshed every few seconds).",
        );
        let _ = writeln!(out, "tether_persist_entries {}", census.entries);
        family(
            &mut out,
            "tether_persist_evictions_estimate",
            "gauge",
            "LRU evictions estimated: bindings created that are neither in the table nor deleted by tether.",
        );
        let _ = writeln!(
            out,
            "tether_persist_evictions_estimate {}",
            c.evictions_estimate(census.entries)
        );
    }
    crate::mirror::render_metrics(&mut out, c.events[event::BINDING_EVENT_DROPPED as usize]);
    out
}

/// Counters of the L7 proxies and their persistence decisions.
fn render_l7(out: &mut String, snap: &Snapshot) {
    use std::sync::atomic::Ordering::Relaxed;

    use crate::{cookie::Reject, state::RouterStats};
    if snap.l7.is_empty() {
        return;
    }
    for (name, help, get) in RouterStats::FIELDS {
        let metric = format!("tether_l7_{name}_total");
        family(out, &metric, "counter", help);
        for l in &snap.l7 {
            let _ = writeln!(
                out,
                "{metric}{} {}",
                labels(&[("service", &l.service)]),
                get(&l.router)
            );
        }
    }
    family(
        out,
        "tether_l7_cookie_rejected_total",
        "counter",
        "Invalid persistence cookies, treated as absent, by reason.",
    );
    for l in &snap.l7 {
        for (i, r) in Reject::ALL.iter().enumerate() {
            let n = l.router.rejected[i].load(Relaxed);
            let _ = writeln!(
                out,
                "tether_l7_cookie_rejected_total{} {n}",
                labels(&[("service", &l.service), ("reason", r.as_str())])
            );
        }
    }
    family(
        out,
        "tether_l7_requests_total",
        "counter",
        "HTTP requests received by the proxy.",
    );
    for l in &snap.l7 {
        let _ = writeln!(
            out,
            "tether_l7_requests_total{} {}",
            labels(&[("service", &l.service)]),
            l.proxy.snapshot().requests
        );
    }
    family(
        out,
        "tether_l7_responses_total",
        "counter",
        "HTTP responses sent by the proxy, by status class.",
    );
    for l in &snap.l7 {
        for (i, n) in l.proxy.snapshot().responses.iter().enumerate() {
            let class = format!("{}xx", i + 1);
            let _ = writeln!(
                out,
                "tether_l7_responses_total{} {n}",
                labels(&[("service", &l.service), ("class", &class)])
            );
        }
    }
    family(
        out,
        "tether_l7_upstream_errors_total",
        "counter",
        "Backend failures seen by the proxy, by kind.",
    );
    for l in &snap.l7 {
        let s = l.proxy.snapshot();
        for (kind, n) in [
            ("connect", s.upstream_connect_errors),
            ("timeout", s.upstream_timeouts),
            ("other", s.upstream_errors),
        ] {
            let _ = writeln!(
                out,
                "tether_l7_upstream_errors_total{} {n}",
                labels(&[("service", &l.service), ("kind", kind)])
            );
        }
    }
    render_udp(out, snap);
    l7::render(out, snap);
    family(
        out,
        "tether_l7_refused_total",
        "counter",
        "Connections closed or requests answered by a protective limit, by reason: \
         max_connections, source_limit (max_connections_per_source), proxy_header_untrusted \
         (a PROXY header from a source not trusted to send one), slow_body (408), \
         backend_saturated and local_error (503).",
    );
    for l in &snap.l7 {
        let s = l.proxy.snapshot();
        for (reason, n) in [
            ("max_connections", s.connections_rejected),
            ("source_limit", s.source_rejected),
            ("proxy_header_untrusted", s.proxy_header_refused),
            ("slow_body", s.slow_bodies),
            ("backend_saturated", s.backend_saturated),
            ("local_error", s.local_errors),
        ] {
            let _ = writeln!(
                out,
                "tether_l7_refused_total{} {n}",
                labels(&[("service", &l.service), ("reason", reason)])
            );
        }
    }
    family(
        out,
        "tether_l7_retries_total",
        "counter",
        "Requests retried on another backend (never sent to the first).",
    );
    for l in &snap.l7 {
        let _ = writeln!(
            out,
            "tether_l7_retries_total{} {}",
            labels(&[("service", &l.service)]),
            l.proxy.snapshot().retries
        );
    }
    family(
        out,
        "tether_l7_tls_hello_errors_total",
        "counter",
        "TLS pass-through connections closed on a malformed, truncated or oversized ClientHello.",
    );
    for l in &snap.l7 {
        let _ = writeln!(
            out,
            "tether_l7_tls_hello_errors_total{} {}",
            labels(&[("service", &l.service)]),
            l.proxy.snapshot().tls_hello_errors
        );
    }
}

/// Counters of the L7 UDP (SIP) services.
fn render_udp(out: &mut String, snap: &Snapshot) {
    use std::sync::atomic::Ordering::Relaxed;
    if snap.l7.iter().all(|l| l.udp.is_none()) {
        return;
    }
    family(
        out,
        "tether_l7_udp_datagrams_total",
        "counter",
        "Datagrams of L7 UDP (SIP) services, by what became of them.",
    );
    for l in &snap.l7 {
        let Some(u) = &l.udp else { continue };
        for (name, c) in u.fields() {
            if name.starts_with("flows_") {
                continue;
            }
            let _ = writeln!(
                out,
                "tether_l7_udp_datagrams_total{} {}",
                labels(&[("service", &l.service), ("result", name)]),
                c.load(Relaxed)
            );
        }
    }
    family(
        out,
        "tether_l7_udp_flows",
        "gauge",
        "Client flows (upstream sockets) open in L7 UDP services.",
    );
    for l in &snap.l7 {
        let Some(u) = &l.udp else { continue };
        let _ = writeln!(
            out,
            "tether_l7_udp_flows{} {}",
            labels(&[("service", &l.service)]),
            crate::udp_proxy::active(u)
        );
    }
}

pub fn protocol(p: crate::config::Protocol) -> &'static str {
    match p {
        crate::config::Protocol::Tcp => "tcp",
        crate::config::Protocol::Udp => "udp",
    }
}
