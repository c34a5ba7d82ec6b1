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
        PARTITIONS, assert_matches_truth, event, ingest_config, produce, server_command, simulate,
        wait_caught_up,
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

/// One test at a time: one kills a primary of the shared cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `config` pointed at the cluster, with a namespace whose partitions sit
/// on at least two primaries (so every test crosses nodes).
async fn on_cluster(mut config: Config) -> anyhow::Result<(Config, Nodes)> {
    common::use_cluster(&mut config);
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
    let _alone = SERIAL.lock().await;
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
    let _alone = SERIAL.lock().await;
    let database = TestDatabase::create().await?;
    let (mut config, nodes) = on_cluster(ingest_config(&database)).await?;
    config.role = Role::All;
    let brokers = config.kafka_brokers[0].clone();
    let server = TestServer::start(config.clone()).await?;
    let mut client = AnalyticsServiceClient::new(server.channel());
    let request = product_views();
    let mut stream = subscribe(&mut client, &request).await?;

    // Users 1..=60 land on every partition, so on several primaries.
    let now = Utc::now();
    let events: Vec<_> = (1..=60).map(|user| event(user, now)).collect();
    produce(&brokers, &config.events_topic, &events).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;

    let streamed = streamed_total(&mut stream, 0, 60).await?;
    ensure!(streamed == 60, "streamed {streamed} events, produced 60");
    let counted = counted_total(&mut client, &request).await?;
    ensure!(
        counted == 60,
        "the query counted {counted} events, produced 60"
    );

    drop(stream);
    server.stop().await?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}

/// Product 3's views (what `event` produces) over the last hour.
fn product_views() -> GetEventCountsRequest {
    GetEventCountsRequest {
        window: Some(TimeWindow {
            window: Some(Window::Trailing(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            })),
        }),
        granularity: Granularity::Minute as i32,
        product_id: 3,
        ..GetEventCountsRequest::default()
    }
}

type Stream = tonic::Streaming<rtap::v1::SubscribeResponse>;

async fn subscribe(
    client: &mut AnalyticsServiceClient<tonic::transport::Channel>,
    request: &GetEventCountsRequest,
) -> anyhow::Result<Stream> {
    Ok(client
        .subscribe(SubscribeRequest {
            query: Some(subscribe_request::Query::EventCounts(request.clone())),
            ..SubscribeRequest::default()
        })
        .await?
        .into_inner())
}

/// The events the unary query `request` counts.
async fn counted_total(
    client: &mut AnalyticsServiceClient<tonic::transport::Channel>,
    request: &GetEventCountsRequest,
) -> anyhow::Result<i64> {
    Ok(client
        .get_event_counts(request.clone())
        .await?
        .into_inner()
        .buckets
        .iter()
        .map(|b| b.total)
        .sum())
}

/// Reads `stream` (whose client held `held` events) until its snapshot plus
/// deltas count `expected` events; the count it reached.
async fn streamed_total(stream: &mut Stream, held: i64, expected: i64) -> anyhow::Result<i64> {
    let mut streamed = held;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while streamed < expected {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .with_context(|| {
                format!("the subscription streamed {expected} events within 30 s (got {streamed})")
            })?
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
    Ok(streamed)
}

/// The port of the primary that holds `keys` now.
async fn primary_port(nodes: &Nodes, keys: &PartitionKeys) -> anyhow::Result<u16> {
    nodes.refresh().await?;
    match nodes.client_for(keys).await?.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(_, port) => Ok(*port),
        other => anyhow::bail!("unexpected node address {other}"),
    }
}

#[tokio::test]
async fn a_primary_killed_mid_ingest_fails_over_and_nothing_is_lost_or_doubled()
-> anyhow::Result<()> {
    let _alone = SERIAL.lock().await;
    let database = TestDatabase::create().await?;
    let (mut config, nodes) = on_cluster(ingest_config(&database)).await?;
    // Small commits, so ingest is still under way when the primary dies.
    config.commit_max_events = 100;
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(&brokers, &config.events_topic, 60_000, 31, &[]).await?;
    let server = TestServer::start(config.clone()).await?;

    // Once ingest is under way, SIGKILL the primary of partition 0.
    let keys = PartitionKeys::new(&config.redis_namespace, 0);
    wait_for_ingest(&nodes, &config).await?;
    let before = applied_on(&nodes, &config).await?;
    let port = kill_primary(&nodes, &keys).await?;
    restart_node(port)?;

    wait_caught_up(&config, Duration::from_secs(120)).await?;
    ensure!(
        before < applied_on(&nodes, &config).await?,
        "ingest went on after the primary died"
    );
    assert_matches_truth(&config, &truth).await?;

    server.stop().await?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}

/// SIGKILLs the primary that holds `keys` and waits until its replica took
/// its slots over; the killed node's port.
async fn kill_primary(nodes: &Nodes, keys: &PartitionKeys) -> anyhow::Result<u16> {
    let port = primary_port(nodes, keys).await?;
    let mut node = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut node)
        .await?;
    let pid = info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .context("INFO names the process")?
        .trim()
        .to_owned();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()?;
    ensure!(killed.success(), "kill -9 {pid}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if matches!(primary_port(nodes, keys).await, Ok(now) if now != port) {
            return Ok(port);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no failover of {port} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts the stopped node on `port` again: it rejoins as a replica, as the
/// local cluster was.
fn restart_node(port: u16) -> anyhow::Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let restarted = std::process::Command::new(script)
        .args(["cluster-node", &port.to_string()])
        .status()?;
    ensure!(restarted.success(), "restart node {port}");
    Ok(())
}

/// Waits until ingest counted its first events.
async fn wait_for_ingest(nodes: &Nodes, config: &Config) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while applied_on(nodes, config).await? == 0 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "ingest did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Events counted so far over every partition of `config`'s namespace.
async fn applied_on(nodes: &Nodes, config: &Config) -> anyhow::Result<i64> {
    let states = common::pipeline::states_on(nodes, &config.redis_namespace).await?;
    Ok(states.iter().map(|s| s.applied).sum())
}

#[tokio::test]
async fn two_ingest_and_two_api_processes_share_a_cluster_and_a_killed_ingest_is_taken_over()
-> anyhow::Result<()> {
    let _alone = SERIAL.lock().await;
    let database = TestDatabase::create().await?;
    let (config, nodes) = on_cluster(ingest_config(&database)).await?;
    let brokers = config.kafka_brokers[0].clone();
    let spawn = || {
        server_command(
            env!("CARGO_BIN_EXE_rtap-server"),
            &config,
            &["--partition-lease", "2s"],
        )
        .spawn()
        .context("spawn rtap-server --role ingest")
    };
    let mut ingest = [spawn()?, spawn()?];
    let api = |config: &Config| {
        let mut config = config.clone();
        config.role = Role::Api;
        TestServer::start(config)
    };
    let apis = [api(&config).await?, api(&config).await?];
    let request = product_views();
    let mut clients = apis
        .each_ref()
        .map(|api| AnalyticsServiceClient::new(api.channel()));
    let mut streams = Vec::new();
    for client in &mut clients {
        streams.push(subscribe(client, &request).await?);
    }

    // Whichever process holds each partition's lease counts it; both API
    // processes stream every event.
    let now = Utc::now();
    let first: Vec<_> = (1..=60).map(|user| event(user, now)).collect();
    produce(&brokers, &config.events_topic, &first).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    let mut held = Vec::new();
    for stream in &mut streams {
        held.push(streamed_total(stream, 0, 60).await?);
    }

    // SIGKILL one: the other takes its partitions over when the leases end.
    ingest[0].start_kill()?;
    ingest[0].wait().await?;
    let second: Vec<_> = (61..=120).map(|user| event(user, now)).collect();
    produce(&brokers, &config.events_topic, &second).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    for (stream, held) in streams.iter_mut().zip(held) {
        let streamed = streamed_total(stream, held, 120).await?;
        ensure!(
            streamed == 120,
            "a subscriber counted {streamed} events, produced 120"
        );
    }
    for client in &mut clients {
        let counted = counted_total(client, &request).await?;
        ensure!(
            counted == 120,
            "an API process counted {counted} events, produced 120"
        );
    }

    drop(streams);
    ingest[1].start_kill()?;
    ingest[1].wait().await?;
    for api in apis {
        api.stop().await?;
    }
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}

/// The id of the cluster node listening on `port`.
async fn node_id(port: u16) -> anyhow::Result<String> {
    let mut node = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?;
    Ok(redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut node)
        .await?)
}

/// Moves `slot` from the primary on `from` to the one on `to`, key by key,
/// as `redis-cli --cluster reshard` does.
async fn migrate_slot(slot: u16, from: u16, to: u16) -> anyhow::Result<()> {
    let connect = |port: u16| async move {
        anyhow::Ok(
            redis::Client::open(format!("redis://127.0.0.1:{port}"))?
                .get_multiplexed_async_connection()
                .await?,
        )
    };
    let (mut source, mut target) = (connect(from).await?, connect(to).await?);
    let (source_id, target_id) = (node_id(from).await?, node_id(to).await?);
    let set_slot = |state: &'static str, id: String| {
        let mut command = redis::cmd("CLUSTER");
        command.arg("SETSLOT").arg(slot).arg(state).arg(id);
        command
    };
    set_slot("IMPORTING", source_id)
        .query_async::<()>(&mut target)
        .await?;
    set_slot("MIGRATING", target_id.clone())
        .query_async::<()>(&mut source)
        .await?;
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(50)
            .query_async(&mut source)
            .await?;
        if keys.is_empty() {
            break;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("REPLACE")
            .arg("KEYS")
            .arg(&keys)
            .query_async::<()>(&mut source)
            .await?;
        // Ingest keeps committing while the slot moves.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for port in [to, from] {
        set_slot("NODE", target_id.clone())
            .query_async::<()>(&mut connect(port).await?)
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_partition_whose_slot_moves_mid_ingest_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let _alone = SERIAL.lock().await;
    let database = TestDatabase::create().await?;
    let (mut config, nodes) = on_cluster(ingest_config(&database)).await?;
    // Small commits, so ingest is still under way when the slot moves.
    config.commit_max_events = 100;
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(&brokers, &config.events_topic, 60_000, 37, &[]).await?;
    let server = TestServer::start(config.clone()).await?;

    let keys = PartitionKeys::new(&config.redis_namespace, 0);
    wait_for_ingest(&nodes, &config).await?;
    let from = primary_port(&nodes, &keys).await?;
    // Another primary: the owner of some other key's slot.
    let mut probe = 0u16;
    let to = loop {
        let key = format!("probe-{probe}");
        let client = nodes.client_for_key(&key).await?;
        if let redis::ConnectionAddr::Tcp(_, port) = client.get_connection_info().addr()
            && *port != from
        {
            break *port;
        }
        probe += 1;
    };
    let slot = rtap_server::store::nodes::slot(keys.state().as_bytes());
    let before = applied_on(&nodes, &config).await?;
    migrate_slot(slot, from, to).await?;
    ensure!(
        primary_port(&nodes, &keys).await? == to,
        "partition 0's slot {slot} moved from {from} to {to}"
    );

    wait_caught_up(&config, Duration::from_secs(120)).await?;
    ensure!(
        before < applied_on(&nodes, &config).await?,
        "ingest went on while the slot moved"
    );
    assert_matches_truth(&config, &truth).await?;

    server.stop().await?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn servers_killed_at_random_moments_count_every_event_exactly_once_on_a_cluster()
-> anyhow::Result<()> {
    let _alone = SERIAL.lock().await;
    let database = TestDatabase::create().await?;
    let (config, nodes) = on_cluster(ingest_config(&database)).await?;
    common::pipeline::killed_at_random_moments(env!("CARGO_BIN_EXE_rtap-server"), &config).await?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn a_subscription_held_across_a_failover_ends_equal_to_the_unary_query() -> anyhow::Result<()>
{
    let _alone = SERIAL.lock().await;
    let database = TestDatabase::create().await?;
    let (mut config, nodes) = on_cluster(ingest_config(&database)).await?;
    config.role = Role::All;
    let brokers = config.kafka_brokers[0].clone();
    let server = TestServer::start(config.clone()).await?;
    let mut client = AnalyticsServiceClient::new(server.channel());
    let request = product_views();
    let mut stream = subscribe(&mut client, &request).await?;
    let now = Utc::now();
    let first: Vec<_> = (1..=60).map(|user| event(user, now)).collect();
    produce(&brokers, &config.events_topic, &first).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    let held = streamed_total(&mut stream, 0, 60).await?;

    // The primary of partition 0 (its data and its shard channel) dies.
    let keys = PartitionKeys::new(&config.redis_namespace, 0);
    let port = kill_primary(&nodes, &keys).await?;
    let second: Vec<_> = (61..=120).map(|user| event(user, now)).collect();
    produce(&brokers, &config.events_topic, &second).await?;
    wait_caught_up(&config, Duration::from_secs(120)).await?;
    restart_node(port)?;
    // The stream stayed open: deltas, or a resync snapshot, bring it to
    // what the query counts.
    let streamed = streamed_total(&mut stream, held, 120).await?;
    ensure!(
        streamed == 120,
        "the subscriber counted {streamed} events, produced 120"
    );
    let counted = counted_total(&mut client, &request).await?;
    ensure!(
        counted == 120,
        "the query counted {counted} events, produced 120"
    );

    drop(stream);
    server.stop().await?;
    common::delete_namespace_on(&nodes, &config.redis_namespace, PARTITIONS).await?;
    database.drop().await
}
