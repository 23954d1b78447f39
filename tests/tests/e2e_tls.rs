//! End to end, TLS persistence methods through the real daemon with real TLS peers:
//! `openssl s_server` backends (each certificate's subject is its backend name) and
//! `openssl s_client` in the client namespace.
//!
//! - `ssl-session-id` on a `tls_passthrough` service (Kemp "Generic" service, TLS not
//!   terminated): a TLS 1.2 session saved with `-sess_out` and resumed with `-sess_in`
//!   reaches the backend that holds it ("Reused"), by session ID (`-no_ticket` servers) and
//!   by TLS 1.2 ticket; TLS 1.3 handshakes are counted and kept in place by the client-IP
//!   fallback; malformed ClientHellos and silent clients are closed and counted; the
//!   learned sessions survive a restart (saved with the L7 tables).
//! - `tls-ticket` on a service terminating TLS (Avi TLS persistence): TLS 1.2 and 1.3
//!   sessions resumed by ticket reach the backend of their first connection (echo backends
//!   answer with their name), also after a tether restart with the keys from the config;
//!   renegotiation is refused.
//!
//! Needs root, `openssl` and `TETHER_BIN`: run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_tls -- --test-threads=1`.
//! Every test builds its own namespaces and removes them, also on failure; every loop and wait
//! is bounded.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use serde_json::{Value, json};
use tether_tests::{
    daemon::{ConfigBuilder, Daemon, metric_value, tether_bin},
    http::Echo,
    l7lab::L7Lab,
    netns::{Topology, wait_until},
    tlslab::{Handshake, TlsBackends, s_client, s_client_send, self_signed},
};

/// The backends' and the pass-through service's port.
const TLS_PORT: u16 = 8443;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Fields drop in order: the daemon, the TLS servers, then the namespaces.
struct Lab {
    daemon: Option<Daemon>,
    servers: TlsBackends,
    topo: Topology,
    files: std::path::PathBuf,
    config: Value,
}

impl Lab {
    /// Two backends running `s_server` (with `server_args`) on [`TLS_PORT`], and tether with
    /// pass-through services `(name, port, profile)` over them.
    fn start(server_args: &[&str], services: &[(&str, u16, Value)]) -> Lab {
        let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
        let topo = Topology::builder()
            .client_addrs(1)
            .backends(2)
            .build()
            .unwrap_or_else(|e| panic!("building the namespace topology: {e:#}"));
        let servers = TlsBackends::start(&topo, TLS_PORT, server_args)
            .unwrap_or_else(|e| panic!("starting s_server backends: {e:#}"));
        let mut b = ConfigBuilder::new(&topo, &topo.pin_dir("pins"));
        for i in 0..topo.backends.len() {
            b = b.backend_field(&topo.backend_name(i), "port", json!(TLS_PORT));
        }
        for (name, port, profile) in services {
            let profile_name = profile["name"].as_str().map(str::to_string);
            b = b.profile(profile.clone()).l7_service(
                name,
                *port,
                profile_name.as_deref(),
                json!({"tls_passthrough": true, "limits": {"request_timeout_ms": 500}}),
            );
        }
        let config = b.build();
        let daemon = Daemon::start(&bin, &topo.lb.ns, &config, false)
            .unwrap_or_else(|e| panic!("starting tether: {e:#}"));
        let files = servers.dir.clone();
        let lab = Lab {
            daemon: Some(daemon),
            servers,
            topo,
            files,
            config,
        };
        // The proxies are started by the control loop right after `ready`.
        for (name, port, _) in services {
            let addr = lab.vip(*port);
            let ok = wait_until(IO_TIMEOUT, || {
                lab.topo
                    .in_client(|| {
                        TcpStream::connect_timeout(&addr.parse().expect("addr"), IO_TIMEOUT)
                    })
                    .is_ok_and(|r| r.is_ok())
            });
            if !ok {
                lab.fail(format!("service {name} never accepted a connection"));
            }
        }
        lab
    }

    /// SIGTERM, then a new daemon with the same config and state directory (as users
    /// restart it).
    fn restart(&mut self) {
        let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
        if let Some(d) = self.daemon.take() {
            d.stop_keep_pins()
                .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
        }
        self.daemon = Some(
            Daemon::start_with_existing_pins(&bin, &self.topo.lb.ns, &self.config, false)
                .unwrap_or_else(|e| panic!("restarting tether: {e:#}")),
        );
        let addr = self.vip(TLS_PORT);
        let ok = wait_until(IO_TIMEOUT, || {
            self.topo
                .in_client(|| TcpStream::connect_timeout(&addr.parse().expect("addr"), IO_TIMEOUT))
                .is_ok_and(|r| r.is_ok())
        });
        if !ok {
            self.fail("the restarted service never accepted a connection");
        }
    }

    fn d(&self) -> &Daemon {
        self.daemon.as_ref().expect("tether is running")
    }

    fn vip(&self, port: u16) -> String {
        format!("{}:{port}", self.topo.vip)
    }

    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let logs = self.daemon.as_ref().map(|d| d.logs()).unwrap_or_default();
        panic!("{msg}\n--- tether output ---\n{logs}")
    }

    /// One s_client handshake from the client namespace to VIP:[`TLS_PORT`].
    fn hs(&self, args: &[&str]) -> Handshake {
        self.hs_to(TLS_PORT, args)
    }

    fn hs_to(&self, port: u16, args: &[&str]) -> Handshake {
        s_client(&self.topo.client.ns, &self.vip(port), args, IO_TIMEOUT)
            .unwrap_or_else(|e| self.fail(format!("{e:#}")))
    }

    fn session_file(&self, n: usize) -> String {
        self.files
            .join(format!("session-{n}.pem"))
            .to_string_lossy()
            .into_owned()
    }

    /// `tether_l7_<name>_total{service="tls"}`.
    fn l7(&self, name: &str) -> u64 {
        self.l7_of(name, "tls")
    }

    fn l7_of(&self, name: &str, service: &str) -> u64 {
        let text = self
            .d()
            .metrics()
            .unwrap_or_else(|e| self.fail(format!("GET /metrics: {e:#}")));
        let metric = format!("tether_l7_{name}_total");
        metric_value(&text, &metric, &[("service", service)])
            .unwrap_or_else(|| self.fail(format!("/metrics has no {metric}:\n{text}")))
            as u64
    }

    fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop()
                .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
        }
        drop(self.servers);
    }
}

/// New TLS 1.2 sessions (spread by round robin), then each resumed several times: every
/// resumption is "Reused" on the backend of its first handshake. Returns those backends.
fn sessions_stick(lab: &Lab, protocol_args: &[&str]) -> Vec<String> {
    let mut first = Vec::new();
    for n in 0..4 {
        let f = lab.session_file(n);
        let h = lab.hs(&[protocol_args, &["-sess_out", &f]].concat());
        if h.reused || h.protocol != "TLSv1.2" {
            lab.fail(format!(
                "session {n}: a new TLS 1.2 session expected: {h:?}"
            ));
        }
        first.push(h.subject);
    }
    let spread: BTreeSet<&String> = first.iter().collect();
    if spread.len() != 2 {
        lab.fail(format!(
            "new sessions are balanced over both backends: {first:?}"
        ));
    }
    for round in 0..3 {
        // Each session twice in a row: round robin alone would send the second elsewhere.
        for (n, backend) in first.iter().enumerate().flat_map(|e| [e, e]) {
            let f = lab.session_file(n);
            let h = lab.hs(&[protocol_args, &["-sess_in", &f]].concat());
            if !h.reused || &h.subject != backend {
                lab.fail(format!(
                    "round {round}: session {n} of {backend} resumed as {h:?}"
                ));
            }
        }
    }
    first
}

#[test]
fn ssl_session_id_resumes_on_the_backend_holding_the_session() {
    let mut lab = Lab::start(
        &["-no_ticket"],
        &[(
            "tls",
            TLS_PORT,
            json!({"name": "sess", "type": "ssl-session-id"}),
        )],
    );
    let first = sessions_stick(&lab, &["-tls1_2", "-no_ticket"]);
    // 4 sessions learned from their ServerHello, each refreshed by every resumption.
    let learned = lab.l7("tls_sessions_learned");
    if learned < 4 {
        lab.fail(format!("tls_sessions_learned {learned} < 4"));
    }
    if lab.l7("persist_hits") < 24 {
        lab.fail("every resumption is a persistence hit");
    }

    // TLS 1.3: counted, nothing learned.
    let before = lab.l7("tls_sessions_learned");
    let h = lab.hs(&["-tls1_3"]);
    if h.protocol != "TLSv1.3" {
        lab.fail(format!("a TLS 1.3 handshake expected: {h:?}"));
    }
    if lab.l7("tls13_unpersisted") != 1 || lab.l7("tls_sessions_learned") != before {
        lab.fail("a TLS 1.3 handshake is counted and teaches nothing");
    }

    // A client speaking HTTP: closed without a byte, counted; the service keeps serving.
    let reply = lab
        .topo
        .in_client(|| -> std::io::Result<Vec<u8>> {
            let mut s =
                TcpStream::connect_timeout(&lab.vip(TLS_PORT).parse().expect("addr"), IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out)
        })
        .unwrap_or_else(|e| lab.fail(format!("{e:#}")));
    match reply {
        Ok(bytes) if bytes.is_empty() => {}
        other => lab.fail(format!(
            "HTTP on the TLS service: closed with nothing: {other:?}"
        )),
    }
    if lab.l7("tls_hello_errors") != 1 {
        lab.fail("the malformed ClientHello is counted");
    }
    let h = lab.hs(&["-tls1_2", "-no_ticket", "-sess_in", &lab.session_file(0)]);
    if !h.reused {
        lab.fail(format!("still serving, still resuming: {h:?}"));
    }

    // A restart (SIGTERM, same config and state directory): the learned session IDs were
    // saved with the other L7 tables, so resumptions still reach their backends. Sessions 0
    // and 2 are on one backend, 1 and 3 on the other: in this order, round robin alone (or
    // relearning from the first resumption) cannot pass.
    lab.restart();
    for n in [0, 2, 1, 3] {
        let backend = &first[n];
        let h = lab.hs(&["-tls1_2", "-no_ticket", "-sess_in", &lab.session_file(n)]);
        if !h.reused || &h.subject != backend {
            lab.fail(format!(
                "after a restart: session {n} of {backend} resumed as {h:?}"
            ));
        }
    }
    lab.stop();
}

#[test]
fn ssl_session_id_follows_tls12_tickets_tls13_falls_back_to_the_client_ip_and_sni_hashes() {
    const FALLBACK_PORT: u16 = 9443;
    const SNI_PORT: u16 = 10443;
    let lab = Lab::start(
        &[],
        &[
            (
                "tls",
                TLS_PORT,
                json!({"name": "sess", "type": "ssl-session-id"}),
            ),
            (
                "tls-fb",
                FALLBACK_PORT,
                json!({"name": "sess-fb", "type": "ssl-session-id", "fallback": {"type": "client-ip"}}),
            ),
            (
                "tls-sni",
                SNI_PORT,
                json!({"name": "by-sni", "type": "consistent-hash", "hash_key": "sni"}),
            ),
        ],
    );
    // Tickets: a client resuming by ticket sends a fresh random session ID; the ticket,
    // learned from the cleartext NewSessionTicket, decides.
    sessions_stick(&lab, &["-tls1_2"]);
    if lab.l7("tls_sessions_learned") < 4 {
        lab.fail("tickets are learned from the NewSessionTicket");
    }

    // TLS 1.3 without a fallback: nothing to persist on, balanced (round robin).
    let plain: BTreeSet<String> = (0..4).map(|_| lab.hs(&["-tls1_3"]).subject).collect();
    if plain.len() != 2 || lab.l7("tls13_unpersisted") != 4 {
        lab.fail(format!(
            "TLS 1.3 without fallback: balanced and counted: {plain:?}"
        ));
    }
    // With the client-IP fallback, one client stays on one backend, and each is counted.
    let kept: BTreeSet<String> = (0..4)
        .map(|_| lab.hs_to(FALLBACK_PORT, &["-tls1_3"]).subject)
        .collect();
    if kept.len() != 1 || lab.l7_of("tls13_unpersisted", "tls-fb") != 4 {
        lab.fail(format!(
            "TLS 1.3 with the fallback: one backend, counted: {kept:?}"
        ));
    }
    if lab.l7_of("fallback_hits", "tls-fb") != 3 {
        lab.fail("the fallback decided every TLS 1.3 handshake after the first");
    }

    // SNI as the hash key: each name keeps its backend (TLS 1.3 too), names spread.
    let mut by_name = Vec::new();
    for i in 0..8 {
        let name = format!("host{i}.test");
        let a = lab
            .hs_to(SNI_PORT, &["-tls1_3", "-servername", &name])
            .subject;
        let b = lab
            .hs_to(SNI_PORT, &["-tls1_3", "-servername", &name])
            .subject;
        if a != b {
            lab.fail(format!("{name} went to {a} then {b}"));
        }
        by_name.push(a);
    }
    if by_name.iter().collect::<BTreeSet<_>>().len() != 2 {
        lab.fail(format!(
            "server names spread over both backends: {by_name:?}"
        ));
    }

    // A client that sends nothing is closed after the header timeout (500 ms here).
    let closed = lab
        .topo
        .in_client(|| -> std::io::Result<usize> {
            let mut s =
                TcpStream::connect_timeout(&lab.vip(TLS_PORT).parse().expect("addr"), IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut b = [0u8; 16];
            s.read(&mut b)
        })
        .unwrap_or_else(|e| lab.fail(format!("{e:#}")));
    if !matches!(closed, Ok(0)) {
        lab.fail(format!("a silent client is closed by tether: {closed:?}"));
    }
    lab.stop();
}

/// The `tls-ticket` profile's keys: in the config, so a restarted daemon (or another
/// instance) opens the tickets the previous one sealed.
fn ticket_keys() -> Value {
    json!([{"id": 7, "secret": "7777777777777777777777777777777777777777777777777777777777777777"}])
}

const GET: &[u8] = b"GET /t HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n";

/// A request through s_client: the report and the echo backend that answered.
fn ticket_get(lab: &L7Lab, args: &[&str]) -> (Handshake, String) {
    let (h, text) = s_client_send(
        &lab.topo.client.ns,
        &format!("{}:{TLS_PORT}", lab.topo.vip),
        args,
        GET,
        IO_TIMEOUT,
    )
    .unwrap_or_else(|e| lab.fail(format!("{e:#}")));
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_else(|| lab.fail(format!("no HTTP response in s_client output:\n{text}")));
    // s_client prints its own reports after the body (a TLS 1.3 ticket, the close).
    let body = ["\n---", "\nclosed", "\nread R BLOCK"]
        .iter()
        .filter_map(|m| body.find(m))
        .min()
        .map_or(body, |end| &body[..end + 1]);
    match Echo::parse(body) {
        Some(e) => (h, e.backend),
        None => lab.fail(format!("not an echo body: {body:?}")),
    }
}

fn wait_listening(lab: &L7Lab) {
    let addr = format!("{}:{TLS_PORT}", lab.topo.vip);
    lab.wait_for(IO_TIMEOUT, "the TLS service accepting", || {
        lab.topo
            .in_client(|| TcpStream::connect_timeout(&addr.parse().expect("addr"), IO_TIMEOUT))
            .is_ok_and(|r| r.is_ok())
    });
}

#[test]
fn tls_ticket_resumption_reaches_the_same_backend_also_after_a_restart() {
    let certs = std::env::temp_dir().join(format!("tether-e2e-tls-{}", std::process::id()));
    let (cert, key) = self_signed(&certs, "tls.test").unwrap_or_else(|e| panic!("{e:#}"));
    let mut lab = L7Lab::start(1, 2, |b| {
        b.profile(json!({"name": "tk", "type": "tls-ticket", "keys": ticket_keys()}))
            .l7_service(
                "tls",
                TLS_PORT,
                Some("tk"),
                json!({"tls": {"cert_file": cert, "key_file": key}}),
            )
    });
    wait_listening(&lab);
    let session = |n: usize| {
        certs
            .join(format!("ticket-{n}.pem"))
            .to_string_lossy()
            .into_owned()
    };
    // New sessions, TLS 1.2 and 1.3, balanced by round robin over both backends.
    let protocols = ["-tls1_2", "-tls1_3"];
    let mut first = Vec::new();
    for n in 0..4 {
        let f = session(n);
        let (h, backend) = ticket_get(&lab, &[protocols[n / 2], "-sess_out", &f]);
        if h.reused {
            lab.fail(format!("session {n}: a new session expected: {h:?}"));
        }
        first.push(backend);
    }
    let spread: BTreeSet<&String> = first.iter().collect();
    if spread.len() != 2 {
        lab.fail(format!("new sessions are balanced: {first:?}"));
    }
    let resume_all = |lab: &L7Lab, when: &str| {
        // Each session twice in a row: round robin alone would send the second elsewhere.
        for (n, backend) in first.iter().enumerate().flat_map(|e| [e, e]) {
            let (h, got) = ticket_get(lab, &[protocols[n / 2], "-sess_in", &session(n)]);
            if !h.reused || &got != backend {
                lab.fail(format!(
                    "{when}: session {n} of {backend} resumed on {got}: {h:?}"
                ));
            }
        }
    };
    resume_all(&lab, "resumed");
    resume_all(&lab, "resumed again");

    // A restart: the new process has the same keys from the config and no state.
    let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(d) = lab.daemon.take() {
        d.stop()
            .unwrap_or_else(|e| panic!("stopping tether: {e:#}"));
    }
    lab.daemon = Some(
        Daemon::start(&bin, &lab.topo.lb.ns, &lab.builder.build(), false)
            .unwrap_or_else(|e| panic!("restarting tether: {e:#}")),
    );
    wait_listening(&lab);
    resume_all(&lab, "after a restart");
    if lab.l7("persist_hits", "tls") < 8 {
        lab.fail("resumed connections and their requests are persistence hits");
    }

    // Renegotiation (TLS 1.2, client-initiated with s_client's "R"): refused by rustls with
    // a no_renegotiation alert; the service keeps serving.
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.topo.client.ns, "timeout", "5"])
        .args(["sh", "-c"])
        .arg(format!(
            "(printf 'R\\n'; sleep 3) | openssl s_client -tls1_2 -connect {}:{TLS_PORT} 2>&1",
            lab.topo.vip
        ))
        .output()
        .unwrap_or_else(|e| lab.fail(format!("running s_client: {e}")));
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("RENEGOTIATING") || !text.to_ascii_lowercase().contains("no renegotiation") {
        lab.fail(format!(
            "renegotiation is refused with no_renegotiation:\n{text}"
        ));
    }
    let (_, backend) = ticket_get(&lab, &["-tls1_2"]);
    if !first.contains(&backend) {
        lab.fail(format!(
            "still serving after the renegotiation attempt: {backend}"
        ));
    }
    let _ = std::fs::remove_dir_all(&certs);
    lab.stop();
}
