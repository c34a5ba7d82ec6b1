//! Reads of the metric store, merged across partitions: counters and
//! rankings are summed, unique users are counted per partition (a union of
//! the partition's buckets) and summed, which is exact to HyperLogLog error
//! because a user lives on one partition.
//!
//! Each partition's commands go in one pipeline of their own, to the node
//! that holds the partition (its hash slot's primary on a cluster), all
//! partitions at once; the replies are merged here.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use futures_util::future::try_join_all;
use redis::{FromRedisValue, Value};

use super::{
    Bucket, Counter, Ranking, StoreError, UserSet,
    keys::{PartitionKeys, state_field},
    nodes::Route,
    series_position,
    settled::{self, SettledRankings},
};

/// Reads metrics of a namespace over a set of partitions.
#[derive(Debug, Clone)]
pub struct MetricReader {
    partitions: Vec<PartitionKeys>,
    settled: Option<Arc<SettledRankings>>,
    /// The stored offsets its counter reads saw (see [`Self::observed`]).
    observed: Arc<Mutex<Observed>>,
}

/// Each partition's stored next offset (`None`: nothing committed yet).
pub(crate) type Offsets = BTreeMap<i32, Option<i64>>;

/// What the counter reads of one reader saw of the stored offsets.
#[derive(Debug, Default)]
enum Observed {
    /// No counter read ran.
    #[default]
    Nothing,
    /// Every one saw these.
    Offsets(Offsets),
    /// They saw different ones.
    Mixed,
}

impl MetricReader {
    /// A reader of `partitions` of `namespace`.
    pub fn new(namespace: &str, partitions: impl IntoIterator<Item = i32>) -> Self {
        Self {
            partitions: partitions
                .into_iter()
                .map(|p| PartitionKeys::new(namespace, p))
                .collect(),
            settled: None,
            observed: Arc::default(),
        }
    }

    /// The stored offsets at which the counter reads ([`Self::fields`],
    /// [`Self::minute_events`] and what builds on them) of this reader (and
    /// its clones) read, when they all read at the same ones: what they
    /// returned is exactly what the commits before those offsets wrote.
    pub(crate) fn observed(&self) -> Option<Offsets> {
        match &*self.observed.lock().unwrap_or_else(|e| e.into_inner()) {
            Observed::Offsets(offsets) => Some(offsets.clone()),
            Observed::Nothing | Observed::Mixed => None,
        }
    }

    /// Runs `pipeline(partition)` on every partition, concurrently, each
    /// through the connection `route` gives for it; the replies by
    /// partition. A node that answers it moved or fails makes `route` look
    /// the owners up again (the call still fails: reads are cheap to retry).
    async fn per_partition<R: Route, T: FromRedisValue + Send>(
        &self,
        route: &R,
        pipeline: impl Fn(&PartitionKeys) -> redis::Pipeline,
    ) -> Result<Vec<T>, StoreError> {
        let pipeline = &pipeline;
        try_join_all(self.partitions.iter().map(|keys| async move {
            let mut connection = route.connection(&keys.state()).await?;
            let replied = pipeline(keys).query_async(&mut connection).await;
            if let Err(error) = &replied
                && super::nodes::is_moved_or_down(error)
            {
                route.moved().await;
            }
            Ok::<T, StoreError>(replied?)
        }))
        .await
    }

    /// Runs `commands(partition)` on every partition, each partition's in a
    /// `MULTI` block with a read of its stored offset, so they see the
    /// partition as of one commit (every commit is one transaction on its
    /// partition's keys); records the offsets. Replies come by partition,
    /// in command order.
    async fn at_offsets<T: FromRedisValue>(
        &self,
        route: &impl Route,
        commands: impl Fn(&PartitionKeys) -> Vec<redis::Cmd>,
    ) -> Result<Vec<Vec<T>>, StoreError> {
        let blocks: Vec<Vec<Value>> = self
            .per_partition(route, |keys| {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("HGET")
                    .arg(keys.state())
                    .arg(state_field::OFFSET);
                for command in commands(keys) {
                    pipe.add_command(command);
                }
                pipe
            })
            .await?;
        let mut offsets = Offsets::new();
        let mut replies = Vec::with_capacity(blocks.len());
        for (keys, block) in self.partitions.iter().zip(blocks) {
            let mut items = block.into_iter();
            let offset = items.next().map(Option::<i64>::from_redis_value);
            let offset = offset.transpose().map_err(redis::RedisError::from)?;
            offsets.insert(keys.partition(), offset.flatten());
            replies.push(
                items
                    .map(T::from_redis_value)
                    .collect::<Result<Vec<T>, _>>()
                    .map_err(redis::RedisError::from)?,
            );
        }
        self.observe(offsets);
        Ok(replies)
    }

    /// Notes that a read saw `offsets`.
    fn observe(&self, offsets: Offsets) {
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        *observed = match std::mem::take(&mut *observed) {
            Observed::Nothing => Observed::Offsets(offsets),
            Observed::Offsets(seen) if seen == offsets => Observed::Offsets(seen),
            Observed::Offsets(_) | Observed::Mixed => Observed::Mixed,
        };
    }

    /// The same reader, reading settled ranking buckets through `cache`.
    #[must_use]
    pub fn with_settled(mut self, cache: Arc<SettledRankings>) -> Self {
        self.settled = Some(cache);
        self
    }

    /// Every counter field of `buckets`, summed over buckets and partitions
    /// (look fields up with [`Counter::field`]).
    pub async fn counters(
        &self,
        route: &impl Route,
        buckets: &[Bucket],
    ) -> Result<HashMap<String, i64>, StoreError> {
        let partitions: Vec<Vec<HashMap<String, i64>>> = self
            .per_partition(route, |keys| {
                let mut pipe = redis::pipe();
                for bucket in buckets {
                    pipe.cmd("HGETALL").arg(keys.counters(*bucket));
                }
                pipe
            })
            .await?;
        let mut totals = HashMap::new();
        for reply in partitions.into_iter().flatten() {
            for (field, value) in reply {
                *totals.entry(field).or_default() += value;
            }
        }
        Ok(totals)
    }

    /// One counter, summed over `buckets` and partitions.
    pub async fn counter(
        &self,
        route: &impl Route,
        buckets: &[Bucket],
        counter: Counter,
    ) -> Result<i64, StoreError> {
        let field = counter.field();
        let partitions: Vec<Vec<Option<i64>>> = self
            .per_partition(route, |keys| {
                let mut pipe = redis::pipe();
                for bucket in buckets {
                    pipe.cmd("HGET").arg(keys.counters(*bucket)).arg(&field);
                }
                pipe
            })
            .await?;
        Ok(partitions.into_iter().flatten().flatten().sum())
    }

    /// The partitions of `namespace` that ingest has consumed.
    pub(crate) async fn discover(route: &impl Route, namespace: &str) -> Result<Self, StoreError> {
        let key = super::keys::partitions(namespace);
        let mut connection = route.connection(&key).await?;
        let mut partitions: Vec<i32> = redis::cmd("SMEMBERS")
            .arg(&key)
            .query_async(&mut connection)
            .await?;
        partitions.sort_unstable();
        Ok(Self::new(namespace, partitions))
    }

    /// The partitions read, by number.
    pub(crate) fn partitions(&self) -> Vec<i32> {
        self.partitions
            .iter()
            .map(PartitionKeys::partition)
            .collect()
    }

    /// `fields` of every bucket, summed over partitions: one row per bucket
    /// (in `buckets` order), one value per field (in `fields` order).
    pub async fn fields(
        &self,
        route: &impl Route,
        buckets: &[Bucket],
        fields: &[String],
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        let mut rows = vec![vec![0; fields.len()]; buckets.len()];
        if fields.is_empty() || buckets.is_empty() {
            return Ok(rows);
        }
        let partitions: Vec<Vec<Vec<Option<i64>>>> = self
            .at_offsets(route, |keys| {
                buckets
                    .iter()
                    .map(|bucket| {
                        let mut command = redis::cmd("HMGET");
                        command.arg(keys.counters(*bucket)).arg(fields);
                        command
                    })
                    .collect()
            })
            .await?;
        for replies in partitions {
            for (row, reply) in rows.iter_mut().zip(replies) {
                for (total, value) in row.iter_mut().zip(reply) {
                    *total += value.unwrap_or(0);
                }
            }
        }
        Ok(rows)
    }

    /// Events of each `(type, source)` of `pairs` in each minute starting at
    /// one of `minutes`, summed over partitions: one row per minute (in
    /// `minutes` order), one value per pair. Reads the dense minute series,
    /// one `GETRANGE` per partition, day and pair, so a day of minutes costs
    /// what one minute does.
    pub async fn minute_events(
        &self,
        route: &impl Route,
        minutes: &[i64],
        pairs: &[(i32, i32)],
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        const WIDTH: usize = 4;
        let mut rows = vec![vec![0; pairs.len()]; minutes.len()];
        if pairs.is_empty() || minutes.is_empty() {
            return Ok(rows);
        }
        // The first and last minute index read of each day.
        let mut days: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for minute in minutes {
            let (day, index) = series_position(*minute);
            let range = days.entry(day).or_insert((index, index));
            *range = (range.0.min(index), range.1.max(index));
        }
        let width = WIDTH as i64;
        let partitions: Vec<Vec<Vec<u8>>> = self
            .at_offsets(route, |keys| {
                let mut commands = Vec::with_capacity(days.len() * pairs.len());
                for (day, (first, last)) in &days {
                    for (event_type, source) in pairs {
                        let mut command = redis::cmd("GETRANGE");
                        command
                            .arg(keys.minute_series(*day, *event_type, *source))
                            .arg(first * width)
                            .arg(last * width + width - 1);
                        commands.push(command);
                    }
                }
                commands
            })
            .await?;
        // Replies come by partition, then day, then pair; a series shorter
        // than the range read (or missing) has zeros past its end.
        let per_day = pairs.len();
        let slots: HashMap<i64, (usize, i64)> = days
            .iter()
            .enumerate()
            .map(|(slot, (day, (first, _)))| (*day, (slot, *first)))
            .collect();
        for (row, minute) in rows.iter_mut().zip(minutes) {
            let (day, index) = series_position(*minute);
            let Some(&(slot, first)) = slots.get(&day) else {
                continue;
            };
            // Every minute's index is at or after its day's first.
            let Ok(offset) = usize::try_from(index - first).map(|i| i * WIDTH) else {
                continue;
            };
            for partition in &partitions {
                let Some(day_replies) = partition.get(slot * per_day..(slot + 1) * per_day) else {
                    continue;
                };
                for (total, bytes) in row.iter_mut().zip(day_replies) {
                    if let Some(&[a, b, c, d]) = bytes.get(offset..offset + WIDTH) {
                        *total += i64::from(u32::from_be_bytes([a, b, c, d]));
                    }
                }
            }
        }
        Ok(rows)
    }

    /// `fields` summed over signed buckets (each bucket's values times its
    /// sign) and partitions: one total per field.
    pub async fn totals(
        &self,
        route: &impl Route,
        buckets: &[(Bucket, i64)],
        fields: &[String],
    ) -> Result<Vec<i64>, StoreError> {
        let plain: Vec<Bucket> = buckets.iter().map(|(bucket, _)| *bucket).collect();
        let rows = self.fields(route, &plain, fields).await?;
        let mut totals = vec![0; fields.len()];
        for (row, (_, sign)) in rows.into_iter().zip(buckets) {
            for (total, value) in totals.iter_mut().zip(row) {
                *total += sign * value;
            }
        }
        Ok(totals)
    }

    /// Each of `counters` summed over signed buckets and partitions, named:
    /// one `(counter, total)` per counter, so callers decode by name.
    pub(crate) async fn counter_totals(
        &self,
        route: &impl Route,
        buckets: &[(Bucket, i64)],
        counters: &[Counter],
    ) -> Result<Vec<(Counter, i64)>, StoreError> {
        let fields: Vec<String> = counters.iter().map(Counter::field).collect();
        let totals = self.totals(route, buckets, &fields).await?;
        Ok(counters.iter().copied().zip(totals).collect())
    }

    /// Distinct users of `set` over `buckets`.
    pub async fn unique_users(
        &self,
        route: &impl Route,
        buckets: &[Bucket],
        set: UserSet,
    ) -> Result<u64, StoreError> {
        if buckets.is_empty() {
            return Ok(0);
        }
        let replies: Vec<(u64,)> = self
            .per_partition(route, |keys| {
                let hlls: Vec<String> = buckets.iter().map(|b| keys.users(*b, set)).collect();
                let mut pipe = redis::pipe();
                pipe.cmd("PFCOUNT").arg(hlls);
                pipe
            })
            .await?;
        Ok(replies.into_iter().map(|(users,)| users).sum())
    }

    /// Scores of every product in `ranking` over signed `buckets` (each
    /// bucket's scores times its sign): one script per partition, a
    /// `ZUNION … WEIGHTS` of its non-empty sets (a product's score is spread
    /// over the partitions of its users, so every score is needed to rank
    /// across partitions). With a settled cache
    /// ([`Self::with_settled`]), the buckets that ended before the settlement
    /// horizon are read from Redis once per settled version.
    pub async fn ranking(
        &self,
        route: &impl Route,
        buckets: &[(Bucket, i64)],
        ranking: Ranking,
    ) -> Result<HashMap<i64, i64>, StoreError> {
        let mut totals = HashMap::new();
        if buckets.is_empty() || self.partitions.is_empty() {
            return Ok(totals);
        }
        let now = chrono::Utc::now().timestamp();
        let (mut settled, mut fresh) = (Vec::new(), Vec::new());
        for &(bucket, sign) in buckets {
            if self.settled.is_some() && settled::is_settled(bucket, now) {
                settled.push((bucket, sign));
            } else {
                fresh.push((bucket, sign));
            }
        }
        let cache = self.settled.as_ref().filter(|_| !settled.is_empty());
        let mut cached = Vec::with_capacity(self.partitions.len());
        for keys in &self.partitions {
            let key = settled::UnionKey {
                partition: keys.partition(),
                ranking,
                buckets: settled.clone(),
            };
            let held = cache.and_then(|cache| cache.get(&key, now));
            cached.push((key, held));
        }
        let versions: HashMap<i32, &str> = cached
            .iter()
            .map(|(key, held)| {
                let version = held.as_ref().map_or("", |union| union.version.as_str());
                (key.partition, version)
            })
            .collect();
        let replies: Vec<((String, String, String, String),)> = self
            .per_partition(route, |keys| {
                let version = versions.get(&keys.partition()).copied().unwrap_or("");
                let mut pipe = redis::pipe();
                ranking_script(&mut pipe, keys, ranking, &settled, &fresh, version, now);
                pipe
            })
            .await?;
        let replies = replies.into_iter().map(|(reply,)| reply);
        for ((keys, (key, held)), (version, outcome, settled_pairs, fresh_pairs)) in
            self.partitions.iter().zip(cached).zip(replies)
        {
            let corrupt = |detail: String| StoreError::Corrupt {
                key: keys.ranking(buckets[0].0, ranking),
                detail,
            };
            if outcome == "hit" {
                let union = held.ok_or_else(|| corrupt("a hit on no cached union".into()))?;
                for (product, score) in union.scores.iter() {
                    *totals.entry(*product).or_default() += score;
                }
            } else {
                let scores = parse_pairs(&settled_pairs).map_err(corrupt)?;
                for (product, score) in &scores {
                    *totals.entry(*product).or_default() += score;
                }
                if let (Some(cache), "fill") = (cache, outcome.as_str()) {
                    let union = settled::SettledUnion {
                        version,
                        scores: Arc::new(scores),
                    };
                    cache.put(key, union, now);
                }
            }
            if let Some(cache) = cache {
                cache.record(outcome == "hit");
            }
            for (product, score) in parse_pairs(&fresh_pairs).map_err(corrupt)? {
                *totals.entry(product).or_default() += score;
            }
        }
        Ok(totals)
    }
}

/// The ranking script. KEYS[1] is the partition's settled version, KEYS[2]
/// its state hash, then come the sets of the settled buckets, then those of
/// the others. ARGV: the version of the cached settled union ('' for none),
/// the number of settled sets, the server's settlement horizon, the
/// settlement lag, the state's watermark field, then each set's weight and
/// bucket start.
///
/// Sets of buckets that start after the partition's watermark (its latest
/// event time, written in the same commits as the sets) are empty and left
/// out: they are mostly the future of a window ending now. A union of one
/// set is a plain `ZRANGE`, several times cheaper than `ZUNION`'s new sorted
/// set.
///
/// Returns the version; `hit` (the cached union is current: not read
/// again), `fill` (read, and cachable) or `none` (read, not cachable: no
/// version yet, or the server's clock is over an hour ahead of Redis's);
/// the settled union; the other buckets' union. A union comes back as one
/// space-separated string of member/score pairs: parsing a thousand RESP
/// values per partition cost the server more than Redis spent on the union.
const RANKING_SCRIPT: &str = r"
local version = redis.call('GET', KEYS[1]) or ''
local watermark = tonumber(redis.call('HGET', KEYS[2], ARGV[5]) or '-1')
local settled = tonumber(ARGV[2])
local function union(first, last)
  local keys, weights = {}, {}
  for i = first, last do
    if tonumber(ARGV[2 * i + 5]) * 1000 <= watermark then
      keys[#keys + 1] = KEYS[i + 2]
      weights[#weights + 1] = ARGV[2 * i + 4]
    end
  end
  local n = #keys
  if n == 0 then return '' end
  if n == 1 and weights[1] == '1' then
    return table.concat(redis.call('ZRANGE', keys[1], 0, -1, 'WITHSCORES'), ' ')
  end
  keys[n + 1] = 'WEIGHTS'
  for i = 1, n do keys[n + 1 + i] = weights[i] end
  keys[2 * n + 2] = 'WITHSCORES'
  return table.concat(redis.call('ZUNION', n, unpack(keys)), ' ')
end
local fresh = union(settled + 1, #KEYS - 2)
if version ~= '' and version == ARGV[1] then
  return {version, 'hit', '', fresh}
end
local now = tonumber(redis.call('TIME')[1])
local cachable = version ~= '' and tonumber(ARGV[3]) <= now - now % 3600 - tonumber(ARGV[4])
return {version, cachable and 'fill' or 'none', union(1, settled), fresh}
";

/// Adds to `pipe` the ranking script of one partition: the union of its
/// `settled` buckets (unless `held_version` is still current) and of its
/// `fresh` ones, each bucket weighted by its sign.
fn ranking_script(
    pipe: &mut redis::Pipeline,
    keys: &PartitionKeys,
    ranking: Ranking,
    settled: &[(Bucket, i64)],
    fresh: &[(Bucket, i64)],
    held_version: &str,
    now: i64,
) {
    let command = pipe
        .cmd("EVAL")
        .arg(RANKING_SCRIPT)
        .arg(2 + settled.len() + fresh.len())
        .arg(keys.settled_version())
        .arg(keys.state());
    for (bucket, _) in settled.iter().chain(fresh) {
        command.arg(keys.ranking(*bucket, ranking));
    }
    command
        .arg(held_version)
        .arg(settled.len())
        .arg(settled::server_horizon(now))
        .arg(settled::SETTLEMENT_LAG)
        .arg(state_field::WATERMARK_MS);
    for (bucket, sign) in settled.iter().chain(fresh) {
        command.arg(*sign).arg(bucket.start);
    }
}

/// Member/score pairs of a ranking script's union. Scores are integer sums,
/// exact in a double below 2^53.
fn parse_pairs(pairs: &str) -> Result<Vec<(i64, i64)>, String> {
    let mut parsed = Vec::new();
    let mut words = pairs.split_ascii_whitespace();
    while let Some(member) = words.next() {
        let pair = member
            .parse::<i64>()
            .ok()
            .zip(words.next().and_then(|score| score.parse::<f64>().ok()));
        let Some((product, score)) = pair else {
            return Err(format!(
                "a ranking member or score is not a number near {member:?}"
            ));
        };
        #[allow(clippy::cast_possible_truncation)]
        parsed.push((product, score.round() as i64));
    }
    Ok(parsed)
}
