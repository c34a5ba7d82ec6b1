//! The analytics API under load, against a release `rtap-server` process:
//! 1. freshness: time from an event's produce to the delta that counts it
//!    reaching each of 100 subscribers, at 5,000 events/s;
//! 2. fan-out: resident memory per subscription with 10,000 open, and the
//!    spread between the first and last subscriber receiving one change;
//! 3. query latency: a 24-hour minute series and a top 10, next to
//!    `redis-benchmark` PING round trips on the same Redis;
//! 4. distinct feeds: levels of subscriptions that share no feed, under
//!    ingest (see `subscribe_parts/distinct_feeds.rs`);
//! 5. resume: a thousand subscribers resuming at once, time to the first
//!    replayed message next to a fresh Subscribe's snapshot (see
//!    `subscribe_parts/resume.rs`).
//!
//! `cargo bench -p rtap-server --bench subscribe` after
//! `scripts/services.sh up`; `RTAP_BENCH_PARTS=query` (or `freshness`,
//! `fanout`, `distinct`, `resume`, comma-separated) runs only those parts;
//! `RTAP_BENCH_REDIS=single,cluster` runs them on one Redis and then on the
//! local Redis Cluster (`scripts/services.sh cluster`); `RTAP_BENCH_TLS=1`
//! serves and calls the API over TLS (a CA made for the run). Targets:
//! freshness p50 ≤ 20 ms and p99 ≤ 100 ms; ≤ 16 KiB per subscription; query
//! p99 ≤ 5 ms; distinct feeds: freshness p99 ≤ 100 ms and GetUser p99 ≤ 2 ×
//! its value without subscriptions.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "subscribe_parts/distinct_feeds.rs"]
mod distinct_feeds;
#[path = "subscribe_parts/resume.rs"]
mod resume;

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use common::{
    TestDatabase,
    pipeline::{EventWriter, PARTITIONS, event},
    test_config, wait_for_health,
};
use rand::Rng;
use rtap::v1::{
    EventType, GetEventCountsRequest, GetTopProductsRequest, Granularity, ProductRanking,
    SubscribeRequest, SubscribeResponse, TimeWindow,
    analytics_service_client::AnalyticsServiceClient, delta, subscribe_request, subscribe_response,
    time_window::Window,
};
use rtap_server::Config;
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;

/// The CA of the server's certificate, when the bench runs over TLS.
static TLS_CA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The server at `addr`, over TLS when `RTAP_BENCH_TLS` asked for it.
fn endpoint(addr: &str) -> anyhow::Result<Endpoint> {
    Ok(match TLS_CA.get() {
        Some(ca) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    })
}

/// With `RTAP_BENCH_TLS=1`, a certificate for the server in `dir` (its
/// flags returned), and its CA for the clients.
fn tls_flags(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    if std::env::var("RTAP_BENCH_TLS").is_err() {
        return Ok(Vec::new());
    }
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?
        .signed_by(&key, &ca, &ca_key)?;
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    let _ = TLS_CA.set(ca.pem());
    println!("(over TLS)");
    Ok(vec![
        "--tls-cert".into(),
        cert_path.display().to_string(),
        "--tls-key".into(),
        key_path.display().to_string(),
    ])
}

fn trailing(seconds: i64) -> TimeWindow {
    TimeWindow {
        window: Some(Window::Trailing(prost_types::Duration {
            seconds,
            nanos: 0,
        })),
    }
}

fn counts_query(minutes: i64) -> SubscribeRequest {
    SubscribeRequest {
        query: Some(subscribe_request::Query::EventCounts(
            GetEventCountsRequest {
                window: Some(trailing(minutes * 60)),
                granularity: Granularity::Minute as i32,
                ..Default::default()
            },
        )),
        heartbeat_interval: None,
        resume_token: Vec::new(),
    }
}

/// The change of the total event count a message carries (a snapshot gives
/// the total itself).
fn total_of(message: &SubscribeResponse) -> (bool, i64) {
    match &message.update {
        Some(subscribe_response::Update::Snapshot(s)) => match &s.result {
            Some(rtap::v1::snapshot::Result::EventCounts(r)) => {
                (true, r.buckets.iter().map(|b| b.total).sum())
            }
            _ => (true, 0),
        },
        Some(subscribe_response::Update::Delta(d)) => match &d.change {
            Some(delta::Change::EventCounts(c)) => (false, c.buckets.iter().map(|b| b.total).sum()),
            _ => (false, 0),
        },
        _ => (false, 0),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Microseconds each node has spent executing commands (`INFO
/// commandstats`, summed over commands), in `nodes`' order.
async fn command_usec(nodes: &[redis::Client]) -> anyhow::Result<Vec<f64>> {
    let mut totals = Vec::with_capacity(nodes.len());
    for node in nodes {
        let mut connection = node.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await?;
        let usec: f64 = info
            .lines()
            .filter_map(|line| line.split(',').find_map(|f| f.strip_prefix("usec=")))
            .filter_map(|v| v.parse::<f64>().ok())
            .sum();
        totals.push(usec);
    }
    Ok(totals)
}

/// What any read of every partition waits for, without RTAP: one PING per
/// partition, all sent at once, each on the shared connection that serves
/// the partition's slot (on one Redis, all on one connection), as the
/// query's per-partition pipelines are. Milliseconds per round.
async fn fan_out_ping_ms(config: &Config, rounds: usize) -> anyhow::Result<Vec<f64>> {
    use rtap_server::store::{keys::PartitionKeys, nodes::Route};
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    let mut connections = Vec::new();
    for partition in 0..PARTITIONS {
        let key = PartitionKeys::new(&config.redis_namespace, partition).state();
        connections.push(nodes.connection(&key).await?);
    }
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        futures_util::future::try_join_all(connections.iter().map(|connection| {
            let mut connection = connection.clone();
            async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
            }
        }))
        .await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(ms)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let database = TestDatabase::create().await?;
        let result = bench(&database).await;
        database.drop().await?;
        result
    })
}

async fn bench(database: &TestDatabase) -> anyhow::Result<()> {
    let mut config = test_config(database);
    config.events_partitions = PARTITIONS;
    // `RTAP_BENCH_REDIS` (default `single`; `single,cluster` for both in one
    // run) names the deployments the server runs against.
    let deployments = std::env::var("RTAP_BENCH_REDIS").unwrap_or_else(|_| "single".into());
    for deployment in deployments.split(',').map(str::trim) {
        let mut config = config.clone();
        match deployment {
            "single" => {}
            "cluster" => {
                common::use_cluster(&mut config);
                config.redis_namespace = format!("{}-cluster", config.redis_namespace);
                config.events_topic = format!("{}-cluster", config.events_topic);
            }
            other => {
                anyhow::bail!("RTAP_BENCH_REDIS: unknown deployment {other:?} (single, cluster)")
            }
        }
        println!("--- Redis: {deployment}");
        run_parts(&config).await?;
    }
    Ok(())
}

/// Runs the parts `RTAP_BENCH_PARTS` names against a server process on
/// `config`'s Redis.
async fn run_parts(config: &Config) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let brokers = config.kafka_brokers.join(",");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rtap-server"));
    let tls_dir = tempfile::tempdir()?;
    command.args(tls_flags(tls_dir.path())?);
    if let Ok(wait) = std::env::var("RTAP_FETCH_MAX_WAIT") {
        command.args(["--fetch-max-wait", &wait]);
    }
    if config.redis_cluster {
        command.arg("--redis-cluster");
    }
    let mut server = command
        .args(["--listen-addr", &addr])
        .args(["--metrics-addr", "off"])
        .args(["--database-url", &config.database_url])
        .args(["--redis-url", &config.redis_url])
        .args(["--redis-namespace", &config.redis_namespace])
        .args(["--kafka-brokers", &brokers])
        .args(["--events-topic", &config.events_topic])
        .args(["--dead-letter-topic", &config.dead_letter_topic])
        .args(["--events-partitions", &PARTITIONS.to_string()])
        // Thousands of subscriptions from one client: no caller limits.
        .args([
            "--max-calls-per-second",
            "0",
            "--max-concurrent-streams",
            "0",
        ])
        .args([
            "--max-subscriptions-per-caller",
            "0",
            "--max-subscriptions",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = server
        .id()
        .ok_or_else(|| anyhow::anyhow!("the server exited"))?;
    let channel = endpoint(&addr)?.connect_lazy();
    wait_for_health(
        channel.clone(),
        "",
        ServingStatus::Serving,
        Duration::from_secs(60),
    )
    .await?;
    let writer =
        Arc::new(EventWriter::connect(&config.kafka_brokers[0], &config.events_topic).await?);
    // The first node: the baseline of PING round trips.
    let redis_url = config.redis_url.split(',').next().unwrap_or_default();

    // `RTAP_BENCH_PARTS` (e.g. `query`) runs a subset: freshness, fanout,
    // query, distinct.
    let parts = std::env::var("RTAP_BENCH_PARTS").unwrap_or_default();
    let run = |part: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == part);
    let result = async {
        if run("freshness") {
            freshness(&channel, &writer).await?;
        }
        if run("fanout") {
            fan_out(&addr, &writer, pid).await?;
        }
        if run("query") {
            let every = common::every_redis_node(config).await?;
            query_latency(&channel, &writer, redis_url, (config, &every)).await?;
        }
        if run("distinct") {
            let every = common::every_redis_node(config).await?;
            distinct_feeds::distinct_feeds(&addr, &channel, &writer, pid, &every).await?;
        }
        if run("resume") {
            resume::resume(&channel, &writer).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    server.start_kill()?;
    server.wait().await?;
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    result
}

/// Arrival times of the cumulative totals one subscriber saw.
type Arrivals = Vec<(Instant, i64)>;

async fn freshness(channel: &Channel, writer: &Arc<EventWriter>) -> anyhow::Result<()> {
    const SUBSCRIBERS: usize = 100;
    const RATE: usize = 5000;
    const TICK: Duration = Duration::from_millis(10);
    const SECONDS: u64 = 10;
    let mut readers = Vec::new();
    for index in 0..SUBSCRIBERS {
        // Ten distinct queries, ten subscribers each.
        let request = counts_query(5 + (index % 10) as i64);
        let mut stream = AnalyticsServiceClient::new(channel.clone())
            .subscribe(request)
            .await?
            .into_inner();
        let arrivals = Arc::new(Mutex::new(Arrivals::new()));
        let sink = arrivals.clone();
        readers.push((
            tokio::spawn(async move {
                let mut total = 0;
                while let Some(Ok(message)) = stream.next().await {
                    let (snapshot, change) = total_of(&message);
                    total = if snapshot { change } else { total + change };
                    sink.lock().await.push((Instant::now(), total));
                }
            }),
            arrivals,
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let per_tick = RATE * TICK.as_millis() as usize / 1000;
    let mut sent: Vec<(Instant, i64)> = Vec::new();
    let mut total = 0i64;
    let mut ticker = tokio::time::interval(TICK);
    let mut rng = rand::rng();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(SECONDS) {
        ticker.tick().await;
        let now = Utc::now();
        let events: Vec<_> = (0..per_tick)
            .map(|_| event(rng.random_range(1..100_000), now))
            .collect();
        let at = Instant::now();
        writer.send(&events).await?;
        total += events.len() as i64;
        sent.push((at, total));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies = Vec::new();
    let mut missing = 0;
    for (reader, arrivals) in readers {
        reader.abort();
        let arrivals = arrivals.lock().await;
        for (at, cumulative) in &sent {
            match arrivals.iter().find(|(_, seen)| seen >= cumulative) {
                Some((arrived, _)) => {
                    latencies.push(arrived.saturating_duration_since(*at).as_secs_f64() * 1000.0)
                }
                None => missing += 1,
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "freshness at {RATE} events/s, {SUBSCRIBERS} subscribers: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         ({} produce batches x subscribers measured, {missing} never seen) (targets p50 <= 20 ms, p99 <= 100 ms)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len(),
    );
    Ok(())
}

async fn fan_out(addr: &str, writer: &Arc<EventWriter>, pid: u32) -> anyhow::Result<()> {
    const SUBSCRIPTIONS: usize = 10_000;
    const CONNECTIONS: usize = 10;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid)?;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(endpoint(addr)?.connect().await?);
    }
    let first_change: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut readers = Vec::new();
    for index in 0..SUBSCRIPTIONS {
        let mut stream = AnalyticsServiceClient::new(channels[index % CONNECTIONS].clone())
            .subscribe(counts_query(20 + (index % 10) as i64))
            .await?
            .into_inner();
        stream.next().await; // the snapshot
        let sink = first_change.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message.update, Some(subscribe_response::Update::Delta(_))) {
                    sink.lock().await.push(Instant::now());
                    break;
                }
            }
            // Keep the subscription open until the bench ends.
            std::future::pending::<()>().await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per_subscription = (after.saturating_sub(before)) as f64 * 1024.0 / SUBSCRIPTIONS as f64;

    let sent = Instant::now();
    let now = Utc::now();
    writer
        .send(&(1..=100).map(|u| event(u, now)).collect::<Vec<_>>())
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let arrivals = first_change.lock().await.clone();
    let first = arrivals.iter().min().copied();
    let last = arrivals.iter().max().copied();
    println!(
        "fan-out: {SUBSCRIPTIONS} subscriptions over {CONNECTIONS} connections: server RSS {before} KiB -> {after} KiB, \
         {per_subscription:.0} bytes per subscription (target <= 16384)"
    );
    if let (Some(first), Some(last)) = (first, last) {
        println!(
            "fan-out delivery of one change: {} of {SUBSCRIPTIONS} received it; first after {:.1} ms, last after {:.1} ms, spread {:.1} ms",
            arrivals.len(),
            first.duration_since(sent).as_secs_f64() * 1000.0,
            last.duration_since(sent).as_secs_f64() * 1000.0,
            last.duration_since(first).as_secs_f64() * 1000.0,
        );
    }
    for reader in readers {
        reader.abort();
    }
    Ok(())
}

async fn query_latency(
    channel: &Channel,
    writer: &Arc<EventWriter>,
    redis_url: &str,
    (config, every): (&Config, &[redis::Client]),
) -> anyhow::Result<()> {
    const CALLS: usize = 1000;
    // A day of traffic: events in every minute of the last 24 hours.
    let now = Utc::now();
    let mut rng = rand::rng();
    for hour in 0..24 {
        let events: Vec<_> = (0..60 * 30)
            .map(|i| {
                let mut e = event(
                    rng.random_range(1..50_000),
                    now - chrono::Duration::minutes(hour * 60 + i / 30),
                );
                e.product_id = rng.random_range(1..500);
                e
            })
            .collect();
        writer.send(&events).await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut client = AnalyticsServiceClient::new(channel.clone());
    let series = GetEventCountsRequest {
        window: Some(trailing(24 * 3600)),
        granularity: Granularity::Minute as i32,
        event_types: vec![EventType::ProductView as i32],
        ..Default::default()
    };
    let top = GetTopProductsRequest {
        window: Some(trailing(24 * 3600)),
        ranking: ProductRanking::Views as i32,
        limit: 10,
        include_product_names: false,
    };
    // Each query kind in a loop of its own, so the Redis time each costs
    // (summed `INFO commandstats`, per node) is its own.
    let before = command_usec(every).await?;
    let mut series_ms = Vec::new();
    for _ in 0..CALLS {
        let started = Instant::now();
        client.get_event_counts(series.clone()).await?;
        series_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let between = command_usec(every).await?;
    let mut top_ms = Vec::new();
    for _ in 0..CALLS {
        let started = Instant::now();
        client.get_top_products(top).await?;
        top_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let after = command_usec(every).await?;
    series_ms.sort_by(f64::total_cmp);
    top_ms.sort_by(f64::total_cmp);
    let mut floor_ms = fan_out_ping_ms(config, CALLS).await?;
    floor_ms.sort_by(f64::total_cmp);
    let host = redis_url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_owned();
    let (redis_host, redis_port) = host.rsplit_once(':').unwrap_or(("127.0.0.1", "6379"));
    let baseline = std::process::Command::new("redis-benchmark")
        .args([
            "-h", redis_host, "-p", redis_port, "-c", "1", "-n", "20000", "-t", "ping", "--csv",
        ])
        .output();
    println!(
        "query latency, sequential: 24 h minute series (1441 buckets x {PARTITIONS} partitions) p50 {:.2} ms, p99 {:.2} ms; \
         top 10 over 24 h p50 {:.2} ms, p99 {:.2} ms (target p99 <= 5 ms)",
        percentile(&series_ms, 0.5),
        percentile(&series_ms, 0.99),
        percentile(&top_ms, 0.5),
        percentile(&top_ms, 0.99),
    );
    for (what, from, to) in [
        ("24 h series", &before, &between),
        ("top 10", &between, &after),
    ] {
        let per_call: Vec<f64> = from
            .iter()
            .zip(to)
            .map(|(a, b)| (b - a) / CALLS as f64)
            .collect();
        println!(
            "query Redis time per {what} call (INFO commandstats): {:.0} us summed over {} node(s), {:.0} us on the busiest",
            per_call.iter().sum::<f64>(),
            per_call.len(),
            per_call.iter().copied().fold(0.0, f64::max),
        );
    }
    println!(
        "fan-out floor, one PING per partition at once on the connection that serves its slot (no RTAP code): p50 {:.3} ms, p99 {:.3} ms",
        percentile(&floor_ms, 0.5),
        percentile(&floor_ms, 0.99),
    );
    match baseline {
        Ok(output) if output.status.success() => {
            let csv = String::from_utf8_lossy(&output.stdout);
            for line in csv.lines().filter(|l| l.starts_with("\"PING_MBULK")) {
                let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
                if let (Some(p50), Some(p99)) = (fields.get(4), fields.get(6)) {
                    println!(
                        "redis-benchmark PING round trip, 1 client: p50 {p50} ms, p99 {p99} ms"
                    );
                }
            }
        }
        _ => println!("redis-benchmark is not installed: no baseline"),
    }
    Ok(())
}
