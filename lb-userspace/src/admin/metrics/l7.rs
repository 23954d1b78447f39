//! Per-method figures of the L7 persistence engines: every line carries the service and its
//! method (the profile type, `none` without one), and per-backend lines the pool and backend,
//! so a dashboard can sum or compare by method.

use std::{collections::HashMap, fmt::Write as _};

use lb_common::backend_identity;

use super::{family, labels};
use crate::{
    cookie::Reject,
    state::{L7Counters, Snapshot},
};

/// One L7 service as its lines see it.
struct Svc<'a> {
    l: &'a L7Counters,
    method: &'static str,
    /// (pool, backend name, identity) of each backend of the service's pool.
    backends: Vec<(&'a str, &'a str, u32)>,
}

fn services(snap: &Snapshot) -> Vec<Svc<'_>> {
    let cfg = &snap.config;
    snap.l7
        .iter()
        .map(|l| {
            let backends = cfg
                .services
                .iter()
                .find(|s| s.name == l.service)
                .map(|s| &cfg.pools[s.pool])
                .map(|p| {
                    p.backends
                        .iter()
                        .map(|b| {
                            (
                                p.name.as_str(),
                                b.name.as_str(),
                                backend_identity(&p.name, &b.name),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            Svc {
                l,
                method: l.tables.method(),
                backends,
            }
        })
        .collect()
}

/// A service-level counter family: one line per service.
fn per_service(
    out: &mut String,
    svcs: &[Svc<'_>],
    name: &str,
    help: &str,
    get: impl Fn(&Svc<'_>) -> u64,
) {
    let metric = format!("tether_l7_persistence_{name}");
    family(
        out,
        &metric,
        if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        },
        help,
    );
    for s in svcs {
        let _ = writeln!(
            out,
            "{metric}{} {}",
            labels(&[("service", &s.l.service), ("method", s.method)]),
            get(s)
        );
    }
}

/// The `tether_l7_persistence_*` and `tether_l7_backend_*` families.
pub(super) fn render(out: &mut String, snap: &Snapshot) {
    use std::sync::atomic::Ordering::Relaxed;
    let svcs = services(snap);
    if svcs.is_empty() {
        return;
    }
    per_service(
        out,
        &svcs,
        "hits_total",
        "Requests sent where the method's binding (cookie, table entry) or its fallback said.",
        |s| s.l.router.persist_hits.load(Relaxed),
    );
    per_service(
        out,
        &svcs,
        "new_bindings_total",
        "Requests balanced by the pool because no binding applied (new clients, moved clients).",
        |s| s.l.router.new_assignments.load(Relaxed),
    );
    per_service(
        out,
        &svcs,
        "expirations_total",
        "Bindings that ended by age: table entries found idle past the timeout, and persistence cookies or tickets presented after their lifetime.",
        |s| s.l.router.expirations(),
    );
    per_service(
        out,
        &svcs,
        "table_evictions_total",
        "Live table entries evicted (least recently used) to make room for a new key.",
        |s| s.l.router.table_evictions.load(Relaxed),
    );

    family(
        out,
        "tether_l7_persistence_invalid_cookies_total",
        "counter",
        "Persistence cookies or tickets that did not authenticate or no longer apply, treated as absent, by reason.",
    );
    for s in &svcs {
        for (i, r) in Reject::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tether_l7_persistence_invalid_cookies_total{} {}",
                labels(&[
                    ("service", &s.l.service),
                    ("method", s.method),
                    ("reason", r.as_str())
                ]),
                s.l.router.rejected[i].load(Relaxed)
            );
        }
    }

    family(
        out,
        "tether_l7_persistence_table_entries",
        "gauge",
        "Entries in each persistence table of the service (the method's, and `fallback`), expired ones not yet removed included.",
    );
    let sizes: Vec<_> = svcs.iter().map(|s| s.l.tables.sizes()).collect();
    for (s, sizes) in svcs.iter().zip(&sizes) {
        for t in sizes {
            let _ = writeln!(
                out,
                "tether_l7_persistence_table_entries{} {}",
                labels(&[
                    ("service", &s.l.service),
                    ("method", s.method),
                    ("table", t.table)
                ]),
                t.entries
            );
        }
    }
    family(
        out,
        "tether_l7_persistence_table_capacity",
        "gauge",
        "Entries each persistence table holds at most (table_capacity).",
    );
    for (s, sizes) in svcs.iter().zip(&sizes) {
        for t in sizes {
            let _ = writeln!(
                out,
                "tether_l7_persistence_table_capacity{} {}",
                labels(&[
                    ("service", &s.l.service),
                    ("method", s.method),
                    ("table", t.table)
                ]),
                t.capacity
            );
        }
    }

    // Per backend: decisions, moves off a down backend, bound clients.
    let bound: Vec<HashMap<u32, u64>> = svcs.iter().map(|s| s.l.tables.bound()).collect();
    let backend_labels = |s: &Svc<'_>, pool: &str, name: &str, extra: Option<(&str, &str)>| {
        let mut v = vec![
            ("service", s.l.service.as_str()),
            ("method", s.method),
            ("pool", pool),
            ("backend", name),
        ];
        v.extend(extra);
        labels(&v)
    };
    family(
        out,
        "tether_l7_backend_requests_total",
        "counter",
        "Requests the engine sent to the backend, by decision: `hit` (a binding said so) or `new` (balanced by the pool).",
    );
    for s in &svcs {
        for &(pool, name, id) in &s.backends {
            let c = s.l.router.backend_counts(id);
            for (decision, n) in [("hit", c.hits), ("new", c.new_assignments)] {
                let _ = writeln!(
                    out,
                    "tether_l7_backend_requests_total{} {n}",
                    backend_labels(s, pool, name, Some(("decision", decision)))
                );
            }
        }
    }
    family(
        out,
        "tether_l7_backend_reassigned_down_total",
        "counter",
        "Clients bound to the backend that were moved elsewhere (policy immediate) or refused (policy never) because it was down or disabled.",
    );
    for s in &svcs {
        for &(pool, name, id) in &s.backends {
            let _ = writeln!(
                out,
                "tether_l7_backend_reassigned_down_total{} {}",
                backend_labels(s, pool, name, None),
                s.l.router.backend_counts(id).reassigned_down
            );
        }
    }
    family(
        out,
        "tether_l7_backend_bound_clients",
        "gauge",
        "Live (unexpired) bindings of the service's persistence tables to the backend. Cookie and ticket sessions live in the clients and are not counted here.",
    );
    for (s, bound) in svcs.iter().zip(&bound) {
        for &(pool, name, id) in &s.backends {
            let _ = writeln!(
                out,
                "tether_l7_backend_bound_clients{} {}",
                backend_labels(s, pool, name, None),
                bound.get(&id).copied().unwrap_or(0)
            );
        }
    }
}

#[cfg(test)]
mod tests;
