//! Which records repeat an event already counted.
//!
//! A record is a duplicate when an earlier record of the same partition with
//! the same `event_id` was counted at most `--dedupe-window` before it, both
//! measured on the partition's *dedupe clock*: the running maximum of the
//! Kafka record timestamps read so far, in offset order. The clock is a
//! property of the log, not of the client's event time or of when ingest ran,
//! so
//! - a retry that re-stamps `occurred_at` (even into another minute, hour or
//!   day) is still a duplicate: its record's timestamp is when it was
//!   produced;
//! - a replay or a rebuild of the same records decides exactly as live ingest
//!   did, however the records are cut into commits;
//! - a record whose timestamp goes backwards does not reopen the window (the
//!   clock never goes back).
//!
//! The store keeps, per partition, each counted id with the clock of its
//! counting ([`crate::store::keys::PartitionKeys::dedupe`]); ids counted
//! before `clock - window` can never match again and are dropped by every
//! commit.

use foldhash::{HashMap, HashMapExt};

/// A 16-byte `event_id`.
pub type EventId = [u8; 16];

/// The dedupe decisions of one batch, made in offset order.
#[derive(Debug)]
pub struct Dedupe {
    window_ms: i64,
    clock_ms: Option<i64>,
    /// Ids counted by this batch, with the clock at their counting.
    counted: HashMap<EventId, i64>,
}

impl Dedupe {
    /// Decisions for a batch that follows a partition whose dedupe clock is
    /// `clock_ms` (`None` before its first record).
    pub fn new(window_ms: i64, clock_ms: Option<i64>) -> Self {
        Self {
            window_ms,
            clock_ms,
            counted: HashMap::new(),
        }
    }

    /// Advances the clock over a record whose Kafka timestamp is
    /// `record_ms`; returns the record's time on the clock.
    pub fn stamp(&mut self, record_ms: i64) -> i64 {
        let clock = self
            .clock_ms
            .map_or(record_ms, |clock| clock.max(record_ms));
        self.clock_ms = Some(clock);
        clock
    }

    /// Whether the event `id`, stamped `at`, repeats one counted within the
    /// window; `stored` is when the store last counted it (before this
    /// batch). An event that is not a duplicate counts as counted at `at`.
    pub fn is_duplicate(&mut self, id: EventId, at: i64, stored: Option<i64>) -> bool {
        let last = self.counted.get(&id).copied().or(stored);
        if last.is_some_and(|last| at.saturating_sub(last) <= self.window_ms) {
            return true;
        }
        self.counted.insert(id, at);
        false
    }

    /// The partition's dedupe clock after the batch.
    pub fn clock_ms(&self) -> Option<i64> {
        self.clock_ms
    }

    /// Ids counted before this time can never be duplicated again.
    pub fn horizon_ms(&self) -> Option<i64> {
        self.clock_ms
            .map(|clock| clock.saturating_sub(self.window_ms))
    }

    /// The ids this batch counted, with the clock at their counting.
    pub fn into_counted(self) -> Vec<(EventId, i64)> {
        let mut counted: Vec<(EventId, i64)> = self.counted.into_iter().collect();
        // A stable order, so a commit's commands do not depend on hashing.
        counted.sort_unstable();
        counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: i64 = 15 * 60_000;

    #[test]
    fn a_retry_within_the_window_is_a_duplicate_whatever_its_event_time() {
        // The event time is not even an input: only the record's timestamp.
        let mut batch = Dedupe::new(WINDOW, Some(1_000));
        let at = batch.stamp(1_000 + 60_000);
        assert!(batch.is_duplicate([1; 16], at, Some(1_000)));
        let at = batch.stamp(1_000 + WINDOW);
        assert!(batch.is_duplicate([1; 16], at, Some(1_000)));
    }

    #[test]
    fn a_retry_after_the_window_counts_again_and_restarts_the_window() {
        let mut batch = Dedupe::new(WINDOW, Some(0));
        let at = batch.stamp(WINDOW + 1);
        assert!(!batch.is_duplicate([1; 16], at, Some(0)));
        let again = batch.stamp(WINDOW + 2);
        assert!(batch.is_duplicate([1; 16], again, Some(0)));
        assert_eq!(batch.into_counted(), vec![([1; 16], WINDOW + 1)]);
    }

    #[test]
    fn repeats_inside_one_batch_are_duplicates() {
        let mut batch = Dedupe::new(WINDOW, None);
        let at = batch.stamp(5);
        assert!(!batch.is_duplicate([2; 16], at, None));
        let at = batch.stamp(6);
        assert!(batch.is_duplicate([2; 16], at, None));
        assert!(!batch.is_duplicate([3; 16], at, None));
    }

    #[test]
    fn the_clock_never_goes_back() {
        let mut batch = Dedupe::new(WINDOW, Some(10 * WINDOW));
        // A record stamped long ago is placed at the clock, not in the past,
        // so it neither reopens nor escapes the window.
        assert_eq!(batch.stamp(0), 10 * WINDOW);
        assert_eq!(batch.clock_ms(), Some(10 * WINDOW));
        assert_eq!(batch.horizon_ms(), Some(9 * WINDOW));
    }

    #[test]
    fn decisions_do_not_depend_on_where_commits_cut_the_log() {
        // (record timestamp, id) in offset order, with repeats near and far.
        let log: Vec<(i64, u8)> = (0..400)
            .map(|i: i64| {
                (
                    i * 7_919 % 3_000_000 + i * 5_000,
                    u8::try_from(i % 37).unwrap_or(0),
                )
            })
            .collect();
        let decide = |cut: usize| {
            let mut stored: HashMap<EventId, i64> = HashMap::new();
            let mut clock = None;
            let mut duplicates = Vec::new();
            for chunk in log.chunks(cut) {
                let mut batch = Dedupe::new(WINDOW, clock);
                for (timestamp, id) in chunk {
                    let at = batch.stamp(*timestamp);
                    let id = [*id; 16];
                    duplicates.push(batch.is_duplicate(id, at, stored.get(&id).copied()));
                }
                let horizon = batch.horizon_ms().unwrap_or(i64::MIN);
                clock = batch.clock_ms();
                stored.extend(batch.into_counted());
                stored.retain(|_, at| *at >= horizon);
            }
            duplicates
        };
        let whole = decide(log.len());
        assert!(whole.iter().any(|d| *d) && whole.iter().any(|d| !*d));
        for cut in [1, 2, 7, 50] {
            assert_eq!(decide(cut), whole, "cut every {cut}");
        }
    }
}
