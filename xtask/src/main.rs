//! `cargo xtask run | test | bench | fuzz`: bootstrap the toolchain, build, run the demo, test.

mod bench;
mod bootstrap;
mod fuzz;
mod run;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "tether developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, build, and run the demo in network namespaces.
    Run(run::RunArgs),
    /// Install what is missing, then run every test tier.
    Test(test::TestArgs),
    /// Benchmarks against a baseline measured in the same run (`l4`).
    Bench(bench::BenchArgs),
    /// Run the cargo-fuzz targets (nightly): all, or one, for --secs each.
    Fuzz(fuzz::FuzzArgs),
    /// Only install what is missing (apt packages, rust-src, bpf-linker, cargo-fuzz,
    /// cargo-deny).
    Bootstrap,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Test(a) => test::test(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Fuzz(a) => fuzz::fuzz(a),
        Cmd::Bootstrap => {
            bootstrap::ensure_all()?;
            bootstrap::ensure_cargo_fuzz()?;
            bootstrap::ensure_cargo_deny()
        }
    }
}
