//! The body type used in both directions: a streamed body (the client's, from hyper, or a
//! backend's, from the in-task client) with an inactivity timeout, or a short fixed text;
//! optionally holding an in-flight guard.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::{h1client::ResponseBody, io::InFlight};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub(super) struct BodyIdle(Duration);

#[derive(Debug, thiserror::Error)]
#[error("request body slower than {0} bytes/s")]
pub(super) struct BodyTooSlow(u32);

/// Set when a body was cut for being too slow (the handler answers 408 then).
pub(super) type SlowFlag = Arc<AtomicBool>;

/// A minimum data rate: after `grace`, at least `bytes_per_s` on average since the start.
struct MinRate {
    bytes_per_s: u32,
    grace: Duration,
    /// Set when the body is first found waiting (a body that never waits, most requests',
    /// costs no clock read).
    start: Option<tokio::time::Instant>,
    received: u64,
    timer: Option<Pin<Box<Sleep>>>,
    slow: SlowFlag,
}

impl MinRate {
    /// When the body is too slow if no more bytes come.
    fn deadline(&self, start: tokio::time::Instant) -> tokio::time::Instant {
        let allowed_s = self.received as f64 / f64::from(self.bytes_per_s.max(1));
        start + self.grace + Duration::from_secs_f64(allowed_s.min(1e9))
    }
}

pub(super) struct ProxyBody {
    inner: Inner,
    /// Guards dropped with the body (or at its end).
    on_end: OnEnd,
}

// One body per request, moved rather than stored in bulk: boxing the stream (the common
// variant) to shrink the rare text one would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Text(Option<Bytes>),
    Stream {
        body: Source,
        idle: Duration,
        /// Armed when a poll found no data; reset by each frame.
        sleep: Option<Pin<Box<Sleep>>>,
        armed: bool,
        rate: Option<MinRate>,
    },
}

/// Where a streamed body comes from.
pub(super) enum Source {
    /// A client's request body.
    Client(Incoming),
    /// A backend's response body.
    Backend(ResponseBody<ProxyBody>),
}

impl From<Incoming> for Source {
    fn from(b: Incoming) -> Source {
        Source::Client(b)
    }
}

impl From<ResponseBody<ProxyBody>> for Source {
    fn from(b: ResponseBody<ProxyBody>) -> Source {
        Source::Backend(b)
    }
}

impl Source {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Source::Client(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Source::Backend(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Client(b) => b.is_end_stream(),
            Source::Backend(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Client(b) => b.size_hint(),
            Source::Backend(b) => b.size_hint(),
        }
    }
}

#[derive(Default)]
struct OnEnd {
    inflight: Option<InFlight>,
}

impl OnEnd {
    fn fire(&mut self) {
        self.inflight = None;
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        self.fire();
    }
}

impl ProxyBody {
    pub(super) fn text(s: impl Into<Bytes>) -> ProxyBody {
        let b: Bytes = s.into();
        ProxyBody {
            inner: Inner::Text((!b.is_empty()).then_some(b)),
            on_end: OnEnd::default(),
        }
    }

    pub(super) fn empty() -> ProxyBody {
        ProxyBody::text(Bytes::new())
    }

    /// `body`, failing when no frame arrives for `idle`.
    pub(super) fn stream(body: impl Into<Source>, idle: Duration) -> ProxyBody {
        ProxyBody {
            inner: Inner::Stream {
                body: body.into(),
                idle,
                sleep: None,
                armed: false,
                rate: None,
            },
            on_end: OnEnd::default(),
        }
    }

    /// Fails the body once it averages under `bytes_per_s` after `grace` (0: no minimum);
    /// the flag tells it happened.
    pub(super) fn with_min_rate(
        mut self,
        bytes_per_s: u32,
        grace: Duration,
    ) -> (ProxyBody, SlowFlag) {
        let slow = SlowFlag::default();
        if let Inner::Stream { rate, .. } = &mut self.inner
            && bytes_per_s > 0
        {
            *rate = Some(MinRate {
                bytes_per_s,
                grace,
                start: None,
                received: 0,
                timer: None,
                slow: slow.clone(),
            });
        }
        (self, slow)
    }

    /// Ends `inflight` when the body is done or dropped.
    pub(super) fn with_inflight(mut self, inflight: InFlight) -> ProxyBody {
        self.on_end.inflight = Some(inflight);
        self
    }
}

impl MinRate {
    /// Past the deadline now, or arms the timer for it (so the task wakes then).
    fn too_slow(&mut self, cx: &mut Context<'_>) -> bool {
        let now = tokio::time::Instant::now();
        let start = *self.start.get_or_insert(now);
        let deadline = self.deadline(start);
        if now >= deadline {
            return true;
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Default for ProxyBody {
    /// No body (what a replayed bodiless request carries).
    fn default() -> ProxyBody {
        ProxyBody::empty()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res = match &mut this.inner {
            Inner::Text(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::Stream {
                body,
                idle,
                sleep,
                armed,
                rate,
            } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    *armed = false;
                    if let (Some(r), Some(d)) = (rate.as_mut(), frame.data_ref()) {
                        r.received += d.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending if rate.as_mut().is_some_and(|r| r.too_slow(cx)) => {
                    let r = rate.as_ref().expect("checked");
                    r.slow.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(BodyTooSlow(r.bytes_per_s).into())))
                }
                Poll::Pending => {
                    let deadline = tokio::time::Instant::now() + *idle;
                    let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(*idle)));
                    if !*armed {
                        sleep.as_mut().reset(deadline);
                        *armed = true;
                    }
                    match sleep.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(BodyIdle(*idle).into()))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
        };
        match &res {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.on_end.fire(),
            Poll::Ready(Some(Ok(_))) if this.is_end_stream() => this.on_end.fire(),
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Text(data) => data.is_none(),
            Inner::Stream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Text(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Stream { body, .. } => body.size_hint(),
        }
    }
}
