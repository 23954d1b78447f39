//! `cargo xtask test`: bootstrap, lint, then every test tier: unit (with proptest),
//! BPF_PROG_TEST_RUN packet fixtures, end to end in network namespaces with the real daemon,
//! and the demo's smoke run.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::bootstrap::{build_tether, ensure_all, run_cmd, step, workspace_root};

#[derive(Args)]
pub struct TestArgs {
    /// Skip rustfmt and the two clippy passes.
    #[arg(long)]
    no_lint: bool,
    /// Only run tests whose name contains this (passed to every cargo test).
    filter: Option<String>,
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root()).args(args);
    c
}

pub fn test(args: TestArgs) -> Result<()> {
    ensure_all()?;
    if !args.no_lint {
        step("cargo fmt --check", || {
            run_cmd(&mut cargo(&["fmt", "--all", "--check"]))
        })?;
        step("clippy (workspace without lb-ebpf)", || {
            run_cmd(&mut cargo(&[
                "clippy",
                "--locked",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        step("clippy (lb-ebpf, nightly, bpfel-unknown-none)", || {
            run_cmd(&mut cargo(&[
                "+nightly",
                "clippy",
                "--locked",
                "-p",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    }
    let tether = build_tether(false)?;
    let filter: Vec<&str> = args.filter.as_deref().into_iter().collect();
    let with_filter = |base: &[&str], extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.push("--");
        v.extend(&filter);
        v.extend(extra);
        cargo(&v)
    };
    step("unit tests (lb-common, lb-userspace, test harness)", || {
        run_cmd(&mut with_filter(
            &["test", "--locked", "-p", "lb-common", "--features", "user"],
            &[],
        ))?;
        run_cmd(&mut with_filter(
            &["test", "--locked", "-p", "lb-userspace"],
            &[],
        ))?;
        run_cmd(&mut with_filter(
            &["test", "--locked", "-p", "tether-tests", "--lib"],
            &[],
        ))
    })?;
    step("XDP packet fixtures (BPF_PROG_TEST_RUN)", || {
        run_cmd(&mut with_filter(
            &[
                "test",
                "--locked",
                "-p",
                "tether-tests",
                "--test",
                "xdp_fixtures",
            ],
            &[],
        ))
    })?;
    step("end to end in network namespaces", || {
        // One test at a time: each builds its own topology and daemon, and 2 cores are shared.
        run_cmd(
            with_filter(
                &[
                    "test",
                    "--locked",
                    "-p",
                    "tether-tests",
                    "--test",
                    "e2e_l4",
                    "--test",
                    "e2e_ops",
                    "--test",
                    "e2e_l7",
                    "--test",
                    "e2e_l7_keys",
                    "--test",
                    "e2e_tls",
                ],
                &["--test-threads=1"],
            )
            .env("TETHER_BIN", &tether),
        )
    })?;
    if args.filter.is_none() {
        step("demo smoke run (cargo xtask run -- --smoke)", || {
            run_cmd(&mut cargo(&["xtask", "run", "--smoke"]))
        })?;
    }
    eprintln!("[xtask] all test tiers passed");
    Ok(())
}
