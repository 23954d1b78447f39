//! Kernel counters and their Prometheus text exposition (format 0.0.4).
//!
//! Rendering is a pure function of the snapshot, the summed counters and the persistence
//! census, so it is tested without BPF.

use std::{collections::HashMap, fmt::Write as _, path::Path};

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use lb_common::{MAP_BACKEND_STATS, MAP_REASONS, MAP_SERVICE_STATS, TrafficCounters, reason};

use crate::{dataplane::persist_table::Census, state::Snapshot};

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

const SERVICE_COUNTERS: [(&str, &str, Field); 7] = [
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
];

const BACKEND_COUNTERS: [(&str, &str, Field); 6] = [
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
    render_l7(&mut out, snap);
    if let Some(census) = census {
        family(
            &mut out,
            "tether_persist_entries",
            "gauge",
            "Entries in the persistence table, expired ones included (refreshed every few seconds).",
        );
        let _ = writeln!(out, "tether_persist_entries {}", census.entries);
    }
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

pub fn protocol(p: crate::config::Protocol) -> &'static str {
    match p {
        crate::config::Protocol::Tcp => "tcp",
        crate::config::Protocol::Udp => "udp",
    }
}
