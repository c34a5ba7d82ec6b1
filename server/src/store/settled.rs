//! Settled rankings: per partition, the union of a ranking's buckets that no
//! longer change, kept in the server between queries.
//!
//! A product ranking over a day is a `ZUNION` of a dozen sorted sets per
//! partition, about a millisecond of Redis time each. Most of a trailing
//! window lies in buckets that ended hours ago, which ingest writes only for
//! late events and rebuilds. So each partition has a *settled version*
//! ([`PartitionKeys::settled_version`](super::keys::PartitionKeys::settled_version)):
//! every commit changes it when its batch writes a minute before the
//! [`horizon`] by Redis's clock, and the ranking script reads it atomically
//! with the union. A cached union of buckets that all end before the horizon
//! stays exact for as long as the partition's version is the one it was read
//! at: a query then asks Redis only for the unsettled buckets.
//!
//! The commit and the cache fill both take the horizon from Redis's clock,
//! so the server's clock only picks which buckets to try (an hour of skew is
//! allowed for). Redis's clock must not step back across an hour boundary
//! while a union is cached (at most ten minutes). Cached unions are bounded
//! in count and in total size, and dropped before any of their buckets
//! expires.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{Bucket, Granularity, Ranking, Retention};

/// How long after the end of its hour a minute becomes settled.
pub(crate) const SETTLEMENT_LAG: i64 = 3600;

/// How far apart the server's and Redis's clocks may be: the server only
/// treats as settled buckets that end this much before its own horizon, and
/// the ranking script refuses to cache when even that is past Redis's.
const CLOCK_ALLOWANCE: i64 = 3600;

/// Longest time a cached union is used before it is read again.
const MAX_AGE: i64 = 600;

/// A cached union is dropped this long before any of its buckets expires.
const EXPIRY_MARGIN: i64 = 300;

/// Cached unions kept; when full, the oldest is dropped.
const MAX_ENTRIES: usize = 256;

/// Product/score pairs kept over all cached unions (16 bytes each: 32 MiB);
/// past it the oldest unions are dropped, and a larger union is not kept.
const MAX_PAIRS: usize = 1 << 21;

/// The settlement horizon at `now` (Unix seconds): every minute before it is
/// settled. Written in the commit and ranking scripts too, against Redis's
/// clock.
pub(crate) fn horizon(now: i64) -> i64 {
    Granularity::Hour.bucket_start(now) - SETTLEMENT_LAG
}

/// The horizon the server uses at `now`, an allowance for clock skew behind
/// [`horizon`]. The ranking script checks it against Redis's clock.
pub(crate) fn server_horizon(now: i64) -> i64 {
    horizon(now) - CLOCK_ALLOWANCE
}

/// Whether `bucket` ends before the server's horizon at `now`.
pub fn is_settled(bucket: Bucket, now: i64) -> bool {
    bucket.start + bucket.granularity.seconds() <= server_horizon(now)
}

/// Which cached union: a partition's ranking over the settled part of a
/// signed cover.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct UnionKey {
    /// The partition.
    pub(crate) partition: i32,
    /// The ranking.
    pub(crate) ranking: Ranking,
    /// The settled buckets and their signs.
    pub(crate) buckets: Vec<(Bucket, i64)>,
}

/// A union as read at one settled version.
#[derive(Debug, Clone)]
pub(crate) struct SettledUnion {
    /// The partition's settled version it was read at.
    pub(crate) version: String,
    /// Product and score pairs.
    pub(crate) scores: Arc<Vec<(i64, i64)>>,
}

#[derive(Debug)]
struct Entry {
    union: SettledUnion,
    stored_at: i64,
    valid_until: i64,
}

/// The settled unions of one namespace, shared by the queries of a process.
#[derive(Debug)]
pub struct SettledRankings {
    retention: Retention,
    entries: Mutex<Entries>,
    hits: AtomicU64,
    reads: AtomicU64,
}

#[derive(Debug, Default)]
struct Entries {
    unions: HashMap<UnionKey, Entry>,
    /// Pairs held by `unions`.
    pairs: usize,
}

impl Entries {
    fn remove(&mut self, key: &UnionKey) {
        if let Some(entry) = self.unions.remove(key) {
            self.pairs -= entry.union.scores.len();
        }
    }

    /// Drops expired unions, then the oldest, until `pairs` more fit.
    fn make_room(&mut self, pairs: usize, now: i64) {
        let fits = |entries: &Self| {
            entries.unions.len() < MAX_ENTRIES && entries.pairs + pairs <= MAX_PAIRS
        };
        if fits(self) {
            return;
        }
        let expired: Vec<UnionKey> = self
            .unions
            .iter()
            .filter(|(_, entry)| entry.valid_until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &expired {
            self.remove(key);
        }
        while !fits(self) {
            let oldest = self
                .unions
                .iter()
                .min_by_key(|(_, entry)| entry.stored_at)
                .map(|(key, _)| key.clone());
            match oldest {
                Some(key) => self.remove(&key),
                None => return,
            }
        }
    }
}

impl SettledRankings {
    /// An empty cache of buckets kept under `retention`.
    pub fn new(retention: Retention) -> Self {
        Self {
            retention,
            entries: Mutex::default(),
            hits: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// The union cached under `key`, unless it is too old to use at `now`.
    pub(crate) fn get(&self, key: &UnionKey, now: i64) -> Option<SettledUnion> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .unions
            .get(key)
            .filter(|entry| entry.valid_until > now)
            .map(|entry| entry.union.clone())
    }

    /// Keeps `union`, read at `now`, unless one of its buckets expires soon.
    pub(crate) fn put(&self, key: UnionKey, union: SettledUnion, now: i64) {
        let expires = key
            .buckets
            .iter()
            .map(|(bucket, _)| self.retention.expires_at(*bucket))
            .min()
            .unwrap_or(i64::MAX);
        let valid_until = (now + MAX_AGE).min(expires - EXPIRY_MARGIN);
        let pairs = union.scores.len();
        if valid_until <= now || pairs > MAX_PAIRS {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&key);
        entries.make_room(pairs, now);
        entries.pairs += pairs;
        entries.unions.insert(
            key,
            Entry {
                union,
                stored_at: now,
                valid_until,
            },
        );
    }

    /// Counts a partition's settled read: from the cache or from Redis.
    pub(crate) fn record(&self, hit: bool) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Settled reads so far, and how many the cache answered.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.hits.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;

    fn retention(minutes: u64) -> Retention {
        Retention {
            minute: Duration::from_secs(minutes * 60),
            hour: Duration::from_secs(90 * 86_400),
            day: Duration::from_secs(730 * 86_400),
        }
    }

    fn key(buckets: Vec<(Bucket, i64)>) -> UnionKey {
        UnionKey {
            partition: 0,
            ranking: Ranking::Views,
            buckets,
        }
    }

    fn union(version: &str) -> SettledUnion {
        SettledUnion {
            version: version.into(),
            scores: Arc::new(vec![(7, 3)]),
        }
    }

    #[test]
    fn buckets_settle_two_to_three_hours_after_they_end() {
        let now = 100 * DAY + 10 * HOUR + 59 * 60;
        assert_eq!(horizon(now), 100 * DAY + 9 * HOUR);
        assert_eq!(server_horizon(now), 100 * DAY + 8 * HOUR);
        let hour = |h: i64| Bucket::containing(Granularity::Hour, 100 * DAY + h * HOUR);
        assert!(is_settled(hour(7), now));
        assert!(!is_settled(hour(8), now));
        let yesterday = Bucket::containing(Granularity::Day, 99 * DAY);
        assert!(is_settled(yesterday, now));
        assert!(!is_settled(yesterday, 100 * DAY + HOUR));
    }

    #[test]
    fn a_union_is_dropped_before_a_bucket_expires_and_after_its_max_age() {
        let cache = SettledRankings::new(retention(48 * 60));
        let now = 100 * DAY;
        let day = Bucket::containing(Granularity::Day, 98 * DAY);
        cache.put(key(vec![(day, 1)]), union("1:1"), now);
        assert!(cache.get(&key(vec![(day, 1)]), now + MAX_AGE - 1).is_some());
        assert!(cache.get(&key(vec![(day, 1)]), now + MAX_AGE).is_none());
        // A minute of two days ago expires in under five minutes: not kept.
        let minute = Bucket::containing(Granularity::Minute, now - 48 * HOUR - 60);
        cache.put(key(vec![(day, 1), (minute, -1)]), union("1:1"), now);
        assert!(cache.get(&key(vec![(day, 1), (minute, -1)]), now).is_none());
        // Different buckets or signs are different unions.
        assert!(cache.get(&key(vec![(day, -1)]), now).is_none());
    }

    #[test]
    fn the_cache_holds_at_most_its_pairs() {
        let cache = SettledRankings::new(retention(48 * 60));
        let now = 100 * DAY;
        let day = |d: i64| Bucket::containing(Granularity::Day, d * DAY);
        let sized = |pairs: usize| SettledUnion {
            version: "1:1".into(),
            scores: Arc::new(vec![(1, 1); pairs]),
        };
        cache.put(key(vec![(day(1), 1)]), sized(MAX_PAIRS / 2), now);
        cache.put(key(vec![(day(2), 1)]), sized(MAX_PAIRS / 2), now + 1);
        cache.put(key(vec![(day(3), 1)]), sized(1), now + 2);
        assert!(cache.get(&key(vec![(day(1), 1)]), now + 2).is_none());
        assert!(cache.get(&key(vec![(day(2), 1)]), now + 2).is_some());
        assert!(cache.get(&key(vec![(day(3), 1)]), now + 2).is_some());
        cache.put(key(vec![(day(4), 1)]), sized(MAX_PAIRS + 1), now + 3);
        assert!(cache.get(&key(vec![(day(4), 1)]), now + 3).is_none());
        // Replacing a union frees its pairs first.
        cache.put(key(vec![(day(2), 1)]), sized(MAX_PAIRS / 2), now + 4);
        assert!(cache.get(&key(vec![(day(3), 1)]), now + 4).is_some());
        let entries = cache.entries.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(entries.pairs, MAX_PAIRS / 2 + 1);
    }

    #[test]
    fn a_full_cache_drops_its_oldest_union() {
        let cache = SettledRankings::new(retention(48 * 60));
        let now = 100 * DAY;
        let day = |d: i64| Bucket::containing(Granularity::Day, d * DAY);
        for d in 0..MAX_ENTRIES as i64 {
            cache.put(key(vec![(day(d), 1)]), union("1:1"), now + d);
        }
        let last = now + MAX_ENTRIES as i64;
        cache.put(key(vec![(day(-1), 1)]), union("1:1"), last);
        assert!(cache.get(&key(vec![(day(0), 1)]), last).is_none());
        assert!(cache.get(&key(vec![(day(1), 1)]), last).is_some());
        assert!(cache.get(&key(vec![(day(-1), 1)]), last).is_some());
    }
}
