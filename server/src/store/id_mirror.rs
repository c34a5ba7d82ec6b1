//! A partition writer's copy of the dedupe ids it counted itself, so that a
//! batch asks Redis only about generations that began before the writer
//! took the partition: looking ids up in a window's set of them (most of a
//! million entries) was most of what deduplication cost Redis.
//!
//! Exact for the same reasons as the bucket [`super::mirror::Mirror`]: the
//! lease holder is the only writer of its partition's keys and every commit
//! is fenced. A generation that began while this writer held the lease holds
//! exactly the ids it added; a generation that began before is read from
//! Redis. Past [`MAX_IDS`] the copy is dropped and every generation seen so
//! far is read from Redis again.

use std::collections::BTreeMap;

use foldhash::HashSet;

/// Most ids kept per partition (about 30 bytes each: 15 MB).
pub(crate) const MAX_IDS: usize = 500_000;

/// The ids of the generations this writer saw begin.
#[derive(Debug, Default)]
pub(crate) struct IdMirror {
    /// Generations up to this one began before the copy: read from Redis.
    /// `None` until the first batch says which generations exist.
    read_up_to: Option<i64>,
    sets: BTreeMap<i64, HashSet<[u8; 16]>>,
    len: usize,
}

impl IdMirror {
    /// Of the generations a batch asks about, those to read from Redis; the
    /// first call learns that every generation asked about began before.
    pub(crate) fn generations_to_read(&mut self, generations: &[i64]) -> Vec<i64> {
        let read_up_to = *self
            .read_up_to
            .get_or_insert_with(|| generations.iter().copied().max().unwrap_or(i64::MIN));
        generations
            .iter()
            .copied()
            .filter(|g| *g <= read_up_to)
            .collect()
    }

    /// The latest of `generations` known to hold `id`, among those the copy
    /// answers for.
    pub(crate) fn counted_in(&self, id: &[u8; 16], generations: &[i64]) -> Option<i64> {
        generations
            .iter()
            .rev()
            .find(|g| self.sets.get(g).is_some_and(|ids| ids.contains(id)))
            .copied()
    }

    /// Records a commit's ids and the generations it forgot.
    pub(crate) fn applied(&mut self, counted: &BTreeMap<i64, Vec<[u8; 16]>>, forgotten: &[i64]) {
        for generation in forgotten {
            if let Some(ids) = self.sets.remove(generation) {
                self.len -= ids.len();
            }
        }
        let read_up_to = self.read_up_to.unwrap_or(i64::MIN);
        for (generation, ids) in counted {
            if *generation <= read_up_to {
                continue;
            }
            let set = self.sets.entry(*generation).or_default();
            for id in ids {
                if set.insert(*id) {
                    self.len += 1;
                }
            }
        }
        if self.len > MAX_IDS {
            let latest = self.sets.keys().next_back().copied();
            self.read_up_to = self.read_up_to.max(latest);
            self.sets.clear();
            self.len = 0;
        }
    }

    /// Ids kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether no id is kept.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_that_began_before_are_read_and_later_ones_answered() {
        let mut mirror = IdMirror::default();
        assert_eq!(mirror.generations_to_read(&[4, 5]), [4, 5]);
        mirror.applied(
            &BTreeMap::from([(5, vec![[1; 16]]), (6, vec![[2; 16]])]),
            &[],
        );
        // 5 began before this writer: still read; 6 is answered here.
        assert_eq!(mirror.generations_to_read(&[5, 6]), [5]);
        assert_eq!(mirror.counted_in(&[2; 16], &[6]), Some(6));
        assert_eq!(mirror.counted_in(&[1; 16], &[6]), None);
        mirror.applied(&BTreeMap::from([(7, vec![[3; 16]])]), &[5]);
        assert_eq!(mirror.generations_to_read(&[6, 7]), Vec::<i64>::new());
        assert_eq!(mirror.len(), 2);
    }

    #[test]
    fn a_fresh_partition_reads_nothing() {
        let mut mirror = IdMirror::default();
        assert!(mirror.generations_to_read(&[]).is_empty());
        mirror.applied(&BTreeMap::from([(0, vec![[1; 16]])]), &[]);
        assert!(mirror.generations_to_read(&[-1, 0]).is_empty());
        assert_eq!(mirror.counted_in(&[1; 16], &[-1, 0]), Some(0));
    }

    #[test]
    fn past_its_bound_it_reads_everything_again() {
        let mut mirror = IdMirror::default();
        mirror.generations_to_read(&[]);
        let ids: Vec<[u8; 16]> = (0..=MAX_IDS)
            .map(|i| u128::try_from(i).unwrap_or(0).to_le_bytes())
            .collect();
        mirror.applied(&BTreeMap::from([(0, ids)]), &[]);
        assert!(mirror.is_empty());
        assert_eq!(mirror.generations_to_read(&[-1, 0]), [-1, 0]);
        mirror.applied(&BTreeMap::from([(1, vec![[9; 16]])]), &[]);
        assert_eq!(mirror.generations_to_read(&[0, 1]), [0]);
    }
}
