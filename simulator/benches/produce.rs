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
//! It also prints the ratio the machine's CPU predicts. The simulator does
//! all the raw produce does (records built from bytes, the same requests)
//! and generates the records besides; so with every core busy, its rate is
//! about the cores over the whole machine's CPU per record in the raw
//! produce (`/proc/stat`: broker, kernel and bench) plus the CPU generation
//! takes per record, timed alone on one thread as the simulator's shards
//! generate. An estimate, not a bound: generation spread over two cores'
//! caches costs less than on one.
//!
//! `cargo bench -p rtap-simulator` with the broker of `scripts/services.sh up`
//! (or `KAFKA_BROKERS`). `RTAP_BENCH_RECORDS` sets the records per round
//! (default 1,000,000: shorter rounds measure start-up more than
//! throughput), `RTAP_BENCH_ROUNDS` the produce rounds (default 5, after a
//! pair that is not counted; 0 measures generation alone, for profiling). Target: simulator ≥ 0.8 × raw.

#[path = "support/cpu_times.rs"]
mod cpu_times;
#[path = "support/env_count.rs"]
mod env_count;

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use cpu_times::CpuTimes;
use env_count::env_count;
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
/// Records a shard generates before the next shard's turn, as the
/// simulator's shards take turns on its threads.
const SHARD_TURN: usize = 64;
/// Passes of generation alone: the fastest counts, as the machine may
/// preempt a pass.
const GENERATION_PASSES: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let records = env_count("RTAP_BENCH_RECORDS", 1_000_000)?;
    if records == 0 {
        return Err("RTAP_BENCH_RECORDS must be at least 1".into());
    }
    let rounds = env_count("RTAP_BENCH_ROUNDS", 5)?;
    println!("{records} records per round, {rounds} rounds");
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    // The simulator's default population, as the simulator runs here.
    let defaults = SimulatorConfig::try_parse_from(["rtap-simulator"])?;
    let generated = generate(records, &defaults)?;
    let generation_us = generation_alone(records, &defaults)?;
    println!(
        "generation alone:      {:>12.0} events/s ({generation_us:.2} µs per event, one thread, \
         {PARTITIONS} shards of {} users taking turns)",
        1e6 / generation_us,
        defaults.users / PARTITIONS as u32,
    );

    if rounds == 0 {
        return Ok(());
    }
    // A pair not counted: the first produce of a run was the slowest (new
    // connections, the broker's first topics, and for the raw produce the
    // allocator's first pages for a round's copies of the records), which
    // favoured whichever side ran second in the first round.
    runtime.block_on(raw_produce(&brokers, &generated, rounds))?;
    runtime.block_on(simulator_produce(&brokers, records, rounds))?;
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get()) as f64;
    let mut results = Rounds::default();
    for round in 0..rounds {
        let raw_produce = || runtime.block_on(raw_produce(&brokers, &generated, round));
        let simulator_produce = || {
            let cpu = CpuTimes::now();
            let rate = runtime.block_on(simulator_produce(&brokers, records, round))?;
            let cpu = cpu.and_then(CpuTimes::until_now);
            Ok::<_, Box<dyn std::error::Error>>((rate, cpu))
        };
        // Which runs first alternates: a run was often faster as the second
        // of its pair, and neither side should always be the one that is.
        let (raw, simulator) = if round % 2 == 0 {
            let raw = raw_produce()?;
            (raw, simulator_produce()?)
        } else {
            let simulator = simulator_produce()?;
            (raw_produce()?, simulator)
        };
        results.record(round, records, raw, simulator, (cores, generation_us));
    }
    results.report(rounds, cores);
    Ok(())
}

/// Every round's figures.
#[derive(Default)]
struct Rounds {
    simulator_rates: Vec<f64>,
    raw_rates: Vec<f64>,
    round_ratios: Vec<f64>,
    predictions: Vec<Option<f64>>,
    simulator_cpu: Vec<Option<f64>>,
    raw_cpu: Vec<Option<f64>>,
    raw_machine_cpu: Vec<Option<f64>>,
}

impl Rounds {
    /// Keeps and prints one round's pair: the raw produce and the
    /// simulator's (records/s, CPU).
    fn record(
        &mut self,
        round: usize,
        records: usize,
        raw: RawProduce,
        (simulator, cpu): (f64, Option<CpuTimes>),
        (cores, generation_us): (f64, f64),
    ) {
        let raw_machine_us = raw.cpu.map(|cpu| micros_per(cpu.machine, records));
        self.raw_cpu
            .push(raw.cpu.map(|cpu| micros_per(cpu.bench, records)));
        self.raw_machine_cpu.push(raw_machine_us);
        self.simulator_cpu
            .push(cpu.map(|cpu| micros_per(cpu.bench, records)));
        // With every core busy, a rate is the cores over the CPU a record
        // costs the whole machine.
        let predicted =
            raw_machine_us.map(|raw_us| cores / ((raw_us + generation_us) * 1e-6) / raw.rate);
        self.predictions.push(predicted);
        println!(
            "round {round}: raw rskafka {:>10.0} records/s, rtap-simulator {simulator:>10.0} records/s, ratio {:.2} (CPU predicts {})",
            raw.rate,
            simulator / raw.rate,
            ratio_figure(predicted),
        );
        self.raw_rates.push(raw.rate);
        self.simulator_rates.push(simulator);
        self.round_ratios.push(simulator / raw.rate);
    }

    /// Prints the medians.
    fn report(mut self, rounds: usize, cores: f64) {
        let raw = median(&mut self.raw_rates);
        let simulator = median(&mut self.simulator_rates);
        println!(
            "raw rskafka produce:   {raw:>12.0} records/s (median of {rounds}), {} CPU/record; \
             the whole machine's {} (broker, kernel and bench)",
            cpu_figure(&self.raw_cpu),
            cpu_figure(&self.raw_machine_cpu),
        );
        println!(
            "rtap-simulator:        {simulator:>12.0} records/s (median of {rounds}), {} CPU/record with the warm-up",
            cpu_figure(&self.simulator_cpu)
        );
        println!(
            "ratio simulator / raw: {:>12.2} (target >= 0.80)",
            simulator / raw
        );
        println!(
            "median round ratio:    {:>12.2} (each round's pair ran back to back, raw first in even rounds)",
            median(&mut self.round_ratios)
        );
        let mut predictions: Vec<f64> = self.predictions.into_iter().flatten().collect();
        let predicted = (!predictions.is_empty()).then(|| median(&mut predictions));
        println!(
            "ratio CPU predicts:    {:>12} (median of the rounds': all {cores} cores busy, a record \
             costing raw produce's machine CPU plus generation's)",
            ratio_figure(predicted),
        );
    }
}

/// Records for the raw produce, from one generator of the simulator's
/// population.
fn generate(
    count: usize,
    defaults: &SimulatorConfig,
) -> Result<Vec<Record>, Box<dyn std::error::Error>> {
    let warm_up = Instant::now();
    let mut generator = Generator::new(
        ModelParams::default(),
        Population::synthetic(defaults.users, defaults.products),
        1,
        Utc::now(),
        run::UNPACED_MODEL_RATE,
    )?;
    println!(
        "model warm-up:         {:>12.2} s (15 simulated minutes before the first record)",
        warm_up.elapsed().as_secs_f64()
    );
    Ok((0..count)
        .map(|_| {
            let emission = generator.next_emission();
            Record {
                key: Some(emission.key()),
                value: Some(emission.value()),
                headers: Default::default(),
                timestamp: emission.occurred_at,
            }
        })
        .collect())
}

/// Microseconds per record of generation as the simulator does it, without
/// producing: its shards (of its population, at its model rate) take turns,
/// each record's key and value written into a batch's buffer. The fastest
/// of a few passes over `count` records.
fn generation_alone(
    count: usize,
    defaults: &SimulatorConfig,
) -> Result<f64, Box<dyn std::error::Error>> {
    let shards = PARTITIONS as usize;
    let mut generators = (1..=shards as u64)
        .map(|seed| {
            Generator::new(
                ModelParams::default(),
                Population::synthetic(defaults.users / PARTITIONS as u32, defaults.products),
                seed,
                Utc::now(),
                run::UNPACED_MODEL_RATE / shards as f64,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut batch = Vec::new();
    let mut best = f64::INFINITY;
    for _ in 0..GENERATION_PASSES {
        let started = Instant::now();
        for record in 0..count {
            let generator = &mut generators[record / SHARD_TURN % shards];
            let emission = generator.next_emission();
            batch.extend_from_slice(rtap::kafka::RecordKey::new(emission.user_id).as_bytes());
            emission.write_value(&mut batch);
            if record % BATCH == BATCH - 1 {
                batch.clear();
            }
        }
        best = best.min(micros_per(started.elapsed().as_secs_f64(), count));
    }
    Ok(best)
}

/// A raw produce's rate, and the CPU time it took.
struct RawProduce {
    rate: f64,
    cpu: Option<CpuTimes>,
}

async fn raw_produce(
    brokers: &str,
    records: &[Record],
    round: usize,
) -> Result<RawProduce, Box<dyn std::error::Error>> {
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
    let cpu = CpuTimes::now();
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
    let cpu = cpu.and_then(CpuTimes::until_now);
    delete_topic(&client, &topic).await?;
    Ok(RawProduce { rate, cpu })
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

fn micros_per(seconds: f64, records: usize) -> f64 {
    seconds * 1e6 / records.max(1) as f64
}

/// The median of the known `values`, in microseconds.
fn cpu_figure(values: &[Option<f64>]) -> String {
    let mut known: Vec<f64> = values.iter().flatten().copied().collect();
    if known.is_empty() {
        return "unknown".into();
    }
    format!("{:.2} µs", median(&mut known))
}

/// A ratio, or why it is missing.
fn ratio_figure(ratio: Option<f64>) -> String {
    ratio.map_or_else(
        || "unknown (read from /proc: Linux only)".into(),
        |ratio| format!("{ratio:.2}"),
    )
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
