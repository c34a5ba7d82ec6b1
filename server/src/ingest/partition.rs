//! One partition's pipeline: fetch → validate → aggregate → write → publish.
//!
//! The logic is generic over where records come from ([`RecordSource`]),
//! where dead letters go ([`DeadLetters`]) and where batches are written
//! ([`BatchWriter`]), so that dead-lettering, deduplication, chunking,
//! resuming from the stored offset and a lost commit are unit-tested with no
//! service at all. [`super::consumer`] plugs in rskafka and the store's
//! [`PartitionWriter`].

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use prost::Message;
use rskafka::{
    client::{
        error::{Error as KafkaError, ProtocolError},
        partition::{OffsetAt, PartitionClient},
    },
    record::{Record, RecordAndOffset},
};
use rtap::v1::InteractionEvent;
use tokio::sync::mpsc;

use super::{
    consumer::{PipelineSettings, PipelineStats},
    dead_letter::{DeadLetterSink, dead_letter},
    dedupe::{Dedupe, EventId},
    publisher::Published,
    validate::{self, Reason, Rejection},
};
use crate::store::{
    Granularity, StoreError,
    aggregate::{BatchAggregate, event_time_ms},
    commit::{Committed, Prefetched},
    writer::{BatchWrite, PartitionWriter, Position, Prefetch},
};
use crate::telemetry::ingest::{CommitFigures, PartitionMetrics};

/// Why a partition's consumer starts over.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsumeError {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The dead-letter topic refused the batch's rejects.
    #[error("dead-letter topic {topic}: {source}")]
    DeadLetter {
        /// The topic.
        topic: String,
        /// What failed.
        source: KafkaError,
    },
    /// Redis failed, or a commit was fenced.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored offset is beyond the partition's end.
    #[error(
        "stored offset {stored} is past the end of the partition (high watermark {high_watermark}): the topic was recreated or lost data; rebuild this namespace or use another one"
    )]
    OffsetBeyondEnd {
        /// The stored offset.
        stored: i64,
        /// The partition's end.
        high_watermark: i64,
    },
    /// The fetch task died.
    #[error("the fetch task stopped unexpectedly")]
    FetcherStopped,
    /// Another process holds the partition's lease.
    #[error("partition is consumed by another process ({holder}); waiting for its lease to expire")]
    Leased {
        /// Its owner id.
        holder: String,
    },
}

/// Where a partition's records come from (rskafka's partition client).
pub(crate) trait RecordSource: Send + Sync + 'static {
    /// Records from `offset` on, at most about `max_bytes`, waiting at most
    /// `max_wait_ms` for some; and the partition's high watermark.
    fn fetch(
        &self,
        offset: i64,
        max_bytes: i32,
        max_wait_ms: i32,
    ) -> impl Future<Output = Result<(Vec<RecordAndOffset>, i64), KafkaError>> + Send;

    /// The earliest offset the partition still keeps.
    fn earliest(&self) -> impl Future<Output = Result<i64, KafkaError>> + Send;
}

impl RecordSource for PartitionClient {
    async fn fetch(
        &self,
        offset: i64,
        max_bytes: i32,
        max_wait_ms: i32,
    ) -> Result<(Vec<RecordAndOffset>, i64), KafkaError> {
        self.fetch_records(offset, 1..max_bytes, max_wait_ms).await
    }

    async fn earliest(&self) -> Result<i64, KafkaError> {
        self.get_offset(OffsetAt::Earliest).await
    }
}

/// Where rejected records go (the dead-letter topic).
pub(crate) trait DeadLetters: Send + Sync {
    /// Stores `records`; returns once they are acknowledged.
    fn send(&self, records: Vec<Record>) -> impl Future<Output = Result<(), KafkaError>> + Send;
}

impl DeadLetters for DeadLetterSink {
    async fn send(&self, records: Vec<Record>) -> Result<(), KafkaError> {
        DeadLetterSink::send(self, records).await
    }
}

/// Where a partition's batches are written (the store's
/// [`PartitionWriter`], the only code that writes a partition's keys).
pub(crate) trait BatchWriter: Send {
    /// Where the partition stands.
    fn position(&self) -> Position;

    /// What folding a batch needs to know.
    fn prefetch(
        &mut self,
        ask: Prefetch,
    ) -> impl Future<Output = Result<Prefetched, StoreError>> + Send;

    /// Commits a batch, fenced on the stored offset; moves the position.
    fn commit(
        &mut self,
        batch: &BatchAggregate,
        write: BatchWrite,
    ) -> impl Future<Output = Result<Committed, StoreError>> + Send;
}

impl BatchWriter for PartitionWriter {
    fn position(&self) -> Position {
        PartitionWriter::position(self)
    }

    async fn prefetch(&mut self, ask: Prefetch) -> Result<Prefetched, StoreError> {
        PartitionWriter::prefetch(self, ask).await
    }

    async fn commit(
        &mut self,
        batch: &BatchAggregate,
        write: BatchWrite,
    ) -> Result<Committed, StoreError> {
        PartitionWriter::commit(self, batch, write).await
    }
}

/// Records of one fetch.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    /// The records, in offset order.
    pub(crate) records: Vec<RecordAndOffset>,
    /// Set when the stored offset fell out of the topic's retention and the
    /// consumer moved to the earliest offset still kept.
    pub(crate) skipped_to: Option<i64>,
}

/// Where to start reading: the stored offset, else the earliest kept.
pub(crate) async fn resume_offset(
    position: Position,
    source: &impl RecordSource,
) -> Result<i64, KafkaError> {
    match position.stored {
        Some(offset) => Ok(offset),
        None => source.earliest().await,
    }
}

/// Fetches from `offset` on, one batch ahead of the consumer, until the
/// consumer goes away or a fetch fails (sent as the last item).
pub(crate) async fn fetch(
    source: impl RecordSource,
    mut offset: i64,
    (max_bytes, max_wait): (i32, Duration),
    latest_high_watermark: Arc<AtomicI64>,
    batches: mpsc::Sender<Result<Fetched, ConsumeError>>,
) {
    let max_wait_ms = i32::try_from(max_wait.as_millis()).unwrap_or(i32::MAX);
    loop {
        let batch = match source.fetch(offset, max_bytes, max_wait_ms).await {
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
                            tokio::time::sleep(max_wait).await;
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
async fn out_of_range(source: &impl RecordSource, offset: i64) -> Result<i64, ConsumeError> {
    let earliest = source.earliest().await?;
    if offset < earliest {
        return Ok(earliest);
    }
    // A small fetch with a short wait (see `infra::kafka::high_watermark`).
    let (_, high_watermark) = source.fetch(earliest, 1024, 10).await?;
    Err(ConsumeError::OffsetBeyondEnd {
        stored: offset,
        high_watermark,
    })
}

/// A chunk's records, decoded and checked.
struct Checked {
    /// Valid events with their ids and their time on the dedupe clock.
    valid: Vec<(EventId, i64, InteractionEvent)>,
    /// Dead letters to send.
    rejected: Vec<Record>,
    /// Dead letters per reason.
    dead_counts: BTreeMap<&'static str, i64>,
    /// The dedupe clock, advanced over the chunk.
    dedupe: Dedupe,
}

impl Checked {
    /// What folding the valid events needs read.
    fn prefetch(&self, now_ms: i64) -> Prefetch {
        let mut sessions = HashSet::with_capacity(self.valid.len());
        let mut minutes = Vec::new();
        for (_, _, event) in &self.valid {
            minutes.push(Granularity::Minute.bucket_start(event_time_ms(event).div_euclid(1000)));
            sessions.insert((event.user_id, event.session_id.clone()));
        }
        minutes.sort_unstable();
        minutes.dedup();
        Prefetch {
            ids: self.valid.iter().map(|(id, _, _)| *id).collect(),
            dedupe_generations: self.dedupe.stored_generations(),
            sessions,
            minutes,
            now_ms,
        }
    }
}

/// Applies fetched records to a partition: what one consumer attempt shares.
pub(crate) struct Applier<'a, D> {
    /// The pipeline's settings.
    pub(crate) settings: &'a PipelineSettings,
    /// The partition's dead-letter destination.
    pub(crate) dead_letters: &'a D,
    /// Counters of this process.
    pub(crate) stats: &'a PipelineStats,
    /// The publisher's queue.
    pub(crate) deltas: &'a mpsc::Sender<Published>,
    /// The partition.
    pub(crate) partition: i32,
    /// The partition's Prometheus metrics.
    pub(crate) metrics: &'a PartitionMetrics,
    /// The latest high watermark the fetcher saw (negative: none yet).
    pub(crate) high_watermark: &'a AtomicI64,
}

impl<D: DeadLetters> Applier<'_, D> {
    /// Applies one fetch: in chunks of at most `--commit-max-events`
    /// records, each committed on its own.
    pub(crate) async fn apply(
        &self,
        writer: &mut impl BatchWriter,
        fetched: Fetched,
        now: DateTime<Utc>,
    ) -> Result<(), ConsumeError> {
        if let Some(earliest) = fetched.skipped_to {
            let position = writer.position();
            let empty = BatchAggregate::new(position.watermark_ms, HashMap::new(), 0);
            let write = BatchWrite {
                next_offset: earliest,
                now_ms: now.timestamp_millis(),
                ..BatchWrite::default()
            };
            writer.commit(&empty, write).await?;
            self.publish(&empty, position.stored, (earliest, earliest));
        }
        for chunk in fetched
            .records
            .chunks(self.settings.commit_max_events.max(1))
        {
            self.apply_chunk(writer, chunk, now).await?;
        }
        Ok(())
    }

    async fn apply_chunk(
        &self,
        writer: &mut impl BatchWriter,
        chunk: &[RecordAndOffset],
        now: DateTime<Utc>,
    ) -> Result<(), ConsumeError> {
        let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
            return Ok(());
        };
        let position = writer.position();
        let mut checked = self.validate(chunk, position, now);
        let rejected = std::mem::take(&mut checked.rejected);
        let dead_lettered = rejected.len();
        self.dead_letters
            .send(rejected)
            .await
            .map_err(|source| ConsumeError::DeadLetter {
                topic: self.settings.dead_letter_topic.clone(),
                source,
            })?;
        let prefetched = writer
            .prefetch(checked.prefetch(now.timestamp_millis()))
            .await?;
        let round_trips = prefetched.round_trips;
        let next_offset = last.offset + 1;
        let (batch, write) = self.aggregate(checked, prefetched, position, next_offset, now);
        let duplicates = write.duplicates;
        let dead_by_reason = write.dead_lettered.clone();
        let started = Instant::now();
        let committed = writer.commit(&batch, write).await?;
        self.metrics.committed(
            CommitFigures {
                records: chunk.len(),
                applied: batch.applied,
                duplicates,
                late: batch.late,
                round_trips: round_trips + committed.round_trips,
                took: started.elapsed(),
                next_offset,
                high_watermark: self.high_watermark.load(Ordering::Relaxed),
            },
            &dead_by_reason,
        );
        self.stats.counted(
            (chunk.len(), batch.applied, duplicates, dead_lettered),
            committed,
            round_trips,
        );
        self.publish(&batch, position.stored, (first.offset, next_offset));
        Ok(())
    }

    /// Decodes and validates every record of `chunk`, and places each on
    /// the dedupe clock.
    fn validate(
        &self,
        chunk: &[RecordAndOffset],
        position: Position,
        now: DateTime<Utc>,
    ) -> Checked {
        let settings = self.settings;
        let mut checked = Checked {
            valid: Vec::with_capacity(chunk.len()),
            rejected: Vec::new(),
            dead_counts: BTreeMap::new(),
            dedupe: Dedupe::new(settings.dedupe_window_ms, position.dedupe_clock_ms),
        };
        for record in chunk {
            let stamped = checked
                .dedupe
                .stamp(record.record.timestamp.timestamp_millis());
            let decoded = match record.record.value.as_deref() {
                Some(bytes) => validate::decode(bytes, now, settings.bounds),
                None => Err(Rejection {
                    reason: Reason::DecodeError,
                    violations: Vec::new(),
                    detail: "the record has no value".into(),
                }),
            };
            match decoded {
                Ok(event) => {
                    // The validator guarantees a UUID.
                    let id = uuid::Uuid::try_parse(&event.event_id)
                        .map(|id| id.into_bytes())
                        .unwrap_or_default();
                    checked.valid.push((id, stamped, event));
                }
                Err(rejection) => {
                    *checked
                        .dead_counts
                        .entry(rejection.reason.as_str())
                        .or_default() += 1;
                    let letter = dead_letter(record, &settings.topic, self.partition, &rejection);
                    checked.rejected.push(letter);
                }
            }
        }
        checked
    }

    /// Folds the events that are not duplicates, and what the commit writes
    /// besides.
    fn aggregate(
        &self,
        checked: Checked,
        prefetched: Prefetched,
        position: Position,
        next_offset: i64,
        now: DateTime<Utc>,
    ) -> (BatchAggregate, BatchWrite) {
        let Checked {
            valid,
            dead_counts,
            mut dedupe,
            ..
        } = checked;
        let gap = self.settings.session_gap_ms;
        let mut batch = BatchAggregate::new(position.watermark_ms, prefetched.sessions, gap);
        let mut duplicates = 0;
        for (index, (id, stamped, event)) in valid.iter().enumerate() {
            let stored = prefetched.counted_in.get(index).copied().flatten();
            if dedupe.is_duplicate(*id, *stamped, stored) {
                duplicates += 1;
            } else {
                batch.add(event);
            }
        }
        let write = BatchWrite {
            next_offset,
            duplicates,
            dedupe: dedupe.into_changes(),
            dead_lettered: dead_counts.into_iter().collect(),
            now_ms: now.timestamp_millis(),
        };
        (batch, write)
    }

    /// Hands the batch's delta to the publisher, which can drop it but never
    /// delays the partition. Every commit publishes one, even one that
    /// counted nothing, so subscribers can tell from `previous` (the stored
    /// offset the commit moved from) that they missed one.
    fn publish(
        &self,
        batch: &BatchAggregate,
        previous: Option<i64>,
        (first_offset, next_offset): (i64, i64),
    ) {
        let mut delta = batch.delta(self.partition, first_offset, next_offset);
        delta.previous_next_offset = previous;
        if self
            .deltas
            .try_send((self.partition, delta.encode_to_vec()))
            .is_err()
        {
            self.stats.deltas_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::telemetry::DELTAS_DROPPED).increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rtap::v1::{EventType, Source};

    use super::*;
    use crate::{config::Config, infra::kafka::Brokers};

    /// What a fake store holds: the committed position, counts and ids.
    #[derive(Debug, Default)]
    struct Stored {
        position: Position,
        counted: HashMap<EventId, i64>,
        applied: i64,
        duplicates: i64,
        dead_lettered: i64,
        commits: usize,
        /// The next commit is applied but its reply is lost.
        lose_next_reply: bool,
    }

    /// A writer over [`Stored`], fenced on the offset like the real one.
    struct FakeWriter {
        stored: Arc<Mutex<Stored>>,
        position: Position,
    }

    impl FakeWriter {
        /// Opens a writer as a consumer (re)starting would.
        fn open(stored: &Arc<Mutex<Stored>>) -> Self {
            let position = stored.lock().map(|s| s.position).unwrap_or_default();
            Self {
                stored: stored.clone(),
                position,
            }
        }
    }

    impl BatchWriter for FakeWriter {
        fn position(&self) -> Position {
            self.position
        }

        async fn prefetch(&mut self, ask: Prefetch) -> Result<Prefetched, StoreError> {
            let stored = self.stored.lock().expect("not poisoned");
            let counted_in = |id: &EventId| {
                let generation = stored.counted.get(id).copied()?;
                ask.dedupe_generations
                    .contains(&generation)
                    .then_some(generation)
            };
            Ok(Prefetched {
                counted_in: ask.ids.iter().map(counted_in).collect(),
                sessions: HashMap::new(),
                round_trips: 1,
            })
        }

        async fn commit(
            &mut self,
            batch: &BatchAggregate,
            write: BatchWrite,
        ) -> Result<Committed, StoreError> {
            let mut stored = self.stored.lock().expect("not poisoned");
            if stored.position.stored != self.position.stored {
                return Err(StoreError::Fenced {
                    partition: 0,
                    detail: "the offset moved".into(),
                });
            }
            stored.applied += batch.applied;
            stored.duplicates += write.duplicates;
            stored.dead_lettered += write.dead_lettered.iter().map(|(_, n)| n).sum::<i64>();
            for (generation, ids) in &write.dedupe.counted {
                stored
                    .counted
                    .extend(ids.iter().map(|id| (*id, *generation)));
            }
            let forgotten = &write.dedupe.forgotten;
            stored
                .counted
                .retain(|_, generation| !forgotten.contains(generation));
            stored.position = Position {
                stored: Some(write.next_offset),
                watermark_ms: batch.watermark_ms,
                dedupe_clock_ms: write.dedupe.clock_ms.or(stored.position.dedupe_clock_ms),
            };
            stored.commits += 1;
            if std::mem::take(&mut stored.lose_next_reply) {
                let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reply lost");
                return Err(StoreError::Redis(lost.into()));
            }
            self.position = stored.position;
            Ok(Committed {
                commands: 1,
                round_trips: 1,
            })
        }
    }

    #[derive(Default)]
    struct FakeDeadLetters(Mutex<Vec<Record>>);

    impl DeadLetters for FakeDeadLetters {
        async fn send(&self, records: Vec<Record>) -> Result<(), KafkaError> {
            self.0.lock().expect("not poisoned").extend(records);
            Ok(())
        }
    }

    /// A partition's log, from `earliest` on.
    struct FakeSource {
        earliest: i64,
        log: Vec<RecordAndOffset>,
    }

    impl RecordSource for FakeSource {
        async fn fetch(
            &self,
            offset: i64,
            _max_bytes: i32,
            max_wait_ms: i32,
        ) -> Result<(Vec<RecordAndOffset>, i64), KafkaError> {
            let end = self.log.last().map_or(self.earliest, |r| r.offset + 1);
            let records: Vec<_> = self
                .log
                .iter()
                .filter(|r| r.offset >= offset)
                .cloned()
                .collect();
            if records.is_empty() {
                // As a broker holds a fetch with nothing to return.
                let wait = u64::try_from(max_wait_ms).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Ok((records, end))
        }

        async fn earliest(&self) -> Result<i64, KafkaError> {
            Ok(self.earliest)
        }
    }

    fn settings(commit_max_events: usize) -> PipelineSettings {
        let config = Config::from_env().expect("the default configuration parses");
        PipelineSettings {
            commit_max_events,
            ..PipelineSettings::from_config(&config, Brokers::plaintext(Vec::new()))
        }
    }

    /// A valid event of `user` with id `id`, a minute old.
    fn event(id: u8, user: i64) -> Vec<u8> {
        let now = Utc::now().timestamp() - 60;
        InteractionEvent {
            event_id: uuid::Uuid::from_bytes([id; 16]).to_string(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: now,
                nanos: 0,
            }),
            user_id: user,
            product_id: 3,
            source: Source::Web as i32,
            r#type: EventType::ProductView as i32,
            session_id: format!("s-{user}"),
            ..InteractionEvent::default()
        }
        .encode_to_vec()
    }

    /// Records at offsets from `first` on, all stamped now.
    fn log(first: i64, values: Vec<Option<Vec<u8>>>) -> Vec<RecordAndOffset> {
        (first..)
            .zip(values)
            .map(|(offset, value)| RecordAndOffset {
                record: Record {
                    key: None,
                    value,
                    headers: BTreeMap::new(),
                    timestamp: Utc::now(),
                },
                offset,
            })
            .collect()
    }

    struct Harness {
        settings: PipelineSettings,
        dead_letters: FakeDeadLetters,
        stats: PipelineStats,
        deltas: (mpsc::Sender<Published>, mpsc::Receiver<Published>),
        metrics: PartitionMetrics,
        high_watermark: AtomicI64,
    }

    impl Harness {
        fn new(commit_max_events: usize) -> Self {
            Self {
                settings: settings(commit_max_events),
                dead_letters: FakeDeadLetters::default(),
                stats: PipelineStats::default(),
                deltas: mpsc::channel(64),
                metrics: PartitionMetrics::new(0, &[]),
                high_watermark: AtomicI64::new(-1),
            }
        }

        fn applier(&self) -> Applier<'_, FakeDeadLetters> {
            Applier {
                settings: &self.settings,
                dead_letters: &self.dead_letters,
                stats: &self.stats,
                deltas: &self.deltas.0,
                partition: 0,
                metrics: &self.metrics,
                high_watermark: &self.high_watermark,
            }
        }

        async fn apply(
            &self,
            writer: &mut FakeWriter,
            records: Vec<RecordAndOffset>,
        ) -> Result<(), ConsumeError> {
            let fetched = Fetched {
                records,
                skipped_to: None,
            };
            self.applier().apply(writer, fetched, Utc::now()).await
        }
    }

    #[tokio::test]
    async fn poison_is_dead_lettered_and_repeats_are_skipped_without_stopping_the_partition() {
        let harness = Harness::new(100);
        let stored = Arc::new(Mutex::new(Stored::default()));
        let mut writer = FakeWriter::open(&stored);
        let records = log(
            0,
            vec![
                Some(event(1, 7)),
                Some(b"not protobuf".to_vec()),
                Some(event(1, 7)),
                None,
                Some(event(2, 8)),
            ],
        );
        harness.apply(&mut writer, records).await.expect("applied");
        let stored = stored.lock().expect("not poisoned");
        assert_eq!(stored.applied, 2);
        assert_eq!(stored.duplicates, 1);
        assert_eq!(stored.dead_lettered, 2);
        assert_eq!(stored.position.stored, Some(5));
        assert_eq!(
            harness.dead_letters.0.lock().expect("not poisoned").len(),
            2
        );
    }

    #[tokio::test]
    async fn a_fetch_is_committed_in_chunks_and_each_chunk_publishes_a_delta() {
        let mut harness = Harness::new(3);
        let stored = Arc::new(Mutex::new(Stored::default()));
        let mut writer = FakeWriter::open(&stored);
        let values = (1..=10).map(|id| Some(event(id, i64::from(id)))).collect();
        harness
            .apply(&mut writer, log(0, values))
            .await
            .expect("applied");
        {
            let stored = stored.lock().expect("not poisoned");
            assert_eq!(stored.commits, 4);
            assert_eq!(stored.applied, 10);
            assert_eq!(stored.position.stored, Some(10));
        }
        let mut deltas = 0;
        while harness.deltas.1.try_recv().is_ok() {
            deltas += 1;
        }
        assert_eq!(deltas, 4);
    }

    #[tokio::test]
    async fn a_repeat_in_a_later_fetch_is_a_duplicate() {
        let harness = Harness::new(100);
        let stored = Arc::new(Mutex::new(Stored::default()));
        let mut writer = FakeWriter::open(&stored);
        harness
            .apply(&mut writer, log(0, vec![Some(event(1, 7))]))
            .await
            .expect("applied");
        harness
            .apply(
                &mut writer,
                log(1, vec![Some(event(1, 7)), Some(event(2, 7))]),
            )
            .await
            .expect("applied");
        let stored = stored.lock().expect("not poisoned");
        assert_eq!((stored.applied, stored.duplicates), (2, 1));
    }

    #[tokio::test]
    async fn a_consumer_resumes_from_the_stored_offset_else_the_earliest_kept() {
        let source = FakeSource {
            earliest: 3,
            log: log(3, vec![Some(event(1, 1)), Some(event(2, 2))]),
        };
        let fresh = Position::default();
        assert_eq!(resume_offset(fresh, &source).await.expect("offset"), 3);
        let stored = Position {
            stored: Some(4),
            ..Position::default()
        };
        assert_eq!(resume_offset(stored, &source).await.expect("offset"), 4);
    }

    #[tokio::test]
    async fn a_lost_commit_reply_is_resumed_from_the_stored_offset_and_counted_once() {
        let harness = Harness::new(2);
        let source = FakeSource {
            earliest: 0,
            log: log(0, (1..=6).map(|id| Some(event(id, 9))).collect()),
        };
        let stored = Arc::new(Mutex::new(Stored {
            lose_next_reply: true,
            ..Stored::default()
        }));
        let mut writer = FakeWriter::open(&stored);
        let everything = source.fetch(0, 1 << 20, 0).await.expect("fetched").0;
        // The first chunk is stored, but the consumer hears of a failure.
        let failed = harness.apply(&mut writer, everything.clone()).await;
        assert!(matches!(
            failed,
            Err(ConsumeError::Store(StoreError::Redis(_)))
        ));
        // The stale writer can no longer commit: the offset moved.
        let fenced = harness.apply(&mut writer, everything).await;
        assert!(matches!(
            fenced,
            Err(ConsumeError::Store(StoreError::Fenced { .. }))
        ));

        // A new attempt reads where the store stands and goes on from there.
        let mut writer = FakeWriter::open(&stored);
        let start = resume_offset(writer.position(), &source)
            .await
            .expect("offset");
        assert_eq!(start, 2);
        let rest = source.fetch(start, 1 << 20, 0).await.expect("fetched").0;
        harness.apply(&mut writer, rest).await.expect("applied");
        let stored = stored.lock().expect("not poisoned");
        assert_eq!((stored.applied, stored.duplicates), (6, 0));
        assert_eq!(stored.position.stored, Some(6));
    }

    #[tokio::test]
    async fn the_fetcher_sends_records_from_its_offset_in_order() {
        let source = FakeSource {
            earliest: 0,
            log: log(0, (1..=4).map(|id| Some(event(id, 1))).collect()),
        };
        let (sender, mut batches) = mpsc::channel(1);
        let high_watermark = Arc::new(AtomicI64::new(-1));
        let fetcher = tokio::spawn(fetch(
            source,
            1,
            (1 << 20, Duration::from_millis(1)),
            high_watermark.clone(),
            sender,
        ));
        let first = batches.recv().await.expect("a batch").expect("records");
        let offsets: Vec<i64> = first.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [1, 2, 3]);
        assert_eq!(high_watermark.load(Ordering::Relaxed), 4);
        fetcher.abort();
    }
}
