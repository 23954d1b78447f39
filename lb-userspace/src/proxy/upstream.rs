//! Backend side: HTTP/1.1 connections kept alive in a per-backend pool, connect and response
//! timeouts, and the distinction between a request that never left (safe to route elsewhere)
//! and one that did.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Method, Request, Response};
use hyper::body::Body as _;
use tokio::{
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
};

use super::{
    Limits,
    body::ProxyBody,
    h1client::{Conn, ExchangeError, Recycle, ResponseBody},
    io::coarse_ms,
};

/// An idle backend connection older than this is closed rather than reused: backends
/// commonly close idle keep-alive connections after a few seconds (Apache, Node: 5 s), and
/// reusing one as it closes costs a failed request. HAProxy's `pool-purge-delay` is 5 s too.
const MAX_IDLE_AGE: Duration = Duration::from_secs(5);

struct Idle {
    conn: Conn,
    /// [`coarse_ms`] when it went idle.
    since: u64,
}

pub(super) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Idle connections per backend, oldest first; the most recently used are reused first.
    /// As many may wait here as the backend has slots (`max_connections_per_backend`): with
    /// fewer, a burst of concurrent requests would close and reopen connections each time.
    idle: Mutex<HashMap<SocketAddr, VecDeque<Idle>>>,
    /// This pool's view of `shared`'s slots (no lock shared with other workers per request).
    slots: Mutex<HashMap<SocketAddr, Arc<Local>>>,
    shared: BackendSlots,
    max_per_backend: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_age: Duration,
}

/// One worker's entry for a backend: the shared slots, and the waiters of this worker.
struct Local {
    slots: Arc<Slots>,
    /// A connection went back to this worker's pool: a waiter of this worker may take it
    /// (another worker's waiter could not).
    idle: Notify,
    /// Requests of this worker waiting for a connection to the backend.
    waiting: AtomicUsize,
}

/// Counts a request as waiting, here and in the shared slots, for as long as it lives.
struct Waiting<'a>(&'a Local);

impl<'a> Waiting<'a> {
    fn new(local: &'a Local) -> Waiting<'a> {
        local.waiting.fetch_add(1, Ordering::Relaxed);
        local.slots.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(local)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.slots.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connection slots per backend (`max_connections_per_backend`), shared by the pools of
/// every worker of one proxy: a connection holds its permit for as long as it is open, idle in
/// a pool or busy, whatever worker it is on.
#[derive(Clone, Default)]
pub(super) struct BackendSlots {
    slots: Arc<Mutex<HashMap<SocketAddr, Arc<Slots>>>>,
    /// The pools sharing these slots: a worker short of a slot closes an idle connection of
    /// another worker's.
    pools: Arc<Mutex<Vec<Weak<Inner>>>>,
}

impl BackendSlots {
    fn get(&self, backend: SocketAddr, max: usize) -> Arc<Slots> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(backend).or_insert_with(|| {
            Arc::new(Slots {
                sem: Arc::new(Semaphore::new(max)),
                waiting: AtomicUsize::new(0),
            })
        }))
    }

    /// Close one idle connection to `backend` held by a pool other than `me`; whether one was.
    /// Its permit, released, wakes a waiter of whatever worker.
    fn drop_idle_elsewhere(&self, me: &Inner, backend: SocketAddr) -> bool {
        let pools: Vec<Arc<Inner>> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.retain(|p| p.strong_count() > 0);
            pools.iter().filter_map(Weak::upgrade).collect()
        };
        pools
            .iter()
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), me))
            .any(|p| p.drop_one_idle(backend))
    }

    /// Backends with an entry in the shared map (for tests of the sweep).
    #[cfg(test)]
    pub(super) fn backends(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

struct Slots {
    sem: Arc<Semaphore>,
    /// Requests of every worker waiting for a connection to the backend.
    waiting: AtomicUsize,
}

pub(super) enum UpstreamError {
    /// The request never left (connect refused, failed or timed out): it is handed back.
    NotSent(Box<Request<ProxyBody>>, String),
    /// Connecting failed for a reason of this host's (EMFILE, ENOBUFS, ...): not the
    /// backend's fault, and no other backend would fare better.
    Local(String),
    /// Every connection slot of the backend stayed busy for the connect timeout.
    Saturated,
    /// No response head within the response timeout.
    Timeout,
    /// The backend failed after (part of) the request was sent.
    Failed(String),
}

impl Pool {
    /// A pool of one worker; `shared` holds the per-backend limit for all the workers.
    pub(super) fn new(limits: Limits, shared: BackendSlots) -> Pool {
        let pool = Pool {
            inner: Arc::new(Inner {
                idle: Mutex::new(HashMap::new()),
                slots: Mutex::new(HashMap::new()),
                shared: shared.clone(),
                max_per_backend: limits.max_connections_per_backend.max(1),
                connect_timeout: limits.upstream_connect_timeout,
                response_timeout: limits.upstream_response_timeout,
                max_age: MAX_IDLE_AGE.min(limits.idle_timeout),
            }),
        };
        shared
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&pool.inner));
        pool
    }

    /// Sends `req` to `backend` on an idle pooled connection or a new one, in the calling
    /// task. The connection returns to the pool when the response body is done (and is
    /// closed if the body is dropped before). With every connection slot of the backend
    /// busy, waits up to the connect timeout for one.
    pub(super) async fn request(
        &self,
        backend: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ResponseBody<ProxyBody>>, UpstreamError> {
        // Read only when a request has to wait for a slot.
        let mut deadline = None;
        let local = self.inner.local(backend);
        let mut reused = false;
        // Set once the request has to wait: registered before looking again, so that a
        // connection put back after the look wakes it.
        let mut waiting = false;
        let permit = loop {
            let idle = local.idle.notified();
            tokio::pin!(idle);
            let waiter = waiting.then(|| {
                idle.as_mut().enable();
                Waiting::new(&local)
            });
            if !reused && let Some(conn) = self.inner.checkout(backend) {
                drop(waiter);
                // A pooled connection is tried once; after a failure the request gets a
                // fresh one.
                reused = true;
                // A bodiless idempotent request may be replayed on a fresh connection when the
                // reused one fails before a response: the backend likely closed it as we wrote.
                let may_replay = replayable(&req);
                match self.send(backend, conn, req).await {
                    Ok(resp) => return Ok(resp),
                    Err(ExchangeError::Timeout) => return Err(UpstreamError::Timeout),
                    Err(ExchangeError::NotSent(back, why)) => {
                        log::debug!(
                            "proxy: pooled connection to {backend} was closed ({why}), reconnecting"
                        );
                        req = *back;
                    }
                    Err(ExchangeError::Failed { why, replay }) => match replay {
                        Some(again) if may_replay => {
                            log::debug!(
                                "proxy: reused connection to {backend} failed ({why}), replaying"
                            );
                            req = *again;
                        }
                        _ => return Err(UpstreamError::Failed(why)),
                    },
                }
                continue;
            }
            if let Ok(p) = Arc::clone(&local.slots.sem).try_acquire_owned() {
                break p;
            }
            if !waiting {
                // The fast path found nothing: look again registered as a waiter.
                waiting = true;
                continue;
            }
            // Idle connections hold the slots this request needs: close one, ours or
            // another worker's.
            if !(reused && self.inner.drop_one_idle(backend)) {
                self.inner.shared.drop_idle_elsewhere(&self.inner, backend);
            }
            tokio::select! {
                p = Arc::clone(&local.slots.sem).acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => return Err(UpstreamError::Saturated),
                },
                () = &mut idle => {}
                () = tokio::time::sleep_until(*deadline.get_or_insert_with(|| {
                    tokio::time::Instant::now() + self.inner.connect_timeout
                })) => return Err(UpstreamError::Saturated),
            }
        };
        drop(local);
        let conn = match self.inner.connect(backend, permit).await {
            Ok(conn) => conn,
            Err(Connect::Local(why)) => return Err(UpstreamError::Local(why)),
            Err(Connect::Failed(why)) => return Err(UpstreamError::NotSent(Box::new(req), why)),
        };
        match self.send(backend, conn, req).await {
            Ok(resp) => Ok(resp),
            Err(ExchangeError::Timeout) => Err(UpstreamError::Timeout),
            Err(ExchangeError::NotSent(back, why)) => Err(UpstreamError::NotSent(
                back,
                format!("connection closed before the request was written ({why})"),
            )),
            Err(ExchangeError::Failed { why, .. }) => Err(UpstreamError::Failed(why)),
        }
    }

    async fn send(
        &self,
        backend: SocketAddr,
        conn: Conn,
        req: Request<ProxyBody>,
    ) -> Result<Response<ResponseBody<ProxyBody>>, ExchangeError<ProxyBody>> {
        let pool: Weak<dyn Recycle> = Arc::downgrade(&self.inner) as Weak<dyn Recycle>;
        conn.exchange(req, self.inner.response_timeout, backend, pool)
            .await
    }

    /// Drops idle connections that closed or aged out, and forgets the slots of backends
    /// nobody uses.
    pub(super) fn sweep(&self) {
        let max_age = self.inner.max_age;
        let now = coarse_ms();
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, conns| {
            conns.retain(|c| c.usable(max_age, now) && !c.conn.is_stale());
            !conns.is_empty()
        });
        // This worker's entry goes when no request of this worker holds it and it has no
        // idle connection there (the shared slots stay alive through any open connection's
        // permit, so an entry made again later finds the same semaphore).
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|b, l| Arc::strong_count(l) > 1 || idle.contains_key(b));
        drop(slots);
        drop(idle);
        // The shared entry goes once no worker's entry holds it and no connection is open.
        let max = self.inner.max_per_backend;
        let mut shared = self
            .inner
            .shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        shared.retain(|_, s| Arc::strong_count(s) > 1 || s.sem.available_permits() < max);
    }
}

enum Connect {
    Local(String),
    Failed(String),
}

impl Idle {
    /// `now`: read once by the caller for the whole list (one clock read, not one per entry).
    fn usable(&self, max_age: Duration, now: u64) -> bool {
        u128::from(now.saturating_sub(self.since)) < max_age.as_millis()
    }
}

impl Recycle for Inner {
    /// Pools `conn`, for a waiter of this worker if there is one. With none here but some on
    /// another worker, which could not take it from this pool, it is closed instead: its
    /// released slot goes to one of them.
    fn put(&self, backend: SocketAddr, conn: Conn) {
        let local = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&backend)
            .cloned();
        if let Some(l) = &local
            && l.waiting.load(Ordering::Relaxed) == 0
            && l.slots.waiting.load(Ordering::Relaxed) > 0
        {
            return;
        }
        let now = coarse_ms();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.entry(backend).or_default();
        // Closed and aged entries go in `sweep` and when `checkout` meets them: no scan of
        // the whole list per request.
        if conns.len() >= self.max_per_backend {
            conns.pop_front();
        }
        conns.push_back(Idle { conn, since: now });
        drop(idle);
        // Only a waiter of this worker can take it.
        if let Some(l) = local {
            l.idle.notify_one();
        }
    }
}

impl Inner {
    fn local(&self, backend: SocketAddr) -> Arc<Local> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(backend).or_insert_with(|| {
            Arc::new(Local {
                slots: self.shared.get(backend, self.max_per_backend),
                idle: Notify::new(),
                waiting: AtomicUsize::new(0),
            })
        }))
    }

    /// Close the oldest idle connection to `backend` (the likeliest to be closed by the
    /// backend anyway); whether there was one.
    fn drop_one_idle(&self, backend: SocketAddr) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get_mut(&backend)
            .and_then(|conns| conns.pop_front())
            .is_some()
    }

    /// The most recently used idle connection that is still open and young enough.
    fn checkout(&self, backend: SocketAddr) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.get_mut(&backend)?;
        let mut now = None;
        while let Some(c) = conns.pop_back() {
            let now = *now.get_or_insert_with(coarse_ms);
            if c.usable(self.max_age, now) && !c.conn.is_stale() {
                return Some(c.conn);
            }
        }
        None
    }

    /// A new connection to `backend`, holding `permit` for as long as it is open.
    async fn connect(
        &self,
        backend: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<Conn, Connect> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(backend)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) if crate::neterr::is_local(&e) => {
                    return Err(Connect::Local(format!("connect: {e}")));
                }
                Ok(Err(e)) => return Err(Connect::Failed(format!("connect: {e}"))),
                Err(_) => {
                    return Err(Connect::Failed(format!(
                        "connect: timed out after {:?}",
                        self.connect_timeout
                    )));
                }
            };
        let _ = tcp.set_nodelay(true);
        Ok(Conn::new(tcp, permit))
    }
}

/// Whether `req` may be sent again after a failure: idempotent, no body, no upgrade.
fn replayable(req: &Request<ProxyBody>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) && req.body().is_end_stream()
        && !req.headers().contains_key(http::header::UPGRADE)
}

#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;
