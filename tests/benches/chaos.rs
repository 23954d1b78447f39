//! `cargo xtask bench chaos`: tether under load while backends are killed and restarted in a
//! loop (at least a minute by default). Not timed: it checks what operators rely on and
//! reports what happened.
//!
//! One topology (client, LB and three backends in network namespaces, echo servers on port
//! 8080 of every backend), one daemon with:
//! - `web-l7`: an L7 service on VIP:8081 with `http-cookie` persistence, policy `immediate`;
//! - `web-l4`: an L4 DSR service on VIP:8080 with source-IP persistence, policy `immediate`;
//! - HTTP health checks every 300 ms (rise 2, fall 2).
//!
//! Load, all from the client namespace: wrk through `web-l7` (new clients: the miss path),
//! session clients that keep their cookie and record the backend of every answer, and a
//! steady stream of new TCP connections from 20 source addresses through `web-l4`. Meanwhile
//! one backend at a time is stopped (its port closes, its connections end) and started again.
//!
//! Checked, and the run fails otherwise:
//! - a session request fails, or a session or L4 client changes backend, only while its
//!   backend was being killed (from the stop until it was healthy again, plus one second);
//! - wrk's socket errors and non-2xx answers stay within what the kills can explain (the
//!   requests in flight on a killed backend: at most wrk's connections per kill);
//! - tether's resident memory at the end is within 20% (+8 MiB) of the first sample after
//!   warm-up.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

type Outage = (String, Instant, Instant);

use serde_json::json;
use tether_tests::{
    http::{Echo, http_get_from, request_from},
    l7lab::{IO_TIMEOUT, L7Lab, PORT},
    netns::{VIP, spawn_in_netns},
};

const L7_PORT: u16 = 8081;
const L4_PORT: u16 = PORT;
const SESSIONS: usize = 12;
const L4_CLIENTS: usize = 20;
const WRK_CONNECTIONS: u32 = 8;
/// Time after a restart until health checks (300 ms, rise 2) report the backend up again,
/// with room for a slow machine.
const HEAL: Duration = Duration::from_secs(3);

/// One client request and what came back.
struct Obs {
    /// Session index or L4 client index.
    who: usize,
    start: Instant,
    end: Instant,
    /// The backend this client was on before the request.
    before: Option<String>,
    /// `Ok(backend)` or the error.
    got: Result<String, String>,
}

/// When each backend was out of service: (name, stopped, healthy again).
type Outages = Arc<Mutex<Vec<Outage>>>;

fn disrupted(outages: &[Outage], backend: &str, from: Instant, to: Instant) -> bool {
    let slack = Duration::from_secs(1);
    outages
        .iter()
        .any(|(b, s, e)| b == backend && *s <= to + slack && from <= *e + slack)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Wrk(Child);

impl Drop for Wrk {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let secs: u64 = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let health = json!({"type": "http", "port": PORT, "interval_ms": 300, "timeout_ms": 250,
                        "rise": 2, "fall": 2});
    let lab_start = L7Lab::start(L4_CLIENTS.max(SESSIONS), 3, |b| {
        b.down_policy("immediate")
            .health_monitor(health)
            .profile(json!({"name": "ck", "type": "http-cookie", "cookie_name": "SRV"}))
            .l7_service("web-l7", L7_PORT, Some("ck"), json!({}))
            .service("web-l4", L4_PORT, Some(600))
    });
    let mut lab = lab_start;
    let pid = lab
        .d()
        .pid()
        .unwrap_or_else(|| lab.fail("tether has no pid"));
    let vip7 = SocketAddrV4::new(VIP, L7_PORT);
    let vip4 = SocketAddrV4::new(VIP, L4_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let observations: Arc<Mutex<Vec<(char, Obs)>>> = Arc::default();

    // Session clients: each keeps its cookie and its backend.
    let mut threads = Vec::new();
    for s in 0..SESSIONS {
        let src = lab.client(s);
        let (stop, obs) = (stop.clone(), observations.clone());
        threads.push(
            spawn_in_netns(&lab.topo.client.ns, &format!("session-{s}"), move || {
                let mut cookie: Option<String> = None;
                let mut backend: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let hdrs: Vec<(&str, &str)> = cookie
                        .as_deref()
                        .map(|c| vec![("Cookie", c)])
                        .unwrap_or_default();
                    let got = request_from(src, vip7, "/", &hdrs, IO_TIMEOUT)
                        .map_err(|e| e.to_string())
                        .and_then(|r| {
                            if r.status != 200 {
                                return Err(format!("status {}", r.status));
                            }
                            if let Some(v) = r.set_cookie_value("SRV") {
                                cookie = Some(format!("SRV={v}"));
                            }
                            r.echo().map(|e| e.backend).map_err(|e| e.to_string())
                        });
                    let end = Instant::now();
                    obs.lock().unwrap().push((
                        '7',
                        Obs {
                            who: s,
                            start,
                            end,
                            before: backend.clone(),
                            got: got.clone(),
                        },
                    ));
                    if let Ok(b) = got {
                        backend = Some(b);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .expect("session thread"),
        );
    }
    // L4: new connections from each client address in turn.
    {
        let srcs: Vec<Ipv4Addr> = (0..L4_CLIENTS).map(|i| lab.client(i)).collect();
        let (stop, obs) = (stop.clone(), observations.clone());
        threads.push(
            spawn_in_netns(&lab.topo.client.ns, "l4-stream", move || {
                let mut last: HashMap<usize, String> = HashMap::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let who = i % srcs.len();
                    let start = Instant::now();
                    let got = http_get_from(srcs[who], vip4, IO_TIMEOUT)
                        .map_err(|e| e.to_string())
                        .and_then(|body| {
                            let b = body.split("\r\n\r\n").nth(1).unwrap_or(&body);
                            Echo::parse(b)
                                .map(|e| e.backend)
                                .ok_or_else(|| format!("not an echo: {b:?}"))
                        });
                    let end = Instant::now();
                    obs.lock().unwrap().push((
                        '4',
                        Obs {
                            who,
                            start,
                            end,
                            before: last.get(&who).cloned(),
                            got: got.clone(),
                        },
                    ));
                    if let Ok(b) = got {
                        last.insert(who, b);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .expect("l4 thread"),
        );
    }
    let wrk = Wrk(Command::new("ip")
        .args(["netns", "exec", &lab.topo.client.ns, "wrk", "-t", "1"])
        .args(["-c", &WRK_CONNECTIONS.to_string()])
        // Until about the end of the chaos loop (warm-up, `secs`, the last cycle).
        .args(["-d", &format!("{}s", secs + 3 + 5), "--timeout", "5s"])
        .arg(format!("http://{vip7}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting wrk"));

    // Warm up, then the chaos loop.
    std::thread::sleep(Duration::from_secs(3));
    let rss_start = rss_kib(pid).unwrap_or(0);
    let mut rss_max = rss_start;
    let outages: Outages = Arc::default();
    let names = lab.backend_names();
    let t0 = Instant::now();
    let mut kills = 0u32;
    while t0.elapsed() < Duration::from_secs(secs) && kills < 1000 {
        let victim = &names[kills as usize % names.len()];
        let stopped = Instant::now();
        lab.servers
            .stop_backend(victim)
            .unwrap_or_else(|e| lab.fail(format!("stopping {victim}: {e:#}")));
        std::thread::sleep(Duration::from_secs(2));
        lab.servers
            .start_backend(victim)
            .unwrap_or_else(|e| lab.fail(format!("starting {victim}: {e:#}")));
        std::thread::sleep(HEAL);
        outages
            .lock()
            .unwrap()
            .push((victim.clone(), stopped, Instant::now()));
        kills += 1;
        rss_max = rss_max.max(rss_kib(pid).unwrap_or(0));
    }
    let rss_end = rss_kib(pid).unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // wrk prints its summary when its duration ends; the guard kills it if it hangs.
    let mut wrk = wrk;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && matches!(wrk.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut wrk_text = String::new();
    if let Some(mut out) = wrk.0.stdout.take() {
        use std::io::Read as _;
        let _ = out.read_to_string(&mut wrk_text);
    }
    drop(wrk);

    // Evaluate.
    let outages = outages.lock().unwrap().clone();
    let obs = observations.lock().unwrap();
    // Per load: requests, failed while excused, failed otherwise, moved while excused, moved
    // otherwise.
    let mut report: HashMap<char, [u64; 5]> = HashMap::new();
    let mut bad = Vec::new();
    for (kind, o) in obs.iter() {
        let r = report.entry(*kind).or_default();
        r[0] += 1;
        let excused = |b: &str| disrupted(&outages, b, o.start, o.end);
        match (&o.got, &o.before) {
            (Err(e), before) => {
                // A client not yet on any backend is excused during any outage.
                let any_outage = || outages.iter().any(|(b, _, _)| excused(b));
                if before.as_deref().map_or_else(any_outage, excused) {
                    r[1] += 1;
                } else {
                    r[2] += 1;
                    bad.push(format!("{kind} client {} failed on {before:?}: {e}", o.who));
                }
            }
            (Ok(now), Some(before)) if now != before => {
                if excused(before) {
                    r[3] += 1;
                } else {
                    r[4] += 1;
                    bad.push(format!(
                        "{kind} client {} moved {before} -> {now} with {before} up",
                        o.who
                    ));
                }
            }
            _ => {}
        }
    }
    let (wrk_requests, wrk_errors) = parse_wrk(&wrk_text);
    println!(
        "chaos: {kills} backend kills over {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "| load | requests | failed (while its backend was killed) | failed (otherwise) | moved (backend killed) | moved (otherwise) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (kind, label) in [
        ('7', "L7 cookie sessions"),
        ('4', "L4 source-IP connections"),
    ] {
        let r = report.get(&kind).copied().unwrap_or_default();
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            r[0], r[1], r[2], r[3], r[4]
        );
    }
    println!(
        "| wrk through web-l7 (new clients) | {wrk_requests} | {wrk_errors} socket errors and non-2xx | | | |"
    );
    println!(
        "tether RSS: {rss_start} KiB after warm-up, max {rss_max} KiB, {rss_end} KiB at the end"
    );
    let allowed_wrk = kills as u64 * WRK_CONNECTIONS as u64;
    let mut failed = bad;
    if wrk_errors > allowed_wrk {
        failed.push(format!(
            "wrk saw {wrk_errors} errors, more than {allowed_wrk} (connections x kills)"
        ));
    }
    if rss_end > rss_start + rss_start / 5 + 8192 {
        failed.push(format!("RSS grew from {rss_start} to {rss_end} KiB"));
    }
    if report.get(&'7').map_or(0, |r| r[0]) < 100 || report.get(&'4').map_or(0, |r| r[0]) < 100 {
        failed.push("too few requests to judge".into());
    }
    drop(obs);
    if !failed.is_empty() {
        lab.fail(format!("chaos run failed:\n{}", failed.join("\n")));
    }
}

/// wrk's summary: requests, and socket errors plus non-2xx/3xx responses.
fn parse_wrk(text: &str) -> (u64, u64) {
    let mut requests = 0;
    let mut errors = 0;
    for l in text.lines() {
        let l = l.trim();
        if let Some(n) = l
            .split(" requests in ")
            .next()
            .filter(|_| l.contains(" requests in "))
        {
            requests = n.trim().parse().unwrap_or(0);
        }
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    (requests, errors)
}
