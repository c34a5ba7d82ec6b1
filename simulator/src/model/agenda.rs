//! The generator's agenda: sessions by the time of their next event,
//! earliest first, ties in the order they were pushed.
//!
//! A binary heap of the tens of thousands of sessions under way costs a
//! dozen levels, most of them cache misses, per pop. Nearly every entry is
//! due within minutes, so this is a calendar queue of one-second buckets
//! instead: an entry is appended to its bucket, and a bucket is sorted once,
//! when the clock reaches it. Entries due beyond the calendar's span wait in
//! a heap until it does. Entries come out in exactly the order a heap would
//! give.
//!
//! An entry holds its session itself, not the session's place in a table:
//! the buckets are read and written in order, where a table of sessions was
//! read at a random place for every event (a cache miss each time).

use std::{cmp::Reverse, collections::BinaryHeap};

/// Width of a bucket, in microseconds.
const WIDTH: i64 = 1_000_000;
/// Buckets in the calendar: about 17 minutes, more than any gap between a
/// session's events.
const BUCKETS: usize = 1024;
const SPAN: i64 = WIDTH * BUCKETS as i64;

/// An item due at `time`; `sequence` orders items due at the same time.
#[derive(Debug)]
struct Entry<T> {
    time: i64,
    sequence: u64,
    item: T,
}

impl<T> Entry<T> {
    fn key(&self) -> (i64, u64) {
        (self.time, self.sequence)
    }
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

pub(super) struct Agenda<T> {
    /// Start of the bucket being drained, a multiple of `WIDTH`.
    current_start: i64,
    /// Every entry due before `current_start + WIDTH`, sorted latest first
    /// (the next one is popped from the end).
    current: Vec<Entry<T>>,
    /// Entries due in `[current_start + WIDTH, current_start + SPAN)`, in
    /// bucket `time / WIDTH % BUCKETS`, unsorted.
    buckets: Vec<Vec<Entry<T>>>,
    in_buckets: usize,
    /// Entries due later than the calendar reached when they were pushed.
    far: BinaryHeap<Reverse<Entry<T>>>,
    /// Entries pushed so far: the next entry's sequence.
    pushed: u64,
}

impl<T> Agenda<T> {
    /// An empty agenda whose first entries are due around `start`.
    pub(super) fn starting_at(start: i64) -> Self {
        Self {
            current_start: start.div_euclid(WIDTH) * WIDTH,
            current: Vec::new(),
            buckets: std::iter::repeat_with(Vec::new).take(BUCKETS).collect(),
            in_buckets: 0,
            far: BinaryHeap::new(),
            pushed: 0,
        }
    }

    pub(super) fn push(&mut self, time: i64, item: T) {
        let entry = Entry {
            time,
            sequence: self.pushed,
            item,
        };
        self.pushed += 1;
        if time < self.current_start + WIDTH {
            let at = self.current.partition_point(|queued| *queued > entry);
            self.current.insert(at, entry);
        } else if time < self.current_start + SPAN {
            self.buckets[bucket(time)].push(entry);
            self.in_buckets += 1;
        } else {
            self.far.push(Reverse(entry));
        }
    }

    /// The time of the earliest entry.
    pub(super) fn peek(&mut self) -> Option<i64> {
        self.settle();
        self.current.last().map(|entry| entry.time)
    }

    /// Takes the earliest entry: its time and item.
    pub(super) fn pop(&mut self) -> Option<(i64, T)> {
        self.settle();
        self.current.pop().map(|entry| (entry.time, entry.item))
    }

    /// Moves the calendar to the next bucket with an entry, if the current
    /// one is empty.
    fn settle(&mut self) {
        while self.current.is_empty() && (self.in_buckets > 0 || !self.far.is_empty()) {
            self.current_start = if self.in_buckets == 0 {
                // Only far entries: jump straight to the first.
                let Some(Reverse(first)) = self.far.peek() else {
                    return;
                };
                first.time.div_euclid(WIDTH) * WIDTH
            } else {
                self.current_start + WIDTH
            };
            let end = self.current_start + WIDTH;
            std::mem::swap(
                &mut self.current,
                &mut self.buckets[bucket(self.current_start)],
            );
            self.in_buckets -= self.current.len();
            while self
                .far
                .peek()
                .is_some_and(|Reverse(entry)| entry.time < end)
                && let Some(Reverse(entry)) = self.far.pop()
            {
                self.current.push(entry);
            }
            self.current.sort_unstable_by(|a, b| b.cmp(a));
        }
    }
}

fn bucket(time: i64) -> usize {
    // `rem_euclid` of a positive modulus is in 0..BUCKETS.
    usize::try_from(time.div_euclid(WIDTH).rem_euclid(BUCKETS as i64)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Pushes and pops as the generator does (mostly soon after the clock,
    /// some far ahead, some ties, some before the current bucket) and checks
    /// every pop, time and item, against a binary heap.
    #[test]
    fn entries_come_out_in_the_order_of_a_heap() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let start = 1_700_000_000 * WIDTH + 123;
        let mut agenda = Agenda::starting_at(start);
        let mut heap = BinaryHeap::new();
        let mut clock = start;
        let mut popped = 0;
        let mut pushed: u64 = 0;
        for step in 0..200_000 {
            if rng.random_bool(0.52) || heap.is_empty() {
                let ahead = match rng.random_range(0..100) {
                    0 => rng.random_range(SPAN..10 * SPAN),
                    1 => 0,
                    2..=4 => -rng.random_range(0..3 * WIDTH),
                    _ => rng.random_range(0..120 * WIDTH),
                };
                // Ties come out in the order pushed: a heap of (time,
                // push number) gives the order expected.
                let item = format!("item {pushed}");
                agenda.push(clock + ahead, item.clone());
                heap.push(Reverse((clock + ahead, pushed, item)));
                pushed += 1;
            } else {
                let expected = heap.pop().map(|Reverse((time, _, item))| (time, item));
                assert_eq!(
                    agenda.peek(),
                    expected.as_ref().map(|(time, _)| *time),
                    "step {step}"
                );
                assert_eq!(agenda.pop(), expected, "step {step}");
                clock = clock.max(expected.map_or(clock, |(time, _)| time));
                popped += 1;
            }
        }
        while let Some(Reverse((time, _, item))) = heap.pop() {
            assert_eq!(agenda.pop(), Some((time, item)));
        }
        assert_eq!(agenda.pop(), None);
        assert!(popped > 90_000, "the test popped too little: {popped}");
    }
}
