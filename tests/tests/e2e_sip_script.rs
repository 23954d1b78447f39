//! End to end: SIP header persistence over a UDP L7 service with real SIP peers (sipp, from
//! the `sip-tester` package), and scripted (Lua) persistence over an HTTP L7 service, through
//! the real daemon.
//!
//! SIP: two backend sipp instances in UAS mode (`sipp -sn uas`, in the backend namespaces,
//! on UDP port 8080, message traces to files) and a sipp UAC in the client namespace running
//! calls to VIP:5060. Every call's messages must land on one backend, the calls must spread
//! over both, and every reply must come back through tether (from the VIP).
//!
//! Needs root, `sipp` and `TETHER_BIN`: run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_sip_script -- --test-threads=1`.
//! Every test builds its own namespaces and removes them; every wait is bounded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::json;
use tether_tests::{
    daemon::{Reload, tether_bin},
    l7lab::{IO_TIMEOUT, L7Lab, PORT},
};

/// The SIP service's port on the VIP.
const SIP_PORT: u16 = 5060;
/// The script service's port on the VIP.
const SCRIPT_PORT: u16 = 8081;
/// Calls the UAC runs.
const CALLS: usize = 40;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("tether-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        Scratch(p)
    }

    fn file(&self, name: &str, body: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, body).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process started in a namespace, killed (by its own pid) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// One UDP datagram from client address `src` to VIP:`port`, and the answer (if any within
/// [`IO_TIMEOUT`]) with its source.
fn udp_exchange(
    lab: &L7Lab,
    src: Ipv4Addr,
    port: u16,
    d: Vec<u8>,
) -> Option<(Vec<u8>, SocketAddr)> {
    let vip = lab.topo.vip_addr(port);
    lab.ok(
        lab.topo
            .in_client(move || -> std::io::Result<Option<(Vec<u8>, SocketAddr)>> {
                let s = UdpSocket::bind(SocketAddrV4::new(src, 0))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.send_to(&d, vip)?;
                let mut buf = vec![0u8; 65_535];
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => Ok(Some((buf[..n].to_vec(), from))),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }),
        "in the client namespace",
    )
    .unwrap_or_else(|e| lab.fail(format!("UDP exchange with {vip}: {e}")))
}

fn options(call_id: &str, src: Ipv4Addr) -> Vec<u8> {
    format!(
        "OPTIONS sip:probe@{vip}:{SIP_PORT} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5999;branch=z9hG4bK-{call_id}\r\nFrom: <sip:probe@{src}>;tag=1\r\nTo: <sip:probe@{vip}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        vip = tether_tests::netns::VIP
    )
    .into_bytes()
}

/// Call-IDs of the messages a sipp instance received, from its `-trace_msg` file.
fn received_call_ids(trace: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    let mut ids = Vec::new();
    let mut receiving = false;
    for line in text.lines() {
        if line.starts_with("UDP message received") {
            receiving = true;
        } else if line.starts_with("UDP message sent") || line.starts_with("-----") {
            receiving = false;
        } else if receiving && let Some(v) = line.strip_prefix("Call-ID:") {
            ids.push(v.trim().to_string());
        }
    }
    ids
}

#[test]
fn sip_calls_through_the_udp_service_stay_on_one_backend_and_spread() {
    let scratch = Scratch::new("sip");
    let mut lab = L7Lab::start(1, 2, |b| {
        b.profile(json!({"name": "calls", "type": "sip-header", "timeout_s": 120}))
            .l7_service("sip", SIP_PORT, Some("calls"), json!({"protocol": "udp"}))
    });
    // Two UAS backends on their own address, UDP port 8080 (the pool's backend port).
    let mut uas = Vec::new();
    let mut traces = Vec::new();
    for (i, node) in lab.topo.backends.iter().enumerate() {
        let trace = scratch.0.join(format!("b{}.log", i + 1));
        let child = in_ns(&node.ns, "sipp")
            .args(["-sn", "uas", "-aa", "-i", &node.addr.to_string(), "-p"])
            .arg(PORT.to_string())
            .args(["-trace_msg", "-message_file"])
            .arg(&trace)
            .args(["-nostdin"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                lab.fail(format!("starting sipp (apt-get install sip-tester): {e}"))
            });
        uas.push(Proc(child));
        traces.push(trace);
    }
    // Until the UAS answer (auto-answered OPTIONS), through tether: from the VIP and port.
    let src = lab.client(0);
    let vip = SocketAddr::V4(lab.topo.vip_addr(SIP_PORT));
    let mut probe = 0;
    let answered = |lab: &L7Lab, probe: &mut u32, what: &str| {
        lab.wait_for(Duration::from_secs(10), what, || {
            *probe += 1;
            match udp_exchange(lab, src, SIP_PORT, options(&format!("probe-{probe}"), src)) {
                Some((reply, from)) => {
                    assert_eq!(from, vip, "the reply comes from the VIP address and port");
                    assert!(
                        reply.starts_with(b"SIP/2.0 200"),
                        "{}",
                        String::from_utf8_lossy(&reply)
                    );
                    true
                }
                None => false,
            }
        });
    };
    answered(
        &lab,
        &mut probe,
        "a UAS answering an OPTIONS through the VIP",
    );
    // A reload that changes the service's limits restarts its UDP serve task on the same
    // socket: the service goes on answering.
    let mut cfg = lab.builder.build();
    cfg["virtual_services"][0]["limits"] = json!({"idle_timeout_ms": 30000});
    lab.ok(lab.d().write_config(&cfg), "writing the config");
    match lab.ok(lab.d().reload(), "reloading") {
        Reload::Applied(_) => {}
        Reload::Refused(line) => lab.fail(format!("a valid reload was refused: {line}")),
    }
    answered(
        &lab,
        &mut probe,
        "the UAS answering through the VIP after a reload",
    );
    // `tether restart`: the new daemon is handed the UDP socket and reads it (on a worker
    // thread) once the old one stopped; the service answers through the new one.
    lab.restart();
    answered(
        &lab,
        &mut probe,
        "the UAS answering through the VIP after tether restart",
    );
    let probes_forwarded = lab.metric(
        "tether_l7_udp_datagrams_total",
        &[("service", "sip"), ("result", "forwarded")],
    );

    // The UAC: CALLS calls (INVITE, ACK, BYE each) at 20 a second.
    let out = lab.ok(
        in_ns(&lab.topo.client.ns, "sipp")
            .args([
                "-sn",
                "uac",
                &format!("{vip}"),
                "-i",
                &src.to_string(),
                "-p",
                "5070",
            ])
            .args([
                "-m",
                &CALLS.to_string(),
                "-r",
                "20",
                "-timeout",
                "60s",
                "-timeout_error",
            ])
            .args(["-nostdin"])
            .stdin(Stdio::null())
            .output(),
        "running the sipp UAC",
    );
    if !out.status.success() {
        lab.fail(format!(
            "sipp UAC: {} (every call must succeed through tether)\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    drop(uas);

    // Every call's messages on one backend; the calls on both.
    let mut by_call: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    let mut per_backend = vec![0usize; traces.len()];
    for (i, t) in traces.iter().enumerate() {
        for id in received_call_ids(t) {
            if id.starts_with("probe-") {
                continue;
            }
            by_call.entry(id).or_default().insert(i);
            per_backend[i] += 1;
        }
    }
    assert_eq!(
        by_call.len(),
        CALLS,
        "every call reached a backend: {by_call:?}"
    );
    let split: Vec<_> = by_call.iter().filter(|(_, b)| b.len() > 1).collect();
    assert!(split.is_empty(), "calls split over backends: {split:?}");
    let mut calls_on = vec![0usize; traces.len()];
    for b in by_call.values() {
        for &i in b {
            calls_on[i] += 1;
        }
    }
    eprintln!("calls per backend {calls_on:?}, messages received per backend {per_backend:?}");
    assert!(
        calls_on.iter().all(|&n| n > 0),
        "the calls spread over both backends: {calls_on:?}"
    );
    assert!(
        per_backend.iter().sum::<usize>() >= 3 * CALLS,
        "INVITE, ACK and BYE of every call: {per_backend:?}"
    );
    // Every answer went back through tether (the UAS saw tether's address, not the client).
    let replies = lab.metric(
        "tether_l7_udp_datagrams_total",
        &[("service", "sip"), ("result", "replies")],
    );
    assert!(
        replies >= (3 * CALLS) as u64,
        "180, 200 and the BYE's 200 of every call came back through tether: {replies}"
    );
    let forwarded = lab.metric(
        "tether_l7_udp_datagrams_total",
        &[("service", "sip"), ("result", "forwarded")],
    );
    assert!(
        forwarded - probes_forwarded >= (3 * CALLS) as u64,
        "{forwarded}"
    );

    // A datagram that is not SIP is dropped and counted, and reaches no backend.
    assert!(
        udp_exchange(&lab, src, SIP_PORT, b"not sip at all\r\n\r\n".to_vec()).is_none(),
        "no answer to a non-SIP datagram"
    );
    assert_eq!(
        lab.metric(
            "tether_l7_udp_datagrams_total",
            &[("service", "sip"), ("result", "dropped_malformed")],
        ),
        1
    );
    assert_eq!(
        lab.metric(
            "tether_l7_udp_datagrams_total",
            &[("service", "sip"), ("result", "forwarded")],
        ),
        forwarded,
        "nothing more was forwarded"
    );
    lab.stop();
}

/// The script of the script tests: the `X-User` header is the key; `X-Loop` loops forever.
const SCRIPT: &str = r#"
function persist(req)
  if req.headers["x-loop"] then
    while true do end
  end
  return req.headers["x-user"]
end
"#;

fn script_lab(script: &Path) -> L7Lab {
    let file = script.display().to_string();
    L7Lab::start(2, 3, |b| {
        b.profile(json!({"name": "by-user", "type": "script", "file": file, "timeout_s": 300}))
            .l7_service("scripted", SCRIPT_PORT, Some("by-user"), json!({}))
    })
}

fn backend_of(lab: &L7Lab, src: Ipv4Addr, headers: &[(&str, &str)]) -> String {
    let r = lab.ok(
        lab.topo.request(src, SCRIPT_PORT, "/", headers, IO_TIMEOUT),
        &format!("GET / with {headers:?}"),
    );
    if r.status != 200 {
        lab.fail(format!("{headers:?}: status {}: {r:?}", r.status));
    }
    lab.ok(r.echo(), "reading the echo body").backend
}

#[test]
fn a_script_keyed_on_a_header_sticks_and_spreads_and_a_runaway_script_is_cut_off() {
    let scratch = Scratch::new("script");
    let script = scratch.file("by-user.lua", SCRIPT);
    let lab = script_lab(&script);
    // Sticks: one user, many requests from two addresses, one backend.
    let first = backend_of(&lab, lab.client(0), &[("X-User", "ann")]);
    for i in 0..30 {
        assert_eq!(
            backend_of(&lab, lab.client(i), &[("X-User", "ann")]),
            first,
            "request {i} of user ann"
        );
    }
    // Spreads: different users reach more than one backend.
    let users: BTreeSet<String> = (0..30)
        .map(|u| backend_of(&lab, lab.client(0), &[("X-User", &format!("user-{u}"))]))
        .collect();
    assert!(users.len() > 1, "30 users on one backend: {users:?}");
    assert_eq!(lab.l7("script_errors", "scripted"), 0);
    assert_eq!(lab.l7("script_cutoffs", "scripted"), 0);
    // A call that loops forever is cut off, counted, and the request still served.
    for i in 0..3 {
        let b = backend_of(&lab, lab.client(i), &[("X-Loop", "1"), ("X-User", "ann")]);
        assert!(lab.backend_names().contains(&b), "served by {b}");
    }
    assert_eq!(lab.l7("script_cutoffs", "scripted"), 3);
    // And the script goes on answering.
    assert_eq!(backend_of(&lab, lab.client(1), &[("X-User", "ann")]), first);

    // A reload with a script that does not compile is refused with the line, and changes
    // nothing.
    std::fs::write(
        &script,
        "function persist(req)\n  return req.headers[\"x-user\"\nend\n",
    )
    .unwrap_or_else(|e| panic!("rewriting the script: {e}"));
    let d = lab.d();
    lab.ok(d.write_config(&lab.builder.build()), "rewriting the config");
    match lab.ok(d.reload(), "reloading") {
        Reload::Refused(line) => assert!(
            line.contains("persistence_profiles[0].file") && line.contains(":3:"),
            "the refusal names the field and the line: {line}"
        ),
        Reload::Applied(line) => lab.fail(format!("a broken script was applied: {line}")),
    }
    assert_eq!(backend_of(&lab, lab.client(1), &[("X-User", "ann")]), first);
    lab.stop();
}

#[test]
fn a_script_with_a_syntax_error_is_refused_by_tether_check_with_the_line() {
    let scratch = Scratch::new("script-check");
    let good = scratch.file("good.lua", SCRIPT);
    let bad = scratch.file(
        "bad.lua",
        "function persist(req)\n  local k = req.headers[\"x-user\"]\n  if k then return k\nend\n",
    );
    let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let config = |script: &Path| {
        json!({
            "interface": "eth0",
            "virtual_services": [{"name": "web", "vip": "192.0.2.10", "port": 80, "protocol": "tcp",
                                  "mode": "l7", "pool": "web", "persistence": "s"}],
            "pools": [{"name": "web", "backends": [{"name": "b1", "address": "192.0.2.21"}]}],
            "persistence_profiles": [{"name": "s", "type": "script", "file": script.display().to_string()}]
        })
    };
    let check = |script: &Path| {
        let path = scratch.file("tether.json", &config(script).to_string());
        Command::new(&bin)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("running tether check: {e}"))
    };
    let ok = check(&good);
    assert!(
        ok.status.success(),
        "a good script passes: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = check(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad script fails the check");
    let want = format!(
        "persistence_profiles[0].file: the script is refused: {}:5: 'end' expected (to close 'function' at line 1) near <eof>",
        bad.display()
    );
    assert!(stderr.contains(&want), "{want:?} in:\n{stderr}");
}
