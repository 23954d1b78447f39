//! Errors that say something about this host rather than about the peer: out of descriptors,
//! buffers, memory or local ports. A health check or a proxied connect that fails with one
//! must not count against the backend (a descriptor leak would otherwise take every backend
//! down and move every persisted client).

use std::io;

/// EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL (no local port or address to bind), and
/// EADDRINUSE (ephemeral ports exhausted for that destination).
pub fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::EADDRINUSE
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_remote_errors() {
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
            libc::EADDRINUSE,
        ] {
            assert!(is_local(&io::Error::from_raw_os_error(e)), "errno {e}");
        }
        for e in [
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ECONNRESET,
        ] {
            assert!(!is_local(&io::Error::from_raw_os_error(e)), "errno {e}");
        }
        assert!(!is_local(&io::Error::other("no errno")));
    }
}
