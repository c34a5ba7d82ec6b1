//! Ingest throughput: fills a topic with simulated events, measures the raw
//! rskafka fetch rate of that topic (every partition read concurrently, no
//! decoding), then the pipeline catching up on it from offset 0 into a fresh
//! Redis namespace, in the same run against the same broker and Redis.
//! Meanwhile it pings Redis every 2 ms: the round trips show how long a query
//! waits behind a commit while ingest catches up (`--commit-max-events`).
//! It also prints where Redis spent its time, per command (`INFO
//! commandstats`, counted before and after), the CPU per event of the whole
//! machine in each phase, and the consumer's work that needs no Redis timed
//! alone: with them, the highest ratio the machine's cores allow.
//!
//! The catch-up runs once per entry of `RTAP_BENCH_REDIS` (default
//! `single,single+metrics,single,single+metrics,cluster`): `single` is the
//! one Redis, `cluster` the local Redis Cluster of `scripts/services.sh
//! cluster` (seeds in `RTAP_TEST_REDIS_CLUSTER`), and `+metrics` records the
//! Prometheus metrics as a server does (without it, metrics go nowhere),
//! each into a namespace of its own. It prints the median rate of each
//! kind of run, metrics on / off, and cluster / single.
//!
//! `cargo bench -p rtap-server --bench ingest` after `scripts/services.sh
//! cluster`. `RTAP_BENCH_EVENTS` (default 1,000,000) and
//! `RTAP_BENCH_PARTITIONS` (default 4) adjust it. Targets: ingest ≥ 0.8 × raw
//! fetch; on the cluster ≥ 0.8 × on one Redis.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../simulator/benches/support/cpu_times.rs"]
mod cpu_times;
#[path = "../../simulator/benches/support/env_count.rs"]
mod env_count;

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use common::{TestDatabase, test_config};
use cpu_times::CpuTimes;
use env_count::env_count;
use rskafka::client::{Client, ClientBuilder, partition::UnknownTopicHandling};
use rtap_server::{
    Config,
    ingest::{
        consumer::{self, PipelineSettings, PipelineStats},
        dedupe::Dedupe,
        validate::{self, TimeBounds},
    },
    store::{
        aggregate::BatchAggregate,
        commit::load_state,
        keys::PartitionKeys,
        nodes::{Nodes, Route},
    },
};
use rtap_simulator::config::SimulatorConfig;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("rtap_server=warn")
        .init();
    let events: u64 = env_count("RTAP_BENCH_EVENTS", 1_000_000)?;
    let partitions = i32::try_from(env_count::<u32>("RTAP_BENCH_PARTITIONS", 4)?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let database = TestDatabase::create().await?;
        let result = bench(&database, events, partitions).await;
        database.drop().await?;
        result
    })
}

async fn bench(database: &TestDatabase, events: u64, partitions: i32) -> anyhow::Result<()> {
    let mut config = test_config(database);
    config.events_partitions = partitions;
    fill(&config, events).await?;
    let client = Arc::new(
        ClientBuilder::new(config.kafka_brokers.clone())
            .build()
            .await?,
    );
    let raw = raw_fetch(&client, &config).await?;
    let mut rates: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let runs = std::env::var("RTAP_BENCH_REDIS")
        .unwrap_or_else(|_| "single,single+metrics,single,single+metrics,cluster".into());
    let metrics = MetricsSwitch::install()?;
    let mut metrics_runs = 0;
    for (index, run) in runs.split(',').map(str::trim).enumerate() {
        let (deployment, recorded) = match run.strip_suffix("+metrics") {
            Some(deployment) => (deployment, true),
            None => (run, false),
        };
        metrics.set(recorded);
        metrics_runs += usize::from(recorded);
        let mut config = config.clone();
        config.redis_namespace = format!("{}-{index}-{deployment}", config.redis_namespace);
        match deployment {
            "single" => {}
            "cluster" => {
                common::use_cluster(&mut config);
            }
            other => {
                anyhow::bail!("RTAP_BENCH_REDIS: unknown deployment {other:?} (single, cluster)")
            }
        }
        println!(
            "--- Redis: {deployment}, metrics {}",
            if recorded { "recorded" } else { "off" }
        );
        let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
        let ingest = ingest(&config, &nodes, &raw).await?;
        rates
            .entry(run.to_owned())
            .or_default()
            .push(report(&config, &raw, ingest)?);
        common::delete_namespace_on(&nodes, &config.redis_namespace, partitions).await?;
    }
    let median = |run: &str| {
        let mut of = rates.get(run)?.clone();
        of.sort_by(f64::total_cmp);
        Some(of[of.len() / 2])
    };
    for (run, of) in &rates {
        let listed: Vec<String> = of.iter().map(|rate| format!("{rate:.0}")).collect();
        println!("{run}: events/s {}", listed.join(", "));
    }
    if let (Some(off), Some(on)) = (median("single"), median("single+metrics")) {
        println!(
            "metrics recorded / off (medians, one Redis): {:.3} (target: within noise)",
            on / off
        );
    }
    if metrics_runs > 0 {
        // The recorded runs' counters must hold what they counted.
        let applied = metrics.applied();
        println!(
            "metrics: rtap_ingest_events_applied_total sums to {applied:.0} over {metrics_runs} recorded runs"
        );
        anyhow::ensure!(applied > 0.0, "the recorded runs recorded nothing");
    }
    if let (Some(single), Some(cluster)) = (median("single"), median("cluster")) {
        println!(
            "cluster / single ingest: {:.2} (target >= 0.8; the cluster's six nodes share this machine's cores)",
            cluster / single
        );
    }
    // A broker with memory storage (the test broker) would keep the
    // million events until restarted.
    client
        .controller_client()?
        .delete_topic(config.events_topic.as_str(), 10_000)
        .await?;
    Ok(())
}

/// The process's metrics recorder, switched on and off between runs: a
/// partition's handles are taken when its consumer starts, so a run records
/// into Prometheus's recorder or into nothing, as a server with or without
/// `--metrics-addr` does.
struct MetricsSwitch {
    on: std::sync::atomic::AtomicBool,
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
}

impl MetricsSwitch {
    fn install() -> anyhow::Result<&'static Self> {
        let switch: &'static Self = Box::leak(Box::new(Self {
            on: std::sync::atomic::AtomicBool::new(false),
            recorder: metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder(),
        }));
        metrics::set_global_recorder(switch)
            .map_err(|_| anyhow::anyhow!("a metrics recorder is installed already"))?;
        Ok(switch)
    }

    fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// The sum of `rtap_ingest_events_applied_total` over its partitions.
    fn applied(&self) -> f64 {
        self.recorder
            .handle()
            .render()
            .lines()
            .filter(|line| line.starts_with("rtap_ingest_events_applied_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl metrics::Recorder for MetricsSwitch {
    fn describe_counter(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.recorder.describe_counter(key, unit, description);
    }

    fn describe_gauge(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.recorder.describe_gauge(key, unit, description);
    }

    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.recorder.describe_histogram(key, unit, description);
    }

    fn register_counter(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Counter {
        if self.on.load(Ordering::Relaxed) {
            self.recorder.register_counter(key, metadata)
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Gauge {
        if self.on.load(Ordering::Relaxed) {
            self.recorder.register_gauge(key, metadata)
        } else {
            metrics::Gauge::noop()
        }
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if self.on.load(Ordering::Relaxed) {
            self.recorder.register_histogram(key, metadata)
        } else {
            metrics::Histogram::noop()
        }
    }
}

/// Fills the topic with `events` events of the simulator's model, over the
/// last six hours.
async fn fill(config: &Config, events: u64) -> anyhow::Result<()> {
    let filling = Instant::now();
    let partitions = config.events_partitions;
    let start = (chrono::Utc::now() - chrono::Duration::hours(6)).to_rfc3339();
    let simulation = SimulatorConfig::try_parse_from([
        "rtap-simulator",
        "--kafka-brokers",
        &config.kafka_brokers.join(","),
        "--topic",
        &config.events_topic,
        "--partitions",
        &partitions.to_string(),
        "--count",
        &events.to_string(),
        "--seed",
        "1",
        "--start-time",
        &start,
        "--progress",
        "none",
    ])?;
    rtap_simulator::run::run(simulation, CancellationToken::new()).await?;
    println!(
        "filled {} with {events} events over {partitions} partitions in {:.1} s",
        config.events_topic,
        filling.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the raw fetch read and cost.
struct RawFetch {
    /// Every partition's high watermark.
    high_watermarks: Vec<(i32, i64)>,
    records: u64,
    /// Record values for the in-process measurements.
    sample: Vec<Vec<u8>>,
    seconds: f64,
    cpu: Option<CpuTimes>,
}

/// Raw fetch: every partition from 0 to its high watermark, concurrently.
async fn raw_fetch(client: &Arc<Client>, config: &Config) -> anyhow::Result<RawFetch> {
    let cpu_before = CpuTimes::now();
    let started = Instant::now();
    let mut readers = Vec::new();
    for partition in 0..config.events_partitions {
        let client = client.clone();
        let topic = config.events_topic.clone();
        let max_bytes = config.fetch_max_bytes;
        readers.push(tokio::spawn(async move {
            let reader = client
                .partition_client(&topic, partition, UnknownTopicHandling::Retry)
                .await?;
            let (mut offset, mut records, mut high_watermark) = (0, 0u64, 1);
            let mut sample = Vec::new();
            while offset < high_watermark {
                let (batch, mark) = reader.fetch_records(offset, 1..max_bytes, 100).await?;
                high_watermark = mark;
                if let Some(last) = batch.last() {
                    offset = last.offset + 1;
                }
                records += batch.len() as u64;
                let wanted = SAMPLE_PER_PARTITION.saturating_sub(sample.len());
                sample.extend(
                    batch
                        .into_iter()
                        .take(wanted)
                        .filter_map(|record| record.record.value),
                );
            }
            Ok::<_, anyhow::Error>((partition, offset, records, sample))
        }));
    }
    let mut fetched = RawFetch {
        high_watermarks: Vec::new(),
        records: 0,
        sample: Vec::new(),
        seconds: 0.0,
        cpu: None,
    };
    for reader in readers {
        let (partition, end, records, values) = reader.await??;
        fetched.high_watermarks.push((partition, end));
        fetched.records += records;
        fetched.sample.extend(values);
    }
    fetched.seconds = started.elapsed().as_secs_f64();
    fetched.cpu = cpu_before.and_then(CpuTimes::until_now);
    Ok(fetched)
}

/// What the pipeline's catch-up did and cost.
struct Ingest {
    stats: Arc<PipelineStats>,
    seconds: f64,
    cpu: Option<CpuTimes>,
    redis_cpu: f64,
    commands_before: BTreeMap<String, (u64, u64)>,
    commands_after: BTreeMap<String, (u64, u64)>,
    /// Redis PING times while it ran.
    pings: Vec<Duration>,
}

/// Redis CPU seconds and command stats summed over `nodes`.
async fn redis_totals(
    nodes: &[redis::Client],
) -> anyhow::Result<(f64, BTreeMap<String, (u64, u64)>)> {
    let (mut cpu, mut commands) = (0.0, BTreeMap::new());
    for node in nodes {
        let mut connection = node.get_multiplexed_async_connection().await?;
        cpu += common::redis_cpu_seconds(&mut connection).await?;
        for (command, (calls, usec)) in command_stats(&mut connection).await? {
            let total: &mut (u64, u64) = commands.entry(command).or_default();
            *total = (total.0 + calls, total.1 + usec);
        }
    }
    Ok((cpu, commands))
}

/// The pipeline, from offset 0 into a fresh namespace, until every
/// partition's stored offset reaches its high watermark.
async fn ingest(config: &Config, nodes: &Nodes, raw: &RawFetch) -> anyhow::Result<Ingest> {
    let stats = Arc::new(PipelineStats::default());
    let shutdown = CancellationToken::new();
    let every = common::every_redis_node(config).await?;
    let probing = CancellationToken::new();
    let first = PartitionKeys::new(&config.redis_namespace, 0);
    let probe = tokio::spawn(probe_redis(
        nodes.client_for(&first).await?,
        probing.clone(),
    ));
    let (redis_cpu_before, commands_before) = redis_totals(&every).await?;
    let cpu_before = CpuTimes::now();
    let started = Instant::now();
    let pipeline = tokio::spawn(consumer::run(
        PipelineSettings::from_config(config, config.kafka().map_err(anyhow::Error::msg)?),
        nodes.clone(),
        stats.clone(),
        shutdown.clone(),
    ));
    loop {
        let mut caught_up = true;
        for (partition, end) in &raw.high_watermarks {
            let keys = PartitionKeys::new(&config.redis_namespace, *partition);
            let mut connection = nodes.connection(&keys.state()).await?;
            let state = load_state(&mut connection, &keys).await?;
            caught_up &= state.offset == Some(*end);
        }
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_before.and_then(CpuTimes::until_now);
    let (redis_cpu_after, commands_after) = redis_totals(&every).await?;
    let redis_cpu = redis_cpu_after - redis_cpu_before;
    // The offsets are in Redis before each commit's reply reaches the
    // consumer, which then counts it: let the last replies be counted.
    let counted = Instant::now();
    while stats.records.load(Ordering::Relaxed) < raw.records
        && counted.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    probing.cancel();
    let pings = probe.await??;
    shutdown.cancel();
    pipeline.await?;
    Ok(Ingest {
        stats,
        seconds,
        cpu,
        redis_cpu,
        commands_before,
        commands_after,
        pings,
    })
}

/// Prints the figures of the raw fetch and the catch-up; the ingest rate.
fn report(config: &Config, raw: &RawFetch, mut ingest: Ingest) -> anyhow::Result<f64> {
    let stats = &ingest.stats;
    let records = stats.records.load(Ordering::Relaxed);
    let commits = stats.commits.load(Ordering::Relaxed).max(1);
    let commands = stats.redis_commands.load(Ordering::Relaxed);
    let round_trips = stats.redis_round_trips.load(Ordering::Relaxed);
    let (raw_records, raw_seconds) = (raw.records, raw.seconds);
    let raw_rate = raw_records as f64 / raw_seconds;
    let (ingest_seconds, redis_cpu) = (ingest.seconds, ingest.redis_cpu);
    let ingest_rate = records as f64 / ingest_seconds;
    println!(
        "raw rskafka fetch: {raw_records} records in {raw_seconds:.2} s = {raw_rate:.0} records/s"
    );
    println!(
        "pipeline ingest:   {records} records in {ingest_seconds:.2} s = {ingest_rate:.0} events/s \
         ({} applied, {} duplicates, {} dead-lettered)",
        stats.applied.load(Ordering::Relaxed),
        stats.duplicates.load(Ordering::Relaxed),
        stats.dead_lettered.load(Ordering::Relaxed),
    );
    println!(
        "redis: {commits} commits ({:.0} a second), {:.0} events per commit, {:.3} commands per event \
         in the commit transactions, {:.2} round trips per commit (prefetch, offset check, \
         transaction, and values the consumer's mirror lacked)",
        commits as f64 / ingest_seconds,
        records as f64 / commits as f64,
        commands as f64 / records.max(1) as f64,
        round_trips as f64 / commits as f64,
    );
    println!(
        "redis CPU while catching up (summed over its nodes): {:.2} us per event, {:.0}% of one core \
         (Redis runs commands on one thread per node)",
        redis_cpu * 1e6 / records.max(1) as f64,
        redis_cpu * 100.0 / ingest_seconds,
    );
    println!(
        "redis time per event by command (commandstats; exec includes the commands it runs): {}",
        command_breakdown(&ingest.commands_before, &ingest.commands_after, records)
    );
    let pings = &mut ingest.pings;
    pings.sort_unstable();
    let percentile = |p: f64| {
        let index = ((pings.len() as f64 * p) as usize).min(pings.len().saturating_sub(1));
        pings.get(index).copied().unwrap_or_default().as_micros()
    };
    println!(
        "redis PING while catching up (what a query waits behind a commit): \
         p50 {} us, p99 {} us, max {} us over {} pings",
        percentile(0.5),
        percentile(0.99),
        percentile(1.0),
        pings.len()
    );
    println!(
        "ratio ingest / raw fetch: {:.2} (target >= 0.8)",
        ingest_rate / raw_rate
    );
    let work = in_process_work(&raw.sample, config)?;
    println!(
        "consumer work needing no Redis, one thread over {} sampled records (best of {} \
         passes): decode and validate {:.2} us per event, and with folding into the batch \
         aggregate {:.2} us",
        raw.sample.len(),
        WORK_PASSES,
        work.decode_us,
        work.fold_us,
    );
    if let (Some(raw_cpu), Some(ingest_cpu)) = (raw.cpu, ingest.cpu) {
        print_machine_cpu(
            (raw_cpu, raw_records, raw_seconds),
            (ingest_cpu, records, ingest_seconds),
            redis_cpu,
            &work,
        );
    } else {
        println!("CPU per event and the ratio ceiling: unknown (read from /proc: Linux only)");
    }
    Ok(ingest_rate)
}

/// The machine's CPU per event in the raw fetch and in ingest (each given as
/// its CPU times, records and seconds), and the highest ratio they and the
/// consumer's `work` allow with every core busy.
fn print_machine_cpu(
    (raw_cpu, raw_records, raw_seconds): (CpuTimes, u64, f64),
    (ingest_cpu, records, ingest_seconds): (CpuTimes, u64, f64),
    redis_cpu: f64,
    work: &InProcessWork,
) {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get()) as f64;
    let per_event = |seconds: f64, events: u64| seconds * 1e6 / events.max(1) as f64;
    println!(
        "CPU per event, every process on the machine (/proc/stat; broker, Redis and this \
         bench): raw fetch {:.2} us with {:.1} of {cores} cores busy; ingest {:.2} us with \
         {:.1} cores busy, of which the consumer (this process) {:.2} us and Redis {:.2} us",
        per_event(raw_cpu.machine, raw_records),
        raw_cpu.machine / raw_seconds,
        per_event(ingest_cpu.machine, records),
        ingest_cpu.machine / ingest_seconds,
        per_event(ingest_cpu.bench, records),
        per_event(redis_cpu, records),
    );
    // With every core busy, a rate is at most the cores over the CPU each
    // event costs; ingest costs at least the raw fetch's CPU plus its own.
    let raw_rate = raw_records as f64 / raw_seconds;
    let ceiling = |extra_us: f64| {
        cores / ((per_event(raw_cpu.machine, raw_records) + extra_us) * 1e-6) / raw_rate
    };
    println!(
        "so on this machine, with every core busy, ingest / raw fetch is at most {:.2} for \
         decoding and validating alone and {:.2} with folding, before any Redis write",
        ceiling(work.decode_us),
        ceiling(work.fold_us),
    );
}

/// Records per partition the raw fetch keeps, to time the consumer's work
/// that needs no Redis.
const SAMPLE_PER_PARTITION: usize = 50_000;
/// Passes over the sample: the fastest counts, as the machine may preempt a
/// pass.
const WORK_PASSES: usize = 3;

/// Microseconds per event of the consumer's work that needs no Redis.
struct InProcessWork {
    /// Decoding and validating (`validate::decode`), and parsing the id.
    decode_us: f64,
    /// That, then folding the valid events into a [`BatchAggregate`] per
    /// commit-sized chunk, as the consumer does after its Redis reads.
    fold_us: f64,
}

/// Times the consumer's in-memory steps over `sample`, on this thread.
fn in_process_work(
    sample: &[Vec<u8>],
    config: &rtap_server::Config,
) -> anyhow::Result<InProcessWork> {
    let bounds = TimeBounds::from_config(config);
    let session_gap_ms = i64::try_from(config.session_gap.as_millis())?;
    let dedupe_window_ms = i64::try_from(config.dedupe_window.as_millis())?;
    let chunk_size = usize::try_from(config.commit_max_events)?.max(1);
    let decode = |bytes: &[u8], now| {
        let event = validate::decode(bytes, now, bounds).ok()?;
        let id = uuid::Uuid::try_parse(&event.event_id).ok()?.into_bytes();
        Some((id, event))
    };
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..WORK_PASSES {
        let now = chrono::Utc::now();
        let started = Instant::now();
        let decoded = sample.iter().filter_map(|bytes| decode(bytes, now)).count();
        let decoding = started.elapsed().as_secs_f64();
        std::hint::black_box(decoded);

        let started = Instant::now();
        for chunk in sample.chunks(chunk_size) {
            let mut batch = BatchAggregate::new(None, Default::default(), session_gap_ms);
            let mut dedupe = Dedupe::new(dedupe_window_ms, None);
            for (id, event) in chunk.iter().filter_map(|bytes| decode(bytes, now)) {
                let at = dedupe.stamp(now.timestamp_millis());
                if !dedupe.is_duplicate(id, at, None) {
                    batch.add(&event);
                }
            }
            std::hint::black_box(&batch);
        }
        let folding = started.elapsed().as_secs_f64();
        best = (best.0.min(decoding), best.1.min(folding));
    }
    let per_event = |seconds: f64| seconds * 1e6 / sample.len().max(1) as f64;
    Ok(InProcessWork {
        decode_us: per_event(best.0),
        fold_us: per_event(best.1),
    })
}

/// Calls and microseconds spent per command since Redis started, from
/// `INFO commandstats` (`cmdstat_hset:calls=…,usec=…,…`).
async fn command_stats(
    connection: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await?;
    let mut stats = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(command) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let field = |key: &str| {
            fields
                .split(',')
                .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(0)
        };
        stats.insert(command.to_owned(), (field("calls"), field("usec")));
    }
    Ok(stats)
}

/// The commands that took Redis time between two [`command_stats`], most
/// first, as microseconds per event, with their calls.
fn command_breakdown(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    events: u64,
) -> String {
    let mut spent: Vec<(&str, u64, u64)> = after
        .iter()
        .map(|(command, (calls, usec))| {
            let (calls_before, usec_before) = before.get(command).copied().unwrap_or_default();
            (
                command.as_str(),
                calls.saturating_sub(calls_before),
                usec.saturating_sub(usec_before),
            )
        })
        .filter(|(_, calls, _)| *calls > 0)
        .collect();
    spent.sort_by_key(|(_, _, usec)| std::cmp::Reverse(*usec));
    spent
        .iter()
        .map(|(command, calls, usec)| {
            format!(
                "{command} {:.3} us ({calls} calls)",
                *usec as f64 / events.max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Round trips of a `PING` every 2 ms on a connection of its own, until
/// `stop`.
async fn probe_redis(
    client: redis::Client,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Duration>> {
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut pings = Vec::new();
    while !stop.is_cancelled() {
        let started = Instant::now();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await?;
        pings.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(pings)
}
