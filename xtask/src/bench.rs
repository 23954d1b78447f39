//! `cargo xtask bench [l4] [-- args]`: benchmarks, each measured against a baseline in the
//! same run. Not tests: they assert nothing about time, they report medians.

use anyhow::{Result, bail};
use clap::Args;

use crate::bootstrap::{ensure_all, run_cmd, step, workspace_root};

#[derive(Args)]
pub struct BenchArgs {
    /// Which benchmark: `l4` (XDP fast path).
    #[arg(default_value = "l4")]
    which: String,
    /// Passed to the benchmark (e.g. `--quick`, `--rounds 7`).
    #[arg(last = true)]
    extra: Vec<String>,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    ensure_all()?;
    match args.which.as_str() {
        "l4" => step("bench l4 (cargo bench -p tether-tests --bench l4)", || {
            run_cmd(
                std::process::Command::new("cargo")
                    .current_dir(workspace_root())
                    .args([
                        "bench",
                        "--locked",
                        "-p",
                        "tether-tests",
                        "--bench",
                        "l4",
                        "--",
                    ])
                    .args(&args.extra),
            )
        }),
        other => bail!("unknown benchmark {other:?}: available: l4"),
    }
}
