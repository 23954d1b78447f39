//! `cargo xtask run | test | bench`: bootstrap the toolchain, build, run the demo, test.

mod bench;
mod bootstrap;
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
    /// Only install what is missing (apt packages, rust-src, bpf-linker).
    Bootstrap,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Test(a) => test::test(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Bootstrap => bootstrap::ensure_all(),
    }
}
