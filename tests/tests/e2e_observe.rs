//! End to end, observability: the per-method L7 figures in `/metrics`, `tether status` and
//! `tether top --once`, after known cookie traffic through the real daemon (started with
//! `ip netns exec` and a config without optional fields), and a draining backend's bound
//! clients falling in `tether status` as its sessions expire and move.
//!
//! Needs root and `TETHER_BIN`: `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_observe -- --test-threads=1`.
//! Every loop and wait is bounded; nothing asserts how long anything took.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::Ipv4Addr,
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::json;
use tether_tests::{
    daemon::tether_bin,
    http::{HttpResponse, KeepAlive},
    l7lab::{IO_TIMEOUT, L7Lab, PORT},
};

const COOKIE: &str = "SRV";
const KEY: &str = "3333333333333333333333333333333333333333333333333333333333333333";
/// Bound on waiting for idle bindings to expire (their timeout is 1 s).
const EXPIRY_WAIT: Duration = Duration::from_secs(20);

fn get(lab: &L7Lab, src: Ipv4Addr, headers: &[(&str, &str)]) -> HttpResponse {
    let r = lab.ok(
        lab.topo.request(src, PORT, "/", headers, IO_TIMEOUT),
        &format!("GET / from {src} with {headers:?}"),
    );
    if r.status != 200 {
        lab.fail(format!("GET / from {src}: status {}: {r:?}", r.status));
    }
    r
}

fn backend_of(lab: &L7Lab, r: &HttpResponse) -> String {
    lab.ok(r.echo(), "reading the echo body").backend
}

/// The whitespace-separated words of the first line of `text` whose first two words are
/// `first` and `second` (`None`: any second word).
fn row(text: &str, first: &str, second: Option<&str>) -> Option<Vec<String>> {
    text.lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|w| {
            w.first().is_some_and(|f| f == first)
                && second.is_none_or(|s| w.get(1).is_some_and(|x| x == s))
        })
}

/// A pseudo-terminal of `rows` x `cols`: (master, slave).
fn pty(rows: u16, cols: u16) -> (File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the locals; the winsize outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Escape sequences removed (a cursor move becomes one space): the text the terminal was sent.
fn strip_escapes(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte. ratatui moves the cursor
            // over blank cells instead of writing them: a move counts as a space.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    if c == 'H' {
                        out.push(' ');
                    }
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// `tether top` on a terminal (a pty, as an operator's): it draws every text of `want`, and
/// the key `quit` (`q`, or Ctrl-C: raw mode makes it a key) ends it with status 0 after it
/// left the alternate screen.
fn live_top(lab: &L7Lab, cfg: &str, want: &[&str], quit: &[u8]) {
    const WAIT: Duration = Duration::from_secs(20);
    let (mut master, slave) = pty(40, 160);
    let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let stdin = lab.ok(slave.try_clone(), "dup pty");
    let stdout = lab.ok(slave.try_clone(), "dup pty");
    let mut child = lab.ok(
        Command::new(&bin)
            .args([
                "--netns",
                lab.d().ns(),
                "top",
                "--interval",
                "0.3",
                "--config",
                cfg,
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(slave))
            .spawn(),
        "starting tether top on a pty",
    );
    let mut reader = lab.ok(master.try_clone(), "dup pty master");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    // Reads until the pty closes (EIO once the child and every slave copy are gone).
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let deadline = Instant::now() + WAIT;
    let drawn = |raw: &[u8]| {
        let text = strip_escapes(&String::from_utf8_lossy(raw));
        want.iter().all(|w| text.contains(w))
    };
    while !drawn(&raw) && Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            raw.extend(chunk);
        }
    }
    if !drawn(&raw) {
        let _ = child.kill();
        let _ = child.wait();
        lab.fail(format!(
            "tether top did not draw {want:?}:\n{}",
            strip_escapes(&String::from_utf8_lossy(&raw))
        ));
    }
    lab.ok(master.write_all(quit), "typing the quit key");
    let status = loop {
        if let Some(st) = lab.ok(child.try_wait(), "waiting for tether top") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            lab.fail(format!("tether top did not quit on {quit:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
        raw.extend(chunk);
    }
    assert!(status.success(), "tether top exited with {status}");
    let text = String::from_utf8_lossy(&raw);
    let (enter, leave) = ("\u{1b}[?1049h", "\u{1b}[?1049l");
    assert!(
        text.contains(enter) && text.rfind(leave) > text.rfind(enter),
        "tether top left the alternate screen it entered"
    );
}

/// Two clients with `http-cookie` (and the source-IP fallback): A opens a session and comes
/// back 9 times with its cookie; B first sends a tampered cookie (counted by reason, balanced
/// anew, bound by the fallback), then comes back 4 times with the cookie it got. 15 requests,
/// 13 hits, 2 new bindings; each figure is checked where an operator reads it.
#[test]
fn cookie_traffic_is_counted_per_method_in_metrics_status_and_top() {
    let lab = L7Lab::start_as_user(2, 2, |b| {
        b.profile(json!({
            "name": "ck",
            "type": "http-cookie",
            "cookie_name": COOKIE,
            "keys": [{"id": 1, "secret": KEY}],
            "fallback": {"type": "client-ip"},
        }))
        .l7_service("web", PORT, Some("ck"), json!({}))
    });
    let (a, b) = (lab.client(0), lab.client(1));
    // (hits, new) per backend, as the traffic below decides them.
    let mut expect: BTreeMap<String, (u64, u64)> = lab
        .backend_names()
        .into_iter()
        .map(|n| (n, (0, 0)))
        .collect();

    let first = get(&lab, a, &[]);
    let x = backend_of(&lab, &first);
    let ca = first
        .set_cookie_value(COOKIE)
        .unwrap_or_else(|| lab.fail(format!("no {COOKIE} cookie for a new client: {first:?}")));
    expect.get_mut(&x).expect("a configured backend").1 += 1;
    let cookie_a = format!("{COOKIE}={ca}");
    for _ in 0..9 {
        let r = get(&lab, a, &[("Cookie", &cookie_a)]);
        assert_eq!(backend_of(&lab, &r), x, "A's cookie keeps it on {x}");
    }
    expect.get_mut(&x).expect("a configured backend").0 += 9;

    // A's cookie with one character of its sealed part changed: it no longer authenticates.
    let mut forged: Vec<char> = ca.chars().collect();
    let mid = forged.len() / 2;
    forged[mid] = if forged[mid] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    let r = get(&lab, b, &[("Cookie", &format!("{COOKIE}={forged}"))]);
    let y = backend_of(&lab, &r);
    let cb = r
        .set_cookie_value(COOKIE)
        .unwrap_or_else(|| lab.fail(format!("the tampered cookie was not re-issued: {r:?}")));
    expect.get_mut(&y).expect("a configured backend").1 += 1;
    for _ in 0..4 {
        let r = get(&lab, b, &[("Cookie", &format!("{COOKIE}={cb}"))]);
        assert_eq!(backend_of(&lab, &r), y, "B's new cookie keeps it on {y}");
    }
    expect.get_mut(&y).expect("a configured backend").0 += 4;
    // Each client is bound once in the fallback table, on its first backend.
    let mut bound: BTreeMap<String, u64> = expect.keys().map(|n| (n.clone(), 0)).collect();
    *bound.get_mut(&x).expect("configured") += 1;
    *bound.get_mut(&y).expect("configured") += 1;

    // /metrics: every per-method family, labelled by service and method.
    let svc = [("service", "web"), ("method", "http-cookie")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut l = svc.to_vec();
        l.extend_from_slice(extra);
        l
    };
    assert_eq!(lab.metric("tether_l7_persistence_hits_total", &svc), 13);
    assert_eq!(
        lab.metric("tether_l7_persistence_new_bindings_total", &svc),
        2
    );
    assert_eq!(
        lab.metric("tether_l7_persistence_expirations_total", &svc),
        0
    );
    assert_eq!(
        lab.metric("tether_l7_persistence_table_evictions_total", &svc),
        0
    );
    assert_eq!(
        lab.metric(
            "tether_l7_persistence_invalid_cookies_total",
            &with(&[("reason", "tampered")])
        ),
        1,
        "B's cookie"
    );
    for reason in ["malformed", "unknown_key", "foreign_service", "expired"] {
        assert_eq!(
            lab.metric(
                "tether_l7_persistence_invalid_cookies_total",
                &with(&[("reason", reason)])
            ),
            0,
            "{reason}"
        );
    }
    assert_eq!(
        lab.metric(
            "tether_l7_persistence_table_entries",
            &with(&[("table", "fallback")])
        ),
        2,
        "A and B in the fallback table"
    );
    for (name, (hits, new)) in &expect {
        let be = [
            ("service", "web"),
            ("method", "http-cookie"),
            ("backend", name.as_str()),
        ];
        let mut hit = be.to_vec();
        hit.push(("decision", "hit"));
        let mut fresh = be.to_vec();
        fresh.push(("decision", "new"));
        assert_eq!(
            lab.metric("tether_l7_backend_requests_total", &hit),
            *hits,
            "{name} hits"
        );
        assert_eq!(
            lab.metric("tether_l7_backend_requests_total", &fresh),
            *new,
            "{name} new"
        );
        assert_eq!(
            lab.metric("tether_l7_backend_reassigned_down_total", &be),
            0,
            "{name}"
        );
        assert_eq!(
            lab.metric("tether_l7_backend_bound_clients", &be),
            bound[name],
            "{name} bound clients"
        );
    }

    // tether status: the method line, the tables, the invalid cookies and each backend.
    let cfg = lab.d().config_path().display().to_string();
    let status = lab.ok(lab.d().cli(&["status", "--config", &cfg]), "tether status");
    for want in [
        "  l7 method http-cookie: requests 15  hits 13  new 2  hit ratio 86.7%  expired 0  reassigned (backend down) 0",
        "  l7 table size: fallback 2/1048576\n",
        "  l7 invalid cookies: 1 (tampered 1)",
    ] {
        if !status.contains(want) {
            lab.fail(format!("tether status lacks {want:?}:\n{status}"));
        }
    }
    for (name, (hits, new)) in &expect {
        let words = row(&status, name, None)
            .unwrap_or_else(|| lab.fail(format!("no row for {name}:\n{status}")));
        // ... L7 BOUND, L7 HITS, L7 NEW, L7 MOVED OFF, HEALTH (no monitor).
        let want = [
            bound[name].to_string(),
            hits.to_string(),
            new.to_string(),
            "0".into(),
            "-".into(),
        ];
        assert_eq!(
            words[words.len() - 5..],
            want,
            "{name} in tether status:\n{status}"
        );
    }

    // tether top --once: two samples 0.3 s apart with no traffic between them.
    let top = lab.ok(
        lab.d()
            .cli(&["top", "--once", "--interval", "0.3", "--config", &cfg]),
        "tether top --once",
    );
    if !top.starts_with("tether top: generation ") || !top.contains(", rates over ") {
        lab.fail(format!("tether top header:\n{top}"));
    }
    let web =
        row(&top, "web", Some("l7")).unwrap_or_else(|| lab.fail(format!("no web row:\n{top}")));
    // SERVICE MODE METHOD REQ/S PKT/S HIT%NOW HIT%ALL BOUND NEW EXPIRED INVALID MOVED TABLE
    assert_eq!(
        web,
        [
            "web",
            "l7",
            "http-cookie",
            "0.0",
            "-",
            "-",
            "86.7%",
            "2",
            "2",
            "0",
            "1",
            "0",
            "2"
        ],
        "{top}"
    );
    for (name, (hits, new)) in &expect {
        let Some(words) = row(&top, "web", Some(name)) else {
            lab.fail(format!("no row for backend {name}:\n{top}"));
        };
        let ratio = match hits + new {
            0 => "-".to_string(),
            n => format!("{:.1}%", *hits as f64 * 100.0 / n as f64),
        };
        // SERVICE BACKEND STATE HEALTH ADMIN REQ/S PKT/S HIT%ALL BOUND
        let want = [
            "web".to_string(),
            name.clone(),
            "up".into(),
            "-".into(),
            "enabled".into(),
            "0.0".into(),
            "-".into(),
            ratio,
            bound[name].to_string(),
        ];
        assert_eq!(words, want, "{name} in tether top:\n{top}");
    }
    live_top(
        &lab,
        &cfg,
        &["http-cookie", "86.7%", "90.0%", "q: quit"],
        b"q",
    );
    match lab
        .d()
        .cli(&["top", "--once", "--interval", "0", "--config", &cfg])
    {
        Ok(out) => lab.fail(format!("--interval 0 was accepted:\n{out}")),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(
                e.contains("--interval") && e.contains("not between 0.1 and 60 seconds"),
                "{e}"
            );
        }
    }
    lab.stop();
}

/// `client-ip` persistence (timeout 1 s) on the L7 proxy, six clients over two backends.
/// Backend X is edited to `draining` (`tether pool edit`, applied live): its bound clients
/// stay while a client keeps a connection open and fall as the others' entries expire; once
/// the last one is closed and idle, X is bound to nobody and that client is served elsewhere.
#[test]
fn a_draining_backends_bound_clients_fall_in_status_as_sessions_expire() {
    let lab = L7Lab::start_as_user(6, 2, |b| {
        b.profile(json!({"name": "cip", "type": "client-ip", "timeout_s": 1}))
            .l7_service("web", PORT, Some("cip"), json!({}))
    });
    // A holds a keep-alive connection to its backend X: its entry cannot expire meanwhile.
    let a = lab.client(0);
    let stream = lab.ok(lab.topo.connect_vip(a, PORT, IO_TIMEOUT), "connecting A");
    let mut held = KeepAlive::new(stream, IO_TIMEOUT);
    let r = lab.ok(held.request("/", &[]), "A's request on its connection");
    let x = backend_of(&lab, &r);
    let mut on: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::from([(x.clone(), vec![a])]);
    for i in 1..6 {
        let src = lab.client(i);
        let r = get(&lab, src, &[]);
        on.entry(backend_of(&lab, &r)).or_default().push(src);
    }
    let cfg = lab.d().config_path().display().to_string();
    // L7 BOUND of X in `tether status` (5th column from the end) and X's state.
    let status_of_x = |lab: &L7Lab| {
        let text = lab.ok(lab.d().cli(&["status", "--config", &cfg]), "tether status");
        let words =
            row(&text, &x, None).unwrap_or_else(|| lab.fail(format!("no row {x}:\n{text}")));
        let bound: u64 = words[words.len() - 5]
            .parse()
            .unwrap_or_else(|_| lab.fail(format!("L7 BOUND of {x}:\n{text}")));
        (words[2].clone(), bound, text)
    };

    let out = lab.ok(
        lab.d().cli(&[
            "pool",
            "edit",
            "web",
            "--backend",
            &x,
            "--admin-state",
            "draining",
            "--config",
            &cfg,
        ]),
        "tether pool edit --admin-state draining",
    );
    assert!(out.contains("draining"), "{out}");
    let (state, first, text) = status_of_x(&lab);
    assert_eq!(state, "draining", "{text}");
    assert!(
        (1..=on[&x].len() as u64).contains(&first),
        "X keeps its bound clients, A at least: {first}:\n{text}"
    );
    // The others on X expire (no connection open); A's open connection holds its entry.
    let mut seen = vec![first];
    lab.wait_for(EXPIRY_WAIT, "X's idle clients expiring", || {
        let (_, n, _) = status_of_x(&lab);
        seen.push(n);
        n == 1
    });
    let r = lab.ok(held.request("/", &[]), "A's request on its connection");
    assert_eq!(
        backend_of(&lab, &r),
        x,
        "a draining backend keeps its bound client"
    );
    drop(held);
    lab.wait_for(
        EXPIRY_WAIT,
        "A's entry expiring after its connection closed",
        || {
            let (_, n, _) = status_of_x(&lab);
            seen.push(n);
            n == 0
        },
    );
    assert!(
        seen.windows(2).all(|w| w[1] <= w[0]),
        "X's bound clients only fall while it drains: {seen:?}"
    );
    // A is balanced anew, and not onto the draining X.
    let r = get(&lab, a, &[]);
    let now = backend_of(&lab, &r);
    assert_ne!(now, x, "a draining backend takes no new clients");
    let (state, n, text) = status_of_x(&lab);
    assert_eq!((state.as_str(), n), ("draining", 0), "{text}");
    assert!(
        text.contains("  l7 method client-ip: ") && !text.contains("l7 invalid cookies"),
        "a method without cookies shows none:\n{text}"
    );
    let bound = lab.metric(
        "tether_l7_backend_bound_clients",
        &[("service", "web"), ("method", "client-ip"), ("backend", &x)],
    );
    assert_eq!(bound, 0);
    // A's entry was found expired when its next connection opened; the others, never looked
    // up again, were not. New bindings: A twice, the five others once.
    let cip = [("service", "web"), ("method", "client-ip")];
    assert_eq!(
        lab.metric("tether_l7_persistence_expirations_total", &cip),
        1
    );
    assert_eq!(
        lab.metric("tether_l7_persistence_new_bindings_total", &cip),
        7
    );
    let top = lab.ok(
        lab.d()
            .cli(&["top", "--once", "--interval", "0.2", "--config", &cfg]),
        "tether top --once",
    );
    let words =
        row(&top, "web", Some(&x)).unwrap_or_else(|| lab.fail(format!("no row {x}:\n{top}")));
    assert_eq!(
        (words[2].as_str(), words[4].as_str(), words[8].as_str()),
        ("draining", "draining", "0"),
        "{top}"
    );
    live_top(&lab, &cfg, &["client-ip", "draining"], b"\x03");
    lab.stop();
}
