//! IngestService throughput: events/s accepted (acknowledged by the broker)
//! through `TrackStream` and through many concurrent `Track` callers, next to
//! `rtap-simulator` producing straight to Kafka, in the same run against the
//! same broker.
//!
//! `cargo bench -p rtap-server --bench track` after `scripts/services.sh up`.
//! `RTAP_BENCH_EVENTS` (default 200,000) adjusts it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../simulator/benches/support/env_count.rs"]
mod env_count;

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use common::{TestDatabase, TestServer, pipeline::event, test_config};
use rtap::v1::{TrackRequest, TrackStreamRequest, ingest_service_client::IngestServiceClient};
use rtap_server::config::Role;
use rtap_simulator::config::SimulatorConfig;
use tokio_util::sync::CancellationToken;

/// Concurrent TrackStream calls.
const STREAMS: usize = 4;
/// Concurrent Track callers.
const CALLERS: usize = 64;

fn main() -> anyhow::Result<()> {
    let events: usize = env_count::env_count("RTAP_BENCH_EVENTS", 200_000)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let database = TestDatabase::create().await?;
        let result = bench(&database, events).await;
        database.drop().await?;
        result
    })
}

async fn bench(database: &TestDatabase, events: usize) -> anyhow::Result<()> {
    let mut config = test_config(database);
    config.role = Role::Api;
    config.max_stream_events = u32::try_from(events)?;
    // One client at full speed: the bench measures capacity, not limits.
    config.max_events_per_second = 0;
    config.max_calls_per_second = 0;
    let server = TestServer::start(config.clone()).await?;
    let client = IngestServiceClient::new(server.channel());

    // Baseline: the simulator producing directly to another topic.
    let direct_topic = format!("{}.direct", config.events_topic);
    let simulation = SimulatorConfig::try_parse_from([
        "rtap-simulator",
        "--kafka-brokers",
        &config.kafka_brokers.join(","),
        "--topic",
        &direct_topic,
        "--count",
        &events.to_string(),
        "--seed",
        "3",
        "--progress",
        "none",
    ])?;
    let report = rtap_simulator::run::run(simulation, CancellationToken::new()).await?;
    let direct = events as f64 / report.elapsed.as_secs_f64();

    // TrackStream: a few long streams.
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut client = client.clone();
        let count = events / STREAMS;
        streams.push(tokio::spawn(async move {
            let now = Utc::now();
            let requests = tokio_stream::iter((0..count).map(move |i| TrackStreamRequest {
                event: Some(event(1 + i as i64 % 10_000, now)),
            }));
            let reply = client.track_stream(requests).await?.into_inner();
            Ok::<_, anyhow::Error>(reply.accepted_count)
        }));
    }
    let mut accepted = 0;
    for stream in streams {
        accepted += stream.await??;
    }
    let stream_rate = accepted as f64 / started.elapsed().as_secs_f64();

    // Track: many concurrent callers, one event per call.
    let per_caller = events / 10 / CALLERS;
    let started = Instant::now();
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        let mut client = client.clone();
        callers.push(tokio::spawn(async move {
            for i in 0..per_caller {
                let request = TrackRequest {
                    event: Some(event(1 + (caller * per_caller + i) as i64, Utc::now())),
                };
                client.track(request).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for caller in callers {
        caller.await??;
    }
    let track_rate = (per_caller * CALLERS) as f64 / started.elapsed().as_secs_f64();

    println!("simulator direct produce: {events} events at {direct:.0} events/s");
    println!(
        "TrackStream ({STREAMS} streams): {accepted} accepted at {stream_rate:.0} events/s = {:.2} x direct",
        stream_rate / direct
    );
    println!(
        "Track ({CALLERS} concurrent callers): {} accepted at {track_rate:.0} events/s = {:.2} x direct",
        per_caller * CALLERS,
        track_rate / direct
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop().await
}
