//! Backend side: HTTP/1.1 connections kept alive in a per-backend pool, connect and response
//! timeouts, and the distinction between a request that never left (safe to route elsewhere)
//! and one that did.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use http::{Method, Request, Response};
use hyper::{
    body::{Body as _, Incoming},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot},
};

use super::{Limits, body::ProxyBody, io::coarse_ms};

/// An idle backend connection older than this is closed rather than reused: backends
/// commonly close idle keep-alive connections after a few seconds (Apache, Node: 5 s), and
/// reusing one as it closes costs a failed request. HAProxy's `pool-purge-delay` is 5 s too.
const MAX_IDLE_AGE: Duration = Duration::from_secs(5);

type Sender = http1::SendRequest<ProxyBody>;

struct Idle {
    tx: Sender,
    /// [`coarse_ms`] when it went idle.
    since: u64,
}

pub(super) struct Pool {
    inner: Arc<Inner>,
}

/// A backend connection lent to one response: dropped once the response body is done (or
/// abandoned), it puts the connection back in the pool. Usually the connection is idle again
/// by then and goes back at once; otherwise (a body cut short, an upgrade, the connection
/// task not yet run) a task waits until it is idle, or closed.
pub(super) struct Checkin {
    tx: Option<Sender>,
    backend: SocketAddr,
    pool: Weak<Inner>,
}

impl Drop for Checkin {
    fn drop(&mut self) {
        let Some(mut tx) = self.tx.take() else {
            return;
        };
        if tx.is_closed() {
            return;
        }
        if tx.is_ready() {
            if let Some(pool) = Weak::upgrade(&self.pool) {
                pool.put(self.backend, tx);
            }
            return;
        }
        let (pool, backend) = (self.pool.clone(), self.backend);
        // Outside a runtime (nothing to wait with) the connection is just closed.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if tx.ready().await.is_ok()
                    && let Some(pool) = Weak::upgrade(&pool)
                {
                    pool.put(backend, tx);
                }
            });
        }
    }
}

struct Inner {
    /// Idle connections per backend, oldest first; the most recently used are reused first.
    /// As many may wait here as the backend has slots (`max_connections_per_backend`): with
    /// fewer, a burst of concurrent requests would close and reopen connections each time.
    idle: Mutex<HashMap<SocketAddr, VecDeque<Idle>>>,
    /// This pool's view of `shared`'s slots (no lock shared with other workers per request).
    slots: Mutex<HashMap<SocketAddr, Arc<Slots>>>,
    shared: BackendSlots,
    max_per_backend: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_age: Duration,
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
                idle: Notify::new(),
            })
        }))
    }

    /// Close one idle connection to `backend` held by a pool other than `me`; whether one was.
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
}

struct Slots {
    sem: Arc<Semaphore>,
    /// A connection went back to the pool: a waiter may take it.
    idle: Notify,
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

    /// Sends `req` to `backend` on an idle pooled connection or a new one. The connection
    /// returns to the pool when the [`Checkin`] is dropped, which the caller does once the
    /// response body has been read. With every connection slot of the backend busy, waits up
    /// to the connect timeout for one.
    pub(super) async fn request(
        &self,
        backend: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Checkin), UpstreamError> {
        // Read only when a request has to wait for a slot.
        let mut deadline = None;
        let slots = self.inner.slots(backend);
        let mut reused = false;
        let permit = loop {
            let idle = slots.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if !reused && let Some(mut tx) = self.inner.checkout(backend) {
                // A pooled connection is tried once; after a failure the request gets a
                // fresh one.
                reused = true;
                // A bodiless idempotent request may be replayed on a fresh connection when the
                // reused one fails before a response: the backend likely closed it as we wrote.
                let replay = replayable(&req);
                match self.send(&mut tx, req).await {
                    Ok(resp) => return Ok((resp, self.recycle(backend, tx))),
                    Err(Sent::Timeout) => return Err(UpstreamError::Timeout),
                    Err(Sent::No(back)) => {
                        log::debug!(
                            "proxy: pooled connection to {backend} was closed, reconnecting"
                        );
                        req = *back;
                    }
                    Err(Sent::Failed(e)) => match replay {
                        Some(again) => {
                            log::debug!(
                                "proxy: reused connection to {backend} failed ({e}), replaying"
                            );
                            req = again;
                        }
                        None => return Err(UpstreamError::Failed(e.to_string())),
                    },
                }
                continue;
            }
            if let Ok(p) = Arc::clone(&slots.sem).try_acquire_owned() {
                break p;
            }
            // Idle connections hold the slots this request needs: close one, ours or
            // another worker's.
            if !(reused && self.inner.drop_one_idle(backend)) {
                self.inner.shared.drop_idle_elsewhere(&self.inner, backend);
            }
            tokio::select! {
                p = Arc::clone(&slots.sem).acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => return Err(UpstreamError::Saturated),
                },
                () = &mut idle => {}
                () = tokio::time::sleep_until(*deadline.get_or_insert_with(|| {
                    tokio::time::Instant::now() + self.inner.connect_timeout
                })) => return Err(UpstreamError::Saturated),
            }
        };
        let mut tx = match self.inner.connect(backend, permit).await {
            Ok(tx) => tx,
            Err(Connect::Local(why)) => return Err(UpstreamError::Local(why)),
            Err(Connect::Failed(why)) => return Err(UpstreamError::NotSent(Box::new(req), why)),
        };
        match self.send(&mut tx, req).await {
            Ok(resp) => Ok((resp, self.recycle(backend, tx))),
            Err(Sent::Timeout) => Err(UpstreamError::Timeout),
            Err(Sent::No(back)) => Err(UpstreamError::NotSent(
                back,
                "connection closed before the request was written".into(),
            )),
            Err(Sent::Failed(e)) => Err(UpstreamError::Failed(e.to_string())),
        }
    }

    async fn send(
        &self,
        tx: &mut Sender,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, Sent> {
        let body_done = req.body_mut().signal_end();
        let fut = tx.try_send_request(req);
        match with_response_timeout(fut, body_done, self.inner.response_timeout).await {
            Some(Ok(resp)) => Ok(resp),
            Some(Err(mut e)) => match e.take_message() {
                Some(req) => Err(Sent::No(Box::new(req))),
                None => Err(Sent::Failed(e.into_error())),
            },
            None => Err(Sent::Timeout),
        }
    }

    /// `tx`'s way back to the pool, taken when the response body is done.
    fn recycle(&self, backend: SocketAddr, tx: Sender) -> Checkin {
        Checkin {
            tx: Some(tx),
            backend,
            pool: Arc::downgrade(&self.inner),
        }
    }

    /// Drops idle connections that closed or aged out.
    pub(super) fn sweep(&self) {
        let max_age = self.inner.max_age;
        let now = coarse_ms();
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, conns| {
            conns.retain(|c| c.usable(max_age, now));
            !conns.is_empty()
        });
        drop(idle);
        // Forget the slots of backends with nothing open and nobody waiting: here (held by
        // this map and the shared one), then in the shared map once no pool holds them.
        let max = self.inner.max_per_backend;
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|_, s| Arc::strong_count(s) > 2 || s.sem.available_permits() < max);
        drop(slots);
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

enum Sent {
    /// Not written: the request is handed back.
    No(Box<Request<ProxyBody>>),
    Timeout,
    Failed(hyper::Error),
}

impl Idle {
    /// `now`: read once by the caller for the whole list (one clock read, not one per entry).
    fn usable(&self, max_age: Duration, now: u64) -> bool {
        u128::from(now.saturating_sub(self.since)) < max_age.as_millis() && !self.tx.is_closed()
    }
}

impl Inner {
    fn slots(&self, backend: SocketAddr) -> Arc<Slots> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            slots
                .entry(backend)
                .or_insert_with(|| self.shared.get(backend, self.max_per_backend)),
        )
    }

    /// Close the oldest idle connection to `backend` (the likeliest to be closed by the
    /// backend anyway); whether there was one.
    fn drop_one_idle(&self, backend: SocketAddr) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get_mut(&backend)
            .and_then(|conns| conns.pop_front())
            .is_some()
    }

    fn checkout(&self, backend: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.get_mut(&backend)?;
        let now = coarse_ms();
        while let Some(c) = conns.pop_back() {
            if c.usable(self.max_age, now) && c.tx.is_ready() {
                return Some(c.tx);
            }
        }
        None
    }

    fn put(&self, backend: SocketAddr, tx: Sender) {
        if tx.is_closed() {
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
        conns.push_back(Idle { tx, since: now });
        drop(idle);
        if let Some(s) = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&backend)
        {
            s.idle.notify_one();
        }
    }

    /// A new connection to `backend`, holding `permit` for as long as it is open.
    async fn connect(
        &self,
        backend: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<Sender, Connect> {
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
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Connect::Failed(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.with_upgrades().await {
                log::debug!("proxy: backend {backend} connection: {e}");
            }
        });
        Ok(tx)
    }
}

/// A copy of a bodiless idempotent request, to replay on another connection.
fn replayable(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent
        || !req.body().is_end_stream()
        || req.headers().contains_key(http::header::UPGRADE)
    {
        return None;
    }
    let mut copy = Request::new(ProxyBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The response, or `None` when none came within `timeout` of the end of the request body.
async fn with_response_timeout<F, T>(
    fut: F,
    body_done: oneshot::Receiver<()>,
    timeout: Duration,
) -> Option<T>
where
    F: Future<Output = T>,
{
    let timer = async {
        // Err: the body was dropped, which also means it is done.
        let _ = body_done.await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        res = fut => Some(res),
        () = timer => None,
    }
}
