//! `tether top`: a live view of the per-service and per-backend figures, built from two
//! `GET /status` samples (rates are their differences over the time between them).
//!
//! The model ([`View`]) is plain data and its cells plain strings, so the terminal renderer
//! (`render`), the one-frame text of `--once` and the tests share it.

pub mod live;
pub mod render;

#[cfg(test)]
mod tests;

use std::{collections::HashMap, time::Duration};

use crate::admin::{api, cli};

/// One `GET /status` and how long after the previous one it was taken.
#[derive(Debug, Clone)]
pub struct Sample {
    pub status: api::Status,
    /// Time since the previous sample (`None` for the first one: no rates yet).
    pub elapsed: Option<Duration>,
}

/// One service line.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    pub name: String,
    /// `l4` or `l7`.
    pub mode: &'static str,
    /// The persistence method (L7: the engine's; L4: `client-ip` with a profile).
    pub method: String,
    /// L7 requests per second (`None` for L4 services or without a previous sample).
    pub req_s: Option<f64>,
    /// Packets per second through XDP (L4 services).
    pub pkt_s: Option<f64>,
    /// Decisions per second that were hits, of all decisions in the interval.
    pub hit_now: Option<f64>,
    /// Hits of all decisions since the daemon started.
    pub hit_total: Option<f64>,
    /// Live bindings, all backends together.
    pub bound: Option<u64>,
    pub new: u64,
    pub expired: u64,
    pub invalid: u64,
    pub reassigned: u64,
    /// L7: table entries, all tables together.
    pub table: Option<u64>,
}

/// One backend of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendRow {
    pub service: String,
    pub name: String,
    /// What the data path does: `up`, `down`, `draining`, `disabled`.
    pub state: String,
    /// `up`, `down` or `-` (no monitor).
    pub health: &'static str,
    /// The operator's intent: `enabled`, `draining`, `disabled`.
    pub admin: String,
    pub req_s: Option<f64>,
    pub pkt_s: Option<f64>,
    pub hit_total: Option<f64>,
    pub bound: Option<u64>,
}

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub header: String,
    pub services: Vec<ServiceRow>,
    pub backends: Vec<BackendRow>,
}

fn ratio(hits: u64, new: u64) -> Option<f64> {
    match hits + new {
        0 => None,
        n => Some(hits as f64 / n as f64),
    }
}

/// `now - before` per second; `None` without a previous value, or when the counter went
/// back (the daemon restarted).
fn rate(now: u64, before: Option<u64>, elapsed: Option<Duration>) -> Option<f64> {
    let (before, secs) = (before?, elapsed?.as_secs_f64());
    if now < before || secs <= 0.0 {
        return None;
    }
    Some((now - before) as f64 / secs)
}

/// L7 decision counters of a service: (hits, new).
fn decisions(l7: &api::L7Status) -> (u64, u64) {
    let get = |n: &str| l7.counters.get(n).copied().unwrap_or(0);
    (get("persist_hits"), get("new_assignments"))
}

fn invalid(l7: &api::L7Status) -> u64 {
    l7.counters
        .iter()
        .filter(|(k, _)| k.starts_with("rejected_"))
        .map(|(_, v)| v)
        .sum()
}

/// The frame for `now`, with rates against `prev` (the sample before it, if any).
pub fn view(prev: Option<&api::Status>, now: &Sample) -> View {
    let s = &now.status;
    let elapsed = now.elapsed.filter(|_| prev.is_some());
    let prev_svc: HashMap<&str, &api::ServiceStatus> = prev
        .map(|p| p.services.iter().map(|x| (x.name.as_str(), x)).collect())
        .unwrap_or_default();
    let mut services = Vec::new();
    let mut backends = Vec::new();
    for svc in &s.services {
        let before = prev_svc.get(svc.name.as_str()).copied();
        let before_backend =
            |name: &str| before.and_then(|b| b.backends.iter().find(|x| x.name == name));
        let row = match &svc.l7 {
            Some(l7) => {
                let (hits, new) = decisions(l7);
                let before_l7 = before.and_then(|b| b.l7.as_ref());
                let hit_now = before_l7.and_then(|b| {
                    let (h0, n0) = decisions(b);
                    (hits >= h0 && new >= n0).then(|| ratio(hits - h0, new - n0))?
                });
                ServiceRow {
                    name: svc.name.clone(),
                    mode: "l7",
                    method: l7.method.clone(),
                    req_s: rate(l7.requests, before_l7.map(|b| b.requests), elapsed),
                    pkt_s: None,
                    hit_now,
                    hit_total: ratio(hits, new),
                    bound: Some(svc.backends.iter().filter_map(|b| b.l7_bound_clients).sum()),
                    new,
                    expired: l7.expirations,
                    invalid: invalid(l7),
                    reassigned: l7.counters.get("reassigned_down").copied().unwrap_or(0),
                    table: Some(l7.entries),
                }
            }
            None => {
                let c = &svc.counters;
                let hit_now = before.and_then(|b| {
                    let p = &b.counters;
                    (c.persist_hits >= p.persist_hits && c.new_assignments >= p.new_assignments)
                        .then(|| {
                            ratio(
                                c.persist_hits - p.persist_hits,
                                c.new_assignments - p.new_assignments,
                            )
                        })?
                });
                ServiceRow {
                    name: svc.name.clone(),
                    mode: "l4",
                    method: svc
                        .persistence
                        .as_ref()
                        .map_or("none".into(), |_| "client-ip".into()),
                    req_s: None,
                    pkt_s: rate(c.packets, before.map(|b| b.counters.packets), elapsed),
                    hit_now,
                    hit_total: ratio(c.persist_hits, c.new_assignments),
                    bound: svc
                        .backends
                        .iter()
                        .map(|b| b.bound_clients)
                        .sum::<Option<u64>>(),
                    new: c.new_assignments,
                    expired: c.expired,
                    invalid: 0,
                    reassigned: c.reassigned_down,
                    table: None,
                }
            }
        };
        services.push(row);
        for b in &svc.backends {
            let old = before_backend(&b.name);
            let (req_s, hit_total, bound, pkt_s) = match (&svc.l7, b.l7) {
                (Some(_), Some(l7)) => {
                    let total = l7.hits + l7.new_assignments;
                    let before = old.and_then(|o| o.l7).map(|o| o.hits + o.new_assignments);
                    (
                        rate(total, before, elapsed),
                        ratio(l7.hits, l7.new_assignments),
                        b.l7_bound_clients,
                        None,
                    )
                }
                _ => (
                    None,
                    ratio(b.counters.persist_hits, b.counters.new_assignments),
                    b.bound_clients,
                    rate(b.counters.packets, old.map(|o| o.counters.packets), elapsed),
                ),
            };
            backends.push(BackendRow {
                service: svc.name.clone(),
                name: b.name.clone(),
                state: b.state.clone(),
                health: cli::health(b.health.as_ref()),
                admin: b.admin_state.clone(),
                req_s,
                pkt_s,
                hit_total,
                bound,
            });
        }
    }
    let interval = match elapsed {
        Some(d) => format!("rates over {:.1}s", d.as_secs_f64()),
        None => "rates from the next sample".into(),
    };
    View {
        header: format!(
            "tether top: generation {}, {} XDP, up {}, {interval}",
            s.generation,
            s.xdp_mode,
            cli::duration(s.uptime_s)
        ),
        services,
        backends,
    }
}

/// `12.3/s`-style cells: `-` when unknown.
fn per_s(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn count(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

impl View {
    pub const SERVICE_HEADER: [&'static str; 13] = [
        "SERVICE", "MODE", "METHOD", "REQ/S", "PKT/S", "HIT% NOW", "HIT% ALL", "BOUND", "NEW",
        "EXPIRED", "INVALID", "MOVED", "TABLE",
    ];
    pub const BACKEND_HEADER: [&'static str; 9] = [
        "SERVICE", "BACKEND", "STATE", "HEALTH", "ADMIN", "REQ/S", "PKT/S", "HIT% ALL", "BOUND",
    ];
    /// Leading columns of each table that are text (left-aligned); the rest are numbers.
    pub const SERVICE_TEXT_COLUMNS: usize = 3;
    pub const BACKEND_TEXT_COLUMNS: usize = 5;

    pub fn service_cells(&self) -> Vec<Vec<String>> {
        self.services
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.mode.into(),
                    r.method.clone(),
                    per_s(r.req_s),
                    per_s(r.pkt_s),
                    percent(r.hit_now),
                    percent(r.hit_total),
                    count(r.bound),
                    r.new.to_string(),
                    r.expired.to_string(),
                    r.invalid.to_string(),
                    r.reassigned.to_string(),
                    count(r.table),
                ]
            })
            .collect()
    }

    pub fn backend_cells(&self) -> Vec<Vec<String>> {
        self.backends
            .iter()
            .map(|r| {
                vec![
                    r.service.clone(),
                    r.name.clone(),
                    r.state.clone(),
                    r.health.into(),
                    r.admin.clone(),
                    per_s(r.req_s),
                    per_s(r.pkt_s),
                    percent(r.hit_total),
                    count(r.bound),
                ]
            })
            .collect()
    }
}

/// `tether top --once`: two samples `interval` apart, one frame as text.
pub fn once(admin: &cli::Endpoint, interval: Duration) -> Result<String, cli::CliError> {
    let first = cli::fetch_status(admin)?;
    let t = std::time::Instant::now();
    std::thread::sleep(interval);
    let second = cli::fetch_status(admin)?;
    let sample = Sample {
        status: second,
        elapsed: Some(t.elapsed()),
    };
    Ok(render::text(&view(Some(&first), &sample)))
}
