use std::{collections::BTreeMap, time::Duration};

use super::*;
use crate::admin::api::{
    BackendStatus, Counters, HealthStatus, L7BackendStatus, L7Status, L7TableStatus,
    PersistTableStatus, PersistenceStatus, ServiceStatus, Status,
};

fn backend(name: &str, state: &str, admin: &str, l7: Option<(u64, u64, u64)>) -> BackendStatus {
    BackendStatus {
        name: name.into(),
        id: 1,
        address: "10.0.0.1".parse().unwrap(),
        weight: 1,
        admin_state: admin.into(),
        state: state.into(),
        health: Some(HealthStatus {
            up: state != "down",
            detail: String::new(),
            since_unix: 0,
        }),
        bound_clients: Some(0),
        counters: Counters::default(),
        l7_bound_clients: l7.map(|(_, _, bound)| bound),
        l7: l7.map(|(hits, new, _)| L7BackendStatus {
            hits,
            new_assignments: new,
            reassigned_down: 0,
        }),
    }
}

/// `web` (L7 http-cookie: b1 and a draining b2) and `dns` (L4 with client-ip), with the
/// counters given.
fn status(web: (u64, u64, u64), b1: (u64, u64, u64), b2: (u64, u64, u64), dns: Counters) -> Status {
    let (requests, hits, new) = web;
    let counters = BTreeMap::from([
        ("persist_hits".to_string(), hits),
        ("new_assignments".to_string(), new),
        ("reassigned_down".to_string(), 2),
        ("rejected_tampered".to_string(), 3),
        ("rejected_expired".to_string(), 1),
    ]);
    let mut dns_b = backend("d1", "up", "enabled", None);
    dns_b.counters = dns;
    dns_b.bound_clients = Some(7);
    Status {
        generation: 4,
        xdp_mode: "generic".into(),
        uptime_s: 65,
        persist_entries: Some(7),
        persist_table: PersistTableStatus {
            capacity: 1024,
            possible_cpus: 2,
            per_cpu_capacity: 512,
            new_bindings_per_cpu_s: 0,
            bindings_created: 0,
            bindings_rate_limited: 0,
            non_syn_unbound: 0,
            binding_events_dropped: 0,
            evictions_estimate: Some(0),
        },
        services: vec![
            ServiceStatus {
                name: "web".into(),
                vip: "192.0.2.10".parse().unwrap(),
                port: 80,
                protocol: "tcp".into(),
                pool: "web".into(),
                persistence: None,
                counters: Counters::default(),
                backends: vec![
                    backend("b1", "up", "enabled", Some(b1)),
                    backend("b2", "draining", "draining", Some(b2)),
                ],
                l7: Some(L7Status {
                    counters,
                    entries: 0,
                    method: "http-cookie".into(),
                    requests,
                    expirations: 1,
                    tables: Vec::<L7TableStatus>::new(),
                }),
            },
            ServiceStatus {
                name: "dns".into(),
                vip: "192.0.2.53".parse().unwrap(),
                port: 53,
                protocol: "udp".into(),
                pool: "dns".into(),
                persistence: Some(PersistenceStatus {
                    profile: "src".into(),
                    timeout_s: 60,
                    ipv4_prefix: 32,
                    ipv6_prefix: 128,
                    policy: "immediate".into(),
                }),
                counters: dns,
                backends: vec![dns_b],
                l7: None,
            },
        ],
        reasons: BTreeMap::new(),
    }
}

fn dns(packets: u64, hits: u64, new: u64) -> Counters {
    Counters {
        packets,
        persist_hits: hits,
        new_assignments: new,
        ..Counters::default()
    }
}

#[test]
fn rates_are_differences_over_the_interval_and_ratios_count_hits_of_decisions() {
    let before = status((100, 60, 40), (30, 0, 0), (10, 0, 0), dns(1000, 90, 10));
    let after = status((300, 240, 60), (50, 2, 2), (10, 1, 1), dns(1500, 190, 10));
    let v = view(
        Some(&before),
        &Sample {
            status: after,
            elapsed: Some(Duration::from_secs(2)),
        },
    );
    let web = &v.services[0];
    assert_eq!(web.mode, "l7");
    assert_eq!(web.method, "http-cookie");
    assert_eq!(web.req_s, Some(100.0), "200 requests in 2 s");
    assert_eq!(web.pkt_s, None, "an L7 service's packets are not XDP's");
    assert_eq!(
        web.hit_now,
        Some(0.9),
        "180 hits of 200 decisions in the interval"
    );
    assert_eq!(web.hit_total, Some(0.8), "240 of 300 since start");
    assert_eq!(web.bound, Some(3), "bound clients of both backends");
    assert_eq!((web.invalid, web.reassigned, web.expired), (4, 2, 1));
    let dns = &v.services[1];
    assert_eq!((dns.mode, dns.method.as_str()), ("l4", "client-ip"));
    assert_eq!(dns.pkt_s, Some(250.0));
    assert_eq!(dns.hit_now, Some(1.0));
    assert_eq!(dns.hit_total, Some(0.95));
    assert_eq!(dns.bound, Some(7));

    let b1 = &v.backends[0];
    assert_eq!((b1.service.as_str(), b1.name.as_str()), ("web", "b1"));
    assert_eq!(b1.req_s, Some(11.0), "22 decisions in 2 s");
    assert_eq!(b1.bound, Some(2));
    assert_eq!(b1.health, "up");
    let b2 = &v.backends[1];
    assert_eq!(
        (b2.state.as_str(), b2.admin.as_str()),
        ("draining", "draining")
    );
    assert_eq!(b2.req_s, Some(0.5));
    assert_eq!(b2.hit_total, Some(10.0 / 11.0));
    assert_eq!(v.backends[2].pkt_s, Some(250.0));
}

#[test]
fn first_sample_and_counter_resets_give_no_rate() {
    let s = status((100, 60, 40), (30, 0, 0), (10, 0, 0), dns(1000, 90, 10));
    let v = view(
        None,
        &Sample {
            status: s.clone(),
            elapsed: None,
        },
    );
    assert_eq!(v.services[0].req_s, None);
    assert_eq!(v.services[0].hit_now, None);
    assert_eq!(v.services[0].hit_total, Some(0.6));
    assert!(
        v.header.contains("rates from the next sample"),
        "{}",
        v.header
    );
    // The daemon restarted: its counters went back.
    let restarted = status((5, 1, 4), (1, 1, 0), (0, 0, 0), dns(10, 1, 1));
    let v = view(
        Some(&s),
        &Sample {
            status: restarted,
            elapsed: Some(Duration::from_secs(1)),
        },
    );
    assert_eq!(v.services[0].req_s, None);
    assert_eq!(v.services[0].hit_now, None);
    assert_eq!(v.services[1].pkt_s, None);
    assert_eq!(v.backends[0].req_s, None);
}

#[test]
fn once_text_has_every_service_and_backend_in_aligned_columns() {
    let before = status((100, 60, 40), (30, 0, 0), (10, 0, 0), dns(1000, 90, 10));
    let after = status((300, 240, 60), (50, 2, 2), (10, 1, 1), dns(1500, 190, 10));
    let v = view(
        Some(&before),
        &Sample {
            status: after,
            elapsed: Some(Duration::from_secs(2)),
        },
    );
    let out = render::text(&v);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "tether top: generation 4, generic XDP, up 1m05s, rates over 2.0s"
    );
    let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    let row = |first: &str, second: &str| {
        lines
            .iter()
            .map(|l| words(l))
            .find(|w| w.len() > 1 && w[0] == first && w[1] == second)
            .unwrap_or_else(|| panic!("no row {first} {second}:\n{out}"))
    };
    assert_eq!(
        row("SERVICE", "MODE"),
        [
            "SERVICE", "MODE", "METHOD", "REQ/S", "PKT/S", "HIT%", "NOW", "HIT%", "ALL", "BOUND",
            "NEW", "EXPIRED", "INVALID", "MOVED", "TABLE"
        ]
    );
    assert_eq!(
        row("web", "l7"),
        [
            "web",
            "l7",
            "http-cookie",
            "100",
            "-",
            "90.0%",
            "80.0%",
            "3",
            "60",
            "1",
            "4",
            "2",
            "0"
        ]
    );
    assert_eq!(
        row("dns", "l4"),
        [
            "dns",
            "l4",
            "client-ip",
            "-",
            "250",
            "100.0%",
            "95.0%",
            "7",
            "10",
            "0",
            "0",
            "0",
            "-"
        ]
    );
    assert_eq!(
        row("web", "b2"),
        [
            "web", "b2", "draining", "up", "draining", "0.5", "-", "90.9%", "1"
        ]
    );
    assert_eq!(
        row("dns", "d1"),
        ["dns", "d1", "up", "up", "enabled", "-", "250", "95.0%", "7"]
    );
    // Numbers are right-aligned: the REQ/S cells end where the header does.
    let header = lines
        .iter()
        .find(|l| l.starts_with("SERVICE  BACKEND"))
        .expect("backend header");
    let end = header.find("REQ/S").expect("REQ/S") + "REQ/S".len();
    let b1 = lines
        .iter()
        .find(|l| l.starts_with("web") && l.contains(" b1 "))
        .expect("b1 row");
    assert_eq!(&b1[end - 4..end], "11.0", "{out}");
    assert!(out.lines().all(|l| l == l.trim_end()), "lines are trimmed");
}

#[test]
fn a_terminal_smaller_than_the_frame_cuts_it_off() {
    let s = status((100, 60, 40), (30, 0, 0), (10, 0, 0), dns(1000, 90, 10));
    let v = view(
        None,
        &Sample {
            status: s,
            elapsed: None,
        },
    );
    let mut term =
        ratatui::Terminal::new(ratatui::backend::TestBackend::new(24, 4)).expect("test backend");
    term.draw(|f| render::draw(f, &v, "q: quit"))
        .expect("drawn without panicking");
    let buf = term.backend().buffer();
    let first: String = (0..24).map(|x| buf[(x, 0)].symbol()).collect();
    assert_eq!(
        first, "tether top: generation 4",
        "the header, cut at the width"
    );
}
