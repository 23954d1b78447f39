//! The L7 reverse proxy: HTTP/1.1 (cleartext or TLS) and HTTP/2 (TLS, ALPN) on the client side,
//! pooled keep-alive HTTP/1.1 on the backend side, spoken by the request handler's own
//! task ([`h1client`]).
//!
//! The proxy knows nothing about persistence: every decision about where a request goes, and
//! every persistence-related edit of the request or response head, is made by a [`Router`].
//!
//! # Behaviour
//! - **Connections**: one task per client connection. Over [`Limits::max_connections`] a new
//!   connection is accepted and closed at once (the client sees an immediate EOF rather than a
//!   hang in the kernel backlog) and counted in [`ProxyStatsSnapshot::connections_rejected`].
//! - **Per source**: over [`Limits::max_connections_per_source`] open connections from one
//!   client address (IPv6: one /64; the PROXY protocol's address when there is one) the new
//!   one is closed and counted in [`ProxyStatsSnapshot::source_rejected`].
//! - **PROXY protocol** (v1 and v2, when enabled): peers in the trusted list must send one,
//!   read before anything else (before TLS) within [`Limits::request_header_timeout`]; a
//!   missing or malformed header closes the connection. Any other peer is served as a direct
//!   client, and if it sends a header anyway its connection is closed and counted in
//!   [`ProxyStatsSnapshot::proxy_header_refused`]. [`ConnInfo::client`] and
//!   [`ConnInfo::local`] are the addresses the header carries (the real connection's for
//!   `UNKNOWN`/`LOCAL`).
//! - **Timeouts** on the client side: the first request head (with the TLS handshake and the
//!   PROXY header) must arrive within `request_header_timeout` of the accept; between requests
//!   a connection may stay idle for `idle_timeout`, and once the next head has started it must
//!   complete within `request_header_timeout`. Expiry closes the connection (no 408). HTTP/2
//!   connections with no stream in flight for `idle_timeout` get a GOAWAY. Bodies in either
//!   direction and WebSocket tunnels are closed after `idle_timeout` without a byte.
//! - **Upstream**: `upstream_connect_timeout` per connect; `upstream_response_timeout` from the
//!   end of the request body to the response head (then 504). A request that never reached a
//!   backend (connect refused or timed out) is routed once more with the failed backend in
//!   `tried`; any failure after the request was sent is a 502. An idempotent request without a
//!   body that fails on a *reused* pooled connection before any response byte (the backend
//!   closed it as we wrote) is replayed once on a fresh connection to the same backend.
//! - **Headers**: hop-by-hop headers are removed in both directions; forwarding headers follow
//!   [`headers::prepare_request`]'s trusted-hop policy (a client's own `X-Forwarded-For`,
//!   `Forwarded` and `X-Real-IP` are replaced unless it is in `trusted_forwarders`), `Host` is
//!   kept (from `:authority` for HTTP/2), several `Cookie` fields are merged with `"; "`.
//! - **Slow bodies**: a request body arriving slower than [`Limits::min_body_rate`] bytes per
//!   second (after `request_header_timeout` of grace) ends with a 408 and the connection
//!   closes, counted in [`ProxyStatsSnapshot::slow_bodies`].
//! - **Backend connections**: at most [`Limits::max_connections_per_backend`] per backend,
//!   pooled, busy or carrying a WebSocket tunnel; a request waits up to
//!   `upstream_connect_timeout` for one, then gets a 503
//!   ([`ProxyStatsSnapshot::backend_saturated`]). A connect that fails for a local reason
//!   (EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL) is answered 503 on the spot: it says
//!   nothing about the backend, so the request is not moved to another one
//!   ([`ProxyStatsSnapshot::local_errors`]).
//!   The router sees the head as it will be sent (origin-form URI, HTTP/1.1, forwarding
//!   headers added).
//! - **Errors**: answered by the proxy with a short `text/plain` body and, on HTTP/1.x,
//!   `Connection: close`. Parse errors (400, 431) are answered by hyper itself (empty body).

mod body;
mod conn;
mod h1client;
mod h1codec;
mod handler;
mod headers;
mod io;
mod proxy_protocol;
mod sources;
mod tls;
mod upstream;

#[cfg(test)]
pub(crate) mod tests;

use std::{
    any::Any,
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
};

pub use tls::{TlsError, TlsHandle, TlsPart, load_tls};

/// A PROXY protocol header at the start of `buf`: `Ok(None)` when more bytes are needed,
/// else the (source, destination) it carries (`None` for `UNKNOWN`/`LOCAL`) and its length.
/// Public for the fuzz target.
#[allow(clippy::type_complexity)]
pub fn parse_proxy_header(
    buf: &[u8],
) -> Result<Option<(Option<(SocketAddr, SocketAddr)>, usize)>, String> {
    proxy_protocol::parse(buf)
        .map(|r| r.map(|(a, n)| (a.addrs, n)))
        .map_err(|e| e.to_string())
}

/// Whether `buf` starts a PROXY protocol header (`None`: too short to tell). Public for the
/// fuzz target.
pub fn is_proxy_header_start(buf: &[u8]) -> Option<bool> {
    proxy_protocol::is_header_start(buf)
}

/// A backend's response bytes as the in-task client reads them: `Ok(None)` while the final
/// head is incomplete, else its status, the body bytes its framing delimits within `data`,
/// and whether the body ended there. Public for the fuzz target.
#[allow(clippy::type_complexity)]
pub fn parse_backend_response(
    data: &[u8],
    head_request: bool,
) -> Result<Option<(u16, Vec<u8>, bool)>, String> {
    h1codec::parse_response(data, head_request).map_err(|e| e.to_string())
}

/// Decides where a request goes and adjusts the response; implemented by persistence methods.
pub trait Router: Send + Sync + 'static {
    /// Choose a backend. May edit the request head (e.g. strip a persistence cookie).
    /// `tried` lists backends that already failed to accept this request (retry).
    /// `Err(status)` answers the client directly (e.g. 503 when no backend is usable).
    fn route(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
    ) -> Result<Route, http::StatusCode>;

    /// Like [`Router::route`], but a router may first need an answer from elsewhere (a
    /// binding another instance made, for a key it does not hold): then it returns
    /// [`Routed::Wait`], whose answer the proxy awaits (the router bounds the wait) and
    /// gives to [`Router::resume`]. Nothing is decided or counted until then.
    fn route_or_wait(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
    ) -> Result<Routed, http::StatusCode> {
        self.route(req, conn, tried).map(Routed::Now)
    }

    /// Finish a [`Routed::Wait`] with its answer: like [`Router::route`].
    fn resume(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
        resume: Resume,
    ) -> Result<Route, http::StatusCode> {
        let _ = resume;
        self.route(req, conn, tried)
    }

    /// A redirect the client gets instead of a backend's answer (GSLB site persistence:
    /// the client belongs to another site): the `Location`, answered with 307.
    fn redirect(&self, req: &http::request::Parts, conn: &ConnInfo) -> Option<http::HeaderValue> {
        let _ = (req, conn);
        None
    }

    /// Adjust the response head before it goes to the client (e.g. add Set-Cookie, learn an
    /// app cookie). Not called for responses the proxy makes up itself (502, 504, ...).
    fn on_response(&self, route: &Route, req_conn: &ConnInfo, resp: &mut http::response::Parts) {
        let _ = (route, req_conn, resp);
    }

    /// The attempt `route` returned is over: answered, failed or retried elsewhere. Called
    /// exactly once per successful `route` call (least connections counts requests with it).
    fn finished(&self, route: &Route) {
        let _ = route;
    }

    /// TLS persistence: the router keeps each connection's backend in its TLS session
    /// tickets. The proxy then reads the ClientHello before the handshake and asks
    /// [`Router::tls_session`].
    fn uses_tls_sessions(&self) -> bool {
        false
    }

    /// The session of a new TLS connection, from its ClientHello; `None`: the listener's
    /// default ticket and session handling.
    fn tls_session(
        &self,
        conn: &ConnInfo,
        hello: &crate::tlswire::ClientHello,
    ) -> Option<TlsSession> {
        let _ = (conn, hello);
        None
    }

    /// A client connection opened (after the PROXY header and the TLS handshake).
    fn connection_opened(&self, conn: &ConnInfo) {
        let _ = conn;
    }

    /// A client connection closed (for an upgraded connection: when the tunnel ended).
    /// Called exactly once for each `connection_opened`.
    fn connection_closed(&self, conn: &ConnInfo) {
        let _ = conn;
    }
}

/// One client connection as the router sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnInfo {
    /// The client; with the PROXY protocol, the source it carries.
    pub client: SocketAddr,
    /// The address the client connected to; with the PROXY protocol, the destination it carries.
    pub local: SocketAddr,
    pub tls: bool,
    /// ALPN chose HTTP/2.
    pub alpn_h2: bool,
    /// The backend identity the connection's TLS session is bound to ([`Router::tls_session`]).
    pub session: Option<u32>,
}

/// A TLS connection's session as its router keeps it.
pub struct TlsSession {
    /// Issues and opens the connection's tickets (rustls' session state plus the backend).
    pub ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The backend identity the connection is bound to.
    pub backend: u32,
}

/// What [`Router::route_or_wait`] answers.
pub enum Routed {
    Now(Route),
    Wait(Wait),
}

/// A route waiting for an answer from elsewhere; the router bounds how long.
pub struct Wait {
    pub answer: std::pin::Pin<Box<dyn std::future::Future<Output = Resume> + Send>>,
}

/// What a [`Wait`] learned, for [`Router::resume`] (the router's own type).
pub struct Resume(pub Box<dyn Any + Send>);

/// A routing decision.
#[derive(Clone)]
pub struct Route {
    pub backend: SocketAddr,
    /// Opaque data the router needs in `on_response`.
    pub token: u64,
    pub tag: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("backend", &self.backend)
            .field("token", &self.token)
            .field("tag", &self.tag.as_ref().map(|_| ".."))
            .finish()
    }
}

/// Certificate chain and private key, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Informational (logs): [`serve_with_stats`] uses the listener it is given.
    pub listen: SocketAddr,
    /// Built before serving (a bad certificate never stops a running listener), and
    /// replaceable while serving.
    pub tls: Option<TlsHandle>,
    /// Peers that must send a PROXY protocol header; `None`: the protocol is off.
    pub proxy_protocol: Option<crate::cidr::Cidrs>,
    /// Clients whose forwarding headers are kept (appended to); others' are replaced.
    pub trusted_forwarders: crate::cidr::Cidrs,
    pub limits: Limits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent client connections (tunnels included); over it, accept and close.
    pub max_connections: usize,
    /// Concurrent client connections from one address (IPv6: one /64).
    pub max_connections_per_source: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
    pub h2_max_concurrent_streams: u32,
    /// Connections to one backend, idle in the pool or busy.
    pub max_connections_per_backend: usize,
    /// Minimum request body rate in bytes per second, after `request_header_timeout` of
    /// grace; 0: no minimum.
    pub min_body_rate: u32,
    /// Request line plus headers (HTTP/1.1: 431 over it), HTTP/2 header list size.
    pub max_header_bytes: usize,
    /// First request head (with TLS handshake and PROXY header) from accept; later heads from
    /// their first byte.
    pub request_header_timeout: Duration,
    /// Keep-alive idle between requests, body and tunnel inactivity.
    pub idle_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    /// From the end of the request body to the response head.
    pub upstream_response_timeout: Duration,
    /// After shutdown (a restart's drain): how long in-flight requests, keep-alive
    /// connections and tunnels may take before being cut.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    /// HAProxy-like: `maxconn 4096`, 16 KiB of headers (`tune.bufsize`), `timeout http-request
    /// 10s`, `timeout client 60s`, `timeout connect 5s`, `timeout server 60s`,
    /// `hard-stop-after 10s`; 1000 connections per source, 100 HTTP/2 streams (the RFC's
    /// recommended minimum, nginx's and hyper's default), 1024 connections per backend
    /// (Envoy's circuit-breaker default), 500 bytes/s of body (Apache mod_reqtimeout's MinRate).
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            max_connections_per_source: 1000,
            h2_max_concurrent_streams: 100,
            max_connections_per_backend: 1024,
            min_body_rate: 500,
            max_header_bytes: 16 * 1024,
            request_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy configuration: {0}")]
    Config(String),
}

/// Counters, readable while the proxy runs ([`ProxyStats::snapshot`]).
#[derive(Debug, Default)]
pub struct ProxyStats {
    connections_accepted: AtomicU64,
    connections_rejected: AtomicU64,
    connections_closed: AtomicU64,
    /// PROXY header missing or malformed, TLS handshake failed or timed out.
    handshake_errors: AtomicU64,
    requests: AtomicU64,
    responses: [AtomicU64; 5],
    upstream_connect_errors: AtomicU64,
    upstream_timeouts: AtomicU64,
    upstream_errors: AtomicU64,
    retries: AtomicU64,
    upgrades: AtomicU64,
    client_errors: AtomicU64,
    proxy_header_refused: AtomicU64,
    source_rejected: AtomicU64,
    slow_bodies: AtomicU64,
    local_errors: AtomicU64,
    backend_saturated: AtomicU64,
    tls_hello_errors: AtomicU64,
}

/// A copy of [`ProxyStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStatsSnapshot {
    pub connections_accepted: u64,
    /// Closed at once because of `max_connections`.
    pub connections_rejected: u64,
    pub connections_closed: u64,
    /// PROXY header missing or malformed, TLS handshake failed or timed out.
    pub handshake_errors: u64,
    /// Requests that reached the proxy's handler (hyper's own 400/431 are in `client_errors`).
    pub requests: u64,
    /// Responses sent by class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub responses: [u64; 5],
    /// Connect refused, failed or timed out.
    pub upstream_connect_errors: u64,
    /// No response head within `upstream_response_timeout` (504).
    pub upstream_timeouts: u64,
    /// The backend failed after the request was sent (502).
    pub upstream_errors: u64,
    /// Requests routed a second time after a connect failure.
    pub retries: u64,
    /// WebSocket (HTTP/1.1 Upgrade) tunnels established.
    pub upgrades: u64,
    /// Client connections that ended on a protocol error (malformed HTTP, oversized headers).
    pub client_errors: u64,
    /// Connections closed because an untrusted peer sent a PROXY protocol header.
    pub proxy_header_refused: u64,
    /// Connections closed because their source had `max_connections_per_source` open.
    pub source_rejected: u64,
    /// Requests answered 408 because their body came slower than `min_body_rate`.
    pub slow_bodies: u64,
    /// Requests answered 503 because connecting failed for a local reason (EMFILE, ...).
    pub local_errors: u64,
    /// Requests answered 503 because their backend had `max_connections_per_backend` busy.
    pub backend_saturated: u64,
    /// TLS pass-through: connections closed on a malformed, truncated or oversized
    /// ClientHello.
    pub tls_hello_errors: u64,
}

impl ProxyStatsSnapshot {
    /// Client connections open now (accepted, not yet closed).
    pub fn connections_active(&self) -> u64 {
        self.connections_accepted
            .saturating_sub(self.connections_closed)
    }
}

/// Events [`ProxyStats::count`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Accepted,
    Rejected,
    Closed,
    /// No usable first bytes within the header timeout.
    HandshakeError,
    /// A malformed, truncated or oversized ClientHello.
    TlsHelloError,
    ConnectError,
    Retry,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl ProxyStats {
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStatsSnapshot {
            connections_accepted: get(&self.connections_accepted),
            connections_rejected: get(&self.connections_rejected),
            connections_closed: get(&self.connections_closed),
            handshake_errors: get(&self.handshake_errors),
            requests: get(&self.requests),
            responses: std::array::from_fn(|i| get(&self.responses[i])),
            upstream_connect_errors: get(&self.upstream_connect_errors),
            upstream_timeouts: get(&self.upstream_timeouts),
            upstream_errors: get(&self.upstream_errors),
            retries: get(&self.retries),
            upgrades: get(&self.upgrades),
            client_errors: get(&self.client_errors),
            proxy_header_refused: get(&self.proxy_header_refused),
            source_rejected: get(&self.source_rejected),
            slow_bodies: get(&self.slow_bodies),
            local_errors: get(&self.local_errors),
            backend_saturated: get(&self.backend_saturated),
            tls_hello_errors: get(&self.tls_hello_errors),
        }
    }

    /// Count one event of a proxy that lives outside this module (the TLS pass-through).
    pub fn count(&self, event: Count) {
        inc(match event {
            Count::Accepted => &self.connections_accepted,
            Count::Rejected => &self.connections_rejected,
            Count::Closed => &self.connections_closed,
            Count::HandshakeError => &self.handshake_errors,
            Count::TlsHelloError => &self.tls_hello_errors,
            Count::ConnectError => &self.upstream_connect_errors,
            Count::Retry => &self.retries,
        });
    }

    fn response(&self, status: http::StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        inc(&self.responses[class]);
    }
}

/// What every connection task of one worker shares.
struct Shared {
    router: Arc<dyn Router>,
    limits: Limits,
    stats: Arc<ProxyStats>,
    /// This worker's backend connections (their tasks run on this worker's runtime).
    pool: upstream::Pool,
    proxy_protocol: Option<crate::cidr::Cidrs>,
    trusted_forwarders: crate::cidr::Cidrs,
    sources: sources::SourceLimiter,
    tls: Option<TlsHandle>,
    /// Client connections this worker serves now (to hand new ones to the least busy).
    open: AtomicUsize,
}

/// The workers of one proxy, as its accept loops see them: where to serve a connection.
type Peers = Arc<[(Arc<Shared>, tokio::runtime::Handle)]>;

/// Uncounts a connection from its worker's `open` when its task ends.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The worker a new connection accepted by worker `me` goes to: the one with the fewest open
/// connections, `me` on a tie. The kernel spreads connections over the workers' sockets by
/// a hash of their addresses, which leaves a few long-lived connections unevenly spread
/// (HAProxy balances its threads the same way).
fn pick(peers: &Peers, me: usize) -> usize {
    let open = |i: usize| peers[i].0.open.load(Ordering::Relaxed);
    (0..peers.len()).fold(me, |best, i| if open(i) < open(best) { i } else { best })
}

/// What the accept loops of every worker of one proxy share: the limits that hold for the
/// whole listener.
struct Common {
    /// `max_connections`.
    permits: Arc<Semaphore>,
    sources: sources::SourceLimiter,
    backend_slots: upstream::BackendSlots,
}

impl Common {
    fn new(cfg: &ProxyConfig) -> Result<Common, ProxyError> {
        let limits = cfg.limits;
        if limits.max_connections == 0
            || limits.max_connections_per_source == 0
            || limits.max_connections_per_backend == 0
            || limits.h2_max_concurrent_streams == 0
        {
            return Err(ProxyError::Config(format!(
                "connection and stream limits must be positive: {limits:?}"
            )));
        }
        if limits.max_header_bytes == 0 || limits.max_header_bytes > u32::MAX as usize {
            return Err(ProxyError::Config(format!(
                "max_header_bytes {} out of range",
                limits.max_header_bytes
            )));
        }
        log::info!(
            "proxy: serving {} ({}{})",
            cfg.listen,
            if cfg.tls.is_some() {
                "TLS"
            } else {
                "cleartext"
            },
            if cfg.proxy_protocol.is_some() {
                ", PROXY protocol from trusted sources"
            } else {
                ""
            }
        );
        Ok(Common {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            sources: sources::SourceLimiter::new(limits.max_connections_per_source),
            backend_slots: upstream::BackendSlots::default(),
        })
    }

    /// One worker's share.
    fn worker(
        &self,
        cfg: &ProxyConfig,
        router: &Arc<dyn Router>,
        stats: &Arc<ProxyStats>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            router: router.clone(),
            limits: cfg.limits,
            stats: stats.clone(),
            pool: upstream::Pool::new(cfg.limits, self.backend_slots.clone()),
            proxy_protocol: cfg.proxy_protocol.clone(),
            trusted_forwarders: cfg.trusted_forwarders.clone(),
            sources: self.sources.clone(),
            tls: cfg.tls.clone(),
            open: AtomicUsize::new(0),
        })
    }
}

/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often idle pooled backend connections are swept.
const POOL_SWEEP: Duration = Duration::from_secs(5);

/// Serve client connections from `listener` on the current runtime until `shutdown` turns
/// true (or its sender is dropped). Then it drains: `listener` is dropped (a socket shared
/// with another server, a reload's or a restart's, keeps its queue there), in-flight HTTP/1
/// requests are answered with `Connection: close`, idle HTTP/1 connections are closed once
/// nothing arrived for a short while, HTTP/2 connections get a GOAWAY, and whatever is still
/// open after [`Limits::shutdown_grace`] is cut.
///
/// Errors only before serving anything (invalid limits).
pub async fn serve_with_stats(
    listener: TcpListener,
    cfg: ProxyConfig,
    router: Arc<dyn Router>,
    shutdown: watch::Receiver<bool>,
    stats: Arc<ProxyStats>,
) -> Result<(), ProxyError> {
    let common = Common::new(&cfg)?;
    let peers: Peers = Arc::new([(
        common.worker(&cfg, &router, &stats),
        tokio::runtime::Handle::current(),
    )]);
    accept_loop(listener, 0, peers, common.permits, shutdown, cfg.listen).await;
    Ok(())
}

/// [`serve_with_stats`] on every worker of `workers`, accepting on `sockets` (one
/// `SO_REUSEPORT` socket per worker, see [`crate::workers`]). The connection limits hold for
/// the whole listener; each worker keeps its own backend connections.
pub async fn serve_on(
    sockets: Vec<std::net::TcpListener>,
    workers: crate::workers::Workers,
    cfg: ProxyConfig,
    router: Arc<dyn Router>,
    shutdown: watch::Receiver<bool>,
    stats: Arc<ProxyStats>,
) -> Result<(), ProxyError> {
    let common = Common::new(&cfg)?;
    let peers: Peers = workers
        .handles()
        .into_iter()
        .map(|h| (common.worker(&cfg, &router, &stats), h))
        .collect();
    let listen = cfg.listen;
    workers
        .run_accept_loops(sockets, |w, socket| {
            let (peers, permits) = (peers.clone(), common.permits.clone());
            let shutdown = shutdown.clone();
            async move {
                // Registered here, with the worker's own runtime.
                match crate::workers::register_listener(socket) {
                    Ok(l) => accept_loop(l, w, peers, permits, shutdown, listen).await,
                    Err(e) => log::error!("proxy: {listen}: listening socket: {e}"),
                }
            }
        })
        .await;
    Ok(())
}

/// Accepts for worker `me`; each connection is served on the least busy worker of `peers`.
async fn accept_loop(
    listener: TcpListener,
    me: usize,
    peers: Peers,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    listen: SocketAddr,
) {
    let shared = peers[me].0.clone();
    let limits = shared.limits;
    let stats = shared.stats.clone();
    let mut tasks = JoinSet::new();
    let mut sweep = tokio::time::interval(POOL_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    log::error!("proxy: connection task panicked: {e}");
                }
            }
            _ = sweep.tick() => shared.pool.sweep(),
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        inc(&stats.connections_accepted);
                        let target = pick(&peers, me);
                        let (to, handle) = &peers[target];
                        to.open.fetch_add(1, Ordering::Relaxed);
                        let open = OpenGuard(to.clone());
                        let (to, shutdown) = (to.clone(), shutdown.clone());
                        if target == me {
                            tasks.spawn(async move {
                                conn::run(to, tcp, peer, shutdown).await;
                                drop((permit, open));
                            });
                        } else {
                            // Moved to the other worker's runtime: registered there.
                            match tcp.into_std() {
                                Ok(std) => {
                                    tasks.spawn_on(async move {
                                        match tokio::net::TcpStream::from_std(std) {
                                            Ok(tcp) => conn::run(to, tcp, peer, shutdown).await,
                                            Err(e) => log::warn!("proxy: {peer}: handing to a worker: {e}"),
                                        }
                                        drop((permit, open));
                                    }, handle);
                                }
                                Err(e) => log::warn!("proxy: {peer}: handing to a worker: {e}"),
                            }
                        }
                    }
                    Err(_) => {
                        inc(&stats.connections_rejected);
                        log::debug!("proxy: {peer} rejected: {} connections", limits.max_connections);
                        drop(tcp);
                    }
                },
                Err(e) => {
                    log::warn!("proxy: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    log::info!(
        "proxy: draining {}: {} connection(s) open, grace {:?}",
        listen,
        tasks.len(),
        limits.shutdown_grace
    );
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        log::warn!(
            "proxy: {} connection(s) cut after the shutdown grace",
            tasks.len()
        );
        tasks.shutdown().await;
    }
}
