//! Exponential backoff for reconnect loops, with jitter.

use std::time::Duration;

/// The longest wait between two attempts to reach a dependency: a loop
/// resumes within about 2 s of the dependency's recovery (the wait, drawn
/// from 0.8 to 1.6 s, plus the attempt), and a dependency that is down sees
/// an attempt a second or so from each task.
pub(crate) const RECONNECT_MAX: Duration = Duration::from_millis(1600);

/// Doubling delays from `initial` up to `max`: every retry loop waits
/// between attempts, so a dependency that is down never makes the server
/// spin. Each delay is drawn between half and all of its step, so that many
/// partitions and processes that failed together do not retry in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, never exceeds `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            next: initial,
            max,
        }
    }

    /// Starts over from the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The delay to wait before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        jittered(step)
    }
}

/// A delay drawn uniformly between half of `step` and `step`.
pub(crate) fn jittered(step: Duration) -> Duration {
    let half = step / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_each_drawn_in_its_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        for step in [100, 200, 400, 500, 500] {
            let delay = backoff.next_delay().as_millis();
            assert!(
                (step / 2..=step).contains(&delay),
                "{delay} for a step of {step}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_retries() {
        let delays: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| jittered(Duration::from_secs(1))).collect();
        assert!(delays.len() > 40, "{delays:?}");
    }
}
