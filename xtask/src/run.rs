//! `cargo xtask run`: bootstrap, build the daemon and the demo, run the demo
//! (tests/src/bin/tether-demo.rs) in network namespaces.
//!
//! xtask must not depend on the daemon or the test harness (on a fresh machine xtask is
//! compiled before bpf-linker exists), so both are built here with cargo and the demo is
//! exec'ed with `TETHER_BIN` pointing at the daemon.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Result, bail};
use clap::Args;

use crate::bootstrap::{build_tether, ensure_all, run_cmd, step, workspace_root};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Non-interactive: bounded traffic from every client address, report, tear down,
    /// exit 0 or 1.
    #[arg(long)]
    pub smoke: bool,
    /// Build the daemon with --release.
    #[arg(long)]
    pub release: bool,
    /// Arguments for the demo after `--`, e.g. `cargo xtask run -- --smoke`,
    /// `-- --clients 20 --backends 4 --xdp-mode generic` (see `-- --help`).
    #[arg(last = true)]
    pub demo_args: Vec<String>,
}

pub fn run(a: RunArgs) -> Result<()> {
    ensure_all()?;
    let tether = build_tether(a.release)?;
    let root = workspace_root();
    step("cargo build tether-demo", || {
        run_cmd(Command::new("cargo").current_dir(&root).args([
            "build",
            "--locked",
            "-p",
            "tether-tests",
            "--bin",
            "tether-demo",
        ]))
    })?;
    let demo = root.join("target").join("debug").join("tether-demo");
    if !demo.exists() {
        bail!("build succeeded but {} is missing", demo.display());
    }
    let mut cmd = Command::new(&demo);
    cmd.current_dir(&root).env("TETHER_BIN", &tether);
    if a.smoke && !a.demo_args.iter().any(|x| x == "--smoke") {
        cmd.arg("--smoke");
    }
    cmd.args(&a.demo_args);
    eprintln!(
        "[xtask] exec {} (TETHER_BIN={})",
        demo.display(),
        tether.display()
    );
    // Replace this process: Ctrl-C goes straight to the demo, which tears down in order.
    let err = cmd.exec();
    bail!("exec {}: {err}", demo.display())
}
