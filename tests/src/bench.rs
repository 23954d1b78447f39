//! What the benches (`cargo xtask bench NAME -- FLAGS`) share: their flags and the median.

use std::str::FromStr;

/// The bench binary's flags, after the `--bench` that `cargo bench` adds, read one at a time;
/// a value is parsed where its flag is matched. Bad input panics with the bench's usage.
pub struct Args {
    args: std::vec::IntoIter<String>,
    usage: &'static str,
}

impl Args {
    /// The process's arguments; `usage` is shown with every error.
    pub fn from_env(usage: &'static str) -> Args {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        Args {
            args: args.into_iter(),
            usage,
        }
    }

    /// The next flag, `None` at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        self.args.next()
    }

    /// The value that follows `flag`.
    pub fn value<T: FromStr>(&mut self, flag: &str) -> T {
        let v = self
            .args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value ({})", self.usage));
        v.parse()
            .unwrap_or_else(|_| panic!("{flag}: {v:?} is not valid ({})", self.usage))
    }

    /// Panics: `flag` is not one of the bench's.
    pub fn unknown(&self, flag: &str) -> ! {
        panic!("unknown argument {flag} ({})", self.usage)
    }
}

/// The median of the finite values, `None` when there are none.
pub fn median(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_middle_finite_value() {
        assert_eq!(median([3.0, f64::NAN, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([f64::INFINITY]), None);
    }
}
