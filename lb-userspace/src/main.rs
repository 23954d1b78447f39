//! `tether`: the daemon binary. Parses the CLI and wires the library modules together.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tether::{
    admin::{access, cli, objects::cli as objects},
    config::Config,
    control, dataplane, handoff,
};

/// mimalloc instead of glibc malloc: the proxy allocates and frees many small objects per
/// request (header maps, body frames, tasks); see README, L7 benchmark. Built without
/// transparent huge pages (`no_thp`): with them, every page mimalloc touches again after
/// returning it to the kernel faulted in and zeroed 2 MiB (3% of the proxy's CPU in the
/// L7 benchmark's profile).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Kernel-accelerated L4+L7 load balancer with session persistence"
)]
struct Cli {
    /// Enter this network namespace first (`/run/netns/NAME`, as `ip netns add` makes; only
    /// the network namespace changes, so pins stay on the host's bpffs).
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the XDP program, fill its maps from the config and serve until SIGINT/SIGTERM;
    /// SIGHUP reloads the config (a bad one is refused and changes nothing). When a daemon
    /// with the same pin directory runs, take its listening sockets over: it drains and exits.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Replace the running daemon without refusing a connection: it starts `tether run
    /// --config FILE` (this binary), hands it the listening sockets, drains and exits.
    /// Returns once the new daemon serves.
    Restart {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print what it defines; changes nothing.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Stop the daemon (SIGTERM; XDP keeps forwarding through its pinned link), and with
    /// --detach also remove the link, the program and every pinned map.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Detach XDP and remove all pins (the persistence table included).
        #[arg(long)]
        detach: bool,
    },
    /// Per service and backend: state, weight, bound clients, counters, drop reasons.
    Status {
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// A live view per service and backend: request and packet rates, hit ratio, bound
    /// clients, health; refreshed every interval. `q` or Ctrl-C quits.
    Top {
        #[command(flatten)]
        admin: AdminTarget,
        /// Print one frame and exit (no terminal needed): rates over two samples
        /// `--interval` apart.
        #[arg(long)]
        once: bool,
        /// Seconds between samples (0.1 to 60).
        #[arg(long, default_value_t = 1.0, value_parser = interval)]
        interval: f64,
    },
    /// Read and edit the persistence tables: the kernel's source-IP table and the L7
    /// proxies' tables (client addresses, session and key digests).
    Persist {
        #[command(subcommand)]
        cmd: PersistCmd,
    },
    /// Virtual services through the admin API: list, show, create, edit, delete (applied
    /// live and written to the config file).
    Vs {
        #[command(subcommand)]
        cmd: objects::VsCmd,
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// Pools and their backends through the admin API (`pool edit web --backend b2
    /// --admin-state draining`).
    Pool {
        #[command(subcommand)]
        cmd: objects::PoolCmd,
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// Persistence profiles through the admin API (`profile create --type http-cookie
    /// --name web-ck`); system profiles can be edited, not deleted.
    Profile {
        #[command(subcommand)]
        cmd: objects::ProfileCmd,
        #[command(flatten)]
        admin: AdminTarget,
    },
}

#[derive(Args)]
struct Target {
    /// The daemon's config (for its pin directory).
    #[arg(long, short, conflicts_with = "pin_dir")]
    config: Option<PathBuf>,
    /// The pin directory, when there is no config at hand.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
}

#[derive(Args)]
struct AdminTarget {
    /// Use the admin API over TCP at this address (with the bearer token) instead of the
    /// daemon's Unix socket.
    #[arg(long, global = true)]
    admin: Option<SocketAddr>,
    /// The daemon's config: its pin_dir names the Unix socket, its admin_token_file the token.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// The Unix socket (default: /run/tether/<pin-dir-name>.sock of the config, else of the
    /// default pin directory).
    #[arg(long, conflicts_with = "admin", global = true)]
    socket: Option<PathBuf>,
    /// With --admin: the file holding the bearer token (default: the config's
    /// admin_token_file, else /var/lib/tether/admin.token).
    #[arg(long, requires = "admin", global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PersistCmd {
    /// One line per entry: service, client or prefix (or key digest), backend, age.
    List(PersistFilter),
    /// Delete the matching entries (all with no filter).
    Flush(PersistFilter),
}

#[derive(Args)]
struct PersistFilter {
    #[command(flatten)]
    admin: AdminTarget,
    #[arg(long)]
    service: Option<String>,
    #[arg(long)]
    client: Option<IpAddr>,
    #[arg(long)]
    backend: Option<String>,
}

fn interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (0.1..=60.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0.1 and 60 seconds"))
    }
}

impl AdminTarget {
    fn addr(&self) -> Result<cli::Endpoint> {
        let cfg = self.config.as_deref().map(Config::load).transpose()?;
        if let Some(addr) = self.admin {
            let path = match (&self.token_file, &cfg) {
                (Some(p), _) => p.clone(),
                (None, Some(c)) => c.admin_token_path(),
                (None, None) => Path::new(tether::config::DEFAULT_STATE_DIR)
                    .join(tether::config::TOKEN_FILE_NAME),
            };
            let token = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the admin token from {}", path.display()))?
                .trim()
                .to_string();
            return Ok(cli::Endpoint::Tcp { addr, token });
        }
        let socket = match (&self.socket, &cfg) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => access::socket_path(&c.pin_dir),
            (None, None) => access::socket_path(Path::new(lb_common::DEFAULT_PIN_DIR)),
        };
        Ok(cli::Endpoint::Unix(socket))
    }
}

impl Target {
    fn pin_dir(&self) -> Result<PathBuf> {
        match (&self.config, &self.pin_dir) {
            (Some(c), _) => Ok(Config::load(c)?.pin_dir),
            (None, Some(d)) => Ok(d.clone()),
            (None, None) => Ok(PathBuf::from(lb_common::DEFAULT_PIN_DIR)),
        }
    }
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // Namespaces first, while this is the only thread: setns into a mount namespace refuses
    // a process whose threads share its filesystem context, and a network namespace applies
    // to the calling thread and the threads it starts later.
    if let Some(ns) = &cli.netns {
        dataplane::bpffs::enter_netns(ns).context("--netns")?;
    }
    if matches!(cli.cmd, Cmd::Run { .. } | Cmd::Stop { .. }) {
        dataplane::bpffs::reach_host_bpffs().context("finding the host's bpffs")?;
    }
    match cli.cmd {
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: ok: {} virtual services, {} pools, {} backends, {} persistence profiles ({} of them system profiles)",
                config.display(),
                cfg.services.len(),
                cfg.pools.len(),
                cfg.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
                cfg.profiles.len(),
                cfg.profiles
                    .iter()
                    .filter(|p| tether::config::is_system_profile(&p.name))
                    .count()
            );
            Ok(())
        }
        Cmd::Run { config } => {
            Config::load(&config).context("refusing to start")?;
            // Each proxied connection holds two descriptors: take all the kernel allows.
            match tether::rlimit::raise_nofile() {
                Ok((before, after)) if before != after => {
                    log::info!("RLIMIT_NOFILE raised from {before} to {after}")
                }
                Ok((_, after)) => log::info!("RLIMIT_NOFILE is {after} (the hard limit)"),
                Err(e) => log::warn!("raising RLIMIT_NOFILE: {e}"),
            }
            // The L7 proxy's worker threads (one runtime and one listening socket per VIP
            // each); benchmarks match them to HAProxy's threads.
            let workers = match std::env::var("TETHER_WORKER_THREADS") {
                Ok(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .context("TETHER_WORKER_THREADS must be a positive number")?,
                Err(_) => std::thread::available_parallelism().map_or(2, |n| n.get()),
            };
            // Worker i on the i-th CPU unless TETHER_WORKER_PIN=0 (see README).
            let workers = match std::env::var("TETHER_WORKER_PIN").as_deref() {
                Ok("0") => tether::workers::Workers::start(workers),
                Ok("1") | Err(_) => tether::workers::Workers::start_pinned(workers),
                Ok(v) => bail!("TETHER_WORKER_PIN must be 0 or 1, not {v:?}"),
            }
            .context("worker threads")?;
            // The control plane (admin API, health checks, mirroring, reloads): one thread is
            // plenty, multi-thread so its blocking steps can use `block_in_place`.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("tether-control")
                .enable_all()
                .build()?;
            rt.block_on(control::run(&config, workers))
                .context("tether")
        }
        Cmd::Restart { config } => restart(&config),
        Cmd::Stop { target, detach } => stop(&target.pin_dir()?, detach),
        Cmd::Status { admin } => {
            print!("{}", cli::status(&admin.addr()?)?);
            Ok(())
        }
        Cmd::Top {
            admin,
            once,
            interval,
        } => {
            let interval = Duration::from_secs_f64(interval);
            if once {
                print!("{}", tether::top::once(&admin.addr()?, interval)?);
            } else {
                tether::top::live::run(&admin.addr()?, interval).context("tether top")?;
            }
            Ok(())
        }
        Cmd::Vs { cmd, admin } => {
            print!("{}", objects::vs(&admin.addr()?, cmd)?);
            Ok(())
        }
        Cmd::Pool { cmd, admin } => {
            print!("{}", objects::pool(&admin.addr()?, cmd)?);
            Ok(())
        }
        Cmd::Profile { cmd, admin } => {
            print!("{}", objects::profile(&admin.addr()?, cmd)?);
            Ok(())
        }
        Cmd::Persist {
            cmd: PersistCmd::List(f),
        } => {
            print!(
                "{}",
                cli::persist_list(
                    &f.admin.addr()?,
                    f.service.as_deref(),
                    f.client,
                    f.backend.as_deref()
                )?
            );
            Ok(())
        }
        Cmd::Persist {
            cmd: PersistCmd::Flush(f),
        } => {
            print!(
                "{}",
                cli::persist_flush(
                    &f.admin.addr()?,
                    f.service.as_deref(),
                    f.client,
                    f.backend.as_deref()
                )?
            );
            Ok(())
        }
    }
}

fn restart(config: &Path) -> Result<()> {
    let cfg = Config::load(config).context("refusing to restart")?;
    let config =
        std::fs::canonicalize(config).with_context(|| format!("resolving {}", config.display()))?;
    let exe = std::env::current_exe().context("finding this binary")?;
    let socket = handoff::socket_path(&cfg.pin_dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pid = rt
        .block_on(handoff::request_restart(&socket, &config, &exe))
        .context("tether restart")?;
    println!(
        "tether restarted: pid {pid} serves; the previous daemon drains its connections (up to {} ms) and exits",
        cfg.drain_timeout.as_millis()
    );
    Ok(())
}

fn stop(pin_dir: &Path, detach: bool) -> Result<()> {
    let pid_path = handoff::pid_path(pin_dir);
    match std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        // SAFETY: kill(pid, 0) only checks that the process exists.
        Some(pid) if unsafe { libc::kill(pid, 0) } == 0 => {
            // SAFETY: plain signal delivery to a pid we read from our own pid file.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t = Instant::now();
            // SAFETY: as above.
            while unsafe { libc::kill(pid, 0) } == 0 {
                if t.elapsed() > Duration::from_secs(15) {
                    bail!("tether (pid {pid}) did not exit within 15 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("stopped tether (pid {pid})");
        }
        _ => println!("no running tether for {}", pin_dir.display()),
    }
    if detach {
        let removed = dataplane::remove_pins(pin_dir)
            .with_context(|| format!("removing pins in {}", pin_dir.display()))?;
        if removed.is_empty() {
            println!("nothing pinned in {}", pin_dir.display());
        } else {
            println!(
                "detached and removed {} pins from {}: {}",
                removed.len(),
                pin_dir.display(),
                removed.join(", ")
            );
        }
    }
    Ok(())
}
