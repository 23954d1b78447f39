//! An HTTP/1.1 client that runs in the request handler's own task: it writes the request and
//! reads the response on a pooled backend connection, with no connection task and no channel
//! between the two.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Weak,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, request};
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, tcp::ReadHalf},
    sync::OwnedSemaphorePermit,
};

use super::h1codec::{
    self, CRLF, CodecError, Decoded, Head, LAST_CHUNK, Parsed, ReqFraming, RespFraming,
};

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;

/// One open backend connection, holding its slot of `max_connections_per_backend`.
pub(super) struct Conn {
    io: TcpStream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// The request head being written; kept so a reused connection allocates none.
    head: Vec<u8>,
    permit: OwnedSemaphorePermit,
}

/// Where a connection goes back once a response is done with it.
pub(super) trait Recycle: Send + Sync {
    fn put(&self, backend: SocketAddr, conn: Conn);
}

/// A request body the client can send: the proxy's own (`ProxyBody`), kept generic so this
/// module does not depend on the body module that wraps its responses.
pub(super) trait ReqBody:
    Body<Data = Bytes, Error: std::fmt::Display> + Default + Unpin
{
}

impl<B: Body<Data = Bytes, Error: std::fmt::Display> + Default + Unpin> ReqBody for B {}

/// How an exchange failed.
pub(super) enum ExchangeError<B> {
    /// Nothing of the request was written: it is handed back.
    NotSent(Box<Request<B>>, String),
    /// No response head within the response timeout.
    Timeout,
    /// Failed once the request was (partly) sent. `replay`: the request again, when it had
    /// no body and not one response byte came (the backend may have closed the connection
    /// as it was written).
    Failed {
        why: String,
        replay: Option<Box<Request<B>>>,
    },
}

/// An upgraded backend connection (after a 101): the stream, the bytes that followed the
/// head, and its slot.
pub(super) struct Upgraded {
    pub(super) io: TcpStream,
    pub(super) read: Bytes,
    pub(super) permit: OwnedSemaphorePermit,
}

impl Conn {
    pub(super) fn new(io: TcpStream, permit: OwnedSemaphorePermit) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            head: Vec::with_capacity(512),
            permit,
        }
    }

    /// Whether an idle connection can no longer carry a request: the backend closed it, or
    /// sent something unasked. Costs a syscall only when the socket polled readable.
    pub(super) fn is_stale(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends `req` and reads the response head. The request body is written while the
    /// response is watched for (a backend may answer early, e.g. 413); `response_timeout`
    /// runs from the end of the request body.
    pub(super) async fn exchange<B: ReqBody>(
        mut self,
        req: Request<B>,
        response_timeout: Duration,
        backend: SocketAddr,
        pool: Weak<dyn Recycle>,
    ) -> Result<Response<ResponseBody<B>>, ExchangeError<B>> {
        let (parts, body) = req.into_parts();
        let bodiless = body.is_end_stream();
        let head_request = parts.method == http::Method::HEAD;
        let (framing, add_length) = h1codec::request_framing(
            &parts.headers,
            body.is_end_stream(),
            body.size_hint().exact(),
        );
        self.head.clear();
        h1codec::encode_head(&parts, framing, add_length, &mut self.head);
        if let Err(e) = self.io.write_all(&self.head).await {
            return Err(ExchangeError::NotSent(
                Box::new(Request::from_parts(parts, body)),
                format!("write: {e}"),
            ));
        }
        // The body goes through an `Upload` polled beside the response head; when the backend
        // answers before the body is all sent, the rest keeps going while the response body
        // streams (a backend may answer at once and read on).
        let mut upload = (framing != ReqFraming::None).then(|| Upload::new(body, framing));
        let (head, sent_whole) = 'exchange: {
            let (mut rd, mut wr) = self.io.split();
            let read = read_head(&mut rd, &mut self.buf, head_request);
            tokio::pin!(read);
            let mut write_error = None;
            if let Some(up) = upload.as_mut() {
                let write = std::future::poll_fn(|cx| up.poll_send(Pin::new(&mut wr), cx));
                tokio::pin!(write);
                tokio::select! {
                    res = &mut write => match res {
                        Ok(()) => {}
                        // The client's body failed (gone, idle, too slow): nothing to wait for.
                        Err(SendError::Body(why)) => {
                            return Err(ExchangeError::Failed { why, replay: None });
                        }
                        // The backend may have answered and closed: read what it said.
                        Err(SendError::Write(why)) => write_error = Some(why),
                    },
                    // Answered before the whole body went: the connection is not reused.
                    head = &mut read => break 'exchange (head, false),
                }
            }
            upload = None;
            match tokio::time::timeout(response_timeout, read).await {
                Err(_) => return Err(ExchangeError::Timeout),
                // A write error is only possible with a body: no replay.
                Ok(Err(HeadError::Io(..))) if write_error.is_some() => {
                    return Err(ExchangeError::Failed {
                        why: write_error.unwrap_or_default(),
                        replay: None,
                    });
                }
                Ok(head) => (head, write_error.is_none()),
            }
        };
        finish(
            head,
            backend,
            pool,
            self,
            sent_whole,
            upload,
            bodiless.then_some(parts),
        )
    }
}

enum SendError {
    /// Reading the client's body failed.
    Body(String),
    /// Writing to the backend failed.
    Write(String),
}

/// Reads until a final response head is parsed, skipping interim 1xx responses.
async fn read_head(
    rd: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Box<Head>, HeadError> {
    let mut nothing_read = buf.is_empty();
    loop {
        if !buf.is_empty() {
            match h1codec::parse_head(buf, head_request) {
                Ok(Parsed::Final(head)) => return Ok(head),
                Ok(Parsed::Interim) => continue,
                Ok(Parsed::Partial) => {}
                Err(e) => return Err(HeadError::Codec(e)),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(buf).await {
            Ok(0) => {
                return Err(HeadError::Io(
                    io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a response"),
                    nothing_read,
                ));
            }
            Ok(_) => nothing_read = false,
            Err(e) => return Err(HeadError::Io(e, nothing_read)),
        }
    }
}

enum HeadError {
    Codec(CodecError),
    /// Reading failed; whether no response byte had come.
    Io(io::Error, bool),
}

/// The request body on its way to the backend in `framing`, written by polling, so that
/// what is left of it can move into the [`ResponseBody`] when the backend answers early.
struct Upload<B> {
    body: B,
    framing: ReqFraming,
    /// Bytes taken from the body (with their chunk framing) and not yet written, last first.
    pending: Vec<Bytes>,
    /// The body ended: nothing more comes after `pending`.
    ended: bool,
}

impl<B: ReqBody> Upload<B> {
    fn new(body: B, framing: ReqFraming) -> Upload<B> {
        Upload {
            body,
            framing,
            pending: Vec::with_capacity(3),
            ended: false,
        }
    }

    /// Writes the body to `wr` until it is all sent (`Ready(Ok)`), something fails, or
    /// either side has to wait.
    fn poll_send<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        mut wr: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), SendError>> {
        loop {
            while let Some(next) = self.pending.last_mut() {
                if next.is_empty() {
                    self.pending.pop();
                    continue;
                }
                match std::task::ready!(wr.as_mut().poll_write(cx, next)) {
                    Ok(0) => return Poll::Ready(Err(SendError::Write("write: closed".into()))),
                    Ok(n) => next.advance(n),
                    Err(e) => return Poll::Ready(Err(SendError::Write(format!("write: {e}")))),
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            let chunked = self.framing == ReqFraming::Chunked;
            match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    if chunked {
                        self.pending.push(Bytes::from_static(LAST_CHUNK));
                    }
                }
                Some(Err(e)) => {
                    return Poll::Ready(Err(SendError::Body(format!("request body: {e}"))));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => {
                        if chunked {
                            self.pending.push(Bytes::from_static(CRLF));
                            let line = h1codec::chunk_size_line(data.len());
                            self.pending.push(data);
                            self.pending.push(line);
                        } else {
                            self.pending.push(data);
                        }
                    }
                    // Trailers and empty frames: not forwarded.
                    _ => {}
                },
            }
        }
    }
}

/// The response for `head`, its body reading from `conn`.
fn finish<B: ReqBody>(
    head: Result<Box<Head>, HeadError>,
    backend: SocketAddr,
    pool: Weak<dyn Recycle>,
    conn: Conn,
    reusable: bool,
    upload: Option<Upload<B>>,
    bodiless: Option<request::Parts>,
) -> Result<Response<ResponseBody<B>>, ExchangeError<B>> {
    let head = match head {
        Ok(h) => h,
        Err(HeadError::Codec(e)) => {
            return Err(ExchangeError::Failed {
                why: e.to_string(),
                replay: None,
            });
        }
        Err(HeadError::Io(e, nothing_read)) => {
            return Err(ExchangeError::Failed {
                why: format!("read: {e}"),
                replay: bodiless
                    .filter(|_| nothing_read)
                    .map(|p| Box::new(Request::from_parts(p, B::default()))),
            });
        }
    };
    let Head {
        parts,
        framing,
        keep_alive,
    } = *head;
    let mut body = ResponseBody {
        conn: Some(conn),
        framing,
        reusable: reusable && keep_alive,
        upload: upload.map(Box::new),
        backend,
        pool,
    };
    if body.framing == RespFraming::Empty {
        body.done();
    }
    Ok(Response::from_parts(parts, body))
}

/// A response body read from the backend connection by whichever task polls it; once it
/// is complete the connection goes back to the pool when it is reusable. Dropped early, it
/// closes the connection.
pub(super) struct ResponseBody<B> {
    conn: Option<Conn>,
    framing: RespFraming,
    /// Keep-alive and the request went whole: the connection may serve another request once
    /// this body is done.
    reusable: bool,
    /// The rest of a request body the backend answered before it had all: sent while this
    /// body is read, and abandoned (with the connection) when this body ends first.
    upload: Option<Box<Upload<B>>>,
    backend: SocketAddr,
    pool: Weak<dyn Recycle>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("backend closed the connection before the end of the body")]
    Eof,
    /// The client's request body failed while the backend's answer was being read.
    #[error("{0}")]
    Request(String),
    #[error("reading the response body: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl<B: ReqBody> ResponseBody<B> {
    /// For a 101 response: the connection, for the tunnel.
    pub(super) fn into_upgrade(mut self) -> Option<Upgraded> {
        if self.framing != RespFraming::Upgrade {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Upgraded {
            io: conn.io,
            read: conn.buf.freeze(),
            permit: conn.permit,
        })
    }

    /// The body is complete: the connection goes back to the pool when it can carry another
    /// request (nothing unread past the response).
    fn done(&mut self) {
        let framing = std::mem::replace(&mut self.framing, RespFraming::Empty);
        let Some(conn) = self.conn.take() else { return };
        if self.reusable
            && conn.buf.is_empty()
            && !matches!(framing, RespFraming::Close | RespFraming::Upgrade)
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(self.backend, conn);
        }
    }

    /// Reads more of the connection into its buffer; `Ok(0)` at EOF.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(READ_CHUNK);
        }
        loop {
            std::task::ready!(conn.io.poll_read_ready(cx))?;
            match conn.io.try_read_buf(&mut conn.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                res => return Poll::Ready(res),
            }
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(up) = self.upload.as_mut() {
                // Sent, or the backend stopped reading (what it answers still counts).
                match up.poll_send(Pin::new(&mut conn.io), cx) {
                    Poll::Pending => {}
                    Poll::Ready(Err(SendError::Body(why))) => {
                        // The backend would wait for the rest forever: give up on both.
                        self.upload = None;
                        self.conn = None;
                        return Poll::Ready(Some(Err(BodyError::Request(why))));
                    }
                    Poll::Ready(_) => self.upload = None,
                }
            }
            match &mut self.framing {
                RespFraming::Empty | RespFraming::Upgrade => {
                    self.done();
                    return Poll::Ready(None);
                }
                RespFraming::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            self.done();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                RespFraming::Chunked(dec) => match dec.decode(&mut conn.buf)? {
                    Decoded::Data(data) => {
                        if dec.is_done() {
                            self.done();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Decoded::Done => {
                        self.done();
                        return Poll::Ready(None);
                    }
                    Decoded::More => {}
                },
                RespFraming::Close => {
                    if !conn.buf.is_empty() {
                        return Poll::Ready(Some(Ok(conn.buf.split().freeze())));
                    }
                }
            }
            match std::task::ready!(self.poll_read(cx)) {
                Ok(0) if self.framing == RespFraming::Close => {
                    self.done();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(BodyError::Eof)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

impl<B: ReqBody> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match this.poll_data(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.conn = None;
                Poll::Ready(Some(Err(e)))
            }
            other => other.map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
            || matches!(self.framing, RespFraming::Empty | RespFraming::Length(0))
            || matches!(&self.framing, RespFraming::Chunked(c) if c.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            RespFraming::Length(n) if self.conn.is_some() => SizeHint::with_exact(n),
            RespFraming::Empty => SizeHint::with_exact(0),
            _ if self.conn.is_none() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
#[path = "h1client_tests.rs"]
mod tests;
