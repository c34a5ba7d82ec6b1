//! `rtap-server rebuild`: drops a namespace's aggregates and stored offsets
//! and recomputes them from the earliest offsets Kafka still keeps, with the
//! same pipeline as live ingest (so the result is the same).
//!
//! It first takes every partition's lease, so it refuses to start while any
//! ingest process consumes the namespace, and no consumer can start while it
//! runs. API servers keep serving meanwhile: queries see the metrics grow
//! back as the rebuild progresses, and subscribers get the changes as deltas.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use redis::aio::ConnectionManager;
use rskafka::client::partition::UnknownTopicHandling;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, PipelineSettings, PipelineStats, consumer_id};
use crate::{
    config::Config,
    error::Error,
    infra::kafka::{self, high_watermark},
    store::{
        StoreError,
        commit::{forget_topic_partitions, load_state, release_lease, take_lease},
        keys::PartitionKeys,
        nodes::{Nodes, Route},
    },
};

/// How often progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Rebuilds the configured namespace; returns when every partition caught
/// up with the high watermark it had when the rebuild started.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), Error> {
    let brokers = config.kafka().map_err(Error::Config)?;
    let mut settings = PipelineSettings::from_config(config, brokers.clone());
    settings.owner = format!("rebuild/{}", consumer_id());
    let redis = config
        .redis_nodes()
        .map_err(Error::Config)?
        .with_timeout(config.dependency_timeout);
    let kafka = kafka::client(&brokers, config.dependency_timeout)
        .await
        .map_err(|e| unavailable("kafka", e))?;
    let partitions = partitions_to_rebuild(&kafka, config).await?;
    settings.partitions = partitions.clone();
    let keys: Vec<PartitionKeys> = partitions
        .iter()
        .map(|p| PartitionKeys::new(&config.redis_namespace, *p))
        .collect();
    take_every_lease(&redis, &keys, &settings, config).await?;
    let targets = targets(&kafka, &config.events_topic, &partitions).await?;
    for partition_keys in &keys {
        let mut connection = redis.connection(&partition_keys.state()).await?;
        let deleted = delete_partition(&mut connection, partition_keys)
            .await
            .map_err(Error::from)?;
        tracing::info!(
            partition = partition_keys.partition(),
            keys = deleted,
            "dropped aggregates and offset"
        );
    }

    // The metrics are recomputed from the topic as it is now.
    forget_topic_partitions(&redis, &config.redis_namespace).await?;

    let owner = settings.owner.clone();
    let stats = Arc::new(PipelineStats::default());
    let stop = shutdown.child_token();
    let pipeline = tokio::spawn(consumer::run(settings, redis.clone(), stats, stop.clone()));
    let started = Instant::now();
    let outcome = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Err(Error::FailedPrecondition(
                "rebuild interrupted: run it again to finish".into(),
            )),
            () = tokio::time::sleep(PROGRESS_INTERVAL) => {}
        }
        match report_progress(&redis, &keys, &targets, started).await {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(error) => break Err(error),
        }
    };
    stop.cancel();
    let _ = pipeline.await;
    for partition_keys in &keys {
        let mut connection = redis.connection(&partition_keys.state()).await?;
        release_lease(&mut connection, partition_keys, &owner)
            .await
            .map_err(Error::from)?;
    }
    if outcome.is_ok() {
        tracing::info!(elapsed = ?started.elapsed(), "rebuild complete");
    }
    outcome
}

/// The topic's partitions, those of `--ingest-partitions` when given.
async fn partitions_to_rebuild(
    kafka: &rskafka::client::Client,
    config: &Config,
) -> Result<Vec<i32>, Error> {
    let mut partitions: Vec<i32> = kafka
        .list_topics()
        .await
        .map_err(|e| unavailable("kafka", e))?
        .into_iter()
        .find(|t| t.name == config.events_topic)
        .map(|t| t.partitions.into_iter().collect())
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "topic {} does not exist: nothing to rebuild from",
                config.events_topic
            ))
        })?;
    partitions.sort_unstable();
    if !config.ingest_partitions.is_empty() {
        partitions.retain(|p| config.ingest_partitions.contains(p));
    }
    if partitions.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "none of --ingest-partitions {:?} exists in topic {}",
            config.ingest_partitions, config.events_topic
        )));
    }
    Ok(partitions)
}

/// Every partition's lease, or none: a partition held by a consumer gives
/// back the leases already taken and fails, naming the holder.
async fn take_every_lease(
    redis: &Nodes,
    keys: &[PartitionKeys],
    settings: &PipelineSettings,
    config: &Config,
) -> Result<(), Error> {
    for (index, partition_keys) in keys.iter().enumerate() {
        let mut connection = redis.connection(&partition_keys.state()).await?;
        let taken = take_lease(
            &mut connection,
            partition_keys,
            &settings.owner,
            settings.lease,
        )
        .await
        .map_err(Error::from)?;
        if let Err(holder) = taken {
            for taken_keys in &keys[..index] {
                let mut connection = redis.connection(&taken_keys.state()).await?;
                release_lease(&mut connection, taken_keys, &settings.owner)
                    .await
                    .map_err(Error::from)?;
            }
            return Err(Error::FailedPrecondition(format!(
                "partition {} of {} in namespace {} is being consumed by {holder}: stop its ingest processes (or run them with --role api), then rebuild",
                partition_keys.partition(),
                config.events_topic,
                config.redis_namespace
            )));
        }
    }
    Ok(())
}

/// Each partition's earliest kept offset and its high watermark now: the
/// range the rebuild reads.
async fn targets(
    kafka: &rskafka::client::Client,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, (i64, i64)>, Error> {
    let mut targets = BTreeMap::new();
    for partition in partitions {
        let source = kafka
            .partition_client(topic, *partition, UnknownTopicHandling::Error)
            .await
            .map_err(|e| unavailable("kafka", e))?;
        let earliest = source
            .get_offset(rskafka::client::partition::OffsetAt::Earliest)
            .await
            .map_err(|e| unavailable("kafka", e))?;
        let end = high_watermark(&source, earliest)
            .await
            .map_err(|e| unavailable("kafka", e))?;
        targets.insert(*partition, (earliest, end));
    }
    Ok(targets)
}

/// Logs each partition's progress; whether every one reached its target.
async fn report_progress(
    redis: &Nodes,
    keys: &[PartitionKeys],
    targets: &BTreeMap<i32, (i64, i64)>,
    started: Instant,
) -> Result<bool, Error> {
    let mut done = true;
    for partition_keys in keys {
        let partition = partition_keys.partition();
        let (earliest, end) = targets.get(&partition).copied().unwrap_or((0, 0));
        let mut connection = redis.connection(&partition_keys.state()).await?;
        let state = load_state(&mut connection, partition_keys)
            .await
            .map_err(Error::from)?;
        let at = state.offset.unwrap_or(earliest).min(end);
        let read = at - earliest;
        let total = end - earliest;
        let rate = read as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let eta = if rate > 0.0 {
            Duration::from_secs_f64((end - at) as f64 / rate)
        } else {
            Duration::ZERO
        };
        tracing::info!(
            partition,
            records = read,
            of = total,
            events_applied = state.applied,
            rate = format!("{rate:.0}/s"),
            eta = ?eta,
            "rebuild progress"
        );
        done &= at >= end;
    }
    Ok(done)
}

/// Deletes every key of the partition except its lease (all on the node
/// that holds the partition's slot: its `SCAN` finds them).
async fn delete_partition(
    redis: &mut ConnectionManager,
    keys: &PartitionKeys,
) -> Result<usize, StoreError> {
    let lease = keys.lease();
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(keys.pattern())
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        let doomed: Vec<String> = found.into_iter().filter(|k| *k != lease).collect();
        if !doomed.is_empty() {
            deleted += doomed.len();
            redis::cmd("UNLINK")
                .arg(&doomed)
                .query_async::<()>(redis)
                .await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

fn unavailable(dependency: &'static str, error: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        dependency,
        reason: error.to_string(),
    }
}
