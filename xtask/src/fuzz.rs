//! `cargo xtask fuzz [TARGET] [--secs N]`: run the cargo-fuzz targets in `fuzz/` (nightly,
//! libFuzzer) from their committed seeds. New inputs go to `fuzz/corpus/<target>` (not
//! committed); a crash leaves its input in `fuzz/artifacts/<target>/` and fails the run.

use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::bootstrap::{ensure_cargo_fuzz, run_cmd, step, workspace_root};

/// Every target, one per parser tether owns (`fuzz/Cargo.toml`).
pub const TARGETS: &[&str] = &[
    "proxy_protocol",
    "config",
    "health_status_line",
    "cookie_header",
    "query_path_params",
    "cookie_codec",
    "tls_hello",
    "sip_message",
    "backend_response",
];

#[derive(Args)]
pub struct FuzzArgs {
    /// One target (default: all of them, one after another).
    target: Option<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    secs: u64,
}

pub fn fuzz(args: FuzzArgs) -> Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("no fuzz target {t:?}; targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    run_targets(&targets, args.secs)
}

/// Builds once, then runs each target for `secs` seconds.
pub fn run_targets(targets: &[&str], secs: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    step("cargo fuzz build (nightly, sanitizers)", || {
        run_cmd(
            Command::new("cargo")
                .current_dir(&root)
                .args(["+nightly", "fuzz", "build"]),
        )
    })?;
    for t in targets {
        let corpus = root.join("fuzz/corpus").join(t);
        let seeds = root.join("fuzz/seeds").join(t);
        std::fs::create_dir_all(&corpus)?;
        step(&format!("fuzz {t} for {secs}s"), || {
            run_cmd(
                Command::new("cargo")
                    .current_dir(&root)
                    .args(["+nightly", "fuzz", "run", t])
                    .arg(&corpus)
                    .arg(&seeds)
                    .args([
                        "--",
                        &format!("-max_total_time={secs}"),
                        "-print_final_stats=1",
                    ]),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}: the crashing input is in fuzz/artifacts/{t}/; reproduce with \
                     `cargo +nightly fuzz run {t} fuzz/artifacts/{t}/<file>` and add it as a \
                     regression test"
                )
            })
        })?;
    }
    Ok(())
}
