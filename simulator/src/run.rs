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

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    catalog::{self, CatalogError},
    config::{ProgressArg, SimulatorConfig},
    model::{Generator, ModelError},
    producer::{ProduceError, Producer, ProducerConfig, ProducerStats},
    truth::GroundTruth,
};

/// Event rate the session model assumes when production is unpaced.
const UNPACED_MODEL_RATE: f64 = 1000.0;
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
pub async fn run(
    config: SimulatorConfig,
    shutdown: CancellationToken,
) -> Result<RunReport, RunError> {
    let seed = config.seed.unwrap_or_else(|| rand::rng().random());
    let start_time = config.start_time.unwrap_or_else(Utc::now);
    tracing::info!(seed, start_time = %start_time, "simulation starting (replay with --seed and --start-time)");

    let population = catalog::population(
        config.server_addr.as_deref(),
        config.seed_users,
        config.seed_products,
        config.users,
        config.products,
    )
    .await?;
    let model_rate = config.rate.unwrap_or(UNPACED_MODEL_RATE) / config.speedup;
    let mut generator = Generator::new(
        config.model.clone(),
        population,
        seed,
        start_time,
        model_rate,
    )?;
    let mut producer = Producer::start(
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
    let progress = Progress::start(
        config.progress,
        config.count,
        sent.clone(),
        producer.stats(),
    );
    let mut truth = GroundTruth::new(seed, config.truth_file.is_some());
    let started = Instant::now();
    let mut count: u64 = 0;
    loop {
        // `is_cancelled` takes a lock: checked every few records (a pacing
        // pause notices shutdown at once).
        if (count.is_multiple_of(SHUTDOWN_CHECK_EVERY) && shutdown.is_cancelled())
            || config.count.is_some_and(|limit| count >= limit)
            || config
                .duration
                .is_some_and(|limit| started.elapsed() >= limit)
        {
            break;
        }
        let emission = generator.next_emission();
        if let Some(rate) = config.rate {
            // Paced by count, and never ahead of the simulated clock: a
            // population too small for the rate slows production down rather
            // than stamping events in the future.
            let by_count = Duration::from_secs_f64(count as f64 / rate);
            let simulated = (generator.clock() - start_time)
                .to_std()
                .unwrap_or_default();
            let due = started + by_count.max(simulated.div_f64(config.speedup));
            if due > Instant::now() + PACING_SLACK {
                producer.flush().await?;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(due) => {}
                }
            }
        }
        truth.record(&emission);
        producer
            .send(emission.key, emission.value, emission.occurred_at)
            .await?;
        count += 1;
        sent.store(count, Ordering::Relaxed);
    }

    let stats = producer.stats();
    let flushed = producer.close(config.flush_timeout).await;
    progress.finish();
    truth.finish();
    let elapsed = started.elapsed();
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
