//! Repeated-failure logging: the first failure is logged at once, then at most once a minute
//! with a count of those in between, so a full disk or an unreachable store that fails every
//! pass does not write a line per pass (1,100 lines in 12 s were seen).

use std::time::{Duration, Instant};

/// How often a repeating failure is logged.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last_logged: Option<Instant>,
    /// Failures since the last logged one.
    suppressed: u64,
}

impl Throttle {
    /// `Some(n)` if this failure is to be logged, with `n` failures left unlogged since the
    /// last one; `None` to stay quiet.
    pub(crate) fn failed(&mut self) -> Option<u64> {
        self.failed_at(Instant::now())
    }

    fn failed_at(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// The failures are over: `Some(n)` unlogged ones if any, and the next failure logs at once.
    pub(crate) fn recovered(&mut self) -> Option<u64> {
        let was_failing = self.last_logged.take().is_some();
        let suppressed = std::mem::take(&mut self.suppressed);
        was_failing.then_some(suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_failure_then_once_a_minute_with_a_count() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.failed_at(start), Some(0));
        for i in 1..=99 {
            assert_eq!(throttle.failed_at(start + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(throttle.failed_at(start + LOG_EVERY), Some(99));
        assert_eq!(throttle.failed_at(start + LOG_EVERY + Duration::from_secs(1)), None);
        assert_eq!(throttle.recovered(), Some(1));
        assert_eq!(throttle.recovered(), None, "a recovery is reported once");
        assert_eq!(
            throttle.failed_at(start + LOG_EVERY + Duration::from_secs(2)),
            Some(0),
            "after a recovery the next failure logs at once"
        );
    }
}
