//! The handoff conversation over real Unix sockets, with real listening sockets passed.

use std::{
    io::{Read as _, Write as _},
    os::fd::AsFd as _,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::net::UnixStream;

use super::*;

fn pair() -> (Channel, Channel) {
    let (a, b) = UnixStream::pair().unwrap();
    (Channel::new(a), Channel::new(b))
}

/// The socket's inode: the same socket, whatever descriptor holds it.
fn inode(l: &std::net::TcpListener) -> u64 {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
        .unwrap()
        .ino()
}

fn fd_inode(fd: BorrowedFd<'_>) -> u64 {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .ino()
}

fn listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

/// A scratch path for a socket, removed (with its directory) on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-handoff-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn listening_sockets_cross_with_their_message() {
    let (a, b) = pair();
    let (l1, l2) = (listener(), listener());
    let addrs = [l1.local_addr().unwrap(), l2.local_addr().unwrap()];
    let msg = Msg::Sockets {
        listeners: addrs.to_vec(),
        admin: None,
        udp: vec![],
    };
    a.send(&msg, &[l1.as_fd(), l2.as_fd()]).await.unwrap();
    a.send(&Msg::Stopped, &[]).await.unwrap();
    let (got, fds) = b.recv().await.unwrap();
    assert_eq!(got, msg);
    assert_eq!(fds.len(), 2);
    let received: Vec<std::net::TcpListener> = fds.into_iter().map(Into::into).collect();
    for (r, addr) in received.iter().zip(addrs) {
        assert_eq!(r.local_addr().unwrap(), addr, "the same socket, in order");
        // A connection queued on the original is accepted through the copy.
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let (mut s, _) = r.accept().unwrap();
        c.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");
    }
    let (next, fds) = b.recv().await.unwrap();
    assert_eq!(
        (next, fds.len()),
        (Msg::Stopped, 0),
        "no descriptor leaks into later messages"
    );
    drop(a);
    assert!(matches!(b.recv().await, Err(WireError::Closed)));
}

#[tokio::test]
async fn more_sockets_than_one_sendmsg_carries_cross_in_order() {
    // 300 > SCM_MAX_FD (253): the kernel refuses that many in one message.
    let (a, b) = pair();
    let ls: Vec<std::net::TcpListener> = (0..300).map(|_| listener()).collect();
    let msg = Msg::Sockets {
        listeners: ls.iter().map(|l| l.local_addr().unwrap()).collect(),
        admin: None,
        udp: vec![],
    };
    let fds: Vec<_> = ls.iter().map(|l| l.as_fd()).collect();
    // The frame (a few kilobytes) fits the socket's buffer: send all, then read.
    a.send(&msg, &fds).await.expect("sending 300 sockets");
    let (got, fds) = b.recv().await.expect("receiving 300 sockets");
    assert_eq!(got, msg);
    assert_eq!(fds.len(), ls.len(), "every socket arrives");
    for (i, (orig, fd)) in ls.iter().zip(fds).enumerate() {
        let r = std::net::TcpListener::from(fd);
        assert_eq!(inode(&r), inode(orig), "socket {i} is the one sent at {i}");
        assert_eq!(r.local_addr().unwrap(), orig.local_addr().unwrap());
    }
    a.send(&Msg::Stopped, &[]).await.unwrap();
    let (next, fds) = b.recv().await.unwrap();
    assert_eq!((next, fds.len()), (Msg::Stopped, 0), "nothing left over");
}

#[tokio::test]
async fn a_socket_listed_under_another_address_fails_the_takeover() {
    let (ours, theirs) = pair();
    let (l1, l2) = (listener(), listener());
    let old = async {
        let (m, _) = theirs.recv().await.unwrap();
        assert_eq!(m.name(), "takeover");
        // The two sockets in the wrong order for their addresses.
        let msg = Msg::Sockets {
            listeners: vec![l1.local_addr().unwrap(), l2.local_addr().unwrap()],
            admin: None,
            udp: vec![],
        };
        theirs.send(&msg, &[l2.as_fd(), l1.as_fd()]).await.unwrap();
    };
    let (_, took) = tokio::join!(old, Takeover::begin(ours));
    match took {
        Err(HandoffError::Protocol(e)) => assert!(e.contains("is bound to"), "{e}"),
        Err(e) => panic!("expected a protocol error, got {e}"),
        Ok(_) => panic!("sockets swapped between addresses were accepted"),
    }
}

/// A daemon that records what the handoff asked of it; its L7 service listens on a
/// `SO_REUSEPORT` group of two sockets (two workers).
struct Fake {
    l7: Vec<std::net::TcpListener>,
    admin: std::net::TcpListener,
    sip: std::net::UdpSocket,
    log: Vec<&'static str>,
}

impl Fake {
    fn new() -> Fake {
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let first = crate::workers::listen_group(any, vec![], 1, 16).unwrap();
        let addr = first[0].local_addr().unwrap();
        let l7 = crate::workers::listen_group(addr, first, 2, 16).unwrap();
        assert_eq!(l7.len(), 2, "a second socket joins the group");
        Fake {
            l7,
            admin: listener(),
            sip: std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            log: Vec::new(),
        }
    }
}

impl Handing for Fake {
    fn sockets(&self) -> Sockets<'_> {
        Sockets {
            listeners: self
                .l7
                .iter()
                .map(|l| (l.local_addr().unwrap(), l.as_fd()))
                .collect(),
            admin: Some((self.admin.local_addr().unwrap(), self.admin.as_fd())),
            udp: vec![(self.sip.local_addr().unwrap(), self.sip.as_fd())],
        }
    }

    fn stop_accepting(&mut self) {
        self.log.push("stop");
    }

    fn resume(&mut self, stopped: bool) {
        self.log
            .push(if stopped { "resume stopped" } else { "resume" });
    }
}

#[tokio::test]
async fn a_committed_handoff_moves_every_socket() {
    let (old_end, new_end) = pair();
    let mut fake = Fake::new();
    let l7_inodes: Vec<u64> = fake.l7.iter().map(inode).collect();
    let (sip_addr, sip_inode) = (fake.sip.local_addr().unwrap(), fd_inode(fake.sip.as_fd()));
    let (l7_addr, admin_addr) = (
        fake.l7[0].local_addr().unwrap(),
        fake.admin.local_addr().unwrap(),
    );
    let new = tokio::spawn(async move {
        let mut t = Takeover::begin(new_end).await.unwrap();
        let l7 = t.listeners.remove(&l7_addr).expect("the L7 socket");
        let (addr, _admin) = t.admin.take().expect("the admin socket");
        assert_eq!(addr, admin_addr);
        let sip = t.udp.remove(&sip_addr).expect("the UDP socket");
        assert_eq!(
            fd_inode(sip.as_fd()),
            sip_inode,
            "the old daemon's UDP socket"
        );
        assert!(t.udp.is_empty());
        t.stop_old().await.unwrap();
        t.commit().await.unwrap();
        t.ready().await;
        l7
    });
    let (msg, _) = old_end.recv().await.unwrap();
    let Msg::Takeover { pid, .. } = msg else {
        panic!("{msg:?}")
    };
    assert_eq!(pid, std::process::id());
    let outcome = hand_over(&old_end, pid, &mut fake).await;
    assert_eq!(outcome, Outcome::Committed { pid, ready: true });
    assert_eq!(fake.log, ["stop"]);
    let l7 = new.await.unwrap();
    assert_eq!(
        l7.iter().map(inode).collect::<Vec<_>>(),
        l7_inodes,
        "every socket of the address's group handed over, in order"
    );
}

#[tokio::test]
async fn a_new_process_that_goes_away_leaves_the_old_one_serving() {
    // Gone before asking to stop the old one: nothing was stopped.
    let (old_end, new_end) = pair();
    let mut fake = Fake::new();
    let new = tokio::spawn(async move {
        let t = Takeover::begin(new_end).await.unwrap();
        drop(t);
    });
    let (Msg::Takeover { pid, .. }, _) = old_end.recv().await.unwrap() else {
        panic!("takeover expected")
    };
    let outcome = hand_over(&old_end, pid, &mut fake).await;
    assert!(matches!(outcome, Outcome::Aborted(_)), "{outcome:?}");
    assert_eq!(fake.log, ["resume"]);
    new.await.unwrap();

    // Gone after the old one stopped accepting: it accepts again.
    let (old_end, new_end) = pair();
    let mut fake = Fake::new();
    let new = tokio::spawn(async move {
        let t = Takeover::begin(new_end).await.unwrap();
        t.stop_old().await.unwrap();
        drop(t);
    });
    let (Msg::Takeover { pid, .. }, _) = old_end.recv().await.unwrap() else {
        panic!("takeover expected")
    };
    let outcome = hand_over(&old_end, pid, &mut fake).await;
    assert!(matches!(outcome, Outcome::Aborted(_)), "{outcome:?}");
    assert_eq!(fake.log, ["stop", "resume stopped"]);
    new.await.unwrap();
}

#[tokio::test]
async fn server_is_private_and_removes_only_its_own_socket() {
    let dir = Scratch::new();
    let path = dir.0.join("t.handoff");
    let (tx, mut rx) = mpsc::channel(1);
    let server = Server::start(&path, tx).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let chan = connect(&path).await.unwrap().expect("a daemon listens");
    let netns = own_netns().unwrap();
    chan.send(&Msg::Takeover { pid: 42, netns }, &[])
        .await
        .unwrap();
    match rx.recv().await.expect("a request") {
        Request::Takeover { pid, .. } => assert_eq!(pid, 42),
        Request::Restart { .. } => panic!("takeover expected"),
    }
    // From another network namespace: refused, never reaches the daemon.
    let chan = connect(&path).await.unwrap().unwrap();
    chan.send(
        &Msg::Takeover {
            pid: 43,
            netns: netns + 1,
        },
        &[],
    )
    .await
    .unwrap();
    match chan.recv().await.unwrap().0 {
        Msg::Failed { reason } => assert!(reason.contains("network namespace"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(rx.try_recv().is_err(), "the daemon saw no request");
    // Anything else first is refused with a reason.
    let chan = connect(&path).await.unwrap().unwrap();
    chan.send(&Msg::Commit, &[]).await.unwrap();
    assert!(matches!(chan.recv().await.unwrap().0, Msg::Failed { .. }));

    // A successor replaced the socket: ours goes without removing theirs.
    let (tx2, _rx2) = mpsc::channel(1);
    let successor = Server::start(&path, tx2).unwrap();
    drop(server);
    assert!(path.exists(), "the successor's socket stays");
    assert!(connect(&path).await.unwrap().is_some());
    drop(successor);
    assert!(!path.exists());
    assert!(
        connect(&path).await.unwrap().is_none(),
        "no daemon: no handoff"
    );
}

#[tokio::test]
async fn restart_reports_a_new_process_that_fails() {
    let dir = Scratch::new();
    let path = dir.0.join("r.handoff");
    let (tx, mut rx) = mpsc::channel(1);
    let _server = Server::start(&path, tx).unwrap();
    let (_ready_tx, ready_rx) = watch::channel(None);
    let daemon = tokio::spawn(async move {
        match rx.recv().await.expect("a request") {
            Request::Restart { chan, config, exe } => {
                spawn_restart(chan, &config, &exe, ready_rx).await.unwrap()
            }
            Request::Takeover { .. } => panic!("restart expected"),
        }
    });
    // `false run --config ...` exits at once with status 1.
    let e = request_restart(
        &path,
        Path::new("/nonexistent.json"),
        Path::new("/bin/false"),
    )
    .await
    .expect_err("a process that exits does not take over");
    assert!(
        matches!(&e, HandoffError::Refused(r) if r.contains("exited")),
        "{e}"
    );
    daemon.await.unwrap();
    // No daemon at all: the error says how to start one.
    let e = request_restart(
        &dir.0.join("none"),
        Path::new("/x"),
        Path::new("/bin/false"),
    )
    .await
    .expect_err("nothing to restart");
    assert!(e.to_string().contains("tether run"), "{e}");
}

/// What an older daemon sends (no `udp` list) is still a sockets message: the successor
/// binds its UDP sockets itself.
#[test]
fn a_sockets_message_without_udp_sockets_is_accepted() {
    let old = r#"{"msg":"sockets","listeners":["127.0.0.1:80"],"admin":"127.0.0.1:9090"}"#;
    let msg: Msg = serde_json::from_str(old).expect("an older daemon's message parses");
    assert_eq!(
        msg,
        Msg::Sockets {
            listeners: vec!["127.0.0.1:80".parse().unwrap()],
            admin: Some("127.0.0.1:9090".parse().unwrap()),
            udp: vec![],
        }
    );
}

/// The old daemon's side of a takeover that sends `msg` with `fds`; what the new side made
/// of it.
async fn takeover_with(msg: Msg, fds: &[BorrowedFd<'_>]) -> Result<Takeover> {
    let (ours, theirs) = pair();
    let old = async {
        let (m, _) = theirs.recv().await.unwrap();
        assert_eq!(m.name(), "takeover");
        theirs.send(&msg, fds).await.unwrap();
    };
    tokio::join!(old, Takeover::begin(ours)).1
}

#[tokio::test]
async fn udp_sockets_arrive_checked_by_type_and_address() {
    let (u1, u2) = (
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    let (a1, a2) = (u1.local_addr().unwrap(), u2.local_addr().unwrap());
    let sockets = |udp: Vec<SocketAddr>, listeners: Vec<SocketAddr>| Msg::Sockets {
        listeners,
        admin: None,
        udp,
    };
    let mut t = takeover_with(sockets(vec![a1, a2], vec![]), &[u1.as_fd(), u2.as_fd()])
        .await
        .expect("two UDP sockets handed over");
    let got = t.udp.remove(&a1).expect("the first UDP socket");
    assert_eq!(fd_inode(got.as_fd()), fd_inode(u1.as_fd()));
    assert_eq!(fd_inode(t.udp[&a2].as_fd()), fd_inode(u2.as_fd()));

    let refused = |r: Result<Takeover>, what: &str, expected: &str| match r {
        Err(HandoffError::Protocol(e)) => assert!(e.contains(expected), "{what}: {e}"),
        Err(e) => panic!("{what}: expected a protocol error, got {e}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    refused(
        takeover_with(sockets(vec![a1, a2], vec![]), &[u2.as_fd(), u1.as_fd()]).await,
        "UDP sockets swapped between addresses",
        "is bound to",
    );
    let l = listener();
    let la = l.local_addr().unwrap();
    refused(
        takeover_with(sockets(vec![la], vec![]), &[l.as_fd()]).await,
        "a TCP listener listed as a UDP socket",
        "as UDP is not one",
    );
    refused(
        takeover_with(sockets(vec![], vec![a1]), &[u1.as_fd()]).await,
        "a UDP socket listed as a TCP listener",
        "as TCP is not one",
    );
    refused(
        takeover_with(sockets(vec![a1, a1], vec![]), &[u1.as_fd(), u1.as_fd()]).await,
        "one address listed twice",
        "two UDP sockets",
    );
}
