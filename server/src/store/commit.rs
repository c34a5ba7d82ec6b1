//! The exactly-once write of an ingest batch.
//!
//! A batch's aggregates, its dedupe ids, its sessions, the pipeline counters
//! and the partition's next offset are written by one Lua script, which first
//! checks that the stored offset is still the one the batch started from. So
//! a batch is applied entirely or not at all, and at most once: a consumer
//! that crashed before the script ran re-reads the batch from the stored
//! offset; one that crashed after it, or whose reply was lost, finds the
//! offset moved and resumes from it. A second consumer of the same partition
//! can only ever lose this race (`RTAP_FENCED`), never double-count.

use std::collections::{BTreeMap, HashMap};

use redis::{Script, aio::ConnectionLike};

use super::{
    Counter, Granularity, Retention, StoreError,
    keys::{PartitionKeys, session_field, state_field},
    settled,
};
use crate::ingest::aggregate::{BatchAggregate, SessionKey, SessionState};

/// The commit script. KEYS[1] is the state hash, KEYS[2] the settled
/// version; ARGV[1] the offset the batch expects stored ('' for none), ARGV[2]
/// the batch's earliest minute ('' for none), ARGV[3] the settlement lag;
/// then operations, each
/// `op, key index, count, expiry kind ('a' at / 'p' in ms / '-'), expiry`,
/// followed by its `count` members or field/value pairs. Ops: `h` HINCRBY,
/// `f` HSET (500 pairs a command), `z` ZINCRBY, `b` BITFIELD INCRBY of the
/// `u32` at a minute index (saturating), `p` PFADD, `s` SADD.
///
/// A batch that writes a minute before the settlement horizon (by Redis's
/// clock, as in [`settled::horizon`]) gives the partition a new settled
/// version, which drops every cached union of settled buckets.
const COMMIT_SCRIPT: &str = r"#!lua
local stored = redis.call('HGET', KEYS[1], 'offset') or ''
if stored ~= ARGV[1] then
  return redis.error_reply('RTAP_FENCED stored offset [' .. stored .. '], batch expected [' .. ARGV[1] .. ']')
end
local now = redis.call('TIME')
local horizon = now[1] - now[1] % 3600 - tonumber(ARGV[3])
local version = redis.call('GET', KEYS[2])
if not version or (ARGV[2] ~= '' and tonumber(ARGV[2]) < horizon) then
  local n = tonumber(string.match(version or '0', '^%d+') or '0') + 1
  redis.call('SET', KEYS[2], n .. ':' .. now[1] .. '.' .. now[2])
end
local i, last = 4, #ARGV
while i <= last do
  local op, key, n = ARGV[i], KEYS[tonumber(ARGV[i + 1])], tonumber(ARGV[i + 2])
  local expiry, expiry_value = ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  if op == 'h' then
    for j = i, i + 2 * n - 1, 2 do redis.call('HINCRBY', key, ARGV[j], ARGV[j + 1]) end
    i = i + 2 * n
  elseif op == 'f' then
    for j = i, i + 2 * n - 1, 1000 do
      redis.call('HSET', key, unpack(ARGV, j, math.min(j + 999, i + 2 * n - 1)))
    end
    i = i + 2 * n
  elseif op == 'z' then
    for j = i, i + 2 * n - 1, 2 do redis.call('ZINCRBY', key, ARGV[j + 1], ARGV[j]) end
    i = i + 2 * n
  elseif op == 'b' then
    for j = i, i + 2 * n - 1, 2 do
      redis.call('BITFIELD', key, 'OVERFLOW', 'SAT', 'INCRBY', 'u32', '#' .. ARGV[j], ARGV[j + 1])
    end
    i = i + 2 * n
  elseif op == 'p' or op == 's' then
    local command = (op == 'p') and 'PFADD' or 'SADD'
    for j = i, i + n - 1, 1000 do
      redis.call(command, key, unpack(ARGV, j, math.min(j + 999, i + n - 1)))
    end
    i = i + n
  else
    return redis.error_reply('RTAP_BAD_OP ' .. tostring(op))
  end
  if expiry == 'a' then
    redis.call('EXPIREAT', key, expiry_value)
  elseif expiry == 'p' then
    redis.call('PEXPIRE', key, expiry_value)
  end
end
return 'OK'
";

/// The error code the script returns when the offset moved.
const FENCED: &str = "RTAP_FENCED";

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

/// Records that `keys`' partition is consumed, for readers to merge it.
pub async fn register_partition(
    connection: &mut impl ConnectionLike,
    namespace: &str,
    keys: &PartitionKeys,
) -> Result<(), StoreError> {
    redis::cmd("SADD")
        .arg(super::keys::partitions(namespace))
        .arg(keys.partition())
        .query_async::<()>(connection)
        .await?;
    Ok(())
}

/// Takes or renews the lease of `keys`' partition for `owner`, valid for
/// `ttl`. Returns the current holder when another process holds it.
pub async fn take_lease(
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
pub async fn release_lease(
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
    /// For each id asked about, whether it was seen already (same order).
    pub seen: Vec<bool>,
    /// The stored state of the sessions asked about (missing when none).
    pub sessions: HashMap<SessionKey, SessionState>,
}

/// One round trip: which of `ids` (grouped by event minute) were already
/// counted, and the state of `sessions` (looked up in session epoch `epoch`
/// and the one before; the later write wins).
pub async fn prefetch(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
    ids_by_minute: &[(i64, Vec<[u8; 16]>)],
    sessions: Vec<SessionKey>,
    epoch: i64,
) -> Result<Prefetched, StoreError> {
    let mut pipe = redis::pipe();
    for (minute, ids) in ids_by_minute {
        let command = pipe.cmd("SMISMEMBER").arg(keys.seen(*minute));
        for id in ids {
            command.arg(&id[..]);
        }
    }
    let fields: Vec<String> = sessions
        .iter()
        .map(|(user, session)| session_field(*user, session))
        .collect();
    if !fields.is_empty() {
        for epoch in [epoch - 1, epoch] {
            pipe.cmd("HMGET").arg(keys.sessions(epoch)).arg(&fields);
        }
    }
    if ids_by_minute.is_empty() && fields.is_empty() {
        return Ok(Prefetched::default());
    }
    let mut replies: Vec<redis::Value> = pipe.query_async(connection).await?;
    let mut prefetched = Prefetched::default();
    let session_replies = if fields.is_empty() {
        Vec::new()
    } else {
        replies.split_off(replies.len() - 2)
    };
    for reply in replies {
        let flags: Vec<bool> = redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
        prefetched.seen.extend(flags);
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
    /// Dead-lettered records, per reason.
    pub dead_lettered: Vec<(&'static str, i64)>,
    /// Commit time, Unix ms.
    pub now_ms: i64,
}

/// Settings that shape a commit.
#[derive(Debug, Clone, Copy)]
pub struct CommitSettings {
    /// Bucket retentions.
    pub retention: Retention,
    /// How long dedupe ids are kept, ms.
    pub dedupe_window_ms: i64,
    /// How long a session's state is kept after its last event, ms.
    pub session_ttl_ms: i64,
}

/// Applies `batch` and `meta` atomically; returns the number of Redis
/// commands the script ran.
pub async fn commit(
    connection: &mut impl ConnectionLike,
    keys: &PartitionKeys,
    batch: &BatchAggregate,
    meta: &CommitMeta,
    settings: &CommitSettings,
) -> Result<usize, StoreError> {
    let script = commit_script();
    let mut invocation = script.prepare_invoke();
    let commands = encode(&mut invocation, keys, batch, meta, settings);
    match invocation.invoke_async::<()>(connection).await {
        Ok(()) => Ok(commands),
        Err(error) if error.code() == Some(FENCED) => Err(StoreError::Fenced {
            partition: keys.partition(),
            detail: error.detail().unwrap_or_default().to_owned(),
        }),
        Err(error) => Err(error.into()),
    }
}

fn commit_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(COMMIT_SCRIPT))
}

/// Builds the script's keys and arguments; counts the commands it will run.
struct Encoder<'a, 'b> {
    invocation: &'a mut redis::ScriptInvocation<'b>,
    keys: usize,
    commands: usize,
}

enum Expiry {
    None,
    At(i64),
    InMillis(i64),
}

impl Encoder<'_, '_> {
    fn op(&mut self, op: &str, key: String, count: usize, expiry: Expiry) {
        self.invocation.key(key);
        self.keys += 1;
        let (kind, value) = match expiry {
            Expiry::None => ("-", 0),
            Expiry::At(at) => ("a", at),
            Expiry::InMillis(ms) => ("p", ms),
        };
        self.invocation
            .arg(op)
            .arg(self.keys)
            .arg(count)
            .arg(kind)
            .arg(value);
        if kind != "-" {
            self.commands += 1;
        }
    }

    fn pairs<V: redis::ToRedisArgs>(
        &mut self,
        op: &str,
        key: String,
        pairs: impl ExactSizeIterator<Item = (String, V)>,
        expiry: Expiry,
    ) {
        let count = pairs.len();
        if count == 0 {
            return;
        }
        self.op(op, key, count, expiry);
        for (field, value) in pairs {
            self.invocation.arg(field).arg(value);
        }
        self.commands += if op == "f" {
            count.div_ceil(500)
        } else {
            count
        };
    }

    fn members<M: redis::ToRedisArgs>(
        &mut self,
        op: &str,
        key: String,
        members: impl ExactSizeIterator<Item = M>,
        expiry: Expiry,
    ) {
        let count = members.len();
        if count == 0 {
            return;
        }
        self.op(op, key, count, expiry);
        for member in members {
            self.invocation.arg(member);
        }
        self.commands += count.div_ceil(1000);
    }
}

fn encode(
    invocation: &mut redis::ScriptInvocation<'_>,
    keys: &PartitionKeys,
    batch: &BatchAggregate,
    meta: &CommitMeta,
    settings: &CommitSettings,
) -> usize {
    invocation.key(keys.state());
    invocation.key(keys.settled_version());
    invocation
        .arg(
            meta.expected_offset
                .map(|o| o.to_string())
                .unwrap_or_default(),
        )
        .arg(
            batch
                .minutes
                .keys()
                .next()
                .map(ToString::to_string)
                .unwrap_or_default(),
        )
        .arg(settled::SETTLEMENT_LAG);
    // The fence's HGET, TIME and the settled version's GET.
    let mut encoder = Encoder {
        invocation,
        keys: 2,
        commands: 3,
    };

    for granularity in Granularity::ALL {
        for (bucket, changes) in batch.buckets(granularity) {
            let expiry = || Expiry::At(settings.retention.expires_at(bucket));
            encoder.pairs(
                "h",
                keys.counters(bucket),
                changes.counters.iter().map(|(c, by)| (c.field(), *by)),
                expiry(),
            );
            let mut user_sets: Vec<_> = changes.users.iter().collect();
            user_sets.sort_unstable_by_key(|(set, _)| **set);
            for (set, users) in user_sets {
                encoder.members("p", keys.users(bucket, *set), users.iter(), expiry());
            }
            let mut rankings: Vec<_> = changes.rankings.iter().collect();
            rankings.sort_unstable_by_key(|(ranking, _)| **ranking);
            for (ranking, scores) in rankings {
                encoder.pairs(
                    "z",
                    keys.ranking(bucket, *ranking),
                    scores.iter().map(|(p, by)| (p.to_string(), *by)),
                    expiry(),
                );
            }
        }
    }
    // The dense minute series: per day, type and source, the minutes' counts.
    let mut series: BTreeMap<(i64, i32, i32), Vec<(String, i64)>> = BTreeMap::new();
    for (minute, changes) in &batch.minutes {
        let (day, index) = super::series_position(*minute);
        for (counter, by) in &changes.counters {
            if let Counter::Events { event_type, source } = *counter {
                series
                    .entry((day, event_type, source))
                    .or_default()
                    .push((index.to_string(), *by));
            }
        }
    }
    for ((day, event_type, source), points) in series {
        encoder.pairs(
            "b",
            keys.minute_series(day, event_type, source),
            points.into_iter(),
            Expiry::At(settings.retention.series_expires_at(day)),
        );
    }
    for (minute, ids) in &batch.seen {
        encoder.members(
            "s",
            keys.seen(*minute),
            ids.iter().map(|id| &id[..]),
            Expiry::InMillis(settings.dedupe_window_ms),
        );
    }
    let epoch = super::session_epoch(meta.now_ms, settings.session_ttl_ms);
    encoder.pairs(
        "f",
        keys.sessions(epoch),
        batch
            .sessions
            .iter()
            .map(|((user, session), state)| (session_field(*user, session), state.encode())),
        Expiry::At(super::session_epoch_expires_at(
            epoch,
            settings.session_ttl_ms,
        )),
    );

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
    encoder.pairs("h", keys.state(), counters.into_iter(), Expiry::None);
    let mut fields = vec![
        (state_field::OFFSET.to_owned(), meta.next_offset),
        (state_field::LAST_COMMIT_MS.to_owned(), meta.now_ms),
    ];
    if let Some(watermark) = batch.watermark_ms {
        fields.push((state_field::WATERMARK_MS.to_owned(), watermark));
    }
    encoder.pairs("f", keys.state(), fields.into_iter(), Expiry::None);
    encoder.commands
}
