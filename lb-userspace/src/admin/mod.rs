//! The admin HTTP API (HTTP/1.1 on a Unix socket and on `admin_listen`) and the CLI client
//! for it ([`cli`]). Who may call what is decided in [`access`]: the Unix socket (0600) is
//! open to its owner, TCP needs a bearer token for everything but loopback `/metrics`, and
//! checks `Host` and `Origin`.
//!
//! # Routes
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text format 0.0.4 (see [`metrics`]) |
//! | `GET /status` | JSON [`api::Status`], below |
//! | `GET /persist?service=&client=&backend=` | JSON [`api::PersistList`], at most [`MAX_PERSIST_ROWS`] rows |
//! | `POST /persist/flush?service=&client=&backend=` | deletes the matching entries: `{"flushed": n, "l7_flushed": n}` |
//! | `/api/v1/...` | object management: virtual services, pools, profiles (see [`objects`]) |
//!
//! The table is [`routes::ROUTES`]; `docs/openapi.json` documents it.
//!
//! Query parameters are all optional: `service` is a virtual service name, `client` any
//! address of the client (it is masked with each service's prefix, so `10.0.0.7` finds the
//! entry `10.0.0.0/24`), `backend` a backend name (looked up in the service's pool, or in
//! every pool; `POOL/NAME` when several pools have it). An unknown name, a bad address or an
//! unknown parameter is a 400 naming the parameter; an unknown path a 404; a wrong method a
//! 405 with `Allow`; unreadable BPF maps a 503. Error bodies are one line of text.
//!
//! # `GET /status`
//!
//! ```text
//! { "generation": u64, "xdp_mode": "native"|"generic", "uptime_s": u64,
//!   "persist_entries": u64|null,
//!   "services": [ {
//!       "name", "vip", "port", "protocol": "tcp"|"udp", "pool",
//!       "persistence": { "profile", "timeout_s", "ipv4_prefix", "ipv6_prefix",
//!                        "policy": "immediate"|"never" } | null,
//!       "counters": COUNTERS,
//!       "backends": [ { "name", "id", "address", "weight",
//!                       "admin_state": "enabled"|"draining"|"disabled",
//!                       "state": "up"|"down"|"draining"|"disabled",
//!                       "health": { "up", "detail", "since_unix" } | null,
//!                       "bound_clients": u64|null,   // live entries of this service
//!                       "counters": COUNTERS } ] } ],   // the backend's, all services
//!   "reasons": { "<reason>": packets, ... } }
//! COUNTERS = { "packets", "bytes", "persist_hits", "new_assignments", "expired",
//!              "reassigned_down", "no_backend" }
//! ```
//!
//! `GET /persist` rows: `{ "service": name|null, "service_index", "client", "prefix_len",
//! "backend": name|null, "backend_id", "backend_address": addr|null, "age_s", "expired" }`
//! (`null` names belong to entries of a service or backend no longer configured), plus
//! `"truncated"`, plus `"l7"`: the bindings of the L7 proxies' tables, `{ "service", "table"
//! (the method's type or "fallback"), "client", "prefix_len" (client tables) | "key_digest"
//! (key tables), "backend", "backend_address", "age_s", "open_connections", "expired" }`.
//! A client filter matches client tables only; a flush removes kernel entries and L7
//! bindings alike.
//!
//! `/status` adds, for `l7` services, `"l7": { "counters": {name: n}, "entries", "method",
//! "requests", "expirations", "tables": [ { "table", "entries", "capacity" } ] }` and per
//! backend `"l7_bound_clients"` (live bindings of the service's L7 tables) and `"l7": {
//! "hits", "new_assignments", "reassigned_down" }` (the engine's decisions for it).
//!
//! Counting bound clients walks the whole persistence table (about a second per million
//! entries), so `/metrics` and `/status` read a census cached for [`CENSUS_MAX_AGE`] and
//! refreshed by one background walk at a time; a flush invalidates it. `/persist` and
//! flushes walk the table themselves, one at a time.

pub mod access;
pub mod api;
pub mod cli;
pub mod metrics;
pub mod objects;
pub mod query;
pub mod routes;
pub mod status;

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{Notify, Semaphore, watch},
};

use self::access::{Access, Denied, Peer};
use lb_common::backend_identity;

use crate::{
    dataplane::persist_table::{self as persist, Census},
    state::{L7Counters, L7Filter, SharedSnapshot, Snapshot},
};

/// Rows of `GET /persist` before `truncated` is set.
pub const MAX_PERSIST_ROWS: usize = 10_000;
/// A census older than this is refreshed (in the background) on the next read.
pub const CENSUS_MAX_AGE: Duration = Duration::from_secs(5);
/// How long a request waits for a census when there is none it can use.
const CENSUS_WAIT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 256;
const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type Body = Full<Bytes>;

/// One census and what it is valid for.
#[derive(Debug)]
struct Taken {
    /// `None` when the walk failed (logged).
    census: Option<Census>,
    at: Instant,
    epoch: u64,
    pin_dir: PathBuf,
}

/// Persistence census shared lock-free with the request path: readers `load` an `Arc`,
/// at most one walk runs at a time.
#[derive(Debug, Default)]
struct CensusCache {
    current: ArcSwapOption<Taken>,
    refreshing: AtomicBool,
    /// Bumped by flushes: a census from an older epoch is not served while a new one can
    /// be had within `CENSUS_WAIT`.
    epoch: AtomicU64,
    done: Notify,
}

impl CensusCache {
    async fn get(self: &Arc<Self>, pin_dir: &Path) -> Option<Census> {
        let deadline = tokio::time::Instant::now() + CENSUS_WAIT;
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            // Registered before looking, so a refresh finishing in between still wakes us.
            notified.as_mut().enable();
            let cur = self.current.load_full().filter(|t| t.pin_dir == pin_dir);
            match &cur {
                Some(t) if t.epoch == self.epoch.load(Ordering::Acquire) => {
                    if t.at.elapsed() >= CENSUS_MAX_AGE {
                        self.start_refresh(pin_dir);
                    }
                    return t.census.clone();
                }
                _ => {
                    self.start_refresh(pin_dir);
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return cur.and_then(|t| t.census.clone());
                    }
                }
            }
        }
    }

    fn start_refresh(self: &Arc<Self>, pin_dir: &Path) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Clears the flag and wakes waiters however the walk ends.
        struct Done(Arc<CensusCache>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.refreshing.store(false, Ordering::Release);
                self.0.done.notify_waiters();
            }
        }
        let done = Done(Arc::clone(self));
        let pin_dir = pin_dir.to_owned();
        let epoch = self.epoch.load(Ordering::Acquire);
        tokio::task::spawn_blocking(move || {
            let census = persist::census(&pin_dir)
                .inspect_err(|e| log::warn!("counting persistence entries: {e}"))
                .ok();
            done.0.current.store(Some(Arc::new(Taken {
                census,
                at: Instant::now(),
                epoch,
                pin_dir,
            })));
        });
    }

    fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

struct Server {
    snapshot: SharedSnapshot,
    /// Policy of the TCP listener; `None`: TCP requests are refused.
    access: Option<Access>,
    census: Arc<CensusCache>,
    /// Operator walks (`/persist`, flushes), one at a time: each may cost a second of CPU.
    walks: Arc<Semaphore>,
    /// The config file as the objects' store; `None`: `/api/v1` answers 503.
    objects: Option<Arc<objects::store::Store>>,
}

/// Where the admin API listens.
#[derive(Debug, Default)]
pub struct Listeners {
    /// `admin_listen`, with its access policy.
    pub tcp: Option<(TcpListener, Access)>,
    /// The 0600 Unix socket the CLI uses.
    pub unix: Option<UnixListener>,
}

async fn accept_tcp(l: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, Peer)> {
    match l {
        Some(l) => l.accept().await.map(|(s, p)| (s, Peer::Tcp(p))),
        None => std::future::pending().await,
    }
}

async fn accept_unix(l: Option<&UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Serve the admin API on `listeners` until `shutdown` turns true (or its sender is
/// dropped). Each connection is a task; connection and request errors are logged, never
/// fatal. Open connections finish their current request on shutdown.
pub async fn serve(
    listeners: Listeners,
    snapshot: SharedSnapshot,
    objects: Option<Arc<objects::store::Store>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tcp, access) = match listeners.tcp {
        Some((l, a)) => (Some(l), Some(a)),
        None => (None, None),
    };
    let unix = listeners.unix;
    let srv = Arc::new(Server {
        snapshot,
        access,
        census: Arc::default(),
        walks: Arc::new(Semaphore::new(1)),
        objects,
    });
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    if let Some(addr) = tcp.as_ref().and_then(|l| l.local_addr().ok()) {
        log::info!("admin API listening on http://{addr} (bearer token required)");
    }
    if let Some(path) = unix
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .and_then(|a| a.as_pathname().map(Path::to_owned))
    {
        log::info!("admin API listening on {}", path.display());
    }
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&conns).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let accepted = tokio::select! {
            r = accept_tcp(tcp.as_ref()) => r.map(|(s, p)| (Conn::Tcp(s), p)),
            r = accept_unix(unix.as_ref()) => r.map(|s| (Conn::Unix(s), Peer::Unix)),
            _ = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                log::warn!("admin API accept: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let srv = Arc::clone(&srv);
        let stop = shutdown.clone();
        match stream {
            Conn::Tcp(s) => spawn_conn(srv, builder.clone(), s, peer, stop, permit),
            Conn::Unix(s) => spawn_conn(srv, builder.clone(), s, peer, stop, permit),
        }
    }
    log::info!("admin API stopped");
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

fn spawn_conn<S>(
    srv: Arc<Server>,
    builder: http1::Builder,
    stream: S,
    peer: Peer,
    mut stop: watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let svc = service_fn(move |req| {
            let srv = Arc::clone(&srv);
            async move { Ok::<_, Infallible>(handle(&srv, peer, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let r = tokio::select! {
            r = conn.as_mut() => r,
            _ = stopped(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = r {
            log::debug!("admin API connection from {peer:?}: {e}");
        }
    });
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: nobody can ask us to keep running either.
    let _ = rx.wait_for(|&stop| stop).await;
}

async fn handle(srv: &Arc<Server>, peer: Peer, req: Request<Incoming>) -> Response<Body> {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let allowed = match (&srv.access, peer) {
        (_, Peer::Unix) => Ok(()),
        (Some(a), _) => a.check(peer, uri.path(), req.headers()),
        (None, _) => Err(Denied::Forbidden("TCP access is not configured".into())),
    };
    if let Err(d) = allowed {
        log::debug!("admin API {method} {uri} from {peer:?}: refused: {d:?}");
        return denied(d);
    }
    let resp = if uri.path().starts_with("/api/") {
        object_route(srv, &method, uri.path(), req.into_body()).await
    } else {
        route(srv, &method, uri.path(), uri.query()).await
    };
    if resp.status().is_server_error() {
        log::warn!("admin API {method} {uri}: {}", resp.status());
    }
    resp
}

/// The route of `path` when it takes `method`, else the 404 or 405 to answer.
fn allowed<'p>(method: &Method, path: &'p str) -> Result<Vec<&'p str>, Box<Response<Body>>> {
    let Some((r, params)) = routes::find(path) else {
        return Err(Box::new(text(
            StatusCode::NOT_FOUND,
            format!("no such path {path}"),
        )));
    };
    if !r.methods.contains(&method.as_str()) {
        let allow = r.methods.join(", ");
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes {allow}"),
        );
        if let Ok(v) = allow.parse() {
            resp.headers_mut().insert(ALLOW, v);
        }
        return Err(Box::new(resp));
    }
    Ok(params)
}

/// `/api/v1/...`: the body is read (at most [`objects::MAX_BODY`]) and the objects answer.
async fn object_route(
    srv: &Arc<Server>,
    method: &Method,
    path: &str,
    body: Incoming,
) -> Response<Body> {
    let params = match allowed(method, path) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
        body,
        objects::MAX_BODY,
    ))
    .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "reading the body (at most {} bytes): {e}",
                    objects::MAX_BODY
                ),
            );
        }
    };
    objects::handle(srv.objects.as_deref(), method, path, &params, &body).await
}

async fn route(
    srv: &Arc<Server>,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    if let Err(r) = allowed(method, path) {
        return *r;
    }
    let snap = srv.snapshot.load_full();
    match path {
        "/metrics" => {
            let (census, counters) = tokio::join!(
                srv.census.get(snap.pin_dir()),
                read_counters(Arc::clone(&snap))
            );
            match counters {
                Ok(c) => respond(
                    StatusCode::OK,
                    metrics::CONTENT_TYPE,
                    metrics::render(&snap, &c, census.as_ref()),
                ),
                Err(r) => r,
            }
        }
        "/status" => {
            let (census, counters) = tokio::join!(
                srv.census.get(snap.pin_dir()),
                read_counters(Arc::clone(&snap))
            );
            match counters {
                Ok(c) => json(&status::build(
                    &snap,
                    &c,
                    census.as_ref(),
                    SystemTime::now(),
                )),
                Err(r) => r,
            }
        }
        "/persist" => {
            let f = match query::filter(&snap, query) {
                Ok(f) => f,
                Err(e) => return text(StatusCode::BAD_REQUEST, e.0),
            };
            let dir = snap.pin_dir().clone();
            let s = Arc::clone(&snap);
            match walk(srv, move || {
                let kernel = persist::list_capped(&dir, &f, MAX_PERSIST_ROWS)?;
                Ok((kernel, l7_rows(&s, &f, MAX_PERSIST_ROWS)))
            })
            .await
            {
                Ok(((entries, truncated), (l7, l7_truncated))) => json(&api::PersistList {
                    entries: entries
                        .iter()
                        .map(|e| status::persist_row(&snap, e))
                        .collect(),
                    truncated: truncated || l7_truncated,
                    l7,
                }),
                Err(r) => r,
            }
        }
        "/persist/flush" => {
            let f = match query::filter(&snap, query) {
                Ok(f) => f,
                Err(e) => return text(StatusCode::BAD_REQUEST, e.0),
            };
            let dir = snap.pin_dir().clone();
            let s = Arc::clone(&snap);
            let r = walk(srv, move || {
                let kernel = persist::flush(&dir, &f)?;
                let (engines, l7f) = l7_targets(&s, &f);
                Ok((kernel, engines.iter().map(|l| l.tables.flush(&l7f)).sum()))
            })
            .await;
            srv.census.invalidate();
            match r {
                Ok((n, l7)) => {
                    log::info!(
                        "admin API: flushed {n} persistence entries and {l7} L7 bindings ({})",
                        query.unwrap_or("all")
                    );
                    json(&api::FlushReply {
                        flushed: n,
                        l7_flushed: l7,
                    })
                }
                Err(r) => r,
            }
        }
        _ => unreachable!("every routed path is matched above"),
    }
}

/// The L7 engines a filter applies to (all, or its service's) and the filter in the
/// engines' terms (backend identity instead of kernel id).
fn l7_targets<'a>(snap: &'a Snapshot, f: &persist::Filter) -> (Vec<&'a L7Counters>, L7Filter) {
    let cfg = &snap.config;
    let service = f.service_index.map(|i| {
        snap.service_by_index(i)
            .map(|s| cfg.services[s].name.as_str())
    });
    let backend = f.backend_id.map(|id| {
        snap.backend_by_id(id).map(|(p, b)| {
            let pool = &cfg.pools[p];
            backend_identity(&pool.name, &pool.backends[b].name)
        })
    });
    // A service or backend the filter names but the snapshot does not know matches nothing.
    if matches!(service, Some(None)) || matches!(backend, Some(None)) {
        return (Vec::new(), L7Filter::default());
    }
    let engines = snap
        .l7
        .iter()
        .filter(|l| service.flatten().is_none_or(|s| s == l.service))
        .collect();
    (
        engines,
        L7Filter {
            client: f.client,
            backend: backend.flatten(),
        },
    )
}

/// L7 rows matching `f`, at most `max`; the flag says whether more matched.
fn l7_rows(snap: &Snapshot, f: &persist::Filter, max: usize) -> (Vec<api::L7Row>, bool) {
    let (engines, l7f) = l7_targets(snap, f);
    let mut rows = Vec::new();
    let mut truncated = false;
    for l in engines {
        let mut bindings = l.tables.bindings(&l7f);
        bindings.sort_by(|a, b| {
            (a.table, a.client, a.key_digest).cmp(&(b.table, b.client, b.key_digest))
        });
        for b in &bindings {
            if rows.len() == max {
                truncated = true;
                break;
            }
            rows.push(status::l7_row(snap, &l.service, b));
        }
    }
    (rows, truncated)
}

async fn read_counters(snap: Arc<Snapshot>) -> Result<metrics::KernelCounters, Response<Body>> {
    match tokio::task::spawn_blocking(move || metrics::read(snap.pin_dir(), &snap)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reading counters: {e}"),
        )),
        Err(e) => Err(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading counters: {e}"),
        )),
    }
}

/// Run a table walk on the blocking pool, one at a time (the permit lives as long as the
/// walk, even when the client goes away).
async fn walk<T: Send + 'static>(
    srv: &Server,
    f: impl FnOnce() -> Result<T, persist::PersistError> + Send + 'static,
) -> Result<T, Response<Body>> {
    let Ok(permit) = Arc::clone(&srv.walks).acquire_owned().await else {
        return Err(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
    };
    let r = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await;
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(text(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e) => Err(text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn denied(d: Denied) -> Response<Body> {
    match d {
        Denied::Forbidden(why) => text(StatusCode::FORBIDDEN, why),
        Denied::Unauthorized(why) => {
            let mut r = text(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"tether admin\""),
            );
            r
        }
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    respond(status, "text/plain; charset=utf-8", msg)
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(v) {
        Ok(mut b) => {
            b.push(b'\n');
            respond(StatusCode::OK, "application/json", b)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding JSON: {e}"),
        ),
    }
}

#[cfg(test)]
mod l7_tests;
#[cfg(test)]
mod tests;
