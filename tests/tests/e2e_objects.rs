//! End to end, the control plane: virtual services, pools and profiles managed through the
//! admin API and `tether vs|pool|profile`, against the real daemon started as users start it
//! (`ip netns exec`, a config without optional fields but its own pin directory). Changes
//! apply live (no restart), are written back to the config file (a restart and a SIGHUP find
//! them), and one under load moves no session it does not have to.
//!
//! Needs root and `TETHER_BIN`: run with `cargo xtask test`, or `TETHER_BIN=target/debug/tether
//! cargo test -p tether-tests --test e2e_objects -- --test-threads=1`. Every loop and wait is
//! bounded; failures panic with what was seen and the daemon's output.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tether_tests::{
    daemon::{Daemon, Reload, admin_request, tether_bin},
    http::{Echo, http_get_from, request_from},
    l7lab::{IO_TIMEOUT, L7Lab, PORT},
    netns::{VIP, run_in_netns, spawn_in_netns},
};

/// One admin API request over TCP with the daemon's bearer token and a JSON body: the
/// status and the JSON answer.
fn api(d: &Daemon, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let token = d
        .admin_token()
        .unwrap_or_else(|e| panic!("admin token: {e:#}"));
    let addr = d.admin_addr();
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let raw = run_in_netns(d.ns(), move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())?;
        let mut raw = Vec::new();
        s.take(16 << 20).read_to_end(&mut raw)?;
        Ok(raw)
    })
    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: malformed answer {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"));
    let v = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body:?}"));
    (status, v)
}

/// `tether --netns NS ARGS --config FILE`: Ok(stdout) or Err(the error text).
fn cli(d: &Daemon, args: &[&str]) -> Result<String, String> {
    let cfg = d.config_path().to_string_lossy().into_owned();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", &cfg]);
    d.cli(&all).map_err(|e| format!("{e:#}"))
}

fn status_backend(d: &Daemon, service: &str, backend: &str) -> Option<Value> {
    let s = d
        .admin_json("/status")
        .unwrap_or_else(|e| panic!("/status: {e:#}"));
    s["services"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == service)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == backend)
        .cloned()
}

fn generation(d: &Daemon) -> u64 {
    d.admin_json("/status")
        .unwrap_or_else(|e| panic!("/status: {e:#}"))["generation"]
        .as_u64()
        .expect("generation")
}

/// Round trips of every kind through the CLI and the API, Avi's rules, refusals that change
/// nothing, concurrent writers, and the written-back file surviving SIGHUP and a restart.
#[test]
fn objects_are_managed_live_and_written_back() {
    let mut lab = L7Lab::start_as_user(4, 3, |b| {
        b.without_backend("b3")
            .profile(json!({"name": "ck", "type": "http-cookie", "cookie_name": "SRV"}))
            .l7_service("web", PORT, Some("ck"), json!({}))
    });
    let d = lab.d();
    let src = lab.client(0);
    let b3_addr = lab.topo.backends[2].addr.to_string();

    // List, then a profile created and put to use: new clients get its cookie at once.
    let list = lab.ok(cli(d, &["vs", "list"]), "tether vs list");
    // The same over TCP with the bearer token.
    let (addr, token) = (
        d.admin_addr().to_string(),
        d.admin_token_file().to_string_lossy().into_owned(),
    );
    let tcp_list = lab.ok(
        d.cli(&["vs", "list", "--admin", &addr, "--token-file", &token]),
        "tether vs list --admin",
    );
    assert_eq!(tcp_list, list, "the Unix socket and TCP agree");
    assert!(
        list.contains("web") && list.contains("l7") && list.contains("ck"),
        "{list}"
    );
    let out = lab.ok(
        cli(
            d,
            &[
                "profile",
                "create",
                "--type",
                "http-cookie",
                "--name",
                "web-ck",
                "--set",
                "cookie_name=WEBCK",
                "--set",
                "max_lifetime_min=30",
            ],
        ),
        "tether profile create",
    );
    assert!(out.contains("created persistence profile web-ck"), "{out}");
    lab.ok(
        cli(d, &["vs", "edit", "web", "--persistence", "web-ck"]),
        "tether vs edit",
    );
    let r = lab.ok(lab.topo.request(src, PORT, "/", &[], IO_TIMEOUT), "request");
    assert!(
        r.set_cookie_value("WEBCK").is_some(),
        "the edited service issues WEBCK: {:?}",
        r.headers
    );
    let shown: Value = serde_json::from_str(&lab.ok(cli(d, &["vs", "show", "web"]), "vs show"))
        .expect("vs show prints JSON");
    assert_eq!(shown["persistence"], "web-ck");

    // A pool gains a backend; an edit of one backend drains it (API and CLI alike).
    lab.ok(
        cli(
            d,
            &[
                "pool",
                "edit",
                "web",
                "--add-backend",
                &format!("b3={b3_addr}"),
            ],
        ),
        "add b3",
    );
    let b3 = status_backend(d, "web", "b3").unwrap_or_else(|| lab.fail("b3 is not in /status"));
    assert_eq!(b3["admin_state"], "enabled", "{b3}");
    lab.ok(
        cli(
            d,
            &[
                "pool",
                "edit",
                "web",
                "--backend",
                "b3",
                "--admin-state",
                "draining",
            ],
        ),
        "drain b3",
    );
    let b3 = status_backend(d, "web", "b3").expect("b3");
    assert_eq!(
        (&b3["admin_state"], &b3["state"]),
        (&json!("draining"), &json!("draining")),
        "{b3}"
    );
    let (st, b) = api(
        d,
        "PATCH",
        "/api/v1/pool/web/backend/b3",
        Some(&json!({"admin_state": "enabled"})),
    );
    assert_eq!((st, &b["admin_state"]), (200, &json!("enabled")), "{b}");

    // A second service on the profile; deleting the profile or the pool names both.
    let vs2 = json!({"name": "web2", "vip": VIP.to_string(), "port": PORT + 1, "protocol": "tcp",
                     "mode": "l7", "pool": "web", "persistence": "web-ck"});
    assert_eq!(
        api(d, "POST", "/api/v1/virtualservice", Some(&vs2)),
        (201, vs2.clone())
    );
    let (st, v) = api(d, "DELETE", "/api/v1/profile/web-ck", None);
    assert_eq!(
        (st, &v["virtual_services"]),
        (409, &json!(["web", "web2"])),
        "{v}"
    );
    let e = cli(d, &["pool", "delete", "web"]).expect_err("an in-use pool is not deleted");
    assert!(e.contains("409") && e.contains("web, web2"), "{e}");
    // System profiles: listed, usable, not deletable.
    let profiles = lab.ok(cli(d, &["profile", "list"]), "tether profile list");
    assert!(
        profiles.contains("System-Persistence-Client-IP") && profiles.contains("(system)"),
        "{profiles}"
    );
    let e = cli(d, &["profile", "delete", "System-Persistence-Client-IP"]).expect_err("system");
    assert!(e.contains("403") && e.contains("system profile"), "{e}");
    lab.ok(
        cli(
            d,
            &[
                "vs",
                "edit",
                "web2",
                "--persistence",
                "System-Persistence-Client-IP",
            ],
        ),
        "use a system profile",
    );

    // Refused changes change nothing: not the file, not what runs.
    let file_before = std::fs::read(d.config_path()).expect("config file");
    let gen_before = generation(d);
    let e = cli(
        d,
        &["pool", "edit", "web", "--backend", "b1", "--weight", "5000"],
    )
    .expect_err("weight above the maximum");
    assert!(
        e.contains("422") && e.contains("pools[0].backends[0].weight"),
        "{e}"
    );
    let (st, v) = api(
        d,
        "PATCH",
        "/api/v1/virtualservice/web",
        Some(&json!({"port": 0, "mode": "l9"})),
    );
    assert_eq!(
        (st, v["field"].as_str()),
        (422, Some("virtual_services[0].mode")),
        "{v}"
    );
    // Without the token: 401, and nothing deleted.
    let r = admin_request(
        d.ns(),
        d.admin_addr(),
        "DELETE",
        "/api/v1/virtualservice/web2",
    )
    .unwrap_or_else(|e| lab.fail(format!("{e:#}")));
    assert_eq!(r.status, 401, "{}", r.body);
    let r = admin_request(d.ns(), d.admin_addr(), "GET", "/api/v1/pool")
        .unwrap_or_else(|e| lab.fail(format!("{e:#}")));
    assert_eq!(
        r.status, 401,
        "reading objects needs the token too: {}",
        r.body
    );
    assert_eq!(
        std::fs::read(d.config_path()).expect("config file"),
        file_before,
        "file unchanged"
    );
    assert_eq!(generation(d), gen_before, "nothing applied");

    // Two writers at once, each adding its own backends to a spare pool: none is lost.
    lab.ok(
        cli(
            d,
            &[
                "pool",
                "create",
                "--name",
                "spare",
                "--add-backend",
                "s0=10.99.0.1",
            ],
        ),
        "pool create",
    );
    const EACH: usize = 6;
    let writers: Vec<_> = ["x", "y"]
        .into_iter()
        .enumerate()
        .map(|(w, p)| {
            let (bin, ns, cfg) = (
                tether_bin().expect("TETHER_BIN"),
                d.ns().to_string(),
                d.config_path().to_owned(),
            );
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let spec = format!("{p}{i}=10.99.{}.{}", w + 1, i + 1);
                    let out = Command::new(&bin)
                        .args([
                            "--netns",
                            &ns,
                            "pool",
                            "edit",
                            "spare",
                            "--add-backend",
                            &spec,
                        ])
                        .arg("--config")
                        .arg(&cfg)
                        .output()
                        .expect("running tether");
                    assert!(
                        out.status.success(),
                        "{spec}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let (_, spare) = api(d, "GET", "/api/v1/pool/spare", None);
    let names: Vec<&str> = spare["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(names.len(), 1 + 2 * EACH, "no lost update: {names:?}");

    // The file holds every change: SIGHUP of it changes nothing, and a restart comes up so.
    let written: Value = serde_json::from_slice(&std::fs::read(d.config_path()).expect("file"))
        .expect("the written file is JSON");
    let g = generation(d);
    match lab.ok(d.reload(), "SIGHUP") {
        Reload::Applied(_) => {}
        Reload::Refused(l) => lab.fail(format!("SIGHUP of the written file refused: {l}")),
    }
    assert_eq!(generation(d), g + 1);
    let old = lab.daemon.take().expect("daemon");
    old.stop_keep_pins()
        .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
    let bin = tether_bin().expect("TETHER_BIN");
    lab.daemon = Some(
        Daemon::start_with_existing_pins(&bin, &lab.topo.lb.ns, &written, false)
            .unwrap_or_else(|e| panic!("restarting tether with the written file: {e:#}")),
    );
    let d = lab.d();
    let (_, vs) = api(d, "GET", "/api/v1/virtualservice", None);
    assert_eq!(vs.as_array().map(Vec::len), Some(2), "{vs}");
    assert_eq!(
        api(d, "GET", "/api/v1/virtualservice/web", None).1["persistence"],
        "web-ck"
    );
    let r = lab.ok(
        lab.topo.request(src, PORT, "/", &[], IO_TIMEOUT),
        "request after restart",
    );
    assert!(
        r.set_cookie_value("WEBCK").is_some(),
        "after the restart: {:?}",
        r.headers
    );
    // Deletes, in the order the rules allow.
    assert_eq!(api(d, "DELETE", "/api/v1/virtualservice/web2", None).0, 200);
    lab.ok(
        cli(d, &["vs", "edit", "web", "--persistence", "ck"]),
        "back to ck",
    );
    let out = lab.ok(cli(d, &["profile", "delete", "web-ck"]), "profile delete");
    assert!(out.contains("deleted persistence profile web-ck"), "{out}");
    assert_eq!(api(d, "DELETE", "/api/v1/pool/spare", None).0, 200);
    lab.stop();
}

/// One observed request: who, which backend before, which now (or the error).
type Seen = Arc<Mutex<Vec<(String, Option<String>, Result<String, String>)>>>;

/// A pool gains and loses a backend and a profile's timeout changes through the API while
/// cookie sessions, an L4 source-IP stream and wrk run: no request fails and no session moves.
#[test]
fn live_changes_under_load_keep_sessions() {
    const LOADED_IO_TIMEOUT: Duration = Duration::from_secs(15);
    const L7_PORT: u16 = PORT + 1;
    const SESSIONS: usize = 8;
    const L4_CLIENTS: usize = 12;
    let lab = L7Lab::start_as_user(L4_CLIENTS.max(SESSIONS), 3, |mut b| {
        for n in ["b1", "b2", "b3"] {
            b = b.backend_field(n, "port", json!(PORT));
        }
        b.without_backend("b3")
            .profile(json!({"name": "ck", "type": "http-cookie", "cookie_name": "SRV"}))
            .l7_service("web-l7", L7_PORT, Some("ck"), json!({}))
            .service("web-l4", PORT, Some(600))
    });
    let vip7 = SocketAddrV4::new(VIP, L7_PORT);
    let vip4 = SocketAddrV4::new(VIP, PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Seen = Arc::default();
    let mut threads = Vec::new();
    for s in 0..SESSIONS {
        let src = lab.client(s);
        let (stop, seen) = (stop.clone(), seen.clone());
        threads.push(
            spawn_in_netns(&lab.topo.client.ns, &format!("session-{s}"), move || {
                let (mut cookie, mut backend): (Option<String>, Option<String>) = (None, None);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 5000 {
                    n += 1;
                    let hdrs: Vec<(&str, &str)> = cookie
                        .as_deref()
                        .map(|c| vec![("Cookie", c)])
                        .unwrap_or_default();
                    let got = request_from(src, vip7, "/", &hdrs, LOADED_IO_TIMEOUT)
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
                    seen.lock().unwrap().push((
                        format!("session {s}"),
                        backend.clone(),
                        got.clone(),
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
    {
        let srcs: Vec<Ipv4Addr> = (0..L4_CLIENTS).map(|i| lab.client(i)).collect();
        let (stop, seen) = (stop.clone(), seen.clone());
        threads.push(
            spawn_in_netns(&lab.topo.client.ns, "l4-stream", move || {
                let mut last: BTreeMap<usize, String> = BTreeMap::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) && i < 20_000 {
                    let who = i % srcs.len();
                    // A longer wait than IO_TIMEOUT: under wrk on a loaded 2-core machine a
                    // request can wait past 3 s (seen once as EAGAIN, likely a full accept
                    // queue); a reset or a wrong backend still fails at once.
                    let got = http_get_from(srcs[who], vip4, LOADED_IO_TIMEOUT)
                        .map_err(|e| e.to_string())
                        .and_then(|body| {
                            let b = body.split("\r\n\r\n").nth(1).unwrap_or(&body);
                            Echo::parse(b)
                                .map(|e| e.backend)
                                .ok_or_else(|| format!("not an echo: {b:?}"))
                        });
                    seen.lock().unwrap().push((
                        format!("l4 client {who}"),
                        last.get(&who).cloned(),
                        got.clone(),
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
    let wrk = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.topo.client.ns,
            "wrk",
            "-t",
            "1",
            "-c",
            "4",
            "-d",
            "12s",
            "--timeout",
            "5s",
        ])
        .arg(format!("http://{vip7}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wrk");

    // Warm-up: every session and L4 client is bound before anything changes.
    std::thread::sleep(Duration::from_secs(2));
    let d = lab.d();
    let b3_addr = lab.topo.backends[2].addr;
    let gen0 = generation(d);
    let t0 = Instant::now();
    let steps: [(&str, &str, Option<Value>); 3] = [
        (
            "POST",
            "/api/v1/pool/web/backend",
            Some(json!({"name": "b3", "address": b3_addr.to_string(), "port": PORT, "weight": 1})),
        ),
        (
            "PATCH",
            "/api/v1/profile/sticky-web-l4",
            Some(json!({"timeout_s": 900})),
        ),
        ("DELETE", "/api/v1/pool/web/backend/b3", None),
    ];
    for (m, p, body) in &steps {
        let (st, v) = api(d, m, p, body.as_ref());
        if !(200..300).contains(&st) {
            stop.store(true, Ordering::Relaxed);
            lab.fail(format!("{m} {p}: {st} {v}"));
        }
        std::thread::sleep(Duration::from_millis(2500));
    }
    assert_eq!(generation(d), gen0 + 3, "three live changes");
    let (_, p) = api(d, "GET", "/api/v1/profile/sticky-web-l4", None);
    assert_eq!(p["timeout_s"], 900);
    let s = d.admin_json("/status").expect("/status");
    let l4 = s["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|v| v["name"] == "web-l4")
        .expect("web-l4");
    assert_eq!(l4["persistence"]["timeout_s"], 900, "the new timeout runs");
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    let out = wrk.wait_with_output().expect("wrk");
    let wrk_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let changed_for = t0.elapsed();

    let seen_all = seen.lock().unwrap().clone();
    let seen = &seen_all;
    let failed: Vec<_> = seen.iter().filter(|(_, _, g)| g.is_err()).collect();
    let moved: Vec<_> = seen
        .iter()
        .filter(|(_, before, got)| matches!((before, got), (Some(b), Ok(g)) if b != g))
        .collect();
    let per_who = seen
        .iter()
        .fold(BTreeMap::<&str, usize>::new(), |mut m, (w, _, _)| {
            *m.entry(w.as_str()).or_default() += 1;
            m
        });
    assert!(
        per_who.len() == SESSIONS + L4_CLIENTS && per_who.values().all(|&n| n >= 5),
        "every session and client made requests throughout: {per_who:?}"
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(10)],
        lab.logs()
    );
    assert!(
        moved.is_empty(),
        "{} requests moved: {:?}",
        moved.len(),
        &moved[..moved.len().min(10)]
    );
    let (requests, errors) = parse_wrk(&wrk_text);
    assert!(
        requests > 0 && errors == 0,
        "wrk over {changed_for:?}: {requests} requests, {errors} errors\n{wrk_text}"
    );
    eprintln!(
        "live changes over {changed_for:?}: {} session and L4 requests, 0 failed, 0 moved; wrk {requests} requests, 0 errors",
        seen.len()
    );
    // Changing the L4 profile's key (its prefix) flushes that service's kernel entries only.
    let entries = |svc: &str| {
        d.admin_json(&format!("/persist?service={svc}"))
            .expect("/persist")["entries"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let bound = entries("web-l4");
    assert!(bound >= L4_CLIENTS, "every L4 client is bound: {bound}");
    let (st, v) = api(
        d,
        "PATCH",
        "/api/v1/profile/sticky-web-l4",
        Some(&json!({"ipv4_prefix": 24})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        entries("web-l4"),
        0,
        "the rekeyed service's entries are flushed"
    );
    lab.stop();
}

/// (requests, socket errors + non-2xx/3xx) from wrk's summary.
fn parse_wrk(text: &str) -> (u64, u64) {
    let mut requests = 0;
    let mut errors = 0;
    for l in text.lines().map(str::trim) {
        if let Some((n, _)) = l.split_once(" requests in ") {
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

/// `tether pool edit web --backend B --admin-state draining` on an L4 source-IP service: B
/// keeps its bound clients (their entries are not flushed), takes no new ones, and its
/// bound-client count in `tether status` falls to 0 as the idle entries expire.
#[test]
fn draining_through_the_cli_keeps_then_empties_a_backend() {
    const CLIENTS: usize = 16;
    let lab = L7Lab::start_as_user(CLIENTS, 2, |b| b.service("web-l4", PORT, Some(3)));
    let d = lab.d();
    let backend_of = |i: usize| -> String {
        let body = lab.ok(lab.topo.fetch(lab.client(i), PORT, IO_TIMEOUT), "L4 fetch");
        let b = body.split("\r\n\r\n").nth(1).unwrap_or(&body);
        Echo::parse(b)
            .map(|e| e.backend)
            .unwrap_or_else(|| lab.fail(format!("not an echo: {b:?}")))
    };
    // The first half of the clients get bound.
    let bound: Vec<(usize, String)> = (0..CLIENTS / 2).map(|i| (i, backend_of(i))).collect();
    let victim = bound[0].1.clone();
    let on_victim = bound.iter().filter(|(_, b)| *b == victim).count();
    let count = |what: &str| -> u64 {
        status_backend(d, "web-l4", &victim)
            .and_then(|b| b["bound_clients"].as_u64())
            .unwrap_or_else(|| lab.fail(format!("{what}: no bound_clients for {victim}")))
    };
    lab.wait_for(
        Duration::from_secs(15),
        "the census counting the bound clients",
        || count("before") == on_victim as u64,
    );

    let out = lab.ok(
        cli(
            d,
            &[
                "pool",
                "edit",
                "web",
                "--backend",
                &victim,
                "--admin-state",
                "draining",
            ],
        ),
        "tether pool edit --admin-state draining",
    );
    assert!(out.contains("draining"), "{out}");
    let b = status_backend(d, "web-l4", &victim).expect("victim");
    assert_eq!(b["state"], "draining", "{b}");
    let text = lab.ok(cli(d, &["status"]), "tether status");
    assert!(
        text.lines()
            .any(|l| l.contains(&format!(" {victim} ")) && l.contains("draining")),
        "tether status shows {victim} draining:\n{text}"
    );
    // Its bound clients stay with it; new clients go elsewhere.
    for (i, b) in &bound {
        if *b == victim {
            assert_eq!(&backend_of(*i), b, "client {i} keeps its draining backend");
        }
    }
    for i in CLIENTS / 2..CLIENTS {
        assert_ne!(
            backend_of(i),
            victim,
            "new client {i} went to the draining backend"
        );
    }
    // Idle, their entries expire (timeout 3 s) and the count falls to 0.
    lab.wait_for(
        Duration::from_secs(30),
        "the draining backend's bound clients falling to 0",
        || count("after") == 0,
    );
    lab.stop();
}

/// Changing a profile's type through the API starts only its services' L7 tables empty; a
/// timeout change of another profile keeps that one's bindings.
#[test]
fn a_profile_type_change_flushes_only_its_services_tables() {
    let lab = L7Lab::start_as_user(4, 2, |mut b| {
        for n in ["b1", "b2"] {
            b = b.backend_field(n, "port", json!(PORT));
        }
        b.profile(json!({"name": "pa", "type": "client-ip", "timeout_s": 600}))
            .profile(json!({"name": "pb", "type": "client-ip", "timeout_s": 600}))
            .l7_service("a", PORT, Some("pa"), json!({}))
            .l7_service("b", PORT + 1, Some("pb"), json!({}))
    });
    let d = lab.d();
    for i in 0..4 {
        for port in [PORT, PORT + 1] {
            let r = lab.ok(
                lab.topo.request(lab.client(i), port, "/", &[], IO_TIMEOUT),
                "request",
            );
            assert_eq!(r.status, 200);
        }
    }
    let l7_rows = |svc: &str| -> usize {
        let v = d
            .admin_json(&format!("/persist?service={svc}"))
            .expect("/persist");
        v["l7"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(
        (l7_rows("a"), l7_rows("b")),
        (4, 4),
        "one binding per client and service"
    );
    let (st, v) = api(
        d,
        "PATCH",
        "/api/v1/profile/pb",
        Some(&json!({"timeout_s": 900})),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = api(
        d,
        "PUT",
        "/api/v1/profile/pa",
        Some(&json!({"type": "url-hash", "timeout_s": 600})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        l7_rows("a"),
        0,
        "the retyped profile's service starts empty"
    );
    assert_eq!(
        l7_rows("b"),
        4,
        "the other profile's bindings stay through its timeout change"
    );
    lab.stop();
}
