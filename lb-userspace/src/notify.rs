//! Readiness for a service manager (systemd's `sd_notify` protocol): when `NOTIFY_SOCKET` is
//! set, a daemon that serves says `READY=1` and names itself the main process. After
//! `tether restart` the new daemon is the old one's child in the same service; naming itself
//! `MAINPID` keeps the service running when the old one exits (`Type=notify`,
//! `NotifyAccess=all`).

use std::{
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
    path::Path,
};

/// Environment variable naming the service manager's datagram socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tell the service manager (if any) that this process serves and is the main process.
/// Returns whether a manager was told.
pub fn ready() -> io::Result<bool> {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let socket = socket.to_string_lossy().into_owned();
    send(
        &socket,
        &format!("READY=1\nMAINPID={}\n", std::process::id()),
    )?;
    Ok(true)
}

/// One datagram to `socket`: a path, or an abstract name written with a leading `@`.
fn send(socket: &str, message: &str) -> io::Result<()> {
    let addr = match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => SocketAddr::from_pathname(Path::new(socket))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(message.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_and_main_pid_to_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("tether-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1\nMAINPID=7\n").unwrap();
        let mut buf = [0u8; 128];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nMAINPID=7\n");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("tether-notify-test-{}", std::process::id());
        let manager =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        send(&format!("@{name}"), "READY=1\n").unwrap();
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
