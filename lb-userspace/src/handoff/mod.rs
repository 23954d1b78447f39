//! Seamless restarts: a starting daemon takes the listening sockets over from the running
//! one, which stops accepting and drains, as HAProxy's seamless reload (`-x`) and Envoy's
//! hot restart do. No connection is refused: the sockets, and the connections queued on
//! them, never close; for a moment nobody accepts and the kernel queues.
//!
//! The running daemon listens on a Unix socket, [`socket_path`] (`/run/tether/<pin dir
//! name>.handoff`, mode 0600; peers must have the daemon's own user id). The conversation,
//! N being the starting process and O the running daemon ([`wire::Msg`]):
//!
//! ```text
//! N: Takeover{pid}                 O: freezes its control loop (no reload, no reprogramming)
//! O: Sockets{listeners, admin, udp} + the listening sockets and the UDP services' sockets
//!                                    (SCM_RIGHTS)
//! N: loads and attaches the XDP program, programs the maps, builds its L7 frontends on
//!    those sockets (nothing accepted or read yet; sockets for its extra workers bound, not
//!    listening, so the kernel steers no connection to them; no UDP socket bound for a
//!    handed address, so every datagram waits on the one O reads)
//! N: Stop                          O: stops accepting and reading datagrams, saves its L7
//!                                     state (the sockets stay open: datagrams queue)
//! O: Stopped
//! N: loads the L7 state
//! N: Commit
//! O: Committed                     O: retired: drains its connections, then exits
//! N: listens on its extra sockets, accepts, reads the UDP sockets, binds the handoff
//!    socket, writes the pid file
//! N: Ready
//! ```
//!
//! If N fails or goes silent before `Commit`, O accepts and reads again on the same sockets
//! and rewrites the kernel state from its own config (N may have changed it): a failed
//! restart changes nothing.
//!
//! `tether restart` asks O (`Restart{config, exe}`) to start `exe run --config config` in its
//! own namespaces with its own stdout and stderr (the same log stream), and answers once
//! that process sent `Ready`, or with the reason it did not.

#[cfg(test)]
mod tests;
pub mod wire;

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::{
        fd::BorrowedFd,
        unix::fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::UnixListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    config::Config,
    engine::{Engine, saved},
};
pub use wire::{Channel, Msg, WireError};

/// Where daemons keep their pid files and handoff sockets.
pub const RUN_DIR: &str = "/run/tether";
/// How long the new process may take from `Sockets` to `Stop` (it loads the XDP program and
/// probes backends the pinned maps do not know).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each later step may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `tether restart` waits for the new process to be ready.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);

fn run_file(pin_dir: &Path, ext: &str) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or("tether".into(), |n| n.to_string_lossy().into_owned());
    Path::new(RUN_DIR).join(format!("{name}.{ext}"))
}

/// The pid file of the daemon using `pin_dir`.
pub fn pid_path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "pid")
}

/// The handoff socket of the daemon using `pin_dir`.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "handoff")
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("handoff with the running tether: {0}")]
    Wire(#[from] WireError),
    #[error("the running tether refused the handoff: {0}")]
    Refused(String),
    #[error("handoff: {0}")]
    Protocol(String),
    #[error("L7 state: {0}")]
    State(String),
}

type Result<T> = std::result::Result<T, HandoffError>;

/// Write the L7 persistence tables to `state_dir` (atomically), where the next process
/// finds them. Called by the running daemon in a handoff after it stopped accepting and
/// before the new process accepts, when it stops on SIGTERM/SIGINT (after its listeners
/// stopped), and every second while it runs (so a crash loses at most the last second).
/// Bindings learned from answers to requests still in flight come after a handoff's save
/// (the old process drains after it).
pub fn save_l7_state<'a>(
    cfg: &Config,
    routers: impl Iterator<Item = (&'a str, &'a Arc<Engine>)>,
) -> Result<()> {
    let state = saved::collect(routers.map(|(_, e)| &**e));
    saved::write(&cfg.state_dir, &state)
        .map_err(|e| HandoffError::State(format!("writing {}: {e}", cfg.state_dir.display())))
}

/// Read what [`save_l7_state`] wrote into the new process's engines, for the backends that
/// still exist. Called before the new process accepts anything (after the old one stopped,
/// in a handoff; before the first accept, on a cold start).
pub fn load_l7_state<'a>(
    cfg: &Config,
    routers: impl Iterator<Item = (&'a str, &'a Arc<Engine>)>,
) -> Result<()> {
    let Some(state) = saved::read(&cfg.state_dir).map_err(HandoffError::State)? else {
        return Ok(());
    };
    for (name, engine) in routers {
        if let Some(s) = state.services.iter().find(|s| s.service == name) {
            let n = engine.import(cfg, s);
            log::info!(
                "L7 tables of {name}: {n} bindings carried over from {}",
                cfg.state_dir.display()
            );
        }
    }
    Ok(())
}

/// After a handoff, when its connections have drained: write what this process's engines
/// hold (the bindings learned on connections it served after [`save_l7_state`]) for the
/// successor to merge ([`merge_drained_l7_state`]).
pub fn save_drained_l7_state<'a>(
    cfg: &Config,
    routers: impl Iterator<Item = (&'a str, &'a Arc<Engine>)>,
) -> Result<()> {
    let state = saved::collect(routers.map(|(_, e)| &**e));
    saved::write_file(&cfg.state_dir, saved::DRAINED_FILE, &state)
        .map_err(|e| HandoffError::State(format!("writing {}: {e}", cfg.state_dir.display())))
}

/// Merge what a predecessor wrote when it finished draining ([`save_drained_l7_state`]),
/// if it has, into the engines: keys bound here keep their binding. The file is removed.
/// Returns how many bindings were added.
pub fn merge_drained_l7_state<'a>(
    cfg: &Config,
    routers: impl Iterator<Item = (&'a str, &'a Arc<Engine>)>,
) -> Result<usize> {
    let Some(state) =
        saved::read_file(&cfg.state_dir, saved::DRAINED_FILE).map_err(HandoffError::State)?
    else {
        return Ok(0);
    };
    let path = cfg.state_dir.join(saved::DRAINED_FILE);
    std::fs::remove_file(&path)
        .map_err(|e| HandoffError::State(format!("removing {}: {e}", path.display())))?;
    let mut added = 0;
    for (name, engine) in routers {
        if let Some(s) = state.services.iter().find(|s| s.service == name) {
            added += engine.merge(cfg, s);
        }
    }
    log::info!("L7 tables: {added} bindings the previous process learned while draining merged");
    Ok(added)
}

/// A request that reached the running daemon's handoff socket.
pub enum Request {
    /// A starting daemon wants the sockets.
    Takeover { chan: Channel, pid: u32 },
    /// `tether restart`: start a new daemon that takes over.
    Restart {
        chan: Channel,
        config: PathBuf,
        exe: PathBuf,
    },
}

/// The running daemon's handoff socket: requests of peers with our user id go to the
/// control loop. Dropping it stops listening and removes the socket file if it is still
/// ours (a successor has put its own in its place).
pub struct Server {
    path: PathBuf,
    ino: (u64, u64),
    task: JoinHandle<()>,
}

impl Server {
    /// Listen at `path`, replacing whatever is there atomically (a predecessor's socket: it
    /// has retired by the time we bind).
    pub fn start(path: &Path, requests: mpsc::Sender<Request>) -> Result<Server> {
        let err = |source| HandoffError::Socket {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().expect("a file in RUN_DIR");
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = path.with_extension(format!("handoff.{}.new", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        let meta = std::fs::metadata(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let listener = UnixListener::from_std(listener).map_err(err)?;
        let task = tokio::spawn(accept_loop(listener, requests));
        Ok(Server {
            path: path.to_owned(),
            ino: (meta.dev(), meta.ino()),
            task,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(meta) = std::fs::metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn accept_loop(listener: UnixListener, requests: mpsc::Sender<Request>) {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("handoff socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let chan = Channel::new(stream);
        match chan.peer_uid() {
            Ok(uid) if uid == me => {}
            Ok(uid) => {
                log::warn!("handoff socket: refused a peer with uid {uid}");
                continue;
            }
            Err(e) => {
                log::warn!("handoff socket: peer credentials: {e}");
                continue;
            }
        }
        let requests = requests.clone();
        tokio::spawn(async move {
            let req = match chan.recv_within(STEP_TIMEOUT).await {
                Ok((Msg::Takeover { pid, netns }, _)) => match own_netns() {
                    Ok(ours) if ours == netns => Request::Takeover { chan, pid },
                    Ok(_) => {
                        let reason = "a tether with the same pin_dir runs in another network \
                                      namespace: give each daemon its own pin_dir"
                            .to_string();
                        log::warn!("handoff socket: refused process {pid}: {reason}");
                        let _ = chan.send(&Msg::Failed { reason }, &[]).await;
                        return;
                    }
                    Err(e) => {
                        log::warn!("handoff socket: {e}");
                        return;
                    }
                },
                Ok((Msg::Restart { config, exe }, _)) => Request::Restart { chan, config, exe },
                Ok((other, _)) => {
                    let reason = format!("unexpected first message {:?}", other.name());
                    let _ = chan.send(&Msg::Failed { reason }, &[]).await;
                    return;
                }
                Err(e) => {
                    log::warn!("handoff socket: {e}");
                    return;
                }
            };
            if requests.send(req).await.is_err() {
                log::warn!("handoff socket: the daemon is shutting down");
            }
        });
    }
}

/// This process's network namespace (the inode of `/proc/self/ns/net`).
pub fn own_netns() -> std::io::Result<u64> {
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino())
}

/// Connect to the running daemon's handoff socket; `None` when no daemon runs (no socket,
/// or one left by a daemon that died).
pub async fn connect(path: &Path) -> Result<Option<Channel>> {
    match Channel::connect(path).await {
        Ok(c) => Ok(Some(c)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(source) => Err(HandoffError::Socket {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The new process's side of a handoff, from the sockets received to `Ready`.
pub struct Takeover {
    chan: Channel,
    /// The L7 listening sockets, by address (the frontends take theirs): one per worker of
    /// the old daemon (one `SO_REUSEPORT` group per address).
    pub listeners: HashMap<SocketAddr, Vec<std::net::TcpListener>>,
    /// The admin API's listening socket.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    /// The UDP services' sockets, by address (one each; none from an older daemon).
    pub udp: HashMap<SocketAddr, std::net::UdpSocket>,
}

impl Takeover {
    /// Ask the daemon behind `chan` for its sockets (it freezes until we commit or go away).
    pub async fn begin(chan: Channel) -> Result<Takeover> {
        let netns = own_netns()
            .map_err(|e| HandoffError::Protocol(format!("own network namespace: {e}")))?;
        chan.send(
            &Msg::Takeover {
                pid: std::process::id(),
                netns,
            },
            &[],
        )
        .await?;
        let (msg, fds) = chan.recv_within(PREPARE_TIMEOUT).await?;
        let (listeners, admin, udp) = match msg {
            Msg::Sockets {
                listeners,
                admin,
                udp,
            } => (listeners, admin, udp),
            Msg::Failed { reason } => return Err(HandoffError::Refused(reason)),
            other => {
                return Err(WireError::Unexpected {
                    expected: "sockets",
                    got: other,
                }
                .into());
            }
        };
        let listed = listeners.len() + usize::from(admin.is_some()) + udp.len();
        if fds.len() != listed {
            return Err(HandoffError::Protocol(format!(
                "{listed} sockets listed, {} received",
                fds.len()
            )));
        }
        let mut fds = fds.into_iter();
        let mut by_addr: HashMap<SocketAddr, Vec<std::net::TcpListener>> = HashMap::new();
        for (addr, fd) in listeners.into_iter().zip(fds.by_ref()) {
            let s = check_socket(addr, fd, socket2::Type::STREAM)?;
            by_addr.entry(addr).or_default().push(s.into());
        }
        let listeners = by_addr;
        // Taken only when listed: the UDP sockets follow.
        let admin = match admin.and_then(|a| Some((a, fds.next()?))) {
            Some((addr, fd)) => Some((addr, check_socket(addr, fd, socket2::Type::STREAM)?.into())),
            None => None,
        };
        let mut by_addr = HashMap::new();
        for (addr, fd) in udp.into_iter().zip(fds) {
            let s = check_socket(addr, fd, socket2::Type::DGRAM)?;
            // Read through the successor's runtime, which wants it non-blocking.
            s.set_nonblocking(true)
                .map_err(|e| HandoffError::Protocol(format!("UDP socket for {addr}: {e}")))?;
            if by_addr.insert(addr, s.into()).is_some() {
                return Err(HandoffError::Protocol(format!(
                    "two UDP sockets listed for {addr}"
                )));
            }
        }
        Ok(Takeover {
            chan,
            listeners,
            admin,
            udp: by_addr,
        })
    }

    /// The old daemon stops accepting and saves its state.
    pub async fn stop_old(&self) -> Result<()> {
        self.chan.send(&Msg::Stop, &[]).await?;
        self.answer("stopped").await
    }

    /// From here on this process serves; the old one drains.
    pub async fn commit(&self) -> Result<()> {
        self.chan.send(&Msg::Commit, &[]).await?;
        self.answer("committed").await
    }

    /// Tell the old daemon (and through it `tether restart`) that this one serves.
    pub async fn ready(self) {
        if let Err(e) = self.chan.send(&Msg::Ready, &[]).await {
            log::warn!("handoff: telling the old daemon we are ready: {e}");
        }
    }

    async fn answer(&self, expected: &'static str) -> Result<()> {
        match self.chan.recv_within(STEP_TIMEOUT).await? {
            (m, _) if m.name() == expected => Ok(()),
            (Msg::Failed { reason }, _) => Err(HandoffError::Refused(reason)),
            (got, _) => Err(WireError::Unexpected { expected, got }.into()),
        }
    }
}

/// A received socket must be of the type it was listed as (TCP or UDP) and bound to the
/// address it was listed for (port 0 in the list stands for whatever port the kernel chose),
/// so a socket is never served under another address's configuration.
fn check_socket(
    listed: SocketAddr,
    fd: std::os::fd::OwnedFd,
    want: socket2::Type,
) -> Result<socket2::Socket> {
    let s = socket2::Socket::from(fd);
    let err =
        |e: std::io::Error| HandoffError::Protocol(format!("socket listed for {listed}: {e}"));
    let ty = s.r#type().map_err(err)?;
    if ty != want {
        let name = |t: socket2::Type| {
            if t == socket2::Type::DGRAM {
                "UDP"
            } else {
                "TCP"
            }
        };
        return Err(HandoffError::Protocol(format!(
            "socket listed for {listed} as {} is not one",
            name(want)
        )));
    }
    let bound = s.local_addr().map_err(err)?.as_socket().ok_or_else(|| {
        HandoffError::Protocol(format!("socket listed for {listed} is not an IP socket"))
    })?;
    let same = if listed.port() == 0 {
        bound.ip() == listed.ip()
    } else {
        bound == listed
    };
    if same {
        Ok(s)
    } else {
        Err(HandoffError::Protocol(format!(
            "socket listed for {listed} is bound to {bound}"
        )))
    }
}

/// The listening sockets a daemon hands over, by address.
pub struct Sockets<'a> {
    /// The L7 frontends'.
    pub listeners: Vec<(SocketAddr, BorrowedFd<'a>)>,
    /// The admin API's.
    pub admin: Option<(SocketAddr, BorrowedFd<'a>)>,
    /// The UDP services' (one each).
    pub udp: Vec<(SocketAddr, BorrowedFd<'a>)>,
}

/// What the running daemon does at each step of handing over.
pub trait Handing {
    fn sockets(&self) -> Sockets<'_>;
    /// Stop accepting and reading datagrams (keep the sockets open) and save the L7 state
    /// ([`save_l7_state`]).
    fn stop_accepting(&mut self);
    /// The handoff failed after [`Handing::sockets`]: accept and read again (on the same
    /// sockets), and rewrite the kernel state from our own config.
    fn resume(&mut self, stopped: bool);
}

/// How a handoff ended for the running daemon.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Retired: drain and exit. `ready` tells whether the new process said it serves.
    Committed { pid: u32, ready: bool },
    /// Nothing changed; still serving.
    Aborted(String),
}

/// The running daemon's side of a handoff to process `pid` on `chan`.
pub async fn hand_over(chan: &Channel, pid: u32, d: &mut impl Handing) -> Outcome {
    log::info!("handoff: process {pid} takes over; sending the listening sockets");
    let sent = {
        let Sockets {
            listeners,
            admin,
            udp,
        } = d.sockets();
        let msg = Msg::Sockets {
            listeners: listeners.iter().map(|(a, _)| *a).collect(),
            admin: admin.map(|(a, _)| a),
            udp: udp.iter().map(|(a, _)| *a).collect(),
        };
        let fds: Vec<BorrowedFd<'_>> = listeners
            .iter()
            .map(|(_, f)| *f)
            .chain(admin.map(|(_, f)| f))
            .chain(udp.iter().map(|(_, f)| *f))
            .collect();
        chan.send(&msg, &fds).await
    };
    if let Err(e) = sent {
        d.resume(false);
        return Outcome::Aborted(e.to_string());
    }
    if let Err(e) = chan.expect("stop", PREPARE_TIMEOUT).await {
        d.resume(false);
        return Outcome::Aborted(e.to_string());
    }
    d.stop_accepting();
    if let Err(e) = chan.send(&Msg::Stopped, &[]).await {
        d.resume(true);
        return Outcome::Aborted(e.to_string());
    }
    if let Err(e) = chan.expect("commit", STEP_TIMEOUT).await {
        d.resume(true);
        return Outcome::Aborted(e.to_string());
    }
    // Past this point the new process accepts: whatever happens, we are retired.
    if let Err(e) = chan.send(&Msg::Committed, &[]).await {
        log::warn!("handoff: confirming the commit to {pid}: {e}");
    }
    let ready = match chan.expect("ready", STEP_TIMEOUT).await {
        Ok(_) => true,
        Err(e) => {
            log::warn!("handoff: process {pid} did not say it is ready: {e}");
            false
        }
    };
    Outcome::Committed { pid, ready }
}

/// Start `exe run --config config` for `tether restart` (stdin closed; stdout and stderr
/// are ours: one log stream) and answer on `chan` once it is ready (`ready` carries the pid
/// of the last process that took over), or why it is not.
pub fn spawn_restart(
    chan: Channel,
    config: &Path,
    exe: &Path,
    mut ready: watch::Receiver<Option<u32>>,
) -> JoinHandle<()> {
    let child = tokio::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .spawn();
    let what = format!("{} run --config {}", exe.display(), config.display());
    tokio::spawn(async move {
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("starting {what}: {e}");
                log::error!("restart: {reason}");
                let _ = chan.send(&Msg::Failed { reason }, &[]).await;
                return;
            }
        };
        let pid = child.id().unwrap_or(0);
        log::info!("restart: started {what} (pid {pid})");
        let answer = tokio::select! {
            status = child.wait() => Msg::Failed {
                reason: format!(
                    "the new tether (pid {pid}) exited ({}) before taking over; its output is in the running daemon's log",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                ),
            },
            r = ready.wait_for(|p| *p == Some(pid)) => match r {
                Ok(_) => Msg::Restarted { pid },
                Err(_) => Msg::Failed { reason: "the running daemon stopped".into() },
            },
            () = tokio::time::sleep(RESTART_TIMEOUT) => Msg::Failed {
                reason: format!("the new tether (pid {pid}) did not take over within {RESTART_TIMEOUT:?}"),
            },
        };
        if let Err(e) = chan.send(&answer, &[]).await {
            log::warn!("restart: answering tether restart: {e}");
        }
    })
}

/// `tether restart`: ask the daemon behind `socket` to start `exe run --config config` and
/// wait until it has taken over; returns its pid.
pub async fn request_restart(socket: &Path, config: &Path, exe: &Path) -> Result<u32> {
    let Some(chan) = connect(socket).await? else {
        return Err(HandoffError::Socket {
            path: socket.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no running tether listens here (start one with `tether run`)",
            ),
        });
    };
    chan.send(
        &Msg::Restart {
            config: config.to_owned(),
            exe: exe.to_owned(),
        },
        &[],
    )
    .await?;
    match chan.recv_within(RESTART_TIMEOUT + STEP_TIMEOUT).await? {
        (Msg::Restarted { pid }, _) => Ok(pid),
        (Msg::Failed { reason }, _) => Err(HandoffError::Refused(reason)),
        (got, _) => Err(WireError::Unexpected {
            expected: "restarted",
            got,
        }
        .into()),
    }
}
