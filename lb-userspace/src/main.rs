//! `tether`: the daemon binary. Parses the CLI and wires the library modules together.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tether::{admin::cli, config::Config, control, dataplane};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Kernel-accelerated L4+L7 load balancer with session persistence"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the XDP program, fill its maps from the config and serve until SIGINT/SIGTERM;
    /// SIGHUP reloads the config (a bad one is refused and changes nothing).
    Run {
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
    /// Read and edit the persistence tables: the kernel's source-IP table and the L7
    /// proxies' tables (client addresses, session and key digests).
    Persist {
        #[command(subcommand)]
        cmd: PersistCmd,
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
    /// Admin API address (default: the config's admin_listen, else 127.0.0.1:9180).
    #[arg(long)]
    admin: Option<SocketAddr>,
    #[arg(long, short)]
    config: Option<PathBuf>,
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

impl AdminTarget {
    fn addr(&self) -> Result<SocketAddr> {
        if let Some(a) = self.admin {
            return Ok(a);
        }
        match &self.config {
            Some(c) => Ok(Config::load(c)?.admin_listen),
            None => Ok(tether::config::DEFAULT_ADMIN_LISTEN
                .parse()
                .expect("valid default")),
        }
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
    match Cli::parse().cmd {
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: ok: {} virtual services, {} pools, {} backends, {} persistence profiles",
                config.display(),
                cfg.services.len(),
                cfg.pools.len(),
                cfg.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
                cfg.profiles.len()
            );
            Ok(())
        }
        Cmd::Run { config } => {
            let pin_dir = Config::load(&config).context("refusing to start")?.pin_dir;
            let pid = pid_file(&pin_dir);
            std::fs::create_dir_all(pid.parent().expect("has a parent"))?;
            std::fs::write(&pid, format!("{}\n", std::process::id()))
                .with_context(|| format!("writing {}", pid.display()))?;
            // Proxy and control tasks share these; benchmarks match them to HAProxy's threads.
            let workers = match std::env::var("TETHER_WORKER_THREADS") {
                Ok(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .context("TETHER_WORKER_THREADS must be a positive number")?,
                Err(_) => std::thread::available_parallelism().map_or(2, |n| n.get()),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()?;
            let r = rt.block_on(control::run(&config));
            let _ = std::fs::remove_file(&pid);
            r.context("tether")
        }
        Cmd::Stop { target, detach } => stop(&target.pin_dir()?, detach),
        Cmd::Status { admin } => {
            print!("{}", cli::status(admin.addr()?)?);
            Ok(())
        }
        Cmd::Persist {
            cmd: PersistCmd::List(f),
        } => {
            print!(
                "{}",
                cli::persist_list(
                    f.admin.addr()?,
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
                    f.admin.addr()?,
                    f.service.as_deref(),
                    f.client,
                    f.backend.as_deref()
                )?
            );
            Ok(())
        }
    }
}

/// Where a daemon using `pin_dir` writes its pid.
fn pid_file(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or("tether".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from("/run/tether").join(format!("{name}.pid"))
}

fn stop(pin_dir: &Path, detach: bool) -> Result<()> {
    let pid_path = pid_file(pin_dir);
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
