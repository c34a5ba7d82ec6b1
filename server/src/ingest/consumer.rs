//! The Kafka → Redis pipeline: one consumer task per partition of the
//! interactions topic.
//!
//! Each task resumes from the offset stored in Redis, fetches record batches
//! (one fetch ahead of the commit, so at most two fetches of
//! `--fetch-max-bytes` are in memory per partition), and for every chunk of at
//! most `--commit-max-events` records:
//! 1. decodes and validates each record; rejects go to the dead-letter topic;
//! 2. reads, in one round trip, which event ids were counted already, the
//!    state of the sessions concerned that the partition's [`SessionMirror`]
//!    lacks, and the current values of the buckets the events fall in that
//!    its [`Mirror`] lacks;
//! 3. folds the new events in memory ([`BatchAggregate`]);
//! 4. commits aggregates (counters and rankings as their new values, from
//!    the mirror), dedupe ids, sessions, counters and the next offset in one
//!    transaction, fenced on the stored offset ([`store::commit`]);
//! 5. hands a [`CommitDelta`](rtap::v1::CommitDelta) to the publisher, which
//!    can drop it but never delays the partition.
//!
//! Any failure (Kafka, Redis, a commit fenced by another consumer) drops the
//! task's clients and state and starts over from the stored offset after a
//! backoff: simple, and exactly once by construction.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use prost::Message;
use redis::{AsyncConnectionConfig, aio::MultiplexedConnection};
use rskafka::{
    client::{
        error::{Error as KafkaError, ProtocolError},
        partition::{OffsetAt, PartitionClient, UnknownTopicHandling},
    },
    record::RecordAndOffset,
};
use rtap::kafka::admin::ensure_topic;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use super::{
    aggregate::{BatchAggregate, SessionKey, event_time_ms},
    dead_letter::{DeadLetterSink, dead_letter},
    dedupe::{Dedupe, EventId},
    publisher, status_log,
    validate::{self, Reason, Rejection, TimeBounds},
};
use crate::{
    config::Config,
    infra::kafka::{self, high_watermark},
    retry::{Backoff, RECONNECT_MAX},
    store::{
        Bucket, Granularity, Retention, StoreError,
        commit::{self, CommitMeta, CommitSettings, DedupeWrite, PartitionState},
        keys::{PartitionKeys, deltas_channel},
        mirror::Mirror,
        session_epoch,
        session_mirror::SessionMirror,
    },
};

/// Deltas waiting to be published; past this, new ones are dropped.
const DELTA_QUEUE: usize = 1024;

/// Everything the pipeline needs from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Redis key namespace.
    pub namespace: String,
    /// Kafka bootstrap brokers.
    pub brokers: Vec<String>,
    /// The interactions topic.
    pub topic: String,
    /// The dead-letter topic.
    pub dead_letter_topic: String,
    /// Partitions of the topics when they must be created.
    pub partitions_if_created: i32,
    /// Partitions to consume; every partition when empty.
    pub partitions: Vec<i32>,
    /// Most bytes per fetch.
    pub fetch_max_bytes: i32,
    /// Longest a fetch waits for records.
    pub fetch_max_wait: Duration,
    /// Most records per commit.
    pub commit_max_events: usize,
    /// Accepted event times.
    pub bounds: TimeBounds,
    /// Session inactivity gap, ms.
    pub session_gap_ms: i64,
    /// How far apart, on the dedupe clock, a repeated `event_id` is a
    /// duplicate, ms.
    pub dedupe_window_ms: i64,
    /// Retention and TTLs of what commits write.
    pub commit: CommitSettings,
    /// Deadline of one Kafka or Redis call.
    pub dependency_timeout: Duration,
    /// How often the vital signs are logged.
    pub status_log_interval: Duration,
    /// Who this consumer is, in partition leases.
    pub owner: String,
    /// How long a partition lease lasts without renewal.
    pub lease: Duration,
}

impl PipelineSettings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let session_gap_ms = millis(config.session_gap);
        Self {
            namespace: config.redis_namespace.clone(),
            brokers: config.kafka_brokers.clone(),
            topic: config.events_topic.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            partitions_if_created: config.events_partitions,
            partitions: config.ingest_partitions.clone(),
            fetch_max_bytes: config.fetch_max_bytes,
            fetch_max_wait: config.fetch_max_wait,
            commit_max_events: usize::try_from(config.commit_max_events).unwrap_or(2000),
            bounds: TimeBounds::from_config(config),
            session_gap_ms,
            dedupe_window_ms: millis(config.dedupe_window),
            commit: CommitSettings {
                retention: Retention::from_config(config),
                // Twice the gap, so a session's state outlives any event that
                // could still continue it, even from a consumer catching up.
                session_ttl_ms: session_gap_ms.saturating_mul(2),
            },
            dependency_timeout: config.dependency_timeout,
            status_log_interval: config.status_log_interval,
            owner: consumer_id(),
            lease: config.partition_lease,
        }
    }
}

/// How often a standby asks for a partition's lease: a tenth of the lease,
/// from 100 ms to 1 s.
fn lease_poll(lease: Duration) -> Duration {
    (lease / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// A unique id of this process, for partition leases.
pub fn consumer_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!(
        "{host}/{}/{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Counters of the pipeline in this process, since it started.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Records read from Kafka.
    pub records: AtomicU64,
    /// Events counted.
    pub applied: AtomicU64,
    /// Duplicates discarded.
    pub duplicates: AtomicU64,
    /// Records dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Commits.
    pub commits: AtomicU64,
    /// Redis commands sent by commits.
    pub redis_commands: AtomicU64,
    /// Redis round trips made to apply batches (reads and commits).
    pub redis_round_trips: AtomicU64,
    /// Deltas dropped because the publisher was behind.
    pub deltas_dropped: AtomicU64,
}

/// Why a partition's consumer starts over.
#[derive(Debug, thiserror::Error)]
enum ConsumeError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("dead-letter topic {topic}: {source}")]
    DeadLetter { topic: String, source: KafkaError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "stored offset {stored} is past the end of the partition (high watermark {high_watermark}): the topic was recreated or lost data; rebuild this namespace or use another one"
    )]
    OffsetBeyondEnd { stored: i64, high_watermark: i64 },
    #[error("the fetch task stopped unexpectedly")]
    FetcherStopped,
    #[error("partition is consumed by another process ({holder}); waiting for its lease to expire")]
    Leased { holder: String },
}

/// Runs the pipeline until `shutdown`: creates the topics if missing, then
/// consumes the configured partitions. Never returns early: a dependency that
/// is down is retried with backoff.
pub async fn run(
    settings: PipelineSettings,
    redis: redis::Client,
    stats: Arc<PipelineStats>,
    shutdown: CancellationToken,
) {
    let settings = Arc::new(settings);
    let mut backoff = Backoff::new(Duration::from_millis(200), RECONNECT_MAX);
    let (events_partitions, dead_letter_partitions) = loop {
        match prepare_topics(&settings).await {
            Ok(partitions) => break partitions,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %error, retry_in = ?delay, "ingest cannot reach Kafka yet");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let partitions = if settings.partitions.is_empty() {
        events_partitions
    } else {
        let (known, unknown): (Vec<i32>, Vec<i32>) = settings
            .partitions
            .iter()
            .partition(|p| events_partitions.contains(p));
        if !unknown.is_empty() {
            tracing::error!(?unknown, topic = %settings.topic, "configured partitions do not exist; they are not consumed");
        }
        known
    };
    tracing::info!(topic = %settings.topic, ?partitions, "ingest starting");

    let (deltas, queued) = mpsc::channel(DELTA_QUEUE);
    let mut tasks = JoinSet::new();
    tasks.spawn(publisher::publish_deltas(
        redis.clone(),
        deltas_channel(&settings.namespace),
        queued,
        shutdown.clone(),
    ));
    let dead_letter_count = i32::try_from(dead_letter_partitions.len().max(1)).unwrap_or(1);
    let mut high_watermarks = Vec::new();
    for partition in partitions {
        let high_watermark = Arc::new(AtomicI64::new(-1));
        high_watermarks.push((partition, high_watermark.clone()));
        let consumer = PartitionConsumer {
            high_watermark,
            settings: settings.clone(),
            keys: PartitionKeys::new(&settings.namespace, partition),
            dead_letter_partition: partition % dead_letter_count,
            redis: redis.clone(),
            deltas: deltas.clone(),
            stats: stats.clone(),
        };
        tasks.spawn(consumer.run(shutdown.clone()));
    }
    drop(deltas);
    tasks.spawn(status_log::log_status(
        settings.clone(),
        redis.clone(),
        high_watermarks,
        shutdown.clone(),
    ));
    while tasks.join_next().await.is_some() {}
    tracing::info!("ingest stopped");
}

async fn prepare_topics(settings: &PipelineSettings) -> Result<(Vec<i32>, Vec<i32>), String> {
    let client = kafka::client(&settings.brokers, settings.dependency_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut events = ensure_topic(&client, &settings.topic, settings.partitions_if_created)
        .await
        .map_err(|e| e.to_string())?;
    let mut dead_letters = ensure_topic(
        &client,
        &settings.dead_letter_topic,
        settings.partitions_if_created,
    )
    .await
    .map_err(|e| e.to_string())?;
    events.sort_unstable();
    dead_letters.sort_unstable();
    Ok((events, dead_letters))
}

/// Consumes one partition.
struct PartitionConsumer {
    high_watermark: Arc<AtomicI64>,
    settings: Arc<PipelineSettings>,
    keys: PartitionKeys,
    dead_letter_partition: i32,
    redis: redis::Client,
    deltas: mpsc::Sender<Vec<u8>>,
    stats: Arc<PipelineStats>,
}

/// Where the consumer stands, as last committed.
struct Position {
    stored: Option<i64>,
    watermark_ms: Option<i64>,
    dedupe_clock_ms: Option<i64>,
}

/// Records of one fetch, and the offset to fetch next.
struct Fetched {
    records: Vec<RecordAndOffset>,
    /// Set when the stored offset fell out of the topic's retention and the
    /// consumer moved to the earliest offset still kept.
    skipped_to: Option<i64>,
}

impl PartitionConsumer {
    async fn run(self, shutdown: CancellationToken) {
        let partition = self.keys.partition();
        let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_MAX);
        let mut redis: Option<MultiplexedConnection> = None;
        let mut waiting_for_lease = false;
        loop {
            let consumed = tokio::select! {
                () = shutdown.cancelled() => {
                    self.release(redis).await;
                    return;
                }
                consumed = self.consume(&mut redis, &mut backoff) => consumed,
            };
            let Err(error) = consumed;
            if matches!(&error, ConsumeError::Store(StoreError::Redis(_))) {
                redis = None;
            }
            let delay = if let ConsumeError::Leased { .. } = &error {
                // A standby: ask again soon, so that it takes over within the
                // lease plus a tenth of it once the holder stops renewing.
                if !waiting_for_lease {
                    tracing::info!(partition, error = %error, "standing by");
                }
                waiting_for_lease = true;
                crate::retry::jittered(lease_poll(self.settings.lease))
            } else {
                waiting_for_lease = false;
                let delay = backoff.next_delay();
                tracing::warn!(partition, error = %error, retry_in = ?delay, "partition consumer restarting from its stored offset");
                delay
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Gives the partition's lease up, so a successor need not wait for it
    /// to expire.
    async fn release(&self, redis: Option<MultiplexedConnection>) {
        if let Some(mut redis) = redis {
            let released = commit::release_lease(&mut redis, &self.keys, &self.settings.owner);
            if let Ok(Err(error)) =
                tokio::time::timeout(self.settings.dependency_timeout, released).await
            {
                tracing::debug!(error = %error, "cannot release a partition lease");
            }
        }
    }

    /// Consumes until something fails.
    async fn consume(
        &self,
        redis: &mut Option<MultiplexedConnection>,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, ConsumeError> {
        let settings = &self.settings;
        // The task's own connection, which never reconnects by itself: the
        // commit's WATCH must not be lost to a silent reconnection (see
        // `store::commit`). A Redis error drops it, the next attempt opens a
        // new one.
        let mut redis = match redis {
            Some(connection) => connection.clone(),
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(settings.dependency_timeout))
                    // A commit can be large: allow it time, the offset check
                    // makes a late reply harmless anyway.
                    .set_response_timeout(Some(settings.dependency_timeout * 4));
                let connection = self
                    .redis
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(StoreError::from)?;
                redis.insert(connection).clone()
            }
        };
        commit::take_lease(&mut redis, &self.keys, &settings.owner, settings.lease)
            .await?
            .map_err(|holder| ConsumeError::Leased { holder })?;
        let state = commit::load_state(&mut redis, &self.keys).await?;
        commit::register_partition(&mut redis, &settings.namespace, &self.keys).await?;
        let kafka = kafka::client(&settings.brokers, settings.dependency_timeout).await?;
        let source = kafka
            .partition_client(
                &settings.topic,
                self.keys.partition(),
                UnknownTopicHandling::Retry,
            )
            .await?;
        let dead_letters = DeadLetterSink::new(
            kafka
                .partition_client(
                    &settings.dead_letter_topic,
                    self.dead_letter_partition,
                    UnknownTopicHandling::Retry,
                )
                .await
                .map_err(|source| ConsumeError::DeadLetter {
                    topic: settings.dead_letter_topic.clone(),
                    source,
                })?,
        );
        let start = match state.offset {
            Some(offset) => offset,
            None => source.get_offset(OffsetAt::Earliest).await?,
        };
        tracing::debug!(
            partition = self.keys.partition(),
            offset = start,
            "consuming"
        );
        let PartitionState {
            offset: stored,
            watermark_ms,
            dedupe_clock_ms,
            ..
        } = state;
        let mut position = Position {
            stored,
            watermark_ms,
            dedupe_clock_ms,
        };
        // Known values of what this attempt writes; a new attempt reads them
        // again.
        let mut mirror = Mirror::new(settings.commit.retention);
        let mut sessions = SessionMirror::default();

        let (sender, mut fetched) = mpsc::channel(1);
        let _fetcher = AbortOnDropHandle::new(tokio::spawn(fetch(
            source,
            start,
            settings.clone(),
            self.high_watermark.clone(),
            sender,
        )));
        let mut renewal = tokio::time::interval(settings.lease / 3);
        renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = fetched.recv() => {
                    let Some(batch) = batch else { break };
                    let mirrors = (&mut mirror, &mut sessions);
                    self.apply(batch?, &mut redis, &dead_letters, &mut position, mirrors)
                        .await?;
                    backoff.reset();
                }
                _ = renewal.tick() => {
                    commit::take_lease(&mut redis, &self.keys, &settings.owner, settings.lease)
                        .await?
                        .map_err(|holder| ConsumeError::Leased { holder })?;
                }
            }
        }
        // The fetcher stops by sending an error; it only gets here if it died.
        Err(ConsumeError::FetcherStopped)
    }

    async fn apply(
        &self,
        fetched: Fetched,
        redis: &mut MultiplexedConnection,
        dead_letters: &DeadLetterSink,
        position: &mut Position,
        (mirror, sessions): (&mut Mirror, &mut SessionMirror),
    ) -> Result<(), ConsumeError> {
        if let Some(earliest) = fetched.skipped_to {
            let meta = CommitMeta {
                expected_offset: position.stored,
                next_offset: earliest,
                duplicates: 0,
                dedupe: DedupeWrite::default(),
                dead_lettered: Vec::new(),
                now_ms: Utc::now().timestamp_millis(),
            };
            let empty = BatchAggregate::new(position.watermark_ms, HashMap::new(), 0);
            let settings = &self.settings.commit;
            commit::commit(redis, &self.keys, &empty, &meta, settings, mirror).await?;
            position.stored = Some(earliest);
        }
        for chunk in fetched.records.chunks(self.settings.commit_max_events) {
            self.apply_chunk(chunk, redis, dead_letters, position, (mirror, sessions))
                .await?;
        }
        Ok(())
    }

    async fn apply_chunk(
        &self,
        chunk: &[RecordAndOffset],
        redis: &mut MultiplexedConnection,
        dead_letters: &DeadLetterSink,
        position: &mut Position,
        (mirror, session_mirror): (&mut Mirror, &mut SessionMirror),
    ) -> Result<(), ConsumeError> {
        let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
            return Ok(());
        };
        let settings = &self.settings;
        let partition = self.keys.partition();
        let now = Utc::now();

        let mut valid = Vec::with_capacity(chunk.len());
        let mut rejected = Vec::new();
        let mut dead_counts: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut dedupe = Dedupe::new(settings.dedupe_window_ms, position.dedupe_clock_ms);
        for record in chunk {
            let stamped = dedupe.stamp(record.record.timestamp.timestamp_millis());
            let checked = match record.record.value.as_deref() {
                Some(bytes) => validate::decode(bytes, now, settings.bounds),
                None => Err(Rejection {
                    reason: Reason::DecodeError,
                    violations: Vec::new(),
                    detail: "the record has no value".into(),
                }),
            };
            match checked {
                Ok(event) => {
                    let id = uuid::Uuid::try_parse(&event.event_id)
                        .map(|id| id.into_bytes())
                        .unwrap_or_default();
                    valid.push((id, stamped, event));
                }
                Err(rejection) => {
                    *dead_counts.entry(rejection.reason.as_str()).or_default() += 1;
                    rejected.push(dead_letter(record, &settings.topic, partition, &rejection));
                }
            }
        }
        let dead_lettered = u64::try_from(rejected.len()).unwrap_or(0);
        dead_letters
            .send(rejected)
            .await
            .map_err(|source| ConsumeError::DeadLetter {
                topic: settings.dead_letter_topic.clone(),
                source,
            })?;

        // When the events' ids were counted last, and the sessions they
        // continue.
        let mut minutes: BTreeSet<i64> = BTreeSet::new();
        let mut session_keys: HashSet<SessionKey> = HashSet::new();
        for (_, _, event) in &valid {
            minutes.insert(Granularity::Minute.bucket_start(event_time_ms(event).div_euclid(1000)));
            session_keys.insert((event.user_id, event.session_id.clone()));
        }
        let ids: Vec<EventId> = valid.iter().map(|(id, _, _)| *id).collect();
        // The values of the buckets the events fall in, unless known (those
        // of sessions' earlier minutes are read by the commit if needed).
        let unknown = mirror.missing(
            minutes.iter().flat_map(|minute| Bucket::of_minute(*minute)),
            now.timestamp(),
        );
        // The sessions this consumer wrote are known; the others are read.
        let epoch = session_epoch(now.timestamp_millis(), settings.commit.session_ttl_ms);
        let mut known_sessions = HashMap::with_capacity(session_keys.len());
        let mut unknown_sessions = Vec::new();
        for session in session_keys {
            match session_mirror.get(&session, epoch) {
                Some(state) => {
                    known_sessions.insert(session, state);
                }
                None => unknown_sessions.push(session),
            }
        }
        let prefetched = commit::prefetch(
            redis,
            &self.keys,
            &ids,
            unknown_sessions,
            epoch,
            (&mut *mirror, &unknown),
        )
        .await?;
        let prefetched_round_trips = prefetched.round_trips;
        let mut sessions = prefetched.sessions;
        sessions.extend(known_sessions);
        let mut batch =
            BatchAggregate::new(position.watermark_ms, sessions, settings.session_gap_ms);
        let mut duplicates = 0;
        for ((id, stamped, event), stored) in valid.iter().zip(&prefetched.counted_at) {
            if dedupe.is_duplicate(*id, *stamped, *stored) {
                duplicates += 1;
                continue;
            }
            batch.add(event);
        }

        let next_offset = last.offset + 1;
        let meta = CommitMeta {
            expected_offset: position.stored,
            next_offset,
            duplicates,
            dedupe: DedupeWrite {
                clock_ms: dedupe.clock_ms(),
                horizon_ms: dedupe.horizon_ms(),
                counted: dedupe.into_counted(),
            },
            dead_lettered: dead_counts.into_iter().collect(),
            now_ms: now.timestamp_millis(),
        };
        let committed =
            commit::commit(redis, &self.keys, &batch, &meta, &settings.commit, mirror).await?;
        session_mirror.applied(&batch.sessions, epoch);
        position.stored = Some(next_offset);
        position.watermark_ms = batch.watermark_ms;
        position.dedupe_clock_ms = meta.dedupe.clock_ms;

        let stats = &self.stats;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let count_usize = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        stats.records.fetch_add(
            count(i64::try_from(chunk.len()).unwrap_or(0)),
            Ordering::Relaxed,
        );
        stats
            .applied
            .fetch_add(count(batch.applied), Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(count(duplicates), Ordering::Relaxed);
        stats
            .dead_lettered
            .fetch_add(dead_lettered, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .redis_commands
            .fetch_add(count_usize(committed.commands), Ordering::Relaxed);
        stats.redis_round_trips.fetch_add(
            count_usize(prefetched_round_trips + committed.round_trips),
            Ordering::Relaxed,
        );

        if batch.applied > 0 {
            let delta = batch.delta(partition, first.offset, next_offset);
            if self.deltas.try_send(delta.encode_to_vec()).is_err() {
                stats.deltas_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Fetches from `offset` on, one batch ahead of the consumer, until the
/// consumer goes away or a fetch fails (sent as the last item).
async fn fetch(
    source: PartitionClient,
    mut offset: i64,
    settings: Arc<PipelineSettings>,
    latest_high_watermark: Arc<AtomicI64>,
    batches: mpsc::Sender<Result<Fetched, ConsumeError>>,
) {
    let max_wait_ms = i32::try_from(settings.fetch_max_wait.as_millis()).unwrap_or(i32::MAX);
    loop {
        let fetched = source
            .fetch_records(offset, 1..settings.fetch_max_bytes, max_wait_ms)
            .await;
        let batch = match fetched {
            Ok((mut records, high_watermark)) => {
                latest_high_watermark.store(high_watermark, Ordering::Relaxed);
                // A compressed batch can start before the requested offset.
                records.retain(|r| r.offset >= offset);
                match records.last() {
                    Some(last) => offset = last.offset + 1,
                    None => {
                        if high_watermark > offset {
                            // Nothing readable below the high watermark
                            // (control records): do not spin on it.
                            tokio::time::sleep(settings.fetch_max_wait).await;
                        }
                        continue;
                    }
                }
                Ok(Fetched {
                    records,
                    skipped_to: None,
                })
            }
            Err(KafkaError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            }) => out_of_range(&source, offset).await.map(|earliest| {
                tracing::warn!(
                    partition = source.partition(),
                    from = offset,
                    to = earliest,
                    "records were deleted by the topic's retention before they were consumed; skipping to the earliest kept"
                );
                offset = earliest;
                Fetched {
                    records: Vec::new(),
                    skipped_to: Some(earliest),
                }
            }),
            Err(error) => Err(error.into()),
        };
        let failed = batch.is_err();
        if batches.send(batch).await.is_err() || failed {
            return;
        }
    }
}

/// Where to go when `offset` is out of the partition's range: the earliest
/// offset if it fell behind retention, an error if it is past the end.
async fn out_of_range(source: &PartitionClient, offset: i64) -> Result<i64, ConsumeError> {
    let earliest = source.get_offset(OffsetAt::Earliest).await?;
    if offset < earliest {
        return Ok(earliest);
    }
    let high_watermark = high_watermark(source, earliest).await?;
    Err(ConsumeError::OffsetBeyondEnd {
        stored: offset,
        high_watermark,
    })
}
