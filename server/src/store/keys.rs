//! Redis key names. Every key RTAP writes is named here and nowhere else.
//!
//! Per partition `P` = `{<namespace>:<partition>}`:
//! - `P:lease`: the id of the process consuming the partition (expires unless
//!   renewed), so two consumers or a rebuild never run at once;
//! - `P:state`: hash; the next offset to read and the pipeline's counters
//!   (see [`state_field`]);
//! - `P:dedupe:<generation>`: set of the 16-byte `event_id`s counted in that
//!   generation of the partition's dedupe clock (see
//!   [`crate::ingest::dedupe`]); only the current generation's and the one
//!   before exist, older ones are deleted by the commit that leaves them;
//! - `P:sess:<epoch>`: hash of the states of the sessions last written in
//!   that epoch of processing time (a session TTL long), by
//!   `<user>:<session_id>`; it expires two epochs after its start, so a
//!   state is kept one to two TTLs after its last write (see
//!   [`super::session_epoch`]);
//! - `P:settled`: the partition's settled version, changed by every commit
//!   that writes a settled minute (see [`super::settled`]);
//! - `P:<g>:<start>:n`: hash of a bucket's [`Counter`](super::Counter)s, `g`
//!   being `m`, `h` or `d` and `start` the bucket's Unix start second;
//! - `P:<g>:<start>:u`, `…:u:s<source>`, `…:u:p<product>`: HyperLogLogs of
//!   the bucket's users;
//! - `P:<g>:<start>:top:<v|c|b|r>`: sorted sets of products by views,
//!   add-to-carts, purchases and revenue;
//! - `P:series:<day>:<type>:<source>`: the dense minute series of one event
//!   type from one source over the UTC day starting at `day` (Unix seconds):
//!   a string of big-endian `u32` counts, one per minute of the day, written
//!   with `BITFIELD` (see [`PartitionKeys::minute_series`]).
//!
//! Bucket keys expire at the bucket's end plus its retention; a day's minute
//! series at the day's end plus the minute retention.

use super::{Bucket, Ranking, UserSet};

/// Fields of a partition's state hash.
pub(crate) mod state_field {
    /// Offset of the next record to read.
    pub(crate) const OFFSET: &str = "offset";
    /// Latest event time applied, Unix milliseconds.
    pub(crate) const WATERMARK_MS: &str = "watermark_ms";
    /// Events counted.
    pub(crate) const APPLIED: &str = "applied";
    /// Records discarded as duplicates of an earlier `event_id`.
    pub(crate) const DUPLICATES: &str = "duplicates";
    /// The partition's dedupe clock: the latest Kafka record timestamp read,
    /// Unix milliseconds (see [`crate::ingest::dedupe`]).
    pub(crate) const DEDUPE_CLOCK_MS: &str = "dedupe_clock_ms";
    /// Events counted that were late.
    pub(crate) const LATE: &str = "late";
    /// Prefix of the dead-letter counters, one per reason.
    pub(crate) const DEAD_LETTERED_PREFIX: &str = "dead:";
    /// When the last commit happened, Unix milliseconds.
    pub(crate) const LAST_COMMIT_MS: &str = "last_commit_ms";
}

/// The events topic's partition count the metrics of `namespace` were built
/// from (see `store::commit::check_topic_partitions`).
pub fn topic_partitions(namespace: &str) -> String {
    format!("{namespace}:topic_partitions")
}

/// The set of partition numbers that ingest has consumed in `namespace`
/// (added by each partition's consumer when it starts), so readers know
/// which partitions to merge without asking Kafka.
pub(crate) fn partitions(namespace: &str) -> String {
    format!("{namespace}:partitions")
}

/// A session's field in its epoch's hash ([`PartitionKeys::sessions`]):
/// `{user_id}:{session_id}`. A command takes it as an argument without an
/// intermediate `String` (a commit writes thousands).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionField<'a> {
    /// The session's user.
    pub(crate) user_id: i64,
    /// The client's session id.
    pub(crate) session_id: &'a str,
}

impl std::fmt::Display for SessionField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.user_id, self.session_id)
    }
}

impl redis::ToRedisArgs for SessionField<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

/// The keys of one partition.
#[derive(Debug, Clone)]
pub struct PartitionKeys {
    partition: i32,
    prefix: String,
}

impl PartitionKeys {
    /// The keys of `partition` in `namespace`.
    pub fn new(namespace: &str, partition: i32) -> Self {
        Self {
            partition,
            prefix: format!("{{{namespace}:{partition}}}:"),
        }
    }

    /// The partition.
    pub(crate) fn partition(&self) -> i32 {
        self.partition
    }

    /// Who consumes the partition: the owner's id, expiring unless renewed.
    pub fn lease(&self) -> String {
        format!("{}lease", self.prefix)
    }

    /// The shard channel of the partition's commit deltas (see
    /// `store::delta_channel`).
    pub fn deltas(&self) -> String {
        format!("{}deltas", self.prefix)
    }

    /// The state hash.
    pub fn state(&self) -> String {
        format!("{}state", self.prefix)
    }

    /// The event ids counted in dedupe generation `generation`.
    pub(crate) fn dedupe(&self, generation: i64) -> String {
        format!("{}dedupe:{generation}", self.prefix)
    }

    /// The session states last written in session epoch `epoch`.
    pub fn sessions(&self, epoch: i64) -> String {
        format!("{}sess:{epoch}", self.prefix)
    }

    /// The settled version: `<n>:<seconds>.<micros>`, Redis's time when a
    /// commit last wrote a settled minute (or first wrote the partition), so
    /// a version never repeats, even after the partition's keys are deleted.
    pub fn settled_version(&self) -> String {
        format!("{}settled", self.prefix)
    }

    /// A bucket's counter hash.
    pub fn counters(&self, bucket: Bucket) -> String {
        format!("{}:n", self.bucket(bucket))
    }

    /// A bucket's unique-user HyperLogLog.
    pub(crate) fn users(&self, bucket: Bucket, set: UserSet) -> String {
        match set {
            UserSet::All => format!("{}:u", self.bucket(bucket)),
            UserSet::Source(source) => format!("{}:u:s{source}", self.bucket(bucket)),
            UserSet::Product(product) => format!("{}:u:p{product}", self.bucket(bucket)),
        }
    }

    /// A bucket's product ranking.
    pub fn ranking(&self, bucket: Bucket, ranking: Ranking) -> String {
        let code = match ranking {
            Ranking::Views => "v",
            Ranking::AddToCarts => "c",
            Ranking::Purchases => "b",
            Ranking::Revenue => "r",
        };
        format!("{}:top:{code}", self.bucket(bucket))
    }

    /// The dense minute series of events of `event_type` from `source` over
    /// the UTC day starting at `day_start`. The same counts are in the minute
    /// buckets' counter hashes; this copy exists so that a day of minutes is
    /// one `GETRANGE` instead of 1440 `HMGET`s (the 24-hour minute series is
    /// the dashboards' most common query).
    pub(crate) fn minute_series(&self, day_start: i64, event_type: i32, source: i32) -> String {
        format!("{}series:{day_start}:{event_type}:{source}", self.prefix)
    }

    /// The pattern matching every key of the partition (for `rebuild` and
    /// tests).
    pub fn pattern(&self) -> String {
        // The braces of the hash tag are glob-special: escape them.
        format!("{}*", self.prefix.replace('{', "\\{").replace('}', "\\}"))
    }

    fn bucket(&self, bucket: Bucket) -> String {
        format!(
            "{}{}:{}",
            self.prefix,
            bucket.granularity.code(),
            bucket.start
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Granularity;

    #[test]
    fn every_key_of_a_partition_shares_its_hash_tag() {
        let keys = PartitionKeys::new("rtap", 3);
        let bucket = Bucket::containing(Granularity::Hour, 7300);
        for key in [
            keys.state(),
            keys.dedupe(3),
            keys.sessions(7),
            keys.settled_version(),
            keys.counters(bucket),
            keys.users(bucket, UserSet::Product(9)),
            keys.ranking(bucket, Ranking::Revenue),
            keys.minute_series(86_400, 2, 1),
        ] {
            assert!(key.starts_with("{rtap:3}:"), "{key}");
        }
        assert_eq!(keys.counters(bucket), "{rtap:3}:h:7200:n");
        assert_eq!(keys.pattern(), "\\{rtap:3\\}:*");
    }
}
