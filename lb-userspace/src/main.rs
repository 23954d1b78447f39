//! `tether`: the daemon binary. Parses the CLI and wires the library modules together.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tether::{
    balancer::{self, L2},
    config::Config,
    dataplane::{Dataplane, net},
};

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
    /// Load the XDP program, fill its maps from the config and serve until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print what it defines; changes nothing.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// How long to wait for a backend's neighbour entry.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

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
        Cmd::Run { config } => run(config),
    }
}

/// Resolve every backend's link-layer facts: the egress interface from its route (a backend
/// behind a gateway is refused: L2 DSR only rewrites MACs), that interface's MAC as source,
/// and the backend's MAC from the neighbour table. Resolution runs in parallel.
fn resolve_l2(cfg: &Config) -> Result<Vec<Vec<L2>>> {
    let one = |b: &tether::config::BackendConfig| -> Result<L2> {
        let egress = match (net::egress_interface(b.address), b.mac) {
            (Ok(dev), _) => dev,
            // An explicit MAC says the operator vouches for L2 reachability.
            (Err(e), Some(_)) => {
                log::warn!("{e}; using {} for {}", cfg.interface, b.address);
                cfg.interface.clone()
            }
            (Err(e), None) => return Err(e.into()),
        };
        let mac_dst = match b.mac {
            Some(m) => m,
            None => net::resolve_mac(b.address, &egress, RESOLVE_WAIT)?,
        };
        if egress != cfg.interface {
            log::info!(
                "backend {} is behind {egress}: forwarded by devmap redirect",
                b.address
            );
        }
        Ok(L2 {
            mac_dst,
            mac_src: net::mac_of(&egress)?,
            ifindex: net::ifindex(&egress)?,
        })
    };
    net::ifindex(&cfg.interface)?;
    std::thread::scope(|s| {
        let handles: Vec<Vec<_>> = cfg
            .pools
            .iter()
            .map(|p| p.backends.iter().map(|b| s.spawn(move || one(b))).collect())
            .collect();
        handles
            .into_iter()
            .zip(&cfg.pools)
            .map(|(hs, p)| {
                hs.into_iter()
                    .zip(&p.backends)
                    .map(|(h, b)| {
                        h.join()
                            .expect("resolver thread panicked")
                            .with_context(|| format!("pool {:?} backend {:?}", p.name, b.name))
                    })
                    .collect()
            })
            .collect()
    })
}

fn run(config: PathBuf) -> Result<()> {
    let cfg = Config::load(&config).context("refusing to start")?;
    let l2 = resolve_l2(&cfg)?;
    let plan = balancer::plan(&cfg, |p, b| Ok::<_, std::convert::Infallible>(l2[p][b]))?;
    let mut dp = Dataplane::load(&cfg.pin_dir, cfg.persist_table_entries)
        .context("loading the XDP program")?;
    // Fill the maps before attaching, so the first packet already sees complete services.
    dp.apply(&plan).context("writing the maps")?;
    dp.pin_program()?;
    let mode = dp.attach(&cfg.interface, cfg.xdp_mode)?;
    log::info!(
        "tether ready: {} virtual services, {} backends on {} ({mode:?} XDP), maps pinned in {}",
        plan.services.len(),
        plan.backends.len(),
        cfg.interface,
        cfg.pin_dir.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signal = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        anyhow::Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        })
    })?;
    dp.detach()?;
    log::info!(
        "tether stopped ({signal}): XDP detached from {}, maps left pinned in {}",
        cfg.interface,
        cfg.pin_dir.display()
    );
    Ok(())
}
