//! A partition consumer's copy of the counter hashes and rankings it writes,
//! so that a commit sets their new values (`HSET key field value …`,
//! `ZADD key score member …`: one command a key) instead of sending one
//! `HINCRBY` or `ZINCRBY` per field, each of which Redis parses, queues,
//! runs and answers on its own (the README's bench section has the figures).
//! It also tells which
//! user sets (HyperLogLogs) exist: every event that adds a user to a set
//! counts an event in the same transaction (`All` and `Source`: an `Events`
//! counter of that source; `Product`: a `ProductEvents` counter of that
//! product), so a set exists exactly when such a counter does, and a new one
//! is written whole ([`super::hll`]). The mirror keeps the registers of a set
//! it wrote whole, so the next batch writes the whole union again (one `SET`,
//! 1 to 3 KB) rather than `PFADD` it: Redis edits a sparse set once per
//! added user, several times the cost of replacing the string.
//!
//! The copy is exact because the consumer that holds a partition's lease is
//! the only writer of its keys, and every commit is fenced on the stored
//! offset: a commit by anyone else moves the offset and fails the next fence
//! ([`super::commit::fence`]). [`super::commit::commit`] therefore empties the
//! mirror whenever a commit fails for any reason, and values are read again
//! from Redis. A bucket is read the first time a batch touches it, and read
//! again when it nears its expiry (Redis may have dropped it) or after it was
//! evicted to bound the memory ([`MAX_VALUES`]).

use foldhash::{HashMap, HashMapExt};

use redis::{Pipeline, Value, aio::ConnectionLike};

use super::{
    Bucket, Counter, Ranking, Retention, StoreError, UserSet, hll::Registers, keys::PartitionKeys,
};

/// Values (counter fields and ranked products) kept per partition; past it
/// the least recently written buckets are dropped, to be read again when a
/// batch touches them. Under 80 bytes a value, hash tables included: at
/// most 20 MB per partition.
pub(crate) const MAX_VALUES: usize = 250_000;

/// Registers of a user set the mirror holds counted as one value: 3 bytes
/// each, against under 80 bytes a value.
const REGISTERS_PER_VALUE: usize = 16;

/// A bucket whose keys expire within this many seconds is read again before
/// every write rather than trusted: Redis may drop its keys at any moment.
const EXPIRY_MARGIN_SECONDS: i64 = 300;

/// Replies [`Mirror::request`] adds per bucket: the counter hash and the
/// rankings.
pub(crate) const REPLIES_PER_BUCKET: usize = 1 + Ranking::ALL.len();

/// The known values of one bucket.
#[derive(Debug, Default)]
struct Known {
    /// Counter hash.
    counters: HashMap<Counter, i64>,
    /// Per ranking (in [`Ranking::ALL`] order): product → score.
    rankings: [HashMap<i64, i64>; Ranking::ALL.len()],
    /// The user sets that exist, with their registers when this consumer
    /// wrote them whole ([`super::hll::registers`]).
    user_sets: HashMap<UserSet, Option<Registers>>,
    /// The commit that last wrote the bucket, for eviction.
    used: u64,
}

impl Known {
    fn len(&self) -> usize {
        self.counters.len()
            + self.rankings.iter().map(HashMap::len).sum::<usize>()
            + self.user_sets.values().map(user_set_weight).sum::<usize>()
    }
}

/// What a user set counts for against [`MAX_VALUES`].
fn user_set_weight(registers: &Option<Registers>) -> usize {
    1 + registers.as_ref().map_or(0, Vec::len) / REGISTERS_PER_VALUE
}

/// What a commit writes to the mirrored keys, applied to the mirror once the
/// commit succeeded.
#[derive(Debug, Default)]
pub(crate) struct Written {
    counters: Vec<(Bucket, Counter, i64)>,
    scores: Vec<(Bucket, Ranking, i64, i64)>,
    user_sets: Vec<(Bucket, UserSet, Option<Registers>)>,
}

/// The current values of the counter hashes and rankings of one partition's
/// recently written buckets.
#[derive(Debug)]
pub struct Mirror {
    retention: Retention,
    buckets: HashMap<Bucket, Known>,
    values: usize,
    commits: u64,
}

impl Mirror {
    /// An empty mirror of keys kept for `retention`.
    pub fn new(retention: Retention) -> Self {
        Self {
            retention,
            buckets: HashMap::new(),
            values: 0,
            commits: 0,
        }
    }

    /// Forgets everything (after a failed commit: Redis may hold values this
    /// mirror does not know).
    pub(crate) fn clear(&mut self) {
        self.buckets.clear();
        self.values = 0;
    }

    /// Of `buckets`, those whose values must be read before a commit writes
    /// them: unknown, or too near their expiry to be trusted (forgotten
    /// here). Sorted, without repeats.
    pub fn missing(
        &mut self,
        buckets: impl IntoIterator<Item = Bucket>,
        now_s: i64,
    ) -> Vec<Bucket> {
        let mut missing: Vec<Bucket> = buckets
            .into_iter()
            .filter(|bucket| {
                if self.retention.expires_at(*bucket) <= now_s + EXPIRY_MARGIN_SECONDS {
                    if let Some(known) = self.buckets.remove(bucket) {
                        self.values -= known.len();
                    }
                    return true;
                }
                !self.buckets.contains_key(bucket)
            })
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    /// Adds the reads of `buckets`' values to `pipe`:
    /// [`REPLIES_PER_BUCKET`] replies each, for [`Mirror::absorb`].
    pub(crate) fn request(pipe: &mut Pipeline, keys: &PartitionKeys, buckets: &[Bucket]) {
        for bucket in buckets {
            pipe.cmd("HGETALL").arg(keys.counters(*bucket));
            for ranking in Ranking::ALL {
                pipe.cmd("ZRANGE")
                    .arg(keys.ranking(*bucket, ranking))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES");
            }
        }
    }

    /// Takes in the replies of [`Mirror::request`] for `buckets`.
    pub(crate) fn absorb(
        &mut self,
        keys: &PartitionKeys,
        buckets: &[Bucket],
        replies: Vec<Value>,
    ) -> Result<(), StoreError> {
        let mut replies = replies.into_iter();
        for bucket in buckets {
            let mut known = Known {
                used: self.commits,
                ..Known::default()
            };
            let fields: HashMap<String, String> = from_reply(replies.next())?;
            for (field, value) in fields {
                // A field this version does not know it never writes either.
                let Some(counter) = Counter::parse(&field) else {
                    continue;
                };
                let value = value.parse::<i64>().map_err(|_| StoreError::Corrupt {
                    key: keys.counters(*bucket),
                    detail: format!("field {field} is not an integer: {value:?}"),
                })?;
                known.counters.insert(counter, value);
                for set in user_sets_counted_by(counter) {
                    known.user_sets.entry(set).or_insert(None);
                }
            }
            for (index, ranking) in Ranking::ALL.into_iter().enumerate() {
                let scores: Vec<(String, f64)> = from_reply(replies.next())?;
                for (member, score) in scores {
                    let corrupt = || StoreError::Corrupt {
                        key: keys.ranking(*bucket, ranking),
                        detail: format!("member {member:?} or score {score} is not an integer"),
                    };
                    let product = member.parse::<i64>().map_err(|_| corrupt())?;
                    known.rankings[index].insert(product, whole(score).ok_or_else(corrupt)?);
                }
            }
            self.values += known.len();
            if let Some(old) = self.buckets.insert(*bucket, known) {
                self.values -= old.len();
            }
        }
        Ok(())
    }

    /// Reads the values of `buckets` in one round trip.
    pub async fn load(
        &mut self,
        connection: &mut impl ConnectionLike,
        keys: &PartitionKeys,
        buckets: &[Bucket],
    ) -> Result<(), StoreError> {
        if buckets.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        Self::request(&mut pipe, keys, buckets);
        let replies: Vec<Value> = pipe.query_async(connection).await?;
        self.absorb(keys, buckets, replies)
    }

    /// Whether `bucket`'s values are known.
    pub(crate) fn knows(&self, bucket: Bucket) -> bool {
        self.buckets.contains_key(&bucket)
    }

    /// A counter's value (0 when the field is not set); `bucket` must be
    /// known.
    pub(crate) fn counter(&self, bucket: Bucket, counter: Counter) -> i64 {
        self.buckets
            .get(&bucket)
            .and_then(|known| known.counters.get(&counter))
            .copied()
            .unwrap_or(0)
    }

    /// Whether the user set exists; `bucket` must be known.
    pub(crate) fn has_users(&self, bucket: Bucket, set: UserSet) -> bool {
        self.buckets
            .get(&bucket)
            .is_some_and(|known| known.user_sets.contains_key(&set))
    }

    /// The registers of a user set this consumer wrote whole, if it did;
    /// `bucket` must be known.
    pub(crate) fn user_registers(&self, bucket: Bucket, set: UserSet) -> Option<&[(u16, u8)]> {
        self.buckets.get(&bucket)?.user_sets.get(&set)?.as_deref()
    }

    /// A product's score (0 when not ranked); `bucket` must be known.
    pub(crate) fn score(&self, bucket: Bucket, ranking: Ranking, product: i64) -> i64 {
        self.buckets
            .get(&bucket)
            .and_then(|known| known.rankings[index(ranking)].get(&product))
            .copied()
            .unwrap_or(0)
    }

    /// Records what a successful commit wrote, then drops the least recently
    /// written buckets while over [`MAX_VALUES`].
    pub(crate) fn apply(&mut self, written: Written) {
        self.commits += 1;
        let commit = self.commits;
        for (bucket, counter, value) in written.counters {
            let known = self.buckets.entry(bucket).or_default();
            known.used = commit;
            if known.counters.insert(counter, value).is_none() {
                self.values += 1;
            }
        }
        for (bucket, ranking, product, score) in written.scores {
            let known = self.buckets.entry(bucket).or_default();
            known.used = commit;
            if known.rankings[index(ranking)]
                .insert(product, score)
                .is_none()
            {
                self.values += 1;
            }
        }
        for (bucket, set, registers) in written.user_sets {
            let known = self.buckets.entry(bucket).or_default();
            known.used = commit;
            // Only this set's weight changes: no walk over the bucket's sets.
            let added = user_set_weight(&registers);
            let replaced = known
                .user_sets
                .insert(set, registers)
                .map_or(0, |old| user_set_weight(&old));
            self.values = (self.values + added).saturating_sub(replaced);
        }
        if self.values > MAX_VALUES {
            self.evict(MAX_VALUES * 3 / 4);
        }
    }

    /// Drops the least recently written buckets until at most `keep` values
    /// remain.
    fn evict(&mut self, keep: usize) {
        let mut by_use: Vec<(u64, Bucket)> = self
            .buckets
            .iter()
            .map(|(bucket, known)| (known.used, *bucket))
            .collect();
        by_use.sort_unstable();
        for (_, bucket) in by_use {
            if self.values <= keep {
                break;
            }
            if let Some(known) = self.buckets.remove(&bucket) {
                self.values -= known.len();
            }
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.values
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.values == 0
    }
}

impl Written {
    /// Records a counter's new value.
    pub(crate) fn counter(&mut self, bucket: Bucket, counter: Counter, value: i64) {
        self.counters.push((bucket, counter, value));
    }

    /// Records that a user set was written: whole, with `registers`, or
    /// added to (`None`).
    pub(crate) fn user_set(&mut self, bucket: Bucket, set: UserSet, registers: Option<Registers>) {
        self.user_sets.push((bucket, set, registers));
    }

    /// Records a product's new score.
    pub(crate) fn score(&mut self, bucket: Bucket, ranking: Ranking, product: i64, score: i64) {
        self.scores.push((bucket, ranking, product, score));
    }
}

/// The user sets whose users a counter's events added.
fn user_sets_counted_by(counter: Counter) -> impl Iterator<Item = UserSet> {
    let (first, second) = match counter {
        Counter::Events { source, .. } => (Some(UserSet::All), Some(UserSet::Source(source))),
        Counter::ProductEvents { product, .. } => (Some(UserSet::Product(product)), None),
        _ => (None, None),
    };
    first.into_iter().chain(second)
}

fn index(ranking: Ranking) -> usize {
    match ranking {
        Ranking::Views => 0,
        Ranking::AddToCarts => 1,
        Ranking::Purchases => 2,
        Ranking::Revenue => 3,
    }
}

/// `score` as an integer, if it is one (scores are sums of integers).
fn whole(score: f64) -> Option<i64> {
    // 2^63 as a double: the first value past i64's range.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (score.fract() == 0.0 && score.abs() < LIMIT).then_some(score as i64)
}

fn from_reply<T: redis::FromRedisValue>(reply: Option<Value>) -> Result<T, StoreError> {
    let reply = reply.ok_or_else(|| StoreError::Corrupt {
        key: String::new(),
        detail: "fewer replies than reads".into(),
    })?;
    Ok(redis::from_redis_value(reply).map_err(redis::RedisError::from)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Granularity;

    fn retention() -> Retention {
        let hour = Duration::from_secs(3600);
        Retention {
            minute: hour,
            hour,
            day: hour,
        }
    }

    fn events(event_type: i32) -> Counter {
        Counter::Events {
            event_type,
            source: 1,
        }
    }

    #[test]
    fn rankings_index_in_the_order_of_all() {
        for (position, ranking) in Ranking::ALL.into_iter().enumerate() {
            assert_eq!(index(ranking), position);
        }
    }

    #[test]
    fn scores_are_whole_numbers_or_rejected() {
        assert_eq!(whole(2000.0), Some(2000));
        assert_eq!(whole(-3.0), Some(-3));
        assert_eq!(whole(0.5), None);
        assert_eq!(whole(f64::NAN), None);
        assert_eq!(whole(1e19), None);
    }

    #[test]
    fn written_values_are_known_until_evicted_least_recent_first() {
        let mut mirror = Mirror::new(retention());
        let now = 1_000_000_020;
        let minute = |m: i64| Bucket::containing(Granularity::Minute, now - 60 * m);
        let buckets: Vec<Bucket> = (0..4).map(minute).collect();
        assert_eq!(mirror.missing(buckets.clone(), now), {
            let mut sorted = buckets.clone();
            sorted.sort_unstable();
            sorted
        });
        for bucket in &buckets {
            let mut written = Written::default();
            written.counter(*bucket, events(1), 5);
            written.score(*bucket, Ranking::Revenue, 42, 7);
            mirror.apply(written);
        }
        assert!(mirror.missing(buckets.clone(), now).is_empty());
        assert_eq!(mirror.counter(buckets[0], events(1)), 5);
        assert_eq!(mirror.counter(buckets[0], events(2)), 0);
        assert_eq!(mirror.score(buckets[1], Ranking::Revenue, 42), 7);
        assert_eq!(mirror.score(buckets[1], Ranking::Views, 42), 0);
        assert_eq!(mirror.len(), 8);

        // Keeping 4 values drops the two buckets written first.
        mirror.evict(4);
        assert_eq!(mirror.len(), 4);
        assert_eq!(mirror.missing(buckets.clone(), now), {
            let mut first = vec![buckets[0], buckets[1]];
            first.sort_unstable();
            first
        });
        mirror.clear();
        assert!(mirror.is_empty());
        assert_eq!(mirror.missing(buckets.clone(), now).len(), 4);
    }

    #[test]
    fn a_bucket_near_its_expiry_is_read_again() {
        let mut mirror = Mirror::new(retention());
        let now = 1_000_000_020;
        let fresh = Bucket::containing(Granularity::Minute, now);
        // Its hour of retention ends within the margin.
        let old = Bucket::containing(Granularity::Minute, now - 3600);
        for bucket in [fresh, old] {
            let mut written = Written::default();
            written.counter(bucket, Counter::Late, 1);
            mirror.apply(written);
        }
        assert_eq!(mirror.missing([fresh, old], now), vec![old]);
        assert_eq!(mirror.len(), 1);
        assert!(!mirror.knows(old));
    }
}
