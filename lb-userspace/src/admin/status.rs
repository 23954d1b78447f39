//! Building the JSON bodies from a snapshot (pure, tested without BPF).

use std::time::{SystemTime, UNIX_EPOCH};

use lb_common::reason;

use super::{
    api,
    metrics::{KernelCounters, protocol},
};
use crate::{
    config::{AdminState, DownPolicy},
    dataplane::persist_table::{Census, Entry},
    state::Snapshot,
};

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn admin_state(a: AdminState) -> &'static str {
    match a {
        AdminState::Enabled => "enabled",
        AdminState::Draining => "draining",
        AdminState::Disabled => "disabled",
    }
}

pub fn policy(p: DownPolicy) -> &'static str {
    match p {
        DownPolicy::Immediate => "immediate",
        DownPolicy::Never => "never",
    }
}

/// `GET /status` for `snap` at `now`.
pub fn build(
    snap: &Snapshot,
    c: &KernelCounters,
    census: Option<&Census>,
    now: SystemTime,
) -> api::Status {
    let cfg = &snap.config;
    let services = cfg
        .services
        .iter()
        .zip(&snap.service_index)
        .map(|(s, &index)| {
            let pool = &cfg.pools[s.pool];
            let backends = pool
                .backends
                .iter()
                .enumerate()
                .filter_map(|(bi, b)| {
                    let id = *snap.backend_ids.get(s.pool)?.get(bi)?;
                    let state = snap
                        .backend_state
                        .get(s.pool)
                        .and_then(|v| v.get(bi))
                        .map_or("unknown", |st| st.as_str());
                    let health = snap
                        .health
                        .get(s.pool)
                        .and_then(|v| v.get(bi))
                        .and_then(Option::as_ref)
                        .map(|h| api::HealthStatus {
                            up: h.up,
                            detail: h.detail.clone(),
                            since_unix: unix_s(h.since),
                        });
                    Some(api::BackendStatus {
                        name: b.name.clone(),
                        id,
                        address: b.address,
                        weight: b.weight,
                        admin_state: admin_state(b.admin_state).into(),
                        state: state.into(),
                        health,
                        bound_clients: census
                            .map(|c| c.live.get(&(index, id)).copied().unwrap_or(0)),
                        counters: c.backend(id).into(),
                    })
                })
                .collect();
            api::ServiceStatus {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: protocol(s.protocol).into(),
                pool: pool.name.clone(),
                persistence: cfg.profile(s).map(|p| api::PersistenceStatus {
                    profile: p.name.clone(),
                    timeout_s: p.timeout_s,
                    ipv4_prefix: p.ipv4_prefix,
                    ipv6_prefix: p.ipv6_prefix,
                    policy: policy(p.down_policy).into(),
                }),
                counters: c.service(index).into(),
                backends,
            }
        })
        .collect();
    api::Status {
        generation: snap.generation,
        xdp_mode: snap.xdp_mode.into(),
        uptime_s: now.duration_since(snap.started).map_or(0, |d| d.as_secs()),
        persist_entries: census.map(|c| c.entries),
        services,
        reasons: reason::NAMES
            .iter()
            .zip(c.reasons)
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
    }
}

/// One `GET /persist` row, with names from the snapshot.
pub fn persist_row(snap: &Snapshot, e: &Entry) -> api::PersistRow {
    let cfg = &snap.config;
    let service = snap
        .service_by_index(e.service_index)
        .and_then(|i| cfg.services.get(i))
        .map(|s| s.name.clone());
    let backend = snap
        .backend_by_id(e.backend_id)
        .and_then(|(p, b)| cfg.pools.get(p)?.backends.get(b));
    api::PersistRow {
        service,
        service_index: e.service_index,
        client: e.client,
        prefix_len: e.prefix_len,
        backend: backend.map(|b| b.name.clone()),
        backend_id: e.backend_id,
        backend_address: backend.map(|b| b.address),
        age_s: e.age.as_secs(),
        expired: e.expired,
    }
}
