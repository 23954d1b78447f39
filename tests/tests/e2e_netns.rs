//! End to end, tether run the way users run it in a namespace: `ip netns exec NS tether run`
//! with a config that sets none of the optional top-level fields (default `pin_dir`,
//! `xdp_mode`, table size, admin address), the CLI from the host with `--netns`, restarts by
//! `kill -TERM` and `kill -9` under a steady stream of new connections, and a drained backend
//! of a service without persistence keeping its established connections.
//!
//! Needs root and `TETHER_BIN`: run with `cargo xtask test`, or
//! `TETHER_BIN=target/debug/tether cargo test -p tether-tests --test e2e_netns -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use tether_tests::{
    daemon::{Daemon, Reload},
    http::{KeepAlive, http_get_from},
    l4lab::{IO_TIMEOUT, L4Lab, PORT},
    netns::spawn_in_netns,
};

/// New connections per second in the steady stream (the rate issue 9 measured with).
const STREAM_RATE: u64 = 40;
/// Bound on the stream's length whatever happens.
const STREAM_MAX: usize = 4000;
/// How long the stream runs before, between and after the restarts.
const SETTLE: Duration = Duration::from_millis(1500);

/// One connection of the stream: when, from which client, and the backend or the error.
type Outcome = (Instant, Ipv4Addr, Result<String, String>);

/// A steady stream of new connections (`Connection: close`), round robin over `clients`,
/// until `stop` (or [`STREAM_MAX`]).
fn spawn_stream(
    lab: &L4Lab,
    clients: Vec<Ipv4Addr>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Outcome>> {
    let dst = lab.topo.vip_addr(PORT);
    let period = Duration::from_micros(1_000_000 / STREAM_RATE);
    lab.ok(
        spawn_in_netns(&lab.topo.client.ns, "stream", move || {
            let mut out = Vec::new();
            let mut next = Instant::now();
            for i in 0..STREAM_MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let src = clients[i % clients.len()];
                let r = http_get_from(src, dst, IO_TIMEOUT).map_err(|e| e.to_string());
                out.push((Instant::now(), src, r));
                next += period;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            out
        }),
        "starting the connection stream",
    )
}

/// Client -> persisted backend id, from the pinned table.
fn bindings(lab: &L4Lab) -> BTreeMap<Ipv4Addr, u32> {
    let entries = lab.ok(lab.pins.persist_entries(), "reading TETHER_PERSIST");
    entries
        .into_iter()
        .filter(|(k, _)| k.service == lab.svc)
        .filter_map(|(k, v)| tether_tests::pinned::mapped_v4(&k.addr_be).map(|a| (a, v.backend)))
        .collect()
}

/// The issue 9 scenario: `ip netns exec`, default config, a source-IP service, and a steady
/// stream of new connections from 21 clients while the daemon is stopped with SIGTERM and
/// started, then killed with SIGKILL and started. Not one request fails and no client changes
/// backend; the pins live on the host's bpffs (0700) all along, and the CLI run from the host
/// with `--netns` finds the daemon.
#[test]
fn ip_netns_exec_restarts_lose_nothing() {
    const CLIENTS: usize = 21;
    // The default pin directory belongs to a real tether if one runs on this machine: never
    // take it over (a stale one, left by a crashed run of this test, is removed at start).
    if let Some(pid) = std::fs::read_to_string("/run/tether/tether.pid")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        // SAFETY: kill(pid, 0) only checks that the process exists.
        .filter(|pid| unsafe { libc::kill(*pid, 0) } == 0)
    {
        panic!(
            "a tether (pid {pid}) runs with the default pin directory {}: stop it before running this test",
            lb_common::DEFAULT_PIN_DIR
        );
    }
    let mut lab = L4Lab::start(CLIENTS, 3, |b| {
        b.service("web", PORT, Some(1800)).user_defaults()
    });
    let pin_dir = lab.d().pin_dir().to_path_buf();
    assert_eq!(
        pin_dir,
        Path::new(lb_common::DEFAULT_PIN_DIR),
        "the config sets no pin_dir"
    );
    // Seen from the test (the host's mount namespace): the daemon's private /sys did not hide
    // its pins.
    let meta = lab.ok(
        std::fs::symlink_metadata(&pin_dir),
        "stat the pin directory",
    );
    assert_eq!(
        (
            meta.is_dir(),
            meta.permissions().mode() & 0o7777,
            meta.uid()
        ),
        (true, 0o700, 0),
        "the pin directory on the host's bpffs is a root-owned 0700 directory"
    );
    // The default cap on new bindings (derived from the table's per-CPU share) is in force.
    let globals: aya::maps::Array<_, lb_common::Globals> = lab.ok(
        aya::maps::MapData::from_pin(lab.pins.path(lb_common::MAP_GLOBALS))
            .map_err(anyhow::Error::from)
            .and_then(|md| Ok(aya::maps::Map::from_map_data(md)?))
            .and_then(|m| Ok(aya::maps::Array::try_from(m)?)),
        "opening TETHER_GLOBALS",
    );
    let cap = lab
        .ok(globals.get(&0, 0), "reading TETHER_GLOBALS")
        .new_bindings_per_cpu;
    assert_eq!(
        cap,
        tether::dataplane::new_binding_cap(
            None,
            lb_common::PERSIST_DEFAULT_ENTRIES,
            tether::dataplane::possible_cpus()
        ),
        "the default cap on new bindings per CPU"
    );
    if lab.d().log_lines("joined that of pid").is_empty() {
        lab.fail("under ip netns exec the daemon should say it joined the host's mount namespace");
    }

    let clients: Vec<Ipv4Addr> = (0..CLIENTS).map(|i| lab.client(i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stream = spawn_stream(&lab, clients.clone(), stop.clone());
    std::thread::sleep(SETTLE);
    let before = bindings(&lab);

    let config = lab.builder.build();
    let mut marks = Vec::new();
    for how in ["SIGTERM", "SIGKILL"] {
        let old = lab.daemon.take().expect("running");
        marks.push((how, Instant::now()));
        match how {
            "SIGTERM" => lab.ok(old.stop_keep_pins(), "stopping tether with SIGTERM"),
            _ => lab.ok(old.kill_keep_pins(), "killing tether with SIGKILL"),
        };
        // Down for a while: XDP keeps forwarding through its pinned link.
        std::thread::sleep(Duration::from_millis(500));
        lab.daemon = Some(lab.ok(
            Daemon::start_with_existing_pins(&lab.bin, &lab.topo.lb.ns, &config, false),
            &format!("starting tether again after {how}"),
        ));
        std::thread::sleep(SETTLE);
    }
    stop.store(true, Ordering::Relaxed);
    let outcomes = stream
        .join()
        .unwrap_or_else(|_| lab.fail("the stream thread panicked"));

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.2.is_err()).collect();
    let mut seen: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
    for (_, src, r) in &outcomes {
        if let Ok(b) = r {
            seen.entry(*src).or_default().insert(b.clone());
        }
    }
    let moved: Vec<_> = seen.iter().filter(|(_, b)| b.len() > 1).collect();
    let across = |t: Instant| outcomes.iter().filter(|o| o.0 > t).count();
    eprintln!(
        "stream: {} connections, {} failed, {} clients; after SIGTERM {}, after SIGKILL {}",
        outcomes.len(),
        failed.len(),
        seen.len(),
        across(marks[0].1),
        across(marks[1].1)
    );
    if !failed.is_empty() || !moved.is_empty() {
        lab.fail(format!(
            "{} of {} connections failed (first: {:?}); clients that changed backend: {moved:?}",
            failed.len(),
            outcomes.len(),
            failed.iter().take(5).collect::<Vec<_>>()
        ));
    }
    assert!(
        across(marks[1].1) as u64 >= STREAM_RATE,
        "the stream ran on after the last restart"
    );
    assert_eq!(seen.len(), CLIENTS, "every client was served");
    assert_eq!(
        bindings(&lab),
        before,
        "every client's binding is the one it had before the restarts"
    );

    // The CLI from the host, entering the namespace itself (network only).
    let status = lab.ok(lab.d().cli(&["status"]), "tether --netns NS status");
    assert!(status.contains("web"), "status lists the service: {status}");
    let c0 = clients[0].to_string();
    let listed = lab.ok(
        lab.d().cli(&["persist", "list", "--client", &c0]),
        "tether --netns NS persist list",
    );
    let bound_to = lab.backend_name_of_id(before[&clients[0]]);
    assert!(
        listed.contains(&c0) && listed.contains(&bound_to),
        "persist list shows {c0} on {bound_to}: {listed}"
    );
    lab.assert_no_drops();
    lab.stop();
}

/// A service without persistence: a long-lived TCP connection keeps its backend when that
/// backend is set to draining by a SIGHUP reload (the connection table, not the Maglev table,
/// decides for established flows), while new connections avoid it.
#[test]
fn drained_backend_keeps_established_connections() {
    const NEW: usize = 60;
    let mut lab = L4Lab::start(2, 3, |b| b.service("web", PORT, None));
    let conn = lab.ok(
        lab.topo.connect_vip(lab.client(0), PORT, IO_TIMEOUT),
        "opening the long-lived connection",
    );
    let mut ka = KeepAlive::new(conn, IO_TIMEOUT);
    let x = lab.ok(ka.get(), "first request on the long-lived connection");
    let x_id = lab.backend_id_of_name(&x);

    // Requests every 50 ms on the connection from before the reload until after it (so it
    // never idles out), then 20 more: every one is answered by X.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_t = stop.clone();
    let user = std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..1000 {
            if stop_t.load(Ordering::Relaxed) {
                break;
            }
            got.push(ka.get().map_err(|e| e.to_string()));
            std::thread::sleep(Duration::from_millis(50));
        }
        for _ in 0..20 {
            got.push(ka.get().map_err(|e| e.to_string()));
        }
        got
    });
    std::thread::sleep(Duration::from_millis(200));
    lab.builder = lab
        .builder
        .clone()
        .backend_field(&x, "admin_state", json!("draining"));
    lab.ok(
        lab.d().write_config(&lab.builder.build()),
        "writing the config",
    );
    match lab.ok(lab.d().reload(), "reloading") {
        Reload::Applied(line) => eprintln!("{line}"),
        Reload::Refused(line) => lab.fail(format!("the reload was refused: {line}")),
    }
    let table = lab.ok(lab.pins.maglev_table(lab.svc), "reading TETHER_MAGLEV");
    assert!(
        !table.contains(&x_id),
        "draining {x} is out of the live Maglev table"
    );
    stop.store(true, Ordering::Relaxed);
    let got = user
        .join()
        .unwrap_or_else(|_| lab.fail("the connection's thread panicked"));
    let wrong: Vec<_> = got
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_deref() != Ok(x.as_str()))
        .collect();
    if !wrong.is_empty() {
        lab.fail(format!(
            "{} of {} requests on the established connection to {x} were not answered by it: {:?}",
            wrong.len(),
            got.len(),
            &wrong[..wrong.len().min(5)]
        ));
    }
    let plan: Vec<Ipv4Addr> = (0..NEW).map(|i| lab.client(i % 2)).collect();
    let got = lab.fetch_all(&plan);
    let to_x = got.iter().filter(|b| **b == x).count();
    assert_eq!(
        to_x, 0,
        "{to_x} of {NEW} new connections reached draining {x}"
    );
    let c = lab.svc_counters();
    assert!(
        c.flow_hits >= 20,
        "the connection's packets followed its connection-table entry: {c:?}"
    );
    lab.assert_no_drops();
    lab.stop();
}

/// A container with its own mount and PID namespaces and no bpffs of the host's on
/// /sys/fs/bpf (simulated with `unshare`, a tmpfs over /sys/fs/bpf): pins made there would
/// vanish with the container, so tether refuses to start and says how to fix it.
#[test]
fn container_without_host_bpffs_is_refused() {
    let bin = tether_tests::daemon::tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let script = format!(
        "mount -t tmpfs tmpfs /sys/fs/bpf && exec {} run --config /nonexistent/tether.json",
        bin.display()
    );
    let out = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            &script,
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap_or_else(|e| panic!("running unshare: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tether must not start: {stderr}");
    assert!(
        stderr.contains("bind-mount the host's bpffs") && stderr.contains("--netns"),
        "the refusal names both fixes: {stderr}"
    );
    assert!(
        !stderr.contains("nonexistent"),
        "refused before anything else is read: {stderr}"
    );
}
