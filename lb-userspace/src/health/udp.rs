//! UDP check: send the payload from a connected socket and wait for one reply datagram (which
//! must contain `expect`, when set). A connected socket sees the ICMP port unreachable of a
//! host with nothing bound as ECONNREFUSED, so that case fails at once instead of timing out.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::net::UdpSocket;

use super::{CheckFuture, Deadline, HealthCheck, io_detail, snippet};

/// Largest UDP payload: a reply is never truncated before the `expect` search.
const MAX_DATAGRAM: usize = 65_535;

pub(super) struct UdpCheck {
    timeout: Duration,
    send: Vec<u8>,
    expect: Option<Vec<u8>>,
}

impl UdpCheck {
    pub(super) fn new(timeout: Duration, send: Vec<u8>, expect: Option<Vec<u8>>) -> UdpCheck {
        UdpCheck {
            timeout,
            send,
            expect,
        }
    }

    async fn probe(&self, target: SocketAddr) -> Result<(), String> {
        let deadline = Deadline::after(self.timeout);
        let local: SocketAddr = match target {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = deadline.run("bind", UdpSocket::bind(local)).await?;
        // Connected: only the target's replies are received, and its ICMP errors are reported.
        deadline.run("connect", socket.connect(target)).await?;
        deadline.run("send", socket.send(&self.send)).await?;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let received = tokio::time::timeout_at(deadline.at(), socket.recv(&mut buf)).await;
        let n = match received {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
                return Err("receive: connection refused (ICMP port unreachable)".to_string());
            }
            Ok(Err(e)) => return Err(format!("receive: {}", io_detail(&e))),
            Err(_) => {
                return Err(format!(
                    "receive: timeout after {} ms",
                    self.timeout.as_millis()
                ));
            }
        };
        let reply = &buf[..n];
        match &self.expect {
            Some(expect) if !contains(reply, expect) => Err(format!(
                "reply \"{}\" does not contain \"{}\"",
                snippet(reply, 64),
                snippet(expect, 64)
            )),
            _ => Ok(()),
        }
    }
}

impl HealthCheck for UdpCheck {
    fn check<'a>(&'a self, target: SocketAddr) -> CheckFuture<'a> {
        Box::pin(self.probe(target))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        time::{Duration, Instant},
    };

    use tokio::{net::UdpSocket, task::JoinHandle};

    use super::{UdpCheck, contains};
    use crate::health::HealthCheck;

    /// Replies `reply` to every datagram (or echoes it when `reply` is None).
    async fn responder(reply: Option<&'static [u8]>) -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("socket address");
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let answer = reply.unwrap_or(&buf[..n]);
                let _ = socket.send_to(answer, from).await;
            }
        });
        (addr, task)
    }

    fn check(timeout_ms: u64, expect: Option<&[u8]>) -> UdpCheck {
        UdpCheck::new(
            Duration::from_millis(timeout_ms),
            b"ping".to_vec(),
            expect.map(<[u8]>::to_vec),
        )
    }

    #[tokio::test]
    async fn echo_passes() {
        let (addr, task) = responder(None).await;
        let any = check(500, None).check(addr).await;
        let expected = check(500, Some(b"ing")).check(addr).await;
        task.abort();
        assert_eq!(any, Ok(()), "any reply passes without expect");
        assert_eq!(expected, Ok(()), "echo contains the expected bytes");
    }

    #[tokio::test]
    async fn wrong_reply_fails() {
        let (addr, task) = responder(Some(b"error\n")).await;
        let result = check(500, Some(b"pong")).check(addr).await;
        task.abort();
        assert_eq!(
            result,
            Err("reply \"error\\n\" does not contain \"pong\"".to_string()),
            "mismatch names both"
        );
    }

    #[tokio::test]
    async fn no_listener_fails_fast() {
        // Bind then release a port: nothing listens there any more.
        let addr = {
            let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            s.local_addr().expect("socket address")
        };
        let result = check(1000, None).check(addr).await;
        assert_eq!(
            result,
            Err("receive: connection refused (ICMP port unreachable)".to_string()),
            "refused"
        );
    }

    #[tokio::test]
    async fn silent_listener_times_out() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("socket address");
        let started = Instant::now();
        let result = check(200, None).check(addr).await;
        let took = started.elapsed();
        drop(silent);
        assert_eq!(
            result,
            Err("receive: timeout after 200 ms".to_string()),
            "silent"
        );
        // A lower bound only: the check waited for its timeout (an upper bound would
        // measure the machine's load).
        assert!(
            took >= Duration::from_millis(190),
            "took {took:?}, expected at least the 200 ms timeout"
        );
    }

    #[test]
    fn contains_handles_edges() {
        assert!(contains(b"abc", b""), "empty needle");
        assert!(contains(b"abc", b"bc"), "suffix");
        assert!(!contains(b"ab", b"abc"), "needle longer than haystack");
    }
}
