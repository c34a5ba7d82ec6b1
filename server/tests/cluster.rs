//! RTAP on a live Redis Cluster (`scripts/services.sh cluster`: six nodes on
//! loopback, three primaries): ingest counts simulated traffic exactly with
//! partitions on different primaries, and queries and subscriptions read
//! across them.
//!
//! `RTAP_TEST_REDIS_CLUSTER` names the seed nodes (default the local
//! cluster's three primaries).

mod common;

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, ensure};
use chrono::Utc;
use common::{
    TestDatabase, TestServer,
    pipeline::{
        PARTITIONS, assert_matches_truth, event, ingest_config, produce, simulate, wait_caught_up,
    },
};
use rtap::v1::{
    GetEventCountsRequest, Granularity, SubscribeRequest, TimeWindow,
    analytics_service_client::AnalyticsServiceClient, delta, subscribe_request, subscribe_response,
    time_window::Window,
};
use rtap_server::{
    Config,
    config::Role,
    store::{keys::PartitionKeys, nodes::Nodes},
};
use tokio_stream::StreamExt;

fn seeds() -> String {
    std::env::var("RTAP_TEST_REDIS_CLUSTER").unwrap_or_else(|_| {
        "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into()
    })
}

/// `config` pointed at the cluster, with a namespace whose partitions sit
/// on at least two primaries (so every test crosses nodes).
async fn on_cluster(mut config: Config) -> anyhow::Result<(Config, Nodes)> {
    config.redis_url = seeds();
    config.redis_cluster = true;
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    let base = config.redis_namespace.clone();
    for attempt in 0.. {
        config.redis_namespace = format!("{base}-{attempt}");
        let mut primaries = BTreeSet::new();
        for partition in 0..PARTITIONS {
            let keys = PartitionKeys::new(&config.redis_namespace, partition);
            let client = nodes.client_for(&keys).await?;
            primaries.insert(client.get_connection_info().addr().to_string());
        }
        if primaries.len() > 1 {
            break;
        }
    }
    Ok((config, nodes))
}

#[tokio::test]
async fn simulated_traffic_is_counted_exactly_with_partitions_on_several_primaries()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (config, nodes) = on_cluster(ingest_config(&database)).await?;
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(
        &brokers,
        &config.events_topic,
        10_000,
        29,
        &["--duplicate-share", "0.02"],
    )
    .await?;

    let server = TestServer::start(config.clone()).await?;
    wait_caught_up(&config, Duration::from_secs(120)).await?;
    assert_matches_truth(&config, &truth).await?;

    server.stop().await?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn queries_and_subscriptions_read_every_primary() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (mut config, nodes) = on_cluster(ingest_config(&database)).await?;
    config.role = Role::All;
    let brokers = config.kafka_brokers[0].clone();
    let server = TestServer::start(config.clone()).await?;
    let mut client = AnalyticsServiceClient::new(server.channel());
    let request = GetEventCountsRequest {
        window: Some(TimeWindow {
            window: Some(Window::Trailing(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            })),
        }),
        granularity: Granularity::Minute as i32,
        product_id: 3,
        ..GetEventCountsRequest::default()
    };
    let mut stream = client
        .subscribe(SubscribeRequest {
            query: Some(subscribe_request::Query::EventCounts(request.clone())),
            ..SubscribeRequest::default()
        })
        .await?
        .into_inner();

    // Users 1..=60 land on every partition, so on several primaries.
    let now = Utc::now();
    let events: Vec<_> = (1..=60).map(|user| event(user, now)).collect();
    produce(&brokers, &config.events_topic, &events).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;

    let mut streamed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while streamed < 60 {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .context("the subscription streamed every event within 30 s")?
            .context("the stream stayed open")??;
        match message.update {
            Some(subscribe_response::Update::Snapshot(snapshot)) => {
                if let Some(rtap::v1::snapshot::Result::EventCounts(counts)) = snapshot.result {
                    streamed = counts.buckets.iter().map(|b| b.total).sum();
                }
            }
            Some(subscribe_response::Update::Delta(change)) => {
                if let Some(delta::Change::EventCounts(counts)) = change.change {
                    streamed += counts.buckets.iter().map(|b| b.total).sum::<i64>();
                }
            }
            _ => {}
        }
    }
    ensure!(streamed == 60, "streamed {streamed} events, produced 60");
    let counted: i64 = client
        .get_event_counts(request)
        .await?
        .into_inner()
        .buckets
        .iter()
        .map(|b| b.total)
        .sum();
    ensure!(
        counted == 60,
        "the query counted {counted} events, produced 60"
    );

    drop(stream);
    server.stop().await?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}
