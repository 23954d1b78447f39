//! One client connection: PROXY header, TLS handshake, then hyper's HTTP/1.1 or HTTP/2
//! server under the proxy's idle and header timeouts and graceful shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
    time::Instant,
};

use super::{
    ConnInfo, Limits, ProxyStats, Router, Shared,
    handler::{self, ConnCtx},
    headers, inc,
    io::{ClientIo, Clock},
    proxy_protocol,
    tls::ALPN_H2,
};
use crate::tlswire::{NoHello, read_client_hello};

/// hyper's default HTTP/1 read buffer limit; raised only for larger header limits.
const H1_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;
/// After an idle HTTP/2 connection's GOAWAY, how long the client has to close.
const H2_GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// Draining: how long an idle HTTP/1 keep-alive connection is left open for a request that
/// may already be on its way (it is answered with `Connection: close`). Closing at once
/// would make a client that just sent one see a reset instead of an answer.
const DRAIN_IDLE_WAIT: Duration = Duration::from_secs(1);
/// Draining: how often the connection's state is looked at.
const DRAIN_TICK: Duration = Duration::from_millis(50);

/// Counts the connection closed however its task ends.
struct Closed(Arc<ProxyStats>);

impl Drop for Closed {
    fn drop(&mut self) {
        inc(&self.0.connections_closed);
    }
}

/// Tells the router the connection closed, however its task ends.
struct Opened {
    router: Arc<dyn Router>,
    info: ConnInfo,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.router.connection_closed(&self.info);
    }
}

pub(super) async fn run(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let _closed = Closed(shared.stats.clone());
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    let limits = shared.limits;
    let clock = Arc::new(Clock::new());
    let handshake_deadline = Instant::now() + limits.request_header_timeout;

    let trusted = shared
        .proxy_protocol
        .as_ref()
        .map(|t| t.contains(peer.ip()));
    let (client, local, rest) = match trusted {
        Some(true) => {
            let header =
                tokio::time::timeout_at(handshake_deadline, proxy_protocol::read_header(&mut tcp))
                    .await;
            match header {
                Ok(Ok((header, rest))) => {
                    let (client, local) = header.addrs.unwrap_or((peer, local));
                    (client, local, rest)
                }
                Ok(Err(e)) => {
                    inc(&shared.stats.handshake_errors);
                    log::debug!("proxy: {peer}: {e}");
                    return;
                }
                Err(_) => {
                    inc(&shared.stats.handshake_errors);
                    log::debug!("proxy: {peer}: no PROXY header in time");
                    return;
                }
            }
        }
        // An untrusted peer is a client: it may not claim another address.
        Some(false) => {
            match tokio::time::timeout_at(handshake_deadline, proxy_protocol::sniff(&mut tcp)).await
            {
                Ok(Ok((false, rest))) => (peer, local, rest),
                Ok(Ok((true, _))) => {
                    inc(&shared.stats.proxy_header_refused);
                    // Counted, not logged above debug: a client could flood the log.
                    log::debug!(
                        "proxy: {peer} sent a PROXY protocol header but is not a trusted source: closed"
                    );
                    return;
                }
                Ok(Err(e)) => {
                    log::debug!("proxy: {peer}: {e}");
                    return;
                }
                Err(_) => {
                    inc(&shared.stats.handshake_errors);
                    log::debug!("proxy: {peer}: nothing received in time");
                    return;
                }
            }
        }
        None => (peer, local, Bytes::new()),
    };
    let Some(_source_slot) = shared.sources.acquire(client.ip()) else {
        inc(&shared.stats.source_rejected);
        log::debug!(
            "proxy: {client}: {} connections from this source already open: closed",
            limits.max_connections_per_source
        );
        return;
    };
    match &shared.tls {
        None => {
            let io = ClientIo::new(tcp, rest, clock.clone());
            let info = ConnInfo {
                client,
                local,
                tls: false,
                alpn_h2: false,
                session: None,
            };
            serve_http(shared.clone(), info, io, clock, shutdown).await;
        }
        Some(handle) => {
            let acceptor = handle.acceptor();
            let mut info = ConnInfo {
                client,
                local,
                tls: true,
                alpn_h2: false,
                session: None,
            };
            let (io, session_acceptor) = if shared.router.uses_tls_sessions() {
                // TLS persistence: the router decides the connection's backend from the
                // ClientHello and seals it into the tickets of a per-connection config.
                let wait = handshake_deadline.saturating_duration_since(Instant::now());
                let hello =
                    read_client_hello(&mut tcp, rest.to_vec(), limits.max_header_bytes, wait).await;
                let (hello, bytes) = match hello {
                    Ok(h) => h,
                    Err(e) => {
                        if !matches!(e, NoHello::Closed) {
                            inc(&shared.stats.handshake_errors);
                        }
                        log::debug!("proxy: {client}: ClientHello: {e:?}");
                        return;
                    }
                };
                let session = shared.router.tls_session(&info, &hello);
                let per_conn = session.map(|s| {
                    info.session = Some(s.backend);
                    let mut cfg = (**acceptor.config()).clone();
                    cfg.ticketer = s.ticketer;
                    // rustls picks TLS 1.2 session IDs itself: no cache, tickets only.
                    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
                    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
                });
                (
                    ClientIo::new(tcp, Bytes::from(bytes), clock.clone()),
                    per_conn,
                )
            } else {
                (ClientIo::new(tcp, rest, clock.clone()), None)
            };
            let acceptor = session_acceptor.as_ref().unwrap_or(&acceptor);
            let tls = match tokio::time::timeout_at(handshake_deadline, acceptor.accept(io)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    inc(&shared.stats.handshake_errors);
                    log::debug!("proxy: {client}: TLS handshake: {e}");
                    return;
                }
                Err(_) => {
                    inc(&shared.stats.handshake_errors);
                    log::debug!("proxy: {client}: TLS handshake timed out");
                    return;
                }
            };
            info.alpn_h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            serve_http(shared.clone(), info, tls, clock, shutdown).await;
        }
    }
}

async fn serve_http<I>(
    shared: Arc<Shared>,
    info: ConnInfo,
    io: I,
    clock: Arc<Clock>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared.router.connection_opened(&info);
    let _opened = Opened {
        router: shared.router.clone(),
        info,
    };
    let limits = shared.limits;
    let Some(client_value) = headers::client_value(&info) else {
        return;
    };
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        info,
        clock: clock.clone(),
        h2: info.alpn_h2,
        tunnel: Mutex::new(None),
        draining: shutdown.clone(),
        client_value,
    });
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| handler::handle(ctx.clone(), req))
    };
    let io = TokioIo::new(io);

    let result = if info.alpn_h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(limits.h2_max_concurrent_streams);
        let conn = builder.serve_connection(io, service);
        drive(
            conn,
            |c| c.graceful_shutdown(),
            &clock,
            true,
            &limits,
            &mut shutdown,
        )
        .await
    } else {
        let mut builder = http1::Builder::new();
        // The proxy's own clock enforces header and idle timeouts (see `Clock::deadline`).
        builder
            .max_header_size(limits.max_header_bytes)
            .header_read_timeout(None)
            .max_buf_size(H1_DEFAULT_MAX_BUF.max(limits.max_header_bytes + 1024));
        let conn = builder.serve_connection(io, service).with_upgrades();
        drive(
            conn,
            |c| c.graceful_shutdown(),
            &clock,
            false,
            &limits,
            &mut shutdown,
        )
        .await
    };
    if let Err(e) = result {
        if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
            inc(&shared.stats.client_errors);
        }
        log::debug!("proxy: {}: {e}", info.client);
    }
    let tunnel = ctx.tunnel.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(tunnel) = tunnel {
        tunnel.await;
    }
}

/// Polls `conn` to completion, closing it when the clock's deadline passes (idle, slow head)
/// and draining it when `shutdown` turns true: HTTP/2 gets a GOAWAY and finishes its
/// streams; HTTP/1 finishes the request in flight (hyper then answers with `Connection:
/// close`), an idle one is given [`DRAIN_IDLE_WAIT`] for a request already on its way (the
/// handler answers it with `Connection: close`), then closed.
async fn drive<C>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    clock: &Clock,
    h2: bool,
    limits: &Limits,
    shutdown: &mut watch::Receiver<bool>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut conn = pin!(conn);
    // Re-check at least this often: a head may start or a request end between wake-ups.
    let tick = (limits.request_header_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut stopping = false;
    // HTTP/1 draining while idle: close at this instant if still idle.
    let mut idle_close: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let tick = if idle_close.is_some() {
            DRAIN_TICK
        } else {
            tick
        };
        let wake = match clock.deadline(h2, limits) {
            Some(d) => Instant::from_std(d).min(now + tick),
            None => now + tick,
        };
        tokio::select! {
            res = conn.as_mut() => return res,
            () = stopped(shutdown), if !stopping && idle_close.is_none() => {
                if h2 || clock.in_flight() {
                    stopping = true;
                    graceful(conn.as_mut());
                } else {
                    idle_close = Some(Instant::now() + DRAIN_IDLE_WAIT);
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if let Some(at) = idle_close
                    && !stopping
                {
                    if clock.in_flight() {
                        stopping = true;
                        graceful(conn.as_mut());
                    } else if Instant::now() >= at && !clock.head_started() {
                        return Ok(());
                    }
                }
                let expired = clock
                    .deadline(h2, limits)
                    .is_some_and(|d| std::time::Instant::now() >= d);
                if expired && !stopping {
                    if h2 {
                        graceful(conn.as_mut());
                        return tokio::time::timeout(H2_GOAWAY_GRACE, conn).await.unwrap_or(Ok(()));
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// Resolves when `rx` turns true or its sender is gone.
pub(super) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it at once.
    let _ = rx.wait_for(|stop| *stop).await.is_ok();
}
