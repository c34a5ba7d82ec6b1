//! One simulation run: population, generator and producer wired together,
//! paced, with progress and a final summary.

use std::{
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    catalog::{self, CatalogError},
    config::{ProgressArg, SimulatorConfig},
    model::{self, Generator, ModelError, Population},
    producer::{ProduceError, Producer, ProducerConfig, ProducerStats, RecordSender},
    telemetry::{self, ShardExport},
    truth::GroundTruth,
};

/// Event rate the session model assumes when production is unpaced: half
/// what the default million users can sustain (about 970 events/s; see
/// `--users`). At 1,000 the model ran at its cap, warned of too few users
/// though none were asked for, and a session start drew several users who
/// were all busy before finding a free one.
pub const UNPACED_MODEL_RATE: f64 = 500.0;
/// Pacing sleeps only when this far ahead, so a high rate is not a sleep per
/// event.
const PACING_SLACK: Duration = Duration::from_millis(2);
/// Records produced between two looks at the shutdown token.
const SHUTDOWN_CHECK_EVERY: u64 = 64;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The model's parameters are unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Kafka failed.
    #[error(transparent)]
    Produce(#[from] ProduceError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A generator task panicked or was cancelled.
    #[error("a generator stopped unexpectedly: {0}")]
    GeneratorStopped(String),
    /// The ground truth could not be written.
    #[error("cannot write the ground truth to {path}: {source}")]
    Truth {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// What a run produced, and how long producing took (from the first record
/// to the last acknowledgement, start-up excluded).
#[derive(Debug)]
pub struct RunReport {
    /// The ground truth.
    pub truth: GroundTruth,
    /// Time spent producing.
    pub elapsed: Duration,
}

/// Runs the simulation until `--count`, `--duration` or `shutdown`, then
/// flushes and returns what was produced.
///
/// One generator per partition of the topic, each simulating the users
/// whose records go to that partition, with its own seed derived from the
/// run's: the generators run in parallel, and each partition's log is the
/// same for the same seed, start time and partition count. (Kafka orders
/// nothing across partitions.)
pub async fn run(
    config: SimulatorConfig,
    shutdown: CancellationToken,
) -> Result<RunReport, RunError> {
    let seed = config.seed.unwrap_or_else(|| rand::rng().random());
    let start_time = config.start_time.unwrap_or_else(Utc::now);
    tracing::info!(seed, start_time = %start_time, "simulation starting (replay with --seed and --start-time)");
    model::validate(&config.model)?;

    let client = rtap::client::ClientSettings {
        api_key: config.api_key.clone(),
        tls_ca: config.tls_ca.clone(),
        tls_server_name: config.tls_server_name.clone(),
        tls_identity: None,
    };
    let population = catalog::population(
        config.server_addr.as_deref(),
        &client,
        config.seed_users,
        config.seed_products,
        config.users,
        config.products,
    )
    .await?;
    if population.users.is_empty() || population.products.is_empty() {
        return Err(ModelError::EmptyPopulation.into());
    }
    let producer = Producer::start(
        ProducerConfig {
            brokers: config.kafka_brokers.clone(),
            topic: config.topic.clone(),
            partitions: config.partitions,
            compression: config.compression.into(),
            batch_size: config.batch_size as usize,
            buffer_per_partition: config.buffer_per_partition as usize,
        },
        shutdown.clone(),
    )
    .await?;

    let sent = Arc::new(AtomicU64::new(0));
    let stop = shutdown.child_token();
    let shards = shards(
        &config,
        &population,
        &producer,
        seed,
        start_time,
        &sent,
        &stop,
    )?;
    tokio::spawn(telemetry::export(
        producer.stats(),
        producer.queue_probe(),
        stop.clone(),
    ));
    let progress = Progress::start(
        config.progress,
        config.count,
        sent.clone(),
        producer.stats(),
    );
    let started = Instant::now();
    let truth = GroundTruth::new(seed, config.truth_file.is_some());
    let (mut truth, senders, failure) = run_shards(shards, started, truth, &stop).await;

    let stats = producer.stats();
    let flushed = producer.close(senders, config.flush_timeout).await;
    progress.finish();
    truth.finish();
    let elapsed = started.elapsed();
    log_summary(&truth, &stats, elapsed);
    if let Some(error) = failure {
        return Err(error);
    }
    flushed?;
    if let Some(path) = &config.truth_file {
        truth.write(path).map_err(|source| RunError::Truth {
            path: path.display().to_string(),
            source,
        })?;
        tracing::info!(path = %path.display(), "ground truth written");
    }
    Ok(RunReport { truth, elapsed })
}

/// A shard for each partition with users, with its share of the rate and of
/// the count.
#[expect(
    clippy::result_large_err,
    reason = "called once a run, and its error is the one `run` returns"
)]
fn shards(
    config: &SimulatorConfig,
    population: &Population,
    producer: &Producer,
    seed: u64,
    start_time: DateTime<Utc>,
    sent: &Arc<AtomicU64>,
    stop: &CancellationToken,
) -> Result<Vec<Shard>, RunError> {
    let model_rate = config.rate.unwrap_or(UNPACED_MODEL_RATE) / config.speedup;
    let parts = by_partition(population, producer.partitions());
    let sizes: Vec<usize> = parts.iter().map(|(_, part)| part.users.len()).collect();
    let limits = match config.count {
        Some(count) => split(count, &sizes).into_iter().map(Some).collect(),
        None => vec![None; sizes.len()],
    };
    let mut shards = Vec::with_capacity(parts.len());
    for ((partition, part), limit) in parts.into_iter().zip(limits) {
        let share = part.users.len() as f64 / population.users.len() as f64;
        shards.push(Shard {
            generator: Generator::new(
                config.model.clone(),
                part,
                shard_seed(seed, partition),
                start_time,
                model_rate * share,
            )?,
            sender: producer
                .sender(partition)
                .ok_or(ProduceError::WorkerGone(partition))?,
            truth: GroundTruth::new(seed, config.truth_file.is_some()),
            limit,
            rate: config.rate.map(|rate| rate * share),
            speedup: config.speedup,
            duration: config.duration,
            start_time,
            export: ShardExport::default(),
            sent: sent.clone(),
            shutdown: stop.clone(),
        });
    }
    Ok(shards)
}

/// Runs the shards in parallel until each is done, and merges their truths
/// into `truth`. Returns it, every shard's sender (the producer flushes
/// them at close) and the first failure, after which `stop` stopped the
/// others.
async fn run_shards(
    shards: Vec<Shard>,
    started: Instant,
    mut truth: GroundTruth,
    stop: &CancellationToken,
) -> (GroundTruth, Vec<RecordSender>, Option<RunError>) {
    let mut tasks = JoinSet::new();
    for shard in shards {
        tasks.spawn(shard.run(started));
    }
    let mut senders = Vec::new();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let outcome = match joined {
            Ok((shard_truth, sender, outcome)) => {
                truth.merge(shard_truth);
                senders.push(sender);
                outcome.map_err(RunError::from)
            }
            Err(error) => Err(RunError::GeneratorStopped(error.to_string())),
        };
        if let Err(error) = outcome {
            stop.cancel();
            failure.get_or_insert(error);
        }
    }
    (truth, senders, failure)
}

/// The run's totals, in one log line.
fn log_summary(truth: &GroundTruth, stats: &ProducerStats, elapsed: Duration) {
    tracing::info!(
        records = truth.records,
        events = truth.events,
        duplicates = truth.duplicates,
        malformed = truth.malformed.values().sum::<u64>(),
        late = truth.late_events,
        acknowledged = stats.acknowledged.load(Ordering::Relaxed),
        elapsed = ?elapsed,
        rate = truth.records as f64 / elapsed.as_secs_f64().max(1e-9),
        by_source = ?truth.events_by_source,
        by_type = ?truth.events_by_type,
        "simulation finished"
    );
}

/// One partition's generator and what it needs to run.
struct Shard {
    generator: Generator,
    sender: RecordSender,
    truth: GroundTruth,
    /// Records to produce, if counted.
    limit: Option<u64>,
    /// Records per second, if paced.
    rate: Option<f64>,
    speedup: f64,
    duration: Option<Duration>,
    start_time: DateTime<Utc>,
    /// Records produced by all shards, for the progress display.
    sent: Arc<AtomicU64>,
    /// What the metrics were told of this shard's counts.
    export: ShardExport,
    shutdown: CancellationToken,
}

impl Shard {
    /// Produces until done; returns what it produced and its sender (whose
    /// partial batches the producer flushes at close) in every case.
    async fn run(
        mut self,
        started: Instant,
    ) -> (GroundTruth, RecordSender, Result<(), ProduceError>) {
        let outcome = self.produce(started).await;
        (self.truth, self.sender, outcome)
    }

    async fn produce(&mut self, started: Instant) -> Result<(), ProduceError> {
        let mut count: u64 = 0;
        loop {
            // `is_cancelled` takes a lock: checked every few records (a
            // pacing pause notices shutdown at once). The progress counter
            // and the yield to the partition workers sharing this thread
            // happen at the same pace.
            if count.is_multiple_of(SHUTDOWN_CHECK_EVERY) {
                self.sent
                    .fetch_add(SHUTDOWN_CHECK_EVERY.min(count), Ordering::Relaxed);
                self.export.export_every_second(&self.truth);
                tokio::task::yield_now().await;
                if self.shutdown.is_cancelled() {
                    break;
                }
            }
            if self.limit.is_some_and(|limit| count >= limit)
                || self
                    .duration
                    .is_some_and(|limit| started.elapsed() >= limit)
            {
                break;
            }
            let emission = self.generator.next_emission();
            if let Some(rate) = self.rate {
                // Paced by count, and never ahead of the simulated clock: a
                // population too small for the rate slows production down
                // rather than stamping events in the future.
                let by_count = Duration::from_secs_f64(count as f64 / rate);
                let simulated = (self.generator.clock() - self.start_time)
                    .to_std()
                    .unwrap_or_default();
                let due = started + by_count.max(simulated.div_f64(self.speedup));
                if due > Instant::now() + PACING_SLACK {
                    self.sender.flush().await?;
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
            }
            self.truth.record(&emission);
            let key = rtap::kafka::RecordKey::new(emission.user_id);
            self.sender
                .send(key.as_bytes(), emission.occurred_at, |value| {
                    emission.write_value(value)
                })
                .await?;
            count += 1;
        }
        self.sent
            .fetch_add(count % SHUTDOWN_CHECK_EVERY, Ordering::Relaxed);
        self.export.export(&self.truth);
        Ok(())
    }
}

/// The population split by the partition its users' records go to, in
/// partition order; partitions without users are left out. Each part keeps
/// the heavy-first order of the users and all the products.
fn by_partition(population: &Population, partitions: i32) -> Vec<(i32, Population)> {
    let mut parts: Vec<Vec<i64>> =
        vec![Vec::new(); usize::try_from(partitions).unwrap_or(1).max(1)];
    for &user in &population.users {
        let partition = rtap::kafka::partition_for_key(&rtap::kafka::record_key(user), partitions);
        parts[usize::try_from(partition).unwrap_or(0)].push(user);
    }
    (0..partitions)
        .zip(parts)
        .filter(|(_, users)| !users.is_empty())
        .map(|(partition, users)| {
            (
                partition,
                Population {
                    users,
                    products: population.products.clone(),
                },
            )
        })
        .collect()
}

/// `total` split in proportion to `weights`, exactly: the remainder goes to
/// the first parts, one each.
fn split(total: u64, weights: &[usize]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| w as u128).sum::<u128>().max(1);
    let mut parts: Vec<u64> = weights
        .iter()
        .map(|&w| u64::try_from(u128::from(total) * w as u128 / sum).unwrap_or(0))
        .collect();
    let mut rest = total - parts.iter().sum::<u64>().min(total);
    for part in &mut parts {
        if rest == 0 {
            break;
        }
        *part += 1;
        rest -= 1;
    }
    parts
}

/// The seed of one partition's generator: the first number of the run
/// seed's ChaCha stream numbered by the partition, so distinct per partition
/// and fixed by the run's seed.
fn shard_seed(seed: u64, partition: i32) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from(partition.unsigned_abs()));
    rng.next_u64()
}

/// The progress display: a bar on a terminal, periodic log lines otherwise.
struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Progress {
    fn start(
        mode: ProgressArg,
        total: Option<u64>,
        sent: Arc<AtomicU64>,
        stats: Arc<ProducerStats>,
    ) -> Self {
        let stop = CancellationToken::new();
        let bar = match mode {
            ProgressArg::None => return Self { task: None, stop },
            ProgressArg::Bar => true,
            ProgressArg::Log => false,
            ProgressArg::Auto => std::io::stderr().is_terminal(),
        };
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let display = bar.then(|| {
                let bar = total.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {elapsed_precise} {human_pos} events {per_sec} {wide_msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar
            });
            let every = if bar {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            };
            let mut ticker = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let sent = sent.load(Ordering::Relaxed);
                let acked = stats.acknowledged.load(Ordering::Relaxed);
                let errors = stats.failed_requests.load(Ordering::Relaxed);
                match &display {
                    Some(bar) => {
                        bar.set_position(sent);
                        bar.set_message(format!("acknowledged {acked}, failed requests {errors}"));
                    }
                    None => tracing::info!(
                        sent,
                        acknowledged = acked,
                        failed_requests = errors,
                        rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-9),
                        "progress"
                    ),
                }
            }
            if let Some(bar) = display {
                bar.finish_and_clear();
            }
        });
        Self {
            task: Some(task),
            stop,
        }
    }

    fn finish(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_split_exactly_and_in_proportion() {
        assert_eq!(split(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(split(1000, &[300, 100]), vec![750, 250]);
        assert_eq!(split(0, &[5, 5]), vec![0, 0]);
        let parts = split(1_000_003, &[249_811, 250_402, 249_977, 249_810]);
        assert_eq!(parts.iter().sum::<u64>(), 1_000_003);
        assert!(parts.iter().all(|&part| part.abs_diff(250_000) < 700));
    }

    #[test]
    fn users_go_to_the_partition_of_their_key_in_order() {
        let population = Population::synthetic(10_000, 7);
        let parts = by_partition(&population, 4);
        assert_eq!(parts.len(), 4);
        let mut all: Vec<i64> = Vec::new();
        for (partition, part) in &parts {
            assert_eq!(part.products, population.products);
            assert!(part.users.windows(2).all(|pair| pair[0] < pair[1]));
            for &user in &part.users {
                let key = rtap::kafka::record_key(user);
                assert_eq!(rtap::kafka::partition_for_key(&key, 4), *partition);
            }
            all.extend(&part.users);
        }
        all.sort_unstable();
        assert_eq!(all, population.users);
        // Fewer users than partitions: empty partitions get no generator.
        assert_eq!(by_partition(&Population::synthetic(1, 1), 8).len(), 1);
    }

    #[test]
    fn partitions_get_distinct_seeds_fixed_by_the_run_seed() {
        let seeds: Vec<u64> = (0..64).map(|partition| shard_seed(7, partition)).collect();
        let distinct: std::collections::HashSet<_> = seeds.iter().collect();
        assert_eq!(distinct.len(), seeds.len());
        assert_eq!(shard_seed(7, 3), seeds[3]);
        assert_ne!(shard_seed(8, 3), seeds[3]);
    }
}
