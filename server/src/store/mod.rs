//! The metric store in Redis: one place for the key layout ([`keys`]), the
//! atomic commit of an ingest batch ([`commit`]) and the reads the analytics
//! API and the tests make ([`read`]).
//!
//! Layout. Every key of a partition starts with the hash tag
//! `{<namespace>:<partition>}`, so one commit touches one Redis Cluster hash
//! slot and runs unchanged on a cluster. Queries read each partition and merge:
//! counters and rankings add up; unique users are exact to HyperLogLog error
//! when summed, because events are keyed by user id, so a user's events all
//! land on one partition and the partitions' user sets are disjoint.

pub mod aggregate;
pub mod commit;
pub(crate) mod delta_channel;
pub mod hll;
pub(crate) mod id_mirror;
pub mod keys;
pub mod mirror;
pub mod nodes;
pub mod read;
pub(crate) mod session_mirror;
pub mod settled;
pub(crate) mod status;
pub(crate) mod writer;

use std::time::Duration;

/// Size of a time bucket. Buckets are aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day (UTC midnight to midnight).
    Day,
}

impl Granularity {
    /// Every granularity, finest first.
    pub const ALL: [Self; 3] = [Self::Minute, Self::Hour, Self::Day];

    /// Length of a bucket in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3600,
            Self::Day => 86_400,
        }
    }

    /// Start (Unix seconds) of the bucket holding `unix_seconds`. Times
    /// come checked (valid protobuf timestamps, about ±2.6e11 s); one near
    /// `i64::MIN` gives `i64::MIN` rather than overflowing.
    pub fn bucket_start(self, unix_seconds: i64) -> i64 {
        unix_seconds
            .div_euclid(self.seconds())
            .saturating_mul(self.seconds())
    }

    /// Key segment.
    fn code(self) -> &'static str {
        match self {
            Self::Minute => "m",
            Self::Hour => "h",
            Self::Day => "d",
        }
    }
}

/// One bucket: a granularity and its start (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket {
    /// Size.
    pub granularity: Granularity,
    /// Start, Unix seconds, aligned to the granularity.
    pub start: i64,
}

impl Bucket {
    /// The bucket of `granularity` holding `unix_seconds`.
    pub fn containing(granularity: Granularity, unix_seconds: i64) -> Self {
        Self {
            granularity,
            start: granularity.bucket_start(unix_seconds),
        }
    }

    /// The minute, hour and day buckets an event of `minute_start` counts in.
    pub(crate) fn of_minute(minute_start: i64) -> [Self; 3] {
        Granularity::ALL.map(|granularity| Self::containing(granularity, minute_start))
    }
}

/// How long buckets of each granularity are kept after they end.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Minute buckets.
    pub minute: Duration,
    /// Hour buckets.
    pub hour: Duration,
    /// Day buckets.
    pub day: Duration,
}

impl Retention {
    /// The retentions the server is configured with.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            minute: config.minute_retention,
            hour: config.hour_retention,
            day: config.day_retention,
        }
    }

    /// The retention of `granularity`.
    pub(crate) fn of(&self, granularity: Granularity) -> Duration {
        match granularity {
            Granularity::Minute => self.minute,
            Granularity::Hour => self.hour,
            Granularity::Day => self.day,
        }
    }

    /// When (Unix seconds) `bucket` expires: its end plus its retention. Event
    /// time, not processing time, so replaying the same events sets the same
    /// expiry.
    pub(crate) fn expires_at(&self, bucket: Bucket) -> i64 {
        let retention = i64::try_from(self.of(bucket.granularity).as_secs()).unwrap_or(i64::MAX);
        bucket
            .start
            .saturating_add(bucket.granularity.seconds())
            .saturating_add(retention)
    }

    /// When (Unix seconds) the minute series of the day starting at
    /// `day_start` expires: when its last minute does.
    pub(crate) fn series_expires_at(&self, day_start: i64) -> i64 {
        self.expires_at(Bucket::containing(
            Granularity::Minute,
            day_start + Granularity::Day.seconds() - 1,
        ))
    }
}

/// Where a minute sits in the dense minute series (see
/// [`keys::PartitionKeys::minute_series`]): the start of its UTC day and its
/// index in the day.
pub(crate) fn series_position(minute_start: i64) -> (i64, i64) {
    let day = Granularity::Day.bucket_start(minute_start);
    (day, (minute_start - day) / Granularity::Minute.seconds())
}

/// The session epoch holding `now_ms` (processing time) for sessions kept
/// `ttl_ms`: session states are written to their epoch's hash, one command
/// per commit, and read from the current and the previous epoch's.
pub fn session_epoch(now_ms: i64, ttl_ms: i64) -> i64 {
    now_ms.div_euclid(ttl_ms.max(1))
}

/// When (Unix seconds) the session hash of `epoch` expires: two epochs after
/// its start, so a state written at its very end is still kept `ttl_ms`.
pub(crate) fn session_epoch_expires_at(epoch: i64, ttl_ms: i64) -> i64 {
    epoch
        .saturating_add(2)
        .saturating_mul(ttl_ms.max(1))
        .div_euclid(1000)
        + 1
}

/// An additive counter of a bucket (a field of its counter hash). Enum values
/// are the raw protobuf numbers of `EventType` and `Source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Events of a type from a source.
    Events {
        /// `EventType` number.
        event_type: i32,
        /// `Source` number.
        source: i32,
    },
    /// Events of a type from a source on a product.
    ProductEvents {
        /// `EventType` number.
        event_type: i32,
        /// `Source` number.
        source: i32,
        /// Product id.
        product: i64,
    },
    /// Items (quantity) of cart and purchase events on a product.
    Quantity {
        /// `EventType` number.
        event_type: i32,
        /// `Source` number.
        source: i32,
        /// Product id.
        product: i64,
    },
    /// Dwell time of product views of a product, microseconds.
    Dwell {
        /// `Source` number.
        source: i32,
        /// Product id.
        product: i64,
    },
    /// Dwell time of every product view from a source, microseconds.
    TotalDwell {
        /// `Source` number.
        source: i32,
    },
    /// Revenue of purchases from a source, millionths of the currency unit.
    Revenue {
        /// `Source` number.
        source: i32,
    },
    /// Revenue of purchases of a product, millionths of the currency unit.
    ProductRevenue {
        /// `Source` number.
        source: i32,
        /// Product id.
        product: i64,
    },
    /// Events that arrived after their partition had seen a later minute.
    Late,
    /// Sessions that started in the bucket.
    Sessions {
        /// `Source` number.
        source: i32,
    },
    /// Total length of those sessions, milliseconds (last minus first event).
    SessionLength {
        /// `Source` number.
        source: i32,
    },
    /// Events of those sessions.
    SessionEvents {
        /// `Source` number.
        source: i32,
    },
    /// Sessions started in the bucket that reached a funnel stage.
    Funnel {
        /// The stage.
        stage: FunnelStage,
        /// `Source` number.
        source: i32,
    },
}

impl Counter {
    /// The field of the bucket's counter hash (see its [`Display`]).
    ///
    /// [`Display`]: std::fmt::Display
    pub fn field(&self) -> String {
        self.to_string()
    }

    /// The counter a field of a counter hash stands for; `None` for a field
    /// this version does not write.
    pub(crate) fn parse(field: &str) -> Option<Self> {
        let parts: Vec<&str> = field.split(':').collect();
        let int = |i: usize| parts.get(i)?.parse::<i32>().ok();
        let long = |i: usize| parts.get(i)?.parse::<i64>().ok();
        let counter = match parts[0] {
            "e" => Self::Events {
                event_type: int(1)?,
                source: int(2)?,
            },
            "pe" => Self::ProductEvents {
                event_type: int(1)?,
                source: int(2)?,
                product: long(3)?,
            },
            "q" => Self::Quantity {
                event_type: int(1)?,
                source: int(2)?,
                product: long(3)?,
            },
            "dw" => Self::Dwell {
                source: int(1)?,
                product: long(2)?,
            },
            "tdw" => Self::TotalDwell { source: int(1)? },
            "r" => Self::Revenue { source: int(1)? },
            "pr" => Self::ProductRevenue {
                source: int(1)?,
                product: long(2)?,
            },
            "late" => Self::Late,
            "s" => Self::Sessions { source: int(1)? },
            "sl" => Self::SessionLength { source: int(1)? },
            "se" => Self::SessionEvents { source: int(1)? },
            "f" => Self::Funnel {
                stage: FunnelStage::ALL
                    .into_iter()
                    .find(|stage| parts.get(1) == Some(&stage.code()))?,
                source: int(2)?,
            },
            _ => return None,
        };
        // Round trip: rejects extra parts and non-canonical numbers.
        (counter.to_string() == field).then_some(counter)
    }
}

/// The field of the bucket's counter hash.
impl std::fmt::Display for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Events { event_type, source } => write!(f, "e:{event_type}:{source}"),
            Self::ProductEvents {
                event_type,
                source,
                product,
            } => write!(f, "pe:{event_type}:{source}:{product}"),
            Self::Quantity {
                event_type,
                source,
                product,
            } => write!(f, "q:{event_type}:{source}:{product}"),
            Self::Dwell { source, product } => write!(f, "dw:{source}:{product}"),
            Self::TotalDwell { source } => write!(f, "tdw:{source}"),
            Self::Revenue { source } => write!(f, "r:{source}"),
            Self::ProductRevenue { source, product } => write!(f, "pr:{source}:{product}"),
            Self::Late => f.write_str("late"),
            Self::Sessions { source } => write!(f, "s:{source}"),
            Self::SessionLength { source } => write!(f, "sl:{source}"),
            Self::SessionEvents { source } => write!(f, "se:{source}"),
            Self::Funnel { stage, source } => write!(f, "f:{}:{source}", stage.code()),
        }
    }
}

/// A counter is sent to Redis as its field, written straight into the
/// command.
impl redis::ToRedisArgs for Counter {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

/// A stage of the purchase funnel a session can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FunnelStage {
    /// Viewed a product.
    ProductView,
    /// Added a product to the cart.
    AddToCart,
    /// Bought.
    Purchase,
}

impl FunnelStage {
    /// Every stage, in funnel order.
    pub(crate) const ALL: [Self; 3] = [Self::ProductView, Self::AddToCart, Self::Purchase];

    /// The stage's bit in a session's set of reached stages.
    pub(crate) fn bit(self) -> u8 {
        match self {
            Self::ProductView => 1,
            Self::AddToCart => 2,
            Self::Purchase => 4,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Self::ProductView => "v",
            Self::AddToCart => "c",
            Self::Purchase => "b",
        }
    }
}

/// A set of unique users of a bucket (a HyperLogLog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserSet {
    /// Every user with an event.
    All,
    /// Users with an event from a source (`Source` number).
    Source(i32),
    /// Users with an event on a product.
    Product(i64),
}

/// A product ranking of a bucket (a sorted set of product ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ranking {
    /// By product views.
    Views,
    /// By items added to carts.
    AddToCarts,
    /// By items purchased.
    Purchases,
    /// By revenue, millionths of the currency unit.
    Revenue,
}

impl Ranking {
    /// Every ranking.
    pub(crate) const ALL: [Self; 4] = [
        Self::Views,
        Self::AddToCarts,
        Self::Purchases,
        Self::Revenue,
    ];
}

/// Errors of the metric store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Another consumer committed this partition since its state was read:
    /// the batch was not applied.
    #[error("partition {partition} was committed by another consumer ({detail})")]
    Fenced {
        /// The partition.
        partition: i32,
        /// What Redis said.
        detail: String,
    },
    /// The Redis Cluster's slot map cannot be read or lacks a slot.
    #[error("redis cluster: {detail}")]
    Cluster {
        /// What is wrong.
        detail: String,
    },
    /// A stored value is not what RTAP writes.
    #[error("corrupt value in {key}: {detail}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

impl StoreError {
    /// Whether Redis could not be reached (as opposed to answering).
    pub(crate) fn is_unavailable(&self) -> bool {
        match self {
            Self::Redis(error) => {
                error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout()
            }
            _ => false,
        }
    }
}

/// A store failure as the API reports it: UNAVAILABLE while Redis cannot
/// be reached, INTERNAL otherwise.
impl From<StoreError> for crate::error::Error {
    fn from(error: StoreError) -> Self {
        if error.is_unavailable() {
            crate::error::Error::Unavailable {
                dependency: "redis",
                reason: error.to_string(),
            }
        } else {
            crate::error::Error::Internal(error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_state_is_kept_one_to_two_ttls_after_its_last_write() {
        let ttl = 600_000;
        for written in [1_200_000, 1_500_000, 1_799_999] {
            let epoch = session_epoch(written, ttl);
            assert_eq!(epoch, 2);
            let expires_ms = session_epoch_expires_at(epoch, ttl) * 1000;
            assert!(expires_ms >= written + ttl, "{written}");
            assert!(expires_ms <= written + 2 * ttl + 1000, "{written}");
            // Read from the current and the previous epoch until then.
            for read in [written, written + ttl - 1] {
                let current = session_epoch(read, ttl);
                assert!(current == epoch || current - 1 == epoch, "{read}");
            }
        }
        assert_eq!(session_epoch(-1, ttl), -1);
    }

    #[test]
    fn every_counter_field_parses_back_and_nothing_else_does() {
        let counters = one_counter_of_each_kind();
        for counter in counters {
            assert_eq!(Counter::parse(&counter.field()), Some(counter), "{counter}");
        }
        for field in [
            "",
            "e",
            "e:1",
            "e:1:2:3",
            "e:01:2",
            "pe:1:2",
            "x:1",
            "late:1",
            "f:z:1",
            "f:v:1:2",
            "s:99999999999",
            "dw:1:2:",
        ] {
            assert_eq!(Counter::parse(field), None, "{field}");
        }
    }

    #[test]
    fn buckets_align_to_utc_including_before_the_epoch() {
        assert_eq!(Granularity::Minute.bucket_start(125), 120);
        assert_eq!(Granularity::Hour.bucket_start(7199), 3600);
        assert_eq!(Granularity::Day.bucket_start(-1), -86_400);
    }

    #[test]
    fn expiry_is_the_bucket_end_plus_retention() {
        let retention = Retention {
            minute: Duration::from_secs(100),
            hour: Duration::from_secs(200),
            day: Duration::from_secs(300),
        };
        assert_eq!(
            retention.expires_at(Bucket::containing(Granularity::Minute, 61)),
            220
        );
        assert_eq!(
            retention.expires_at(Bucket::containing(Granularity::Day, 5)),
            86_700
        );
        // A day's minute series lives as long as its last minute.
        assert_eq!(retention.series_expires_at(86_400), 2 * 86_400 + 100);
    }

    #[test]
    fn minutes_sit_in_their_utc_day_of_the_series() {
        assert_eq!(series_position(0), (0, 0));
        assert_eq!(series_position(86_400 + 59 * 60), (86_400, 59));
        assert_eq!(series_position(86_400 - 60), (0, 1439));
        assert_eq!(series_position(-60), (-86_400, 1439));
    }

    #[test]
    fn counter_fields_are_distinct() {
        let counters = one_counter_of_each_kind();
        let fields: std::collections::HashSet<_> = counters.iter().map(Counter::field).collect();
        assert_eq!(fields.len(), counters.len());
    }

    fn one_counter_of_each_kind() -> Vec<Counter> {
        vec![
            Counter::Events {
                event_type: 1,
                source: 2,
            },
            Counter::ProductEvents {
                event_type: 1,
                source: 2,
                product: 5_000_000_000,
            },
            Counter::Quantity {
                event_type: 1,
                source: 2,
                product: 3,
            },
            Counter::Dwell {
                source: 1,
                product: 2,
            },
            Counter::TotalDwell { source: 1 },
            Counter::Revenue { source: 1 },
            Counter::ProductRevenue {
                source: 1,
                product: 2,
            },
            Counter::Late,
            Counter::Sessions { source: 1 },
            Counter::SessionLength { source: 1 },
            Counter::SessionEvents { source: 1 },
            Counter::Funnel {
                stage: FunnelStage::ProductView,
                source: 1,
            },
            Counter::Funnel {
                stage: FunnelStage::Purchase,
                source: 1,
            },
        ]
    }
}
