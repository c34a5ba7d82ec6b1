//! GetUser throughput and latency over gRPC at a fixed concurrency, next to
//! `pgbench -S` (select-only, primary-key look-ups) at the same concurrency,
//! measured in the same run against the same PostgreSQL. The two alternate
//! over a few rounds, and the ratio reported is the median of the rounds'
//! ratios: on a shared machine a neighbour's burst can halve one phase, and
//! alternating keeps such a burst from deciding the ratio. Also printed, to
//! show where the time goes: a gRPC call that reads no database (health
//! Check), and the same look-ups through SeaORM without gRPC.
//!
//! Then the same GetUser over TLS with an API key, against plaintext with
//! no authentication, alternating over the rounds (target ≥ 0.8 × the
//! plaintext rate), and the health Check three ways (plaintext, TLS, TLS
//! with a key it must check) to price the key check per call, with the
//! PostgreSQL transactions the keyed phase made (the check must not touch
//! it: only the key reloads every 2 s do). Last, a caller far over its rate
//! limit next to one within it: the second's GetUser p99 alone and beside
//! the first.
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
use rtap_server::config::{Auth, Role};
use sea_orm::{ConnectionTrait, Database, DbBackend, EntityTrait, Statement};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
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
    let server = TestServer::start_with_catalog(config.clone()).await?;
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
    let plaintext = Target::plaintext(&server);
    run_clients(
        &plaintext,
        Call::GetUser,
        concurrency,
        Duration::from_secs(1),
    )
    .await?;
    let mut latencies = Vec::new();
    let (mut rates, mut pgbench_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (calls, round_latencies) =
            run_clients(&plaintext, Call::GetUser, concurrency, duration).await?;
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
    let (health_calls, _) =
        run_clients(&plaintext, Call::HealthCheck, concurrency, duration).await?;
    secured(database, &config, &plaintext, concurrency, duration, rounds).await?;
    neighbours(database, &config, duration).await?;
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

/// Where the callers call: a few HTTP/2 connections (callers share them,
/// as gRPC clients do), plaintext or TLS, with an API key or none.
#[derive(Clone)]
struct Target {
    channels: Vec<Channel>,
    key: Option<MetadataValue<Ascii>>,
}

impl Target {
    fn plaintext(server: &TestServer) -> Self {
        Self {
            channels: (0..CONNECTIONS).map(|_| server.channel()).collect(),
            key: None,
        }
    }

    async fn tls(server: &TestServer, ca: &str, key: Option<&str>) -> anyhow::Result<Self> {
        let mut channels = Vec::new();
        for _ in 0..CONNECTIONS {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost");
            channels.push(
                Endpoint::from_shared(format!("https://{}", server.addr))?
                    .tls_config(tls)?
                    .connect()
                    .await?,
            );
        }
        let key = key.map(|key| format!("Bearer {key}").parse()).transpose()?;
        Ok(Self { channels, key })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(key) = &self.key {
            request.metadata_mut().insert("authorization", key.clone());
        }
        request
    }
}

async fn run_clients(
    target: &Target,
    call: Call,
    concurrency: u64,
    duration: Duration,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..concurrency {
        let channel =
            target.channels[usize::try_from(caller).unwrap_or(0) % target.channels.len()].clone();
        let mut users = UserServiceClient::new(channel.clone());
        let mut health = HealthClient::new(channel);
        let target = target.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let id = rand::rng().random_range(1..=USERS);
                let started = Instant::now();
                match call {
                    Call::GetUser => {
                        drop(
                            users
                                .get_user(target.request(GetUserRequest { id }))
                                .await?,
                        );
                    }
                    Call::HealthCheck => drop(
                        health
                            .check(target.request(HealthCheckRequest::default()))
                            .await?,
                    ),
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

/// GetUser over TLS with a key against plaintext without authentication,
/// and what the key check costs a call.
async fn secured(
    database: &TestDatabase,
    config: &rtap_server::Config,
    plaintext: &Target,
    concurrency: u64,
    duration: Duration,
    rounds: u64,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?
        .signed_by(&leaf_key, &ca, &ca_key)?;
    std::fs::write(dir.path().join("server.pem"), leaf.pem())?;
    std::fs::write(dir.path().join("server.key"), leaf_key.serialize_pem())?;
    let tls_config = |auth: Auth| {
        let mut tls = config.clone();
        tls.role = Role::Api;
        tls.listen_addr = "127.0.0.1:0".parse().expect("an address");
        tls.tls_cert = Some(dir.path().join("server.pem"));
        tls.tls_key = Some(dir.path().join("server.key"));
        tls.auth = auth;
        tls.auth_also = vec![rtap_server::auth::OpenService::Health];
        tls
    };
    let keyed_server = TestServer::start(tls_config(Auth::Keys)).await?;
    let tls_server = TestServer::start(tls_config(Auth::None)).await?;
    let key = create_key(database, "bench", "reader")?;
    let keyed = Target::tls(&keyed_server, &ca.pem(), Some(&key)).await?;
    let tls = Target::tls(&tls_server, &ca.pem(), None).await?;
    // The key is loaded within the reload interval.
    let started = Instant::now();
    while run_clients(&keyed, Call::GetUser, 1, Duration::from_millis(10))
        .await
        .is_err()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the key never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let (plain_calls, _) = run_clients(plaintext, Call::GetUser, concurrency, duration).await?;
        let (keyed_calls, _) = run_clients(&keyed, Call::GetUser, concurrency, duration).await?;
        let ratio = keyed_calls as f64 / plain_calls as f64;
        println!(
            "round {round}: GetUser plaintext {:>8.0} calls/s, TLS + key {:>8.0} calls/s, ratio {ratio:.2}",
            plain_calls as f64 / duration.as_secs_f64(),
            keyed_calls as f64 / duration.as_secs_f64(),
        );
        ratios.push(ratio);
    }
    println!(
        "ratio TLS + key / plaintext GetUser: {:.2} (median of the rounds; target >= 0.80)",
        median(&mut ratios)
    );

    let transactions = || async {
        let db = Database::connect(&database.url).await?;
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT (xact_commit + xact_rollback)::bigint AS n FROM pg_stat_database \
                 WHERE datname = current_database()",
            ))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no pg_stat_database row"))?;
        db.close().await?;
        anyhow::Ok(row.try_get::<i64>("", "n")?)
    };
    let (plain_health, _) =
        run_clients(plaintext, Call::HealthCheck, concurrency, duration).await?;
    let (tls_health, _) = run_clients(&tls, Call::HealthCheck, concurrency, duration).await?;
    let before = transactions().await?;
    let (keyed_health, _) = run_clients(&keyed, Call::HealthCheck, concurrency, duration).await?;
    // PostgreSQL publishes its statistics about a second late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = transactions().await? - before;
    let per_second = |calls: u64| calls as f64 / duration.as_secs_f64();
    // Two cores busy: CPU per call is about 2 / rate.
    let cost_micros = 2e6 * (1.0 / per_second(keyed_health) - 1.0 / per_second(tls_health));
    println!(
        "health Check: plaintext {:>8.0}/s, TLS {:>8.0}/s, TLS + key {:>8.0}/s; the key check costs about {cost_micros:.1} us of CPU a call",
        per_second(plain_health),
        per_second(tls_health),
        per_second(keyed_health),
    );
    println!(
        "PostgreSQL transactions during the {} keyed health calls: {during} (the key reloads: one every 2 s; none per call)",
        keyed_health
    );
    keyed_server.stop().await?;
    tls_server.stop().await
}

/// Makes a `role` key named `name` with `rtap-server keys create`.
fn create_key(database: &TestDatabase, name: &str, role: &str) -> anyhow::Result<String> {
    let created = Command::new(env!("CARGO_BIN_EXE_rtap-server"))
        .args(["keys", "create", "--name", name, "--role", role])
        .args(["--database-url", &database.url])
        .output()?;
    anyhow::ensure!(
        created.status.success(),
        "keys create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    Ok(String::from_utf8(created.stdout)?.trim().to_owned())
}

/// Calls GetUser as `target` every `every` from each of `callers` callers
/// until `deadline`; the latencies (any refusal fails the bench).
async fn paced(
    target: &Target,
    callers: usize,
    every: Duration,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let mut users =
            UserServiceClient::new(target.channels[caller % target.channels.len()].clone());
        let target = target.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut ticks = tokio::time::interval(every);
            while Instant::now() < deadline {
                ticks.tick().await;
                let id = rand::rng().random_range(1..=USERS);
                let started = Instant::now();
                users
                    .get_user(target.request(GetUserRequest { id }))
                    .await?;
                latencies.push(started.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    all.sort_unstable();
    Ok(all)
}

/// GetUser as fast as `concurrency` callers go until `deadline`: calls
/// served and calls refused for the rate limit.
async fn flood(
    target: &Target,
    concurrency: usize,
    deadline: Instant,
) -> anyhow::Result<(u64, u64)> {
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..concurrency {
        let mut users =
            UserServiceClient::new(target.channels[caller % target.channels.len()].clone());
        let target = target.clone();
        tasks.spawn(async move {
            let (mut served, mut refused) = (0_u64, 0_u64);
            while Instant::now() < deadline {
                let id = rand::rng().random_range(1..=USERS);
                match users.get_user(target.request(GetUserRequest { id })).await {
                    Ok(_) => served += 1,
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => refused += 1,
                    Err(status) => return Err(status),
                }
            }
            Ok((served, refused))
        });
    }
    let (mut served, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (s, r) = result??;
        served += s;
        refused += r;
    }
    Ok((served, refused))
}

/// A caller far over its rate limit next to one within it.
async fn neighbours(
    database: &TestDatabase,
    config: &rtap_server::Config,
    duration: Duration,
) -> anyhow::Result<()> {
    const LIMIT: u32 = 2_000;
    let mut limited = config.clone();
    limited.role = Role::Api;
    limited.listen_addr = "127.0.0.1:0".parse()?;
    limited.auth = Auth::Keys;
    limited.max_calls_per_second = LIMIT;
    let server = TestServer::start(limited).await?;
    let with_key = |key: &str| -> anyhow::Result<Target> {
        Ok(Target {
            key: Some(format!("Bearer {key}").parse()?),
            ..Target::plaintext(&server)
        })
    };
    let quiet = with_key(&create_key(database, "quiet", "reader")?)?;
    let noisy = with_key(&create_key(database, "noisy", "reader")?)?;
    let started = Instant::now();
    while run_clients(&quiet, Call::GetUser, 1, Duration::from_millis(10))
        .await
        .is_err()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the keys never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The quiet caller: 4 callers, a call every 8 ms each (500 a second,
    // a quarter of its limit).
    let (callers, every) = (4, Duration::from_millis(8));
    let p = |latencies: &[Duration], q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_micros()
    };
    let alone = paced(&quiet, callers, every, Instant::now() + duration).await?;
    let deadline = Instant::now() + duration;
    let (beside, flooded) = tokio::join!(
        paced(&quiet, callers, every, deadline),
        flood(&noisy, 16, deadline)
    );
    let (beside, (served, refused)) = (beside?, flooded?);
    let seconds = duration.as_secs_f64();
    println!(
        "rate limit {LIMIT}/s per key: a flooding caller got {:.0} calls/s served and {:.0}/s refused (RESOURCE_EXHAUSTED)",
        served as f64 / seconds,
        refused as f64 / seconds
    );
    println!(
        "its neighbour at 500 calls/s: GetUser p50 {} us / p99 {} us alone, p50 {} us / p99 {} us beside it (p99 ratio {:.2}; refusals cost CPU the 2 cores share)",
        p(&alone, 0.5),
        p(&alone, 0.99),
        p(&beside, 0.5),
        p(&beside, 0.99),
        p(&beside, 0.99) as f64 / p(&alone, 0.99).max(1) as f64
    );
    server.stop().await
}
