//! End to end, L7: tether's key-based persistence methods (Kemp's all cookies, Super HTTP,
//! URL hash, Host header, query item and selected header; Avi's consistent hash and custom
//! header static mapping) through the real daemon. Raw HTTP/1.1 clients in the client
//! namespace (several source addresses, one connection per request or keep-alive) talk to
//! L7 services on the VIP; echo backends answer with their name, so every answer says which
//! backend the key went to.
//!
//! Needs root and `TETHER_BIN` (the daemon binary): run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_l7_keys -- --test-threads=1`.
//! Every test builds its own namespaces (unique names) and removes them, also on failure.
//! Every loop and wait is bounded; failures panic with what was seen and the daemon's output.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lb_common::{
    MAGLEV_TABLE_SIZE,
    hash::{FLOW_SEED, hash_bytes},
    maglev::{MaglevBackend, build_table},
};
use serde_json::{Value, json};
use tether_tests::{
    daemon::ConfigBuilder,
    http::{HttpResponse, KeepAlive},
    l7lab::{IO_TIMEOUT, L7Lab, PORT, RELOAD_WAIT, base_builder},
};

/// The shared L7 lab plus this file's request helpers. The backends' port is the first L7
/// service's; further services use the next ports.
struct Lab(L7Lab);

impl std::ops::Deref for Lab {
    type Target = L7Lab;
    fn deref(&self) -> &L7Lab {
        &self.0
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut L7Lab {
        &mut self.0
    }
}

impl Lab {
    fn new(
        clients: usize,
        backends: usize,
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Lab {
        Lab(L7Lab::start(clients, backends, configure))
    }

    fn stop(self) {
        self.0.stop()
    }

    /// `GET target` from `src` to VIP:`port` with `headers` on a new connection; any status.
    fn get(&self, src: Ipv4Addr, port: u16, req: &Req) -> HttpResponse {
        let headers = req.headers();
        self.ok(
            self.topo
                .request(src, port, &req.target, &headers, IO_TIMEOUT),
            &format!("{req:?} on port {port} from {src}"),
        )
    }

    /// Like [`Lab::get`]; the answer must be a 200 from an echo backend: its name.
    fn backend(&self, src: Ipv4Addr, port: u16, req: &Req) -> String {
        let r = self.get(src, port, req);
        self.echo_backend(r, &format!("{req:?} on port {port} from {src}"))
    }

    fn echo_backend(&self, r: HttpResponse, what: &str) -> String {
        if r.status != 200 {
            self.fail(format!("{what}: status {}: {r:?}", r.status));
        }
        self.ok(r.echo(), &format!("{what}: reading the echo body"))
            .backend
    }

    /// A keep-alive connection from `src` to VIP:`port`.
    fn keep_alive(&self, src: Ipv4Addr, port: u16) -> KeepAlive {
        let conn = self.ok(
            self.topo.connect_vip(src, port, IO_TIMEOUT),
            &format!("keep-alive connection from {src} to port {port}"),
        );
        KeepAlive::new(conn, IO_TIMEOUT)
    }

    /// One request on a keep-alive connection; must be a 200 from an echo backend.
    fn backend_on(&self, ka: &mut KeepAlive, req: &Req) -> String {
        let headers = req.headers();
        let what = format!("{req:?} on keep-alive connection {:?}", ka.local_addr());
        let r = self.ok(ka.request(&req.target, &headers), &what);
        self.echo_backend(r, &what)
    }
}

/// Service `name` on `port` with its own profile `p-<name>` (`profile` plus the name).
fn keyed_service(b: ConfigBuilder, name: &str, port: u16, profile: Value) -> ConfigBuilder {
    let pname = format!("p-{name}");
    let mut p = profile;
    p["name"] = json!(pname);
    b.profile(p).l7_service(name, port, Some(&pname), json!({}))
}

fn spread<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// One request: target and header fields.
#[derive(Clone, Debug)]
struct Req {
    target: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn new(target: impl Into<String>) -> Req {
        Req {
            target: target.into(),
            headers: Vec::new(),
        }
    }

    fn h(mut self, name: &str, value: impl Into<String>) -> Req {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn headers(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// Where a method finds its key.
#[derive(Clone, Copy, Debug)]
enum KeyIn {
    /// Every cookie value (the `Cookie` field).
    Cookies,
    /// `User-Agent` (Super HTTP without MSRPC).
    UserAgent,
    /// Path and query.
    Url,
    Host,
    /// Query item `sid`.
    QuerySid,
    /// This header field.
    Header(&'static str),
}

/// A request whose key (for a method reading `k`) is `key`; everything else varies with
/// `salt`, so only the key can explain a stable choice.
fn keyed(k: KeyIn, key: &str, salt: usize) -> Req {
    match k {
        KeyIn::Cookies => Req::new(format!("/c/{salt}"))
            .h("Cookie", format!("sess={key}; theme=dark"))
            .h("X-Noise", salt.to_string()),
        // Without MSRPC the Authorization is not part of the key.
        KeyIn::UserAgent => Req::new(format!("/u/{salt}"))
            .h("User-Agent", format!("Agent/{key}"))
            .h("Authorization", format!("Bearer noise-{salt}")),
        KeyIn::Url => Req::new(format!("/item/{key}?x=1")).h("X-Noise", salt.to_string()),
        KeyIn::Host => Req::new(format!("/h/{salt}")).h("Host", format!("{key}.example")),
        KeyIn::QuerySid => Req::new(format!("/q?a={salt}&sid={key}&b=2")),
        KeyIn::Header(name) => Req::new(format!("/x/{salt}")).h(name, key),
    }
}

/// What lb-common's Maglev over `names` (every one up, weight 1, ids in pool order) picks for
/// `key`: what any tether instance, L7 or the kernel's table builder, computes.
struct Maglev {
    names: Vec<String>,
    table: Vec<u32>,
}

impl Maglev {
    fn new(names: &[String]) -> Maglev {
        let members: Vec<MaglevBackend<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| MaglevBackend {
                id: i as u32,
                name: n,
                weight: 1,
            })
            .collect();
        Maglev {
            names: names.to_vec(),
            table: build_table(&members, MAGLEV_TABLE_SIZE),
        }
    }

    fn pick(&self, key: &[u8]) -> &str {
        let h = hash_bytes(key, FLOW_SEED);
        &self.names[self.table[(h % MAGLEV_TABLE_SIZE) as usize] as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// Stickiness and spread, every method

/// Every key method: one key sticks across 100 requests (60 connections of their own from 4
/// client addresses, 4 keep-alive connections with 10 requests each; everything but the key
/// varies), and 36 keys (each asked twice, from different addresses) spread over all 3
/// backends. The Kemp methods keep a table (1 new assignment per key, then hits); the
/// consistent hash is the hash alone (every request a Maglev pick, no hits).
#[test]
fn every_key_method_sticks_per_key_and_spreads_keys() {
    let methods: Vec<(&str, Value, KeyIn, bool)> = vec![
        ("ac", json!({ "type": "all-cookies" }), KeyIn::Cookies, true),
        (
            "sh",
            json!({ "type": "super-http" }),
            KeyIn::UserAgent,
            true,
        ),
        ("url", json!({ "type": "url-hash" }), KeyIn::Url, true),
        ("host", json!({ "type": "host-header" }), KeyIn::Host, true),
        (
            "qi",
            json!({ "type": "query-item", "item": "sid" }),
            KeyIn::QuerySid,
            true,
        ),
        (
            "hd",
            json!({ "type": "header", "item": "X-Session" }),
            KeyIn::Header("X-Session"),
            true,
        ),
        (
            "ch-url",
            json!({ "type": "consistent-hash", "hash_key": "url" }),
            KeyIn::Url,
            false,
        ),
        (
            "ch-hdr",
            json!({ "type": "consistent-hash", "hash_key": "header:X-Key" }),
            KeyIn::Header("X-Key"),
            false,
        ),
        (
            "ch-q",
            json!({ "type": "consistent-hash", "hash_key": "query:sid" }),
            KeyIn::QuerySid,
            false,
        ),
        (
            "ch-host",
            json!({ "type": "consistent-hash", "hash_key": "host" }),
            KeyIn::Host,
            false,
        ),
        (
            "ch-ck",
            json!({ "type": "consistent-hash", "hash_key": "all-cookies" }),
            KeyIn::Cookies,
            false,
        ),
    ];
    let lab = Lab::new(4, 3, |mut b| {
        for (i, (name, profile, _, _)) in methods.iter().enumerate() {
            b = keyed_service(b, name, PORT + i as u16, profile.clone());
        }
        b
    });
    let all: BTreeSet<String> = lab.backend_names().into_iter().collect();
    const KEYS: usize = 36;
    for (i, (name, _, k, sticky)) in methods.iter().enumerate() {
        let port = PORT + i as u16;
        let key = "alpha-42";
        let mut seen = Vec::new();
        for n in 0..60 {
            let req = keyed(*k, key, n);
            seen.push(lab.backend(lab.client(n), port, &req));
        }
        for c in 0..4 {
            let mut ka = lab.keep_alive(lab.client(c), port);
            for j in 0..10 {
                let req = keyed(*k, key, 60 + c * 10 + j);
                seen.push(lab.backend_on(&mut ka, &req));
            }
        }
        assert_eq!(seen.len(), 100);
        let s = spread(seen.iter());
        if s.len() != 1 {
            lab.fail(format!(
                "{name}: key {key:?} did not stick over 100 requests: {s:?}"
            ));
        }
        // 36 keys, each asked twice from different addresses.
        let mut by_key: BTreeMap<String, String> = BTreeMap::new();
        for n in 0..KEYS {
            let key = format!("key-{n}");
            let first = lab.backend(lab.client(n), port, &keyed(*k, &key, n));
            let again = lab.backend(lab.client(n + 1), port, &keyed(*k, &key, n + 1000));
            if again != first {
                lab.fail(format!(
                    "{name}: key {key:?} went to {first}, then to {again}"
                ));
            }
            by_key.insert(key, first);
        }
        let used: BTreeSet<String> = by_key.values().cloned().collect();
        if used != all {
            lab.fail(format!(
                "{name}: {KEYS} keys did not spread over every backend: {:?}",
                spread(by_key.values())
            ));
        }
        let (new, hits) = (
            lab.l7("new_assignments", name),
            lab.l7("persist_hits", name),
        );
        let want = if *sticky {
            // A table entry per key: one assignment, then hits.
            (1 + KEYS as u64, 99 + KEYS as u64)
        } else {
            // The hash alone: every request is a (Maglev) assignment.
            (100 + 2 * KEYS as u64, 0)
        };
        assert_eq!((new, hits), want, "{name}: (new_assignments, persist_hits)");
    }
    // The key material reaches the backend unchanged.
    let req = keyed(KeyIn::Cookies, "alpha-42", 7);
    let r = lab.get(lab.client(0), PORT, &req);
    assert_eq!(
        lab.ok(r.echo(), "echo").cookie.as_deref(),
        Some("sess=alpha-42; theme=dark"),
        "all-cookies forwards the cookies"
    );
    lab.stop();
}

/// Consistent hash on the source address: one address sticks across connections and 32
/// addresses spread; on the source address and port: one connection sticks, new connections
/// (new ports) from one address spread.
#[test]
fn consistent_hash_on_source_address_and_port() {
    let lab = Lab::new(32, 3, |b| {
        let b = keyed_service(
            b,
            "src",
            PORT,
            json!({ "type": "consistent-hash", "hash_key": "source-ip" }),
        );
        keyed_service(
            b,
            "srcport",
            PORT + 1,
            json!({ "type": "consistent-hash", "hash_key": "source-ip-port" }),
        )
    });
    let mut per_addr: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for c in 0..32 {
        let src = lab.client(c);
        let first = lab.backend(src, PORT, &Req::new("/"));
        for n in 0..3 {
            let b = lab.backend(src, PORT, &Req::new(format!("/n/{n}")));
            if b != first {
                lab.fail(format!("source-ip: {src} went to {first}, then {b}"));
            }
        }
        let mut ka = lab.keep_alive(src, PORT);
        for _ in 0..3 {
            assert_eq!(lab.backend_on(&mut ka, &Req::new("/ka")), first, "{src}");
        }
        per_addr.insert(src, first);
    }
    let s = spread(per_addr.values());
    assert_eq!(s.len(), 3, "32 addresses over every backend: {s:?}");
    // Maglev on the 4 address bytes, as lb-common computes it.
    let maglev = Maglev::new(&lab.backend_names());
    for (a, b) in &per_addr {
        assert_eq!(maglev.pick(&a.octets()), b, "source-ip {a}");
    }

    let src = lab.client(0);
    let mut ka = lab.keep_alive(src, PORT + 1);
    let port = lab.ok(ka.local_addr(), "local address").port();
    let first = lab.backend_on(&mut ka, &Req::new("/"));
    for _ in 0..20 {
        assert_eq!(
            lab.backend_on(&mut ka, &Req::new("/")),
            first,
            "one connection (port {port}) sticks"
        );
    }
    let mut k = src.octets().to_vec();
    k.extend_from_slice(&port.to_be_bytes());
    assert_eq!(maglev.pick(&k), first, "source-ip-port {src}:{port}");
    let conns: Vec<String> = (0..30)
        .map(|_| lab.backend(src, PORT + 1, &Req::new("/")))
        .collect();
    let s = spread(conns.iter());
    assert_eq!(s.len(), 3, "30 connections from {src} spread: {s:?}");
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Super HTTP: the MSRPC rule

/// Super HTTP keys on the User-Agent, unless it contains "MSRPC": then on the Authorization,
/// or on nothing (one shared key) without one. With `with_source_ip` the address joins the
/// key.
#[test]
fn super_http_msrpc_rule() {
    let lab = Lab::new(30, 3, |b| {
        let b = keyed_service(b, "sh", PORT, json!({ "type": "super-http" }));
        keyed_service(
            b,
            "shsrc",
            PORT + 1,
            json!({ "type": "super-http", "with_source_ip": true }),
        )
    });
    let all: BTreeSet<String> = lab.backend_names().into_iter().collect();
    let msrpc_agents = [
        "MSRPC",
        "MSRPC/1.0",
        "Microsoft RPC MSRPC client",
        "x-MSRPC-y",
        "Outlook MSRPC 16.0",
    ];

    // MSRPC with an Authorization: the Authorization decides, whatever the User-Agent.
    let mut by_auth: BTreeMap<String, String> = BTreeMap::new();
    for n in 0..30 {
        let auth = format!("Basic dXNlcjp{n}");
        let mut got = BTreeSet::new();
        for (j, ua) in msrpc_agents.iter().enumerate() {
            let req = Req::new(format!("/rpc/{j}"))
                .h("User-Agent", *ua)
                .h("Authorization", auth.as_str());
            got.insert(lab.backend(lab.client(n + j), PORT, &req));
        }
        if got.len() != 1 {
            lab.fail(format!(
                "MSRPC with Authorization {auth:?}: the User-Agent changed the backend: {got:?}"
            ));
        }
        by_auth.insert(auth, got.into_iter().next().expect("one"));
    }
    let used: BTreeSet<String> = by_auth.values().cloned().collect();
    if used != all {
        lab.fail(format!(
            "MSRPC: 30 Authorization values under the same User-Agents did not spread: {:?}",
            spread(by_auth.values())
        ));
    }

    // MSRPC without an Authorization: one (blank) key for every such client.
    let mut shared = BTreeSet::new();
    for n in 0..30 {
        let req = Req::new(format!("/rpc/{n}")).h("User-Agent", format!("MSRPC client {n}"));
        shared.insert(lab.backend(lab.client(n), PORT, &req));
    }
    for ua in msrpc_agents {
        shared.insert(lab.backend(lab.client(3), PORT, &Req::new("/").h("User-Agent", ua)));
    }
    if shared.len() != 1 {
        lab.fail(format!(
            "MSRPC clients without Authorization did not share one backend: {shared:?}"
        ));
    }

    // No MSRPC: the User-Agent decides, the Authorization is ignored.
    let mut by_ua: BTreeMap<String, String> = BTreeMap::new();
    for n in 0..30 {
        let ua = format!("Mozilla/5.0 (build {n})");
        let mut got = BTreeSet::new();
        for j in 0..5 {
            let req = Req::new("/")
                .h("User-Agent", ua.as_str())
                .h("Authorization", format!("Basic other-{j}"));
            got.insert(lab.backend(lab.client(n + j), PORT, &req));
        }
        // Without any Authorization too.
        got.insert(lab.backend(
            lab.client(n),
            PORT,
            &Req::new("/").h("User-Agent", ua.as_str()),
        ));
        if got.len() != 1 {
            lab.fail(format!(
                "User-Agent {ua:?} (no MSRPC): the Authorization changed the backend: {got:?}"
            ));
        }
        by_ua.insert(ua, got.into_iter().next().expect("one"));
    }
    let used: BTreeSet<String> = by_ua.values().cloned().collect();
    if used != all {
        lab.fail(format!(
            "30 User-Agents with one Authorization did not spread: {:?}",
            spread(by_ua.values())
        ));
    }
    // A non-MSRPC User-Agent equal to an Authorization value picks what that value picks
    // under MSRPC: the key is the value itself (the same Maglev, the same table).
    let maglev = Maglev::new(&lab.backend_names());
    for (auth, b) in &by_auth {
        assert_eq!(
            maglev.pick(auth.as_bytes()),
            b,
            "MSRPC key = Authorization {auth:?}"
        );
    }
    let blank = maglev.pick(b"");
    assert!(
        shared.contains(blank),
        "MSRPC without Authorization: the blank key picks {blank}, clients got {shared:?}"
    );
    for (ua, b) in &by_ua {
        assert_eq!(maglev.pick(ua.as_bytes()), b, "key = User-Agent {ua:?}");
    }

    // With the source address: one User-Agent from 30 addresses spreads; each address sticks.
    let ua = "Mozilla/5.0 (same for everyone)";
    let mut per_addr: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for c in 0..30 {
        let src = lab.client(c);
        let req = Req::new("/").h("User-Agent", ua);
        let first = lab.backend(src, PORT + 1, &req);
        for n in 0..3 {
            let req = Req::new(format!("/{n}"))
                .h("User-Agent", ua)
                .h("Authorization", format!("x{n}"));
            let b = lab.backend(src, PORT + 1, &req);
            if b != first {
                lab.fail(format!("with_source_ip: {src} went to {first}, then {b}"));
            }
        }
        per_addr.insert(src, first);
    }
    let s = spread(per_addr.values());
    assert_eq!(
        s.len(),
        3,
        "with_source_ip: one User-Agent from 30 addresses spreads: {s:?}"
    );
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Missing keys

/// A request without the method's key is balanced by the pool's algorithm (round robin),
/// for every method that can miss its key; it is never refused; keyed requests in between
/// still follow their key.
#[test]
fn missing_key_falls_back_to_round_robin() {
    // (service, profile, a request without the key)
    let no_key: Vec<(&str, Value, Req)> = vec![
        (
            "hd",
            json!({ "type": "header", "item": "X-Session" }),
            Req::new("/").h("X-Other", "1"),
        ),
        (
            "ac",
            json!({ "type": "all-cookies" }),
            Req::new("/").h("X-Session", "s1"),
        ),
        (
            "sh",
            json!({ "type": "super-http" }),
            Req::new("/").h("Authorization", "Basic abc"),
        ),
        (
            "qi",
            json!({ "type": "query-item", "item": "sid" }),
            Req::new("/p?a=1&sidx=2&b"),
        ),
        (
            "ch",
            json!({ "type": "consistent-hash", "hash_key": "header:X-Key" }),
            Req::new("/").h("X-Session", "s1"),
        ),
        (
            "chq",
            json!({ "type": "consistent-hash", "hash_key": "query:sid" }),
            Req::new("/nothing"),
        ),
    ];
    let lab = Lab::new(6, 3, |mut b| {
        for (i, (name, profile, _)) in no_key.iter().enumerate() {
            b = keyed_service(b, name, PORT + i as u16, profile.clone());
        }
        b
    });
    let names = lab.backend_names();
    for (i, (name, _, req)) in no_key.iter().enumerate() {
        let port = PORT + i as u16;
        let got: Vec<String> = (0..12)
            .map(|_| lab.backend(lab.client(0), port, req))
            .collect();
        let s = spread(got.iter());
        if names.iter().any(|n| s.get(n) != Some(&4)) {
            lab.fail(format!(
                "{name}: 12 requests without a key from one client are not round robin: {s:?}"
            ));
        }
        assert_eq!(lab.l7("new_assignments", name), 12, "{name}");
        assert_eq!(lab.l7("persist_hits", name), 0, "{name}");
    }
    // The `hd` key works between keyless requests, and keyless ones keep rotating.
    let keyed_req = Req::new("/").h("X-Session", "abc");
    let kb = lab.backend(lab.client(1), PORT, &keyed_req);
    let mut keyless = Vec::new();
    for c in 0..6 {
        assert_eq!(lab.backend(lab.client(c), PORT, &keyed_req), kb);
        keyless.push(lab.backend(lab.client(c), PORT, &no_key[0].2));
    }
    let s = spread(keyless.iter());
    assert_eq!(s.len(), 3, "keyless requests between keyed ones: {s:?}");
    lab.stop();
}

/// With `fallback` client-ip, a request without the key sticks to its source address
/// (addresses are balanced); a request that carries the key follows the key (its Maglev
/// pick, as on the same profile without a fallback), also the first time the key is seen,
/// and does not disturb the client's fallback entry.
#[test]
fn client_ip_fallback_applies_only_without_the_key() {
    let header = json!({ "type": "header", "item": "X-Session", "timeout_s": 300 });
    let mut with_fallback = header.clone();
    with_fallback["fallback"] = json!({ "type": "client-ip", "timeout_s": 300 });
    let fb = PORT + 1;
    let lab = Lab::new(7, 3, |b| {
        let b = keyed_service(b, "hd", PORT, header.clone());
        keyed_service(b, "fb", fb, with_fallback.clone())
    });
    // Clients 0..6 send keyless requests: each sticks to its address's backend.
    let mut per_client: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for c in 0..6 {
        let src = lab.client(c);
        let first = lab.backend(src, fb, &Req::new("/"));
        for n in 0..19 {
            let b = lab.backend(src, fb, &Req::new(format!("/{n}")));
            if b != first {
                lab.fail(format!(
                    "fallback: request {} without a key from {src} went to {b}, not {first}",
                    n + 2
                ));
            }
        }
        per_client.insert(src, first);
    }
    assert_eq!(lab.l7("fallback_hits", "fb"), 6 * 19);
    let s = spread(per_client.values());
    assert_eq!(
        s.len(),
        3,
        "6 new clients are balanced (round robin): {s:?}"
    );

    let maglev = Maglev::new(&lab.backend_names());
    // Control: client 6 never sent a keyless request (no fallback entry): a new key goes
    // to its Maglev pick.
    let fresh = lab.client(6);
    for n in 0..10 {
        let k = format!("fresh-{n}");
        let b = lab.backend(fresh, fb, &Req::new("/").h("X-Session", k.as_str()));
        assert_eq!(b, maglev.pick(k.as_bytes()), "key {k} from {fresh}");
    }
    // Client 0 has a fallback entry on `home`: new keys whose Maglev pick is elsewhere must
    // still go there.
    let a = lab.client(0);
    let home = per_client[&a].clone();
    let keys: Vec<(String, String)> = (0..200)
        .map(|n| format!("key-of-{n}"))
        .map(|k| {
            let p = maglev.pick(k.as_bytes()).to_string();
            (k, p)
        })
        .filter(|(_, p)| *p != home)
        .take(10)
        .collect();
    assert_eq!(keys.len(), 10, "keys whose Maglev pick is not {home}");
    let hits = lab.l7("fallback_hits", "fb");
    let mut wrong = Vec::new();
    for (k, p) in &keys {
        let req = Req::new("/").h("X-Session", k.as_str());
        let on_hd = lab.backend(a, PORT, &req);
        assert_eq!(&on_hd, p, "key {k} on hd (no fallback)");
        let on_fb = lab.backend(a, fb, &req);
        if &on_fb != p {
            wrong.push(format!("{k}: {on_fb} (its Maglev pick, as on hd: {p})"));
        }
    }
    let fallback_hits = lab.l7("fallback_hits", "fb") - hits;
    if !wrong.is_empty() {
        // The key is then held on the fallback's backend for timeout_s, for every client:
        // a second client now follows the first client's address.
        let (k, p) = &keys[0];
        let other = lab.backend(lab.client(6), fb, &Req::new("/").h("X-Session", k.as_str()));
        lab.fail(format!(
            "client-IP fallback overrides a request that carries the key: {} of {} new keys sent \
             from {a} (fallback entry on {home}) went to the fallback backend instead of the \
             key's Maglev pick: {wrong:?}; {fallback_hits} counted as fallback hits; afterwards \
             key {k} from {} goes to {other} (Maglev: {p}). The README says only a request \
             without the key is balanced by the fallback.",
            wrong.len(),
            keys.len(),
            lab.client(6)
        ));
    }
    assert_eq!(fallback_hits, 0, "keyed requests are not fallback hits");
    for (k, p) in &keys {
        let req = Req::new("/").h("X-Session", k.as_str());
        assert_eq!(&lab.backend(a, fb, &req), p, "the key {k} sticks");
        assert_eq!(
            lab.backend(a, fb, &Req::new("/")),
            home,
            "{a} without a key stays on its fallback backend"
        );
    }
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Instances agree

/// Two L7 services (two proxies, two routers, no shared state) over the same pool with the
/// same kind of profile pick the same backend for each of 100 keys, whatever order and
/// client they see them in; and both pick what lb-common's Maglev computes.
#[test]
fn two_instances_agree_on_every_key() {
    let kinds: Vec<(&str, Value, KeyIn)> = vec![
        (
            "hd",
            json!({ "type": "header", "item": "X-Session" }),
            KeyIn::Header("X-Session"),
        ),
        (
            "ch",
            json!({ "type": "consistent-hash", "hash_key": "url" }),
            KeyIn::Url,
        ),
        (
            "qi",
            json!({ "type": "query-item", "item": "sid", "timeout_s": 60 }),
            KeyIn::QuerySid,
        ),
    ];
    let lab = Lab::new(4, 3, |mut b| {
        for (i, (name, profile, _)) in kinds.iter().enumerate() {
            let port = PORT + 2 * i as u16;
            b = keyed_service(b, &format!("{name}-a"), port, profile.clone());
            b = keyed_service(b, &format!("{name}-b"), port + 1, profile.clone());
        }
        b
    });
    let maglev = Maglev::new(&lab.backend_names());
    for (i, (name, _, k)) in kinds.iter().enumerate() {
        let port = PORT + 2 * i as u16;
        let keys: Vec<String> = (0..100).map(|n| format!("session-{n:03}")).collect();
        // Keyless requests first on B only: the two round robins are out of step.
        for _ in 0..2 {
            lab.backend(lab.client(3), port + 1, &Req::new("/"));
        }
        let a: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(n, key)| lab.backend(lab.client(0), port, &keyed(*k, key, n)))
            .collect();
        let mut b: Vec<String> = keys
            .iter()
            .enumerate()
            .rev()
            .map(|(n, key)| lab.backend(lab.client(1 + n % 3), port + 1, &keyed(*k, key, n + 7)))
            .collect();
        b.reverse();
        let differ: Vec<String> = keys
            .iter()
            .zip(a.iter().zip(&b))
            .filter(|(_, (x, y))| x != y)
            .map(|(key, (x, y))| format!("{key}: {x} vs {y}"))
            .collect();
        if !differ.is_empty() {
            lab.fail(format!(
                "{name}: the two services disagree on {} of 100 keys: {differ:?}",
                differ.len()
            ));
        }
        assert_eq!(spread(a.iter()).len(), 3, "{name}: {:?}", spread(a.iter()));
        let off: Vec<String> = keys
            .iter()
            .enumerate()
            .filter_map(|(n, key)| {
                let material = match k {
                    KeyIn::Header(_) | KeyIn::QuerySid => key.clone(),
                    KeyIn::Url => keyed(*k, key, n).target,
                    _ => unreachable!("not used here"),
                };
                let want = maglev.pick(material.as_bytes());
                (want != a[n]).then(|| format!("{key}: {} (lb-common: {want})", a[n]))
            })
            .collect();
        assert!(
            off.is_empty(),
            "{name}: tether's picks differ from lb-common's Maglev: {off:?}"
        );
    }
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Removing one of 10 backends

/// 10 backends, 300 keys on a sticky (header) service and on a consistent-hash service over
/// the same pool; then one backend is disabled. Sticky: every key on a surviving backend
/// stays, the removed backend's keys (about 10%) move. Consistent hash: about 10% move, the
/// removed backend's keys among them.
#[test]
fn removing_one_of_ten_backends_moves_about_a_tenth() {
    const KEYS: usize = 300;
    let removed = "b4";
    let configure = |b: ConfigBuilder| {
        let b = keyed_service(
            b,
            "sticky",
            PORT,
            json!({ "type": "header", "item": "X-Key", "timeout_s": 600 }),
        );
        keyed_service(
            b,
            "ch",
            PORT + 1,
            json!({ "type": "consistent-hash", "hash_key": "header:X-Key" }),
        )
    };
    let mut lab = Lab::new(3, 10, configure);
    let keys: Vec<String> = (0..KEYS).map(|n| format!("user-{n}")).collect();
    let pick_all = |lab: &Lab, port: u16| -> Vec<String> {
        keys.iter()
            .enumerate()
            .map(|(n, k)| lab.backend(lab.client(n), port, &Req::new("/").h("X-Key", k.as_str())))
            .collect()
    };
    let sticky0 = pick_all(&lab, PORT);
    let ch0 = pick_all(&lab, PORT + 1);
    assert_eq!(
        sticky0, ch0,
        "the sticky table starts from the same Maglev picks"
    );
    let s = spread(sticky0.iter());
    assert_eq!(s.len(), 10, "{KEYS} keys over every backend: {s:?}");
    let on_removed = s[removed];

    let disabled = base_builder(&lab.topo).backend_field(removed, "admin_state", json!("disabled"));
    lab.reload(configure(disabled));
    lab.wait_for(RELOAD_WAIT, &format!("{removed} disabled"), || {
        lab.backend_state("sticky", removed) == "disabled"
    });
    let sticky1 = pick_all(&lab, PORT);
    let ch1 = pick_all(&lab, PORT + 1);

    // Sticky: exactly the removed backend's keys move, to where Maglev now says.
    let mut violations = Vec::new();
    let mut moved = 0;
    for (n, k) in keys.iter().enumerate() {
        let (before, after) = (&sticky0[n], &sticky1[n]);
        if before == removed {
            moved += 1;
            if after == removed {
                violations.push(format!("{k} stayed on disabled {removed}"));
            } else if after != &ch1[n] {
                violations.push(format!(
                    "{k} moved to {after}, Maglev without {removed} says {}",
                    ch1[n]
                ));
            }
        } else if before != after {
            violations.push(format!("{k} moved from surviving {before} to {after}"));
        }
    }
    if !violations.is_empty() {
        lab.fail(format!(
            "sticky: {} violations after disabling {removed}: {violations:?}",
            violations.len()
        ));
    }
    let share = |n: usize| n as f64 / KEYS as f64;
    assert_eq!(moved, on_removed);
    assert!(
        (0.05..=0.15).contains(&share(moved)),
        "sticky: {moved} of {KEYS} keys moved"
    );
    assert_eq!(lab.l7("reassigned_down", "sticky"), moved as u64);
    // The moved keys stay where they went.
    assert_eq!(pick_all(&lab, PORT), sticky1, "sticky: second pass");

    // Consistent hash: about a tenth moves; every key of the removed backend; few others.
    let ch_moved: Vec<usize> = (0..KEYS).filter(|&n| ch0[n] != ch1[n]).collect();
    let others: Vec<String> = ch_moved
        .iter()
        .filter(|&&n| ch0[n] != removed)
        .map(|&n| format!("{}: {} -> {}", keys[n], ch0[n], ch1[n]))
        .collect();
    assert!(
        ch1.iter().all(|b| b != removed),
        "consistent hash: a key still reaches disabled {removed}"
    );
    assert!(
        (0.05..=0.15).contains(&share(ch_moved.len())),
        "consistent hash: {} of {KEYS} keys moved ({on_removed} were on {removed}; others: {others:?})",
        ch_moved.len()
    );
    assert!(
        others.len() <= KEYS / 50,
        "consistent hash: Maglev moved too many keys between surviving backends: {others:?}"
    );
    // Both agree with lb-common's Maglev over the 9 left.
    let left: Vec<String> = lab
        .backend_names()
        .into_iter()
        .filter(|n| n != removed)
        .collect();
    // Ids are pool indexes (b4's slot stays empty), which does not change the picks.
    let maglev9 = Maglev::new(&left);
    for (n, k) in keys.iter().enumerate() {
        assert_eq!(maglev9.pick(k.as_bytes()), ch1[n], "lb-common for {k}");
    }
    eprintln!(
        "removing {removed}: sticky moved {moved}/{KEYS}, consistent hash moved {}/{KEYS} ({} between survivors)",
        ch_moved.len(),
        others.len()
    );
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Flood of new keys

/// One client floods a url-hash service with 600 distinct URLs on a keep-alive connection:
/// every request is served (balanced by Maglev), but past its quota of new keys per minute
/// none is stored, so another client's binding is not evicted from the (small) table. The
/// refused keys are counted in /metrics and `tether status`.
#[test]
fn a_flood_of_urls_from_one_client_cannot_evict_another_clients_binding() {
    const FLOOD: usize = 600;
    const QUOTA: u64 = 50;
    let lab = Lab::new(2, 3, |b| {
        keyed_service(
            b,
            "url",
            PORT,
            json!({
                "type": "url-hash",
                "table_capacity": 256,
                "max_new_keys_per_source_per_min": QUOTA,
            }),
        )
    });
    let mine = Req::new("/cart/alice");
    let x = lab.backend(lab.client(0), PORT, &mine);
    let maglev = Maglev::new(&lab.backend_names());
    let mut ka = lab.keep_alive(lab.client(1), PORT);
    for n in 0..FLOOD {
        let target = format!("/flood/{n}");
        let b = lab.backend_on(&mut ka, &Req::new(target.as_str()));
        let want = maglev.pick(target.as_bytes());
        if b != want {
            lab.fail(format!("{target}: on {b}, Maglev says {want}"));
        }
    }
    assert_eq!(
        lab.l7("keys_refused", "url"),
        FLOOD as u64 - QUOTA,
        "every new key past the quota refused"
    );
    assert_eq!(lab.l7("table_evictions", "url"), 0, "nothing evicted");
    let hits = lab.l7("persist_hits", "url");
    assert_eq!(lab.backend(lab.client(0), PORT, &mine), x);
    assert_eq!(
        lab.l7("persist_hits", "url"),
        hits + 1,
        "alice's binding is still in the table"
    );
    let cfg = lab.d().config_path().display().to_string();
    let status = lab.ok(lab.d().cli(&["status", "--config", &cfg]), "tether status");
    let want = format!(
        "evicted 0  new keys refused (per-source quota) {}",
        FLOOD as u64 - QUOTA
    );
    if !status.contains(&want) {
        lab.fail(format!("tether status lacks {want:?}:\n{status}"));
    }
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Expiry

/// `timeout_s: 1`: a header key bound to X stays on X while it keeps coming, also after X is
/// set draining (Maglev would now choose elsewhere, and new keys never reach X); once the
/// key is idle past the timeout its entry expires and it moves.
#[test]
fn table_entries_expire_after_the_timeout() {
    let configure = |b: ConfigBuilder| {
        keyed_service(
            b,
            "hd",
            PORT,
            json!({ "type": "header", "item": "X-Session", "timeout_s": 1 }),
        )
    };
    let mut lab = Lab::new(2, 3, configure);
    let key = Req::new("/").h("X-Session", "long-lived");
    let x = lab.backend(lab.client(0), PORT, &key);
    // Idle past the timeout with nothing changed: expired, then the same Maglev pick.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(lab.backend(lab.client(1), PORT, &key), x);
    assert_eq!(lab.l7("expired", "hd"), 1, "the idle entry expired");
    assert_eq!(lab.l7("new_assignments", "hd"), 2);

    let draining = base_builder(&lab.topo).backend_field(&x, "admin_state", json!("draining"));
    lab.reload(configure(draining));
    lab.wait_for(RELOAD_WAIT, &format!("{x} draining"), || {
        lab.backend_state("hd", &x) == "draining"
    });
    // Live: requests every 250 ms for 2.5 s (over twice the timeout) stay on X.
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(2500) && n < 40 {
        let b = lab.backend(lab.client(n), PORT, &key);
        if b != x {
            lab.fail(format!(
                "request {n} ({:?} after the reload): the live key left draining {x} for {b}",
                t.elapsed()
            ));
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(n >= 8, "only {n} requests in 2.5 s");
    // New keys are not given to a draining backend.
    for i in 0..30 {
        let b = lab.backend(
            lab.client(i),
            PORT,
            &Req::new("/").h("X-Session", format!("new-{i}")),
        );
        assert_ne!(b, x, "new key new-{i} on draining {x}");
    }
    let expired = lab.l7("expired", "hd");
    assert_eq!(expired, 1, "a live entry never expired");
    // Idle past the timeout: the entry expires and the key moves (to a backend that is up).
    std::thread::sleep(Duration::from_millis(2000));
    let y = lab.backend(lab.client(0), PORT, &key);
    if y == x {
        lab.fail(format!(
            "after {x} was set draining and the key sat idle past its 1 s timeout it is still on {x}"
        ));
    }
    assert_eq!(lab.l7("expired", "hd"), expired + 1);
    for c in 0..10 {
        assert_eq!(
            lab.backend(lab.client(c), PORT, &key),
            y,
            "the moved key sticks"
        );
    }
    lab.stop();
}

// ---------------------------------------------------------------------------------------------
// Custom header static mapping

/// `custom-header` on X-Tenant: a value equal to a backend's `header_value` always reaches
/// that backend (any client, any header-name case); other values and no value are balanced
/// by the pool's algorithm, over every backend (also the one without a header_value).
#[test]
fn custom_header_maps_values_to_backends() {
    let lab = Lab::new(3, 3, |b| {
        keyed_service(
            b.backend_field("b1", "header_value", json!("tenant-a"))
                .backend_field("b2", "header_value", json!("tenant-b")),
            "ch",
            PORT,
            json!({ "type": "custom-header", "item": "X-Tenant" }),
        )
    });
    for (value, want) in [("tenant-a", "b1"), ("tenant-b", "b2")] {
        for n in 0..30 {
            let name = ["X-Tenant", "x-tenant", "X-TENANT"][n % 3];
            let req = Req::new(format!("/t/{n}")).h(name, value);
            let b = lab.backend(lab.client(n), PORT, &req);
            if b != want {
                lab.fail(format!(
                    "request {n} with {name}: {value} went to {b}, not {want}"
                ));
            }
        }
        // Keep-alive: the mapping is per request.
        let mut ka = lab.keep_alive(lab.client(1), PORT);
        for _ in 0..5 {
            assert_eq!(
                lab.backend_on(&mut ka, &Req::new("/").h("X-Tenant", value)),
                want
            );
            lab.backend_on(&mut ka, &Req::new("/").h("X-Tenant", "nobody"));
        }
    }
    for unmatched in [Some("tenant-z"), Some("tenant"), None] {
        let got: Vec<String> = (0..12)
            .map(|n| {
                let req = Req::new("/");
                let req = match unmatched {
                    Some(v) => req.h("X-Tenant", v),
                    None => req,
                };
                lab.backend(lab.client(n), PORT, &req)
            })
            .collect();
        let s = spread(got.iter());
        assert_eq!(
            s.len(),
            3,
            "X-Tenant {unmatched:?}: balanced over every backend: {s:?}"
        );
    }
    lab.stop();
}
