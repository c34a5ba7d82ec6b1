//! The Kafka → Redis pipeline: one consumer task per partition of the
//! interactions topic.
//!
//! Each task resumes from the offset stored in Redis, fetches record batches
//! (one fetch ahead of the commit, so at most two fetches of
//! `--fetch-max-bytes` are in memory per partition), and for every chunk of at
//! most `--commit-max-events` records:
//! 1. decodes and validates each record; rejects go to the dead-letter topic;
//! 2. reads, in one round trip, when the event ids were counted last, the
//!    state of the sessions concerned that the partition's writer does not
//!    know, and the current values of the buckets the events fall in that it
//!    does not know;
//! 3. folds the new events in memory
//!    ([`BatchAggregate`](crate::store::aggregate::BatchAggregate));
//! 4. commits aggregates (counters and rankings as their new values), dedupe
//!    ids, sessions, counters and the next offset in one transaction, fenced
//!    on the stored offset ([`PartitionWriter`]);
//! 5. hands a [`CommitDelta`](rtap::v1::CommitDelta) to the publisher, which
//!    can drop it but never delays the partition.
//!
//! Any failure (Kafka, Redis, a commit fenced by another consumer) drops the
//! task's clients and its writer and starts over from the stored offset after
//! a backoff: simple, and exactly once by construction. The steps themselves
//! live in [`super::partition`]; the partition's writes in
//! [`crate::store::writer`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use redis::{AsyncConnectionConfig, aio::MultiplexedConnection};
use rskafka::client::partition::UnknownTopicHandling;
use rtap::kafka::admin::ensure_topic;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use super::{
    dead_letter::DeadLetterSink,
    partition::{self, Applier, ConsumeError},
    publisher, status_log,
    validate::{Reason, TimeBounds},
};
use crate::{
    config::Config,
    infra::kafka::{self, Brokers},
    retry::{Backoff, RECONNECT_MAX},
    store::{
        Retention, StoreError,
        commit::{self, CommitSettings, Committed},
        keys::PartitionKeys,
        nodes::{Nodes, is_moved_or_down},
        writer::PartitionWriter,
    },
    telemetry::ingest::PartitionMetrics,
};

/// Deltas waiting to be published; past this, new ones are dropped.
const DELTA_QUEUE: usize = 1024;
/// How often ingest that waits for a rebuild (the topic gained partitions)
/// looks again.
const TOPIC_CHECK_AGAIN: Duration = Duration::from_secs(10);

/// Everything the pipeline needs from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Redis key namespace.
    pub namespace: String,
    /// Kafka bootstrap brokers.
    pub brokers: Brokers,
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
    /// The settings of `config`, reaching Kafka at `brokers`.
    pub fn from_config(config: &Config, brokers: Brokers) -> Self {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let session_gap_ms = millis(config.session_gap);
        Self {
            namespace: config.redis_namespace.clone(),
            brokers,
            topic: config.events_topic.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            partitions_if_created: config.events_partitions,
            partitions: config.ingest_partitions.clone(),
            fetch_max_bytes: config.fetch_max_bytes,
            fetch_max_wait: config.fetch_max_wait,
            commit_max_events: usize::try_from(config.commit_max_events).unwrap_or(usize::MAX),
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
pub(crate) fn consumer_id() -> String {
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

impl PipelineStats {
    /// Counts one commit of `records` records, of which `applied` events
    /// were counted, `duplicates` skipped and `dead_lettered` rejected;
    /// `prefetch_round_trips` were made before it.
    pub(crate) fn counted(
        &self,
        (records, applied, duplicates, dead_lettered): (usize, i64, i64, usize),
        committed: Committed,
        prefetch_round_trips: usize,
    ) {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let count_signed = |n: i64| u64::try_from(n).unwrap_or(0);
        self.records.fetch_add(count(records), Ordering::Relaxed);
        self.applied
            .fetch_add(count_signed(applied), Ordering::Relaxed);
        self.duplicates
            .fetch_add(count_signed(duplicates), Ordering::Relaxed);
        self.dead_lettered
            .fetch_add(count(dead_lettered), Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.redis_commands
            .fetch_add(count(committed.commands), Ordering::Relaxed);
        self.redis_round_trips.fetch_add(
            count(prefetch_round_trips + committed.round_trips),
            Ordering::Relaxed,
        );
    }
}

/// Runs the pipeline until `shutdown`: creates the topics if missing, then
/// consumes the configured partitions. Never returns early: a dependency that
/// is down is retried with backoff.
pub async fn run(
    settings: PipelineSettings,
    redis: Nodes,
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
    if !topic_partitions_unchanged(&settings, &redis, events_partitions.len(), &shutdown).await {
        return;
    }
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

    metrics::counter!(crate::telemetry::DELTAS_DROPPED).increment(0);
    let (deltas, queued) = mpsc::channel(DELTA_QUEUE);
    let mut tasks = JoinSet::new();
    tasks.spawn(publisher::publish_deltas(
        redis.clone(),
        settings.namespace.clone(),
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
            metrics: PartitionMetrics::new(partition, &Reason::ALL.map(Reason::as_str)),
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

/// Waits until the events topic's `count` partitions are those the metrics
/// were built from (recorded on first run): a topic that gained partitions
/// moved users between them, and only a rebuild can count them right.
/// `false` at shutdown.
async fn topic_partitions_unchanged(
    settings: &PipelineSettings,
    redis: &Nodes,
    count: usize,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(200), RECONNECT_MAX);
    loop {
        let delay = match commit::check_topic_partitions(redis, &settings.namespace, count).await {
            Ok(None) => return true,
            Ok(Some(recorded)) => {
                tracing::error!(
                    topic = %settings.topic,
                    partitions = count,
                    recorded,
                    namespace = %settings.namespace,
                    "the events topic has {count} partitions but the metrics were built from {recorded}: \
                     users moved between partitions and unique users would be counted twice; \
                     ingest waits until `rtap-server rebuild` recomputes the metrics"
                );
                TOPIC_CHECK_AGAIN
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %error, retry_in = ?delay, "ingest cannot reach Redis yet");
                delay
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
    }
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
    redis: Nodes,
    deltas: mpsc::Sender<publisher::Published>,
    stats: Arc<PipelineStats>,
    metrics: PartitionMetrics,
}

impl PartitionConsumer {
    async fn run(self, shutdown: CancellationToken) {
        let partition = self.keys.partition();
        let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_MAX);
        let mut redis: Option<MultiplexedConnection> = None;
        let mut waiting_for_lease = false;
        loop {
            let mut writer = None;
            let consumed = tokio::select! {
                () = shutdown.cancelled() => {
                    if let Some(writer) = writer.take() {
                        self.release(writer).await;
                    }
                    return;
                }
                consumed = self.consume(&mut redis, &mut writer, &mut backoff) => consumed,
            };
            let Err(error) = consumed;
            self.metrics.owned(false);
            if let ConsumeError::Store(StoreError::Redis(redis_error)) = &error {
                // A new connection next time, to the slot's owner as the
                // cluster says then: nothing goes on on this one.
                redis = None;
                if is_moved_or_down(redis_error)
                    && let Err(error) = self.redis.refresh().await
                {
                    tracing::warn!(partition, error = %error, "cannot read the Redis Cluster's slots");
                }
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
    async fn release(&self, writer: PartitionWriter) {
        let released = writer.release();
        if let Ok(Err(error)) =
            tokio::time::timeout(self.settings.dependency_timeout, released).await
        {
            tracing::debug!(error = %error, "cannot release a partition lease");
        }
    }

    /// The task's own Redis connection, to the node holding the partition,
    /// kept across attempts until a Redis error: it never reconnects by
    /// itself, nor follows a slot that moved (see `store::writer`).
    async fn connection(
        &self,
        redis: &mut Option<MultiplexedConnection>,
    ) -> Result<MultiplexedConnection, StoreError> {
        if let Some(connection) = redis {
            return Ok(connection.clone());
        }
        let timeout = self.settings.dependency_timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            // A commit can be large: allow it time, the offset fence makes a
            // late reply harmless anyway.
            .set_response_timeout(Some(timeout * 4));
        let connection = self
            .redis
            .client_for(&self.keys)
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(redis.insert(connection).clone())
    }

    /// Consumes until something fails; `writer` holds the partition's
    /// writer while it is open, for the lease to be released at shutdown.
    async fn consume(
        &self,
        redis: &mut Option<MultiplexedConnection>,
        writer: &mut Option<PartitionWriter>,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, ConsumeError> {
        let settings = &self.settings;
        let connection = self.connection(redis).await?;
        let lease = (settings.owner.clone(), settings.lease);
        let opened =
            PartitionWriter::open(connection, self.keys.clone(), lease, settings.commit).await?;
        let writer = writer.insert(opened.map_err(|holder| ConsumeError::Leased { holder })?);
        self.metrics.owned(true);
        commit::register_partition(&self.redis, &settings.namespace, &self.keys).await?;
        let kafka = kafka::client(&settings.brokers, settings.dependency_timeout).await?;
        let source = kafka
            .partition_client(
                &settings.topic,
                self.keys.partition(),
                UnknownTopicHandling::Retry,
            )
            .await?;
        let dead_letters = kafka
            .partition_client(
                &settings.dead_letter_topic,
                self.dead_letter_partition,
                UnknownTopicHandling::Retry,
            )
            .await
            .map(DeadLetterSink::new)
            .map_err(|source| ConsumeError::DeadLetter {
                topic: settings.dead_letter_topic.clone(),
                source,
            })?;
        let start = partition::resume_offset(writer.position(), &source).await?;
        tracing::debug!(
            partition = self.keys.partition(),
            offset = start,
            "consuming"
        );

        let (sender, mut fetched) = mpsc::channel(1);
        let _fetcher = AbortOnDropHandle::new(tokio::spawn(partition::fetch(
            source,
            start,
            (settings.fetch_max_bytes, settings.fetch_max_wait),
            self.high_watermark.clone(),
            sender,
        )));
        let applier = Applier {
            settings,
            dead_letters: &dead_letters,
            stats: &self.stats,
            deltas: &self.deltas,
            partition: self.keys.partition(),
            metrics: &self.metrics,
            high_watermark: &self.high_watermark,
        };
        let mut renewal = tokio::time::interval(settings.lease / 3);
        renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = fetched.recv() => {
                    let Some(batch) = batch else { break };
                    applier.apply(writer, batch?, Utc::now()).await?;
                    backoff.reset();
                }
                _ = renewal.tick() => {
                    writer
                        .renew_lease()
                        .await?
                        .map_err(|holder| ConsumeError::Leased { holder })?;
                }
            }
        }
        // The fetcher stops by sending an error; it only gets here if it died.
        Err(ConsumeError::FetcherStopped)
    }
}
