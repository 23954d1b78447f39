//! The handoff conversation's messages and framing: each message is a 4-byte big-endian
//! length and a JSON object; sockets travel as SCM_RIGHTS ancillary data attached to the
//! first bytes of the message that lists them, at most [`MAX_FDS`] per byte (the kernel
//! refuses more in one `sendmsg`), in order. The receiver collects them while it reads the
//! message, so a frame carries any number of sockets that is at most its length.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::{io::Interest, net::UnixStream};

/// Longest message accepted (a few hundred bytes in practice).
const MAX_MESSAGE: usize = 1 << 20;
/// Most descriptors sent or received with one `sendmsg`/`recvmsg` (the kernel's own limit
/// per message, SCM_MAX_FD).
const MAX_FDS: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the other side closed the connection")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: Msg },
}

/// Every message of the conversation. N is the starting process, O the running daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    /// N -> O: hand me your sockets. `netns` identifies N's network namespace: sockets only
    /// move within one.
    Takeover { pid: u32, netns: u64 },
    /// O -> N: the listening sockets, in this order, then the admin API's (if any), then
    /// the UDP services' sockets (absent from an older daemon's message: N binds its own).
    Sockets {
        listeners: Vec<SocketAddr>,
        admin: Option<SocketAddr>,
        #[serde(default)]
        udp: Vec<SocketAddr>,
    },
    /// N -> O: ready to serve; stop accepting and save your state.
    Stop,
    /// O -> N: nothing is accepted here any more; state saved.
    Stopped,
    /// N -> O: state loaded; I accept from now on.
    Commit,
    /// O -> N: retired; draining.
    Committed,
    /// N -> O: accepting, pid file written.
    Ready,
    /// `tether restart` -> O: start `exe run --config config`, which takes over.
    Restart { config: PathBuf, exe: PathBuf },
    /// O -> `tether restart`: `pid` took over.
    Restarted { pid: u32 },
    /// O -> anyone: refused, or the restart failed.
    Failed { reason: String },
}

impl Msg {
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Takeover { .. } => "takeover",
            Msg::Sockets { .. } => "sockets",
            Msg::Stop => "stop",
            Msg::Stopped => "stopped",
            Msg::Commit => "commit",
            Msg::Committed => "committed",
            Msg::Ready => "ready",
            Msg::Restart { .. } => "restart",
            Msg::Restarted { .. } => "restarted",
            Msg::Failed { .. } => "failed",
        }
    }
}

/// One end of a handoff conversation.
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Channel {
        Channel { stream }
    }

    pub async fn connect(path: &Path) -> io::Result<Channel> {
        Ok(Channel::new(UnixStream::connect(path).await?))
    }

    /// The peer's user id (from the kernel, not from anything it sent).
    pub fn peer_uid(&self) -> io::Result<u32> {
        Ok(self.stream.peer_cred()?.uid())
    }

    /// Sends `msg` with `fds` attached: up to [`MAX_FDS`] with each of the frame's first
    /// bytes (one `sendmsg` per byte while more than that remain), the rest with the
    /// remainder of the frame.
    pub async fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        let body = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
        let len = u32::try_from(body.len()).expect("messages are small");
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        if fds.len().div_ceil(MAX_FDS) > frame.len() {
            return Err(WireError::Malformed(format!(
                "{} descriptors do not fit a {}-byte {} message",
                fds.len(),
                frame.len(),
                msg.name()
            )));
        }
        let mut sent = 0;
        let mut pending = fds;
        while sent < frame.len() {
            let (batch, rest) = pending.split_at(pending.len().min(MAX_FDS));
            // While descriptors remain for later calls, this one carries a single byte, so
            // the next byte is left for them.
            let end = if rest.is_empty() {
                frame.len()
            } else {
                sent + 1
            };
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    let mut space =
                        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(batch.len()))];
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    if !batch.is_empty() && !control.push(SendAncillaryMessage::ScmRights(batch)) {
                        return Err(io::Error::other("ancillary buffer too small"));
                    }
                    rustix::net::sendmsg(
                        &self.stream,
                        &[IoSlice::new(&frame[sent..end])],
                        &mut control,
                        SendFlags::NOSIGNAL,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            sent += n;
            // The batch went with the first byte written.
            pending = rest;
        }
        Ok(())
    }

    /// Fills `buf`, collecting descriptors that arrive with it.
    async fn read_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), WireError> {
        let mut got = 0;
        while got < buf.len() {
            let (n, received) = self
                .stream
                .async_io(Interest::READABLE, || {
                    let mut space =
                        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let r = rustix::net::recvmsg(
                        &self.stream,
                        &mut [IoSliceMut::new(&mut buf[got..])],
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let mut received = Vec::new();
                    for m in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(it) = m {
                            received.extend(it);
                        }
                    }
                    if r.flags.contains(ReturnFlags::CTRUNC) {
                        return Err(io::Error::other("descriptors were truncated"));
                    }
                    Ok((r.bytes, received))
                })
                .await?;
            fds.extend(received);
            if n == 0 {
                return Err(WireError::Closed);
            }
            got += n;
        }
        Ok(())
    }

    /// The next message and the descriptors that came with it.
    pub async fn recv(&self) -> Result<(Msg, Vec<OwnedFd>), WireError> {
        let mut fds = Vec::new();
        let mut len = [0u8; 4];
        self.read_exact(&mut len, &mut fds).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(WireError::Malformed(format!("{len} bytes")));
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body, &mut fds).await?;
        let msg = serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))?;
        Ok((msg, fds))
    }

    /// [`Channel::recv`] within `timeout`.
    pub async fn recv_within(&self, timeout: Duration) -> Result<(Msg, Vec<OwnedFd>), WireError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| WireError::Timeout(timeout))?
    }

    /// The next message within `timeout`, which must be `expected` (a `Failed` answer is
    /// returned as its reason).
    pub async fn expect(
        &self,
        expected: &'static str,
        timeout: Duration,
    ) -> Result<(Msg, Vec<OwnedFd>), WireError> {
        let (msg, fds) = self.recv_within(timeout).await?;
        if msg.name() == expected {
            Ok((msg, fds))
        } else {
            Err(WireError::Unexpected { expected, got: msg })
        }
    }
}
