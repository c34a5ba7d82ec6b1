//! Produces records to Kafka: one worker per partition, each taking whatever
//! batches are waiting (up to a batch size of records) into one produce
//! request, while the generator fills the next batch. The generator hands
//! records over a batch at a time, not one by one: a channel operation and a
//! wake-up per record cost more than generating the record. One request in
//! flight per partition keeps each user's events in order; the bounded
//! channel in front of each worker bounds the data buffered.
//!
//! A batch holds its records' keys and values in one buffer, which the
//! generator encodes its records into. rskafka takes the records it sends,
//! as a `Vec` each for key and value: the worker builds them from the buffer
//! for each attempt, so they are allocated and freed by the same task.
//! (Allocated by the generator and freed by the worker, they cost the
//! generator far more: the allocator's slow path reclaims memory freed by
//! another thread.) The first attempt's are built while the request
//! before it is in flight.
//!
//! A broker that goes away is waited for: the failed batch is retried with
//! backoff, on a freshly built client, until it is stored or the simulator
//! gives up at shutdown.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use rskafka::{
    BackoffConfig,
    client::{
        Client, ClientBuilder,
        error::Error as KafkaError,
        partition::{Compression, PartitionClient, UnknownTopicHandling},
    },
    record::Record,
};
use rtap::kafka::admin::ensure_topic;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// How long one rskafka call may retry internally before it reports an
/// error: without a deadline rskafka retries forever, silently.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const INITIAL_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Producer failures.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// A Kafka call failed.
    #[error("{context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The rskafka error.
        source: KafkaError,
    },
    /// The topic could not be found or created.
    #[error(transparent)]
    Topic(#[from] rtap::kafka::admin::TopicError),
    /// Shutdown came before the broker could be reached.
    #[error("stopped before the broker at {0} could be reached")]
    Interrupted(String),
    /// A partition worker stopped.
    #[error("the producer for partition {0} has stopped")]
    WorkerGone(i32),
    /// Records were still unacknowledged when the flush timeout ran out.
    #[error("{0} records were not acknowledged by the broker before the flush timeout")]
    Undelivered(u64),
}

/// How to produce.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Bootstrap brokers.
    pub brokers: Vec<String>,
    /// Target topic.
    pub topic: String,
    /// Partitions to create the topic with, if it is missing.
    pub partitions: i32,
    /// Codec.
    pub compression: Compression,
    /// Most records per produce request.
    pub batch_size: usize,
    /// Records buffered per partition before `send` waits, rounded down to
    /// whole batches (at least one).
    pub buffer_per_partition: usize,
}

/// Counters shared with the progress display.
#[derive(Debug, Default)]
pub struct ProducerStats {
    /// Records the broker acknowledged.
    pub acknowledged: AtomicU64,
    /// Produce requests that failed (and were retried).
    pub failed_requests: AtomicU64,
    /// Bytes of keys and values acknowledged.
    pub bytes: AtomicU64,
    /// Records dropped at shutdown because they could not be delivered.
    pub undelivered: AtomicU64,
}

/// Counts the batches waiting for the partitions' workers, without keeping
/// their channels open.
pub struct QueueProbe(Vec<mpsc::WeakSender<Batch>>);

impl QueueProbe {
    /// Batches waiting now.
    pub fn queued(&self) -> usize {
        self.0
            .iter()
            .filter_map(mpsc::WeakSender::upgrade)
            .map(|sender| sender.max_capacity() - sender.capacity())
            .sum()
    }
}

/// A running producer.
pub struct Producer {
    /// The workers' channels, by partition; open until `close`.
    senders: Vec<mpsc::Sender<Batch>>,
    batch_size: usize,
    workers: JoinSet<()>,
    stats: Arc<ProducerStats>,
    stop: CancellationToken,
}

/// Feeds records to one partition's worker, a batch at a time. Each
/// generator has its own, for the partition its users' keys go to (see
/// [`Producer::sender`]): it knows the partition, so no record's key is
/// hashed to find it.
pub struct RecordSender {
    partition: i32,
    /// Partitions of the topic.
    partitions: i32,
    /// The worker's channel; closed (`None`) by `close`.
    sender: Option<mpsc::Sender<Batch>>,
    /// Records not yet handed to the worker.
    pending: Batch,
    batch_size: usize,
}

impl Producer {
    /// Connects (retrying with backoff until the broker answers or
    /// `shutdown`), creates the topic if missing, and starts one worker per
    /// partition.
    pub async fn start(
        config: ProducerConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ProduceError> {
        let connector = Arc::new(Connector {
            brokers: config.brokers.clone(),
            topic: config.topic.clone(),
            partitions: config.partitions,
        });
        let client = connector.client_until_reachable(&shutdown).await?;
        let partitions = ensure_topic(&client, &config.topic, config.partitions).await?;
        tracing::info!(topic = %config.topic, partitions = partitions.len(), "producing");

        let stats = Arc::new(ProducerStats::default());
        let stop = CancellationToken::new();
        let batch_size = config.batch_size.max(1);
        // The buffer, in batches: at least one waiting besides the one being
        // filled and the one in flight.
        let buffered_batches = (config.buffer_per_partition / batch_size).max(1);
        let mut senders = Vec::with_capacity(partitions.len());
        let mut workers = JoinSet::new();
        for partition in partitions {
            let (sender, receiver) = mpsc::channel(buffered_batches);
            senders.push(sender);
            let first_client = client
                .partition_client(&config.topic, partition, UnknownTopicHandling::Retry)
                .await
                .ok();
            workers.spawn(
                PartitionWorker {
                    intake: Intake {
                        receiver,
                        carried: None,
                        batch_size,
                    },
                    delivery: Delivery {
                        connector: connector.clone(),
                        partition,
                        client: first_client,
                        compression: config.compression,
                        stats: stats.clone(),
                        stop: stop.clone(),
                    },
                }
                .run(),
            );
        }
        Ok(Self {
            senders,
            batch_size,
            workers,
            stats,
            stop,
        })
    }

    /// Partitions of the topic.
    pub fn partitions(&self) -> i32 {
        i32::try_from(self.senders.len()).unwrap_or(i32::MAX)
    }

    /// A probe of the batches waiting for the partitions' workers.
    pub fn queue_probe(&self) -> QueueProbe {
        QueueProbe(self.senders.iter().map(mpsc::Sender::downgrade).collect())
    }

    /// Counters, live.
    pub fn stats(&self) -> Arc<ProducerStats> {
        self.stats.clone()
    }

    /// A new sender, with its own batches, to `partition`'s worker; `None`
    /// if the topic has no such partition.
    pub fn sender(&self, partition: i32) -> Option<RecordSender> {
        let sender = self.senders.get(usize::try_from(partition).ok()?)?;
        Some(RecordSender {
            partition,
            partitions: self.partitions(),
            sender: Some(sender.clone()),
            pending: Batch::default(),
            batch_size: self.batch_size,
        })
    }

    /// Delivers everything buffered, in `senders` (every sender still
    /// alive) and in the workers, waiting at most `timeout`; then stops.
    pub async fn close(
        mut self,
        mut senders: Vec<RecordSender>,
        timeout: Duration,
    ) -> Result<(), ProduceError> {
        self.senders.clear();
        let drained = tokio::time::timeout(timeout, async {
            let mut flushed = Ok(());
            for sender in &mut senders {
                flushed = flushed.and(sender.flush().await);
            }
            senders.iter_mut().for_each(|sender| sender.sender = None);
            while self.workers.join_next().await.is_some() {}
            flushed
        })
        .await;
        match drained {
            Ok(flushed) => flushed?,
            Err(_) => {
                let stranded: usize = senders.iter().map(|sender| sender.pending.len()).sum();
                self.stats
                    .undelivered
                    .fetch_add(stranded as u64, Ordering::Relaxed);
                drop(senders);
                self.stop.cancel();
                while self.workers.join_next().await.is_some() {}
            }
        }
        match self.stats.undelivered.load(Ordering::Relaxed) {
            0 => Ok(()),
            lost => Err(ProduceError::Undelivered(lost)),
        }
    }
}

impl RecordSender {
    /// Queues a record, whose key must go to this sender's partition: a
    /// copy of `key`, and the value `write_value` appends to the buffer it
    /// is given. A full batch goes to the worker, waiting while the
    /// worker's buffer is full; a partial one waits for more records or for
    /// [`RecordSender::flush`].
    pub async fn send(
        &mut self,
        key: &[u8],
        timestamp: DateTime<Utc>,
        write_value: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), ProduceError> {
        debug_assert_eq!(
            rtap::kafka::partition_for_key(key, self.partitions),
            self.partition,
            "a record for another partition"
        );
        self.pending.push(key, timestamp, write_value);
        if self.pending.len() >= self.batch_size {
            self.hand_over().await?;
        }
        Ok(())
    }

    /// Hands the partial batch to the worker: called before the generator
    /// pauses, so that nothing waits for a batch to fill.
    pub async fn flush(&mut self) -> Result<(), ProduceError> {
        if !self.pending.is_empty() {
            self.hand_over().await?;
        }
        Ok(())
    }

    /// Moves the pending batch to the worker. The batch stays pending until
    /// the worker has room, so a close that times out while waiting still
    /// counts it as undelivered.
    async fn hand_over(&mut self) -> Result<(), ProduceError> {
        let gone = ProduceError::WorkerGone(self.partition);
        let permit = match &self.sender {
            Some(sender) => sender.reserve().await.map_err(|_| gone)?,
            None => return Err(gone),
        };
        // The next batch is likely the size of this one: room for that and
        // an eighth more, so that a slightly larger one is not copied as it
        // outgrows its buffer.
        let bytes = self.pending.bytes.len();
        let next = Batch::with_capacity(self.batch_size, bytes + bytes / 8);
        permit.send(std::mem::replace(&mut self.pending, next));
        Ok(())
    }
}

/// Builds clients; a failed partition worker asks for a new one.
struct Connector {
    brokers: Vec<String>,
    topic: String,
    partitions: i32,
}

impl Connector {
    async fn client(&self) -> Result<Client, KafkaError> {
        ClientBuilder::new(self.brokers.clone())
            .client_id("rtap-simulator")
            .backoff_config(BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
                deadline: Some(REQUEST_DEADLINE),
            })
            .build()
            .await
    }

    async fn client_until_reachable(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Client, ProduceError> {
        let mut delay = INITIAL_RETRY_DELAY;
        loop {
            match self.client().await {
                Ok(client) => return Ok(client),
                Err(error) => {
                    tracing::warn!(brokers = ?self.brokers, error = %error, retry_in = ?delay, "Kafka unreachable; retrying");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Err(ProduceError::Interrupted(self.brokers.join(","))),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// A new client for `partition`. The topic is created again if it went
    /// missing (a broker without persistent storage that restarted).
    async fn partition_client(&self, partition: i32) -> Result<PartitionClient, ProduceError> {
        let client = self.client().await.map_err(|source| ProduceError::Kafka {
            context: "cannot connect".into(),
            source,
        })?;
        ensure_topic(&client, &self.topic, self.partitions).await?;
        client
            .partition_client(&self.topic, partition, UnknownTopicHandling::Retry)
            .await
            .map_err(|source| ProduceError::Kafka {
                context: format!("cannot reach the leader of partition {partition}"),
                source,
            })
    }
}

struct PartitionWorker {
    intake: Intake,
    delivery: Delivery,
}

/// The batches waiting for a partition's worker.
struct Intake {
    receiver: mpsc::Receiver<Batch>,
    /// A batch received that did not fit in the previous request.
    carried: Option<Batch>,
    batch_size: usize,
}

/// Produces a partition's requests.
struct Delivery {
    connector: Arc<Connector>,
    partition: i32,
    client: Option<PartitionClient>,
    compression: Compression,
    stats: Arc<ProducerStats>,
    stop: CancellationToken,
}

/// A batch, and its records built for its first produce request.
struct Prepared {
    batch: Batch,
    records: Vec<Record>,
}

impl Prepared {
    fn new(batch: Batch) -> Self {
        let records = batch.records();
        Self { batch, records }
    }
}

impl PartitionWorker {
    /// Produces batches until the channel closes. While a request is in
    /// flight, the batch after it is prepared if it is already waiting, so
    /// building its records does not delay the next request.
    async fn run(self) {
        let Self {
            mut intake,
            mut delivery,
        } = self;
        let mut prepared = None;
        loop {
            let Prepared { batch, records } = match prepared.take() {
                Some(prepared) => prepared,
                None => match intake.next_batch().await {
                    Some(batch) => Prepared::new(batch),
                    None => return,
                },
            };
            let (delivered, next) = tokio::join!(delivery.deliver(&batch, records), async {
                intake.waiting_batch().map(Prepared::new)
            });
            prepared = next;
            if !delivered {
                let mut lost = batch.len() as u64;
                lost += prepared.map_or(0, |next| next.batch.len() as u64);
                lost += intake.discard().await;
                delivery
                    .stats
                    .undelivered
                    .fetch_add(lost, Ordering::Relaxed);
                return;
            }
        }
    }
}

impl Intake {
    /// The next batch to produce, waiting for one.
    async fn next_batch(&mut self) -> Option<Batch> {
        let first = match self.carried.take() {
            Some(batch) => batch,
            None => self.receiver.recv().await?,
        };
        Some(self.merge_waiting(first))
    }

    /// The next batch to produce, if one is waiting.
    fn waiting_batch(&mut self) -> Option<Batch> {
        let first = match self.carried.take() {
            Some(batch) => batch,
            None => self.receiver.try_recv().ok()?,
        };
        Some(self.merge_waiting(first))
    }

    /// `batch`, merged with the batches waiting behind it while they fit in
    /// a batch (partial batches, flushed while the previous request was in
    /// flight, go out together).
    fn merge_waiting(&mut self, mut batch: Batch) -> Batch {
        while batch.len() < self.batch_size {
            let Ok(next) = self.receiver.try_recv() else {
                break;
            };
            if batch.len() + next.len() > self.batch_size {
                self.carried = Some(next);
                break;
            }
            batch.append(&next);
        }
        batch
    }

    /// Closes the channel; returns how many records were left in it.
    async fn discard(&mut self) -> u64 {
        let mut lost = self
            .carried
            .take()
            .map_or(0, |carried| carried.len() as u64);
        self.receiver.close();
        while let Some(batch) = self.receiver.recv().await {
            lost += batch.len() as u64;
        }
        lost
    }
}

impl Delivery {
    /// Produces `batch`, whose records for the first attempt are `records`,
    /// retrying until it is stored; `false` if stopped first.
    async fn deliver(&mut self, batch: &Batch, records: Vec<Record>) -> bool {
        let mut delay = INITIAL_RETRY_DELAY;
        let count = batch.len();
        let bytes = batch.bytes.len();
        let mut first_attempt = Some(records);
        loop {
            if self.client.is_none() {
                match self.connector.partition_client(self.partition).await {
                    Ok(client) => self.client = Some(client),
                    Err(error) => {
                        tracing::warn!(partition = self.partition, error = %error, retry_in = ?delay, "Kafka unreachable; retrying");
                    }
                }
            }
            if let Some(client) = &self.client {
                let records = first_attempt.take().unwrap_or_else(|| batch.records());
                let started = std::time::Instant::now();
                let produced = client.produce(records, self.compression).await;
                metrics::histogram!(crate::telemetry::PRODUCE_DURATION)
                    .record(started.elapsed().as_secs_f64());
                match produced {
                    Ok(_) => {
                        self.stats
                            .acknowledged
                            .fetch_add(count as u64, Ordering::Relaxed);
                        self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        return true;
                    }
                    Err(error) => {
                        self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(partition = self.partition, records = count, error = %error, retry_in = ?delay, "produce failed; retrying on a new connection");
                        self.client = None;
                    }
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }
}

/// Records of one partition, their keys and values in one buffer.
#[derive(Debug, Default)]
struct Batch {
    bytes: Vec<u8>,
    records: Vec<BatchRecord>,
}

/// A record of a [`Batch`]: the lengths of its key and value, which follow
/// those of the records before it in the buffer.
#[derive(Debug, Clone, Copy)]
struct BatchRecord {
    key: usize,
    value: usize,
    timestamp: DateTime<Utc>,
}

impl Batch {
    fn with_capacity(records: usize, bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            records: Vec::with_capacity(records),
        }
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn push(
        &mut self,
        key: &[u8],
        timestamp: DateTime<Utc>,
        write_value: impl FnOnce(&mut Vec<u8>),
    ) {
        self.bytes.extend_from_slice(key);
        let value_start = self.bytes.len();
        write_value(&mut self.bytes);
        self.records.push(BatchRecord {
            key: key.len(),
            value: self.bytes.len() - value_start,
            timestamp,
        });
    }

    /// Adds `other`'s records after these.
    fn append(&mut self, other: &Self) {
        self.bytes.extend_from_slice(&other.bytes);
        self.records.extend_from_slice(&other.records);
    }

    /// The records, built for rskafka (which takes them).
    fn records(&self) -> Vec<Record> {
        let mut rest = self.bytes.as_slice();
        let mut take = |len: usize| {
            let (part, tail) = rest.split_at(len);
            rest = tail;
            part.to_vec()
        };
        self.records
            .iter()
            .map(|record| Record {
                key: Some(take(record.key)),
                value: Some(take(record.value)),
                headers: Default::default(),
                timestamp: record.timestamp,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_rebuilds_its_records_as_often_as_needed() {
        let at = |seconds| DateTime::from_timestamp(seconds, 0).unwrap_or_default();
        let record = |key: &[u8], value: &[u8], seconds| Record {
            key: Some(key.to_vec()),
            value: Some(value.to_vec()),
            headers: Default::default(),
            timestamp: at(seconds),
        };
        let value = |bytes: &'static [u8]| move |buffer: &mut Vec<u8>| buffer.extend(bytes);
        let mut batch = Batch::with_capacity(1, 0);
        batch.push(b"42", at(1), value(b"an event"));
        batch.push(b"", at(2), value(b""));
        let mut later = Batch::default();
        later.push(b"7", at(3), value(b"another event"));
        batch.append(&later);
        let expected = vec![
            record(b"42", b"an event", 1),
            record(b"", b"", 2),
            record(b"7", b"another event", 3),
        ];
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.records(), expected);
        assert_eq!(batch.records(), expected, "rebuilt for a retry");
    }
}
