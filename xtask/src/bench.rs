//! `cargo xtask bench [l4|veth|l7|chaos|mirror] [-- args]`: benchmarks, each measured against a baseline in the
//! same run. Not tests: they assert nothing about time, they report medians.

use anyhow::{Result, bail};
use clap::Args;

use crate::bootstrap::{build_tether, ensure_all, run_cmd, step, workspace_root};

#[derive(Args)]
pub struct BenchArgs {
    /// Which benchmark: `l4` (XDP fast path), `veth` (iperf3 through the VIP in the default
    /// XDP mode on a veth vs direct), `l7` (HTTP proxy vs direct and HAProxy) or `chaos`
    /// (backends killed in a loop under L4 and L7 load; `-- --secs N`) or `mirror` (the L7
    /// data path with Redis running and stopped).
    #[arg(default_value = "l4")]
    which: String,
    /// Passed to the benchmark (e.g. `--quick`, `--rounds 7`).
    #[arg(last = true)]
    extra: Vec<String>,
}

fn cargo_bench(name: &str) -> std::process::Command {
    let mut c = std::process::Command::new("cargo");
    c.current_dir(workspace_root()).args([
        "bench",
        "--locked",
        "-p",
        "tether-tests",
        "--bench",
        name,
        "--",
    ]);
    c
}

pub fn bench(args: BenchArgs) -> Result<()> {
    ensure_all()?;
    match args.which.as_str() {
        "l4" => step("bench l4 (cargo bench -p tether-tests --bench l4)", || {
            run_cmd(cargo_bench("l4").args(&args.extra))
        }),
        "l7" => {
            // The bench runs the release daemon (the proxy's speed is what it measures).
            let tether = build_tether(true)?;
            step("bench l7 (cargo bench -p tether-tests --bench l7)", || {
                run_cmd(
                    cargo_bench("l7")
                        .args(&args.extra)
                        .env("TETHER_BIN", &tether),
                )
            })
        }
        "chaos" => {
            let tether = build_tether(true)?;
            step(
                "bench chaos (cargo bench -p tether-tests --bench chaos)",
                || {
                    run_cmd(
                        cargo_bench("chaos")
                            .args(&args.extra)
                            .env("TETHER_BIN", &tether),
                    )
                },
            )
        }
        "veth" => {
            let tether = build_tether(false)?;
            step(
                "bench veth (cargo bench -p tether-tests --bench veth)",
                || {
                    run_cmd(
                        cargo_bench("veth")
                            .args(&args.extra)
                            .env("TETHER_BIN", &tether),
                    )
                },
            )
        }
        "mirror" => {
            let tether = build_tether(true)?;
            step(
                "bench mirror (cargo bench -p tether-tests --bench mirror)",
                || {
                    run_cmd(
                        cargo_bench("mirror")
                            .args(&args.extra)
                            .env("TETHER_BIN", &tether),
                    )
                },
            )
        }
        other => bail!("unknown benchmark {other:?}: available: l4, veth, l7, chaos, mirror"),
    }
}
