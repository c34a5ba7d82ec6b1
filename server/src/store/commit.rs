//! The exactly-once write of an ingest batch.
//!
//! A batch's aggregates, its dedupe ids, its sessions, the pipeline counters
//! and the partition's next offset are written by one `MULTI`/`EXEC`
//! transaction, guarded by `WATCH` on the partition's state hash: the commit
//! first watches the hash and checks that the stored offset is still the one
//! the batch started from, then sends the transaction, which Redis drops if
//! anything wrote the hash in between. So a batch is applied entirely or not
//! at all, and at most once: a consumer that crashed before `EXEC` re-reads
//! the batch from the stored offset; one that crashed after it, or whose reply
//! was lost, finds the offset moved and resumes from it. A second consumer of
//! the same partition can only ever lose this race ([`StoreError::Fenced`]),
//! never double-count.
//!
//! Counter hashes and rankings are written as their new values, from the
//! consumer's [`Mirror`] of them: one `HSET` or `ZADD` a key instead of an
//! `HINCRBY` or `ZINCRBY` a field.
//!
//! Plain commands rather than one Lua script: Redis spends about 0.4 µs
//! turning each script argument into a Lua string and 1.4 µs on each
//! `redis.call`, against 0.1 µs an argument of a plain command, and a batch
//! is tens of thousands of arguments.
//!
//! `WATCH` belongs to a connection: commit on a connection no other task
//! uses, and one that does not reconnect by itself (a `MultiplexedConnection`,
//! not a `ConnectionManager`), so that a transaction never runs unwatched on a
//! new connection.

use std::collections::{BTreeMap, HashMap};

use foldhash::HashSet;
use futures_util::future::try_join_all;
use redis::{Pipeline, Script, aio::ConnectionLike};

use super::{
    Bucket, Counter, Granularity, Retention, StoreError, UserSet,
    aggregate::{BatchAggregate, BucketChanges, SessionKey, SessionState},
    hll,
    keys::{PartitionKeys, SessionField, state_field},
    mirror::{Mirror, REPLIES_PER_BUCKET, Written},
    nodes::Route,
    settled,
};

/// Run first in the transaction: gives the partition a new settled version
/// when the batch writes a minute before the settlement horizon (by Redis's
/// clock at `EXEC`, as in [`settled::horizon`]), which drops every cached
/// union of settled buckets; and a first version to a partition without one.
/// KEYS[1] is the settled version; ARGV[1] the batch's earliest minute (''
/// for none), ARGV[2] the settlement lag.
const SETTLE_SCRIPT: &str = r"
local now = redis.call('TIME')
local horizon = now[1] - now[1] % 3600 - tonumber(ARGV[2])
local version = redis.call('GET', KEYS[1])
if not version or (ARGV[1] ~= '' and tonumber(ARGV[1]) < horizon) then
  local n = tonumber(string.match(version or '0', '^%d+') or '0') + 1
  redis.call('SET', KEYS[1], n .. ':' .. now[1] .. '.' .. now[2])
end
return 0
";

/// Most field/value pairs in one `HSET` or score/member pairs in one
/// `ZADD`: keeps each command, which Redis runs without a break, short.
const HSET_PAIRS: usize = 500;
/// Most members in one `PFADD` or `SADD`, for the same reason.
const MEMBERS: usize = 1000;

/// What is stored about a partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// Offset of the next record to read; `None` before the first commit.
    pub offset: Option<i64>,
    /// Latest event time applied, Unix ms.
    pub watermark_ms: Option<i64>,
    /// Events counted.
    pub applied: i64,
    /// Duplicates discarded.
    pub duplicates: i64,
    /// The dedupe clock: the latest Kafka record timestamp read, Unix ms.
    pub dedupe_clock_ms: Option<i64>,
    /// Late events counted.
    pub late: i64,
    /// Dead-lettered records, per reason.
    pub dead_lettered: HashMap<String, i64>,
    /// Last commit, Unix ms.
    pub last_commit_ms: Option<i64>,
}

/// Reads a partition's state.
pub async fn load_state(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
) -> Result<PartitionState, StoreError> {
    let key = keys.state();
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(connection)
        .await?;
    let mut state = PartitionState::default();
    for (field, value) in fields {
        let number = value.parse::<i64>().map_err(|_| StoreError::Corrupt {
            key: key.clone(),
            detail: format!("field {field} is not an integer: {value:?}"),
        })?;
        match field.as_str() {
            state_field::OFFSET => state.offset = Some(number),
            state_field::WATERMARK_MS => state.watermark_ms = Some(number),
            state_field::APPLIED => state.applied = number,
            state_field::DUPLICATES => state.duplicates = number,
            state_field::DEDUPE_CLOCK_MS => state.dedupe_clock_ms = Some(number),
            state_field::LATE => state.late = number,
            state_field::LAST_COMMIT_MS => state.last_commit_ms = Some(number),
            other => {
                if let Some(reason) = other.strip_prefix(state_field::DEAD_LETTERED_PREFIX) {
                    state.dead_lettered.insert(reason.to_owned(), number);
                }
            }
        }
    }
    Ok(state)
}

/// The state of every partition consumed in `namespace`, by partition.
pub(crate) async fn load_states(
    route: &impl Route,
    namespace: &str,
) -> Result<Vec<(i32, PartitionState)>, StoreError> {
    let partitions = super::read::MetricReader::discover(route, namespace)
        .await?
        .partitions();
    let states = try_join_all(partitions.into_iter().map(|partition| async move {
        let keys = PartitionKeys::new(namespace, partition);
        let mut connection = route.connection(&keys.state()).await?;
        Ok::<_, StoreError>((partition, load_state(&mut connection, &keys).await?))
    }));
    states.await
}

/// Records that `keys`' partition is consumed, for readers to merge it (the
/// set of partitions has a slot of its own: not on the partition's
/// connection).
pub(crate) async fn register_partition(
    route: &impl Route,
    namespace: &str,
    keys: &PartitionKeys,
) -> Result<(), StoreError> {
    let key = super::keys::partitions(namespace);
    let mut connection = route.connection(&key).await?;
    redis::cmd("SADD")
        .arg(&key)
        .arg(keys.partition())
        .query_async::<()>(&mut connection)
        .await?;
    Ok(())
}

/// Records that the metrics of `namespace` are built from an events topic of
/// `count` partitions, unless a count is recorded already; that count when
/// it differs. Events are keyed by user, so a topic that gained partitions
/// sends some users' events to another partition than before: their
/// sessions and unique-user sets would be split, and counted twice.
pub(crate) async fn check_topic_partitions(
    route: &impl Route,
    namespace: &str,
    count: usize,
) -> Result<Option<i64>, StoreError> {
    let key = super::keys::topic_partitions(namespace);
    let mut connection = route.connection(&key).await?;
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let recorded: Option<i64> = redis::cmd("SET")
        .arg(&key)
        .arg(count)
        .arg("NX")
        .arg("GET")
        .query_async(&mut connection)
        .await?;
    Ok(recorded.filter(|recorded| *recorded != count))
}

/// Forgets the partition count of `namespace` (a rebuild recomputes the
/// metrics from the topic as it is).
pub(crate) async fn forget_topic_partitions(
    route: &impl Route,
    namespace: &str,
) -> Result<(), StoreError> {
    let key = super::keys::topic_partitions(namespace);
    let mut connection = route.connection(&key).await?;
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut connection)
        .await?;
    Ok(())
}

/// Takes or renews the lease of `keys`' partition for `owner`, valid for
/// `ttl`. Returns the current holder when another process holds it.
pub(crate) async fn take_lease(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
    owner: &str,
    ttl: std::time::Duration,
) -> Result<Result<(), String>, StoreError> {
    const LEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ''
end
return holder
";
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    let script = SCRIPT.get_or_init(|| Script::new(LEASE_SCRIPT));
    let holder: String = script
        .key(keys.lease())
        .arg(owner)
        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
        .invoke_async(connection)
        .await?;
    Ok(if holder.is_empty() {
        Ok(())
    } else {
        Err(holder)
    })
}

/// Gives the lease of `keys`' partition up, if `owner` holds it.
pub(crate) async fn release_lease(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
    owner: &str,
) -> Result<(), StoreError> {
    const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
";
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    let script = SCRIPT.get_or_init(|| Script::new(RELEASE_SCRIPT));
    script
        .key(keys.lease())
        .arg(owner)
        .invoke_async::<i64>(connection)
        .await?;
    Ok(())
}

/// What a batch needs to know before it is aggregated.
#[derive(Debug, Default)]
pub struct Prefetched {
    /// For each id asked about, the latest dedupe generation whose set
    /// holds it, if any (same order).
    pub counted_in: Vec<Option<i64>>,
    /// The stored state of the sessions asked about (missing when none).
    pub sessions: foldhash::HashMap<SessionKey, SessionState>,
    /// Round trips made: 0 when there was nothing to ask, else 1.
    pub round_trips: usize,
}

/// One round trip: which of the dedupe `generations` hold each of `ids`, the state of
/// `sessions` (looked up in session epoch `epoch` and the one before; the
/// later write wins), and the values of `buckets` for `mirror`.
pub async fn prefetch(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
    (ids, generations): (&[[u8; 16]], &[i64]),
    sessions: Vec<SessionKey>,
    epoch: i64,
    (mirror, buckets): (&mut Mirror, &[Bucket]),
) -> Result<Prefetched, StoreError> {
    let mut pipe = redis::pipe();
    Mirror::request(&mut pipe, keys, buckets);
    let dedupe_reads = if ids.is_empty() { &[][..] } else { generations };
    for generation in dedupe_reads {
        let command = pipe.cmd("SMISMEMBER").arg(keys.dedupe(*generation));
        for id in ids {
            command.arg(&id[..]);
        }
    }
    let fields: Vec<SessionField> = sessions
        .iter()
        .map(|(user_id, session_id)| SessionField {
            user_id: *user_id,
            session_id,
        })
        .collect();
    if !fields.is_empty() {
        for epoch in [epoch - 1, epoch] {
            pipe.cmd("HMGET").arg(keys.sessions(epoch)).arg(&fields);
        }
    }
    if dedupe_reads.is_empty() && fields.is_empty() && buckets.is_empty() {
        return Ok(Prefetched {
            counted_in: vec![None; ids.len()],
            ..Prefetched::default()
        });
    }
    let mut replies: Vec<redis::Value> = pipe.query_async(connection).await?;
    let rest = replies.split_off(buckets.len() * REPLIES_PER_BUCKET);
    mirror.absorb(keys, buckets, std::mem::replace(&mut replies, rest))?;
    let mut prefetched = Prefetched {
        round_trips: 1,
        ..Prefetched::default()
    };
    let session_replies = if fields.is_empty() {
        Vec::new()
    } else {
        replies.split_off(replies.len() - 2)
    };
    prefetched.counted_in = vec![None; ids.len()];
    for (generation, reply) in dedupe_reads.iter().zip(replies) {
        let members: Vec<bool> = redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
        for (counted_in, member) in prefetched.counted_in.iter_mut().zip(members) {
            if member {
                *counted_in = (*counted_in).max(Some(*generation));
            }
        }
    }
    for (epoch, reply) in [epoch - 1, epoch].into_iter().zip(session_replies) {
        let values: Vec<Option<String>> =
            redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
        for (session, value) in sessions.iter().zip(values) {
            let Some(value) = value else { continue };
            let state = SessionState::decode(&value).ok_or_else(|| StoreError::Corrupt {
                key: keys.sessions(epoch),
                detail: format!("not a session state: {value:?}"),
            })?;
            prefetched.sessions.insert(session.clone(), state);
        }
    }
    Ok(prefetched)
}

/// Everything one commit writes besides the aggregates.
#[derive(Debug, Clone)]
pub struct CommitMeta {
    /// The offset stored before the batch (`None` if none was).
    pub expected_offset: Option<i64>,
    /// The offset after the batch's last record.
    pub next_offset: i64,
    /// Duplicates discarded.
    pub duplicates: i64,
    /// The dedupe ids the batch counted, and the partition's dedupe clock.
    pub dedupe: DedupeWrite,
    /// Dead-lettered records, per reason.
    pub dead_lettered: Vec<(&'static str, i64)>,
    /// Commit time, Unix ms.
    pub now_ms: i64,
}

/// What a commit writes for deduplication (see [`crate::ingest::dedupe`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupeWrite {
    /// The 16-byte ids counted, by dedupe generation (only generations still
    /// read).
    pub counted: BTreeMap<i64, Vec<[u8; 16]>>,
    /// Generations whose sets are no longer read: deleted.
    pub forgotten: Vec<i64>,
    /// The partition's dedupe clock after the batch, Unix ms.
    pub clock_ms: Option<i64>,
}

/// Settings that shape a commit.
#[derive(Debug, Clone, Copy)]
pub struct CommitSettings {
    /// Bucket retentions.
    pub retention: Retention,
    /// How long a session's state is kept after its last event, ms.
    pub session_ttl_ms: i64,
}

/// What a commit cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Redis commands sent, the offset check's included.
    pub commands: usize,
    /// Round trips: the offset check and the transaction, and one more when
    /// the mirror lacked values.
    pub round_trips: usize,
}

/// Applies `batch` and `meta` atomically (see the module's notes on the
/// connection), reading first the values of the buckets it writes that
/// `mirror` does not know. Any failure empties `mirror`.
pub async fn commit(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
    batch: &BatchAggregate,
    meta: &CommitMeta,
    settings: &CommitSettings,
    mirror: &mut Mirror,
) -> Result<Committed, StoreError> {
    let prepared = async {
        let missing = mirror.missing(batch.touched_buckets(), meta.now_ms.div_euclid(1000));
        mirror.load(connection, keys, &missing).await?;
        // Built before the watch, to keep the watched window short.
        let transaction = Transaction::new(keys, batch, meta, settings, mirror)?;
        fence(connection, keys, meta.expected_offset).await?;
        Ok((transaction, usize::from(!missing.is_empty())))
    }
    .await;
    match prepared {
        Ok((transaction, reads)) => {
            let commands = transaction.execute(connection, keys, mirror).await?;
            Ok(Committed {
                commands,
                round_trips: reads + 2,
            })
        }
        Err(error) => {
            mirror.clear();
            Err(error)
        }
    }
}

/// Watches `keys`' state hash and checks that the stored offset is
/// `expected`: the first half of [`commit`].
pub async fn fence(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
    expected: Option<i64>,
) -> Result<(), StoreError> {
    let (stored,): (Option<i64>,) = redis::pipe()
        .cmd("WATCH")
        .arg(keys.state())
        .ignore()
        .hget(keys.state(), state_field::OFFSET)
        .query_async(connection)
        .await?;
    if stored == expected {
        return Ok(());
    }
    redis::cmd("UNWATCH").query_async::<()>(connection).await?;
    let show = |offset: Option<i64>| offset.map(|o| o.to_string()).unwrap_or_default();
    Err(StoreError::Fenced {
        partition: keys.partition(),
        detail: format!(
            "stored offset [{}], batch expected [{}]",
            show(stored),
            show(expected)
        ),
    })
}

/// The writes of one commit, as a `MULTI`/`EXEC` transaction.
pub struct Transaction {
    pipeline: Pipeline,
    commands: usize,
    /// The new values of mirrored keys, for the mirror once applied.
    written: Written,
}

impl Transaction {
    /// The writes of `batch` and `meta`; `mirror` must know every bucket
    /// the batch touches ([`BatchAggregate::touched_buckets`]).
    pub fn new(
        keys: &PartitionKeys,
        batch: &BatchAggregate,
        meta: &CommitMeta,
        settings: &CommitSettings,
        mirror: &Mirror,
    ) -> Result<Self, StoreError> {
        let mut transaction = Self {
            pipeline: redis::pipe(),
            commands: 0,
            written: Written::default(),
        };
        transaction.pipeline.atomic();
        transaction.encode(keys, batch, meta, settings, mirror)?;
        Ok(transaction)
    }

    /// Sends the transaction on the connection that ran [`fence`], and
    /// records its values in `mirror` (emptied if it fails); returns the
    /// number of commands sent, the fence's included.
    pub async fn execute(
        self,
        connection: &mut impl ConnectionLike,
        keys: &PartitionKeys,
        mirror: &mut Mirror,
    ) -> Result<usize, StoreError> {
        // `None` when Redis dropped it: the watched state hash was written.
        // A command that failed fails the query.
        let applied: Result<Option<()>, _> = self.pipeline.query_async(connection).await;
        match applied {
            // The fence's WATCH and HGET, MULTI and EXEC.
            Ok(Some(())) => {
                mirror.apply(self.written);
                Ok(self.commands + 4)
            }
            Ok(None) => {
                mirror.clear();
                Err(StoreError::Fenced {
                    partition: keys.partition(),
                    detail: "the state hash changed between the offset check and the commit".into(),
                })
            }
            Err(error) => {
                mirror.clear();
                Err(error.into())
            }
        }
    }

    fn command(&mut self, name: &str) -> &mut Pipeline {
        self.commands += 1;
        self.pipeline.cmd(name)
    }

    fn expire(&mut self, key: &str, expiry: Expiry) {
        match expiry {
            Expiry::None => {}
            Expiry::At(at) => {
                self.command("EXPIREAT").arg(key).arg(at);
            }
        }
    }

    /// `HINCRBY key field by`, one command a field (for the state hash,
    /// which is not mirrored).
    fn increments(&mut self, key: &str, pairs: impl Iterator<Item = (String, i64)>) {
        for (field, by) in pairs {
            self.command("HINCRBY").arg(key).arg(field).arg(by);
        }
    }

    /// `HSET key field value …` or `ZADD key score member …`,
    /// [`HSET_PAIRS`] pairs a command.
    fn set_pairs<A: redis::ToRedisArgs, B: redis::ToRedisArgs>(
        &mut self,
        command: &str,
        key: &str,
        pairs: &[(A, B)],
        expiry: Expiry,
    ) {
        for chunk in pairs.chunks(HSET_PAIRS) {
            let command = self.command(command).arg(key);
            for (first, second) in chunk {
                command.arg(first).arg(second);
            }
        }
        if !pairs.is_empty() {
            self.expire(key, expiry);
        }
    }

    /// `PFADD` or `SADD key member …`, [`MEMBERS`] members a command.
    fn add_members<M: redis::ToRedisArgs>(
        &mut self,
        command: &str,
        key: &str,
        members: &[M],
        expiry: Expiry,
    ) {
        for chunk in members.chunks(MEMBERS) {
            self.command(command).arg(key).arg(chunk);
        }
        if !members.is_empty() {
            self.expire(key, expiry);
        }
    }

    /// Adds `users` to a user set. A set that does not exist yet is written
    /// whole, with its expiry, by one `SET` ([`hll`]); so is one the mirror
    /// knows the registers of (it wrote it whole), as the union; else
    /// `PFADD`. `NX` for a new set: should it exist after all, this batch's
    /// users of it are lost rather than its earlier ones.
    fn add_users(
        &mut self,
        keys: &PartitionKeys,
        bucket: Bucket,
        set: UserSet,
        users: &HashSet<i64>,
        mirror: &Mirror,
        settings: &CommitSettings,
    ) {
        let key = keys.users(bucket, set);
        let expires_at = settings.retention.expires_at(bucket);
        let added = || hll::registers(users.iter().copied());
        let exists = mirror.has_users(bucket, set);
        // `EXAT` must be positive (`PFADD` and `EXPIREAT` take any time).
        let whole = if expires_at <= 0 {
            None
        } else if !exists {
            Some(added())
        } else {
            mirror
                .user_registers(bucket, set)
                .map(|known| hll::union(known, &added()))
        };
        let encoded = whole.and_then(|registers| {
            hll::encode_sparse(&registers).map(|hyperloglog| (registers, hyperloglog))
        });
        match encoded {
            Some((registers, hyperloglog)) => {
                let command = self.command("SET").arg(&key).arg(hyperloglog);
                if !exists {
                    command.arg("NX");
                }
                command.arg("EXAT").arg(expires_at);
                self.written.user_set(bucket, set, Some(registers));
            }
            None => {
                let users: Vec<i64> = users.iter().copied().collect();
                self.add_members("PFADD", &key, &users, Expiry::At(expires_at));
                self.written.user_set(bucket, set, None);
            }
        }
    }

    /// The transaction's commands, in order: the settled version first (its
    /// script reads Redis's clock at EXEC), then the buckets, the minute
    /// series, the dedupe ids, the sessions and last the state hash.
    fn encode(
        &mut self,
        keys: &PartitionKeys,
        batch: &BatchAggregate,
        meta: &CommitMeta,
        settings: &CommitSettings,
        mirror: &Mirror,
    ) -> Result<(), StoreError> {
        self.settle(keys, batch);
        for granularity in Granularity::ALL {
            for (bucket, changes) in batch.buckets(granularity) {
                if !mirror.knows(bucket) {
                    return Err(StoreError::Corrupt {
                        key: keys.counters(bucket),
                        detail: "written before its values were read".into(),
                    });
                }
                self.bucket(keys, bucket, &changes, mirror, settings);
            }
        }
        self.minute_series(keys, batch, settings);
        self.dedupe_ids(keys, &meta.dedupe);
        self.sessions(keys, batch, meta.now_ms, settings);
        self.state(keys, batch, meta);
        Ok(())
    }

    /// Gives the partition a new settled version if the batch writes a
    /// settled minute (see [`SETTLE_SCRIPT`]).
    fn settle(&mut self, keys: &PartitionKeys, batch: &BatchAggregate) {
        let earliest_minute = batch
            .minutes
            .keys()
            .next()
            .map(ToString::to_string)
            .unwrap_or_default();
        self.command("EVAL")
            .arg(SETTLE_SCRIPT)
            .arg(1)
            .arg(keys.settled_version())
            .arg(earliest_minute)
            .arg(settled::SETTLEMENT_LAG);
    }

    /// A bucket's counters and rankings as their new values (from the
    /// mirror), and its user sets.
    fn bucket(
        &mut self,
        keys: &PartitionKeys,
        bucket: Bucket,
        changes: &BucketChanges,
        mirror: &Mirror,
        settings: &CommitSettings,
    ) {
        let expiry = || Expiry::At(settings.retention.expires_at(bucket));
        let counters: Vec<(Counter, i64)> = changes
            .counters
            .iter()
            .map(|(counter, by)| {
                let value = mirror.counter(bucket, *counter).saturating_add(*by);
                self.written.counter(bucket, *counter, value);
                (*counter, value)
            })
            .collect();
        self.set_pairs("HSET", &keys.counters(bucket), &counters, expiry());
        let mut user_sets: Vec<_> = changes.users.iter().collect();
        user_sets.sort_unstable_by_key(|(set, _)| **set);
        for (set, users) in user_sets {
            self.add_users(keys, bucket, *set, users, mirror, settings);
        }
        let mut rankings: Vec<_> = changes.rankings.iter().collect();
        rankings.sort_unstable_by_key(|(ranking, _)| **ranking);
        for (ranking, scores) in rankings {
            let scores: Vec<(i64, i64)> = scores
                .iter()
                .map(|(product, by)| {
                    let score = mirror.score(bucket, *ranking, *product).saturating_add(*by);
                    self.written.score(bucket, *ranking, *product, score);
                    (score, *product)
                })
                .collect();
            self.set_pairs("ZADD", &keys.ranking(bucket, *ranking), &scores, expiry());
        }
    }

    /// The dense minute series: per day, type and source, the minutes'
    /// counts, one saturating BITFIELD a series.
    fn minute_series(
        &mut self,
        keys: &PartitionKeys,
        batch: &BatchAggregate,
        settings: &CommitSettings,
    ) {
        let mut series: BTreeMap<(i64, i32, i32), Vec<(i64, i64)>> = BTreeMap::new();
        for (minute, changes) in &batch.minutes {
            let (day, index) = super::series_position(*minute);
            for (counter, by) in &changes.counters {
                if let Counter::Events { event_type, source } = *counter {
                    series
                        .entry((day, event_type, source))
                        .or_default()
                        .push((index, *by));
                }
            }
        }
        for ((day, event_type, source), points) in series {
            let key = keys.minute_series(day, event_type, source);
            let command = self
                .command("BITFIELD")
                .arg(&key)
                .arg("OVERFLOW")
                .arg("SAT");
            for (index, by) in points {
                command
                    .arg("INCRBY")
                    .arg("u32")
                    .arg(format!("#{index}"))
                    .arg(by);
            }
            self.expire(&key, Expiry::At(settings.retention.series_expires_at(day)));
        }
    }

    /// The ids counted, into their generations' sets; the sets of the
    /// generations left, deleted.
    fn dedupe_ids(&mut self, keys: &PartitionKeys, dedupe: &DedupeWrite) {
        for generation in &dedupe.forgotten {
            // UNLINK: a window of ids is freed off Redis's main thread.
            self.command("UNLINK").arg(keys.dedupe(*generation));
        }
        for (generation, ids) in &dedupe.counted {
            let ids: Vec<&[u8]> = ids.iter().map(|id| &id[..]).collect();
            self.add_members("SADD", &keys.dedupe(*generation), &ids, Expiry::None);
        }
    }

    /// The sessions' new states, into the current session epoch's hash.
    fn sessions(
        &mut self,
        keys: &PartitionKeys,
        batch: &BatchAggregate,
        now_ms: i64,
        settings: &CommitSettings,
    ) {
        let epoch = super::session_epoch(now_ms, settings.session_ttl_ms);
        let sessions: Vec<(SessionField, &SessionState)> = batch
            .sessions
            .iter()
            .map(|((user_id, session_id), state)| {
                let field = SessionField {
                    user_id: *user_id,
                    session_id,
                };
                (field, state)
            })
            .collect();
        let expires_at = super::session_epoch_expires_at(epoch, settings.session_ttl_ms);
        self.set_pairs(
            "HSET",
            &keys.sessions(epoch),
            &sessions,
            Expiry::At(expires_at),
        );
    }

    /// The pipeline counters, the next offset and the clocks.
    fn state(&mut self, keys: &PartitionKeys, batch: &BatchAggregate, meta: &CommitMeta) {
        let mut counters = vec![
            (state_field::APPLIED.to_owned(), batch.applied),
            (state_field::LATE.to_owned(), batch.late),
            (state_field::DUPLICATES.to_owned(), meta.duplicates),
        ];
        counters.extend(meta.dead_lettered.iter().map(|(reason, count)| {
            (
                format!("{}{reason}", state_field::DEAD_LETTERED_PREFIX),
                *count,
            )
        }));
        counters.retain(|(_, by)| *by != 0);
        let state = keys.state();
        self.increments(&state, counters.into_iter());
        let mut fields = vec![
            (state_field::OFFSET.to_owned(), meta.next_offset.to_string()),
            (
                state_field::LAST_COMMIT_MS.to_owned(),
                meta.now_ms.to_string(),
            ),
        ];
        if let Some(watermark) = batch.watermark_ms {
            fields.push((state_field::WATERMARK_MS.to_owned(), watermark.to_string()));
        }
        if let Some(clock) = meta.dedupe.clock_ms {
            fields.push((state_field::DEDUPE_CLOCK_MS.to_owned(), clock.to_string()));
        }
        self.set_pairs("HSET", &state, &fields, Expiry::None);
    }
}

enum Expiry {
    None,
    At(i64),
}
