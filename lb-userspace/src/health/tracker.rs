//! Rise/fall hysteresis, so one lost probe does not flap a backend.

/// Counts consecutive results that disagree with the current state; `rise` of them bring a
/// down backend up, `fall` of them take an up backend down. Any agreeing result resets the
/// count.
#[derive(Debug, Clone)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive results contradicting `up` since the last agreeing one or transition.
    streak: u32,
}

impl Tracker {
    /// A `rise` or `fall` of 0 counts as 1 (config validation already rejects 0).
    pub fn new(rise: u32, fall: u32, up: bool) -> Tracker {
        Tracker {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            streak: 0,
        }
    }

    /// Record one result; `Some(new_state)` exactly when the state changes.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }

    pub fn is_up(&self) -> bool {
        self.up
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::Tracker;

    #[test]
    fn down_needs_fall_consecutive_failures() {
        let mut t = Tracker::new(2, 3, true);
        assert_eq!(t.record(false), None, "1st failure must not take it down");
        assert_eq!(t.record(false), None, "2nd failure must not take it down");
        assert_eq!(t.record(false), Some(false), "3rd failure takes it down");
        assert!(!t.is_up(), "state must be down");
        assert_eq!(t.record(false), None, "already down: no new transition");
    }

    #[test]
    fn success_resets_failure_streak() {
        let mut t = Tracker::new(2, 2, true);
        assert_eq!(t.record(false), None, "first failure");
        assert_eq!(t.record(true), None, "success while up");
        assert_eq!(
            t.record(false),
            None,
            "streak restarted: one failure is not enough"
        );
        assert_eq!(t.record(false), Some(false), "two consecutive failures");
    }

    #[test]
    fn up_needs_rise_consecutive_successes() {
        let mut t = Tracker::new(3, 1, false);
        assert_eq!(t.record(true), None, "1st success");
        assert_eq!(t.record(true), None, "2nd success");
        assert_eq!(
            t.record(false),
            None,
            "failure while down resets the rise streak"
        );
        assert_eq!(t.record(true), None, "1st success again");
        assert_eq!(t.record(true), None, "2nd success again");
        assert_eq!(
            t.record(true),
            Some(true),
            "3rd consecutive success brings it up"
        );
        assert!(t.is_up(), "state must be up");
        assert_eq!(
            t.record(false),
            Some(false),
            "fall 1: one failure takes it down"
        );
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut t = Tracker::new(0, 0, true);
        assert_eq!(t.record(false), Some(false), "fall 0 behaves as fall 1");
        assert_eq!(t.record(true), Some(true), "rise 0 behaves as rise 1");
    }

    proptest! {
        /// Reference model computed from the history rather than a counter: the state flips
        /// at step j exactly when the results since the last flip end in a run of exactly
        /// `rise` (when down) or `fall` (when up) values contradicting the state.
        #[test]
        fn flips_only_after_exact_consecutive_runs(
            rise in 1u32..6,
            fall in 1u32..6,
            initial in any::<bool>(),
            results in proptest::collection::vec(any::<bool>(), 0..200),
        ) {
            let mut t = Tracker::new(rise, fall, initial);
            let mut state = initial;
            let mut since_flip = 0usize;
            for (j, &ok) in results.iter().enumerate() {
                let window = &results[since_flip..=j];
                let run = window.iter().rev().take_while(|&&r| r == ok).count();
                let needed = if state { fall } else { rise } as usize;
                let expect = (ok != state && run == needed).then_some(ok);
                let got = t.record(ok);
                prop_assert_eq!(got, expect, "step {} (ok={}, state={}, run={})", j, ok, state, run);
                if let Some(s) = got {
                    state = s;
                    since_flip = j + 1;
                }
                prop_assert_eq!(t.is_up(), state, "is_up disagrees with the model at step {}", j);
            }
        }
    }
}
