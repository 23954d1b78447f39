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
                match cookie::find(values.iter().map(|v| v.as_bytes()), &profile.cookie_name) {
                    Some(v) => match cookie::decode(keys, &profile.cookie_name, &svc.name, v, unix_now()) {
                        Ok(p) if p.pool == self.pool_id => bound = by_identity(p.backend),
                        Ok(_) => self.stats.reject(Reject::ForeignService),
                        Err(r) => self.stats.reject(r),
                    },
                    None => {}
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
        self.selection.ended(d.index);
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
