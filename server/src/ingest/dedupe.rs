//! Which records repeat an event already counted.
//!
//! Time here is the partition's *dedupe clock*: the running maximum of the
//! Kafka record timestamps read so far, in offset order. It is cut into
//! *generations* one `--dedupe-window` long (clock ÷ window, rounded down).
//! A record is a duplicate when the same `event_id` was counted from a record
//! of its own generation or of the one before. So a repeat at most a window
//! after the counted record is always a duplicate, and one up to two windows
//! after it may be.
//!
//! The clock is a property of the log, not of the client's event time or of
//! when ingest ran, so
//! - a retry that re-stamps `occurred_at` (even into another minute, hour or
//!   day) is still a duplicate: its record's timestamp is when it was
//!   produced;
//! - a replay or a rebuild of the same records decides exactly as live ingest
//!   did, however the records are cut into commits;
//! - a record whose timestamp goes backwards does not reopen the window (the
//!   clock never goes back).
//!
//! The store keeps one set of ids per generation
//! ([`crate::store::keys::PartitionKeys::dedupe`]): only the current
//! generation's and the one before are ever read, so a commit that moves the
//! clock into a new generation deletes the sets that fell out. A set costs
//! Redis less than a sorted set by time would (a `SADD` against a `ZADD`
//! into a skip list), which is why the window is kept in generations.

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt};

pub(crate) use crate::store::commit::DedupeWrite;

/// A 16-byte `event_id`.
pub(crate) type EventId = [u8; 16];

/// The dedupe decisions of one batch, made in offset order.
#[derive(Debug)]
pub struct Dedupe {
    window_ms: i64,
    /// The clock before the batch.
    clock_before_ms: Option<i64>,
    clock_ms: Option<i64>,
    /// Ids counted by this batch, with the generation of their counting.
    counted: HashMap<EventId, i64>,
}

impl Dedupe {
    /// Decisions for a batch that follows a partition whose dedupe clock is
    /// `clock_ms` (`None` before its first record).
    pub fn new(window_ms: i64, clock_ms: Option<i64>) -> Self {
        Self {
            window_ms: window_ms.max(1),
            clock_before_ms: clock_ms,
            clock_ms,
            counted: HashMap::new(),
        }
    }

    /// The generation of a time on the clock.
    pub(crate) fn generation(&self, at_ms: i64) -> i64 {
        at_ms.div_euclid(self.window_ms)
    }

    /// The generations whose stored sets can hold an id counted before this
    /// batch: the clock's and the one before. None before the first record.
    pub(crate) fn stored_generations(&self) -> Vec<i64> {
        self.clock_before_ms
            .map(|clock| {
                let current = self.generation(clock);
                vec![current - 1, current]
            })
            .unwrap_or_default()
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

    /// Whether the event `id`, stamped `at`, repeats one counted in its
    /// generation or the one before; `stored` is the latest stored
    /// generation that holds it (before this batch). An event that is not a
    /// duplicate counts as counted in its generation.
    pub fn is_duplicate(&mut self, id: EventId, at: i64, stored: Option<i64>) -> bool {
        let generation = self.generation(at);
        let last = self.counted.get(&id).copied().or(stored);
        if last.is_some_and(|last| last >= generation - 1) {
            return true;
        }
        self.counted.insert(id, generation);
        false
    }

    /// The batch's writes: the ids counted in the generations still read
    /// after it, and the generations that fell out.
    pub(crate) fn into_changes(self) -> DedupeWrite {
        let Some(clock) = self.clock_ms else {
            return DedupeWrite::default();
        };
        let oldest_read = self.generation(clock) - 1;
        let forgotten = self
            .clock_before_ms
            .map(|before| {
                let before = self.generation(before);
                (before - 1..=before).filter(|g| *g < oldest_read).collect()
            })
            .unwrap_or_default();
        let mut counted: BTreeMap<i64, Vec<EventId>> = BTreeMap::new();
        for (id, generation) in self.counted {
            if generation >= oldest_read {
                counted.entry(generation).or_default().push(id);
            }
        }
        for ids in counted.values_mut() {
            // A stable order, so a commit's commands do not depend on hashing.
            ids.sort_unstable();
        }
        DedupeWrite {
            counted,
            forgotten,
            clock_ms: Some(clock),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: i64 = 15 * 60_000;

    #[test]
    fn a_retry_within_the_window_is_a_duplicate_whatever_its_event_time() {
        // The event time is not even an input: only the record's timestamp.
        let mut batch = Dedupe::new(WINDOW, Some(WINDOW - 1));
        let counted_in = Some(batch.generation(WINDOW - 1));
        let at = batch.stamp(WINDOW - 1 + 60_000);
        assert!(batch.is_duplicate([1; 16], at, counted_in));
        let at = batch.stamp(2 * WINDOW - 1);
        assert!(batch.is_duplicate([1; 16], at, counted_in));
    }

    #[test]
    fn a_retry_two_generations_on_counts_again() {
        let mut batch = Dedupe::new(WINDOW, Some(0));
        let at = batch.stamp(2 * WINDOW);
        assert!(!batch.is_duplicate([1; 16], at, Some(0)));
        let again = batch.stamp(2 * WINDOW + 1);
        assert!(batch.is_duplicate([1; 16], again, Some(0)));
        let changes = batch.into_changes();
        assert_eq!(changes.counted, BTreeMap::from([(2, vec![[1; 16]])]));
        // Generations -1 and 0 were read before; neither is read after.
        assert_eq!(changes.forgotten, [-1, 0]);
    }

    #[test]
    fn repeats_inside_one_batch_are_duplicates() {
        let mut batch = Dedupe::new(WINDOW, None);
        assert!(batch.stored_generations().is_empty());
        let at = batch.stamp(5);
        assert!(!batch.is_duplicate([2; 16], at, None));
        let at = batch.stamp(6);
        assert!(batch.is_duplicate([2; 16], at, None));
        assert!(!batch.is_duplicate([3; 16], at, None));
    }

    #[test]
    fn the_clock_never_goes_back() {
        let mut batch = Dedupe::new(WINDOW, Some(10 * WINDOW));
        assert_eq!(batch.stored_generations(), [9, 10]);
        // A record stamped long ago is placed at the clock, not in the past,
        // so it neither reopens nor escapes the window.
        assert_eq!(batch.stamp(0), 10 * WINDOW);
        assert_eq!(batch.into_changes().forgotten, Vec::<i64>::new());
    }

    #[test]
    fn decisions_do_not_depend_on_where_commits_cut_the_log() {
        // (record timestamp, id) in offset order, with repeats near and far.
        let log: Vec<(i64, u8)> = (0..400)
            .map(|i: i64| {
                let id = u8::try_from(i % 37).unwrap_or(0);
                (i * 7_919 % 3_000_000 + i * 5_000, id)
            })
            .collect();
        let decide = |cut: usize| {
            // The store: generation → ids.
            let mut sets: BTreeMap<i64, Vec<EventId>> = BTreeMap::new();
            let mut clock = None;
            let mut duplicates = Vec::new();
            for chunk in log.chunks(cut) {
                let mut batch = Dedupe::new(WINDOW, clock);
                let readable = batch.stored_generations();
                for (timestamp, id) in chunk {
                    let at = batch.stamp(*timestamp);
                    let id = [*id; 16];
                    let stored = readable
                        .iter()
                        .rev()
                        .find(|g| sets.get(g).is_some_and(|ids| ids.contains(&id)))
                        .copied();
                    duplicates.push(batch.is_duplicate(id, at, stored));
                }
                let changes = batch.into_changes();
                clock = changes.clock_ms;
                for (generation, ids) in changes.counted {
                    sets.entry(generation).or_default().extend(ids);
                }
                for generation in changes.forgotten {
                    sets.remove(&generation);
                }
                assert!(sets.len() <= 2, "{:?}", sets.keys());
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
