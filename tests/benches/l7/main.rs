//! `cargo xtask bench l7`: the L7 proxy with cookie persistence, measured on loopback side by
//! side with a direct connection to the backends and with HAProxy doing the same job.
//!
//! Rows, every one against the same two backends (b1 on 127.0.0.1, b2 on 127.0.0.2, small
//! keep-alive HTTP/1.1 servers running in this process on a tokio runtime), for each worker
//! thread count (`--workers`, default 1 and 2; tether's `TETHER_WORKER_THREADS`, HAProxy's
//! `nbthread`, wrk's `-t`):
//! - direct: wrk straight to b1 (1 thread);
//! - cookie miss: mode `l7` with an `http-cookie` profile, no cookie sent, so every response
//!   carries a Set-Cookie; HAProxy: `cookie SRV insert indirect nocache`, roundrobin;
//! - cookie hit: the cookie each proxy issued (captured with one request first) sent on every
//!   request;
//! - TLS HTTP/1.1 (wrk over https) and TLS HTTP/2 (h2load, ALPN h2, one stream in flight per
//!   connection), both terminating TLS with the same self-signed certificate, cookie miss;
//! - 1,000 connections: wrk with 1,000 keep-alive connections, cookie hit.
//!
//! HAProxy is also told to add the forwarding headers tether adds (`X-Forwarded-For`,
//! `-Proto`, `-Host`), so both do the same edits. tether's XDP program sits on `lo` (generic
//! mode) for the whole run, so every row pays the same per-packet hook; a `direct, before
//! tether started` row shows what the hook costs.
//!
//! Each round runs every row of a thread count once (the order rotates between rounds), after
//! one warm-up run per row; the table shows the median of the rounds for each figure. wrk and
//! h2load report latency with coordinated omission (closed loop), which is fine for comparing
//! rows, not as an SLO figure. CPU per request is the proxy process's user + system time over
//! the run divided by the requests served. Results go to stdout and target/bench/l7.md.
//! Nothing here asserts on time.
//!
//! Every process started here (backends are threads of this process; HAProxy, the daemon, the
//! load generators) is stopped by pid when its guard drops, also on panic; every wait is
//! bounded.

mod backends;
mod load;
mod procs;
mod proxies;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
};

use backends::{Backends, capture_cookie, probe};
use load::{Client, Load, Sample};
use procs::{Proc, Scratch, free_port};
use proxies::{Cert, Frontends, start_haproxy, start_tether};
use tether_tests::bench::{Args, median};

const COOKIE: &str = "SRV";
/// Connections of the 1,000-connection row.
const MANY: u32 = 1000;

struct Opts {
    rounds: usize,
    secs: u64,
    warmup_secs: u64,
    connections: u32,
    workers: Vec<u32>,
    /// `--rows`: only the tether/HAProxy rows whose path starts with one of these (case-blind:
    /// `cookie miss`, `cookie hit`, `tls`, `tls http/1.1`, `1000`); empty: all.
    rows: Vec<String>,
    /// `--haproxy-cpu-map`: HAProxy's threads pinned one per CPU, as tether pins its workers.
    haproxy_cpu_map: bool,
}

const USAGE: &str = "--rounds N --duration SECS --connections N --workers N[,N...] --rows TEXT[,TEXT...] --haproxy-cpu-map --quick";

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 3,
        secs: 5,
        warmup_secs: 1,
        connections: 32,
        workers: vec![1, 2],
        rows: Vec::new(),
        haproxy_cpu_map: false,
    };
    let mut args = Args::from_env(USAGE);
    while let Some(a) = args.next_flag() {
        match a.as_str() {
            "--rounds" => o.rounds = args.value::<usize>(&a).max(1),
            "--duration" => o.secs = args.value::<u64>(&a).max(1),
            "--connections" => o.connections = args.value::<u32>(&a).max(1),
            "--workers" => {
                o.workers = args
                    .value::<String>(&a)
                    .split(',')
                    .map(|w| {
                        w.parse::<u32>()
                            .unwrap_or_else(|_| {
                                panic!("--workers: {w:?} is not a number ({USAGE})")
                            })
                            .clamp(1, 64)
                    })
                    .collect()
            }
            "--rows" => {
                o.rows = args
                    .value::<String>(&a)
                    .split(',')
                    .map(|r| r.trim().to_lowercase())
                    .filter(|r| !r.is_empty())
                    .collect()
            }
            "--haproxy-cpu-map" => o.haproxy_cpu_map = true,
            "--quick" => {
                o.rounds = 1;
                o.secs = 2;
            }
            other => args.unknown(other),
        }
    }
    let most = o.workers.iter().copied().max().unwrap_or(1);
    assert!(
        o.connections >= most,
        "wrk needs at least one connection per thread"
    );
    o
}

/// One row of the table.
struct Row {
    label: String,
    workers: u32,
    load: Load,
    /// `Some(reason)`: not measured.
    pending: Option<String>,
    samples: Vec<Sample>,
    /// Requests each backend answered during the measured runs.
    per_backend: Vec<u64>,
    /// The proxy's process, for its CPU time.
    pid: Option<u32>,
    /// The HAProxy row this one is compared with (an index into all rows).
    vs: Option<usize>,
}

impl Row {
    fn med(&self, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        median(self.samples.iter().map(f))
    }
}

/// User + system CPU time of process `pid` so far, in µs.
fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): state first, utime 12th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 * 1e6 / hz)
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

/// The soft RLIMIT_NOFILE raised to the hard one: wrk holds [`MANY`] connections (the
/// proxies raise their own).
fn raise_nofile() -> String {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return "getrlimit failed".into();
        }
        let before = r.rlim_cur;
        r.rlim_cur = r.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            return format!("RLIMIT_NOFILE stays {before}: setrlimit failed");
        }
        format!("RLIMIT_NOFILE of the load generators: {}", r.rlim_cur)
    }
}

/// Runs every pending-free row of `rows[range]` once per round, rotating the order.
fn measure(
    o: &Opts,
    scratch: &Scratch,
    backends: &Backends,
    rows: &mut [Row],
    notes: &mut Vec<String>,
) {
    for r in rows.iter_mut() {
        r.per_backend = vec![0; backends.addrs.len()];
        if r.pending.is_none() {
            // Warm-up: connections (and the proxies' pools to the backends) open.
            let _ = load::run(&r.load, &scratch.0, o.warmup_secs);
        }
    }
    let n = rows.len();
    for round in 0..o.rounds {
        // The order rotates, so no row always runs right after the same one.
        for k in 0..n {
            let r = &mut rows[(k + round) % n];
            if r.pending.is_some() {
                continue;
            }
            let c0 = backends.counts();
            let cpu0 = r.pid.and_then(cpu_us);
            match load::run(&r.load, &scratch.0, o.secs) {
                Ok(mut s) => {
                    if let (Some(a), Some(b)) = (cpu0, r.pid.and_then(cpu_us))
                        && s.requests > 0.0
                    {
                        s.proxy_cpu_us = (b - a) / s.requests;
                    }
                    eprintln!(
                        "round {}/{}: {} ({} thr): {:.0} req/s, p50 {}, p99 {}, cpu {:.1} µs",
                        round + 1,
                        o.rounds,
                        r.label,
                        r.workers,
                        s.rps,
                        fmt_us(s.p50_us),
                        fmt_us(s.p99_us),
                        s.proxy_cpu_us
                    );
                    r.samples.push(s);
                }
                Err(e) => notes.push(format!(
                    "{} ({} threads) round {}: {e}",
                    r.label,
                    r.workers,
                    round + 1
                )),
            }
            for (i, (a, z)) in backends.counts().iter().zip(&c0).enumerate() {
                r.per_backend[i] += a - z;
            }
        }
    }
}

/// The rows of one worker-thread count: start both proxies, capture their cookies, measure,
/// stop them.
fn run_workers(
    o: &Opts,
    w: u32,
    scratch: &Scratch,
    cert: &Cert,
    backends: &Backends,
    notes: &mut Vec<String>,
) -> Vec<Row> {
    let b = &backends.addrs;
    let ha_fe = Frontends {
        plain: free_port(),
        tls: free_port(),
        workers: w,
        cpu_map: o.haproxy_cpu_map,
        tcp_relay: Some(free_port()),
    };
    let haproxy = start_haproxy(scratch, ha_fe, cert, b);
    let local = |port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let ha_cookie = match &haproxy {
        Ok(_) => capture_cookie(local(ha_fe.plain), "HAProxy", notes),
        Err(e) => Err(e.clone()),
    };
    let t_fe = Frontends {
        plain: free_port(),
        tls: free_port(),
        workers: w,
        cpu_map: false,
        tcp_relay: None,
    };
    let tether = start_tether(scratch, t_fe, cert, b);
    let t_cookie = match &tether {
        Ok(_) => capture_cookie(local(t_fe.plain), "tether", notes),
        Err(e) => Err(e.clone()),
    };
    if let Ok(t) = &tether {
        notes.push(format!(
            "{w} worker thread(s): tether daemon threads: {}",
            t.threads()
        ));
    }
    let t_pid = tether.as_ref().ok().map(|t| t.proc.pid());
    let ha_pid = haproxy.as_ref().ok().map(Proc::pid);

    // (label, tether's load, HAProxy's load); cookie: None miss, Some(true) hit.
    let load = |client, port, connections, cookie: Option<&Result<String, String>>| {
        let (cookie, pending) = match cookie {
            None => (None, None),
            Some(Ok(c)) => (Some(c.clone()), None),
            Some(Err(e)) => (None, Some(e.clone())),
        };
        (
            Load {
                client,
                addr: local(port),
                cookie,
                connections,
                threads: w,
            },
            pending,
        )
    };
    let plain = Client::Wrk { tls: false };
    let kinds = [
        (
            "cookie miss (Set-Cookie on every response)",
            plain,
            false,
            o.connections,
            false,
        ),
        ("cookie hit", plain, false, o.connections, true),
        (
            "TLS HTTP/1.1, cookie miss",
            Client::Wrk { tls: true },
            true,
            o.connections,
            false,
        ),
        (
            "TLS HTTP/2, cookie miss",
            Client::H2load,
            true,
            o.connections,
            false,
        ),
        ("1000 connections, cookie hit", plain, false, MANY, true),
    ];
    let mut rows = Vec::new();
    let wanted = |what: &str| {
        let what = what.to_lowercase();
        o.rows.is_empty() || o.rows.iter().any(|r| what.starts_with(r.as_str()))
    };
    for (what, client, tls, conns, hit) in kinds.into_iter().filter(|k| wanted(k.0)) {
        for (who, fe, cookie, pid) in [
            ("tether", t_fe, &t_cookie, t_pid),
            ("HAProxy", ha_fe, &ha_cookie, ha_pid),
        ] {
            let port = if tls { fe.tls } else { fe.plain };
            let (l, pending) = load(client, port, conns, hit.then_some(cookie));
            let pending = pending.or_else(|| match (who, &tether, &haproxy) {
                ("tether", Err(e), _) | ("HAProxy", _, Err(e)) => Some(e.clone()),
                _ => None,
            });
            // tether's row is compared with HAProxy's after it (an index into this set).
            let vs = (who == "tether").then_some(rows.len() + 1);
            rows.push(Row {
                label: format!("{who}, {what}"),
                workers: w,
                load: l,
                pending,
                samples: Vec::new(),
                per_backend: Vec::new(),
                pid,
                vs,
            });
        }
    }
    const FLOOR: &str = "TCP relay (mode tcp, no HTTP): the floor";
    if let Some(port) = ha_fe.tcp_relay.filter(|_| wanted(FLOOR)) {
        // Compared with HAProxy's own cookie-miss row: the share of its CPU per request that
        // is not HTTP work (an HTTP proxy below this floor would need fewer syscalls).
        let miss = rows
            .iter()
            .position(|r: &Row| r.label.starts_with("HAProxy, cookie miss"));
        let (l, _) = load(plain, port, o.connections, None);
        rows.push(Row {
            label: format!("HAProxy, {FLOOR}"),
            workers: w,
            load: l,
            pending: haproxy.as_ref().err().cloned(),
            samples: Vec::new(),
            per_backend: Vec::new(),
            pid: ha_pid,
            vs: miss,
        });
    }
    measure(o, scratch, backends, &mut rows, notes);
    drop(tether);
    drop(haproxy);
    rows
}

fn main() {
    let o = opts();
    for (tool, arg) in [("wrk", "-v"), ("h2load", "--version"), ("haproxy", "-v")] {
        assert!(
            Command::new(tool).arg(arg).output().is_ok(),
            "{tool} is missing: run `cargo xtask bench l7` (its bootstrap installs wrk, h2load and haproxy)"
        );
    }
    let mut notes: Vec<String> = vec![raise_nofile()];
    let scratch = Scratch::new();
    let cert = Cert::write(&scratch);
    let backends = Backends::start(&[Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2)]);
    let b = backends.addrs.clone();
    for (i, a) in b.iter().enumerate() {
        let p = probe(*a, None).unwrap_or_else(|e| panic!("backend b{}: {e}", i + 1));
        assert_eq!(p.status, 200, "backend b{}", i + 1);
    }
    let direct = |label: &str| Row {
        label: label.to_string(),
        workers: 1,
        load: Load {
            client: Client::Wrk { tls: false },
            addr: b[0],
            cookie: None,
            connections: o.connections,
            threads: 1,
        },
        pending: None,
        samples: Vec::new(),
        per_backend: Vec::new(),
        pid: None,
        vs: None,
    };

    // Direct, before tether's XDP program is on lo: what the generic XDP hook costs every row.
    let mut before = [direct("direct, before tether started (no XDP on lo)")];
    measure(&o, &scratch, &backends, &mut before, &mut notes);

    let mut rows: Vec<Row> = Vec::new();
    for (i, &w) in o.workers.iter().enumerate() {
        let mut set = run_workers(&o, w, &scratch, &cert, &backends, &mut notes);
        if i == 0 {
            // Direct with tether's XDP program on lo, measured while the first set runs.
            let mut d = [direct("direct (wrk → b1)")];
            measure(&o, &scratch, &backends, &mut d, &mut notes);
            rows.extend(d);
        }
        let base = rows.len();
        for r in &mut set {
            r.vs = r.vs.map(|k| base + k);
        }
        rows.extend(set);
    }
    drop(backends);
    let [before] = before;
    rows.push(before);

    // The table.
    let direct_rps = rows[0].med(|s| s.rps);
    let mut md = format!(
        "wrk (HTTP/1.1) and h2load (HTTP/2) on loopback, -d{}s, {} connections unless the row \
         says otherwise, one load-generator thread per worker thread; median of {} round(s); {} \
         cores. tether with TETHER_WORKER_THREADS=N (two or more workers pinned one per CPU, \
         its default), HAProxy `nbthread N`{}, both `cookie {COOKIE}` insert.\n\n\
         | path | threads | req/s | p50 | p99 | req/s vs direct | req/s vs HAProxy | p99 vs \
         HAProxy | proxy CPU/req | CPU/req vs HAProxy | errors |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        o.secs,
        o.connections,
        o.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if o.haproxy_cpu_map {
            " with `cpu-map` (thread i on the i-th CPU)"
        } else {
            " (its threads not pinned, its default)"
        }
    );
    for (i, r) in rows.iter().enumerate() {
        if let Some(why) = &r.pending {
            let why = why.lines().next().unwrap_or_default().replace('|', "/");
            let _ = writeln!(
                md,
                "| {} | {} | pending: {why} | | | | | | | | |",
                r.label, r.workers
            );
            continue;
        }
        let h = r.vs.map(|j| &rows[j]);
        let vs = |f: fn(&Sample) -> f64| h.map_or("–".into(), |h| ratio(r.med(f), h.med(f)));
        let errors: f64 = r.samples.iter().map(|s| s.errors + s.bad_status).sum();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.workers,
            r.med(|s| s.rps).map_or("–".into(), |v| format!("{v:.0}")),
            r.med(|s| s.p50_us).map_or("–".into(), fmt_us),
            r.med(|s| s.p99_us).map_or("–".into(), fmt_us),
            if i == 0 {
                "1.00x".into()
            } else {
                ratio(r.med(|s| s.rps), direct_rps)
            },
            vs(|s| s.rps),
            vs(|s| s.p99_us),
            r.med(|s| s.proxy_cpu_us)
                .map_or("–".into(), |v| format!("{v:.1} µs")),
            vs(|s| s.proxy_cpu_us),
            errors
        );
    }
    let _ = writeln!(md, "\nRequests per backend during the measured runs:");
    for r in rows.iter().filter(|r| r.pending.is_none()) {
        let per: Vec<String> = r
            .per_backend
            .iter()
            .enumerate()
            .map(|(i, n)| format!("b{} {n}", i + 1))
            .collect();
        let _ = writeln!(md, "- {} ({} thr): {}", r.label, r.workers, per.join(", "));
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\nNotes:");
        for n in &notes {
            let _ = writeln!(md, "- {}", n.replace('\n', "\n  "));
        }
    }
    println!("\n{md}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(out.join("l7.md"), &md).expect("write l7.md");
    println!("written to target/bench/l7.md");
    drop(scratch);
}
