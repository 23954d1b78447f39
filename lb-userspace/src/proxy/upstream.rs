//! Backend side: HTTP/1.1 connections kept alive in a per-backend pool, connect and response
//! timeouts, and the distinction between a request that never left (safe to route elsewhere)
//! and one that did.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use http::{Method, Request, Response};
use hyper::{
    body::{Body as _, Incoming},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::oneshot};

use super::{Limits, body::ProxyBody};

/// Idle connections kept per backend (the most recently used are reused first).
const MAX_IDLE_PER_BACKEND: usize = 64;
/// An idle backend connection older than this is closed rather than reused: backends
/// commonly close idle keep-alive connections after a few seconds (Apache, Node: 5 s), and
/// reusing one as it closes costs a failed request. HAProxy's `pool-purge-delay` is 5 s too.
const MAX_IDLE_AGE: Duration = Duration::from_secs(5);

type Sender = http1::SendRequest<ProxyBody>;

struct Idle {
    tx: Sender,
    since: Instant,
}

pub(super) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_age: Duration,
}

pub(super) enum UpstreamError {
    /// The request never left (connect refused, failed or timed out): it is handed back.
    NotSent(Box<Request<ProxyBody>>, String),
    /// No response head within the response timeout.
    Timeout,
    /// The backend failed after (part of) the request was sent.
    Failed(String),
}

impl Pool {
    pub(super) fn new(limits: Limits) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                idle: Mutex::new(HashMap::new()),
                connect_timeout: limits.upstream_connect_timeout,
                response_timeout: limits.upstream_response_timeout,
                max_age: MAX_IDLE_AGE.min(limits.idle_timeout),
            }),
        }
    }

    /// Sends `req` to `backend` on an idle pooled connection or a new one. The connection
    /// returns to the pool once the response body has been read.
    pub(super) async fn request(
        &self,
        backend: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if let Some(mut tx) = self.inner.checkout(backend) {
            // A bodiless idempotent request may be replayed on a fresh connection when the
            // reused one fails before a response: the backend likely closed it as we wrote.
            let replay = replayable(&req);
            match self.send(&mut tx, req).await {
                Ok(resp) => {
                    self.recycle(backend, tx);
                    return Ok(resp);
                }
                Err(Sent::Timeout) => return Err(UpstreamError::Timeout),
                Err(Sent::No(back)) => {
                    log::debug!("proxy: pooled connection to {backend} was closed, reconnecting");
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
        }
        let mut tx = match self.inner.connect(backend).await {
            Ok(tx) => tx,
            Err(why) => return Err(UpstreamError::NotSent(Box::new(req), why)),
        };
        match self.send(&mut tx, req).await {
            Ok(resp) => {
                self.recycle(backend, tx);
                Ok(resp)
            }
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

    /// Puts `tx` back in the pool once its connection is idle again (response body read).
    fn recycle(&self, backend: SocketAddr, mut tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            if tx.ready().await.is_ok()
                && let Some(pool) = Weak::upgrade(&pool)
            {
                pool.put(backend, tx);
            }
        });
    }

    /// Drops idle connections that closed or aged out.
    pub(super) fn sweep(&self) {
        let max_age = self.inner.max_age;
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, conns| {
            conns.retain(|c| c.usable(max_age));
            !conns.is_empty()
        });
    }
}

enum Sent {
    /// Not written: the request is handed back.
    No(Box<Request<ProxyBody>>),
    Timeout,
    Failed(hyper::Error),
}

impl Idle {
    fn usable(&self, max_age: Duration) -> bool {
        self.since.elapsed() < max_age && !self.tx.is_closed()
    }
}

impl Inner {
    fn checkout(&self, backend: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.get_mut(&backend)?;
        while let Some(c) = conns.pop() {
            if c.usable(self.max_age) && c.tx.is_ready() {
                return Some(c.tx);
            }
        }
        None
    }

    fn put(&self, backend: SocketAddr, tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.entry(backend).or_default();
        conns.retain(|c| c.usable(self.max_age));
        if conns.len() >= MAX_IDLE_PER_BACKEND {
            conns.remove(0);
        }
        conns.push(Idle {
            tx,
            since: Instant::now(),
        });
    }

    async fn connect(&self, backend: SocketAddr) -> Result<Sender, String> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(backend)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(format!("connect: {e}")),
                Err(_) => {
                    return Err(format!(
                        "connect: timed out after {:?}",
                        self.connect_timeout
                    ));
                }
            };
        let _ = tcp.set_nodelay(true);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
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
