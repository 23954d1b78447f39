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

use arc_swap::ArcSwap;
use http::{HeaderValue, StatusCode, header};
use lb_common::{
    MAGLEV_TABLE_SIZE, NO_BACKEND, backend_identity,
    maglev::{MaglevBackend, build_table},
    prefix_mask,
};

use crate::{
    balancer::select::{self, BackendSelection},
    config::{
        AppCookieProfile, ClientIpFallback, Config, CookieProfile, DownPolicy, KeySource,
        PersistenceKind, SameSiteMode, VirtualService,
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
    ClientIp {
        table: Table<[u8; 16]>,
        v4: u8,
        v6: u8,
    },
    HttpCookie {
        profile: CookieProfile,
        keys: ArcSwap<CookieKeys>,
        fallback: Option<Fallback>,
    },
    AppCookie {
        profile: AppCookieProfile,
        table: Table<u128>,
        fallback: Option<Fallback>,
    },
    KeyHash {
        key: KeySource,
        table: Option<Table<u128>>,
        fallback: Option<Fallback>,
        maglev: ArcSwap<MaglevCache>,
    },
    CustomHeader {
        header: String,
    },
}

/// The pool's Maglev table over its up backends (entries are backend indexes), rebuilt when
/// the published snapshot changes.
#[derive(Default)]
struct MaglevCache {
    generation: Option<u64>,
    table: Vec<u32>,
}

/// The request's key for a key-based method; `None` when the request has none.
fn request_key(key: &KeySource, req: &http::request::Parts, conn: &ConnInfo) -> Option<Vec<u8>> {
    let header = |name: &str| req.headers.get(name).map(|v| v.as_bytes().to_vec());
    let query_item = |name: &str| {
        req.uri.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| v.as_bytes().to_vec())
        })
    };
    let ip_bytes = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    match key {
        KeySource::AllCookies => {
            let values = req.headers.get_all(header::COOKIE);
            let mut k = Vec::new();
            for (_, v) in cookie::cookies(values.iter().map(|v| v.as_bytes())) {
                k.extend_from_slice(v.as_bytes());
                k.push(0);
            }
            (!k.is_empty()).then_some(k)
        }
        KeySource::SuperHttp { with_source_ip } => {
            let ua = header("user-agent")?;
            // Kemp: with "MSRPC" in the User-Agent the key is the Authorization value, or
            // blank (zero length) when there is none.
            let mut k = if ua.windows(5).any(|w| w == b"MSRPC") {
                header("authorization").unwrap_or_default()
            } else {
                ua
            };
            if *with_source_ip {
                k.push(0);
                k.extend(ip_bytes(conn.client.ip()));
            }
            Some(k)
        }
        KeySource::Url => req
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().as_bytes().to_vec()),
        KeySource::Host => {
            header("host").or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes().to_vec()))
        }
        KeySource::QueryItem(name) => query_item(name),
        KeySource::Header(name) => header(name),
        KeySource::SourceIp => Some(ip_bytes(conn.client.ip())),
        KeySource::SourceIpPort => {
            let mut k = ip_bytes(conn.client.ip());
            k.extend_from_slice(&conn.client.port().to_be_bytes());
            Some(k)
        }
    }
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

/// The persistence cookie `route` removed from the request, kept in its extensions so a
/// retry of the same request still sees it.
#[derive(Clone)]
struct StrippedCookie(String);

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

fn cookie_keys(service: &str, c: &CookieProfile) -> Result<CookieKeys, cookie::KeyError> {
    if c.keys.is_empty() {
        log::warn!(
            "profile of {service}: no cookie keys configured, using a random one: cookies will not survive a restart and other instances will not accept them"
        );
        Ok(CookieKeys::generate())
    } else {
        CookieKeys::from_config(&c.keys)
    }
}

/// What identifies a router's persistence state: everything of the profile but the cookie
/// keys (which rotate in place), and the pool. A reload that keeps it keeps the router and
/// its tables.
pub fn router_spec(cfg: &Config, svc: &VirtualService) -> String {
    let profile = cfg.profile(svc).map(|p| {
        let mut p = p.clone();
        if let PersistenceKind::HttpCookie(c) = &mut p.kind {
            c.keys.clear();
        }
        p
    });
    format!(
        "{profile:?} {} {:?}",
        cfg.pools[svc.pool].name, cfg.pools[svc.pool].algorithm
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PersistRouter {
    pub fn new(
        cfg: &Config,
        svc: &VirtualService,
        snapshot: SharedSnapshot,
    ) -> Result<Self, cookie::KeyError> {
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
                keys: ArcSwap::from_pointee(cookie_keys(&svc.name, c)?),
                fallback: c.fallback.as_ref().map(Fallback::new),
                profile: c.clone(),
            },
            Some((PersistenceKind::AppCookie(a), p)) => Method::AppCookie {
                table: Table::new(TABLE_CAPACITY, Duration::from_secs(p.timeout_s as u64)),
                fallback: a.fallback.as_ref().map(Fallback::new),
                profile: a.clone(),
            },
            Some((
                PersistenceKind::KeyHash {
                    key,
                    sticky,
                    fallback,
                },
                p,
            )) => Method::KeyHash {
                key: key.clone(),
                table: sticky
                    .then(|| Table::new(TABLE_CAPACITY, Duration::from_secs(p.timeout_s as u64))),
                fallback: fallback.as_ref().map(Fallback::new),
                maglev: ArcSwap::from_pointee(MaglevCache::default()),
            },
            Some((PersistenceKind::CustomHeader { header }, _)) => Method::CustomHeader {
                header: header.clone(),
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

    /// Take the new config's cookie keys (a reload that rotates them keeps this router).
    pub fn update_keys(&self, cfg: &Config, svc: &VirtualService) -> Result<(), cookie::KeyError> {
        if let (Method::HttpCookie { keys, .. }, Some(PersistenceKind::HttpCookie(c))) =
            (&self.method, cfg.profile(svc).map(|p| &p.kind))
            && !c.keys.is_empty()
        {
            keys.store(Arc::new(cookie_keys(&svc.name, c)?));
        }
        Ok(())
    }

    fn fallback(&self) -> Option<&Fallback> {
        match &self.method {
            Method::HttpCookie { fallback, .. }
            | Method::AppCookie { fallback, .. }
            | Method::KeyHash { fallback, .. } => fallback.as_ref(),
            _ => None,
        }
    }

    /// The Maglev choice for `key` among the pool's up backends (not yet tried): the same
    /// builder and hash as the kernel tables, so every instance with this pool agrees.
    fn maglev_pick(
        &self,
        cache: &ArcSwap<MaglevCache>,
        snap: &crate::state::Snapshot,
        pool_index: usize,
        key: &[u8],
        tried: &[SocketAddr],
        addr_of: &dyn Fn(usize) -> SocketAddr,
    ) -> Option<usize> {
        let pool = &snap.config.pools[pool_index];
        let states = snap.backend_state.get(pool_index)?;
        let current = cache.load_full();
        let table = if current.generation == Some(snap.generation) {
            current
        } else {
            let members: Vec<MaglevBackend<'_>> = pool
                .backends
                .iter()
                .enumerate()
                .filter(|(i, _)| states.get(*i) == Some(&BackendState::Up))
                .map(|(i, b)| MaglevBackend {
                    id: i as u32,
                    name: &b.name,
                    weight: b.weight,
                })
                .collect();
            let fresh = Arc::new(MaglevCache {
                generation: Some(snap.generation),
                table: build_table(&members, MAGLEV_TABLE_SIZE),
            });
            cache.store(fresh.clone());
            fresh
        };
        let h = lb_common::hash::hash_bytes(key, lb_common::hash::FLOW_SEED);
        let i = *table.table.get((h % MAGLEV_TABLE_SIZE) as usize)?;
        (i != NO_BACKEND && !tried.contains(&addr_of(i as usize))).then_some(i as usize)
    }

    /// App-cookie key: the cookie, else a query parameter of the same name, else a
    /// `;name=value` path parameter (Avi: "look for a URI query of the same name").
    /// Public for the fuzz target.
    pub fn app_cookie_value<'a>(req: &'a http::request::Parts, name: &str) -> Option<&'a str> {
        // An empty value is no session (as for the query and path parameters below).
        if let Some(v) = cookie::find(
            req.headers
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes()),
            name,
        )
        .filter(|v| !v.is_empty())
        {
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
        let Some(si) = snap
            .config
            .services
            .iter()
            .position(|s| s.name == self.service)
        else {
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        };
        let svc = &snap.config.services[si];
        let pool = &snap.config.pools[svc.pool];
        let states = snap
            .backend_state
            .get(svc.pool)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let addr_of = |i: usize| {
            SocketAddr::new(
                pool.backends[i].address,
                pool.backends[i].port.unwrap_or(svc.port),
            )
        };
        let by_identity = |id: u32| {
            pool.backends
                .iter()
                .position(|b| backend_identity(&pool.name, &b.name) == id)
        };
        let now = Instant::now();

        // What persistence says, if anything: (backend index, source).
        let mut bound: Option<usize> = None;
        let mut issue_cookie = false;
        // Key-based methods: the request's key, when it has one.
        let mut key_material: Option<Vec<u8>> = None;
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
                let keys = keys.load();
                let values = req.headers.get_all(header::COOKIE);
                // On a retry the cookie was stripped by the first attempt: use what it saw.
                let presented =
                    cookie::find(values.iter().map(|v| v.as_bytes()), &profile.cookie_name)
                        .map(str::to_owned)
                        .or_else(|| req.extensions.get::<StrippedCookie>().map(|s| s.0.clone()));
                if let Some(v) = &presented {
                    match cookie::decode(&keys, &profile.cookie_name, &svc.name, v, unix_now()) {
                        Ok(p) if p.pool == self.pool_id => bound = by_identity(p.backend),
                        Ok(_) => self.stats.reject(Reject::ForeignService),
                        Err(r) => self.stats.reject(r),
                    }
                }
                issue_cookie = bound.is_none() || profile.always_send;
                // The persistence cookie is tether's: the backend never sees it.
                let stripped =
                    cookie::strip(values.iter().map(|v| v.as_bytes()), &profile.cookie_name);
                req.headers.remove(header::COOKIE);
                if let Some(rest) = stripped
                    && let Ok(v) = HeaderValue::from_bytes(&rest)
                {
                    req.headers.insert(header::COOKIE, v);
                }
                if let Some(v) = presented {
                    req.extensions.insert(StrippedCookie(v));
                }
            }
            Method::KeyHash { key, table, .. } => {
                key_material = request_key(key, req, conn);
                if let (Some(t), Some(k)) = (table, &key_material) {
                    match t.get(&digest(k), now) {
                        Ok(id) => bound = by_identity(id),
                        Err(true) => {
                            self.stats.expired.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(false) => {}
                    }
                }
            }
            Method::CustomHeader { header } => {
                if let Some(v) = req.headers.get(header.as_str()) {
                    bound = pool.backends.iter().position(|b| {
                        b.header_value.as_deref().map(str::as_bytes) == Some(v.as_bytes())
                    });
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
        // "Absent" for the source-IP fallback: the request carries no key of the method's.
        let cookie_absent = match &self.method {
            Method::KeyHash { .. } => key_material.is_none(),
            _ => bound.is_none(),
        };
        // The fallback decides only for requests without the method's key: a key not yet
        // in the table is balanced by its Maglev entry, as on every instance.
        if bound.is_none()
            && cookie_absent
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
            } else if self.down_policy == DownPolicy::Never {
                // Down, or refusing connections: the client waits for its server.
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
                    .filter(|(i, _)| {
                        states.get(*i) == Some(&BackendState::Up) && !tried.contains(&addr_of(*i))
                    })
                    .map(|(i, b)| (i, b.weight))
                    .collect();
                let hint = match &self.method {
                    Method::HttpCookie { profile, .. } if profile.add_port => {
                        conn.client.port() as u64
                    }
                    _ => 0,
                };
                let by_key = match (&self.method, &key_material) {
                    (Method::KeyHash { maglev, .. }, Some(k)) => {
                        self.maglev_pick(maglev, &snap, svc.pool, k, tried, &addr_of)
                    }
                    _ => None,
                };
                let i = match by_key {
                    Some(i) => i,
                    None => self
                        .selection
                        .select(&candidates, hint)
                        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?,
                };
                self.stats.new_assignments.fetch_add(1, Ordering::Relaxed);
                i
            }
        };
        let identity = backend_identity(&pool.name, &pool.backends[index].name);
        // Record the binding where this method keeps one.
        match &self.method {
            Method::ClientIp { table, v4, v6 } => {
                table.insert(client_key(conn.client.ip(), *v4, *v6), identity, now)
            }
            Method::KeyHash { table: Some(t), .. } if key_material.is_some() => {
                t.insert(
                    digest(key_material.as_deref().unwrap_or_default()),
                    identity,
                    now,
                );
            }
            Method::KeyHash { .. } if cookie_absent => {
                if let Some(f) = self.fallback() {
                    f.table
                        .insert(client_key(conn.client.ip(), f.v4, f.v6), identity, now);
                }
            }
            Method::HttpCookie { .. } | Method::AppCookie { .. } if cookie_absent => {
                if let Some(f) = self.fallback() {
                    f.table
                        .insert(client_key(conn.client.ip(), f.v4, f.v6), identity, now);
                }
            }
            _ => {}
        }
        self.selection.started(index);
        Ok(Route {
            backend: addr_of(index),
            token: index as u64,
            tag: Some(Arc::new(Decision {
                identity,
                issue_cookie,
                index,
            })),
        })
    }

    fn on_response(&self, route: &Route, conn: &ConnInfo, resp: &mut http::response::Parts) {
        let Some(d) = route
            .tag
            .as_ref()
            .and_then(|t| t.downcast_ref::<Decision>())
        else {
            return;
        };
        match &self.method {
            Method::HttpCookie { profile, keys, .. } if d.issue_cookie => {
                let keys = keys.load();
                let now = unix_now();
                let lifetime = profile.max_lifetime.map(|l| l.as_secs());
                let payload = CookiePayload::issue(d.identity, self.pool_id, now, lifetime);
                let value = cookie::encode(&keys, &profile.cookie_name, &self.service, &payload);
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
        if let Some(d) = route
            .tag
            .as_ref()
            .and_then(|t| t.downcast_ref::<Decision>())
        {
            self.selection.ended(d.index);
        }
    }

    fn connection_opened(&self, conn: &ConnInfo) {
        if let Method::ClientIp { table, v4, v6 } = &self.method
            && table.opened(&client_key(conn.client.ip(), *v4, *v6), Instant::now())
        {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
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

    fn set_states(snap: &SharedSnapshot, states: &[BackendState]) {
        let mut s = (**snap.load()).clone();
        s.backend_state = vec![states.to_vec()];
        s.generation += 1;
        snap.store(Arc::new(s));
    }

    const UP: [BackendState; 3] = [BackendState::Up; 3];

    fn conn(ip: &str) -> ConnInfo {
        ConnInfo {
            client: SocketAddr::new(ip.parse().unwrap(), 40000),
            local: "127.0.0.1:8080".parse().unwrap(),
            tls: false,
            alpn_h2: false,
        }
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
    fn exchange(
        r: &PersistRouter,
        c: &ConnInfo,
        uri: &str,
        cookie: Option<&str>,
        backend_sets: Option<&str>,
    ) -> (SocketAddr, http::request::Parts, Vec<String>) {
        let mut req = request(uri, cookie);
        let route = r.route(&mut req, c, &[]).expect("routed");
        let mut resp = response(backend_sets);
        r.on_response(&route, c, &mut resp);
        let set: Vec<String> = resp
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        (route.backend, req, set)
    }

    fn srv(set: &[String]) -> String {
        let v = set
            .iter()
            .find(|s| s.starts_with("SRV="))
            .expect("a SRV cookie was set");
        v.split(';').next().unwrap().to_string()
    }

    fn rejected(r: &PersistRouter, reason: Reject) -> u64 {
        r.stats.rejected[Reject::ALL.iter().position(|x| *x == reason).unwrap()]
            .load(Ordering::Relaxed)
    }

    fn cookie_profile(extra: &str) -> String {
        format!(
            r#"{{"name":"p","type":"http-cookie","cookie_name":"SRV","keys":[{{"id":2,"secret":"{KEY_NEW}"}},{{"id":1,"secret":"{KEY_OLD}"}}]{extra}}}"#
        )
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
        assert!(
            set[0].contains("HttpOnly")
                && set[0].contains("SameSite=Lax")
                && !set[0].contains("Secure"),
            "{}",
            set[0]
        );
        assert!(
            !cookie.contains("10.0.0."),
            "the cookie must not reveal the backend address"
        );
        for i in 0..100 {
            let (b, fwd, set) = exchange(&r, &c, "/", Some(&format!("a=1; {cookie}; z=2")), None);
            assert_eq!(b, first, "request {i} left its backend");
            assert!(set.is_empty(), "no Set-Cookie while the cookie is valid");
            assert_eq!(
                fwd.headers.get(header::COOKIE).unwrap(),
                "a=1; z=2",
                "the persistence cookie is stripped"
            );
        }
        assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 100);
        assert_eq!(r.stats.cookies_issued.load(Ordering::Relaxed), 1);
        // Without cookies, new clients spread over all backends (round robin).
        let seen: std::collections::HashSet<SocketAddr> = (0..9)
            .map(|_| exchange(&r, &c, "/", None, None).0)
            .collect();
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
        assert_eq!(
            srv(&exchange(&r, &c, "/", Some(&tampered), None).2).len(),
            good.len(),
            "tampered: re-issued"
        );
        assert_eq!(rejected(&r, Reject::Tampered), 1);
        // A cookie web issued, presented to the other service.
        assert!(
            !exchange(&other, &c, "/", Some(&good), None).2.is_empty(),
            "foreign: re-issued"
        );
        assert_eq!(rejected(&other, Reject::ForeignService), 1);
        exchange(&r, &c, "/", Some("SRV=garbage"), None);
        assert_eq!(rejected(&r, Reject::Malformed), 1);
        // Expired: a cookie issued long ago with a 10-minute lifetime.
        let keys = CookieKeys::from_config(&[(2u8, KEY_NEW)]).unwrap();
        let id = backend_identity("web", "b1");
        let old = cookie::encode(
            &keys,
            "SRV",
            "web",
            &CookiePayload::issue(id, cookie::pool_id("web"), 1_000, Some(600)),
        );
        assert!(
            !exchange(&r, &c, "/", Some(&format!("SRV={old}")), None)
                .2
                .is_empty()
        );
        assert_eq!(rejected(&r, Reject::Expired), 1);
    }

    #[test]
    fn rotated_keys_keep_old_cookies_valid() {
        let cfg = config(&cookie_profile(""));
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let old_keys = CookieKeys::from_config(&[(1u8, KEY_OLD)]).unwrap();
        let id = backend_identity("web", "b3");
        let v = cookie::encode(
            &old_keys,
            "SRV",
            "web",
            &CookiePayload::issue(id, cookie::pool_id("web"), unix_now(), None),
        );
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
            let i = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
                .iter()
                .position(|a| a.parse::<SocketAddr>().unwrap() == first)
                .unwrap();
            let mut states = UP;
            states[i] = BackendState::Down;
            set_states(&snap, &states);
            let mut req = request("/", Some(&cookie));
            let got = r.route(&mut req, &c, &[]);
            if policy == "immediate" {
                let route = got.expect("moved");
                assert_ne!(route.backend, first);
                let mut resp = response(None);
                r.on_response(&route, &c, &mut resp);
                assert!(
                    resp.headers.get(header::SET_COOKIE).is_some(),
                    "the moved client gets a new cookie"
                );
                assert_eq!(r.stats.reassigned_down.load(Ordering::Relaxed), 1);
            } else {
                assert_eq!(got.unwrap_err(), StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(r.stats.refused_down.load(Ordering::Relaxed), 1);
                set_states(&snap, &UP);
                assert_eq!(
                    exchange(&r, &c, "/", Some(&cookie), None).0,
                    first,
                    "back on its backend once it recovers"
                );
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
        let bound: Vec<(SocketAddr, String)> = (0..3)
            .map(|_| {
                let (b, _, set) = exchange(&r, &c, "/", None, None);
                (b, srv(&set))
            })
            .collect();
        set_states(
            &snap,
            &[BackendState::Draining, BackendState::Up, BackendState::Up],
        );
        let drained: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let (_, ck) = bound
            .iter()
            .find(|(b, _)| *b == drained)
            .expect("one client on b1");
        assert_eq!(
            exchange(&r, &c, "/", Some(ck), None).0,
            drained,
            "a bound client stays on a draining backend"
        );
        for _ in 0..30 {
            assert_ne!(
                exchange(&r, &c, "/", None, None).0,
                drained,
                "no new client on a draining backend"
            );
        }
    }

    #[test]
    fn app_cookie_is_learned_and_found_in_cookie_query_and_path() {
        let cfg =
            config(r#"{"name":"p","type":"app-cookie","cookie_name":"JSESSIONID","timeout_s":60}"#);
        let snap = shared(&cfg, &UP);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let (b, _, _) = exchange(
            &r,
            &c,
            "/login",
            None,
            Some("JSESSIONID=abc123; Path=/; HttpOnly"),
        );
        assert_eq!(r.stats.cookies_learned.load(Ordering::Relaxed), 1);
        for (uri, cookie) in [
            ("/x", Some("JSESSIONID=abc123")),
            ("/x?a=1&JSESSIONID=abc123", None),
            ("/app;JSESSIONID=abc123/x", None),
        ] {
            for _ in 0..10 {
                assert_eq!(
                    exchange(&r, &conn("198.51.100.7"), uri, cookie, None).0,
                    b,
                    "{uri} {cookie:?}"
                );
            }
        }
        assert_eq!(r.stats.persist_hits.load(Ordering::Relaxed), 30);
    }

    #[test]
    fn source_ip_fallback_engages_when_cookies_are_refused() {
        let cfg = config(&cookie_profile(
            r#","fallback":{"type":"client-ip","timeout_s":60}"#,
        ));
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
        let others: std::collections::HashSet<SocketAddr> = (1..=12)
            .map(|i| exchange(&r, &conn(&format!("192.0.2.{i}")), "/", None, None).0)
            .collect();
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
        set_states(&snap, &[BackendState::Down; 3]);
        assert_eq!(
            r.route(&mut request("/", None), &conn("203.0.113.99"), &[])
                .unwrap_err(),
            StatusCode::SERVICE_UNAVAILABLE
        );
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
            assert_ne!(
                short.backend, long.backend,
                "request {i} went to the busy backend"
            );
            r.finished(&short);
        }
        r.finished(&long);
    }

    /// A pool of `n` backends behind one l7 service with `profile` (named "p").
    fn key_config(n: usize, profile: &str) -> Arc<Config> {
        let backends: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"name":"b{i}","address":"10.0.1.{}","header_value":"tenant-{i}"}}"#,
                    i + 1
                )
            })
            .collect();
        Arc::new(
            Config::parse(&format!(
                r#"{{"interface":"lo",
                "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":8080,"protocol":"tcp","mode":"l7","pool":"web","persistence":"p"}}],
                "pools":[{{"name":"web","backends":[{}]}}],
                "persistence_profiles":[{profile}]}}"#,
                backends.join(",")
            ))
            .unwrap_or_else(|e| panic!("test config: {e}")),
        )
    }

    fn req_with(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn pick(r: &PersistRouter, c: &ConnInfo, uri: &str, headers: &[(&str, &str)]) -> SocketAddr {
        let mut req = req_with(uri, headers);
        let route = r.route(&mut req, c, &[]).expect("routed");
        r.finished(&route);
        route.backend
    }

    /// (profile, request for key i) for every key-based method.
    /// Builds the request (URI, headers) that carries key number `i`.
    type KeyedRequest = Box<dyn Fn(usize) -> (String, Vec<(String, String)>)>;

    fn key_methods() -> Vec<(&'static str, KeyedRequest)> {
        vec![
            (
                r#"{"name":"p","type":"all-cookies","timeout_s":60}"#,
                Box::new(|i| ("/".into(), vec![("cookie".into(), format!("a={i}; b=x"))])),
            ),
            (
                r#"{"name":"p","type":"super-http","timeout_s":60}"#,
                Box::new(|i| {
                    (
                        "/".into(),
                        vec![("user-agent".into(), format!("Browser/{i}"))],
                    )
                }),
            ),
            (
                r#"{"name":"p","type":"url-hash","timeout_s":60}"#,
                Box::new(|i| (format!("/page/{i}?x=1"), vec![])),
            ),
            (
                r#"{"name":"p","type":"host-header","timeout_s":60}"#,
                Box::new(|i| {
                    (
                        "/".into(),
                        vec![("host".into(), format!("site{i}.example"))],
                    )
                }),
            ),
            (
                r#"{"name":"p","type":"query-item","item":"sid","timeout_s":60}"#,
                Box::new(|i| (format!("/x?a=1&sid={i}"), vec![])),
            ),
            (
                r#"{"name":"p","type":"header","item":"X-Session","timeout_s":60}"#,
                Box::new(|i| ("/".into(), vec![("x-session".into(), format!("s{i}"))])),
            ),
            (
                r#"{"name":"p","type":"consistent-hash","hash_key":"url"}"#,
                Box::new(|i| (format!("/c/{i}"), vec![])),
            ),
        ]
    }

    fn headers_of(h: &[(String, String)]) -> Vec<(&str, &str)> {
        h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn every_key_method_sticks_per_key_and_spreads_keys() {
        for (profile, make) in key_methods() {
            let cfg = key_config(3, profile);
            let snap = shared(&cfg, &[BackendState::Up; 3]);
            let r = router(&cfg, &snap, 0);
            let (uri, h) = make(7);
            let first = pick(&r, &conn("192.0.2.1"), &uri, &headers_of(&h));
            for i in 0..100 {
                // Other connections and addresses: the key alone decides.
                let c = conn(&format!("198.51.100.{}", i % 200 + 1));
                assert_eq!(
                    pick(&r, &c, &uri, &headers_of(&h)),
                    first,
                    "{profile}: request {i}"
                );
            }
            let spread: std::collections::HashSet<SocketAddr> = (0..60)
                .map(|k| {
                    let (uri, h) = make(1000 + k);
                    pick(&r, &conn("192.0.2.1"), &uri, &headers_of(&h))
                })
                .collect();
            assert_eq!(
                spread.len(),
                3,
                "{profile}: 60 keys should reach all 3 backends"
            );
        }
    }

    #[test]
    fn super_http_msrpc_rule_in_both_branches() {
        let cfg = key_config(5, r#"{"name":"p","type":"super-http","timeout_s":60}"#);
        let snap = shared(&cfg, &[BackendState::Up; 5]);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        // MSRPC with Authorization: the Authorization value is the key, whatever the UA says.
        let by_auth: std::collections::HashSet<SocketAddr> = (0..20)
            .map(|i| {
                pick(
                    &r,
                    &c,
                    "/",
                    &[
                        ("user-agent", &format!("MSRPC client {i}")),
                        ("authorization", "Basic dXNlcjE="),
                    ],
                )
            })
            .collect();
        assert_eq!(by_auth.len(), 1, "same Authorization, one backend");
        let auths: std::collections::HashSet<SocketAddr> = (0..40)
            .map(|i| {
                pick(
                    &r,
                    &c,
                    "/",
                    &[
                        ("user-agent", "MSRPC"),
                        ("authorization", &format!("Basic {i}")),
                    ],
                )
            })
            .collect();
        assert!(auths.len() > 1, "different Authorization values spread");
        // MSRPC without Authorization: a blank key, so all such clients share one backend.
        let blank: std::collections::HashSet<SocketAddr> = (0..20)
            .map(|i| {
                pick(
                    &r,
                    &conn(&format!("198.51.100.{}", i + 1)),
                    "/",
                    &[("user-agent", &format!("x MSRPC {i}"))],
                )
            })
            .collect();
        assert_eq!(blank.len(), 1);
        // Without MSRPC the Authorization header is ignored: the UA is the key.
        let ua: std::collections::HashSet<SocketAddr> = (0..20)
            .map(|i| {
                pick(
                    &r,
                    &c,
                    "/",
                    &[
                        ("user-agent", "Mozilla/5.0"),
                        ("authorization", &format!("{i}")),
                    ],
                )
            })
            .collect();
        assert_eq!(ua.len(), 1);
        // "Super HTTP and source IP": the same UA from different addresses spreads.
        let cfg = key_config(
            5,
            r#"{"name":"p","type":"super-http","with_source_ip":true,"timeout_s":60}"#,
        );
        let snap = shared(&cfg, &[BackendState::Up; 5]);
        let r = router(&cfg, &snap, 0);
        let per_ip: std::collections::HashSet<SocketAddr> = (0..40)
            .map(|i| {
                pick(
                    &r,
                    &conn(&format!("198.51.100.{}", i + 1)),
                    "/",
                    &[("user-agent", "Mozilla/5.0")],
                )
            })
            .collect();
        assert!(per_ip.len() > 1);
        assert_eq!(
            pick(
                &r,
                &conn("198.51.100.9"),
                "/",
                &[("user-agent", "Mozilla/5.0")]
            ),
            pick(
                &r,
                &conn("198.51.100.9"),
                "/",
                &[("user-agent", "Mozilla/5.0")]
            )
        );
    }

    #[test]
    fn missing_key_falls_back_to_the_pool_or_the_source_address() {
        let cfg = key_config(
            3,
            r#"{"name":"p","type":"query-item","item":"sid","timeout_s":60}"#,
        );
        let snap = shared(&cfg, &[BackendState::Up; 3]);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let no_key: std::collections::HashSet<SocketAddr> =
            (0..9).map(|_| pick(&r, &c, "/x?other=1", &[])).collect();
        assert_eq!(no_key.len(), 3, "without the item: round robin");
        let cfg = key_config(
            3,
            r#"{"name":"p","type":"all-cookies","timeout_s":60,"fallback":{"type":"client-ip","timeout_s":60}}"#,
        );
        let snap = shared(&cfg, &[BackendState::Up; 3]);
        let r = router(&cfg, &snap, 0);
        let first = pick(&r, &c, "/", &[]);
        for _ in 0..20 {
            assert_eq!(
                pick(&r, &c, "/", &[]),
                first,
                "no cookies: the source address decides"
            );
        }
        assert_eq!(r.stats.fallback_hits.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn two_instances_agree_on_every_key() {
        let cfg = key_config(
            7,
            r#"{"name":"p","type":"header","item":"X-User","timeout_s":60}"#,
        );
        let a = router(&cfg, &shared(&cfg, &[BackendState::Up; 7]), 0);
        let b = router(&cfg, &shared(&cfg, &[BackendState::Up; 7]), 0);
        for k in 0..300 {
            let v = format!("user-{k}");
            assert_eq!(
                pick(&a, &conn("192.0.2.1"), "/", &[("x-user", &v)]),
                pick(&b, &conn("203.0.113.9"), "/", &[("x-user", &v)]),
                "key {v}"
            );
        }
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth_and_nothing_bound_elsewhere() {
        for profile in [
            r#"{"name":"p","type":"consistent-hash","hash_key":"url"}"#,
            r#"{"name":"p","type":"url-hash","timeout_s":600}"#,
        ] {
            let cfg = key_config(10, profile);
            let snap = shared(&cfg, &[BackendState::Up; 10]);
            let r = router(&cfg, &snap, 0);
            let c = conn("192.0.2.1");
            let keys = 2000;
            let before: Vec<SocketAddr> = (0..keys)
                .map(|k| pick(&r, &c, &format!("/k/{k}"), &[]))
                .collect();
            let victim: SocketAddr = "10.0.1.4:8080".parse().unwrap();
            let mut st = [BackendState::Up; 10];
            st[3] = BackendState::Down;
            set_states(&snap, &st);
            let after: Vec<SocketAddr> = (0..keys)
                .map(|k| pick(&r, &c, &format!("/k/{k}"), &[]))
                .collect();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let on_victim = before.iter().filter(|b| **b == victim).count();
            let extra = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b != a && **b != victim)
                .count();
            if profile.contains("consistent-hash") {
                // Maglev alone: besides the victim's keys, a small disruption (< 2% of keys).
                assert!(
                    extra * 50 < keys,
                    "{profile}: {extra} keys on surviving backends moved"
                );
            } else {
                // With the table on top, a key bound to a surviving backend never moves.
                assert_eq!(extra, 0, "{profile}: a key on a surviving backend moved");
                assert_eq!(
                    moved, on_victim,
                    "{profile}: exactly the victim's keys move"
                );
            }
            let pct = moved as f64 * 100.0 / keys as f64;
            assert!((5.0..15.0).contains(&pct), "{profile}: {pct:.1}% moved");
            assert!(after.iter().all(|a| *a != victim));
        }
    }

    #[test]
    fn sticky_entries_survive_a_backend_set_change_until_they_expire() {
        let cfg = key_config(
            3,
            r#"{"name":"p","type":"header","item":"X-User","timeout_s":1}"#,
        );
        let snap = shared(&cfg, &[BackendState::Up; 3]);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        let first = pick(&r, &c, "/", &[("x-user", "alice")]);
        let i = (first
            .ip()
            .to_string()
            .rsplit('.')
            .next()
            .unwrap()
            .parse::<usize>()
            .unwrap())
            - 1;
        let mut st = [BackendState::Up; 3];
        st[i] = BackendState::Draining;
        set_states(&snap, &st);
        assert_eq!(
            pick(&r, &c, "/", &[("x-user", "alice")]),
            first,
            "a live key keeps its draining backend"
        );
        std::thread::sleep(Duration::from_millis(1300));
        assert_ne!(
            pick(&r, &c, "/", &[("x-user", "alice")]),
            first,
            "after the timeout the key is balanced anew"
        );
        assert_eq!(r.stats.expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn custom_header_maps_to_the_backend_with_that_value() {
        let cfg = key_config(
            4,
            r#"{"name":"p","type":"custom-header","item":"X-Tenant"}"#,
        );
        let snap = shared(&cfg, &[BackendState::Up; 4]);
        let r = router(&cfg, &snap, 0);
        let c = conn("192.0.2.1");
        for _ in 0..100 {
            assert_eq!(
                pick(&r, &c, "/", &[("x-tenant", "tenant-2")]),
                "10.0.1.3:8080".parse().unwrap()
            );
        }
        let others: std::collections::HashSet<SocketAddr> = (0..8)
            .map(|_| pick(&r, &c, "/", &[("x-tenant", "nobody")]))
            .collect();
        assert_eq!(others.len(), 4, "unmatched values are balanced normally");
        let huge = "v".repeat(100_000);
        pick(&r, &c, "/", &[("x-tenant", &huge)]);
    }

    #[test]
    fn a_retry_after_a_connect_failure_still_sees_the_stripped_cookie() {
        for policy in ["immediate", "never"] {
            let cfg = Arc::new(Config::parse(&policy_config(policy)).expect("valid"));
            let snap = shared(&cfg, &UP);
            let r = router(&cfg, &snap, 0);
            let c = conn("192.0.2.1");
            let (first, _, set) = exchange(&r, &c, "/", None, None);
            let cookie = srv(&set);
            // The proxy's first attempt strips the cookie, then the backend refuses the
            // connection and the same request is routed again with `tried`.
            let mut req = request("/", Some(&format!("{cookie}; other=1")));
            let a = r.route(&mut req, &c, &[]).expect("first attempt");
            assert_eq!(a.backend, first);
            assert_eq!(req.headers.get(header::COOKIE).unwrap(), "other=1");
            r.finished(&a);
            let retry = r.route(&mut req, &c, &[first]);
            if policy == "never" {
                assert_eq!(
                    retry.unwrap_err(),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "never: the client waits for its server"
                );
                assert_eq!(r.stats.refused_down.load(Ordering::Relaxed), 1);
            } else {
                let b = retry.expect("moved");
                assert_ne!(b.backend, first);
                assert_eq!(
                    r.stats.reassigned_down.load(Ordering::Relaxed),
                    1,
                    "counted as a move, not a new client"
                );
                assert_eq!(
                    r.stats.new_assignments.load(Ordering::Relaxed),
                    2,
                    "the first client plus this move"
                );
                let mut resp = response(None);
                r.on_response(&b, &c, &mut resp);
                assert!(
                    resp.headers.get(header::SET_COOKIE).is_some(),
                    "the moved client gets a cookie for its new server"
                );
            }
        }
    }
}
