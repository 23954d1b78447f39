//! TCP check: the three-way handshake completes in time.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use super::{CheckFuture, Deadline, HealthCheck};

pub(super) struct TcpCheck {
    timeout: Duration,
}

impl TcpCheck {
    pub(super) fn new(timeout: Duration) -> TcpCheck {
        TcpCheck { timeout }
    }
}

impl HealthCheck for TcpCheck {
    fn check<'a>(&'a self, target: SocketAddr) -> CheckFuture<'a> {
        Box::pin(async move {
            let deadline = Deadline::after(self.timeout);
            // Connected is healthy; dropping the stream closes it.
            deadline.run("connect", TcpStream::connect(target)).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    use super::TcpCheck;
    use crate::health::{HealthCheck, test_support::closed_port};

    #[tokio::test]
    async fn listening_port_is_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        let check = TcpCheck::new(Duration::from_millis(500));
        assert_eq!(check.check(addr).await, Ok(()), "listener must pass");
    }

    #[tokio::test]
    async fn closed_port_is_down() {
        let addr = format!("127.0.0.1:{}", closed_port().await)
            .parse()
            .expect("addr");
        let check = TcpCheck::new(Duration::from_millis(500));
        let err = check.check(addr).await.expect_err("closed port must fail");
        assert_eq!(err, "connect: connection refused", "detail");
    }

    /// A listener whose accept queue is full drops further SYNs, so the handshake hangs
    /// locally until the probe's timeout.
    #[tokio::test]
    async fn full_backlog_times_out() {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen with backlog 0");
        let addr = listener.local_addr().expect("listener address");
        // Fill the queue; the listener never accepts. Bounded: a few tries of 100 ms each.
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await
            {
                fillers.push(s);
            }
        }
        let check = TcpCheck::new(Duration::from_millis(200));
        let started = Instant::now();
        let err = check.check(addr).await.expect_err("full backlog must fail");
        let took = started.elapsed();
        assert_eq!(err, "connect: timeout after 200 ms", "detail");
        // A lower bound only: it proves the check waited for its timeout; an upper bound
        // would measure the machine's load, not the check.
        assert!(
            took >= Duration::from_millis(190),
            "took {took:?}, expected at least the 200 ms timeout"
        );
        drop(fillers);
    }
}
