//! End to end: L7 restarts and reloads refuse no connection and fail no request.
//!
//! tether is run as users run it: `ip netns exec <lb-ns> tether run --config FILE` with a
//! config that leaves every optional field to its default (but a unique `pin_dir`, which
//! keeps each test's daemon, pid file and handoff socket apart from any other tether), and
//! restarted with `ip netns exec <lb-ns> tether restart --config FILE`. Clients in the client
//! namespace (a request loop, wrk, a TLS client) talk to the VIP; echo backends answer.
//!
//! Needs root and `TETHER_BIN`: run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_restart --
//! --test-threads=1`. Every loop and wait is bounded; failures panic with what was seen and
//! the daemon's output.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tether_tests::{
    daemon::Reload,
    http::{connect_from, request_from},
    l7lab::{IO_TIMEOUT, L7Lab, PORT},
    netns::{VIP, spawn_in_netns},
    tlslab::pem,
};

/// The TLS service of the certificate tests.
const TLS_PORT: u16 = 8443;
/// Requests per second of the request loop.
const LOOP_RATE: u32 = 100;
/// Bounds on the request loop, whatever happens.
const LOOP_MAX: Duration = Duration::from_secs(60);
const LOOP_MAX_REQUESTS: usize = 6000;
/// Requests the loop must see answered before and after the event under test.
const SETTLE_REQUESTS: usize = 50;
/// How long a phase of a test may take to reach its request count.
const PHASE_WAIT: Duration = Duration::from_secs(20);
/// How long a session request or a wrk request crossing the restart may wait for its
/// answer: on a loaded machine the moment nobody accepts can outlast [`IO_TIMEOUT`]; a slow
/// answer is not a failed one (a refused or reset connection still fails at once).
const RESTART_REQUEST_WAIT: Duration = Duration::from_secs(15);
/// How long the replaced daemon may take to drain and exit (its default drain is 30 s;
/// connections here close at once).
const RETIRE_WAIT: Duration = Duration::from_secs(40);

/// An `http-cookie` profile with nothing but its name and type: a generated key.
fn cookie_profile() -> Value {
    json!({ "name": "ck", "type": "http-cookie" })
}

/// What one request of the loop ended with.
#[derive(Clone, Debug)]
enum Outcome {
    Status(u16),
    /// The error, with its kind (connection refused, reset, timed out, ...).
    Failed(String),
}

/// A request loop in the client namespace: one new connection per request, [`LOOP_RATE`] a
/// second, cycling through the client addresses; each address keeps the cookie it was
/// given and sends it back. Runs until stopped, [`LOOP_MAX`] or [`LOOP_MAX_REQUESTS`].
struct RequestLoop {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<JoinHandle<()>>,
}

impl RequestLoop {
    fn start(lab: &L7Lab, port: u16) -> RequestLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let sources: Vec<Ipv4Addr> = lab.topo.client_addrs.clone();
        let dst = lab.topo.vip_addr(port);
        let (stop2, out2) = (stop.clone(), outcomes.clone());
        let thread = spawn_in_netns(&lab.topo.client.ns, "request-loop", move || {
            let mut cookies: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
            let period = Duration::from_secs(1) / LOOP_RATE;
            let start = Instant::now();
            for i in 0..LOOP_MAX_REQUESTS {
                if stop2.load(Ordering::SeqCst) || start.elapsed() > LOOP_MAX {
                    break;
                }
                let next = start + period * i as u32;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let src = sources[i % sources.len()];
                let headers: Vec<(&str, &str)> = cookies
                    .get(&src)
                    .map(|c| vec![("Cookie", c.as_str())])
                    .unwrap_or_default();
                let outcome = match request_from(src, dst, "/", &headers, IO_TIMEOUT) {
                    Ok(r) => {
                        if let Some(sc) = r.header("set-cookie") {
                            let pair = sc.split(';').next().unwrap_or("").to_string();
                            cookies.insert(src, pair);
                        }
                        Outcome::Status(r.status)
                    }
                    Err(e) => Outcome::Failed(format!("{:?}: {e}", e.kind())),
                };
                out2.lock().unwrap_or_else(|p| p.into_inner()).push(outcome);
            }
        })
        .unwrap_or_else(|e| panic!("starting the request loop: {e:#}"));
        RequestLoop {
            stop,
            outcomes,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Waits until `n` more requests than `from` were made.
    fn wait_for_more(&self, lab: &L7Lab, from: usize, n: usize, what: &str) {
        lab.wait_for(PHASE_WAIT, what, || self.count() >= from + n);
    }

    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && let Err(p) = t.join()
        {
            std::panic::resume_unwind(p);
        }
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fails the test unless every request was answered 200; returns how many there were.
fn assert_all_answered(lab: &L7Lab, outcomes: &[Outcome], what: &str) -> usize {
    let failed: Vec<(usize, String)> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            Outcome::Status(200) => None,
            Outcome::Status(s) => Some((i, format!("status {s}"))),
            Outcome::Failed(e) => Some((i, e.clone())),
        })
        .collect();
    if !failed.is_empty() {
        lab.fail(format!(
            "{what}: {} of {} requests not answered 200 (index, outcome): {:?}",
            failed.len(),
            outcomes.len(),
            &failed[..failed.len().min(20)]
        ));
    }
    outcomes.len()
}

/// The daemon's pid, checked to be running.
fn pid(lab: &L7Lab) -> u32 {
    lab.d()
        .pid()
        .unwrap_or_else(|| lab.fail("tether is not running"))
}

/// `Cpus_allowed_list` of each thread of `pid`, by thread name (names repeat: all kept).
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(cpus) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push((comm.trim().to_string(), cpus.trim().to_string()));
        }
    }
    out
}

/// The daemon's main thread may use the CPUs the test gave it, and every worker thread is
/// pinned to a CPU of its own: also for a daemon started by `tether restart` (it must not
/// inherit a pinned worker's single CPU).
fn assert_workers_pinned(lab: &L7Lab, pid: u32, main_cpus: &str, what: &str) {
    let threads = thread_cpus(pid);
    let main = threads
        .iter()
        .find(|(name, _)| name == "tether")
        .unwrap_or_else(|| lab.fail(format!("{what}: no main thread in {threads:?}")));
    assert_eq!(main.1, main_cpus, "{what}: main thread's CPUs: {threads:?}");
    let workers: Vec<&String> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("tether-worker"))
        .map(|(_, cpus)| cpus)
        .collect();
    assert!(!workers.is_empty(), "{what}: no worker thread: {threads:?}");
    let distinct: std::collections::BTreeSet<&String> = workers.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        workers.len(),
        "{what}: workers share a CPU: {threads:?}"
    );
    for cpus in &workers {
        assert!(
            cpus.parse::<usize>().is_ok(),
            "{what}: a worker is not pinned to one CPU: {threads:?}"
        );
    }
}

fn web_lab() -> L7Lab {
    L7Lab::start_as_user(8, 3, |b| {
        b.profile(cookie_profile())
            .l7_service("web", PORT, Some("ck"), json!({}))
    })
}

#[test]
fn restart_refuses_no_connection_and_fails_no_request() {
    let mut lab = web_lab();
    let old = pid(&lab);
    // The daemon gets one worker per CPU by default: each pinned to its own.
    let main_cpus = thread_cpus(old)
        .into_iter()
        .find(|(name, _)| name == "tether")
        .map(|(_, cpus)| cpus)
        .unwrap_or_else(|| lab.fail("the daemon has no main thread named tether"));
    assert_workers_pinned(&lab, old, &main_cpus, "first daemon");
    let requests = RequestLoop::start(&lab, PORT);
    requests.wait_for_more(&lab, 0, SETTLE_REQUESTS, "requests before the restart");
    let out = lab.restart();
    let new = pid(&lab);
    assert_ne!(new, old, "a new process serves: {out}");
    assert_workers_pinned(&lab, new, &main_cpus, "daemon started by tether restart");
    let at_restart = requests.count();
    requests.wait_for_more(
        &lab,
        at_restart,
        SETTLE_REQUESTS,
        "requests after the restart",
    );
    let outcomes = requests.finish();
    let n = assert_all_answered(&lab, &outcomes, "across tether restart");
    assert!(n >= 2 * SETTLE_REQUESTS, "{n} requests");
    // The new process answered the requests since it took over (its counters start at 0).
    let served = lab.l7("requests", "web");
    assert!(served > 0, "the new daemon served no request");
    let d = lab.daemon.as_mut().expect("running");
    if let Err(e) = d.wait_retired(RETIRE_WAIT) {
        lab.fail(format!("{e:#}"));
    }
    let logs = lab.logs();
    assert!(
        logs.contains(&format!("handed over to process {new}")),
        "the old daemon says whom it handed over to:\n{logs}"
    );
    lab.stop();
}

/// Parses wrk's summary: (requests, socket errors (connect, read, write, timeout), non-2xx/3xx).
fn wrk_summary(out: &str) -> Option<(u64, [u64; 4], u64)> {
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut errors = [0u64; 4];
    if let Some(l) = out
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
    {
        for (i, name) in ["connect", "read", "write", "timeout"].iter().enumerate() {
            errors[i] = l
                .split(',')
                .find_map(|p| {
                    p.trim()
                        .trim_start_matches("Socket errors:")
                        .trim()
                        .strip_prefix(name)
                })
                .and_then(|v| v.trim().parse().ok())?;
        }
    }
    let non2xx = match out
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses:"))
    {
        Some(l) => l.rsplit(':').next()?.trim().parse().ok()?,
        None => 0,
    };
    Some((requests, errors, non2xx))
}

/// One L7 service per persistence method under wrk: (service, port, profile, wrk header).
fn wrk_services() -> Vec<(&'static str, u16, Value, Option<&'static str>)> {
    vec![
        ("cookie", PORT, cookie_profile(), None),
        (
            "app",
            PORT + 1,
            json!({ "name": "app", "type": "app-cookie", "cookie_name": "JSESSIONID" }),
            Some("Cookie: JSESSIONID=wrk-session"),
        ),
        (
            "source",
            PORT + 2,
            json!({ "name": "source", "type": "client-ip" }),
            None,
        ),
        (
            "url",
            PORT + 3,
            json!({ "name": "url", "type": "url-hash" }),
            None,
        ),
    ]
}

/// A config with one L7 service per entry of [`wrk_services`], all reaching the backends.
fn wrk_lab(clients: usize, services: &[(&'static str, u16, Value, Option<&'static str>)]) -> L7Lab {
    L7Lab::start_as_user(clients, 3, |b| {
        // The backends serve on PORT, behind every service.
        let b = (1..=3).fold(b, |b, i| {
            b.backend_field(&format!("b{i}"), "port", json!(PORT))
        });
        services.iter().fold(b, |b, (name, port, profile, _)| {
            let profile_name = profile["name"].as_str().expect("named").to_string();
            b.profile(profile.clone())
                .l7_service(name, *port, Some(&profile_name), json!({}))
        })
    })
}

/// Upper bound on a wrk run; the test stops wrk (SIGINT: it prints its summary) once the
/// new daemon has served some of its requests, however long the restart took.
const WRK_MAX: Duration = Duration::from_secs(120);
/// Requests of each wrk the new daemon must have served before wrk is stopped.
const WRK_AFTER_RESTART: u64 = 100;

/// One wrk per service, running, with its name; killed if the test fails before it is
/// stopped.
struct WrkRun(&'static str, Option<std::process::Child>);

impl WrkRun {
    /// SIGINT (wrk stops and prints its summary), then its output.
    fn stop(mut self, lab: &L7Lab) -> std::process::Output {
        let child = self.1.take().expect("running");
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs wrk).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        child
            .wait_with_output()
            .unwrap_or_else(|e| lab.fail(format!("waiting for wrk on {}: {e}", self.0)))
    }
}

impl Drop for WrkRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One wrk per service (4 connections, for at most [`WRK_MAX`]) from the client namespace.
fn spawn_wrk(
    lab: &L7Lab,
    services: &[(&'static str, u16, Value, Option<&'static str>)],
) -> Vec<WrkRun> {
    let duration = format!("-d{}s", WRK_MAX.as_secs());
    let timeout = format!("{}s", RESTART_REQUEST_WAIT.as_secs());
    services
        .iter()
        .map(|(name, port, _, header)| {
            let url = format!("http://{VIP}:{port}/");
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &lab.topo.client.ns, "wrk", "-t1", "-c4"])
                .args([duration.as_str(), "--timeout", timeout.as_str()]);
            if let Some(h) = header {
                cmd.args(["-H", h]);
            }
            cmd.arg(&url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| lab.fail(format!("running wrk (is it installed?): {e}")));
            WrkRun(name, Some(child))
        })
        .collect()
}

/// Waits (bounded) until the daemon now running has served [`WRK_AFTER_RESTART`] more
/// requests of every service than `from` (wrk being the only client left), then stops each
/// wrk and fails the test on any socket error or non-2xx/3xx response.
fn check_wrk(lab: &L7Lab, runs: Vec<WrkRun>, from: &BTreeMap<&str, u64>) {
    for WrkRun(name, _) in &runs {
        let base = from.get(name).copied().unwrap_or(0);
        lab.wait_for(
            PHASE_WAIT,
            &format!("the new daemon serving wrk's requests to {name}"),
            || lab.l7("requests", name) >= base + WRK_AFTER_RESTART,
        );
    }
    for run in runs {
        let name = run.0;
        let out = run.stop(lab);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            lab.fail(format!("wrk on {name} failed ({}): {text}", out.status));
        }
        let Some((requests, errors, non2xx)) = wrk_summary(&text) else {
            lab.fail(format!("cannot read wrk's summary for {name}:\n{text}"))
        };
        assert_eq!(
            errors, [0; 4],
            "{name}: socket errors (connect, read, write, timeout):\n{text}"
        );
        assert_eq!(non2xx, 0, "{name}: non-2xx responses:\n{text}");
        assert!(requests > 0, "{name}: {text}");
    }
}

/// What the daemon now running has served on each service.
fn served(
    lab: &L7Lab,
    services: &[(&'static str, u16, Value, Option<&'static str>)],
) -> BTreeMap<&'static str, u64> {
    services
        .iter()
        .map(|(name, ..)| (*name, lab.l7("requests", name)))
        .collect()
}

/// Waits until the old daemon has served some of every wrk's requests.
fn wait_for_wrk(lab: &L7Lab, services: &[(&'static str, u16, Value, Option<&'static str>)]) {
    for (name, ..) in services {
        lab.wait_for(
            PHASE_WAIT,
            &format!("wrk's requests reaching {name}"),
            || lab.l7("requests", name) >= 100,
        );
    }
}

#[test]
fn wrk_sees_no_error_across_restart() {
    let services = wrk_services();
    let mut lab = wrk_lab(8, &services);
    let runs = spawn_wrk(&lab, &services);
    // Restart once the old daemon has served some of every wrk's requests.
    wait_for_wrk(&lab, &services);
    lab.restart();
    check_wrk(&lab, runs, &BTreeMap::new());
    let d = lab.daemon.as_mut().expect("running");
    if let Err(e) = d.wait_retired(RETIRE_WAIT) {
        lab.fail(format!("{e:#}"));
    }
    lab.stop();
}

/// One client session of [`sessions_keep_their_backend_across_restart`]: what it sends, and
/// the backend it was bound to before the restart.
#[derive(Clone, Debug)]
struct Session {
    service: &'static str,
    port: u16,
    src: Ipv4Addr,
    target: String,
    /// A `Cookie` field, for the cookie methods.
    cookie: Option<String>,
    backend: String,
}

impl Session {
    fn label(&self) -> String {
        format!(
            "{} from {} {} cookie {:?} (bound to {})",
            self.service, self.src, self.target, self.cookie, self.backend
        )
    }
}

/// Sessions per service opened before the load starts, and just before the restart.
const SESSIONS: usize = 16;
const LATE_SESSIONS: usize = 8;
/// Bound on the passes of the session loop.
const SESSION_PASSES_MAX: usize = 400;

/// Opens one session on each service of [`wrk_services`] from each client address
/// `first..first + n` (cookie: the cookie tether issued; app-cookie: the `JSESSIONID` a
/// backend's `/login` set; client-IP: the address; URL hash: a URL of its own) and records
/// each one's backend.
fn open_sessions(lab: &L7Lab, first: usize, n: usize) -> Vec<Session> {
    let mut sessions = Vec::new();
    let echo = |service: &str, r: anyhow::Result<tether_tests::http::HttpResponse>| {
        let r = lab.ok(r, &format!("opening a session on {service}"));
        if r.status != 200 {
            lab.fail(format!(
                "opening a session on {service}: status {}",
                r.status
            ));
        }
        let backend = lab.ok(r.echo(), "an echo body").backend;
        (r, backend)
    };
    for i in first..first + n {
        let src = lab.client(i);
        let (r, backend) = echo("cookie", lab.topo.request(src, PORT, "/", &[], IO_TIMEOUT));
        // The echo backend sets no cookie on `/`: this is tether's.
        let cookie = r
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
            .unwrap_or_else(|| lab.fail("tether issued no cookie"));
        sessions.push(Session {
            service: "cookie",
            port: PORT,
            src,
            target: "/".into(),
            cookie: Some(cookie),
            backend,
        });
        let (r, backend) = echo(
            "app",
            lab.topo.request(src, PORT + 1, "/login", &[], IO_TIMEOUT),
        );
        let id = r
            .set_cookie_value("JSESSIONID")
            .unwrap_or_else(|| lab.fail("the backend set no JSESSIONID on /login"));
        sessions.push(Session {
            service: "app",
            port: PORT + 1,
            src,
            target: "/".into(),
            cookie: Some(format!("JSESSIONID={id}")),
            backend,
        });
        let (_, backend) = echo(
            "source",
            lab.topo.request(src, PORT + 2, "/", &[], IO_TIMEOUT),
        );
        sessions.push(Session {
            service: "source",
            port: PORT + 2,
            src,
            target: "/".into(),
            cookie: None,
            backend,
        });
        let target = format!("/item/{i}");
        let (_, backend) = echo(
            "url",
            lab.topo.request(src, PORT + 3, &target, &[], IO_TIMEOUT),
        );
        sessions.push(Session {
            service: "url",
            port: PORT + 3,
            src,
            target,
            cookie: None,
            backend,
        });
    }
    sessions
}

/// One request of session `s` from the calling thread (in the client namespace): the
/// backend that answered, or what went wrong.
fn replay_one(vip: Ipv4Addr, s: &Session) -> Result<String, String> {
    let headers: Vec<(&str, &str)> = s
        .cookie
        .as_deref()
        .map(|c| vec![("Cookie", c)])
        .unwrap_or_default();
    let dst = SocketAddrV4::new(vip, s.port);
    match request_from(s.src, dst, &s.target, &headers, RESTART_REQUEST_WAIT) {
        Ok(r) if r.status == 200 => r.echo().map(|e| e.backend).map_err(|e| e.to_string()),
        Ok(r) => Err(format!("status {}", r.status)),
        Err(e) => Err(format!("{:?}: {e}", e.kind())),
    }
}

/// What one session request of the loop saw: the session's index and the backend or error.
type Seen = (usize, Result<String, String>);

/// Replays every session, in the reverse of the order they were opened (so a round-robin
/// that forgot them would not land them where they were), pass after pass until stopped.
struct SessionLoop {
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl SessionLoop {
    fn start(lab: &L7Lab, sessions: &[Session]) -> SessionLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sessions = sessions.to_vec();
        let vip = lab.topo.vip;
        let (stop2, passes2, seen2) = (stop.clone(), passes.clone(), seen.clone());
        let thread = spawn_in_netns(&lab.topo.client.ns, "session-loop", move || {
            let start = Instant::now();
            for _ in 0..SESSION_PASSES_MAX {
                for (i, s) in sessions.iter().enumerate().rev() {
                    if stop2.load(Ordering::SeqCst) || start.elapsed() > LOOP_MAX {
                        return;
                    }
                    let got = replay_one(vip, s);
                    seen2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, got));
                }
                passes2.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap_or_else(|e| panic!("starting the session loop: {e:#}"));
        SessionLoop {
            stop,
            passes,
            seen,
            thread: Some(thread),
        }
    }

    fn passes(&self) -> usize {
        self.passes.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && let Err(p) = t.join()
        {
            std::panic::resume_unwind(p);
        }
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for SessionLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Issue 9: sessions of http-cookie (generated key), app-cookie, client-IP and URL hash
/// clients, replayed while wrk loads every service, keep their backend across `tether
/// restart` (0 moved) and no request fails. Sessions opened just before the restart (within
/// the periodic save's second) keep theirs too.
#[test]
fn sessions_keep_their_backend_across_restart() {
    let services = wrk_services();
    let mut lab = wrk_lab(SESSIONS + LATE_SESSIONS, &services);
    let sessions = open_sessions(&lab, 0, SESSIONS);
    // Every method spread its sessions: a test where all went to one backend could not see
    // one move.
    for (service, ..) in &services {
        let backends: std::collections::BTreeSet<&str> = sessions
            .iter()
            .filter(|s| s.service == *service)
            .map(|s| s.backend.as_str())
            .collect();
        assert!(
            backends.len() > 1,
            "{service}: every session on {backends:?}"
        );
    }
    let replay = SessionLoop::start(&lab, &sessions);
    let runs = spawn_wrk(&lab, &services);
    wait_for_wrk(&lab, &services);
    lab.wait_for(
        PHASE_WAIT,
        "a pass of the sessions before the restart",
        || replay.passes() >= 1,
    );
    let late = open_sessions(&lab, SESSIONS, LATE_SESSIONS);
    lab.restart();
    let after = replay.passes();
    // Two whole passes after `tether restart` returned, by the new daemon.
    lab.wait_for(
        PHASE_WAIT,
        "two passes of the sessions after the restart",
        || replay.passes() >= after + 2,
    );
    let mut seen = replay.finish();
    // From here only wrk sends to the new daemon.
    let by_sessions = served(&lab, &services);
    check_wrk(&lab, runs, &by_sessions);
    let vip = lab.topo.vip;
    let late_seen: Vec<Seen> = lab.ok(
        lab.topo.in_client(|| {
            late.iter()
                .enumerate()
                .rev()
                .map(|(i, s)| (sessions.len() + i, replay_one(vip, s)))
                .collect()
        }),
        "replaying the late sessions",
    );
    seen.extend(late_seen);
    let all: Vec<&Session> = sessions.iter().chain(&late).collect();
    let mut failed = Vec::new();
    let mut moved = BTreeMap::<String, (String, BTreeMap<String, usize>)>::new();
    for (i, got) in &seen {
        let s = all[*i];
        match got {
            Ok(b) if *b == s.backend => {}
            Ok(b) => {
                *moved
                    .entry(s.label())
                    .or_insert_with(|| (s.service.to_string(), BTreeMap::new()))
                    .1
                    .entry(b.clone())
                    .or_default() += 1
            }
            Err(e) => failed.push(format!("{}: {e}", s.label())),
        }
    }
    let mut per_service = BTreeMap::<String, usize>::new();
    for (service, _) in moved.values() {
        *per_service.entry(service.clone()).or_default() += 1;
    }
    if !failed.is_empty() || !moved.is_empty() {
        lab.fail(format!(
            "{} session requests of {} sessions: {} failed, sessions moved per service \
             {per_service:?}\nfailed: {:?}\nmoved (session: other backends seen): {:?}",
            seen.len(),
            all.len(),
            failed.len(),
            &failed[..failed.len().min(10)],
            moved.iter().take(10).collect::<Vec<_>>()
        ));
    }
    assert!(
        seen.len() >= 3 * sessions.len() + late.len(),
        "{} session requests",
        seen.len()
    );
    // The table methods' bindings came from the saved tables (`L7 tables of NAME: N
    // bindings ...`), not from requests after the restart.
    let logs = lab.logs();
    for service in ["app", "source"] {
        let restored = logs
            .lines()
            .find_map(|l| {
                l.split_once(&format!("L7 tables of {service}: "))?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0);
        assert!(
            restored > 0,
            "the new daemon restored no binding of {service}:\n{logs}"
        );
    }
    let d = lab.daemon.as_mut().expect("running");
    if let Err(e) = d.wait_retired(RETIRE_WAIT) {
        lab.fail(format!("{e:#}"));
    }
    lab.stop();
}

/// Clients whose login the replaced daemon answers while it drains.
const DRAIN_LOGINS: usize = 6;

/// Reads one HTTP/1 response with a `Content-Length` from `s`: (status, the `JSESSIONID`
/// it sets, the echo backend).
fn read_login(s: &mut std::net::TcpStream) -> std::io::Result<(u16, Option<String>, String)> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| bad(format!("no length: {head:?}")))?;
            if body.len() >= len {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| bad(format!("no status: {head:?}")))?;
                let session = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    let v = v.trim().strip_prefix("JSESSIONID=")?;
                    k.eq_ignore_ascii_case("set-cookie")
                        .then(|| v.split(';').next().unwrap_or("").to_string())
                });
                let echo = tether_tests::http::Echo::parse(&body[..len])
                    .ok_or_else(|| bad(format!("not an echo body: {body:?}")))?;
                return Ok((status, session, echo.backend));
            }
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("response did not end in time: {text:?}"),
            ));
        }
        match s.read(&mut chunk)? {
            0 => return Err(bad(format!("closed before the response ended: {text:?}"))),
            n => raw.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Issue 9: a session a backend sets on a connection the replaced daemon still serves
/// (its request was on its way when `tether restart` handed the sockets over) is learned
/// after the handoff snapshot; it reaches its backend through the new daemon too, once the
/// old one has drained.
#[test]
fn a_session_learned_while_the_old_daemon_drains_keeps_its_backend() {
    let mut lab = L7Lab::start_as_user(2 * DRAIN_LOGINS, 3, |b| {
        b.profile(json!({ "name": "app", "type": "app-cookie", "cookie_name": "JSESSIONID" }))
            .l7_service("app", PORT, Some("app"), json!({}))
    });
    let dst = lab.topo.vip_addr(PORT);
    // Each login's head half sent to the old daemon: it keeps these connections while they
    // drain, and answers them once the head is complete.
    let mut conns: Vec<std::net::TcpStream> = (0..DRAIN_LOGINS)
        .map(|i| {
            let src = lab.client(i);
            let mut s = lab.ok(
                lab.ok(
                    lab.topo
                        .in_client(move || connect_from(src, dst, IO_TIMEOUT)),
                    "in the client namespace",
                ),
                "connecting to the VIP",
            );
            lab.ok(
                s.write_all(format!("GET /login HTTP/1.1\r\nHost: {VIP}\r\n").as_bytes()),
                "sending half a head",
            );
            s
        })
        .collect();
    let old = pid(&lab);
    lab.restart();
    assert_ne!(pid(&lab), old, "a new process serves");
    let mut sessions = Vec::new();
    for s in &mut conns {
        lab.ok(
            s.write_all(b"Connection: close\r\n\r\n"),
            "completing the head",
        );
        let (status, session, backend) = lab.ok(read_login(s), "the old daemon's answer");
        assert_eq!(status, 200, "login answered");
        let id = session.unwrap_or_else(|| lab.fail("the login set no JSESSIONID"));
        sessions.push((id, backend));
    }
    let d = lab.daemon.as_mut().expect("running");
    if let Err(e) = d.wait_retired(RETIRE_WAIT) {
        lab.fail(format!("{e:#}"));
    }
    lab.wait_for(
        PHASE_WAIT,
        "the new daemon merging what the old one learned while draining",
        || lab.logs().contains("learned while draining merged"),
    );
    // Other clients (no client-IP binding anywhere) present the sessions, in reverse.
    let mut moved = Vec::new();
    for (i, (id, backend)) in sessions.iter().enumerate().rev() {
        let src = lab.client(DRAIN_LOGINS + i);
        let cookie = format!("JSESSIONID={id}");
        let r = lab.ok(
            lab.topo
                .request(src, PORT, "/", &[("Cookie", cookie.as_str())], IO_TIMEOUT),
            "a request of the session",
        );
        assert_eq!(r.status, 200, "{id}");
        let now = lab.ok(r.echo(), "an echo body").backend;
        if now != *backend {
            moved.push(format!("{id}: {backend} -> {now}"));
        }
    }
    if !moved.is_empty() {
        lab.fail(format!(
            "{} of {DRAIN_LOGINS} sessions learned while draining moved: {moved:?}",
            moved.len()
        ));
    }
    lab.stop();
}

#[test]
fn reload_that_changes_the_listener_refuses_no_connection() {
    let lab = web_lab();
    let requests = RequestLoop::start(&lab, PORT);
    requests.wait_for_more(&lab, 0, SETTLE_REQUESTS, "requests before the reload");
    // Listener settings change (a new serve task on the same socket, the old one drains),
    // and a service is added.
    let mut cfg_value = lab
        .builder
        .clone()
        .l7_service("other", PORT + 1, None, json!({}))
        .build();
    cfg_value["virtual_services"][0]["limits"] = json!({ "max_connections": 500 });
    let d = lab.d();
    lab.ok(d.write_config(&cfg_value), "writing the config");
    match lab.ok(d.reload(), "reloading") {
        Reload::Applied(_) => {}
        Reload::Refused(line) => lab.fail(format!("a valid reload was refused: {line}")),
    }
    let at_reload = requests.count();
    requests.wait_for_more(
        &lab,
        at_reload,
        SETTLE_REQUESTS,
        "requests after the reload",
    );
    let outcomes = requests.finish();
    assert_all_answered(
        &lab,
        &outcomes,
        "across a reload that restarts the listener",
    );
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-e2e-restart-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        Scratch(p)
    }

    fn cert(&self) -> PathBuf {
        self.0.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.0.join("key.pem")
    }

    /// Writes a new self-signed certificate for the VIP and its key over the files (as a
    /// renewal does); returns the certificate.
    fn renew(&self) -> CertificateDer<'static> {
        let c = rcgen::generate_simple_self_signed(vec![VIP.to_string()])
            .unwrap_or_else(|e| panic!("generating a certificate: {e}"));
        std::fs::write(self.cert(), pem("CERTIFICATE", c.cert.der())).expect("writing cert.pem");
        std::fs::write(
            self.key(),
            pem("PRIVATE KEY", &c.signing_key.serialize_der()),
        )
        .expect("writing key.pem");
        c.cert.der().clone()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The certificate a new TLS connection from `src` to VIP:[`TLS_PORT`] is shown; the
/// handshake only succeeds if it is `trusted` (then an HTTP request is answered 200).
fn served_cert(
    lab: &L7Lab,
    src: Ipv4Addr,
    trusted: &CertificateDer<'static>,
) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).map_err(|e| e.to_string())?;
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let dst = SocketAddrV4::new(VIP, TLS_PORT);
    lab.topo
        .in_client(move || -> Result<CertificateDer<'static>, String> {
            let tcp = connect_from(src, dst, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
            let name = ServerName::IpAddress(std::net::IpAddr::V4(VIP).into());
            let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            tls.write_all(
                format!("GET / HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .map_err(|e| format!("TLS: {e}"))?;
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer);
            let text = String::from_utf8_lossy(&answer);
            if !text.starts_with("HTTP/1.1 200") {
                return Err(format!("over TLS: {text:?}"));
            }
            let chain = tls.conn.peer_certificates().ok_or("no peer certificate")?;
            Ok(chain[0].clone().into_owned())
        })
        .map_err(|e| format!("{e:#}"))?
}

fn tls_lab(dir: &Scratch) -> L7Lab {
    let tls = json!({
        "tls": {
            "cert_file": dir.cert().to_string_lossy(),
            "key_file": dir.key().to_string_lossy(),
        }
    });
    L7Lab::start_as_user(2, 2, |b| {
        // The backends serve plain HTTP on PORT, behind both services.
        (1..=2)
            .fold(b, |b, i| {
                b.backend_field(&format!("b{i}"), "port", json!(PORT))
            })
            .profile(cookie_profile())
            .l7_service("web", PORT, Some("ck"), json!({}))
            .l7_service("secure", TLS_PORT, Some("ck"), tls)
    })
}

#[test]
fn sighup_serves_a_certificate_renewed_in_place_and_refuses_a_bad_one() {
    let dir = Scratch::new();
    let first = dir.renew();
    let mut lab = tls_lab(&dir);
    let src = lab.client(0);
    let seen = served_cert(&lab, src, &first).unwrap_or_else(|e| lab.fail(e));
    assert_eq!(seen, first);

    // Renewed in place: same paths, unchanged config.
    let second = dir.renew();
    let builder = lab.builder.clone();
    lab.reload(builder);
    let seen = served_cert(&lab, src, &second).unwrap_or_else(|e| {
        lab.fail(format!(
            "after SIGHUP, trusting the renewed certificate: {e}"
        ))
    });
    assert_eq!(
        seen, second,
        "a new connection sees the renewed certificate"
    );

    // A bad certificate: refused with the field and the reason; the renewed one still serves.
    std::fs::write(
        dir.cert(),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .expect("writing a bad certificate");
    let refused = match lab.ok(lab.d().reload(), "reloading") {
        Reload::Refused(line) => line,
        Reload::Applied(line) => lab.fail(format!("a bad certificate was accepted: {line}")),
    };
    assert!(
        refused.contains("virtual_services[1].tls.cert_file")
            && refused.contains(&dir.cert().display().to_string()),
        "the refusal names the field and the file: {refused}"
    );
    let seen = served_cert(&lab, src, &second)
        .unwrap_or_else(|e| lab.fail(format!("after a refused reload: {e}")));
    assert_eq!(seen, second, "the old certificate keeps serving");
    // And the cleartext service never stopped.
    let r = lab.ok(
        lab.topo.request(src, PORT, "/", &[], IO_TIMEOUT),
        "GET / on the cleartext service",
    );
    assert_eq!(r.status, 200);
    lab.stop();
}

#[test]
fn a_restart_that_fails_leaves_the_old_daemon_serving() {
    let dir = Scratch::new();
    let first = dir.renew();
    let mut lab = tls_lab(&dir);
    let old = pid(&lab);
    let requests = RequestLoop::start(&lab, PORT);
    requests.wait_for_more(&lab, 0, SETTLE_REQUESTS, "requests before the restart");
    // The new process cannot load the certificate: it fails before taking anything over.
    std::fs::write(dir.key(), "not a key\n").expect("writing a bad key");
    let d = lab.daemon.as_mut().expect("running");
    let err = match d.restart() {
        Ok(out) => lab.fail(format!("a restart with a bad key succeeded: {out}")),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("exited"),
        "the failure says the new process exited: {err}"
    );
    assert_eq!(pid(&lab), old, "the old daemon still runs");
    let at_failure = requests.count();
    requests.wait_for_more(
        &lab,
        at_failure,
        SETTLE_REQUESTS,
        "requests after the failed restart",
    );
    let outcomes = requests.finish();
    assert_all_answered(&lab, &outcomes, "across a failed restart");
    let logs = lab.logs();
    assert!(
        logs.contains("virtual_services[1].tls.key_file"),
        "the new process's error names the field:\n{logs}"
    );
    // The old daemon serves TLS with the certificate it had.
    let seen = served_cert(&lab, lab.client(1), &first).unwrap_or_else(|e| lab.fail(e));
    assert_eq!(seen, first);
    lab.stop();
}
