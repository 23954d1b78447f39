//! The L7 persistence methods as the proxy's `Router`: active cookie (Avi "HTTP cookie"),
//! server cookie (Avi "app cookie"), client IP, and the "... or source IP" fallbacks.
//!
//! Every decision reads the published snapshot (pool, backend states) lock-free; the tables
//! it keeps are sharded and capped. Backends are named by their stable identity (pool and
//! name), so a reload that keeps a backend keeps its clients.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderValue, StatusCode, header};
use lb_common::{backend_identity, prefix_mask};

use crate::{
    balancer::select::{self, BackendSelection},
    config::{
        AppCookieProfile, ClientIpFallback, Config, CookieProfile, DownPolicy, PersistenceKind, SameSiteMode,
        VirtualService,
    },
    persist::{
        cookie::{self, CookieKeys, CookiePayload, Reject, SameSite, SetCookie},
        table::{Table, digest},
    },
    proxy::{ConnInfo, Route, Router},
    state::{BackendState, SharedSnapshot},
};

/// Capacity of each userspace table (entries); least recently used go first.
pub const TABLE_CAPACITY: usize = 1 << 20;

/// Counters of one L7 service's persistence decisions.
#[derive(Default, Debug)]
pub struct RouterStats {
    /// Requests sent where a cookie, table entry or fallback said.
    pub persist_hits: AtomicU64,
    /// Requests balanced by the pool's algorithm.
    pub new_assignments: AtomicU64,
    /// Active cookies issued (Set-Cookie added).
    pub cookies_issued: AtomicU64,
    /// App-cookie values learned from backends' Set-Cookie.
    pub cookies_learned: AtomicU64,
    /// Requests decided by the source-IP fallback.
    pub fallback_hits: AtomicU64,
    /// Persisted clients moved because their backend was down (policy `immediate`).
    pub reassigned_down: AtomicU64,
    /// Requests refused with 503 because the persisted backend is down (policy `never`).
    pub refused_down: AtomicU64,
    /// Table entries found expired.
    pub expired: AtomicU64,
    /// Invalid cookies, by `Reject` (treated as absent and re-issued).
    pub rejected: [AtomicU64; 5],
}

impl RouterStats {
    fn reject(&self, r: Reject) {
        let i = Reject::ALL.iter().position(|x| *x == r).expect("listed");
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }
}

enum Method {
    None,
    ClientIp { table: Table<[u8; 16]>, v4: u8, v6: u8 },
    HttpCookie { profile: CookieProfile, keys: CookieKeys, fallback: Option<Fallback> },
    AppCookie { profile: AppCookieProfile, table: Table<u128>, fallback: Option<Fallback> },
}

struct Fallback {
    table: Table<[u8; 16]>,
    v4: u8,
    v6: u8,
}

impl Fallback {
    fn new(f: &ClientIpFallback) -> Self {
        Fallback {
            table: Table::new(TABLE_CAPACITY, Duration::from_secs(f.timeout_s as u64)),
            v4: f.ipv4_prefix,
            v6: f.ipv6_prefix,
        }
    }
}

/// The masked client address, one key layout for both families.
fn client_key(ip: IpAddr, v4: u8, v6: u8) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let m = prefix_mask::<4>(v4);
            let o = a.octets();
            lb_common::v4_mapped([o[0] & m[0], o[1] & m[1], o[2] & m[2], o[3] & m[3]])
        }
        IpAddr::V6(a) => {
            let m = prefix_mask::<16>(v6);
            let mut o = a.octets();
            for (b, m) in o.iter_mut().zip(m) {
                *b &= m;
            }
            o
        }
    }
}

/// What `route` decided, for `on_response`.
struct Decision {
    /// Backend identity.
    identity: u32,
    /// Add Set-Cookie (active cookie missing, invalid, re-bound, or always-send).
    issue_cookie: bool,
    /// Index of the pool backend (for least-connections accounting).
    index: usize,
}

pub struct PersistRouter {
    service: String,
    snapshot: SharedSnapshot,
    method: Method,
    down_policy: DownPolicy,
    selection: Box<dyn BackendSelection>,
    pool_id: u32,
    pub stats: Arc<RouterStats>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl PersistRouter {
    pub fn new(cfg: &Config, svc: &VirtualService, snapshot: SharedSnapshot) -> Result<Self, cookie::KeyError> {
        let pool = &cfg.pools[svc.pool];
        let profile = cfg.profile(svc);
        let method = match profile.map(|p| (&p.kind, p)) {
            None => Method::None,
            Some((PersistenceKind::ClientIp, p)) => Method::ClientIp {
                table: Table::new(TABLE_CAPACITY, Duration::from_secs(p.timeout_s as u64)),
                v4: p.ipv4_prefix,
                v6: p.ipv6_prefix,
            },
            Some((PersistenceKind::HttpCookie(c), _)) => Method::HttpCookie {
                keys: if c.keys.is_empty() {
                    log::warn!(
                        "profile of {}: no cookie keys configured, using a random one: cookies will not survive a restart and other instances will not accept them",
                        svc.name
                    );
                    CookieKeys::generate()
                } else {
                    CookieKeys::from_config(&c.keys)?
                },
                fallback: c.fallback.as_ref().map(Fallback::new),
                profile: c.clone(),
            },
            Some((PersistenceKind::AppCookie(a), p)) => Method::AppCookie {
                table: Table::new(TABLE_CAPACITY, Duration::from_secs(p.timeout_s as u64)),
                fallback: a.fallback.as_ref().map(Fallback::new),
                profile: a.clone(),
            },
        };
        Ok(PersistRouter {
            service: svc.name.clone(),
            snapshot,
            method,
            down_policy: profile.map_or(DownPolicy::Immediate, |p| p.down_policy),
            selection: select::for_algorithm(pool.algorithm, pool.backends.len()),
            pool_id: cookie::pool_id(&pool.name),
            stats: Arc::new(RouterStats::default()),
        })
    }

    fn fallback(&self) -> Option<&Fallback> {
        match &self.method {
            Method::HttpCookie { fallback, .. } | Method::AppCookie { fallback, .. } => fallback.as_ref(),
            _ => None,
        }
    }

    /// App-cookie key: the cookie, else a query parameter of the same name, else a
    /// `;name=value` path parameter (Avi: "look for a URI query of the same name").
    fn app_cookie_value<'a>(req: &'a http::request::Parts, name: &str) -> Option<&'a str> {
        if let Some(v) = cookie::find(req.headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes()), name) {
            return Some(v);
        }
        let path_and_query = req.uri.path_and_query()?;
        if let Some(q) = path_and_query.query() {
            for pair in q.split('&') {
                if let Some((k, v)) = pair.split_once('=')
                    && k == name
                    && !v.is_empty()
                {
                    return Some(v);
                }
            }
        }
        for seg in path_and_query.path().split('/') {
            for param in seg.split(';').skip(1) {
                if let Some((k, v)) = param.split_once('=')
                    && k == name
                    && !v.is_empty()
                {
                    return Some(v);
                }
            }
        }
        None
    }
}

impl Router for PersistRouter {
    fn route(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
    ) -> Result<Route, StatusCode> {
        let snap = self.snapshot.load();
        let Some(si) = snap.config.services.iter().position(|s| s.name == self.service) else {
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        };
        let svc = &snap.config.services[si];
        let pool = &snap.config.pools[svc.pool];
        let states = snap.backend_state.get(svc.pool).map(Vec::as_slice).unwrap_or(&[]);
        let addr_of = |i: usize| SocketAddr::new(pool.backends[i].address, pool.backends[i].port.unwrap_or(svc.port));
        let by_identity = |id: u32| pool.backends.iter().position(|b| backend_identity(&pool.name, &b.name) == id);
        let now = Instant::now();

        // What persistence says, if anything: (backend index, source).
        let mut bound: Option<usize> = None;
        let mut issue_cookie = false;
        match &self.method {
            Method::None => {}
            Method::ClientIp { table, v4, v6 } => {
                let k = client_key(conn.client.ip(), *v4, *v6);
                match table.get(&k, now) {
                    Ok(id) => bound = by_identity(id),
                    Err(expired) => {
                        if expired {
                            self.stats.expired.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Method::HttpCookie { profile, keys, .. } => {
                let values = req.headers.get_all(header::COOKIE);
                if let Some(v) = cookie::find(values.iter().map(|v| v.as_bytes()), &profile.cookie_name) {
                    match cookie::decode(keys, &profile.cookie_name, &svc.name, v, unix_now()) {
                        Ok(p) if p.pool == self.pool_id => bound = by_identity(p.backend),
                        Ok(_) => self.stats.reject(Reject::ForeignService),
                        Err(r) => self.stats.reject(r),
                    }
                }
                issue_cookie = bound.is_none() || profile.always_send;
                // The persistence cookie is tether's: the backend never sees it.
                let stripped = cookie::strip(values.iter().map(|v| v.as_bytes()), &profile.cookie_name);
                req.headers.remove(header::COOKIE);
                if let Some(rest) = stripped
                    && let Ok(v) = HeaderValue::from_bytes(&rest)
                {
                    req.headers.insert(header::COOKIE, v);
                }
            }
            Method::AppCookie { profile, table, .. } => {
                if let Some(v) = Self::app_cookie_value(req, &profile.cookie_name) {
                    match table.get(&digest(v.as_bytes()), now) {
                        Ok(id) => bound = by_identity(id),
                        Err(true) => {
                            self.stats.expired.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(false) => {}
                    }
                }
            }
        }
        let cookie_absent = bound.is_none();
        if bound.is_none()
            && let Some(f) = self.fallback()
            && let Ok(id) = f.table.get(&client_key(conn.client.ip(), f.v4, f.v6), now)
            && let Some(i) = by_identity(id)
        {
            bound = Some(i);
            self.stats.fallback_hits.fetch_add(1, Ordering::Relaxed);
        }

        // Honour the binding if its backend can take it.
        let mut chosen = None;
        if let Some(i) = bound {
            let state = states.get(i).copied().unwrap_or(BackendState::Down);
            let usable = matches!(state, BackendState::Up | BackendState::Draining);
            let failed = tried.contains(&addr_of(i));
            if usable && !failed {
                chosen = Some(i);
                self.stats.persist_hits.fetch_add(1, Ordering::Relaxed);
            } else if !usable && self.down_policy == DownPolicy::Never && !failed {
                self.stats.refused_down.fetch_add(1, Ordering::Relaxed);
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            } else {
                self.stats.reassigned_down.fetch_add(1, Ordering::Relaxed);
                issue_cookie = true;
            }
        }
        let index = match chosen {
            Some(i) => i,
            None => {
                let candidates: Vec<(usize, u32)> = pool
                    .backends
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| states.get(*i) == Some(&BackendState::Up) && !tried.contains(&addr_of(*i)))
                    .map(|(i, b)| (i, b.weight))
                    .collect();
                let hint = match &self.method {
                    Method::HttpCookie { profile, .. } if profile.add_port => conn.client.port() as u64,
                    _ => 0,
                };
                let i = self.selection.select(&candidates, hint).ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
                self.stats.new_assignments.fetch_add(1, Ordering::Relaxed);
                i
            }
        };
        let identity = backend_identity(&pool.name, &pool.backends[index].name);
        // Record the binding where this method keeps one.
        match &self.method {
            Method::ClientIp { table, v4, v6 } => table.insert(client_key(conn.client.ip(), *v4, *v6), identity, now),
            Method::HttpCookie { .. } | Method::AppCookie { .. } if cookie_absent => {
                if let Some(f) = self.fallback() {
                    f.table.insert(client_key(conn.client.ip(), f.v4, f.v6), identity, now);
                }
            }
            _ => {}
        }
        self.selection.started(index);
        Ok(Route {
            backend: addr_of(index),
            token: index as u64,
            tag: Some(Arc::new(Decision { identity, issue_cookie, index })),
        })
    }

    fn on_response(&self, route: &Route, conn: &ConnInfo, resp: &mut http::response::Parts) {
        let Some(d) = route.tag.as_ref().and_then(|t| t.downcast_ref::<Decision>()) else { return };
        match &self.method {
            Method::HttpCookie { profile, keys, .. } if d.issue_cookie => {
                let now = unix_now();
                let lifetime = profile.max_lifetime.map(|l| l.as_secs());
                let payload = CookiePayload::issue(d.identity, self.pool_id, now, lifetime);
                let value = cookie::encode(keys, &profile.cookie_name, &self.service, &payload);
                let sc = SetCookie {
                    name: profile.cookie_name.clone(),
                    value,
                    max_age: lifetime,
                    path: Some(profile.path.clone()),
                    domain: profile.domain.clone(),
                    http_only: profile.http_only,
                    secure: profile.secure.unwrap_or(conn.tls),
                    same_site: profile.same_site.map(|s| match s {
                        SameSiteMode::Lax => SameSite::Lax,
                        SameSiteMode::Strict => SameSite::Strict,
                        SameSiteMode::None => SameSite::None,
                    }),
                };
                if let Ok(v) = HeaderValue::from_str(&sc.render()) {
                    resp.headers.append(header::SET_COOKIE, v);
                    self.stats.cookies_issued.fetch_add(1, Ordering::Relaxed);
                }
            }
            Method::AppCookie { profile, table, .. } => {
                let now = Instant::now();
                for v in resp.headers.get_all(header::SET_COOKIE) {
                    // Set-Cookie: name=value; attributes...
                    let Ok(s) = v.to_str() else { continue };
                    let pair = s.split(';').next().unwrap_or("");
                    if let Some((n, val)) = pair.split_once('=')
                        && n.trim() == profile.cookie_name
                        && !val.trim().is_empty()
                    {
                        table.insert(digest(val.trim().as_bytes()), d.identity, now);
                        self.stats.cookies_learned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
    }

    fn finished(&self, route: &Route) {
        if let Some(d) = route.tag.as_ref().and_then(|t| t.downcast_ref::<Decision>()) {
            self.selection.ended(d.index);
        }
    }

    fn connection_opened(&self, conn: &ConnInfo) {
        if let Method::ClientIp { table, v4, v6 } = &self.method {
            table.opened(&client_key(conn.client.ip(), *v4, *v6));
        }
    }

    fn connection_closed(&self, conn: &ConnInfo) {
        if let Method::ClientIp { table, v4, v6 } = &self.method {
            table.closed(&client_key(conn.client.ip(), *v4, *v6), Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arc_swap::ArcSwap;

    use super::*;
    use crate::{
        balancer::{Previous, assign_ids},
        state::{SharedSnapshot, Snapshot},
    };

    const KEY_NEW: &str = "0202020202020202020202020202020202020202020202020202020202020202";
    const KEY_OLD: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    fn config(profile: &str) -> Arc<Config> {
        Arc::new(
            Config::parse(&format!(
                r#"{{"interface":"lo",
                "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}},
                                    {{"name":"other","vip":"127.0.0.1","port":8081,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}}],
                "pools":[{{"name":"web","backends":[{{"name":"b1","address":"10.0.0.1"}},{{"name":"b2","address":"10.0.0.2"}},{{"name":"b3","address":"10.0.0.3"}}]}}],
                "persistence_profiles":[{profile}]}}"#
            ))
            .expect("valid test config"),
        )
    }

    fn shared(cfg: &Arc<Config>, states: &[BackendState]) -> SharedSnapshot {
        let ids = assign_ids(cfg, &Previous::default()).unwrap();
        let mut s = Snapshot::empty(cfg.clone(), SystemTime::now());
        s.service_index = ids.services;
        s.backend_ids = ids.backends;
        s.backend_state = vec![states.to_vec()];
        s.health = vec![vec![None; states.len()]];
        Arc::new(ArcSwap::from_pointee(s))
    }

    fn set_states(snap: &SharedSnapshot, states: [BackendState; 3]) {
        let mut s = (**snap.load()).clone();
        s.backend_state = vec![states.to_vec()];
        snap.store(Arc::new(s));
    }

    const UP: [BackendState; 3] = [BackendState::Up; 3];

    fn conn(ip: &str) -> ConnInfo {
        ConnInfo { client: SocketAddr::new(ip.parse().unwrap(), 40000), local: "127.0.0.1:8080".parse().unwrap(), tls: false, alpn_h2: false }
    }

    fn request(uri: &str, cookie: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn response(set_cookie: Option<&str>) -> http::response::Parts {
        let mut b = http::Response::builder().status(200);
        if let Some(c) = set_cookie {
            b = b.header(header::SET_COOKIE, c);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// One exchange: the backend chosen, the request as forwarded, Set-Cookie values added.
    fn exchange(r: &PersistRouter, c: &ConnInfo, uri: &str, cookie: Option<&str>, backend_sets: Option<&str>) -> (SocketAddr, http::request::Parts, Vec<String>) {
        let mut req = request(uri, cookie);
        let route = r.route(&mut req, c, &[]).expect("routed");
        let mut resp = response(backend_sets);
        r.on_response(&route, c, &mut resp);
        let set: Vec<String> = resp.headers.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect();
        (route.backend, req, set)
    }

    fn srv(set: &[String]) -> String {
        let v = set.iter().find(|s| s.starts_with("SRV=")).expect("a SRV cookie was set");
        v.split(';').next().unwrap().to_string()
    }

    fn rejected(r: &PersistRouter, reason: Reject) -> u64 {
        r.stats.rejected[Reject::ALL.iter().position(|x| *x == reason).unwrap()].load(Ordering::Relaxed)
    }

    fn cookie_profile(extra: &str) -> String {
        format!(r#"{{"name":"p","type":"http-cookie","cookie_name":"SRV","keys":[{{"id":2,"secret":"{KEY_NEW}"}},{{"id":1,"secret":"{KEY_OLD}"}}]{extra}}}"#)
    }

    fn router(cfg: &Arc<Config>, snap: &SharedSnapshot, svc: usize) -> PersistRouter {
        PersistRouter::new(cfg, &cfg.services[svc], snap.clone()).expect("router")
    }

    #[test]
    fn active_cookie_is_issued_then_honoured_and_stripped() {
        let cfg = config(&cookie_profile(""));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let (first, _, set) = exchange(&r, &c, "/", None, None);
        let cookie = srv(&set);
        assert!(set[0].contains("HttpOnly") && set[0].contains("SameSite=Lax") && !set[0].contains("Secure"), "{}", set[0]);
        assert!(!cookie.contains("10.0.0."), "the cookie must not reveal the backend address");
        for i in 0..100 {
            let (b, fwd, set) = exchange(&r, &c, "/", Some(&format!("a=1; {cookie}; z=2")), None);
            assert_eq!(b, first, "request {i} left its backend");
            assert!(set.is_empty(), "no Set-Cookie while the cookie is valid");
            assert_eq!(fwd.headers.get(header::COOKIE).unwrap(), "a=1; z=2", "the persistence cookie is stripped");
        }
        assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 100);
        assert_eq!(r.stats.cookies_issued.load(Ordering::Relaxed), 1);
        // Without cookies, new clients spread over all backends (round robin).
        let seen: std::collections::HashSet<SocketAddr> = (0..9).map(|_| exchange(&r, &c, "/", None, None).0).collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn bad_cookies_count_as_absent_by_reason_and_are_reissued() {
        let cfg = config(&cookie_profile(""));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let other = router(&cfg, &snap, 1);
        let c = conn("192.0.2.1");
        let good = srv(&exchange(&r, &c, "/", None, None).2);
        let (name, value) = good.split_once('=').unwrap();
        let mut bytes = value.as_bytes().to_vec();
        bytes[40] = if bytes[40] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{name}={}", String::from_utf8(bytes).unwrap());
        assert_eq!(srv(&exchange(&r, &c, "/", Some(&tampered), None).2).len(), good.len(), "tampered: re-issued");
        assert_eq!(rejected(&r, Reject::Tampered), 1);
        // A cookie web issued, presented to the other service.
        assert!(!exchange(&other, &c, "/", Some(&good), None).2.is_empty(), "foreign: re-issued");
        assert_eq!(rejected(&other, Reject::ForeignService), 1);
        exchange(&r, &c, "/", Some("SRV=garbage"), None);
        assert_eq!(rejected(&r, Reject::Malformed), 1);
        // Expired: a cookie issued long ago with a 10-minute lifetime.
        let keys = CookieKeys::from_config(&[(2u8, KEY_NEW)]).unwrap();
        let id = backend_identity("web", "b1");
        let old = cookie::encode(&keys, "SRV", "web", &CookiePayload::issue(id, cookie::pool_id("web"), 1_000, Some(600)));
        assert!(!exchange(&r, &c, "/", Some(&format!("SRV={old}")), None).2.is_empty());
        assert_eq!(rejected(&r, Reject::Expired), 1);
    }

    #[test]
    fn rotated_keys_keep_old_cookies_valid() {
        let cfg = config(&cookie_profile(""));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let old_keys = CookieKeys::from_config(&[(1u8, KEY_OLD)]).unwrap();
        let id = backend_identity("web", "b3");
        let v = cookie::encode(&old_keys, "SRV", "web", &CookiePayload::issue(id, cookie::pool_id("web"), unix_now(), None));
        let (b, _, set) = exchange(&r, &conn("192.0.2.9"), "/", Some(&format!("SRV={v}")), None);
        assert_eq!(b, "10.0.0.3:8080".parse().unwrap());
        assert!(set.is_empty(), "an old-key cookie is still valid");
    }

    #[test]
    fn down_backend_moves_with_immediate_and_refuses_with_never() {
        for policy in ["immediate", "never"] {
            let cfg = Arc::new(Config::parse(&policy_config(policy)).expect("valid"));
            let snap = shared(&cfg, &UP);
            let r = router(&cfg, &snap, 0);
            let c = conn("192.0.2.1");
            let (first, _, set) = exchange(&r, &c, "/", None, None);
            assert!(set[0].contains("Max-Age=600"), "{}", set[0]);
            let cookie = srv(&set);
            let i = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"].iter().position(|a| a.parse::<SocketAddr>().unwrap() == first).unwrap();
            let mut states = UP;
            states[i] = BackendState::Down;
            set_states(&snap, states);
            let mut req = request("/", Some(&cookie));
            let got = r.route(&mut req, &c, &[]);
            if policy == "immediate" {
                let route = got.expect("moved");
                assert_ne!(route.backend, first);
                let mut resp = response(None);
                r.on_response(&route, &c, &mut resp);
                assert!(resp.headers.get(header::SET_COOKIE).is_some(), "the moved client gets a new cookie");
                assert_eq!(r.stats.reassigned_down.load(Ordering::Relaxed), 1);
            } else {
                assert_eq!(got.unwrap_err(), StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(r.stats.refused_down.load(Ordering::Relaxed), 1);
                set_states(&snap, UP);
                assert_eq!(exchange(&r, &c, "/", Some(&cookie), None).0, first, "back on its backend once it recovers");
            }
        }
    }

    /// One service with a 10-minute cookie and the given down policy.
    fn policy_config(policy: &str) -> String {
        format!(
            r#"{{"interface":"lo",
            "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}}],
            "pools":[{{"name":"web","backends":[{{"name":"b1","address":"10.0.0.1"}},{{"name":"b2","address":"10.0.0.2"}},{{"name":"b3","address":"10.0.0.3"}}]}}],
            "persistence_profiles":[{{"name":"p","type":"http-cookie","cookie_name":"SRV","max_lifetime_min":10,"select_new_server_when_down":"{policy}","keys":[{{"id":2,"secret":"{KEY_NEW}"}}]}}]}}"#
        )
    }

    #[test]
    fn draining_keeps_bound_clients_and_takes_no_new_ones() {
        let cfg = config(&cookie_profile(""));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let bound: Vec<(SocketAddr, String)> = (0..3).map(|_| {
            let (b, _, set) = exchange(&r, &c, "/", None, None);
            (b, srv(&set))
        }).collect();
        set_states(&snap, [BackendState::Draining, BackendState::Up, BackendState::Up]);
        let drained: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let (_, ck) = bound.iter().find(|(b, _)| *b == drained).expect("one client on b1");
        assert_eq!(exchange(&r, &c, "/", Some(ck), None).0, drained, "a bound client stays on a draining backend");
        for _ in 0..30 {
            assert_ne!(exchange(&r, &c, "/", None, None).0, drained, "no new client on a draining backend");
        }
    }

    #[test]
    fn app_cookie_is_learned_and_found_in_cookie_query_and_path() {
        let cfg = config(r#"{"name":"p","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":60}"#);
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let (b, _, _) = exchange(&r, &c, "/login", None, Some("JSESSIONID=abc123; Path=/; HttpOnly"));
        assert_eq!(r.stats.cookies_learned.load(Ordering::Relaxed), 1);
        for (uri, cookie) in [("/x", Some("JSESSIONID=abc123")), ("/x?a=1&JSESSIONID=abc123", None), ("/app;JSESSIONID=abc123/x", None)] {
            for _ in 0..10 {
                assert_eq!(exchange(&r, &conn("198.51.100.7"), uri, cookie, None).0, b, "{uri} {cookie:?}");
            }
        }
        assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 30);
    }

    #[test]
    fn source_ip_fallback_engages_when_cookies_are_refused() {
        let cfg = config(&cookie_profile(r#","fallback":{"type":"client-ip","timeout_s":60}"#));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.44");
        let (first, _, _) = exchange(&r, &c, "/", None, None);
        for _ in 0..20 {
            // The client never returns the cookie.
            assert_eq!(exchange(&r, &c, "/", None, None).0, first);
        }
        assert_eq!(r.stats.fallback_hits.load(Ordering::Relaxed), 20);
        // Another address is balanced on its own.
        let others: std::collections::HashSet<SocketAddr> = (1..=12).map(|i| exchange(&r, &conn(&format!("192.0.2.{i}")), "/", None, None).0).collect();
        assert!(others.len() > 1);
    }

    #[test]
    fn client_ip_sticks_and_a_failed_backend_is_not_retried() {
        let cfg = config(r#"{"name":"p","type":"client-ip","timeout_s":60}"#);
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("203.0.113.5");
        let (first, _, _) = exchange(&r, &c, "/", None, None);
        for _ in 0..50 {
            assert_eq!(exchange(&r, &c, "/", None, None).0, first);
        }
        let mut req = request("/", None);
        let retry = r.route(&mut req, &c, &[first]).expect("another backend");
        assert_ne!(retry.backend, first);
        set_states(&snap, [BackendState::Down; 3]);
        assert_eq!(r.route(&mut request("/", None), &conn("203.0.113.99"), &[]).unwrap_err(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn least_connections_counts_requests_until_they_finish() {
        let cfg = Arc::new(
            Config::parse(
                r#"{"interface":"lo",
                "virtual_services":[{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web"}],
                "pools":[{"name":"web","algorithm":"least-connections","backends":[{"name":"b1","address":"10.0.0.1"},{"name":"b2","address":"10.0.0.2"}]}]}"#,
            )
            .unwrap(),
        );
        let snap = shared(&cfg, &[BackendState::Up; 2]);
        let r = PersistRouter::new(&cfg, &cfg.services[0], snap).unwrap();
        let c = conn("192.0.2.1");
        // One long request holds a backend.
        let long = r.route(&mut request("/", None), &c, &[]).unwrap();
        for i in 0..10 {
            let short = r.route(&mut request("/", None), &c, &[]).unwrap();
            assert_ne!(short.backend, long.backend, "request {i} went to the busy backend");
            r.finished(&short);
        }
        r.finished(&long);
    }
}
