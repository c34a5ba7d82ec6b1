//! Produces accepted events to the interactions topic for the ingest RPCs.
//!
//! Concurrent callers share produce requests: each partition has an rskafka
//! `BatchProducer` that lingers a moment to gather the records of every
//! caller into one request, so throughput holds with many small clients. A
//! caller is answered only once the broker acknowledged its record.
//!
//! Once a produce or a connection attempt has failed, the producer knows the
//! broker is unreachable: calls fail at once with UNAVAILABLE instead of
//! each waiting out the ack timeout, while one background attempt at a time
//! reconnects; the first that succeeds lets calls through again.

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use chrono::Utc;
use prost::Message;
use rskafka::{
    client::{
        partition::UnknownTopicHandling,
        producer::{BatchProducer, BatchProducerBuilder, aggregator::RecordAggregator},
    },
    record::Record,
};
use rtap::{
    kafka::{admin::ensure_topic, partition_for_key, record_key},
    v1::InteractionEvent,
};
use tokio::sync::Mutex;

use crate::{
    config::Config,
    error::Error,
    infra::kafka::{self, Brokers},
};

/// How long a batch waits for more records before it is sent.
const LINGER: Duration = Duration::from_millis(2);
/// Largest batch, in bytes of records.
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// A lazily connected, shared producer of interaction events.
pub(crate) struct EventProducer {
    brokers: Brokers,
    topic: String,
    partitions_if_created: i32,
    ack_timeout: Duration,
    connection: Mutex<Option<Arc<Connection>>>,
    outage: std::sync::Mutex<Outage>,
}

/// What the producer knows of an outage of the broker.
#[derive(Debug, Default)]
struct Outage {
    /// Why the last attempt failed; `None` while the broker answers.
    reason: Option<String>,
    /// A background reconnection is running.
    reconnecting: bool,
}

struct Connection {
    /// Indexed by partition number.
    partitions: Vec<BatchProducer<RecordAggregator>>,
}

impl EventProducer {
    /// A producer for the configured topic; connects on first use.
    pub(crate) fn new(config: &Config, brokers: Brokers) -> Self {
        Self {
            brokers,
            topic: config.events_topic.clone(),
            partitions_if_created: config.events_partitions,
            ack_timeout: config.ingest_ack_timeout,
            connection: Mutex::new(None),
            outage: std::sync::Mutex::default(),
        }
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the broker is known to be unreachable, if it is; starts a
    /// reconnection in the background unless one is running.
    fn known_outage(self: &Arc<Self>) -> Option<String> {
        let mut outage = self.outage();
        let reason = outage.reason.clone()?;
        if !outage.reconnecting {
            outage.reconnecting = true;
            let producer = self.clone();
            tokio::spawn(async move {
                let connected = producer.connection().await.is_ok();
                let mut outage = producer.outage();
                outage.reconnecting = false;
                if connected {
                    outage.reason = None;
                }
            });
        }
        Some(reason)
    }

    /// Records a failure: later calls fail fast until a reconnection works.
    async fn failed(&self, error: Error) -> Error {
        *self.connection.lock().await = None;
        self.outage().reason = Some(error.to_string());
        error
    }

    /// Stores `event` on its user's partition; returns once the broker
    /// acknowledged it. UNAVAILABLE if that takes longer than the ack
    /// timeout or the broker cannot be reached: the event may then be stored
    /// or not, and a retry with the same `event_id` is counted once.
    pub(crate) async fn produce(self: &Arc<Self>, event: &InteractionEvent) -> Result<(), Error> {
        if let Some(reason) = self.known_outage() {
            return Err(unavailable(format!(
                "the broker is unreachable ({reason}); retry later"
            )));
        }
        let connection = match self.connection().await {
            Ok(connection) => connection,
            Err(error) => return Err(self.failed(error).await),
        };
        let key = record_key(event.user_id);
        let count = i32::try_from(connection.partitions.len()).unwrap_or(i32::MAX);
        let partition = usize::try_from(partition_for_key(&key, count)).unwrap_or(0);
        // Stamped with the time of receipt, not the event's time: a client's
        // retry that re-stamps `occurred_at` must keep the record's place on
        // the partition's dedupe clock (see `ingest::dedupe`).
        let timestamp = Utc::now();
        let record = Record {
            key: Some(key),
            value: Some(event.encode_to_vec()),
            headers: Default::default(),
            timestamp,
        };
        let produced = tokio::time::timeout(
            self.ack_timeout,
            connection.partitions[partition].produce(record),
        )
        .await;
        // A failure drops the connection: the reconnection that ends the
        // outage proves the broker answers again.
        match produced {
            Ok(Ok(_offset)) => Ok(()),
            Ok(Err(error)) => Err(self
                .failed(unavailable(format!(
                    "the broker did not store the event: {error}"
                )))
                .await),
            Err(_) => Err(self
                .failed(unavailable(format!(
                    "no acknowledgement from the broker within {:?}",
                    self.ack_timeout
                )))
                .await),
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, Error> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connect = async {
            let client = kafka::client(&self.brokers, self.ack_timeout)
                .await
                .map_err(|e| unavailable(format!("cannot reach Kafka: {e}")))?;
            let mut partitions = ensure_topic(&client, &self.topic, self.partitions_if_created)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            partitions.sort_unstable();
            let mut producers = Vec::with_capacity(partitions.len());
            for partition in partitions {
                let client = client
                    .partition_client(&self.topic, partition, UnknownTopicHandling::Retry)
                    .await
                    .map_err(|e| unavailable(format!("partition {partition}: {e}")))?;
                producers.push(
                    BatchProducerBuilder::new(Arc::new(client))
                        .with_linger(LINGER)
                        .build(RecordAggregator::new(MAX_BATCH_BYTES)),
                );
            }
            Ok::<_, Error>(Connection {
                partitions: producers,
            })
        };
        let connection = tokio::time::timeout(self.ack_timeout, connect)
            .await
            .map_err(|_| {
                unavailable(format!("cannot reach Kafka within {:?}", self.ack_timeout))
            })??;
        let connection = Arc::new(connection);
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        dependency: "kafka",
        reason,
    }
}
