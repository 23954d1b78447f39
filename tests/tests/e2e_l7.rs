//! End to end, L7: tether's HTTP proxy (mode `l7`) with cookie persistence. Real clients
//! (curl with a cookie jar, a raw HTTP/1.1 client, a hyper HTTP/2 client over TLS) in the
//! client namespace talk to the VIP; the daemon runs in the LB namespace (its XDP program
//! passes L7 traffic to the stack) and proxies to echo backends, which answer with their name
//! and what they received (Cookie, X-Forwarded-For), so the tests see both sides.
//!
//! Needs root and `TETHER_BIN` (the daemon binary): run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_l7 -- --test-threads=1`.
//! Every test builds its own namespaces (unique names) and removes them, also on failure.
//! Every loop and wait is bounded; failures panic with what was seen and the daemon's output.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tether::cookie::{self, CookieKeys, CookiePayload, Reject};
use tether_tests::{
    daemon::ConfigBuilder,
    http::{Echo, HttpResponse, KeepAlive, connect_from},
    l7lab::{IO_TIMEOUT, L7Lab, PORT, base_builder},
    netns::{Topology, VIP},
    tlslab::pem,
};

/// A second cleartext L7 service over the same pool.
const OTHER_PORT: u16 = 8081;
/// The TLS service.
const TLS_PORT: u16 = 8443;
const COOKIE: &str = "SRV";
/// Cookie key secrets (64 hex characters each).
const KEY1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const KEY2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
/// Names in the certificate the TLS service presents.
const TLS_NAME: &str = "tether.test";
/// Health monitor timing of the down-backend tests.
const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;
const RISE: u64 = 2;
/// Allowance on top of fall/rise x interval (the machine may be busy with builds).
const HEALTH_WAIT: Duration = Duration::from_secs(5);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An `http-cookie` profile named `ck` (cookie `SRV`) with the given keys (id, secret),
/// newest first, and `extra` fields added.
fn cookie_profile(keys: &[(u8, &str)], extra: Value) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(id, secret)| json!({ "id": id, "secret": secret }))
        .collect();
    let mut p = json!({
        "name": "ck",
        "type": "http-cookie",
        "cookie_name": COOKIE,
        "keys": keys,
    });
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            p[k] = v;
        }
    }
    p
}

fn http_monitor() -> Value {
    json!({
        "type": "http",
        "port": PORT,
        "interval_ms": INTERVAL_MS,
        "timeout_ms": 150,
        "rise": RISE,
        "fall": FALL,
        "http_path": "/",
        "expect_status": ["2xx"],
    })
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-e2e-l7-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        Scratch(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for [`TLS_NAME`] and the VIP, written as PEM files.
struct TestCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    der: CertificateDer<'static>,
}

impl TestCert {
    fn write(dir: &Scratch) -> TestCert {
        let cert = rcgen::generate_simple_self_signed(vec![TLS_NAME.to_string(), VIP.to_string()])
            .unwrap_or_else(|e| panic!("generating a certificate: {e}"));
        let (cert_file, key_file) = (dir.path("cert.pem"), dir.path("key.pem"));
        std::fs::write(&cert_file, pem("CERTIFICATE", cert.cert.der())).expect("writing cert.pem");
        std::fs::write(
            &key_file,
            pem("PRIVATE KEY", &cert.signing_key.serialize_der()),
        )
        .expect("writing key.pem");
        TestCert {
            cert_file,
            key_file,
            der: cert.cert.der().clone(),
        }
    }
}

/// The shared L7 lab plus this test file's TLS material and request helpers.
struct Lab {
    core: L7Lab,
    cert: TestCert,
    /// Holds the certificate files and curl's cookie jars; removed after the daemon stops.
    scratch: Scratch,
}

impl std::ops::Deref for Lab {
    type Target = L7Lab;
    fn deref(&self) -> &L7Lab {
        &self.core
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut L7Lab {
        &mut self.core
    }
}

impl Lab {
    /// `clients` source addresses, `backends` echo backends on port [`PORT`], and tether with
    /// whatever `configure` adds (it gets the test certificate's PEM files).
    fn new(
        clients: usize,
        backends: usize,
        configure: impl FnOnce(ConfigBuilder, &TestCert) -> ConfigBuilder,
    ) -> Lab {
        let scratch = Scratch::new("lab");
        let cert = TestCert::write(&scratch);
        let core = L7Lab::start(clients, backends, |b| configure(b, &cert));
        Lab {
            core,
            cert,
            scratch,
        }
    }

    fn stop(self) {
        self.core.stop()
    }

    /// `GET target` from `src` to VIP:`port` with `headers`; any status.
    fn get(
        &self,
        src: Ipv4Addr,
        port: u16,
        target: &str,
        headers: &[(&str, &str)],
    ) -> HttpResponse {
        self.ok(
            self.topo.request(src, port, target, headers, IO_TIMEOUT),
            &format!("GET {target} on port {port} from {src} with {headers:?}"),
        )
    }

    /// Like [`Lab::get`]; the answer must be a 200 from an echo backend.
    fn get_echo(
        &self,
        src: Ipv4Addr,
        port: u16,
        target: &str,
        headers: &[(&str, &str)],
    ) -> (HttpResponse, Echo) {
        let r = self.get(src, port, target, headers);
        if r.status != 200 {
            self.fail(format!(
                "GET {target} on port {port} from {src} with {headers:?}: status {}: {r:?}",
                r.status
            ));
        }
        let e = self.ok(r.echo(), "reading the echo body");
        (r, e)
    }

    /// `GET /` on [`PORT`] with persistence cookie `srv` (if any): (backend, the SRV value
    /// of a Set-Cookie if one came back).
    fn with_cookie(&self, src: Ipv4Addr, srv: Option<&str>) -> (String, Option<String>) {
        let c = srv.map(|v| format!("{COOKIE}={v}"));
        let headers: Vec<(&str, &str)> = c.iter().map(|c| ("Cookie", c.as_str())).collect();
        let (r, e) = self.get_echo(src, PORT, "/", &headers);
        (e.backend, r.set_cookie_value(COOKIE))
    }

    /// A new session: `GET /` without cookies; (backend, the SRV cookie issued).
    fn new_session(&self, src: Ipv4Addr, port: u16) -> (String, String) {
        let (r, e) = self.get_echo(src, port, "/", &[]);
        let v = r
            .set_cookie_value(COOKIE)
            .unwrap_or_else(|| self.fail(format!("no {COOKIE} cookie issued: {r:?}")));
        (e.backend, v)
    }

    fn rejected(&self, service: &str, reason: Reject) -> u64 {
        self.metric(
            "tether_l7_cookie_rejected_total",
            &[("service", service), ("reason", reason.as_str())],
        )
    }

    fn wait_state(&self, service: &str, name: &str, state: &str) {
        self.wait_for(HEALTH_WAIT, &format!("backend {name} {state}"), || {
            self.backend_state(service, name) == state
        });
    }

    /// `curl` in the client namespace from `src` with cookie jar `jar` (read and written):
    /// one invocation fetching `count` times `http://VIP:PORT/`. Per transfer: (status,
    /// backend, whether a SRV Set-Cookie came back).
    fn curl(&self, src: Ipv4Addr, jar: &Path, count: usize) -> Vec<(u16, String, bool)> {
        let url = format!("http://{VIP}:{PORT}/");
        let jar = jar.to_string_lossy().into_owned();
        let src_s = src.to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.topo.client.ns, "curl"])
            .args(["-sS", "--max-time", "20", "--interface", &src_s])
            .args(["-c", &jar, "-b", &jar, "-D", "-"])
            .args(["-w", "\n@@END %{http_code}@@\n"]);
        for _ in 0..count {
            cmd.arg(&url);
        }
        let out = self.ok(cmd.output(), "running curl (is it installed?)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            self.fail(format!(
                "curl failed ({}): {}\nstdout: {text}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut results = Vec::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("\n@@END ") {
            let transfer = &rest[..i];
            let after = &rest[i + "\n@@END ".len()..];
            let j = after
                .find("@@")
                .unwrap_or_else(|| self.fail(format!("curl output: {text}")));
            let status: u16 = after[..j].parse().unwrap_or(0);
            rest = after[j + 2..].strip_prefix('\n').unwrap_or(&after[j + 2..]);
            let (head, body) = transfer.split_once("\r\n\r\n").unwrap_or_else(|| {
                self.fail(format!("curl transfer without a head: {transfer:?}"))
            });
            let set_cookie = head.lines().any(|l| {
                l.to_ascii_lowercase().starts_with("set-cookie:")
                    && l[l.find(':').expect("has :") + 1..]
                        .trim_start()
                        .starts_with(&format!("{COOKIE}="))
            });
            let backend = Echo::parse(body).map(|e| e.backend).unwrap_or_default();
            results.push((status, backend, set_cookie));
        }
        if results.len() != count {
            self.fail(format!(
                "curl: {} transfers parsed of {count}:\n{text}",
                results.len()
            ));
        }
        results
    }

    fn stop_backend(&mut self, name: &str) {
        let r = self.servers.stop_backend(name);
        self.ok(r, &format!("stopping backend server {name}"));
    }

    fn start_backend(&mut self, name: &str) {
        let r = self.servers.start_backend(name);
        self.ok(r, &format!("starting backend server {name}"));
    }
}

fn spread<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// One web service on [`PORT`] with profile `ck` (keys 2 and 1).
fn web_with_cookie(b: ConfigBuilder, extra: Value) -> ConfigBuilder {
    b.profile(cookie_profile(&[(2, KEY2), (1, KEY1)], extra))
        .l7_service("web", PORT, Some("ck"), json!({}))
}

// ---------------------------------------------------------------------------------------------
// Active cookie

/// A browser-like client (curl with a cookie jar) keeps its backend for 100 requests; the
/// cookie is set once.
#[test]
fn curl_session_sticks_for_100_requests() {
    let lab = Lab::new(1, 3, |b, _| web_with_cookie(b, json!({})));
    let jar = lab.scratch.path("jar.txt");
    let src = lab.client(0);
    let first = lab.curl(src, &jar, 1);
    let (status, backend, set) = first[0].clone();
    assert_eq!(status, 200, "first request: {first:?}");
    assert!(set, "the first response sets the {COOKIE} cookie");
    let jar_text = std::fs::read_to_string(&jar).unwrap_or_default();
    assert!(
        jar_text
            .lines()
            .any(|l| l.contains(&format!("\t{COOKIE}\t")) && l.starts_with("#HttpOnly_")),
        "curl stored an HttpOnly {COOKIE} cookie: {jar_text}"
    );
    let rest = lab.curl(src, &jar, 99);
    for (i, (status, b, set)) in rest.iter().enumerate() {
        if *status != 200 || *b != backend || *set {
            lab.fail(format!(
                "request {} of the session: status {status}, backend {b} (session on {backend}), Set-Cookie {set}",
                i + 2
            ));
        }
    }
    assert_eq!(
        lab.l7("cookies_issued", "web"),
        1,
        "one cookie for the whole session"
    );
    assert_eq!(lab.l7("persist_hits", "web"), 99);
    assert_eq!(lab.l7("new_assignments", "web"), 1);
    assert_eq!(lab.l7("requests", "web"), 100);
    assert_eq!(
        lab.metric(
            "tether_l7_responses_total",
            &[("service", "web"), ("class", "2xx")]
        ),
        100
    );
    // The backend's counters agree: all 100 requests went to one server.
    let reqs: BTreeMap<String, u64> = lab.servers.requests().into_iter().collect();
    let elsewhere: u64 = reqs
        .iter()
        .filter(|(n, _)| **n != backend)
        .map(|(_, c)| c)
        .sum();
    assert_eq!(elsewhere, 0, "requests per backend: {reqs:?}");
    lab.stop();
}

/// Without cookies, new clients and new requests are balanced over every backend.
#[test]
fn without_cookies_requests_and_clients_spread() {
    let lab = Lab::new(12, 3, |b, _| web_with_cookie(b, json!({})));
    let one = lab.client(0);
    let by_request: Vec<String> = (0..12).map(|_| lab.with_cookie(one, None).0).collect();
    let by_client: Vec<String> = (0..12)
        .map(|i| lab.with_cookie(lab.client(i), None).0)
        .collect();
    for (what, got) in [
        ("requests of one client", &by_request),
        ("clients", &by_client),
    ] {
        let s = spread(got.iter());
        for b in lab.backend_names() {
            if !s.contains_key(&b) {
                lab.fail(format!("{what} without cookies never reached {b}: {s:?}"));
            }
        }
        // Round robin with equal weights.
        assert!(s.values().all(|&n| n == 4), "{what}: {s:?}");
    }
    assert_eq!(lab.l7("new_assignments", "web"), 24);
    assert_eq!(lab.l7("cookies_issued", "web"), 24);
    assert_eq!(lab.l7("persist_hits", "web"), 0);
    lab.stop();
}

/// The cookie is opaque (no backend address in any form), well formed, and never reaches a
/// backend; other cookies pass unchanged; X-Forwarded-For names the client.
#[test]
fn cookie_is_opaque_and_stripped_before_the_backend() {
    let lab = Lab::new(2, 3, |b, _| web_with_cookie(b, json!({})));
    let src = lab.client(0);
    let mut sessions: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..6 {
        let (r, e) = lab.get_echo(src, PORT, "/", &[("Cookie", "a=1; b=2")]);
        assert_eq!(
            e.cookie.as_deref(),
            Some("a=1; b=2"),
            "other cookies unchanged: {e:?}"
        );
        assert_eq!(e.x_forwarded_for.as_deref(), Some(src.to_string().as_str()));
        assert_eq!(e.x_forwarded_proto.as_deref(), Some("http"));
        let sc = r
            .set_cookie(COOKIE)
            .unwrap_or_else(|| lab.fail(format!("no Set-Cookie: {r:?}")))
            .to_string();
        for attr in ["Path=/", "HttpOnly", "SameSite=Lax"] {
            assert!(sc.contains(attr), "{attr} missing: {sc}");
        }
        assert!(!sc.contains("Secure"), "no Secure over cleartext: {sc}");
        assert_eq!(
            r.headers_named("cache-control"),
            ["private"],
            "a response setting the cookie is private to shared caches: {r:?}"
        );
        assert!(
            !sc.contains("Max-Age") && !sc.contains("Expires"),
            "a session cookie: {sc}"
        );
        sessions.insert(e.backend, r.set_cookie_value(COOKIE).expect("checked"));
    }
    assert_eq!(sessions.len(), 3, "cookies for every backend: {sessions:?}");
    for (backend, value) in &sessions {
        assert_eq!(value.len(), cookie::COOKIE_VALUE_LEN, "{value}");
        assert!(
            value
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "URL-safe base64: {value}"
        );
        let lower = value.to_ascii_lowercase();
        for node in &lab.topo.backends {
            let o = node.addr.octets();
            let forms = [
                node.addr.to_string(),
                format!("{:02x}{:02x}{:02x}{:02x}", o[0], o[1], o[2], o[3]),
                format!("{:02x}{:02x}{:02x}{:02x}", o[3], o[2], o[1], o[0]),
                u32::from(node.addr).to_string(),
                u32::from(node.addr).swap_bytes().to_string(),
            ];
            for f in forms {
                assert!(
                    !lower.contains(&f),
                    "cookie of {backend} {value} contains {f}"
                );
            }
        }
        assert!(!value.contains("10.99"), "{value}");
    }
    // Presented back, in every position: the backend sees the other cookies only.
    let other = lab.client(1);
    for (backend, v) in &sessions {
        let cases = [
            (format!("a=1; {COOKIE}={v}; z=2"), Some("a=1; z=2")),
            (format!("{COOKIE}={v}; z=2"), Some("z=2")),
            (format!("a=1; {COOKIE}={v}"), Some("a=1")),
            (format!("{COOKIE}={v}"), None),
            // A cookie of the same name planted in front does not hide the valid one.
            (format!("{COOKIE}=planted; a=1; {COOKIE}={v}"), Some("a=1")),
        ];
        for (sent, want) in &cases {
            let (r, e) = lab.get_echo(other, PORT, "/x?q=1", &[("Cookie", sent)]);
            assert_eq!(&e.backend, backend, "cookie {sent}");
            assert_eq!(e.cookie.as_deref(), *want, "backend received for {sent}");
            assert!(
                r.set_cookie(COOKIE).is_none(),
                "no new cookie for a valid one"
            );
            assert!(
                r.headers_named("cache-control").is_empty(),
                "no Cache-Control added without a Set-Cookie: {r:?}"
            );
            assert_eq!(
                e.x_forwarded_for.as_deref(),
                Some(other.to_string().as_str())
            );
        }
        // Two Cookie fields over HTTP/1.1: merged, then stripped.
        let srv = format!("{COOKIE}={v}");
        let (_, e) = lab.get_echo(other, PORT, "/", &[("Cookie", "a=1"), ("Cookie", &srv)]);
        assert_eq!(&e.backend, backend);
        assert_eq!(e.cookie.as_deref(), Some("a=1"));
        // A client is no trusted forwarder (the default config trusts none): the address it
        // claims in X-Forwarded-For is replaced by its own.
        let (_, e) = lab.get_echo(
            other,
            PORT,
            "/",
            &[("Cookie", &srv), ("X-Forwarded-For", "192.0.2.7")],
        );
        assert_eq!(
            e.x_forwarded_for,
            Some(other.to_string()),
            "a spoofed X-Forwarded-For is replaced"
        );
    }
    lab.stop();
}

/// Tampered, expired, foreign-service, unknown-key and malformed cookies are each treated
/// as absent: re-issued, and counted under their reason.
#[test]
fn invalid_cookies_are_reissued_and_counted_by_reason() {
    let lab = Lab::new(1, 3, |b, _| {
        web_with_cookie(b, json!({ "max_lifetime_min": 10 })).l7_service(
            "other",
            OTHER_PORT,
            Some("ck"),
            json!({}),
        )
    });
    let src = lab.client(0);
    let (_, good) = lab.new_session(src, PORT);
    let (_, foreign) = lab.new_session(src, OTHER_PORT);
    let keys = lab.ok(CookieKeys::from_config(&[(2u8, KEY2)]), "key ring");
    let now = unix_now();
    let pool = cookie::pool_id("web");
    let b1 = lb_common::backend_identity("web", "b1");
    let b2 = lb_common::backend_identity("web", "b2");
    // A cookie crafted with the daemon's codec and key is honoured: the expired one below
    // differs only in its dates.
    let crafted = cookie::encode(
        &keys,
        COOKIE,
        "web",
        &CookiePayload {
            backend: b2,
            pool,
            issued_at: now,
            expires_at: now + 600,
        },
    );
    for _ in 0..5 {
        let (b, set) = lab.with_cookie(src, Some(&crafted));
        assert_eq!(
            (b.as_str(), set),
            ("b2", None),
            "a valid crafted cookie for b2"
        );
    }
    let expired = cookie::encode(
        &keys,
        COOKIE,
        "web",
        &CookiePayload {
            backend: b1,
            pool,
            issued_at: now - 3600,
            expires_at: now - 60,
        },
    );
    let mut tampered = good.clone().into_bytes();
    tampered[40] = if tampered[40] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ASCII");
    let unknown_key = cookie::encode(
        &lab.ok(CookieKeys::from_config(&[(9u8, KEY1)]), "key ring"),
        COOKIE,
        "web",
        &CookiePayload::issue(b1, pool, now, None),
    );
    let cases = [
        (Reject::Tampered, tampered.as_str()),
        (Reject::Expired, expired.as_str()),
        (Reject::ForeignService, foreign.as_str()),
        (Reject::UnknownKey, unknown_key.as_str()),
        (Reject::Malformed, "garbage"),
    ];
    let issued_before = lab.l7("cookies_issued", "web");
    for (i, (reason, value)) in cases.iter().enumerate() {
        let (_, set) = lab.with_cookie(src, Some(value));
        let fresh = set
            .unwrap_or_else(|| lab.fail(format!("a {} cookie was not re-issued", reason.as_str())));
        assert_ne!(&fresh, value);
        assert_eq!(
            lab.ok(
                cookie::decode(&keys, COOKIE, "web", &fresh, unix_now()).map(|p| p.pool),
                "the re-issued cookie decodes"
            ),
            pool
        );
        for (j, (r, _)) in cases.iter().enumerate() {
            let want = u64::from(j <= i);
            assert_eq!(
                lab.rejected("web", *r),
                want,
                "after the {} cookie: {} count",
                reason.as_str(),
                r.as_str()
            );
        }
    }
    assert_eq!(
        lab.l7("cookies_issued", "web"),
        issued_before + cases.len() as u64
    );
    assert_eq!(lab.rejected("other", Reject::ForeignService), 0);
    // The genuine cookie still works, untouched by all this.
    let (b, set) = lab.with_cookie(src, Some(&good));
    assert!(set.is_none(), "{b}: the valid cookie is not re-issued");
    // The set-cookie of a 10-minute profile carries Max-Age.
    let (r, _) = lab.get_echo(src, PORT, "/", &[]);
    let sc = r.set_cookie(COOKIE).unwrap_or_default();
    assert!(sc.contains("Max-Age=600"), "{sc}");
    lab.stop();
}

/// Key rotation by reload: cookies sealed with the previous key stay valid, new ones are
/// sealed with the new key; once the old key is dropped its cookies are re-issued.
#[test]
fn key_rotation_keeps_old_cookies_valid() {
    let mut lab = Lab::new(1, 3, |b, _| {
        b.profile(cookie_profile(&[(1, KEY1)], json!({})))
            .l7_service("web", PORT, Some("ck"), json!({}))
    });
    let src = lab.client(0);
    let ring1 = lab.ok(CookieKeys::from_config(&[(1u8, KEY1)]), "ring 1");
    let ring2 = lab.ok(CookieKeys::from_config(&[(2u8, KEY2)]), "ring 2");
    // Sessions on every backend, sealed with key 1.
    let mut old: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..3 {
        let (b, v) = lab.new_session(src, PORT);
        let p = lab.ok(
            cookie::decode(&ring1, COOKIE, "web", &v, unix_now()),
            "decoding with key 1",
        );
        assert_eq!(p.backend, lb_common::backend_identity("web", &b));
        old.insert(b, v);
    }
    assert_eq!(old.len(), 3, "{old:?}");

    let with_keys = |keys: &[(u8, &str)]| {
        base_builder(&lab.topo)
            .profile(cookie_profile(keys, json!({})))
            .l7_service("web", PORT, Some("ck"), json!({}))
    };
    let (b21, b2) = (with_keys(&[(2, KEY2), (1, KEY1)]), with_keys(&[(2, KEY2)]));
    lab.reload(b21);
    for (backend, v) in &old {
        for _ in 0..10 {
            let (b, set) = lab.with_cookie(src, Some(v));
            assert_eq!(&b, backend, "a key-1 cookie after the rotation");
            assert!(
                set.is_none(),
                "a key-1 cookie is still valid: not re-issued"
            );
        }
    }
    let (new_backend, new) = lab.new_session(src, PORT);
    assert_eq!(
        cookie::decode(&ring1, COOKIE, "web", &new, unix_now()),
        Err(Reject::UnknownKey),
        "new cookies are not sealed with key 1"
    );
    let p = lab.ok(
        cookie::decode(&ring2, COOKIE, "web", &new, unix_now()),
        "decoding a new cookie with key 2",
    );
    assert_eq!(p.backend, lb_common::backend_identity("web", &new_backend));
    assert_eq!(lab.rejected("web", Reject::UnknownKey), 0);

    // Key 1 retired: its cookies are re-issued (with key 2), key-2 cookies still stick.
    lab.reload(b2);
    let (_, set) = lab.with_cookie(src, Some(&old["b1"]));
    let reissued =
        set.unwrap_or_else(|| lab.fail("a key-1 cookie was accepted after key 1 was dropped"));
    lab.ok(
        cookie::decode(&ring2, COOKIE, "web", &reissued, unix_now()),
        "the re-issued cookie is sealed with key 2",
    );
    assert_eq!(lab.rejected("web", Reject::UnknownKey), 1);
    for _ in 0..10 {
        let (b, set) = lab.with_cookie(src, Some(&new));
        assert_eq!((b.as_str(), set), (new_backend.as_str(), None));
    }
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// App cookie, source-IP fallback

/// The backend's JSESSIONID is learned from its Set-Cookie; requests carrying it (as a
/// cookie, a query parameter or a path parameter, from any address) reach that backend.
#[test]
fn app_cookie_is_learned_and_followed() {
    let lab = Lab::new(3, 3, |b, _| {
        b.profile(json!({
            "name": "app",
            "type": "app-cookie",
            "cookie_name": "JSESSIONID",
            "timeout_s": 1800,
        }))
        .l7_service("web", PORT, Some("app"), json!({}))
    });
    let src = lab.client(0);
    // Without a session, requests spread.
    let s = spread(
        (0..6)
            .map(|_| lab.get_echo(src, PORT, "/", &[]).1.backend)
            .collect::<Vec<_>>()
            .iter(),
    );
    assert!(s.len() >= 2, "requests without a session spread: {s:?}");
    // Three logins: sessions on (round robin) three backends.
    let mut sessions: Vec<(String, String)> = Vec::new();
    for _ in 0..3 {
        let (r, e) = lab.get_echo(src, PORT, "/login", &[]);
        let id = r.set_cookie_value("JSESSIONID").unwrap_or_else(|| {
            lab.fail(format!(
                "the backend's JSESSIONID did not reach the client: {r:?}"
            ))
        });
        assert!(
            id.starts_with(&format!("{}-", e.backend)),
            "{id} from {}",
            e.backend
        );
        assert_eq!(r.set_cookie_value("theme").as_deref(), Some("dark"));
        assert!(
            r.set_cookie(COOKIE).is_none(),
            "no tether cookie with an app-cookie profile"
        );
        sessions.push((e.backend, id));
    }
    let backends: BTreeSet<&String> = sessions.iter().map(|(b, _)| b).collect();
    assert_eq!(backends.len(), 3, "{sessions:?}");
    assert_eq!(lab.l7("cookies_learned", "web"), 3);

    let (backend, id) = &sessions[0];
    let jsession = format!("JSESSIONID={id}");
    let with_other = format!("a=1; JSESSIONID={id}");
    for i in 0..100 {
        let (_, e) = lab.get_echo(lab.client(i % 3), PORT, "/cart", &[("Cookie", &with_other)]);
        if &e.backend != backend {
            lab.fail(format!(
                "request {i} with {jsession} went to {} (session on {backend})",
                e.backend
            ));
        }
        assert_eq!(
            e.cookie.as_deref(),
            Some(with_other.as_str()),
            "the app cookie is forwarded"
        );
    }
    for (backend, id) in &sessions {
        let targets = [
            format!("/cart?item=7&JSESSIONID={id}"),
            format!("/cart?JSESSIONID={id}"),
            format!("/app;JSESSIONID={id}/cart"),
        ];
        for t in &targets {
            for _ in 0..10 {
                let (_, e) = lab.get_echo(lab.client(1), PORT, t, &[]);
                assert_eq!(&e.backend, backend, "{t}");
                assert_eq!(&e.target, t, "the request target is forwarded as is");
                assert_eq!(e.cookie, None);
            }
        }
    }
    assert_eq!(lab.l7("persist_hits", "web"), 100 + 3 * 3 * 10);
    // An unknown session id is balanced like no session at all.
    let s = spread(
        (0..6)
            .map(|_| {
                lab.get_echo(src, PORT, "/", &[("Cookie", "JSESSIONID=nope")])
                    .1
                    .backend
            })
            .collect::<Vec<_>>()
            .iter(),
    );
    assert!(s.len() >= 2, "unknown session ids spread: {s:?}");

    // `tether persist list` shows the three learned sessions as L7 bindings, each on the
    // backend that set it; `tether persist flush --backend` removes that backend's one.
    let admin = lab.d().admin_addr().to_string();
    let token = lab.d().admin_token_file().to_string_lossy().into_owned();
    let list = lab.ok(
        lab.d().cli(&[
            "persist",
            "list",
            "--service",
            "web",
            "--admin",
            &admin,
            "--token-file",
            &token,
        ]),
        "tether persist list",
    );
    let app_rows: Vec<&str> = list.lines().filter(|l| l.contains("app-cookie")).collect();
    assert_eq!(app_rows.len(), 3, "three learned sessions listed:\n{list}");
    for (backend, _) in &sessions {
        assert!(
            app_rows.iter().any(|l| l.contains(&format!("{backend} ("))),
            "the session on {backend} is listed:\n{list}"
        );
    }
    assert!(list.contains("3 L7 bindings"), "{list}");
    let (gone, id) = &sessions[0];
    let flushed = lab.ok(
        lab.d().cli(&[
            "persist",
            "flush",
            "--service",
            "web",
            "--backend",
            gone,
            "--admin",
            &admin,
            "--token-file",
            &token,
        ]),
        "tether persist flush",
    );
    assert!(
        flushed.contains("flushed 1 L7 binding"),
        "flush --backend {gone}: {flushed}"
    );
    let list = lab.ok(
        lab.d().cli(&[
            "persist",
            "list",
            "--service",
            "web",
            "--admin",
            &admin,
            "--token-file",
            &token,
        ]),
        "tether persist list",
    );
    assert!(
        list.contains("2 L7 bindings") && !list.contains(&format!("{gone} (")),
        "{gone}'s session is gone:\n{list}"
    );
    // Its session id is now unknown: balanced like no session at all.
    let jsession = format!("JSESSIONID={id}");
    let s = spread(
        (0..6)
            .map(|_| {
                lab.get_echo(src, PORT, "/", &[("Cookie", &jsession)])
                    .1
                    .backend
            })
            .collect::<Vec<_>>()
            .iter(),
    );
    assert!(s.len() >= 2, "the flushed session is balanced anew: {s:?}");
    lab.stop();
}

/// Learned sessions survive a restart (SIGTERM: saved at shutdown) and a crash (SIGKILL:
/// what was saved, every second, before it), each session from clients it never came from.
#[test]
fn app_cookie_sessions_survive_a_restart_and_a_crash() {
    let mut lab = Lab::new(6, 3, |b, _| {
        b.profile(json!({
            "name": "app",
            "type": "app-cookie",
            "cookie_name": "JSESSIONID",
            "timeout_s": 1800,
        }))
        .l7_service("web", PORT, Some("app"), json!({}))
    });
    let login = |lab: &Lab, i: usize| -> (String, String) {
        let (r, e) = lab.get_echo(lab.client(i), PORT, "/login", &[]);
        let id = r
            .set_cookie_value("JSESSIONID")
            .unwrap_or_else(|| lab.fail(format!("no JSESSIONID: {r:?}")));
        (e.backend, id)
    };
    let check = |lab: &Lab, sessions: &[(String, String)], when: &str| {
        for (n, (backend, id)) in sessions.iter().enumerate() {
            let cookie = format!("JSESSIONID={id}");
            for i in 0..6 {
                let (_, e) = lab.get_echo(lab.client(i), PORT, "/cart", &[("Cookie", &cookie)]);
                if &e.backend != backend {
                    lab.fail(format!(
                        "{when}: session {n} ({id}) from client {i} went to {} instead of {backend}",
                        e.backend
                    ));
                }
            }
        }
    };
    let mut sessions: Vec<(String, String)> = (0..3).map(|i| login(&lab, i)).collect();
    let backends: BTreeSet<&String> = sessions.iter().map(|(b, _)| b).collect();
    assert_eq!(backends.len(), 3, "{sessions:?}");
    lab.stop_and_start(false);
    check(&lab, &sessions, "after a SIGTERM restart");
    // One more session, then a crash once it has been written (every second).
    sessions.push(login(&lab, 3));
    let file = lab.d().state_dir().join("l7-tables.json");
    let saved = || -> usize {
        let Ok(body) = std::fs::read(&file) else {
            return 0;
        };
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        v["services"][0]["tables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["id"] == "app-cookie:JSESSIONID")
            .map(|t| t["entries"].as_array().map_or(0, Vec::len))
            .sum()
    };
    lab.wait_for(Duration::from_secs(10), "the fourth session saved", || {
        saved() == 4
    });
    lab.stop_and_start(true);
    check(&lab, &sessions, "after a SIGKILL restart");
    assert!(
        lab.logs().contains("4 bindings carried over"),
        "{}",
        lab.logs()
    );
    lab.stop();
}

/// A client that never returns the cookie is kept on one backend by its address; other
/// addresses are balanced on their own; a cookie wins over the fallback.
#[test]
fn source_ip_fallback_for_clients_without_cookies() {
    let lab = Lab::new(6, 3, |b, _| {
        web_with_cookie(
            b,
            json!({ "fallback": { "type": "client-ip", "timeout_s": 300 } }),
        )
    });
    let a = lab.client(0);
    let first = lab.with_cookie(a, None).0;
    for i in 0..29 {
        let (b, _) = lab.with_cookie(a, None);
        if b != first {
            lab.fail(format!(
                "request {} without cookies from {a} went to {b}, not {first}",
                i + 2
            ));
        }
    }
    assert_eq!(lab.l7("fallback_hits", "web"), 29);
    let mut per_client: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    per_client.insert(a, first.clone());
    for i in 1..6 {
        let c = lab.client(i);
        let b0 = lab.with_cookie(c, None).0;
        for _ in 0..9 {
            assert_eq!(lab.with_cookie(c, None).0, b0, "client {c} without cookies");
        }
        per_client.insert(c, b0);
    }
    assert_eq!(lab.l7("fallback_hits", "web"), 29 + 5 * 9);
    let used: BTreeSet<&String> = per_client.values().collect();
    assert!(
        used.len() >= 2,
        "other addresses land elsewhere: {per_client:?}"
    );
    // A valid cookie (issued to a client on another backend) beats the fallback.
    let (other_client, other_backend) = per_client
        .iter()
        .find(|(_, b)| **b != first)
        .map(|(c, b)| (*c, b.clone()))
        .expect("checked above");
    let (_, e) = lab.get_echo(other_client, PORT, "/", &[]);
    assert_eq!(e.backend, other_backend);
    let (_, cookie_of_other) = lab.new_session(other_client, PORT);
    let hits = lab.l7("fallback_hits", "web");
    for _ in 0..5 {
        let (b, set) = lab.with_cookie(a, Some(&cookie_of_other));
        assert_eq!(
            (b.as_str(), set),
            (other_backend.as_str(), None),
            "the cookie wins"
        );
    }
    assert_eq!(
        lab.l7("fallback_hits", "web"),
        hits,
        "cookie hits are not fallback hits"
    );
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 over TLS

/// An HTTP/2 connection over TLS from the client namespace.
struct H2 {
    rt: tokio::runtime::Runtime,
    send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
}

/// One HTTP/2 answer.
struct H2Response {
    status: u16,
    set_cookies: Vec<String>,
    body: String,
}

impl H2 {
    fn connect(
        topo: &Topology,
        src: Ipv4Addr,
        port: u16,
        ca: &CertificateDer<'static>,
    ) -> Result<H2, String> {
        let dst = topo.vip_addr(port);
        let tcp = topo
            .in_client(move || connect_from(src, dst, IO_TIMEOUT))
            .map_err(|e| format!("{e:#}"))?
            .map_err(|e| format!("connecting {src} -> {dst}: {e}"))?;
        tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).map_err(|e| e.to_string())?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let send = rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let name = ServerName::try_from(TLS_NAME).map_err(|e| e.to_string())?;
            let tls = tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() != Some(b"h2") {
                return Err(format!("ALPN chose {alpn:?}, not h2"));
            }
            let (send, conn) = tokio::time::timeout(
                IO_TIMEOUT,
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)),
            )
            .await
            .map_err(|_| "HTTP/2 handshake timed out".to_string())?
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, String>(send)
        })?;
        Ok(H2 { rt, send })
    }

    /// `GET https://TLS_NAME/path` with one `cookie` field per entry of `cookies`.
    fn get(&mut self, path: &str, cookies: &[&str]) -> Result<H2Response, String> {
        let mut req = http::Request::get(format!("https://{TLS_NAME}:{TLS_PORT}{path}"));
        for c in cookies {
            req = req.header(http::header::COOKIE, *c);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let send = &mut self.send;
        self.rt.block_on(async move {
            tokio::time::timeout(IO_TIMEOUT, async {
                send.ready().await.map_err(|e| format!("connection: {e}"))?;
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                if resp.version() != http::Version::HTTP_2 {
                    return Err(format!("answered over {:?}", resp.version()));
                }
                let status = resp.status().as_u16();
                let set_cookies = resp
                    .headers()
                    .get_all(http::header::SET_COOKIE)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e}"))?
                    .to_bytes();
                Ok(H2Response {
                    status,
                    set_cookies,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            })
            .await
            .map_err(|_| "no answer in time".to_string())?
        })
    }
}

impl H2Response {
    fn srv(&self) -> Option<&String> {
        self.set_cookies
            .iter()
            .find(|c| c.starts_with(&format!("{COOKIE}=")))
    }

    fn echo(&self) -> Echo {
        Echo::parse(&self.body)
            .unwrap_or_else(|| panic!("status {}: not an echo body: {:?}", self.status, self.body))
    }
}

/// HTTP/2 over TLS: the cookie is Secure, and a request whose cookies come in several
/// `cookie` fields (as HTTP/2 clients send them) sticks; the backend gets the others merged.
#[test]
fn h2_over_tls_with_split_cookie_fields_sticks() {
    let lab = Lab::new(1, 3, |b, cert| {
        b.profile(cookie_profile(&[(2, KEY2), (1, KEY1)], json!({})))
            .l7_service(
                "tls",
                TLS_PORT,
                Some("ck"),
                json!({ "tls": {
                    "cert_file": cert.cert_file.to_string_lossy(),
                    "key_file": cert.key_file.to_string_lossy(),
                } }),
            )
    });
    let ca = lab.cert.der.clone();
    let src = lab.client(0);
    let mut h2 = lab.ok(
        H2::connect(&lab.topo, src, TLS_PORT, &ca),
        "HTTP/2 connection",
    );
    let r = lab.ok(h2.get("/", &["a=1"]), "first HTTP/2 request");
    assert_eq!(r.status, 200, "{}", r.body);
    let e = r.echo();
    assert_eq!(e.x_forwarded_proto.as_deref(), Some("https"));
    assert_eq!(e.cookie.as_deref(), Some("a=1"));
    let sc = r
        .srv()
        .unwrap_or_else(|| {
            lab.fail(format!(
                "no {COOKIE} Set-Cookie over HTTP/2: {:?}",
                r.set_cookies
            ))
        })
        .clone();
    assert!(sc.contains("Secure"), "Secure under TLS: {sc}");
    assert!(sc.contains("HttpOnly"), "{sc}");
    let backend = e.backend;
    let srv = sc.split(';').next().expect("name=value").to_string();
    // On the same connection, requests without the cookie still spread: stickiness below is
    // the cookie's doing.
    let mut free = BTreeSet::new();
    for _ in 0..6 {
        let r = lab.ok(h2.get("/", &[]), "HTTP/2 request without cookies");
        free.insert(r.echo().backend);
    }
    assert!(free.len() >= 2, "without cookies: {free:?}");
    let splits: [Vec<&str>; 3] = [
        vec!["a=1", srv.as_str(), "b=2"],
        vec![srv.as_str(), "a=1; b=2"],
        vec!["a=1", "b=2", srv.as_str()],
    ];
    for i in 0..60 {
        let fields = &splits[i % splits.len()];
        let r = lab.ok(h2.get("/p", fields), "HTTP/2 request with the cookie");
        let e = r.echo();
        if r.status != 200 || e.backend != backend || r.srv().is_some() {
            lab.fail(format!(
                "request {i} with cookie fields {fields:?}: status {}, backend {} (session on {backend}), Set-Cookie {:?}",
                r.status, e.backend, r.set_cookies
            ));
        }
        assert_eq!(e.cookie.as_deref(), Some("a=1; b=2"), "fields {fields:?}");
    }
    // A second connection with the same cookie.
    drop(h2);
    let mut h2 = lab.ok(
        H2::connect(&lab.topo, src, TLS_PORT, &ca),
        "second HTTP/2 connection",
    );
    for _ in 0..5 {
        let r = lab.ok(h2.get("/", &[srv.as_str(), "x=9"]), "HTTP/2 request");
        assert_eq!(r.echo().backend, backend);
        assert_eq!(r.echo().cookie.as_deref(), Some("x=9"));
    }
    assert_eq!(lab.l7("persist_hits", "tls"), 65);
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Down backends

/// Health-monitored pool with a 10-minute cookie and `policy`; every backend up.
fn down_lab(policy: &str) -> Lab {
    let lab = Lab::new(1, 3, |b, _| {
        web_with_cookie(b, json!({ "max_lifetime_min": 10 }))
            .health_monitor(http_monitor())
            .down_policy(policy)
    });
    for b in lab.backend_names() {
        lab.wait_state("web", &b, "up");
    }
    lab
}

/// `immediate`: the session's backend goes down, the next request lands elsewhere with a new
/// cookie, which then sticks; the old cookie returns to its backend once it is back.
#[test]
fn down_backend_immediate_moves_the_session() {
    let mut lab = down_lab("immediate");
    let src = lab.client(0);
    let (x, c) = lab.new_session(src, PORT);
    let (b, set) = lab.with_cookie(src, Some(&c));
    assert_eq!((b.as_str(), set), (x.as_str(), None));
    lab.stop_backend(&x);
    lab.wait_state("web", &x, "down");
    let (y, moved) = lab.with_cookie(src, Some(&c));
    assert_ne!(y, x, "the session left its down backend");
    let moved = moved.unwrap_or_else(|| lab.fail("no new cookie for the moved session"));
    assert_eq!(lab.l7("reassigned_down", "web"), 1);
    for _ in 0..10 {
        let (b, set) = lab.with_cookie(src, Some(&moved));
        assert_eq!(
            (b.as_str(), set),
            (y.as_str(), None),
            "the new cookie sticks"
        );
    }
    lab.start_backend(&x);
    lab.wait_state("web", &x, "up");
    let (b, set) = lab.with_cookie(src, Some(&moved));
    assert_eq!(
        (b.as_str(), set),
        (y.as_str(), None),
        "the moved session stays"
    );
    let (b, set) = lab.with_cookie(src, Some(&c));
    assert_eq!(
        (b.as_str(), set),
        (x.as_str(), None),
        "the old cookie names the recovered backend"
    );
    assert_eq!(lab.l7("refused_down", "web"), 0);
    lab.stop();
}

/// `never`: while the session's backend is down its requests get 503 (new clients are
/// served elsewhere); once it recovers they reach it again, with the same cookie.
#[test]
fn down_backend_never_refuses_until_it_recovers() {
    let mut lab = down_lab("never");
    let src = lab.client(0);
    let (x, c) = lab.new_session(src, PORT);
    lab.stop_backend(&x);
    lab.wait_state("web", &x, "down");
    let srv = format!("{COOKIE}={c}");
    for i in 0..5 {
        let r = lab.get(src, PORT, "/", &[("Cookie", &srv)]);
        if r.status != 503 {
            lab.fail(format!("request {i} of the session on down {x}: {r:?}"));
        }
        assert!(
            r.set_cookie(COOKIE).is_none(),
            "no new cookie under `never`: {r:?}"
        );
    }
    assert_eq!(lab.l7("refused_down", "web"), 5);
    assert_eq!(
        lab.metric(
            "tether_l7_responses_total",
            &[("service", "web"), ("class", "5xx")]
        ),
        5
    );
    for _ in 0..4 {
        let (b, _) = lab.new_session(src, PORT);
        assert_ne!(b, x, "no new client on the down backend");
    }
    lab.start_backend(&x);
    lab.wait_state("web", &x, "up");
    for _ in 0..5 {
        let (b, set) = lab.with_cookie(src, Some(&c));
        assert_eq!(
            (b.as_str(), set),
            (x.as_str(), None),
            "back on its backend, same cookie"
        );
    }
    assert_eq!(lab.l7("reassigned_down", "web"), 0);
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Userspace persistence tables: client-IP expiry, reloads

/// Client-IP persistence on an L7 service: the entry lives while the client has a connection
/// open, and expires `timeout_s` after its last connection closed.
#[test]
fn client_ip_entry_expires_only_after_the_last_connection_closed() {
    let lab = Lab::new(1, 3, |b, _| {
        b.profile(json!({ "name": "ip", "type": "client-ip", "timeout_s": 1 }))
            .l7_service("web", PORT, Some("ip"), json!({}))
    });
    let src = lab.client(0);
    let first = lab.get_echo(src, PORT, "/", &[]).1.backend;
    for _ in 0..10 {
        assert_eq!(lab.get_echo(src, PORT, "/", &[]).1.backend, first);
    }
    // A keep-alive connection held open over twice the timeout keeps the entry.
    let conn = lab.ok(
        lab.topo.connect_vip(src, PORT, IO_TIMEOUT),
        "keep-alive connection",
    );
    let mut ka = KeepAlive::new(conn, IO_TIMEOUT);
    let body = lab.ok(ka.get(), "GET on the keep-alive connection");
    assert_eq!(Echo::parse(&body).map(|e| e.backend), Some(first.clone()));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        lab.get_echo(src, PORT, "/", &[]).1.backend,
        first,
        "an open connection holds the entry past its timeout"
    );
    assert_eq!(lab.l7("expired", "web"), 0);
    let assigned = lab.l7("new_assignments", "web");
    drop(ka);
    // Closed: the timeout (1 s) counts from the close.
    std::thread::sleep(Duration::from_millis(2500));
    lab.get_echo(src, PORT, "/", &[]);
    assert_eq!(
        lab.l7("expired", "web"),
        1,
        "the entry expired after the last close"
    );
    assert_eq!(
        lab.l7("new_assignments", "web"),
        assigned + 1,
        "balanced afresh"
    );
    lab.stop();
}

/// Learned app-cookie sessions and fallback entries are "kept for timeout_s": a reload that
/// changes only the service's limits (the proxy is restarted to apply them) must keep them.
#[test]
fn app_cookie_sessions_survive_a_reload_of_the_service() {
    let config = |b: ConfigBuilder, max_connections: u32| {
        b.profile(json!({
            "name": "app",
            "type": "app-cookie",
            "cookie_name": "JSESSIONID",
            "timeout_s": 1800,
        }))
        .l7_service(
            "web",
            PORT,
            Some("app"),
            json!({ "limits": { "max_connections": max_connections } }),
        )
    };
    let mut lab = Lab::new(1, 3, |b, _| config(b, 1000));
    let src = lab.client(0);
    let mut sessions: Vec<(String, String)> = Vec::new();
    for _ in 0..3 {
        let (r, e) = lab.get_echo(src, PORT, "/login", &[]);
        let id = r
            .set_cookie_value("JSESSIONID")
            .unwrap_or_else(|| lab.fail(format!("no JSESSIONID: {r:?}")));
        sessions.push((e.backend, id));
    }
    let on: BTreeSet<&String> = sessions.iter().map(|(b, _)| b).collect();
    assert_eq!(on.len(), 3, "{sessions:?}");
    let follow = |lab: &Lab, when: &str| -> Vec<String> {
        // Newest session first, so a restarted round robin cannot land on each by chance.
        sessions
            .iter()
            .rev()
            .filter_map(|(backend, id)| {
                let c = format!("JSESSIONID={id}");
                let (_, e) = lab.get_echo(src, PORT, "/", &[("Cookie", &c)]);
                (&e.backend != backend)
                    .then(|| format!("{when}: session {id} of {backend} went to {}", e.backend))
            })
            .collect()
    };
    let moved = follow(&lab, "before the reload");
    assert!(moved.is_empty(), "{moved:?}");
    let reloaded = config(base_builder(&lab.topo), 2000);
    lab.reload(reloaded);
    let moved = follow(&lab, "after the reload");
    if !moved.is_empty() {
        lab.fail(format!(
            "learned sessions were lost by a reload that changed only limits.max_connections: {moved:?}\n{}",
            lab.ok(lab.d().metrics(), "GET /metrics")
                .lines()
                .filter(|l| l.starts_with("tether_l7_") && l.contains("service=\"web\""))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    lab.stop();
}

/// A reload that changes the profile (timeout) and the pool's algorithm replaces the
/// engine, and its learned sessions and fallback bindings carry over: no client moves.
#[test]
fn sessions_survive_a_reload_that_changes_the_profile_and_algorithm() {
    let config = |b: ConfigBuilder, timeout_s: u32, algorithm: &str| {
        b.profile(json!({
            "name": "app",
            "type": "app-cookie",
            "cookie_name": "JSESSIONID",
            "timeout_s": timeout_s,
            "fallback": { "type": "client-ip", "timeout_s": 600 },
        }))
        .pool_field("algorithm", json!(algorithm))
        .l7_service("web", PORT, Some("app"), json!({}))
    };
    let mut lab = Lab::new(6, 3, |b, _| config(b, 1800, "round-robin"));
    let mut sessions: Vec<(String, String)> = Vec::new();
    for i in 0..3 {
        let (r, e) = lab.get_echo(lab.client(i), PORT, "/login", &[]);
        let id = r
            .set_cookie_value("JSESSIONID")
            .unwrap_or_else(|| lab.fail(format!("no JSESSIONID: {r:?}")));
        sessions.push((e.backend, id));
    }
    // Clients 3..6 without a session: bound by the fallback.
    let anonymous: Vec<String> = (3..6)
        .map(|i| lab.get_echo(lab.client(i), PORT, "/", &[]).1.backend)
        .collect();
    let reloaded = config(base_builder(&lab.topo), 3600, "least-connections");
    lab.reload(reloaded);
    assert!(
        lab.logs().contains("9 bindings carried over"),
        "{}",
        lab.logs()
    );
    for (backend, id) in &sessions {
        let cookie = format!("JSESSIONID={id}");
        for i in 3..6 {
            let (_, e) = lab.get_echo(lab.client(i), PORT, "/cart", &[("Cookie", &cookie)]);
            assert_eq!(&e.backend, backend, "session {id} after the reload");
        }
    }
    for (i, backend) in (3..6).zip(&anonymous) {
        let (_, e) = lab.get_echo(lab.client(i), PORT, "/", &[]);
        assert_eq!(
            &e.backend, backend,
            "client {i} without a session after the reload"
        );
    }
    lab.stop();
}
