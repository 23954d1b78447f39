//! Client socket wrapper (replayed PROXY leftovers, activity for the idle and header
//! timeouts) and the per-connection clock those timeouts are computed from.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Limits;

const NONE: u64 = u64::MAX;

/// Milliseconds of `CLOCK_MONOTONIC_COARSE`: the kernel's last tick, read without the
/// time-stamp counter (a few ns against ~20-40 ns for a precise read on a VM), one tick
/// (1-4 ms) behind the precise clock. Enough for timeouts of a second or more, read several
/// times per request.
pub(super) fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC_COARSE exists on every Linux
    // tether supports (2.6.32+), so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000
}

/// Request bookkeeping of one client connection, in milliseconds since its accept.
#[derive(Debug)]
pub(super) struct Clock {
    epoch: Instant,
    /// [`coarse_ms`] at `epoch`: later readings minus this are the milliseconds since.
    epoch_coarse: u64,
    inflight: AtomicUsize,
    /// Requests begun.
    begun: AtomicU64,
    /// When the last in-flight request ended.
    idle_since: AtomicU64,
    /// First byte read while no request was in flight (the next head is arriving).
    head_started: AtomicU64,
}

impl Clock {
    pub(super) fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
            epoch_coarse: coarse_ms(),
            inflight: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
        }
    }

    /// Since the accept, by the coarse clock (up to a tick off: the deadlines it feeds are
    /// seconds long).
    fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.epoch_coarse).min(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn on_read(&self) {
        if self.inflight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == NONE
        {
            let now = self.now_ms();
            let _ =
                self.head_started
                    .compare_exchange(NONE, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// A request head arrived; the guard ends it (when the response body is done).
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NONE, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A request is being handled (its head arrived, its response is not done).
    pub(super) fn in_flight(&self) -> bool {
        self.inflight.load(Ordering::Relaxed) > 0
    }

    /// Bytes of a next request head arrived while none was in flight.
    pub(super) fn head_started(&self) -> bool {
        self.head_started.load(Ordering::Relaxed) != NONE
    }

    /// When the connection should be closed if nothing changes; `None` while requests are in
    /// flight. HTTP/1: the first head within `request_header_timeout` of the accept, later
    /// heads within it from their first byte, `idle_timeout` between requests. HTTP/2:
    /// `idle_timeout` with no stream.
    pub(super) fn deadline(&self, h2: bool, limits: &Limits) -> Option<Instant> {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let idle = self.at(self.idle_since.load(Ordering::Relaxed)) + limits.idle_timeout;
        if h2 {
            return Some(idle);
        }
        if self.begun.load(Ordering::Relaxed) == 0 {
            return Some(self.epoch + limits.request_header_timeout);
        }
        match self.head_started.load(Ordering::Relaxed) {
            NONE => Some(idle),
            started => Some(self.at(started) + limits.request_header_timeout),
        }
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Clock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let clock = &self.0;
        if clock.inflight.fetch_sub(1, Ordering::Relaxed) == 1 {
            clock.idle_since.store(clock.now_ms(), Ordering::Relaxed);
            clock.head_started.store(NONE, Ordering::Relaxed);
        }
    }
}

/// The client socket: replays bytes read past the PROXY header, reports reads to the clock.
pub(super) struct ClientIo<T> {
    inner: T,
    prefix: Bytes,
    clock: Arc<Clock>,
}

impl<T> ClientIo<T> {
    pub(super) fn new(inner: T, prefix: Bytes, clock: Arc<Clock>) -> ClientIo<T> {
        ClientIo {
            inner,
            prefix,
            clock,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.clock.on_read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.on_read();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Last activity of a tunnel, shared by both of its ends.
#[derive(Debug)]
pub(super) struct Activity {
    epoch: Instant,
    last: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    pub(super) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// An I/O end of a tunnel that reports traffic to an [`Activity`].
pub(super) struct Touch<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Touch<T> {
    pub(super) fn new(inner: T, activity: Arc<Activity>) -> Touch<T> {
        Touch { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            request_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        }
    }

    #[test]
    fn deadlines_follow_requests() {
        let clock = Arc::new(Clock::new());
        let l = limits();
        assert_eq!(
            clock.deadline(false, &l),
            Some(clock.epoch + l.request_header_timeout)
        );
        assert_eq!(clock.deadline(true, &l), Some(clock.epoch + l.idle_timeout));
        let a = clock.begin();
        let b = clock.begin();
        assert_eq!(clock.deadline(false, &l), None);
        drop(a);
        assert_eq!(clock.deadline(false, &l), None, "one still in flight");
        drop(b);
        let idle = clock.deadline(false, &l).unwrap();
        assert!(
            idle >= clock.epoch + l.idle_timeout,
            "idle between requests"
        );
        clock.on_read();
        let head = clock.deadline(false, &l).unwrap();
        assert!(head < idle, "a started head gets the header timeout");
        assert_eq!(
            clock.deadline(true, &l),
            Some(idle),
            "h2 ignores partial reads"
        );
        let _c = clock.begin();
        assert_eq!(clock.deadline(false, &l), None);
    }
}
