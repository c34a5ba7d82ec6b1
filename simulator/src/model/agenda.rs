//! The generator's agenda: sessions by the time of their next event,
//! earliest first, ties by session slot.
//!
//! A binary heap of the tens of thousands of sessions under way cost a tenth
//! of the generator's time: a dozen levels, most of them cache misses, per
//! pop. Nearly every entry is due within minutes, so this is a calendar
//! queue of one-second buckets instead: an entry is appended to its bucket,
//! and a bucket is sorted once, when the clock reaches it. Entries due beyond
//! the calendar's span wait in a heap until it does. Entries come out in
//! exactly the order a heap would give.

use std::{cmp::Reverse, collections::BinaryHeap};

/// (time in microseconds, session slot).
type Entry = (i64, usize);

/// Width of a bucket, in microseconds.
const WIDTH: i64 = 1_000_000;
/// Buckets in the calendar: about 17 minutes, more than any gap between a
/// session's events.
const BUCKETS: usize = 1024;
const SPAN: i64 = WIDTH * BUCKETS as i64;

pub(super) struct Agenda {
    /// Start of the bucket being drained, a multiple of `WIDTH`.
    current_start: i64,
    /// Every entry due before `current_start + WIDTH`, sorted latest first
    /// (the next one is popped from the end).
    current: Vec<Entry>,
    /// Entries due in `[current_start + WIDTH, current_start + SPAN)`, in
    /// bucket `time / WIDTH % BUCKETS`, unsorted.
    buckets: Vec<Vec<Entry>>,
    in_buckets: usize,
    /// Entries due later than the calendar reached when they were pushed.
    far: BinaryHeap<Reverse<Entry>>,
}

impl Agenda {
    /// An empty agenda whose first entries are due around `start`.
    pub(super) fn starting_at(start: i64) -> Self {
        Self {
            current_start: start.div_euclid(WIDTH) * WIDTH,
            current: Vec::new(),
            buckets: vec![Vec::new(); BUCKETS],
            in_buckets: 0,
            far: BinaryHeap::new(),
        }
    }

    pub(super) fn push(&mut self, time: i64, slot: usize) {
        let entry = (time, slot);
        if time < self.current_start + WIDTH {
            let at = self.current.partition_point(|&queued| queued > entry);
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
        self.current.last().map(|&(time, _)| time)
    }

    /// Takes the earliest entry.
    pub(super) fn pop(&mut self) -> Option<Entry> {
        self.settle();
        self.current.pop()
    }

    /// Moves the calendar to the next bucket with an entry, if the current
    /// one is empty.
    fn settle(&mut self) {
        while self.current.is_empty() && (self.in_buckets > 0 || !self.far.is_empty()) {
            self.current_start = if self.in_buckets == 0 {
                // Only far entries: jump straight to the first.
                let Some(Reverse((time, _))) = self.far.peek() else {
                    return;
                };
                time.div_euclid(WIDTH) * WIDTH
            } else {
                self.current_start + WIDTH
            };
            let end = self.current_start + WIDTH;
            std::mem::swap(
                &mut self.current,
                &mut self.buckets[bucket(self.current_start)],
            );
            self.in_buckets -= self.current.len();
            while let Some(&Reverse(entry)) = self.far.peek()
                && entry.0 < end
            {
                self.current.push(entry);
                self.far.pop();
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
    /// every pop against a binary heap.
    #[test]
    fn entries_come_out_in_the_order_of_a_heap() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let start = 1_700_000_000 * WIDTH + 123;
        let mut agenda = Agenda::starting_at(start);
        let mut heap = BinaryHeap::new();
        let mut clock = start;
        let mut popped = 0;
        for step in 0..200_000 {
            if rng.random_bool(0.52) || heap.is_empty() {
                let ahead = match rng.random_range(0..100) {
                    0 => rng.random_range(SPAN..10 * SPAN),
                    1 => 0,
                    2..=4 => -rng.random_range(0..3 * WIDTH),
                    _ => rng.random_range(0..120 * WIDTH),
                };
                let slot = rng.random_range(0..50);
                agenda.push(clock + ahead, slot);
                heap.push(Reverse((clock + ahead, slot)));
            } else {
                let expected = heap.pop().map(|Reverse(entry)| entry);
                assert_eq!(agenda.peek(), expected.map(|(time, _)| time), "step {step}");
                assert_eq!(agenda.pop(), expected, "step {step}");
                clock = clock.max(expected.map_or(clock, |(time, _)| time));
                popped += 1;
            }
        }
        while let Some(Reverse(expected)) = heap.pop() {
            assert_eq!(agenda.pop(), Some(expected));
        }
        assert_eq!(agenda.pop(), None);
        assert!(popped > 90_000, "the test popped too little: {popped}");
    }
}
