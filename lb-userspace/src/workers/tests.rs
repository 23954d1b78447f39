use std::{sync::mpsc, time::Duration};

use super::{Workers, allowed_cpus, pin_plan};

/// The CPUs each worker's thread may run on, read on that thread.
fn affinities(workers: &Workers) -> Vec<Vec<usize>> {
    workers
        .handles()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (tx, rx) = mpsc::channel();
            h.spawn(async move {
                let _ = tx.send(allowed_cpus());
            });
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("worker {i} did not answer: {e}"))
                .unwrap_or_else(|e| panic!("worker {i}: sched_getaffinity: {e}"))
        })
        .collect()
}

#[test]
fn pin_plan_gives_each_worker_its_own_cpu_or_none() {
    // (workers, allowed CPUs, the plan)
    type Case = (usize, &'static [usize], Vec<Option<usize>>);
    let cases: [Case; 5] = [
        (2, &[0, 1], vec![Some(0), Some(1)]),
        // A restricted set (a container's cpuset): the CPUs it names, in order.
        (2, &[3, 5, 6], vec![Some(3), Some(5)]),
        // One worker shares its CPU with no other worker: left to the scheduler.
        (1, &[4], vec![None]),
        // More workers than CPUs: the scheduler places them.
        (3, &[0, 1], vec![None, None, None]),
        (1, &[], vec![None]),
    ];
    for (n, allowed, want) in cases {
        assert_eq!(
            pin_plan(n, allowed),
            want,
            "{n} workers on CPUs {allowed:?}"
        );
    }
}

#[test]
fn pinned_workers_each_run_on_their_own_cpu() {
    let allowed = allowed_cpus().expect("sched_getaffinity");
    assert!(!allowed.is_empty(), "this thread may run on no CPU?");
    // One worker per CPU; on a single CPU that is one worker, which stays unpinned.
    let workers = Workers::start_pinned(allowed.len()).expect("workers");
    let got = affinities(&workers);
    let want: Vec<Vec<usize>> = if allowed.len() >= 2 {
        allowed.iter().map(|&c| vec![c]).collect()
    } else {
        vec![allowed.clone()]
    };
    assert_eq!(
        got, want,
        "worker i should run on the i-th allowed CPU only"
    );
}

#[test]
fn workers_beyond_the_cpus_a_single_worker_and_plain_start_stay_unpinned() {
    let allowed = allowed_cpus().expect("sched_getaffinity");
    let one = Workers::start_pinned(1).expect("workers");
    assert_eq!(
        affinities(&one),
        vec![allowed.clone()],
        "a single worker is pinned"
    );
    let more = Workers::start_pinned(allowed.len() + 1).expect("workers");
    for (i, a) in affinities(&more).iter().enumerate() {
        assert_eq!(
            a, &allowed,
            "worker {i} of more workers than CPUs is pinned"
        );
    }
    let plain = Workers::start(2).expect("workers");
    for (i, a) in affinities(&plain).iter().enumerate() {
        assert_eq!(a, &allowed, "worker {i} of Workers::start is pinned");
    }
}
