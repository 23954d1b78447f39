//! The L7 proxy's worker threads: each runs its own current-thread tokio runtime and accepts
//! on its own `SO_REUSEPORT` listening socket per virtual service. The kernel spreads new
//! connections over the sockets; the accepting worker hands each to the least busy worker
//! (once, at accept), and from then on a connection, its backend connections and its timers
//! stay on one thread (no work stealing, no cross-thread wake-up per request). Each UDP (SIP)
//! virtual service runs on one worker too. The control plane (admin API, health checks,
//! mirroring, reloads) runs on a runtime of its own.
//!
//! [`Workers::start_pinned`] (the daemon's default) pins worker `i` to the `i`-th CPU the
//! process may run on when there are two or more workers and at least as many CPUs: a worker's
//! connections wait whenever it does, and pinned workers had the lower two-worker p99 in the
//! L7 benchmark (see README).

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::{runtime::Handle, task::JoinSet};

/// Handles of the worker runtimes; empty (the default): everything runs on the caller's
/// runtime as one worker (unit tests, the library used in-process).
#[derive(Clone, Default)]
pub struct Workers(Arc<[Handle]>);

impl Workers {
    /// Start `n` worker threads, each driving a current-thread runtime until the process
    /// exits, where the scheduler places them.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        Workers::start_on(&vec![None; n.max(1)])
    }

    /// [`Workers::start`] with worker `i` pinned to the `i`-th CPU this process may run on
    /// ([`pin_plan`]); unpinned when there are more workers than CPUs or the CPUs cannot be
    /// read. A worker that cannot be pinned runs unpinned (logged).
    pub fn start_pinned(n: usize) -> std::io::Result<Workers> {
        let plan = match allowed_cpus() {
            Ok(cpus) => pin_plan(n.max(1), &cpus),
            Err(e) => {
                log::warn!("L7 workers: reading the CPUs this process may use: {e}; not pinned");
                vec![None; n.max(1)]
            }
        };
        if let Some(cpus) = plan.iter().copied().collect::<Option<Vec<usize>>>() {
            log::info!("L7 workers pinned to CPUs {cpus:?} (worker i to the i-th)");
        }
        Workers::start_on(&plan)
    }

    /// One worker per entry of `plan`, pinned to its CPU where it names one.
    fn start_on(plan: &[Option<usize>]) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(plan.len());
        for (i, &cpu) in plan.iter().enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("tether-worker-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu
                        && let Err(e) = pin_current_thread(cpu)
                    {
                        log::warn!("L7 worker {i}: pinning to CPU {cpu}: {e}; runs unpinned");
                    }
                    rt.block_on(std::future::pending::<()>())
                })?;
        }
        Ok(Workers(handles.into()))
    }

    /// How many workers serve (at least one: the caller's runtime).
    pub fn len(&self) -> usize {
        self.0.len().max(1)
    }

    /// Never empty; see [`Workers::len`].
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One handle per worker (the caller's runtime when there are none).
    pub fn handles(&self) -> Vec<Handle> {
        (0..self.len()).map(|i| self.handle(i)).collect()
    }

    /// Worker `i`'s runtime (`i` taken modulo their number; the caller's runtime when there
    /// are none).
    pub fn handle(&self, i: usize) -> Handle {
        match self.0.get(i % self.0.len().max(1)) {
            Some(h) => h.clone(),
            None => Handle::current(),
        }
    }

    /// Run one accept loop per listening socket and worker: `make(worker, socket)` builds the
    /// loop, which runs on that worker's runtime (register `socket` with the runtime inside
    /// the future, where it runs). With more workers than sockets some sockets are shared,
    /// with more sockets than workers (a restart's predecessor had more) a worker serves
    /// several: no socket is left without an accept loop. Returns when every loop ended.
    pub async fn run_accept_loops<F, Fut>(&self, sockets: Vec<std::net::TcpListener>, make: F)
    where
        F: Fn(usize, std::net::TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut loops = JoinSet::new();
        let count = sockets.len();
        // Duplicates first (for workers beyond the sockets), then the sockets themselves.
        let mut jobs = Vec::new();
        for k in count..self.len().max(count) {
            if let Some(s) = sockets.get(k % count.max(1)) {
                match s.try_clone() {
                    Ok(dup) => jobs.push((k, dup)),
                    Err(e) => log::warn!("L7 listener: duplicating a socket for worker {k}: {e}"),
                }
            }
        }
        jobs.extend(sockets.into_iter().enumerate());
        for (k, socket) in jobs {
            let w = k % self.len();
            loops.spawn_on(make(w, socket), &self.handle(w));
        }
        while let Some(done) = loops.join_next().await {
            if let Err(e) = done
                && e.is_panic()
            {
                log::error!("L7 accept loop panicked: {e}");
            }
        }
    }
}

/// `n` listening sockets on `addr` in one `SO_REUSEPORT` group (the kernel spreads
/// connections over them by flow hash), starting with `have` (a restart's or a running
/// frontend's) and binding and listening on the rest at once ([`bind_group`] and
/// [`listen_bound`]).
pub fn listen_group(
    addr: SocketAddr,
    mut have: Vec<std::net::TcpListener>,
    n: usize,
    backlog: i32,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let bound = bind_group(addr, have.len(), n)?;
    have.extend(listen_bound(addr, bound, backlog));
    Ok(have)
}

/// The sockets that make `have` listening sockets on `addr` up to `n`, bound with
/// `SO_REUSEPORT` but not listening: the kernel steers no connection to a socket before it
/// listens, so a new daemon binds its extra sockets before a handoff commits (a bind error
/// refuses the start while the old daemon still serves) and listens on them
/// ([`listen_bound`]) once it serves; a handoff that aborts leaves no connection queued on
/// them. A socket that cannot join the group (a predecessor's bound without
/// `SO_REUSEPORT`) leaves fewer sockets: workers then share them.
pub fn bind_group(
    addr: SocketAddr,
    have: usize,
    n: usize,
) -> std::io::Result<Vec<socket2::Socket>> {
    let mut bound = Vec::new();
    while have + bound.len() < n {
        match bind_reuseport(addr) {
            Ok(s) => bound.push(s),
            Err(e) if have + bound.len() > 0 => {
                log::info!(
                    "{addr}: {} listening socket(s) for {n} workers ({e}); workers share them",
                    have + bound.len()
                );
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(bound)
}

/// Listen on sockets [`bind_group`] bound. One that fails (rare: bind already checked the
/// address) is closed and logged; the workers share the others.
pub fn listen_bound(
    addr: SocketAddr,
    bound: Vec<socket2::Socket>,
    backlog: i32,
) -> Vec<std::net::TcpListener> {
    bound
        .into_iter()
        .filter_map(|s| match s.listen(backlog) {
            Ok(()) => Some(s.into()),
            Err(e) => {
                log::error!(
                    "{addr}: listening on a worker's socket: {e}; workers share the others"
                );
                None
            }
        })
        .collect()
}

/// A socket bound with SO_REUSEADDR (restart while old connections are in TIME_WAIT) and
/// SO_REUSEPORT (one per worker), not listening yet.
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// `socket` registered with the runtime this runs on: call it inside an accept loop made by
/// [`Workers::run_accept_loops`], so the listener belongs to that worker.
pub fn register_listener(
    socket: std::net::TcpListener,
) -> std::io::Result<tokio::net::TcpListener> {
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket)
}

/// The CPUs worker `i` of `n` is pinned to: the `i`-th of `allowed` when there are several
/// workers and every one can have a CPU of its own; none when there are more workers than
/// CPUs (pinning two to one CPU would keep them off an idle one) or one worker (it shares
/// no CPU with another worker; pinned, it could not use the other CPUs, and it measured no
/// better in the L7 benchmark).
pub fn pin_plan(n: usize, allowed: &[usize]) -> Vec<Option<usize>> {
    if n >= 2 && n <= allowed.len() {
        allowed[..n].iter().map(|&c| Some(c)).collect()
    } else {
        vec![None; n]
    }
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), in ascending order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel writes at most its size.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        set
    };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set within its size (`c` < CPU_SETSIZE).
    Ok((0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pins the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(std::io::Error::other("CPU number out of range"));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it (checked
    // above); sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
