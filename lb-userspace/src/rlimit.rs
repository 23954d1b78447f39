//! The daemon's descriptor limit: a proxy holds two descriptors per proxied connection, and
//! the usual soft limit of 1024 would cap it at a few hundred clients.

use std::io;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (before, after).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get() -> libc::rlimit {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        lim
    }

    #[test]
    fn soft_limit_reaches_the_hard_limit() {
        let start = get();
        // Lower the soft limit first (raising it back is always allowed), so the raise is seen.
        let low = libc::rlimit {
            rlim_cur: start.rlim_max.min(512),
            rlim_max: start.rlim_max,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let (before, after) = raise_nofile().expect("raise");
        assert_eq!(before, low.rlim_cur);
        assert_eq!(after, start.rlim_max);
        assert_eq!(get().rlim_cur, start.rlim_max, "the process limit changed");
        assert_eq!(raise_nofile().expect("again"), (after, after), "idempotent");
    }
}
