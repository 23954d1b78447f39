//! Building the JSON bodies from a snapshot (pure, tested without BPF).

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::{backend_identity, event, reason};

use super::{
    api,
    metrics::{KernelCounters, protocol},
};
use crate::{
    config::{AdminState, DownPolicy},
    cookie::Reject,
    dataplane::persist_table::{Census, Entry},
    state::{L7Binding, L7Counters, RouterStats, Snapshot},
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
            let engine = snap.l7.iter().find(|l| l.service == s.name);
            let l7_bound = engine.map(|l| l.tables.bound());
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
                        l7_bound_clients: l7_bound.as_ref().map(|m| {
                            m.get(&backend_identity(&pool.name, &b.name))
                                .copied()
                                .unwrap_or(0)
                        }),
                        l7: engine.map(|l| {
                            let c = l
                                .router
                                .backend_counts(backend_identity(&pool.name, &b.name));
                            api::L7BackendStatus {
                                hits: c.hits,
                                new_assignments: c.new_assignments,
                                reassigned_down: c.reassigned_down,
                            }
                        }),
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
                l7: engine.map(l7_status),
            }
        })
        .collect();
    api::Status {
        generation: snap.generation,
        xdp_mode: snap.xdp_mode.into(),
        uptime_s: now.duration_since(snap.started).map_or(0, |d| d.as_secs()),
        persist_entries: census.map(|c| c.entries),
        persist_table: api::PersistTableStatus {
            capacity: c.table.capacity,
            possible_cpus: c.table.possible_cpus,
            per_cpu_capacity: c.table.per_cpu(),
            new_bindings_per_cpu_s: c.table.new_bindings_per_cpu_s,
            bindings_created: c.events[event::BINDING_CREATED as usize],
            bindings_rate_limited: c.events[event::BINDING_RATE_LIMITED as usize],
            non_syn_unbound: c.events[event::NON_SYN_UNBOUND as usize],
            binding_events_dropped: c.events[event::BINDING_EVENT_DROPPED as usize],
            evictions_estimate: census.map(|cs| c.evictions_estimate(cs.entries)),
        },
        services,
        reasons: reason::NAMES
            .iter()
            .zip(c.reasons)
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
    }
}

/// The L7 engine's counters and table size.
fn l7_status(l: &L7Counters) -> api::L7Status {
    let mut counters: BTreeMap<String, u64> = RouterStats::FIELDS
        .iter()
        .map(|(name, _, get)| (name.to_string(), get(&l.router)))
        .collect();
    for (i, r) in Reject::ALL.iter().enumerate() {
        counters.insert(
            format!("rejected_{}", r.as_str()),
            l.router.rejected[i].load(Ordering::Relaxed),
        );
    }
    let tables: Vec<api::L7TableStatus> = l
        .tables
        .sizes()
        .into_iter()
        .map(|t| api::L7TableStatus {
            table: t.table.into(),
            entries: t.entries,
            capacity: t.capacity,
        })
        .collect();
    api::L7Status {
        counters,
        entries: tables.iter().map(|t| t.entries).sum(),
        method: l.tables.method().into(),
        // A SIP service's requests are its datagrams from clients.
        requests: l.udp.as_ref().map_or_else(
            || l.proxy.snapshot().requests,
            |u| u.received.load(Ordering::Relaxed),
        ),
        expirations: l.router.expirations(),
        tables,
    }
}

/// One `GET /persist` row of an L7 table, with names from the snapshot.
pub fn l7_row(snap: &Snapshot, service: &str, b: &L7Binding) -> api::L7Row {
    let cfg = &snap.config;
    let backend = cfg
        .services
        .iter()
        .find(|s| s.name == service)
        .map(|s| &cfg.pools[s.pool])
        .and_then(|p| {
            p.backends
                .iter()
                .find(|x| backend_identity(&p.name, &x.name) == b.backend)
        });
    api::L7Row {
        service: service.to_string(),
        table: b.table.to_string(),
        client: b.client.map(|(a, _)| a),
        prefix_len: b.client.map(|(_, p)| p),
        key_digest: b.key_digest.map(|d| format!("{d:032x}")),
        backend: backend.map(|x| x.name.clone()),
        backend_address: backend.map(|x| x.address),
        age_s: b.idle.as_secs(),
        open_connections: b.open_connections,
        expired: b.expired,
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
