//! The L7 persistence engine: one per L7 virtual service, with the method its profile names
//! (`methods`). The engine keeps what every method shares:
//! - the backend states of the published snapshot, read lock-free, and per snapshot
//!   generation the service's position, the backends by identity and the Maglev table;
//! - the down policy ("select new server when down": move the client, or refuse with 503);
//! - the "... or source IP" fallback table for inputs without the method's key;
//! - the choice for new clients: the key's Maglev entry for keyed methods, else the pool's
//!   algorithm (round robin, least connections);
//! - the counters ([`RouterStats`]).
//!
//! Inputs are HTTP request heads, TLS ClientHellos or SIP messages ([`input::Input`]). The
//! proxy's [`Router`] is the HTTP adapter over [`Engine::decide`].
//!
//! Backends are named by their stable identity (pool and name), so a reload that keeps a
//! backend keeps its clients.

pub mod input;
mod inspect;
pub mod methods;
pub mod mirrored;
pub mod quota;
pub mod saved;
pub mod site;
pub mod table;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_session_tests;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, OnceLock, atomic::AtomicU64},
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use http::StatusCode;
use lb_common::{
    MAGLEV_TABLE_SIZE, NO_BACKEND, backend_identity,
    maglev::{MaglevBackend, build_table},
};

use crate::{
    balancer::{
        masked_addr,
        select::{self, BackendSelection},
    },
    config::{Algorithm, ClientIpFallback, Config, DownPolicy, PersistenceProfile, VirtualService},
    cookie::{self, KeyError},
    proxy::{ConnInfo, Resume, Route, Routed, Router, TlsSession, Wait},
    state::{BackendL7Stats, BackendState, RouterStats, SharedSnapshot, Snapshot},
    tlswire::ClientHello,
};
use input::Input;
use methods::{Binding, Context, Decision, Key, Method, Reply};
use quota::SourceQuota;
use table::Table;

/// Why an input gets no backend (the HTTP adapter answers 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The service is not in the published config (being removed).
    NoService,
    /// The client's backend is down and the policy is `never`: it waits for its server.
    BackendDown,
    /// No backend can take a new client.
    NoBackend,
}

/// What [`Engine::decide_or_ask`] found.
#[derive(Debug)]
pub enum Decided {
    Chosen(Choice),
    /// No local binding of a stored table's key: the remote is being asked (nothing is
    /// recorded yet). Await [`mirrored::Miss::answer`], then [`Engine::decide_answered`].
    Miss(mirrored::Miss),
}

/// Where an input goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub backend: SocketAddr,
    pub decision: Decision,
}

/// What identifies an engine's persistence state: the profile but its cookie keys (which
/// rotate in place), the pool and its algorithm. A reload that keeps it keeps the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSpec {
    profile: Option<PersistenceProfile>,
    pool: String,
    algorithm: Algorithm,
    /// The GSLB settings, when the service has site persistence.
    gslb: Option<crate::config::gslb::Gslb>,
}

impl EngineSpec {
    pub fn of(cfg: &Config, svc: &VirtualService) -> EngineSpec {
        let profile = cfg.profile(svc).map(|p| {
            let mut p = p.clone();
            match &mut p.kind {
                crate::config::PersistenceKind::HttpCookie(c) => c.keys.clear(),
                crate::config::PersistenceKind::TlsTicket { keys } => keys.clear(),
                _ => {}
            }
            p
        });
        let pool = &cfg.pools[svc.pool];
        EngineSpec {
            profile,
            pool: pool.name.clone(),
            algorithm: pool.algorithm,
            gslb: cfg.gslb.clone().filter(|g| g.covers(&svc.name)),
        }
    }
}

/// "... or source IP": client-IP persistence for inputs without the method's key.
struct Fallback {
    table: Table<[u8; 16]>,
    v4_mask: [u8; 4],
    v6_mask: [u8; 16],
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

impl Fallback {
    fn new(f: &ClientIpFallback, capacity: usize) -> Self {
        let (v4_mask, v6_mask) = methods::masks(f.ipv4_prefix, f.ipv6_prefix);
        Fallback {
            table: Table::new(capacity, Duration::from_secs(f.timeout_s as u64)),
            v4_mask,
            v6_mask,
            ipv4_prefix: f.ipv4_prefix,
            ipv6_prefix: f.ipv6_prefix,
        }
    }

    fn key(&self, client: SocketAddr) -> [u8; 16] {
        masked_addr(client.ip(), &self.v4_mask, &self.v6_mask)
    }
}

/// What the engine derives from one snapshot generation, shared by its requests.
struct Prepared {
    generation: u64,
    config: Arc<Config>,
    /// Index of the service in `config.services`.
    service: usize,
    /// Backend identity -> index in the pool.
    identities: HashMap<u32, usize>,
    /// The pool's Maglev table over its up backends (entries are backend indexes), built on
    /// first use by a keyed method.
    maglev: OnceLock<Vec<u32>>,
    /// Each pool backend's counters (by index), looked up once per generation.
    backend_stats: Vec<Arc<BackendL7Stats>>,
}

impl Prepared {
    fn new(snap: &Snapshot, service: &str, stats: &RouterStats) -> Option<Prepared> {
        let si = snap
            .config
            .services
            .iter()
            .position(|s| s.name == service)?;
        let pool = &snap.config.pools[snap.config.services[si].pool];
        let mut identities = HashMap::with_capacity(pool.backends.len());
        for (i, b) in pool.backends.iter().enumerate() {
            identities
                .entry(backend_identity(&pool.name, &b.name))
                .or_insert(i);
        }
        let backend_stats = pool
            .backends
            .iter()
            .map(|b| stats.backend(backend_identity(&pool.name, &b.name)))
            .collect();
        Some(Prepared {
            generation: snap.generation,
            config: snap.config.clone(),
            service: si,
            identities,
            maglev: OnceLock::new(),
            backend_stats,
        })
    }

    /// Add one to a counter of pool backend `i`.
    fn count(&self, i: usize, counter: impl Fn(&BackendL7Stats) -> &AtomicU64) {
        if let Some(b) = self.backend_stats.get(i) {
            RouterStats::bump(counter(b));
        }
    }

    fn is_for(&self, snap: &Snapshot) -> bool {
        self.generation == snap.generation && Arc::ptr_eq(&self.config, &snap.config)
    }

    fn index(&self, b: Binding) -> Option<usize> {
        match b {
            Binding::Identity(id) => self.identities.get(&id).copied(),
            Binding::Index(i) => Some(i),
        }
    }

    /// The same builder and hash as the kernel tables, so every instance with this pool agrees.
    fn maglev(&self, snap: &Snapshot, pool_index: usize) -> &[u32] {
        self.maglev.get_or_init(|| {
            let pool = &snap.config.pools[pool_index];
            let states = snap
                .backend_state
                .get(pool_index)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
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
            build_table(&members, MAGLEV_TABLE_SIZE)
        })
    }
}

pub struct Engine {
    service: String,
    snapshot: SharedSnapshot,
    method: Option<Box<dyn Method>>,
    fallback: Option<Fallback>,
    down_policy: DownPolicy,
    selection: Box<dyn BackendSelection>,
    pool_id: u32,
    prepared: ArcSwapOption<Prepared>,
    /// New table entries per client source per minute, shared by the method and fallback.
    quota: SourceQuota,
    /// GSLB site persistence, when the service has it.
    site: Option<site::SiteCookie>,
    /// Asked about local misses (mirroring), when set.
    remote: ArcSwapOption<Arc<dyn mirrored::Remote>>,
    pub stats: Arc<RouterStats>,
}

/// Set in a route's token when its response must carry this site's cookie.
const SITE_COOKIE_BIT: u64 = 1 << 63;

impl Engine {
    /// The engine of `svc` with the method its profile names (none: balancing only).
    pub fn new(
        cfg: &Config,
        svc: &VirtualService,
        snapshot: SharedSnapshot,
    ) -> Result<Self, KeyError> {
        let method = cfg
            .profile(svc)
            .map(|p| methods::build(&svc.name, p, &cfg.state_dir))
            .transpose()?;
        let mut engine = Self::with_method(cfg, svc, snapshot, method);
        engine.site = site::SiteCookie::of(cfg, svc)?;
        Ok(engine)
    }

    /// The engine of `svc` with a given method (the profile still supplies the fallback and
    /// the down policy).
    pub fn with_method(
        cfg: &Config,
        svc: &VirtualService,
        snapshot: SharedSnapshot,
        method: Option<Box<dyn Method>>,
    ) -> Self {
        let pool = &cfg.pools[svc.pool];
        let profile = cfg.profile(svc);
        Engine {
            service: svc.name.clone(),
            snapshot,
            method,
            fallback: profile.and_then(|p| {
                let f = p.kind.fallback()?;
                Some(Fallback::new(f, p.table_capacity))
            }),
            quota: SourceQuota::new(profile.map_or(0, |p| p.max_new_keys_per_source_per_min)),
            down_policy: profile.map_or(DownPolicy::Immediate, |p| p.down_policy),
            selection: select::for_algorithm(pool.algorithm, pool.backends.len()),
            pool_id: cookie::pool_id(&pool.name),
            prepared: ArcSwapOption::empty(),
            site: None,
            remote: ArcSwapOption::empty(),
            stats: Arc::new(RouterStats::default()),
        }
    }

    /// Take the new config's in-place settings (rotated cookie keys).
    pub fn update(&self, cfg: &Config, svc: &VirtualService) -> Result<(), KeyError> {
        match (&self.method, cfg.profile(svc)) {
            (Some(m), Some(p)) => m.update(&svc.name, p, &cfg.state_dir),
            _ => Ok(()),
        }
    }

    fn context(&self, now: Instant) -> Context<'_> {
        Context {
            service: &self.service,
            pool_id: self.pool_id,
            stats: &self.stats,
            now,
            quota: &self.quota,
        }
    }

    fn prepared(&self, snap: &Snapshot) -> Option<Arc<Prepared>> {
        if let Some(p) = self.prepared.load_full()
            && p.is_for(snap)
        {
            return Some(p);
        }
        let fresh = Arc::new(Prepared::new(snap, &self.service, &self.stats)?);
        self.prepared.store(Some(fresh.clone()));
        Some(fresh)
    }

    /// Decide where `input` goes. `tried` lists backends that already failed to accept it.
    pub fn decide(&self, input: &mut Input<'_>, tried: &[SocketAddr]) -> Result<Choice, Refusal> {
        match self.decide_with(input, tried, false, None)? {
            Decided::Chosen(c) => Ok(c),
            // Only with `ask`.
            Decided::Miss(_) => Err(Refusal::NoBackend),
        }
    }

    /// Decide where `input` goes on its first attempt, or, when a remote is set and the
    /// input's key of a stored table (the method's, or the fallback's) is bound nowhere
    /// here, return the question to ask it. A local hit costs nothing more than
    /// [`Engine::decide`].
    pub fn decide_or_ask(&self, input: &mut Input<'_>) -> Result<Decided, Refusal> {
        self.decide_with(input, &[], true, None)
    }

    /// The stored tables' keys `input` was looked up by: the method's, then the fallback's
    /// when the input has none of the method's.
    fn stored_keys(
        &self,
        input: &Input<'_>,
        lookup: &methods::Lookup,
        absent: bool,
    ) -> Vec<(String, u128)> {
        let mut keys: Vec<(String, u128)> = match &self.method {
            Some(m) => {
                let id = m.table_id();
                m.stored_keys(input, lookup)
                    .into_iter()
                    .map(|k| (id.clone(), k))
                    .collect()
            }
            None => Vec::new(),
        };
        if absent && let Some(f) = &self.fallback {
            keys.push((
                "fallback".into(),
                u128::from_be_bytes(f.key(input.client())),
            ));
        }
        keys
    }

    /// With `answered`, the input waited for the remote: the method is not run again.
    fn decide_with(
        &self,
        input: &mut Input<'_>,
        tried: &[SocketAddr],
        ask: bool,
        answered: Option<&mirrored::Answer>,
    ) -> Result<Decided, Refusal> {
        let snap = self.snapshot.load();
        let prep = self.prepared(&snap).ok_or(Refusal::NoService)?;
        let svc = &snap.config.services[prep.service];
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
        let cx = self.context(Instant::now());
        let stats = &*self.stats;

        // What the method says, if anything.
        let lookup = match (&self.method, answered) {
            (Some(m), Some(a)) => self.lookup_answered(m.as_ref(), a, cx.now),
            (Some(m), None) => m.lookup(input, pool, &cx),
            (None, _) => methods::Lookup::default(),
        };
        let mut bound = lookup.binding.and_then(|b| prep.index(b));
        let by_method = bound.is_some();
        // "Absent" for the fallback: the input carries no key of the method's. A key not yet
        // bound is placed by its Maglev entry, as on every instance, not by the fallback.
        let absent = match &lookup.key {
            Key::NotKeyed => bound.is_none(),
            Key::Missing => true,
            Key::Hash(_) => false,
        };
        if bound.is_none()
            && absent
            && let Some(f) = &self.fallback
            && let Ok(id) = f.table.get(&f.key(input.client()), cx.now)
            && let Some(i) = prep.index(Binding::Identity(id))
        {
            bound = Some(i);
            RouterStats::bump(&stats.fallback_hits);
        }
        // A miss here: ask the remote before anything is recorded.
        if bound.is_none()
            && ask
            && let Some(remote) = self.remote.load().as_ref()
        {
            let keys = self.stored_keys(input, &lookup, absent);
            if !keys.is_empty()
                && let Some(asked) = remote.lookup(&self.service, &keys)
            {
                return Ok(Decided::Miss(mirrored::Miss {
                    lookup: asked,
                    keys,
                    first: lookup,
                }));
            }
        }

        // Honour the binding if its backend can take it.
        let mut honoured = None;
        if let Some(i) = bound {
            let state = states.get(i).copied().unwrap_or(BackendState::Down);
            let usable = matches!(state, BackendState::Up | BackendState::Draining);
            if usable && !tried.contains(&addr_of(i)) {
                honoured = Some(i);
                RouterStats::bump(&stats.persist_hits);
                prep.count(i, |b| &b.hits);
            } else if self.down_policy == DownPolicy::Never {
                // Down, or refusing connections: the client waits for its server.
                RouterStats::bump(&stats.refused_down);
                prep.count(i, |b| &b.reassigned_down);
                return Err(Refusal::BackendDown);
            } else {
                RouterStats::bump(&stats.reassigned_down);
                prep.count(i, |b| &b.reassigned_down);
            }
        }
        let index = match honoured {
            Some(i) => i,
            None => {
                let by_key = match &lookup.key {
                    Key::Hash(k) => {
                        let table = prep.maglev(&snap, svc.pool);
                        let h = lb_common::hash::hash_bytes(k, lb_common::hash::FLOW_SEED);
                        table
                            .get((h % MAGLEV_TABLE_SIZE) as usize)
                            .filter(|&&i| i != NO_BACKEND && !tried.contains(&addr_of(i as usize)))
                            .map(|&i| i as usize)
                    }
                    Key::NotKeyed | Key::Missing => None,
                };
                let i = match by_key {
                    Some(i) => i,
                    None => {
                        let candidates: Vec<(usize, u32)> = pool
                            .backends
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| {
                                states.get(*i) == Some(&BackendState::Up)
                                    && !tried.contains(&addr_of(*i))
                            })
                            .map(|(i, b)| (i, b.weight))
                            .collect();
                        let hint = self.method.as_ref().map_or(0, |m| m.selection_hint(input));
                        self.selection
                            .select(&candidates, hint)
                            .ok_or(Refusal::NoBackend)?
                    }
                };
                RouterStats::bump(&stats.new_assignments);
                prep.count(i, |b| &b.new_assignments);
                i
            }
        };
        let identity = backend_identity(&pool.name, &pool.backends[index].name);
        // Record the binding where the method keeps one, and the fallback's.
        if let Some(m) = &self.method {
            m.record(input, &lookup, identity, &cx);
        }
        if absent && let Some(f) = &self.fallback {
            let client = input.client();
            methods::store(&f.table, f.key(client), identity, client.ip(), &cx);
        }
        self.selection.started(index);
        Ok(Decided::Chosen(Choice {
            backend: addr_of(index),
            decision: Decision {
                identity,
                index,
                by_method: by_method && honoured.is_some(),
                client: input.client().ip(),
            },
        }))
    }

    /// Let the method add to, or learn from, the reply to a decided input.
    pub fn reply(&self, d: &Decision, reply: &mut Reply<'_>) {
        if let Some(m) = &self.method {
            m.on_reply(d, reply, &self.context(Instant::now()));
        }
    }

    /// The backend identity the method binds a ClientHello to, whatever its state.
    fn bound_identity(
        &self,
        m: &dyn Method,
        hello: &ClientHello,
        client: SocketAddr,
    ) -> Option<u32> {
        let snap = self.snapshot.load();
        let prep = self.prepared(&snap)?;
        let pool = &snap.config.pools[snap.config.services[prep.service].pool];
        let cx = self.context(Instant::now());
        match m
            .lookup(&mut Input::tls_hello(hello, client), pool, &cx)
            .binding?
        {
            Binding::Identity(id) => Some(id),
            Binding::Index(i) => pool
                .backends
                .get(i)
                .map(|b| backend_identity(&pool.name, &b.name)),
        }
    }

    /// The input decided as `d` is over (answered, failed or retried elsewhere).
    pub fn ended(&self, d: &Decision) {
        self.selection.ended(d.index);
    }
}

/// What an HTTP request waiting for the remote carries to [`Router::resume`].
struct Resumed {
    /// [`SITE_COOKIE_BIT`] when the response must carry this site's cookie (the site's
    /// cookie is already stripped from the request).
    site_cookie: u64,
    answer: mirrored::Answer,
}

fn http_route(choice: Choice, site_cookie: u64) -> Route {
    Route {
        backend: choice.backend,
        token: choice.decision.index as u64 | site_cookie,
        tag: Some(Arc::new(choice.decision)),
    }
}

impl Engine {
    /// The HTTP adapter; with `ask`, a local miss of a stored table waits for the remote.
    fn route_with(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
        ask: bool,
    ) -> Result<Routed, StatusCode> {
        let mut site_cookie = 0;
        if let Some(site) = &self.site {
            match site.locate(req) {
                // Its site's VIP (a peer that failed leaves the request to this site).
                site::Where::Peer(peer) if !tried.contains(&peer.addr) => {
                    site.mark_hop(req);
                    return Ok(Routed::Now(Route {
                        backend: peer.addr,
                        token: 0,
                        tag: None,
                    }));
                }
                site::Where::Local { known } => {
                    site.strip(req);
                    if !known {
                        site_cookie = SITE_COOKIE_BIT;
                    }
                }
                site::Where::Peer(_) => site.strip(req),
            }
        }
        let mut input = Input::http(req, conn.client).in_session(conn.session);
        let decided = if ask && tried.is_empty() {
            self.decide_or_ask(&mut input)
        } else {
            self.decide(&mut input, tried).map(Decided::Chosen)
        };
        match decided.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)? {
            Decided::Chosen(choice) => Ok(Routed::Now(http_route(choice, site_cookie))),
            Decided::Miss(miss) => Ok(Routed::Wait(Wait {
                answer: Box::pin(async move {
                    Resume(Box::new(Resumed {
                        site_cookie,
                        answer: miss.answer().await,
                    }))
                }),
            })),
        }
    }
}

impl Router for Engine {
    fn route(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
    ) -> Result<Route, StatusCode> {
        match self.route_with(req, conn, tried, false)? {
            Routed::Now(route) => Ok(route),
            // Only with `ask`.
            Routed::Wait(_) => Err(StatusCode::SERVICE_UNAVAILABLE),
        }
    }

    fn route_or_wait(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
    ) -> Result<Routed, StatusCode> {
        self.route_with(req, conn, tried, true)
    }

    fn resume(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
        resume: Resume,
    ) -> Result<Route, StatusCode> {
        let Ok(r) = resume.0.downcast::<Resumed>() else {
            return self.route(req, conn, tried);
        };
        let choice = self
            .decide_answered(
                &mut Input::http(req, conn.client).in_session(conn.session),
                tried,
                &r.answer,
            )
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        Ok(http_route(choice, r.site_cookie))
    }

    fn redirect(&self, req: &http::request::Parts, conn: &ConnInfo) -> Option<http::HeaderValue> {
        let site = self.site.as_ref().filter(|s| s.redirects())?;
        match site.locate(req) {
            site::Where::Peer(peer) => site.location(peer, req, conn.tls),
            site::Where::Local { .. } => None,
        }
    }

    fn on_response(&self, route: &Route, conn: &ConnInfo, resp: &mut http::response::Parts) {
        if route.token & SITE_COOKIE_BIT != 0
            && let Some(site) = &self.site
        {
            site.set_cookie(resp, conn.tls);
        }
        if let Some(d) = decision(route) {
            self.reply(
                d,
                &mut Reply::Http {
                    head: resp,
                    tls: conn.tls,
                },
            );
        }
    }

    fn finished(&self, route: &Route) {
        if let Some(d) = decision(route) {
            self.ended(d);
        }
    }

    fn uses_tls_sessions(&self) -> bool {
        self.method.as_ref().is_some_and(|m| m.issues_tickets())
    }

    /// The connection's backend, decided on its ClientHello, sealed into its tickets. The
    /// connection-level decision is counted like a request's.
    fn tls_session(&self, conn: &ConnInfo, hello: &ClientHello) -> Option<TlsSession> {
        let m = self.method.as_ref()?;
        let backend = match self.decide(&mut Input::tls_hello(hello, conn.client), &[]) {
            Ok(choice) => {
                self.ended(&choice.decision);
                choice.decision.identity
            }
            // Policy `never`: the session stays bound to its down backend, so each request
            // on it is refused (503) until the backend is back.
            Err(Refusal::BackendDown) => self.bound_identity(m.as_ref(), hello, conn.client)?,
            Err(Refusal::NoService | Refusal::NoBackend) => return None,
        };
        let ticketer = m.ticketer(backend, &self.context(Instant::now()))?;
        Some(TlsSession { ticketer, backend })
    }

    fn connection_opened(&self, conn: &ConnInfo) {
        if let Some(m) = &self.method
            && m.connection_opened(conn.client.ip(), Instant::now())
        {
            RouterStats::bump(&self.stats.expired);
        }
    }

    fn connection_closed(&self, conn: &ConnInfo) {
        if let Some(m) = &self.method {
            m.connection_closed(conn.client.ip(), Instant::now());
        }
    }
}

fn decision(route: &Route) -> Option<&Decision> {
    route.tag.as_ref()?.downcast_ref::<Decision>()
}
