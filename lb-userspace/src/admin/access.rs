//! Who may use the admin API.
//!
//! - **Unix socket** (`/run/tether/<pin-dir-name>.sock`, mode 0600, owned by the daemon's
//!   user): the file's permissions are the credential, every route is open.
//! - **TCP** (`admin_listen`): every request carries a `Host` naming the listen address (an
//!   IP literal or `localhost`, with the listen port), so a DNS-rebinding page cannot reach it
//!   under its own name; a request with an `Origin` other than `http://<Host>` is refused (a
//!   cross-site form or fetch); and everything except `GET /metrics` from a loopback peer
//!   needs `Authorization: Bearer <token>`, the token in `admin_token_file`.
//!
//! `/metrics` stays open to loopback peers because Prometheus scrapers on the host are the
//! common case and the page holds only aggregate counters: no client address, nothing that
//! changes state.

use std::{
    fs,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt},
    path::{Path, PathBuf},
};

use hyper::{
    HeaderMap,
    header::{AUTHORIZATION, HOST, ORIGIN},
};

/// Hex characters of a generated token (256 random bits).
const TOKEN_HEX: usize = 64;
/// Shortest token accepted from a file an operator wrote.
const MIN_TOKEN: usize = 32;

/// Where a request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The Unix socket: only its owner can connect.
    Unix,
    Tcp(SocketAddr),
}

/// Why a request is refused: 401 (no or wrong credential) or 403 (never allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    Unauthorized(String),
    Forbidden(String),
}

/// The TCP listener's policy.
#[derive(Clone)]
pub struct Access {
    listen: SocketAddr,
    token: String,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Access {
    pub fn new(listen: SocketAddr, token: String) -> Access {
        Access { listen, token }
    }

    /// Whether `peer` may make this request.
    pub fn check(&self, peer: Peer, path: &str, headers: &HeaderMap) -> Result<(), Denied> {
        let Peer::Tcp(peer) = peer else {
            return Ok(());
        };
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| Denied::Forbidden("a Host header is required".into()))?;
        if !self.host_allowed(host) {
            return Err(Denied::Forbidden(format!(
                "Host {host:?} does not name this admin API ({}): refused against DNS rebinding",
                self.listen
            )));
        }
        if let Some(origin) = headers.get(ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !same {
                return Err(Denied::Forbidden(
                    "cross-origin requests are refused".into(),
                ));
            }
        }
        if path == "/metrics" && peer.ip().to_canonical().is_loopback() {
            return Ok(());
        }
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match presented {
            None => Err(Denied::Unauthorized(
                "a bearer token is required (Authorization: Bearer <admin_token_file contents>); \
                 the Unix socket needs none"
                    .into(),
            )),
            Some(t) if constant_time_eq(t.as_bytes(), self.token.as_bytes()) => Ok(()),
            Some(_) => Err(Denied::Unauthorized("wrong bearer token".into())),
        }
    }

    /// `Host` names the listen address: its IP (any local IP when listening on all of them),
    /// or `localhost` when listening on loopback, and its port (omitted only for port 80).
    fn host_allowed(&self, host: &str) -> bool {
        let Ok(auth) = host.parse::<http::uri::Authority>() else {
            return false;
        };
        if auth.as_str().contains('@') {
            return false;
        }
        match auth.port_u16() {
            Some(p) if p == self.listen.port() => {}
            None if self.listen.port() == 80 => {}
            _ => return false,
        }
        let name = auth.host();
        let want = self.listen.ip().to_canonical();
        let name_ip = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name)
            .parse::<IpAddr>();
        match name_ip {
            Ok(ip) => {
                let ip = ip.to_canonical();
                ip == want || want.is_unspecified() || (want.is_loopback() && ip.is_loopback())
            }
            Err(_) => {
                let n = name.trim_end_matches('.').to_ascii_lowercase();
                (n == "localhost" || n.ends_with(".localhost"))
                    && (want.is_loopback() || want.is_unspecified())
            }
        }
    }
}

/// Compares without an early exit on the first differing byte (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("admin token file {path}: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

/// The admin token in `path`, created (256 random bits, hex, mode 0600, its directory 0700)
/// when the file does not exist. An existing file must be a regular file owned by this user
/// and unreadable by anyone else, holding one token of at least 32 printable characters.
pub fn load_or_create_token(path: &Path) -> Result<String, TokenError> {
    let io_err = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    // Two daemons may start at once: the token is written to a private file and linked into
    // place, which fails if another got there first; then theirs is read.
    for _ in 0..3 {
        match read_token(path) {
            Ok(t) => return Ok(t),
            Err(TokenError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err)?;
        }
        let token = generate();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(token.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::hard_link(&tmp, path)
        })();
        let _ = fs::remove_file(&tmp);
        match written {
            Ok(()) => {
                log::info!("admin API: generated a bearer token in {}", path.display());
                return Ok(token);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    read_token(path)
}

fn read_token(path: &Path) -> Result<String, TokenError> {
    let unsafe_file = |reason: String| TokenError::Unsafe {
        path: path.to_owned(),
        reason,
    };
    let meta = fs::symlink_metadata(path).map_err(|source| TokenError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(unsafe_file(
            "not a regular file (symlinks are refused)".into(),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_file(format!(
            "owned by uid {}, not by this process's uid {me}",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(unsafe_file(format!(
            "mode {mode:03o} lets others read it: chmod 600"
        )));
    }
    let text = fs::read_to_string(path).map_err(|source| TokenError::Io {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.len() < MIN_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(unsafe_file(format!(
            "must hold one token of at least {MIN_TOKEN} printable characters"
        )));
    }
    Ok(token.to_string())
}

fn generate() -> String {
    use ring::rand::SecureRandom as _;
    let mut raw = [0u8; TOKEN_HEX / 2];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .expect("the OS random source works");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// The daemon's Unix socket for a pin directory: `/run/tether/<pin-dir-name>.sock`, beside
/// its pid file.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or("tether".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from(RUN_DIR).join(format!("{name}.sock"))
}

/// Directory of the daemon's pid files and sockets.
pub const RUN_DIR: &str = "/run/tether";

/// Binds the admin Unix socket at `path` with mode 0600: bound under a private name, chmod-ed,
/// then renamed into place, so it is never reachable with wider permissions. A socket left
/// by an earlier daemon is replaced.
pub fn bind_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    let tmp = path.with_extension(format!("sock.tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let l = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// Removes the socket file on drop if it is still the one this process bound (a newer daemon
/// may have replaced it).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    ino: Option<u64>,
}

impl SocketFile {
    pub fn new(path: PathBuf) -> SocketFile {
        let ino = fs::symlink_metadata(&path).ok().map(|m| m.ino());
        SocketFile { path, ino }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.ino.is_some() && fs::symlink_metadata(&self.path).ok().map(|m| m.ino()) == self.ino
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests;
