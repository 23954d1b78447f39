//! `cargo xtask bench l4`: the XDP fast path against a trivial MAC-swap XDP_TX program, in the
//! same run, so the figure that matters is the ratio.
//!
//! - live frames (BPF_F_TEST_XDP_LIVE_FRAMES) on a veth inside a namespace this bench creates,
//!   its peer dropping with a native XDP_DROP: the whole transmit path, persistence hit vs
//!   baseline, packets per second;
//! - per-packet runs (repeat = 1, so each run sees a fresh frame) over many distinct clients:
//!   new-client path (Maglev + LRU insert), hit path, baseline;
//! - in both, the floor programs (lb-ebpf `floor`): one `TETHER_PERSIST4` lookup and a MAC
//!   swap, and (per packet) the lookup plus an LRU insert: what any program keeping this
//!   table pays, so tether's own share is its ratio to them;
//! - the hit path with the persistence table prefilled to 1M and 10M entries, and the
//!   table's memory as the kernel accounts it.
//!
//! Every figure is the median of several rounds; a ratio is the median of the rounds' own
//! ratios. Results go to stdout and target/bench/l4.md.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use lb_common::{
    MAP_PERSIST4, MAP_PERSIST4_SHARDS, PROG_DROP, PROG_FLOOR_HIT, PROG_FLOOR_NEW, PROG_SWAP_TX,
    PROG_XDP, Persist4Layout, PersistKey4, PersistValue4, mono_seconds,
};
use tether::{
    balancer::{self, L2},
    config::Config,
    dataplane::{
        Dataplane, EBPF_OBJECT, net,
        persist_table::{self, Table4},
    },
};
use tether_tests::{bench::Args, netns::run_in_netns, packet::PacketBuilder, pinned::Pins};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
const LB_MAC: [u8; 6] = [0x02, 0x7e, 0, 0, 0, 0x01];
/// The verdict of every packet the bench times (linux/bpf.h).
const XDP_TX: u32 = 3;

struct Opts {
    rounds: usize,
    live_packets: u32,
    clients: usize,
    big_tables: Vec<u32>,
}

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 5,
        live_packets: 2_000_000,
        clients: 100_000,
        big_tables: vec![1 << 20, 10 << 20],
    };
    let mut args = Args::from_env("--rounds N --live-packets N --clients N --no-tables --quick");
    while let Some(a) = args.next_flag() {
        match a.as_str() {
            "--rounds" => o.rounds = args.value(&a),
            "--live-packets" => o.live_packets = args.value(&a),
            "--clients" => o.clients = args.value(&a),
            // The live-frames and per-packet rows only (no prefilled big tables).
            "--no-tables" => o.big_tables.clear(),
            "--quick" => {
                o.rounds = 3;
                o.live_packets = 200_000;
                o.clients = 10_000;
                o.big_tables = vec![1 << 20];
            }
            other => args.unknown(other),
        }
    }
    o
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with a veth pair: frames sent out of `a` arrive on `b`.
struct Bed {
    ns: String,
}

impl Bed {
    fn new() -> Bed {
        let ns = format!("tbench{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns]);
        let bed = Bed { ns };
        sh(&[
            "ip", "-n", &bed.ns, "link", "add", "tba", "type", "veth", "peer", "name", "tbb",
        ]);
        sh(&[
            "ip",
            "-n",
            &bed.ns,
            "link",
            "set",
            "tba",
            "address",
            "02:7e:00:00:00:01",
            "up",
        ]);
        sh(&["ip", "-n", &bed.ns, "link", "set", "tbb", "up"]);
        bed
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn median(v: Vec<f64>) -> f64 {
    tether_tests::bench::median(v).expect("a finite value from at least one round")
}

/// Median over rounds of each round's ratio: a round measures both programs back to back,
/// so load from other processes that slows a whole round cancels out.
fn median_ratio(num: &[f64], den: &[f64]) -> f64 {
    median(num.iter().zip(den).map(|(n, d)| n / d).collect())
}

/// xdp_md for test_run: data 0, data_end = len, the ingress device (needed for XDP_TX).
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// ns/packet over `packets` live frames (wall clock, the kernel's own figure is similar).
fn live(prog: &Xdp, frame: &[u8], ifindex: u32, packets: u32) -> f64 {
    let ctx = xdp_md(frame.len(), ifindex);
    let t = Instant::now();
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: packets,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::new()
        })
        .expect("live-frames test_run");
    let wall = t.elapsed().as_nanos() as f64 / packets as f64;
    let _ = r;
    wall
}

/// Kernel-timed ns per run for each frame run once (repeat = 1: a fresh frame every time).
fn per_packet(prog: &Xdp, frames: &[Vec<u8>], ifindex: u32, want: u32) -> f64 {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 256];
    for f in frames {
        let ctx = xdp_md(f.len(), ifindex);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .expect("test_run");
        assert_eq!(r.return_value, want, "unexpected verdict in benchmark");
        total += r.duration;
    }
    total.as_nanos() as f64 / frames.len() as f64
}

fn frame(client: Ipv4Addr, sport: u16) -> Vec<u8> {
    PacketBuilder::tcp4(client, sport, VIP, 80)
        .macs([0x02, 0xc1, 0, 0, 0, 1], LB_MAC)
        .bytes()
}

/// Clients 11.0.0.0 + i: distinct /32s, as the prefill writes them.
fn client(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0b00_0000u32 + i as u32)
}

fn config(pin_dir: &Path, entries: u32) -> Config {
    Config::parse(&format!(
        r#"{{"interface":"tba","pin_dir":"{}","persist_table_entries":{entries},"persist_new_bindings_per_cpu_s":0,
        "virtual_services":[{{"name":"bench","vip":"{VIP}","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"p","persistence":"ip"}}],
        "pools":[{{"name":"p","backends":[
            {{"name":"b1","address":"10.99.0.11","mac":"02:be:00:00:00:0b"}},
            {{"name":"b2","address":"10.99.0.12","mac":"02:be:00:00:00:0c"}},
            {{"name":"b3","address":"10.99.0.13","mac":"02:be:00:00:00:0d"}}]}}],
        "persistence_profiles":[{{"name":"ip","type":"client-ip","timeout_s":3600}}]}}"#,
        pin_dir.display()
    ))
    .expect("bench config is valid")
}

/// Removes a pin directory when dropped, also when a benchmark step panics.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Loaded {
    dp: Dataplane,
    // Declared after `dp`: the program and maps are released before the pins go.
    pin_dir: PinDir,
    ifindex: u32,
}

fn load(tag: &str, entries: u32) -> Loaded {
    load_over(tag, entries, |_| {})
}

/// As [`load`], after `pin` has pinned maps in the fresh pin directory for the daemon to
/// reuse.
fn load_over(tag: &str, entries: u32, pin: impl FnOnce(&Path)) -> Loaded {
    let pin_dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/tether-bench-{}-{tag}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&pin_dir.0);
    std::fs::create_dir_all(&pin_dir.0).expect("pin dir");
    pin(&pin_dir.0);
    let cfg = config(&pin_dir.0, entries);
    let ifindex = net::ifindex("tba").expect("tba");
    let mac_src = net::mac_of("tba").expect("mac");
    let ids = balancer::assign_ids(&cfg, &balancer::Previous::default()).expect("ids");
    let plan = balancer::plan(&cfg, &ids, &balancer::all_up(&cfg), |p, b| {
        Ok::<_, ()>(L2 {
            mac_dst: cfg.pools[p].backends[b].mac.expect("mac"),
            mac_src,
            ifindex,
        })
    })
    .expect("plan");
    let mut dp = Dataplane::load(&pin_dir.0, entries).expect("load");
    dp.apply(&plan).expect("apply");
    for name in [PROG_SWAP_TX, PROG_DROP, PROG_FLOOR_HIT, PROG_FLOOR_NEW] {
        let p: &mut Xdp = dp
            .ebpf_mut()
            .program_mut(name)
            .expect(name)
            .try_into()
            .expect("xdp");
        p.load().expect("load aux program");
    }
    Loaded {
        dp,
        pin_dir,
        ifindex,
    }
}

/// `frames` in a fixed pseudo-random order (xorshift Fisher-Yates).
fn shuffled(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = frames.to_vec();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..out.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.swap(i, (x % (i as u64 + 1)) as usize);
    }
    out
}

/// One unsplit IPv4 table of `entries` pinned in `dir`, as builds before the shards left
/// it: the daemon keeps a pinned table's layout, so this is how such a table runs now.
fn pin_single_table(dir: &Path, entries: u32) {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(MAP_PERSIST4, entries)
        .map_pin_path(MAP_PERSIST4, dir.join(MAP_PERSIST4));
    loader.load(EBPF_OBJECT).expect("pinning one IPv4 table");
}

fn prog<'a>(l: &'a mut Loaded, name: &str) -> &'a Xdp {
    let p: &mut Xdp =
        l.dp.ebpf_mut()
            .program_mut(name)
            .expect(name)
            .try_into()
            .expect("xdp");
    p
}

fn pin_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Fill the persistence table with `n` live entries, spread over the CPUs (the table keeps a
/// free list per CPU, so inserting everything from one CPU would evict its own entries).
fn prefill(pin_dir: &Path, n: usize) -> Duration {
    let t = Instant::now();
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    std::thread::scope(|s| {
        for cpu in 0..cpus {
            s.spawn(move || {
                pin_cpu(cpu);
                // Each key into its shard, as the daemon writes bindings.
                let mut m = Table4::open(pin_dir).expect("IPv4 shards");
                let now = monotonic_ns();
                for i in (cpu..n).step_by(cpus) {
                    let key = PersistKey4 {
                        addr_be: client(i).octets(),
                        service: 0,
                    };
                    let v = PersistValue4 {
                        backend: (i % 3) as u16,
                        identity_tag: 0,
                        last_seen_s: mono_seconds(now),
                    };
                    m.insert(&key, &v, 0).expect("insert");
                }
            });
        }
    });
    t.elapsed()
}

/// Remove the bindings of clients `first..first + n` (service 0) that `floor_new` wrote (its
/// XDP_TX verdicts showed each insert succeeded; one the LRU has evicted since is gone
/// already).
fn remove_bindings(pin_dir: &Path, first: usize, n: usize) {
    let md = MapData::from_pin(pin_dir.join(MAP_PERSIST4)).expect("persist4 pin");
    let mut m: BpfHashMap<MapData, PersistKey4, PersistValue4> =
        BpfHashMap::try_from(aya::maps::Map::LruHashMap(md)).expect("lru map");
    for i in first..first + n {
        let key = PersistKey4 {
            addr_be: client(i).octets(),
            service: 0,
        };
        match m.remove(&key) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => panic!("removing floor_new's binding of {}: {e}", client(i)),
        }
    }
}

/// The kernel's memory accounting for the pinned IPv4 persistence table: memlock and
/// max_entries summed over the shards in use, and the layout.
fn persist_memory(pin_dir: &Path) -> (u64, u64, Persist4Layout) {
    let layout = persist_table::pinned_layout(pin_dir).expect("IPv4 table pinned");
    let (mut mem, mut max) = (0, 0);
    for name in &MAP_PERSIST4_SHARDS[..layout.shards as usize] {
        let md = MapData::from_pin(pin_dir.join(name)).expect("shard pin");
        let fd = md.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
        let get = |k: &str| {
            info.lines()
                .find_map(|l| {
                    l.strip_prefix(k)
                        .map(|v| v.trim().parse::<u64>().expect("number"))
                })
                .unwrap_or_else(|| panic!("{k} missing in fdinfo"))
        };
        mem += get("memlock:");
        max += get("max_entries:");
    }
    (mem, max, layout)
}

fn main() {
    let o = opts();
    let bed = Bed::new();
    // Native XDP_DROP on the peer: XDP_TX frames from `tba` need a native program there.
    let report = run_in_netns(&bed.ns, move || {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut l = load("main", 1 << 20);
        let ifindex = l.ifindex;
        {
            let drop: &mut Xdp =
                l.dp.ebpf_mut()
                    .program_mut(PROG_DROP)
                    .expect("drop")
                    .try_into()
                    .expect("xdp");
            drop.attach("tbb", XdpMode::Driver)
                .expect("attach XDP_DROP to the peer");
        }
        let hit_frame = frame(Ipv4Addr::new(10, 1, 0, 1), 40000);
        // Create the binding once, so every live frame below is a persistence hit (for tether,
        // checked on its counters after the runs; for the floor, by its verdict here).
        per_packet(
            prog(&mut l, PROG_XDP),
            std::slice::from_ref(&hit_frame),
            ifindex,
            XDP_TX,
        );
        per_packet(
            prog(&mut l, PROG_FLOOR_HIT),
            std::slice::from_ref(&hit_frame),
            ifindex,
            XDP_TX,
        );
        let hits_before = Pins::new(&l.pin_dir.0)
            .service_counters(0)
            .expect("service counters")
            .persist_hits;

        let (mut base_live, mut floor_live, mut hit_live) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..o.rounds {
            for (name, out) in [
                (PROG_SWAP_TX, &mut base_live),
                (PROG_FLOOR_HIT, &mut floor_live),
                (PROG_XDP, &mut hit_live),
            ] {
                out.push(live(prog(&mut l, name), &hit_frame, ifindex, o.live_packets));
            }
        }
        let hits = Pins::new(&l.pin_dir.0)
            .service_counters(0)
            .expect("service counters")
            .persist_hits
            - hits_before;
        assert_eq!(
            hits,
            o.rounds as u64 * o.live_packets as u64,
            "every live frame a persistence hit"
        );
        let live_ratio = median_ratio(&hit_live, &base_live);
        let floor_ratio = median_ratio(&floor_live, &base_live);
        let hit_floor = median_ratio(&hit_live, &floor_live);
        let (b, f, h) = (median(base_live), median(floor_live), median(hit_live));
        rows.push((
            "live frames: trivial MAC-swap XDP_TX (baseline)".into(),
            format!("{b:.0} ns/pkt, {:.2} Mpps", 1e3 / b),
        ));
        rows.push((
            "live frames: floor, one LRU lookup + MAC swap".into(),
            format!("{f:.0} ns/pkt, **{floor_ratio:.2}x baseline**"),
        ));
        rows.push((
            "live frames: tether, persistence hit".into(),
            format!(
                "{h:.0} ns/pkt, {:.2} Mpps, **{live_ratio:.2}x baseline**, {hit_floor:.2}x its floor",
                1e3 / h,
            ),
        ));

        // Per-packet, each round on 100k clients never seen before: the baseline, tether's new
        // clients, the floor lookup on the clients just bound, tether's hits on them, and the
        // floor insert on other fresh clients (its bindings would make tether's new clients
        // hits); those bindings are removed again, so tether's table grows as it did without
        // the floor rows. The verdicts and tether's counters check every packet's path.
        let (mut base_pp, mut new_pp, mut hit_pp) = (Vec::new(), Vec::new(), Vec::new());
        let (mut floor_hit_pp, mut floor_new_pp) = (Vec::new(), Vec::new());
        let pins = Pins::new(&l.pin_dir.0);
        let counters = || pins.service_counters(0).expect("service counters");
        for r in 0..o.rounds {
            let round_frames = |first: usize| -> Vec<Vec<u8>> {
                (0..o.clients)
                    .map(|i| frame(client(first + i), 1024 + (i % 60000) as u16))
                    .collect()
            };
            let frames = round_frames((r + 1) * 1_000_000);
            let floor_clients = (r + 1) * 1_000_000 + o.clients;
            let floor_frames = round_frames(floor_clients);
            base_pp.push(per_packet(
                prog(&mut l, PROG_SWAP_TX),
                &frames,
                ifindex,
                XDP_TX,
            ));
            let c0 = counters();
            new_pp.push(per_packet(prog(&mut l, PROG_XDP), &frames, ifindex, XDP_TX));
            let c1 = counters();
            // XDP_TX only when the client is in the table.
            floor_hit_pp.push(per_packet(
                prog(&mut l, PROG_FLOOR_HIT),
                &frames,
                ifindex,
                XDP_TX,
            ));
            hit_pp.push(per_packet(prog(&mut l, PROG_XDP), &frames, ifindex, XDP_TX));
            let c2 = counters();
            assert_eq!(
                (
                    c1.new_assignments - c0.new_assignments,
                    c1.persist_hits - c0.persist_hits
                ),
                (o.clients as u64, 0),
                "tether's new-client run: every client new"
            );
            assert_eq!(
                (
                    c2.persist_hits - c1.persist_hits,
                    c2.new_assignments - c1.new_assignments
                ),
                (o.clients as u64, 0),
                "tether's hit run: every client a hit"
            );
            // XDP_TX only after an insert on a miss.
            floor_new_pp.push(per_packet(
                prog(&mut l, PROG_FLOOR_NEW),
                &floor_frames,
                ifindex,
                XDP_TX,
            ));
            remove_bindings(&l.pin_dir.0, floor_clients, o.clients);
        }
        let ratio = |v: &[f64]| median_ratio(v, &base_pp);
        let (new_ratio, hit_ratio) = (ratio(&new_pp), ratio(&hit_pp));
        let (floor_hit_ratio, floor_new_ratio) = (ratio(&floor_hit_pp), ratio(&floor_new_pp));
        let (new_floor, hit_floor) = (
            median_ratio(&new_pp, &floor_new_pp),
            median_ratio(&hit_pp, &floor_hit_pp),
        );
        let (b, n, h) = (median(base_pp.clone()), median(new_pp), median(hit_pp));
        let (fh, fnew) = (median(floor_hit_pp), median(floor_new_pp));
        rows.push((
            format!("per packet, {} distinct clients: baseline", o.clients),
            format!("{b:.0} ns"),
        ));
        rows.push((
            "per packet: floor, one LRU lookup + MAC swap".into(),
            format!("{fh:.0} ns, **{floor_hit_ratio:.2}x baseline**"),
        ));
        rows.push((
            "per packet: floor, LRU lookup + insert + MAC swap".into(),
            format!("{fnew:.0} ns, **{floor_new_ratio:.2}x baseline**"),
        ));
        rows.push((
            "per packet: tether, new client (Maglev + LRU insert)".into(),
            format!("{n:.0} ns, **{new_ratio:.2}x baseline**, {new_floor:.2}x its floor"),
        ));
        rows.push((
            "per packet: tether, persistence hit".into(),
            format!("{h:.0} ns, **{hit_ratio:.2}x baseline**, {hit_floor:.2}x its floor"),
        ));
        drop(l);

        for &entries in &o.big_tables {
            let mut l = load(&format!("big{entries}"), entries);
            let fill = prefill(&l.pin_dir.0, entries as usize);
            let (mem, max, layout) = persist_memory(&l.pin_dir.0);
            // A size the shards split: the same clients in one table, as an earlier build
            // pinned it, measured in the same rounds.
            let mut single = (layout.shards > 1).then(|| {
                let s = load_over(&format!("one{entries}"), entries, |d| {
                    pin_single_table(d, entries)
                });
                prefill(&s.pin_dir.0, entries as usize);
                s
            });
            // Hits on clients spread over the whole table: cache-cold lookups.
            let step = (entries as usize / o.clients).max(1);
            let frames: Vec<Vec<u8>> = (0..o.clients)
                .map(|i| frame(client((i * step) % entries as usize), 2000))
                .collect();
            // The same clients in random order (as traffic comes): in ascending order the
            // elements of one table, filled in that order, are visited almost sequentially.
            let shuffled = shuffled(&frames);
            let (mut base, mut hit, mut hit1) = (Vec::new(), Vec::new(), Vec::new());
            let (mut hit_r, mut hit1_r) = (Vec::new(), Vec::new());
            let ifindex = l.ifindex;
            for _ in 0..o.rounds {
                base.push(per_packet(
                    prog(&mut l, PROG_SWAP_TX),
                    &frames,
                    ifindex,
                    XDP_TX,
                ));
                hit.push(per_packet(prog(&mut l, PROG_XDP), &frames, ifindex, XDP_TX));
                if let Some(s) = single.as_mut() {
                    hit1.push(per_packet(prog(s, PROG_XDP), &frames, ifindex, XDP_TX));
                    hit_r.push(per_packet(prog(&mut l, PROG_XDP), &shuffled, ifindex, XDP_TX));
                    hit1_r.push(per_packet(prog(s, PROG_XDP), &shuffled, ifindex, XDP_TX));
                }
            }
            let ratio = median_ratio(&hit, &base);
            let ratio1 = (!hit1.is_empty()).then(|| median_ratio(&hit1, &base));
            let random = (!hit_r.is_empty()).then(|| {
                let (rr, rr1) = (median_ratio(&hit_r, &base), median_ratio(&hit1_r, &base));
                (median(hit_r), rr, median(hit1_r), rr1)
            });
            let (b, h) = (median(base), median(hit));
            for loaded in std::iter::once(&l).chain(single.as_ref()) {
                let stats = Pins::new(&loaded.pin_dir.0)
                    .service_counters(0)
                    .expect("counters");
                assert!(
                    stats.new_assignments < (o.clients as u64),
                    "prefilled clients should hit, {} were new",
                    stats.new_assignments
                );
            }
            rows.push((
                format!(
                    "table of {}M entries: hit on {} spread clients",
                    entries >> 20,
                    o.clients
                ),
                format!(
                    "{h:.0} ns ({:.2}x baseline {b:.0} ns); prefill {:.1}s",
                    ratio,
                    fill.as_secs_f64()
                ),
            ));
            rows.push((
                format!("IPv4 table of {}M entries: kernel memory", entries >> 20),
                format!(
                    "{:.0} MiB, {:.1} bytes/entry ({} shard(s) of {}Ki entries)",
                    mem as f64 / (1 << 20) as f64,
                    mem as f64 / max as f64,
                    layout.shards,
                    layout.shard_entries >> 10,
                ),
            ));
            if let (Some(s), Some(r1), Some(random)) = (single, ratio1, random) {
                let (mem1, max1, _) = persist_memory(&s.pin_dir.0);
                rows.push((
                    format!(
                        "the same {}M clients in one table (an earlier build's pin): hit",
                        entries >> 20
                    ),
                    format!(
                        "{:.0} ns ({r1:.2}x baseline); {:.1} bytes/entry",
                        median(hit1),
                        mem1 as f64 / max1 as f64
                    ),
                ));
                rows.push((
                    format!(
                        "{}M entries, the clients in random order: hit, shards / one table",
                        entries >> 20
                    ),
                    format!(
                        "{:.0} ns ({:.2}x baseline) / {:.0} ns ({:.2}x)",
                        random.0, random.1, random.2, random.3
                    ),
                ));
            }
        }
        rows
    })
    .expect("benchmark namespace");
    drop(bed);

    let mut md = String::from("| measurement (median) | result |\n| --- | --- |\n");
    for (k, v) in &report {
        md.push_str(&format!("| {k} | {v} |\n"));
    }
    println!("\n{md}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(out.join("l4.md"), &md).expect("write l4.md");
    println!("written to target/bench/l4.md");
}
