//! GetUser throughput and latency over gRPC at a fixed concurrency, next to
//! `pgbench -S` (select-only, primary-key look-ups) at the same concurrency,
//! measured in the same run against the same PostgreSQL. Also printed, to
//! show where the time goes: a gRPC call that reads no database (health
//! Check), and the same look-ups through SeaORM without gRPC.
//!
//! `cargo bench -p rtap-server --bench catalog_get` after
//! `scripts/services.sh up`. `RTAP_BENCH_CONCURRENCY` (default 16) and
//! `RTAP_BENCH_SECONDS` (default 10) adjust it. Target: ≥ 0.5 × pgbench.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{TestDatabase, TestServer, env_or, test_config};
use rand::Rng;
use rtap::v1::{GetUserRequest, user_service_client::UserServiceClient};
use sea_orm::{ConnectionTrait, Database, EntityTrait};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const USERS: i64 = 10_000;
/// HTTP/2 connections the callers share.
const CONNECTIONS: usize = 2;

fn main() -> anyhow::Result<()> {
    let concurrency = env_or("RTAP_BENCH_CONCURRENCY", 16);
    let seconds = env_or("RTAP_BENCH_SECONDS", 10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let database = TestDatabase::create().await?;
        let result = bench(&database, concurrency, Duration::from_secs(seconds)).await;
        database.drop().await?;
        result
    })
}

async fn bench(
    database: &TestDatabase,
    concurrency: u64,
    duration: Duration,
) -> anyhow::Result<()> {
    let mut config = test_config(database);
    config.health_check_interval = Duration::from_secs(1);
    let server = TestServer::start_with_catalog(config).await?;
    let db = Database::connect(&database.url).await?;
    db.execute_unprepared(&format!(
        "INSERT INTO users (first_name, last_name, create_time, update_time) \
         SELECT 'First' || g, 'Last' || g, now(), now() FROM generate_series(1, {USERS}) g"
    ))
    .await?;
    db.close().await?;

    // Warm-up, then the measured run.
    run_clients(&server, Call::GetUser, concurrency, Duration::from_secs(1)).await?;
    let (calls, mut latencies) = run_clients(&server, Call::GetUser, concurrency, duration).await?;
    latencies.sort_unstable();
    let rate = calls as f64 / duration.as_secs_f64();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    // Where the time goes: gRPC alone, a call that reads no database.
    let (health_calls, _) = run_clients(&server, Call::HealthCheck, concurrency, duration).await?;
    server.stop().await?;

    // And the database alone: the same look-ups through SeaORM, one by one.
    let direct = run_direct(&database.url, concurrency, duration).await?;
    let pgbench = pgbench_select_only(database, concurrency, duration)?;
    println!("concurrency {concurrency}, {} s each", duration.as_secs());
    println!(
        "rtap GetUser over gRPC: {rate:>10.0} calls/s   p50 {:>6} us   p99 {:>6} us",
        percentile(0.50).as_micros(),
        percentile(0.99).as_micros()
    );
    println!(
        "gRPC alone:             {:>10.0} calls/s (health Check: no database)",
        health_calls as f64 / duration.as_secs_f64()
    );
    println!("SeaORM find_by_id alone:{direct:>10.0} queries/s (no gRPC, same process)");
    println!("pgbench -S:             {pgbench:>10.0} tps");
    println!(
        "ratio rtap / pgbench:   {:>10.2} (target >= 0.50)",
        rate / pgbench
    );
    Ok(())
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

/// `pgbench -S` TPS on the bench database at the same concurrency.
fn pgbench_select_only(
    database: &TestDatabase,
    clients: u64,
    duration: Duration,
) -> anyhow::Result<f64> {
    let url = &database.url;
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "10", url])
        .output()?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let clients = clients.to_string();
    let seconds = duration.as_secs().to_string();
    let run = Command::new("pgbench")
        .args(["-S", "-n", "-c", &clients, "-j", "2", "-T", &seconds, url])
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
