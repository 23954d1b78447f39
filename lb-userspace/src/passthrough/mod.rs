//! The TLS pass-through proxy (Kemp service type "Generic" with TLS not terminated): for an
//! L7 service with `"tls_passthrough": true`, each client connection's ClientHello is read
//! (within the header timeout, up to `max_header_bytes`), the engine decides the backend on
//! it (session ID, ticket, SNI or client address, by the service's profile), the buffered
//! bytes are sent to the backend and the bytes are spliced both ways. The server's cleartext
//! handshake (its ServerHello and a TLS 1.2 ticket) is watched on the way back and given to
//! the engine, which is how the SSL session ID method learns its bindings.
//!
//! A connection whose first bytes are not a well-formed ClientHello is closed and counted
//! (`tls_hello_errors`); one that sends nothing usable within the header timeout is closed
//! and counted as a handshake error. Neither reaches a backend.

#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
    time::Instant,
};

use crate::{
    engine::{Engine, input::Input, methods::Decision, methods::Reply},
    proxy::{ConnInfo, Count, Limits, ProxyConfig, ProxyError, ProxyStats, Router},
    tlswire::{NoHello, ServerScan, read_client_hello},
};

/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How much of the server's stream is watched for its cleartext handshake (certificate
/// chains included); past it the rest is only spliced.
const SERVER_SCAN_LIMIT: usize = 256 * 1024;
/// Bytes copied per read.
const READ_CHUNK: usize = 16 * 1024;

/// The listener's settings are usable: its connection limit.
fn check(cfg: &ProxyConfig) -> Result<Arc<Semaphore>, ProxyError> {
    let limits = cfg.limits;
    if limits.max_connections == 0 {
        return Err(ProxyError::Config("max_connections is 0".into()));
    }
    if cfg.tls.is_some() || cfg.proxy_protocol.is_some() {
        return Err(ProxyError::Config(
            "TLS pass-through neither terminates TLS nor reads a PROXY header".into(),
        ));
    }
    log::info!("proxy: serving {} (TLS pass-through)", cfg.listen);
    Ok(Arc::new(Semaphore::new(limits.max_connections)))
}

/// Serve pass-through connections from `listener` until `shutdown` turns true (or its sender
/// is dropped); then in-flight connections get [`Limits::shutdown_grace`] before being cut.
pub async fn serve(
    listener: TcpListener,
    cfg: ProxyConfig,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
    stats: Arc<ProxyStats>,
) -> Result<(), ProxyError> {
    let permits = check(&cfg)?;
    accept_loop(listener, cfg, engine, shutdown, stats, permits).await;
    Ok(())
}

/// [`serve`] on every worker of `workers`, accepting on `sockets` (see [`crate::workers`]);
/// `max_connections` holds for the whole listener.
pub async fn serve_on(
    sockets: Vec<std::net::TcpListener>,
    workers: crate::workers::Workers,
    cfg: ProxyConfig,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
    stats: Arc<ProxyStats>,
) -> Result<(), ProxyError> {
    let permits = check(&cfg)?;
    let listen = cfg.listen;
    workers
        .run_accept_loops(sockets, |_, socket| {
            let (cfg, engine, stats) = (cfg.clone(), engine.clone(), stats.clone());
            let (shutdown, permits) = (shutdown.clone(), permits.clone());
            async move {
                match crate::workers::register_listener(socket) {
                    Ok(l) => accept_loop(l, cfg, engine, shutdown, stats, permits).await,
                    Err(e) => log::error!("pass-through: {listen}: listening socket: {e}"),
                }
            }
        })
        .await;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    cfg: ProxyConfig,
    engine: Arc<Engine>,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<ProxyStats>,
    permits: Arc<Semaphore>,
) {
    let limits = cfg.limits;
    let mut tasks = JoinSet::new();
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
                    log::error!("pass-through: connection task panicked: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        stats.count(Count::Accepted);
                        let local = tcp.local_addr().unwrap_or(cfg.listen);
                        let conn = Conn {
                            engine: engine.clone(),
                            stats: stats.clone(),
                            limits,
                            info: ConnInfo { client: peer, local, tls: true, alpn_h2: false, session: None },
                        };
                        tasks.spawn(async move {
                            conn.run(tcp).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        stats.count(Count::Rejected);
                        drop(tcp);
                    }
                },
                Err(e) => {
                    log::warn!("pass-through: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        log::warn!(
            "pass-through: {} connection(s) cut after the shutdown grace",
            tasks.len()
        );
        tasks.shutdown().await;
    }
}

/// Last activity in either direction, for the idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Returns once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Reports the end of a decided connection to the engine and the counters, however the task
/// ends.
struct Ended<'a> {
    engine: &'a Engine,
    decision: Decision,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.engine.ended(&self.decision);
    }
}

struct Closed {
    engine: Arc<Engine>,
    stats: Arc<ProxyStats>,
    info: ConnInfo,
    opened: bool,
}

impl Drop for Closed {
    fn drop(&mut self) {
        if self.opened {
            self.engine.connection_closed(&self.info);
        }
        self.stats.count(Count::Closed);
    }
}

struct Conn {
    engine: Arc<Engine>,
    stats: Arc<ProxyStats>,
    limits: Limits,
    info: ConnInfo,
}

impl Conn {
    async fn run(self, mut client: TcpStream) {
        let mut closed = Closed {
            engine: self.engine.clone(),
            stats: self.stats.clone(),
            info: self.info,
            opened: false,
        };
        let peer = self.info.client;
        let (hello, first) = match read_client_hello(
            &mut client,
            Vec::new(),
            self.limits.max_header_bytes,
            self.limits.request_header_timeout,
        )
        .await
        {
            Ok(h) => h,
            Err(NoHello::Bad(e)) => {
                self.stats.count(Count::TlsHelloError);
                log::debug!("pass-through: {peer}: {e}");
                return;
            }
            Err(NoHello::TimedOut) => {
                self.stats.count(Count::HandshakeError);
                log::debug!("pass-through: {peer}: no ClientHello within the header timeout");
                return;
            }
            Err(NoHello::Io(e)) => {
                log::debug!("pass-through: {peer}: {e}");
                return;
            }
            Err(NoHello::Closed) => return,
        };
        self.engine.connection_opened(&self.info);
        closed.opened = true;

        // Decide, and connect; a backend that refuses is tried no more for this client.
        let mut tried: Vec<SocketAddr> = Vec::new();
        let (upstream, decision) = loop {
            if !tried.is_empty() {
                self.stats.count(Count::Retry);
            }
            // A first attempt whose session is bound nowhere here asks the mirror.
            let choice = match self
                .engine
                .decide_asking(&mut Input::tls_hello(&hello, peer), &tried)
                .await
            {
                Ok(c) => c,
                Err(why) => {
                    log::debug!("pass-through: {peer}: no backend ({why:?})");
                    return;
                }
            };
            let connect = TcpStream::connect(choice.backend);
            match tokio::time::timeout(self.limits.upstream_connect_timeout, connect).await {
                Ok(Ok(s)) => break (s, choice.decision),
                Ok(Err(e)) => log::debug!("pass-through: {}: {e}", choice.backend),
                Err(_) => log::debug!("pass-through: {}: connect timed out", choice.backend),
            }
            self.stats.count(Count::ConnectError);
            self.engine.ended(&choice.decision);
            tried.push(choice.backend);
        };
        let _ended = Ended {
            engine: &self.engine,
            decision,
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        if uw.write_all(&first).await.is_err() {
            return;
        }
        let activity = Activity::new();
        let up = pump(&mut cr, &mut uw, &activity, |_| {});
        let mut scan = ServerScan::new(SERVER_SCAN_LIMIT);
        let engine = &self.engine;
        let down = pump(&mut ur, &mut cw, &activity, |data| {
            if scan.done() {
                return;
            }
            for event in scan.push(data) {
                engine.reply(&decision, &mut Reply::TlsServer(&event));
            }
            if scan.malformed() {
                log::debug!("pass-through: {peer}: the server's handshake is not readable");
            }
        });
        tokio::select! {
            _ = async { tokio::join!(up, down) } => {}
            _ = activity.idle_for(self.limits.idle_timeout) => {
                log::debug!("pass-through: {peer}: idle for {:?}", self.limits.idle_timeout);
            }
        }
    }
}

/// Copy `from` to `to` until EOF or an error, then shut `to`'s write side; `watch` sees each
/// chunk before it is forwarded.
async fn pump<R, W>(from: &mut R, to: &mut W, activity: &Activity, mut watch: impl FnMut(&[u8]))
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        activity.touch();
        watch(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        activity.touch();
    }
    let _ = to.shutdown().await;
}
