//! `cargo xtask test`: bootstrap, lint (rustfmt, clippy, cargo deny), then every test tier:
//! unit (with proptest), BPF_PROG_TEST_RUN packet fixtures, end to end in network namespaces
//! with the real daemon, the demo's smoke run, and each fuzz target for 20 s.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::bootstrap::{
    build_tether, ensure_all, ensure_cargo_deny, run_cmd, step, workspace_root,
};

/// Seconds each fuzz target runs in a full test run.
const FUZZ_SECS: u64 = 20;

#[derive(Args)]
pub struct TestArgs {
    /// Skip rustfmt, the two clippy passes and cargo deny.
    #[arg(long)]
    no_lint: bool,
    /// Only run tests whose name contains this (passed to every cargo test).
    filter: Option<String>,
}

/// The uptime the fresh-machine pass simulates.
const FRESH_UPTIME_S: u64 = 60;

fn uptime_s() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/uptime").ok()?;
    s.split('.').next()?.parse().ok()
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
        ensure_cargo_deny()?;
        step("cargo deny check bans licenses sources", || {
            run_cmd(&mut cargo(&[
                "deny", "--locked", "check", "bans", "licenses", "sources",
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
        ))?;
        // Inputs the fuzz targets once crashed on.
        run_cmd(&mut with_filter(
            &[
                "test",
                "--locked",
                "-p",
                "tether-tests",
                "--test",
                "fuzz_regressions",
            ],
            &[],
        ))
    })?;
    // A new user's machine is often minutes old: CLOCK_MONOTONIC is small, and a test that
    // subtracts an age from it must still hold. A time namespace shows the daemon's unit
    // tests a machine booted a minute ago (the XDP fixtures read the kernel's clock, which
    // no namespace shifts; they use the same uptime-independent arithmetic).
    if let Some(shift) = uptime_s().map(|u| u.saturating_sub(FRESH_UPTIME_S))
        && shift > 0
    {
        step(
            "unit tests (lb-userspace) on a machine booted a minute ago (time namespace)",
            || {
                let back = format!("-{shift}");
                let mut c = Command::new("unshare");
                c.current_dir(workspace_root())
                    .args([
                        "--time",
                        "--fork",
                        "--monotonic",
                        &back,
                        "--boottime",
                        &back,
                    ])
                    .args(["cargo", "test", "--locked", "-p", "lb-userspace", "--"])
                    .args(&filter);
                run_cmd(&mut c)
            },
        )?;
    }
    step("XDP packet fixtures (BPF_PROG_TEST_RUN)", || {
        run_cmd(&mut with_filter(
            &[
                "test",
                "--locked",
                "-p",
                "tether-tests",
                "--test",
                "xdp_fixtures",
                "--test",
                "xdp_hostile",
                "--test",
                "xdp_services",
                "--test",
                "xdp_shards",
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
                    "e2e_netns",
                    "--test",
                    "e2e_l7",
                    "--test",
                    "e2e_l7_keys",
                    "--test",
                    "e2e_restart",
                    "--test",
                    "e2e_security",
                    "--test",
                    "e2e_sip_script",
                    "--test",
                    "e2e_tls",
                    "--test",
                    "e2e_observe",
                    "--test",
                    "e2e_objects",
                    "--test",
                    "e2e_multi",
                    "--test",
                    "e2e_multi_stored",
                    "--test",
                    "e2e_mirror_ha",
                    "--test",
                    "e2e_multi_lookup",
                    "--test",
                    "e2e_gslb",
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
        crate::fuzz::run_targets(crate::fuzz::TARGETS, FUZZ_SECS)?;
    }
    eprintln!("[xtask] all test tiers passed");
    Ok(())
}
