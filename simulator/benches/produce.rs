//! Simulator throughput, with its baseline measured in the same run:
//! 1. generation alone (model + protobuf encoding), events/s;
//! 2. `rtap-simulator` end to end (generation, batching, produce) to the
//!    local broker, records/s;
//! 3. raw rskafka produce of the same records (same sizes, same batch size,
//!    one request in flight per partition, partitions in parallel).
//!
//! Next to each rate it prints the CPU time per record of this process
//! (Linux), which the broker's share does not blur: on a machine whose
//! cores the broker shares, the CPU the simulator spends generating is what
//! it loses against the raw rate. The simulator's includes its start-up,
//! mostly the model's warm-up (printed first), which its rate excludes.
//!
//! `cargo bench -p rtap-simulator` with the broker of `scripts/services.sh up`
//! (or `KAFKA_BROKERS`). `RTAP_BENCH_RECORDS` sets the records per round
//! (default 1,000,000: shorter rounds measure start-up more than
//! throughput), `RTAP_BENCH_ROUNDS` the produce rounds (default 3; 0
//! measures generation alone, for profiling). Target: simulator ≥ 0.8 × raw.

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use rskafka::{
    client::{
        ClientBuilder,
        partition::{Compression, UnknownTopicHandling},
    },
    record::Record,
};
use rtap::kafka::admin::ensure_topic;
use rtap_simulator::{
    config::SimulatorConfig,
    model::{Generator, ModelParams, Population},
    run,
};
use tokio_util::sync::CancellationToken;

/// The allocator the `rtap-simulator` binary runs with; the raw baseline
/// shares it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PARTITIONS: i32 = 4;
const BATCH: usize = 1000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let records: usize = std::env::var("RTAP_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rounds: usize = std::env::var("RTAP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let (generated, generation_rate) = generate(records)?;
    println!("generation alone:      {generation_rate:>12.0} events/s ({records} events)");

    let mut simulator_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let mut round_ratios = Vec::new();
    let (mut simulator_cpu, mut raw_cpu) = (Vec::new(), Vec::new());
    if rounds == 0 {
        return Ok(());
    }
    for round in 0..rounds {
        let cpu = CpuClock::start();
        let raw = runtime.block_on(raw_produce(&brokers, &generated, round))?;
        raw_cpu.push(cpu.micros_per(records));
        let cpu = CpuClock::start();
        let simulator = runtime.block_on(simulator_produce(&brokers, records, round))?;
        simulator_cpu.push(cpu.micros_per(records));
        println!(
            "round {round}: raw rskafka {raw:>10.0} records/s, rtap-simulator {simulator:>10.0} records/s, ratio {:.2}",
            simulator / raw
        );
        raw_rates.push(raw);
        simulator_rates.push(simulator);
        round_ratios.push(simulator / raw);
    }
    let raw = median(&mut raw_rates);
    let simulator = median(&mut simulator_rates);
    println!(
        "raw rskafka produce:   {raw:>12.0} records/s (median of {rounds}), {} CPU/record",
        cpu_figure(&raw_cpu)
    );
    println!(
        "rtap-simulator:        {simulator:>12.0} records/s (median of {rounds}), {} CPU/record with the warm-up",
        cpu_figure(&simulator_cpu)
    );
    println!(
        "ratio simulator / raw: {:>12.2} (target >= 0.80)",
        simulator / raw
    );
    println!(
        "median round ratio:    {:>12.2} (each round's pair ran back to back)",
        median(&mut round_ratios)
    );
    Ok(())
}

fn generate(count: usize) -> Result<(Vec<Record>, f64), Box<dyn std::error::Error>> {
    let warm_up = Instant::now();
    let mut generator = Generator::new(
        ModelParams::default(),
        Population::synthetic(1_000_000, 1_000),
        1,
        Utc::now(),
        1000.0,
    )?;
    println!(
        "model warm-up:         {:>12.2} s (15 simulated minutes before the first record)",
        warm_up.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let records: Vec<Record> = (0..count)
        .map(|_| {
            let emission = generator.next_emission();
            let record = Record {
                key: Some(emission.key()),
                value: Some(emission.value()),
                headers: Default::default(),
                timestamp: emission.occurred_at,
            };
            generator.recycle(emission);
            record
        })
        .collect();
    let rate = count as f64 / started.elapsed().as_secs_f64();
    Ok((records, rate))
}

async fn raw_produce(
    brokers: &str,
    records: &[Record],
    round: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let topic = format!("rtap-bench-raw-{}-{round}", uuid::Uuid::new_v4().simple());
    let client = ClientBuilder::new(vec![brokers.to_owned()]).build().await?;
    ensure_topic(&client, &topic, PARTITIONS).await?;
    let mut per_partition: Vec<Vec<Record>> = vec![Vec::new(); PARTITIONS as usize];
    for record in records {
        let key = record.key.as_deref().unwrap_or_default();
        let partition = rtap::kafka::partition_for_key(key, PARTITIONS);
        per_partition[partition as usize].push(record.clone());
    }
    let mut partition_clients = Vec::new();
    for partition in 0..PARTITIONS {
        partition_clients.push(
            client
                .partition_client(&topic, partition, UnknownTopicHandling::Retry)
                .await?,
        );
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (client, records) in partition_clients.into_iter().zip(per_partition) {
        tasks.spawn(async move {
            for chunk in records.chunks(BATCH) {
                client
                    .produce(chunk.to_vec(), Compression::NoCompression)
                    .await?;
            }
            Ok::<_, rskafka::client::error::Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let rate = records.len() as f64 / started.elapsed().as_secs_f64();
    delete_topic(&client, &topic).await?;
    Ok(rate)
}

/// A broker with memory storage (the test broker) would keep every round's
/// records until it runs out of memory.
async fn delete_topic(
    client: &rskafka::client::Client,
    topic: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    client
        .controller_client()?
        .delete_topic(topic, 10_000)
        .await?;
    Ok(())
}

async fn simulator_produce(
    brokers: &str,
    records: usize,
    round: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let topic = format!("rtap-bench-sim-{}-{round}", uuid::Uuid::new_v4().simple());
    let count = records.to_string();
    let partitions = PARTITIONS.to_string();
    let batch = BATCH.to_string();
    let config = SimulatorConfig::try_parse_from([
        "rtap-simulator",
        "--kafka-brokers",
        brokers,
        "--topic",
        &topic,
        "--count",
        &count,
        "--partitions",
        &partitions,
        "--batch-size",
        &batch,
        "--seed",
        "1",
        "--progress",
        "none",
    ])?;
    let report = run::run(config, CancellationToken::new()).await?;
    let client = ClientBuilder::new(vec![brokers.to_owned()]).build().await?;
    delete_topic(&client, &topic).await?;
    Ok(records as f64 / report.elapsed.max(Duration::from_nanos(1)).as_secs_f64())
}

/// CPU time of this process, all threads, from `/proc/self/stat` (Linux).
struct CpuClock(Option<f64>);

impl CpuClock {
    fn start() -> Self {
        Self(process_cpu_seconds())
    }

    /// Microseconds of CPU per record since `start`, if known.
    fn micros_per(&self, records: usize) -> Option<f64> {
        let (start, now) = (self.0?, process_cpu_seconds()?);
        Some((now - start) * 1e6 / records as f64)
    }
}

/// User and system time of this process, in seconds. The kernel reports
/// them in ticks of `USER_HZ`, 100 on every Linux architecture's ABI.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn cpu_figure(values: &[Option<f64>]) -> String {
    let mut known: Vec<f64> = values.iter().flatten().copied().collect();
    if known.is_empty() {
        return "unknown".into();
    }
    format!("{:.2} µs", median(&mut known))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
