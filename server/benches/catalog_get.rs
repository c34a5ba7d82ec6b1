//! GetUser throughput and latency over gRPC at a fixed concurrency, next to
//! `pgbench -S` (select-only, primary-key look-ups) at the same concurrency,
//! measured in the same run against the same PostgreSQL. The two alternate
//! over a few rounds, and the ratio reported is the median of the rounds'
//! ratios: on a shared machine a neighbour's burst can halve one phase, and
//! alternating keeps such a burst from deciding the ratio. Also printed, to
//! show where the time goes: a gRPC call that reads no database (health
//! Check), and the same look-ups through SeaORM without gRPC.
//!
//! `cargo bench -p rtap-server --bench catalog_get` after
//! `scripts/services.sh up`. `RTAP_BENCH_CONCURRENCY` (default 16),
//! `RTAP_BENCH_SECONDS` (per phase, default 10) and `RTAP_BENCH_ROUNDS`
//! (default 3) adjust it. Target: ≥ 0.5 × pgbench.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../simulator/benches/support/env_count.rs"]
mod env_count;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{TestDatabase, TestServer, test_config};
use env_count::env_count;
use rand::Rng;
use rtap::v1::{GetUserRequest, user_service_client::UserServiceClient};
use sea_orm::{ConnectionTrait, Database, EntityTrait};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const USERS: i64 = 10_000;
/// HTTP/2 connections the callers share.
const CONNECTIONS: usize = 2;

fn main() -> anyhow::Result<()> {
    let concurrency: u64 = env_count("RTAP_BENCH_CONCURRENCY", 16)?;
    let seconds: u64 = env_count("RTAP_BENCH_SECONDS", 10)?;
    let rounds: u64 = env_count("RTAP_BENCH_ROUNDS", 3)?.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let database = TestDatabase::create().await?;
        let result = bench(&database, concurrency, Duration::from_secs(seconds), rounds).await;
        database.drop().await?;
        result
    })
}

async fn bench(
    database: &TestDatabase,
    concurrency: u64,
    duration: Duration,
    rounds: u64,
) -> anyhow::Result<()> {
    let mut config = test_config(database);
    config.health_check_interval = Duration::from_secs(1);
    // One client at full speed: the bench measures capacity, not limits.
    config.max_calls_per_second = 0;
    let server = TestServer::start_with_catalog(config).await?;
    let db = Database::connect(&database.url).await?;
    db.execute_unprepared(&format!(
        "INSERT INTO users (first_name, last_name, create_time, update_time) \
         SELECT 'First' || g, 'Last' || g, now(), now() FROM generate_series(1, {USERS}) g"
    ))
    .await?;
    db.close().await?;
    pgbench_init(database)?;

    println!(
        "concurrency {concurrency}, {} s a phase",
        duration.as_secs()
    );
    run_clients(&server, Call::GetUser, concurrency, Duration::from_secs(1)).await?;
    let mut latencies = Vec::new();
    let (mut rates, mut pgbench_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (calls, round_latencies) =
            run_clients(&server, Call::GetUser, concurrency, duration).await?;
        latencies.extend(round_latencies);
        let rate = calls as f64 / duration.as_secs_f64();
        let pgbench = pgbench_select_only(database, concurrency, duration)?;
        println!(
            "round {round}: rtap GetUser {rate:>8.0} calls/s, pgbench -S {pgbench:>8.0} tps, ratio {:.2}",
            rate / pgbench
        );
        rates.push(rate);
        pgbench_rates.push(pgbench);
        ratios.push(rate / pgbench);
    }
    latencies.sort_unstable();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    // Where the time goes: gRPC alone, a call that reads no database.
    let (health_calls, _) = run_clients(&server, Call::HealthCheck, concurrency, duration).await?;
    server.stop().await?;
    // And the database alone: the same look-ups through SeaORM, one by one.
    let direct = run_direct(&database.url, concurrency, duration).await?;

    println!(
        "rtap GetUser over gRPC: {:>10.0} calls/s (median of {rounds})   p50 {:>6} us   p99 {:>6} us",
        median(&mut rates),
        percentile(0.50).as_micros(),
        percentile(0.99).as_micros()
    );
    println!(
        "pgbench -S:             {:>10.0} tps (median of {rounds})",
        median(&mut pgbench_rates)
    );
    println!(
        "gRPC alone:             {:>10.0} calls/s (health Check: no database)",
        health_calls as f64 / duration.as_secs_f64()
    );
    println!("SeaORM find_by_id alone:{direct:>10.0} queries/s (no gRPC, same process)");
    println!(
        "ratio rtap / pgbench:   {:>10.2} (median of the rounds' ratios; target >= 0.50)",
        median(&mut ratios)
    );
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What the callers call.
#[derive(Clone, Copy)]
enum Call {
    GetUser,
    HealthCheck,
}

async fn run_clients(
    server: &TestServer,
    call: Call,
    concurrency: u64,
    duration: Duration,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    // Callers share a few HTTP/2 connections, as gRPC clients do.
    let channels: Vec<_> = (0..CONNECTIONS).map(|_| server.channel()).collect();
    for caller in 0..concurrency {
        let channel = channels[usize::try_from(caller).unwrap_or(0) % channels.len()].clone();
        let mut users = UserServiceClient::new(channel.clone());
        let mut health = HealthClient::new(channel);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let id = rand::rng().random_range(1..=USERS);
                let started = Instant::now();
                match call {
                    Call::GetUser => drop(users.get_user(GetUserRequest { id }).await?),
                    Call::HealthCheck => drop(health.check(HealthCheckRequest::default()).await?),
                }
                latencies.push(started.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok((all.len() as u64, all))
}

/// Look-ups per second of `find_by_id` through a pool with the server's
/// settings, at `concurrency`.
async fn run_direct(url: &str, concurrency: u64, duration: Duration) -> anyhow::Result<f64> {
    let options = rtap_server::database::pool_options(url.to_owned(), Duration::from_secs(5));
    let db = Database::connect(options).await?;
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let db = db.clone();
        tasks.spawn(async move {
            let mut queries = 0_u64;
            while Instant::now() < deadline {
                let id = rand::rng().random_range(1..=USERS);
                entity::user::Entity::find_by_id(id)
                    .one(&db)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("user {id} is missing"))?;
                queries += 1;
            }
            Ok::<_, anyhow::Error>(queries)
        });
    }
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result??;
    }
    db.close().await?;
    Ok(total as f64 / duration.as_secs_f64())
}

/// Creates pgbench's tables in the bench database (scale 10).
fn pgbench_init(database: &TestDatabase) -> anyhow::Result<()> {
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "10", &database.url])
        .output()?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    Ok(())
}

/// `pgbench -S` TPS on the bench database at the same concurrency.
fn pgbench_select_only(
    database: &TestDatabase,
    clients: u64,
    duration: Duration,
) -> anyhow::Result<f64> {
    let clients = clients.to_string();
    let seconds = duration.as_secs().to_string();
    let run = Command::new("pgbench")
        .args([
            "-S",
            "-n",
            "-c",
            &clients,
            "-j",
            "2",
            "-T",
            &seconds,
            &database.url,
        ])
        .output()?;
    anyhow::ensure!(
        run.status.success(),
        "pgbench -S failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = String::from_utf8_lossy(&run.stdout);
    report
        .lines()
        .find(|line| line.starts_with("tps = "))
        .and_then(|line| line.split_whitespace().nth(2))
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps line in pgbench's report:\n{report}"))
}
