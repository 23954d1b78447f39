//! One request: normalise the head, route, forward with one retry on connect failure, adjust
//! the response, and set up a tunnel for a successful upgrade.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{
    Extensions, HeaderValue, Method, Request, Response, StatusCode,
    header::{CACHE_CONTROL, CONNECTION, CONTENT_TYPE},
};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;

use super::{
    ConnInfo, Route, Routed, Router, Shared,
    body::ProxyBody,
    h1client::Upgraded,
    headers, inc,
    io::{Activity, Clock, Touch},
    upstream::UpstreamError,
};

/// Work left on a connection once hyper hands it over (a WebSocket tunnel).
pub(super) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the requests of one client connection share.
pub(super) struct ConnCtx {
    pub(super) shared: Arc<Shared>,
    pub(super) info: ConnInfo,
    pub(super) clock: Arc<Clock>,
    pub(super) h2: bool,
    pub(super) tunnel: Mutex<Option<Tunnel>>,
    /// True once the proxy drains (reload or restart): HTTP/1 answers close the connection.
    pub(super) draining: tokio::sync::watch::Receiver<bool>,
    /// [`headers::client_value`] of `info`, for the forwarding headers.
    pub(super) client_value: HeaderValue,
}

pub(super) async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let inflight = ctx.clock.begin();
    let stats = &ctx.shared.stats;
    inc(&stats.requests);
    let mut resp = match forward(&ctx, req).await {
        Ok(resp) => resp,
        Err(status) => error_response(status, ctx.h2),
    };
    // The client's next request goes to whoever serves the listening socket now.
    if !ctx.h2 && resp.status() != StatusCode::SWITCHING_PROTOCOLS && *ctx.draining.borrow() {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    stats.response(resp.status());
    Ok(resp.map(|body| body.with_inflight(inflight)))
}

/// A short text answer made by the proxy. HTTP/1 connections close after it: the request
/// body may be unread and the client should not pipeline behind a failure.
pub(super) fn error_response(status: StatusCode, h2: bool) -> Response<ProxyBody> {
    let text = format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let mut resp = Response::new(ProxyBody::text(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !h2 {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn forward(ctx: &ConnCtx, req: Request<Incoming>) -> Result<Response<ProxyBody>, StatusCode> {
    let shared = &ctx.shared;
    let stats = &shared.stats;
    let idle = shared.limits.idle_timeout;
    let (mut parts, body) = req.into_parts();
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();
    parts.extensions = Extensions::new();
    if parts.method == Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let upgrade = !ctx.h2 && client_upgrade.is_some() && headers::wants_upgrade(&parts);
    let trusted = shared.trusted_forwarders.contains(ctx.info.client.ip());
    headers::prepare_request_for(&mut parts, &ctx.info, &ctx.client_value, upgrade, trusted)?;
    if let Some(location) = shared.router.redirect(&parts, &ctx.info) {
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        resp.headers_mut().insert(http::header::LOCATION, location);
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(resp);
    }

    let limits = &shared.limits;
    let (body, slow) = ProxyBody::stream(body, idle)
        .with_min_rate(limits.min_body_rate, limits.request_header_timeout);
    let mut req = Request::from_parts(parts, body);
    let mut tried = Vec::new();
    let (route, resp, _attempt) = loop {
        let (mut parts, body) = req.into_parts();
        let route = match shared.router.route_or_wait(&mut parts, &ctx.info, &tried)? {
            Routed::Now(route) => route,
            Routed::Wait(wait) => {
                let answer = wait.answer.await;
                shared
                    .router
                    .resume(&mut parts, &ctx.info, &tried, answer)?
            }
        };
        // Reports the end of this attempt however the handler leaves (answer, error, retry).
        let attempt = Attempt {
            router: shared.router.as_ref(),
            route: route.clone(),
        };
        req = Request::from_parts(parts, body);
        let backend = route.backend;
        match shared.pool.request(backend, req).await {
            Ok(resp) => break (route, resp, attempt),
            Err(UpstreamError::NotSent(back, why)) => {
                inc(&stats.upstream_connect_errors);
                tried.push(backend);
                if tried.len() >= 2 {
                    log::warn!("proxy: backend {backend}: {why}; giving up");
                    return Err(StatusCode::BAD_GATEWAY);
                }
                log::warn!("proxy: backend {backend}: {why}; routing again");
                inc(&stats.retries);
                req = *back;
            }
            Err(UpstreamError::Timeout) => {
                inc(&stats.upstream_timeouts);
                log::warn!(
                    "proxy: backend {backend}: no response within {:?}",
                    shared.limits.upstream_response_timeout
                );
                return Err(StatusCode::GATEWAY_TIMEOUT);
            }
            Err(UpstreamError::Local(why)) => {
                // Not the backend's fault: no retry elsewhere (that would move a persisted
                // client), no mark against it.
                inc(&stats.local_errors);
                log::warn!("proxy: backend {backend}: {why} (a local error)");
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
            Err(UpstreamError::Saturated) => {
                inc(&stats.backend_saturated);
                log::warn!(
                    "proxy: backend {backend}: all {} connections busy",
                    limits.max_connections_per_backend
                );
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
            Err(UpstreamError::Failed(_)) if slow.load(std::sync::atomic::Ordering::Relaxed) => {
                inc(&stats.slow_bodies);
                log::info!(
                    "proxy: {}: request body slower than {} bytes/s: 408",
                    ctx.info.client,
                    limits.min_body_rate
                );
                return Err(StatusCode::REQUEST_TIMEOUT);
            }
            Err(UpstreamError::Failed(why)) => {
                inc(&stats.upstream_errors);
                log::warn!("proxy: backend {backend}: {why}");
                return Err(StatusCode::BAD_GATEWAY);
            }
        }
    };

    let (mut parts, body) = resp.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    if switching && !upgrade {
        inc(&stats.upstream_errors);
        log::warn!(
            "proxy: backend {}: 101 to a request without Upgrade",
            route.backend
        );
        return Err(StatusCode::BAD_GATEWAY);
    }
    headers::strip_hop_by_hop(&mut parts.headers, switching);
    shared.router.on_response(&route, &ctx.info, &mut parts);

    if switching {
        let (Some(client), Some(upstream)) = (client_upgrade, body.into_upgrade()) else {
            inc(&stats.upstream_errors);
            return Err(StatusCode::BAD_GATEWAY);
        };
        let tunnel = tunnel(client, upstream, idle, shared.clone(), route.backend);
        *ctx.tunnel.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::pin(tunnel));
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }
    Ok(Response::from_parts(parts, ProxyBody::stream(body, idle)))
}

/// Splices the upgraded client and backend connections until either side closes or nothing
/// moves for `idle`.
async fn tunnel(
    client: OnUpgrade,
    upstream: Upgraded,
    idle: Duration,
    shared: Arc<Shared>,
    backend: std::net::SocketAddr,
) {
    let Upgraded {
        io: upstream,
        read: early,
        permit: _slot,
    } = upstream;
    let client = match tokio::time::timeout(idle, client).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            log::debug!("proxy: upgrade to {backend} failed: {e}");
            return;
        }
        Err(_) => {
            log::debug!("proxy: upgrade to {backend} timed out");
            return;
        }
    };
    inc(&shared.stats.upgrades);
    let activity = Arc::new(Activity::new());
    let mut client = Touch::new(TokioIo::new(client), activity.clone());
    // What the backend sent right after its 101 head, read with it; bounded like the rest
    // of the tunnel, so a client that never reads does not hold the backend's slot.
    if !early.is_empty() {
        match tokio::time::timeout(idle, client.write_all(&early)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                log::debug!("proxy: tunnel to {backend}: {e}");
                return;
            }
            Err(_) => {
                log::debug!("proxy: tunnel to {backend}: client idle for {idle:?}, closed");
                return;
            }
        }
    }
    let mut upstream = Touch::new(upstream, activity.clone());
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match res {
            Ok((up, down)) => log::debug!("proxy: tunnel to {backend} closed ({up} bytes up, {down} down)"),
            Err(e) => log::debug!("proxy: tunnel to {backend}: {e}"),
        },
        () = activity.idle_for(idle) => log::debug!("proxy: tunnel to {backend} idle for {idle:?}, closed"),
    }
}

/// Calls `Router::finished` for one routed attempt when dropped.
struct Attempt<'a> {
    router: &'a dyn Router,
    route: Route,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.router.finished(&self.route);
    }
}
