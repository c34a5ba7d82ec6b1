//! The Kafka → Redis pipeline against the real broker and Redis: simulated
//! traffic (with duplicates and malformed payloads) counted exactly, and
//! exactly once through server crashes, a Redis outage and a broker restart.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, ensure};
use chrono::Utc;
use common::{
    PrivateBroker, TcpProxy, TestDatabase, TestServer,
    pipeline::{
        PARTITIONS, applied, assert_matches_truth, buckets, event, ingest_config,
        killed_at_random_moments, produce, redis, redis_url, server_command, settled_versions,
        simulate, states, wait_caught_up,
    },
};
use prost::Message;
use rand::Rng;
use rskafka::client::{ClientBuilder, partition::UnknownTopicHandling};
use rtap::v1::{
    EventType, InteractionEvent, Source, TrackRequest, ingest_service_client::IngestServiceClient,
};
use rtap_server::{
    Config,
    ingest::dead_letter::{REASON_HEADER, SOURCE_OFFSET_HEADER},
    store::{
        Bucket, Counter, Granularity, Ranking, Retention, StoreError,
        aggregate::{BatchAggregate, BucketChanges, SessionState},
        commit::{self, CommitMeta, CommitSettings, PartitionState},
        hll,
        keys::PartitionKeys,
        mirror::Mirror,
        nodes::Route,
        read::MetricReader,
        session_epoch,
    },
};

/// Dead letters of `topic`: (reason header, source offset header).
async fn dead_letters(brokers: &str, topic: &str) -> anyhow::Result<Vec<(String, String)>> {
    let client = ClientBuilder::new(vec![brokers.to_owned()]).build().await?;
    let mut letters = Vec::new();
    for partition in 0..PARTITIONS {
        let reader = client
            .partition_client(topic, partition, UnknownTopicHandling::Retry)
            .await?;
        let mut offset = 0;
        loop {
            let (batch, high_watermark) = reader.fetch_records(offset, 1..1_000_000, 100).await?;
            for record in batch {
                offset = record.offset + 1;
                let header = |name: &str| {
                    String::from_utf8_lossy(record.record.headers.get(name).map_or(&[][..], |v| v))
                        .into_owned()
                };
                letters.push((header(REASON_HEADER), header(SOURCE_OFFSET_HEADER)));
            }
            if offset >= high_watermark {
                break;
            }
        }
    }
    Ok(letters)
}

#[tokio::test]
async fn simulated_traffic_with_duplicates_and_poison_is_counted_exactly() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(
        &brokers,
        &config.events_topic,
        20_000,
        11,
        &["--duplicate-share", "0.02", "--malformed-share", "0.01"],
    )
    .await?;
    assert!(truth.duplicates > 100 && truth.malformed.len() == 6);

    let server = TestServer::start(config.clone()).await?;
    wait_caught_up(&config, Duration::from_secs(120)).await?;
    assert_matches_truth(&config, &truth).await?;

    // Every malformed record is in the dead-letter topic, with its reason.
    let letters = dead_letters(&brokers, &config.dead_letter_topic).await?;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for (reason, offset) in &letters {
        assert!(
            offset.parse::<i64>().is_ok(),
            "source offset header {offset:?}"
        );
        *reasons.entry(reason.clone()).or_default() += 1;
    }
    let kind = |name: &str| truth.malformed.get(name).copied().unwrap_or(0);
    let expected = BTreeMap::from([
        (
            "decode_error".to_owned(),
            kind("garbage") + kind("truncated"),
        ),
        (
            "invalid_field".to_owned(),
            kind("unspecified_type") + kind("missing_event_id") + kind("negative_dwell"),
        ),
        ("future_time".to_owned(), kind("future_time")),
    ]);
    assert_eq!(reasons, expected);
    let stored: HashMap<String, i64> = states(&config.redis_namespace)
        .await?
        .into_iter()
        .flat_map(|s| s.dead_lettered)
        .fold(HashMap::new(), |mut all, (reason, n)| {
            *all.entry(reason).or_default() += n;
            all
        });
    for (reason, count) in &expected {
        assert_eq!(
            stored.get(reason).copied().unwrap_or(0),
            i64::try_from(*count)?
        );
    }

    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn duplicates_are_counted_once_across_restarts_and_old_events_are_dead_lettered()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    let brokers = config.kafka_brokers[0].clone();
    let now = Utc::now();
    let first = event(1, now - chrono::Duration::minutes(10));
    let late = event(1, now - chrono::Duration::minutes(30));
    let too_old = event(3, now - chrono::Duration::hours(49));
    produce(&brokers, &config.events_topic, std::slice::from_ref(&first))
        .await
        .context("produce")?;

    let server = TestServer::start(config.clone()).await?;
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    server.stop().await?;

    // The same event again (a producer retry), after a restart; an event of
    // the same user older than the partition's watermark (late); and one
    // older than the minute retention.
    produce(
        &brokers,
        &config.events_topic,
        &[first.clone(), late, too_old],
    )
    .await?;
    let server = TestServer::start(config.clone()).await?;
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    server.stop().await?;

    let states = states(&config.redis_namespace).await?;
    let total = |f: fn(&PartitionState) -> i64| states.iter().map(f).sum::<i64>();
    assert_eq!(total(|s| s.applied), 2);
    assert_eq!(total(|s| s.duplicates), 1);
    assert_eq!(total(|s| s.late), 1);
    assert_eq!(
        total(|s| s.dead_lettered.get("too_old").copied().unwrap_or(0)),
        1
    );
    let connection = common::test_nodes()?;
    let reader = MetricReader::new(&config.redis_namespace, 0..PARTITIONS);
    let hours = buckets(Granularity::Hour, now - chrono::Duration::hours(1), now);
    let views = reader
        .counter(
            &connection,
            &hours,
            Counter::ProductEvents {
                event_type: EventType::ProductView as i32,
                source: Source::MobileApp as i32,
                product: 3,
            },
        )
        .await?;
    assert_eq!(views, 2);
    // Bucket keys expire with their retention, counted from the bucket's end.
    let keys = PartitionKeys::new(
        &config.redis_namespace,
        rtap::kafka::partition_for_key(&rtap::kafka::record_key(1), PARTITIONS),
    );
    let minute = Bucket::containing(Granularity::Minute, first_time(&first));
    let mut node = connection.connection(&keys.state()).await?;
    let ttl: i64 = redis::cmd("TTL")
        .arg(keys.counters(minute))
        .query_async(&mut node)
        .await?;
    let expected = minute.start + 60 + 48 * 3600 - Utc::now().timestamp();
    assert!(
        (ttl - expected).abs() <= 5,
        "ttl {ttl}, expected about {expected}"
    );
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn a_retry_restamped_into_another_minute_in_a_later_commit_is_counted_once()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    config.role = rtap_server::config::Role::All;
    let server = TestServer::start(config.clone()).await?;
    let mut client = IngestServiceClient::new(server.channel());
    let now = Utc::now();
    let originals: Vec<InteractionEvent> = (1..=20)
        .map(|user| event(user, now - chrono::Duration::minutes(10)))
        .collect();
    let track = |event: InteractionEvent| TrackRequest { event: Some(event) };
    for original in &originals {
        client.track(track(original.clone())).await?;
    }
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    // The client retries with the same ids, its events re-stamped into
    // another minute (and hour) of event time: a later commit.
    for original in &originals {
        let mut retry = original.clone();
        retry.occurred_at = Some(prost_types::Timestamp {
            seconds: (now - chrono::Duration::minutes(75)).timestamp(),
            nanos: 0,
        });
        client.track(track(retry)).await?;
    }
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    server.stop().await?;

    let states = states(&config.redis_namespace).await?;
    assert_eq!(states.iter().map(|s| s.applied).sum::<i64>(), 20);
    assert_eq!(states.iter().map(|s| s.duplicates).sum::<i64>(), 20);
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

fn first_time(event: &InteractionEvent) -> i64 {
    event.occurred_at.map_or(0, |t| t.seconds)
}

#[tokio::test]
async fn a_server_killed_at_random_moments_counts_every_event_exactly_once() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    killed_at_random_moments(env!("CARGO_BIN_EXE_rtap-server"), &config).await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn a_redis_outage_mid_run_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    let proxy = TcpProxy::start(redis_addr()?).await?;
    config.redis_url = format!("redis://{}/", proxy.addr);
    config.redis_cluster = false;
    config.commit_max_events = 200;
    config.fetch_max_bytes = 32 * 1024;
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(&brokers, &config.events_topic, 30_000, 37, &[]).await?;

    let server = TestServer::start(config.clone()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    let applied_at_cut = applied(&config.redis_namespace).await?;
    ensure!(
        applied_at_cut < i64::try_from(truth.events)?,
        "Redis was cut mid-run"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    wait_caught_up(&config, Duration::from_secs(120)).await?;
    server.stop().await?;
    assert_matches_truth(&config, &truth).await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// The loopback address of the test Redis.
fn redis_addr() -> anyhow::Result<std::net::SocketAddr> {
    let url = redis_url();
    let addr = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or_default()
        .replace("localhost", "127.0.0.1");
    addr.parse().context("REDIS_URL host:port")
}

#[tokio::test]
async fn ingest_resumes_within_about_two_seconds_of_a_long_redis_outage() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    let proxy = TcpProxy::start(redis_addr()?).await?;
    config.redis_url = format!("redis://{}/", proxy.addr);
    config.redis_cluster = false;
    let brokers = config.kafka_brokers[0].clone();
    let server = TestServer::start(config.clone()).await?;
    produce(&brokers, &config.events_topic, &[event(1, Utc::now())]).await?;
    wait_caught_up(&config, Duration::from_secs(30)).await?;

    // Long enough for retries that double without a low cap to reach it.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(12)).await;
    produce(&brokers, &config.events_topic, &[event(2, Utc::now())]).await?;
    proxy.restore();
    let restored = tokio::time::Instant::now();
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    let resumed_after = restored.elapsed();
    server.stop().await?;
    // Generous: this checks the retry cap (1.6 s), not speed.
    assert!(
        resumed_after < Duration::from_secs(5),
        "ingest resumed {resumed_after:?} after Redis came back"
    );
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// Which process holds each partition's lease (the pid in its owner id).
async fn lease_holders(namespace: &str) -> anyhow::Result<Vec<Option<u32>>> {
    let nodes = common::test_nodes()?;
    let mut holders = Vec::new();
    for partition in 0..PARTITIONS {
        let lease = PartitionKeys::new(namespace, partition).lease();
        let mut connection = nodes.connection(&lease).await?;
        let owner: Option<String> = redis::cmd("GET")
            .arg(&lease)
            .query_async(&mut connection)
            .await?;
        holders.push(owner.and_then(|o| o.split('/').nth(1)?.parse().ok()));
    }
    Ok(holders)
}

async fn wait_for_holder(namespace: &str, pid: u32, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let holders = lease_holders(namespace).await?;
        if holders.iter().all(|h| *h == Some(pid)) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "process {pid} does not hold every lease within {within:?}: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_standby_takes_over_within_the_lease_after_a_sigkill() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    let lease = Duration::from_secs(3);
    let spawn = || {
        server_command(
            env!("CARGO_BIN_EXE_rtap-server"),
            &config,
            &["--partition-lease", "3s"],
        )
        .spawn()
        .context("spawn rtap-server")
    };
    let mut active = spawn()?;
    let active_pid = active.id().context("pid")?;
    wait_for_holder(&config.redis_namespace, active_pid, Duration::from_secs(30)).await?;
    let mut standby = spawn()?;
    let standby_pid = standby.id().context("pid")?;
    // Standing by long enough for retries that double to have grown.
    tokio::time::sleep(Duration::from_secs(6)).await;
    active.start_kill()?; // SIGKILL: the lease is never released
    let killed = tokio::time::Instant::now();
    active.wait().await?;
    wait_for_holder(
        &config.redis_namespace,
        standby_pid,
        Duration::from_secs(30),
    )
    .await?;
    let took = killed.elapsed();
    standby.start_kill()?;
    standby.wait().await?;
    // Documented: within the lease plus a tenth of it (at most 1 s); with
    // margin for a loaded machine, still far below retries that double (the
    // standby's had reached 6.4 s).
    assert!(
        took <= lease + Duration::from_secs(2),
        "took over {took:?} after the kill, lease {lease:?}"
    );
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn sigterm_with_redis_unreachable_stops_within_the_grace_period() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    // Accepts connections and never answers: every Redis call hangs.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hole = black_hole.local_addr()?;
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            sockets.push(socket);
        }
    });
    let mut unreachable = config.clone();
    unreachable.redis_url = format!("redis://{hole}/");
    unreachable.redis_cluster = false;
    let mut child = server_command(env!("CARGO_BIN_EXE_rtap-server"), &unreachable, &[])
        .args(["--shutdown-grace", "2s"])
        .args([
            "--status-log-interval",
            "200ms",
            "--health-check-interval",
            "200ms",
        ])
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pid = child.id().context("pid")?;
    let signalled = tokio::time::Instant::now();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(status.success(), "kill -TERM failed");
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let took = signalled.elapsed();
    held.abort();
    let exit = exited.context("did not exit within 30 s of SIGTERM")??;
    assert!(exit.success(), "{exit:?}");
    // The grace period, plus a margin for a loaded machine.
    assert!(
        took < Duration::from_secs(5),
        "stopped {took:?} after SIGTERM"
    );
    database.drop().await
}

#[tokio::test]
async fn a_broker_restart_mid_run_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut broker = PrivateBroker::start().await?;
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    config.kafka_brokers = vec![broker.address()];
    config.commit_max_events = 200;
    config.fetch_max_bytes = 32 * 1024;
    let truth = simulate(&broker.address(), &config.events_topic, 30_000, 41, &[]).await?;

    let server = TestServer::start(config.clone()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.kill().await?;
    let applied_at_kill = applied(&config.redis_namespace).await?;
    ensure!(
        applied_at_kill < i64::try_from(truth.events)?,
        "the broker stopped mid-run"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await?;
    wait_caught_up(&config, Duration::from_secs(180)).await?;
    server.stop().await?;
    assert_matches_truth(&config, &truth).await?;
    broker.kill().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn every_commit_publishes_a_delta_of_what_it_counted() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    let brokers = config.kafka_brokers[0].clone();
    let mut deltas = common::shard_subscription(&config, PARTITIONS).await?;
    let now = Utc::now();
    let events: Vec<InteractionEvent> = (1..=30)
        .map(|user| event(user, now - chrono::Duration::minutes(user % 3)))
        .collect();
    produce(&brokers, &config.events_topic, &events).await?;
    let server = TestServer::start(config.clone()).await?;

    let (mut applied, mut views, mut dwell_products) = (0, 0, 0);
    while applied < 30 {
        let payload = tokio::time::timeout(Duration::from_secs(30), deltas.next())
            .await?
            .context("the delta subscription closed")?;
        let delta = rtap::v1::CommitDelta::decode(payload.as_slice())?;
        assert!(delta.next_offset > delta.first_offset);
        applied += delta.events_applied;
        for minute in &delta.minutes {
            for count in &minute.counts {
                assert_eq!(count.r#type, EventType::ProductView as i32);
                assert_eq!(
                    (count.source, count.product_id),
                    (Source::MobileApp as i32, 3)
                );
                views += count.events;
            }
            dwell_products += minute.products_with_users.len();
            let sessions: i64 = minute.sessions.iter().map(|s| s.sessions).sum();
            assert!(sessions > 0, "each minute has new sessions: {minute:?}");
        }
    }
    assert_eq!((applied, views), (30, 30));
    assert!(dwell_products >= 3);
    drop(deltas);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// Every key of the namespace with a comparable rendering of its value
/// (HyperLogLogs by their count, commit times left out). A settled version
/// is a time by design (it must change when a rebuild rewrites old
/// buckets), so it shows only as present. Session states are merged over
/// their epochs' hashes (the latest epoch's state wins), as ingest reads
/// them: which epoch holds a state depends on when it was written.
async fn snapshot_namespace(config: &Config) -> anyhow::Result<BTreeMap<String, String>> {
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    let mut all = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let keys = PartitionKeys::new(&config.redis_namespace, partition);
        // A partition's keys share one slot: one node holds them all.
        let mut connection = nodes.connection(&keys.state()).await?;
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(keys.pattern())
            .query_async(&mut connection)
            .await?;
        let mut session_epochs = BTreeMap::new();
        for key in found {
            if key == keys.lease() {
                continue;
            }
            if key == keys.settled_version() {
                all.insert(key, "settled version".into());
                continue;
            }
            let epoch = key
                .rsplit_once(':')
                .and_then(|(_, e)| e.parse::<i64>().ok());
            if let Some(epoch) = epoch.filter(|e| keys.sessions(*e) == key) {
                session_epochs.insert(epoch, key);
                continue;
            }
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut connection)
                .await?;
            let value = match kind.as_str() {
                "hash" => {
                    let mut fields: BTreeMap<String, String> = redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await?;
                    fields.remove("last_commit_ms");
                    format!("{fields:?}")
                }
                "zset" => {
                    // Rankings by product id; the dedupe set by 16-byte id.
                    let members: Vec<(Vec<u8>, String)> = redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query_async(&mut connection)
                        .await?;
                    format!("{:?}", members.into_iter().collect::<BTreeMap<_, _>>())
                }
                "set" => {
                    let mut members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await?;
                    members.sort();
                    format!("{members:?}")
                }
                _ if key.contains(":u") => {
                    let count: u64 = redis::cmd("PFCOUNT")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await?;
                    format!("hll {count}")
                }
                _ => {
                    let value: Vec<u8> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await?;
                    format!("{value:?}")
                }
            };
            all.insert(key, value);
        }
        let mut sessions = BTreeMap::new();
        for key in session_epochs.values() {
            let states: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut connection)
                .await?;
            sessions.extend(states);
        }
        all.insert(
            format!("partition {partition} sessions"),
            format!("{sessions:?}"),
        );
    }
    Ok(all)
}

#[tokio::test]
async fn a_topic_that_gained_partitions_stops_ingest_until_a_rebuild() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    let brokers = config.kafka_brokers[0].clone();
    // The metrics were built when the topic had two partitions.
    let key = rtap_server::store::keys::topic_partitions(&config.redis_namespace);
    let mut connection = common::test_nodes()?.connection(&key).await?;
    redis::cmd("SET")
        .arg(&key)
        .arg(PARTITIONS - 1)
        .query_async::<()>(&mut connection)
        .await?;
    let truth = simulate(&brokers, &config.events_topic, 2_000, 67, &[]).await?;
    let server = TestServer::start(config.clone()).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        applied(&config.redis_namespace).await? == 0,
        "ingest waits for a rebuild instead of counting users twice"
    );
    server.stop().await?;

    let rebuilt = server_command(env!("CARGO_BIN_EXE_rtap-server"), &config, &["rebuild"])
        .stderr(Stdio::piped())
        .output()
        .await?;
    let log = String::from_utf8_lossy(&rebuilt.stderr);
    ensure!(rebuilt.status.success(), "{log}");
    assert_matches_truth(&config, &truth).await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn rebuild_recomputes_the_live_aggregates_key_by_key_and_refuses_while_consumed()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = ingest_config(&database);
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(
        &brokers,
        &config.events_topic,
        10_000,
        61,
        &["--duplicate-share", "0.02", "--malformed-share", "0.01"],
    )
    .await?;
    let server = TestServer::start(config.clone()).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;

    // A consumer holds the partitions: rebuild refuses and changes nothing.
    let before = snapshot_namespace(&config).await?;
    let refused = server_command(env!("CARGO_BIN_EXE_rtap-server"), &config, &["rebuild"])
        .stderr(Stdio::piped())
        .output()
        .await?;
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("is being consumed by"), "{message}");
    server.stop().await?;
    let live = snapshot_namespace(&config).await?;
    assert_eq!(before, live);
    let live_versions = settled_versions(&config.redis_namespace).await?;

    let rebuilt = server_command(env!("CARGO_BIN_EXE_rtap-server"), &config, &["rebuild"])
        .stderr(Stdio::piped())
        .output()
        .await?;
    let log = String::from_utf8_lossy(&rebuilt.stderr);
    assert!(rebuilt.status.success(), "{log}");
    assert!(log.contains("rebuild progress"), "{log}");
    let after = snapshot_namespace(&config).await?;
    assert_eq!(live.len(), after.len());
    // The rebuild wrote settled minutes: cached settled unions are dropped.
    assert_ne!(
        settled_versions(&config.redis_namespace).await?,
        live_versions
    );
    for (key, value) in &live {
        assert_eq!(after.get(key), Some(value), "{key}");
    }
    assert_matches_truth(&config, &truth).await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// Settings for commits made directly by a test: an hour's retention.
fn commit_settings(session_ttl_ms: i64) -> CommitSettings {
    let hour = Duration::from_secs(3600);
    CommitSettings {
        retention: Retention {
            minute: hour,
            hour,
            day: hour,
        },
        session_ttl_ms,
    }
}

/// Commits `batch` as a consumer that just started: with an empty mirror,
/// so the values it adds to are read from Redis.
async fn commit_afresh(
    connection: &mut redis::aio::MultiplexedConnection,
    keys: &PartitionKeys,
    batch: &BatchAggregate,
    meta: &CommitMeta,
    settings: &CommitSettings,
) -> Result<commit::Committed, StoreError> {
    let mut mirror = Mirror::new(settings.retention);
    commit::commit(connection, keys, batch, meta, settings, &mut mirror).await
}

/// Session states go to their epoch's hash, one command a commit, and are
/// read from the current and the previous epoch's; the later write wins.
#[tokio::test]
async fn session_states_are_read_from_the_current_and_the_previous_epoch() -> anyhow::Result<()> {
    let namespace = format!("rtap-test-{}", common::unique_suffix());
    let keys = PartitionKeys::new(&namespace, 0);
    let connection = redis().await?;
    let ttl_ms = 600_000;
    let settings = commit_settings(ttl_ms);
    let session = (7, "s-7".to_owned());
    let now_ms = Utc::now().timestamp_millis();
    let write = |offset: i64, now_ms, state| {
        let mut batch = BatchAggregate::new(None, Default::default(), ttl_ms / 2);
        batch.sessions.insert(session.clone(), state);
        let meta = CommitMeta {
            expected_offset: (offset > 0).then_some(offset),
            next_offset: offset + 1,
            duplicates: 0,
            dedupe: Default::default(),
            dead_lettered: Vec::new(),
            now_ms,
        };
        let (mut connection, keys) = (connection.clone(), keys.clone());
        async move { commit_afresh(&mut connection, &keys, &batch, &meta, &settings).await }
    };
    let read = |epoch| {
        let (mut connection, keys, session) = (connection.clone(), keys.clone(), session.clone());
        async move {
            let mut mirror = Mirror::new(settings.retention);
            let prefetched = commit::prefetch(
                &mut connection,
                &keys,
                (&[], &[]),
                vec![session.clone()],
                epoch,
                (&mut mirror, &[]),
            )
            .await?;
            Ok::<_, anyhow::Error>(prefetched.sessions.get(&session).copied())
        }
    };
    let first = SessionState::decode("1 1 1 1 0 1").context("state")?;
    let second = SessionState::decode("1 1 2 2 1 1").context("state")?;
    let epoch = session_epoch(now_ms, ttl_ms);

    write(0, now_ms, first).await?;
    assert_eq!(read(epoch - 1).await?, None);
    assert_eq!(read(epoch).await?, Some(first));
    assert_eq!(read(epoch + 1).await?, Some(first));
    assert_eq!(read(epoch + 2).await?, None);
    write(1, now_ms + ttl_ms, second).await?;
    assert_eq!(read(epoch + 1).await?, Some(second));
    assert_eq!(read(epoch + 2).await?, Some(second));

    common::delete_redis_namespace(&redis_url(), &namespace, 1).await
}

/// A commit is fenced, and writes nothing, when the stored offset is not the
/// one its batch started from: moved before it (checked with the offset) or
/// while it is under way (another consumer committing between the offset
/// check and the transaction: Redis drops the watched transaction). A fenced
/// commit empties the loser's mirror, whose values the winner made stale.
#[tokio::test]
async fn a_commit_is_fenced_when_the_offset_moves_before_or_during_it() -> anyhow::Result<()> {
    let namespace = format!("rtap-test-{}", common::unique_suffix());
    let keys = PartitionKeys::new(&namespace, 0);
    let (mut ours, mut theirs) = (redis().await?, redis().await?);
    let settings = commit_settings(600_000);
    let now = Utc::now();
    let minute = Granularity::Minute.bucket_start(now.timestamp());
    let counter = Counter::Revenue { source: 1 };
    let batch = || {
        let mut batch = BatchAggregate::new(None, Default::default(), 300_000);
        batch.minutes.insert(
            minute,
            BucketChanges {
                counters: [(counter, 1)].into_iter().collect(),
                ..BucketChanges::default()
            },
        );
        batch
    };
    let meta = |expected_offset: Option<i64>, next_offset| CommitMeta {
        expected_offset,
        next_offset,
        duplicates: 0,
        dedupe: Default::default(),
        dead_lettered: Vec::new(),
        now_ms: now.timestamp_millis(),
    };
    let total = |mut connection: redis::aio::MultiplexedConnection| {
        let key = keys.counters(Bucket::containing(Granularity::Minute, minute));
        async move {
            let total: Option<i64> = redis::cmd("HGET")
                .arg(key)
                .arg(counter.field())
                .query_async(&mut connection)
                .await?;
            Ok::<_, anyhow::Error>(total)
        }
    };

    let (mut our_mirror, mut their_mirror) = (
        Mirror::new(settings.retention),
        Mirror::new(settings.retention),
    );

    let first = meta(None, 10);
    commit::commit(
        &mut ours,
        &keys,
        &batch(),
        &first,
        &settings,
        &mut our_mirror,
    )
    .await?;
    // Moved before: the batch expected no offset, 10 is stored.
    let stale = meta(None, 20);
    let stale = commit::commit(
        &mut ours,
        &keys,
        &batch(),
        &stale,
        &settings,
        &mut our_mirror,
    )
    .await;
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{stale:?}");
    assert!(our_mirror.is_empty());
    assert_eq!(total(ours.clone()).await?, Some(1));

    // Moved during: checked at 10, then another consumer commits 10 → 20.
    let unknown = our_mirror.missing(batch().touched_buckets(), now.timestamp());
    our_mirror.load(&mut ours, &keys, &unknown).await?;
    let transaction =
        commit::Transaction::new(&keys, &batch(), &meta(Some(10), 30), &settings, &our_mirror)?;
    commit::fence(&mut ours, &keys, Some(10)).await?;
    let theirs_meta = meta(Some(10), 20);
    commit::commit(
        &mut theirs,
        &keys,
        &batch(),
        &theirs_meta,
        &settings,
        &mut their_mirror,
    )
    .await?;
    let raced = transaction.execute(&mut ours, &keys, &mut our_mirror).await;
    assert!(matches!(raced, Err(StoreError::Fenced { .. })), "{raced:?}");
    assert!(our_mirror.is_empty());
    assert_eq!(total(ours.clone()).await?, Some(2));
    assert_eq!(commit::load_state(&mut ours, &keys).await?.offset, Some(20));

    // The loser goes on from the stored offset, with the winner's counts.
    let next = meta(Some(20), 30);
    commit::commit(
        &mut ours,
        &keys,
        &batch(),
        &next,
        &settings,
        &mut our_mirror,
    )
    .await?;
    assert_eq!(total(ours.clone()).await?, Some(3));
    common::delete_redis_namespace(&redis_url(), &namespace, 1).await
}

/// Counters stay exact integers past what a double holds (2^53), in every
/// granularity, and scores add up: a guard for any change to how the commit
/// script adds (a read-modify-write in Lua would round them).
#[tokio::test]
async fn committed_counters_stay_exact_integers_past_two_to_the_53() -> anyhow::Result<()> {
    let namespace = format!("rtap-test-{}", common::unique_suffix());
    let keys = PartitionKeys::new(&namespace, 0);
    let mut connection = redis().await?;
    let settings = commit_settings(600_000);
    let now = Utc::now();
    let minute = Granularity::Minute.bucket_start(now.timestamp());
    // Each addend below 2^53 but an odd sum above it; and an addend above.
    let near = Counter::Revenue { source: 1 };
    let above = Counter::Revenue { source: 2 };
    let events = Counter::Events {
        event_type: 1,
        source: 1,
    };
    let two_to_52 = 1_i64 << 52;
    // Each commit as after a restart: the second adds to what the first
    // wrote, read from Redis.
    for (offset, near_by) in [(0, two_to_52 + 3), (1, two_to_52)] {
        let mut batch = BatchAggregate::new(None, Default::default(), 300_000);
        batch.minutes.insert(
            minute,
            BucketChanges {
                counters: [(near, near_by), (above, 2 * two_to_52 + 1), (events, 5)]
                    .into_iter()
                    .collect(),
                users: Default::default(),
                rankings: [(Ranking::Revenue, [(42, 1000), (7, 1)].into_iter().collect())]
                    .into_iter()
                    .collect(),
            },
        );
        let meta = CommitMeta {
            expected_offset: (offset > 0).then_some(offset),
            next_offset: offset + 1,
            duplicates: 0,
            dedupe: Default::default(),
            dead_lettered: Vec::new(),
            now_ms: now.timestamp_millis(),
        };
        commit_afresh(&mut connection, &keys, &batch, &meta, &settings).await?;
    }
    for granularity in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
        let bucket = Bucket::containing(granularity, minute);
        let totals: Vec<String> = redis::cmd("HMGET")
            .arg(keys.counters(bucket))
            .arg(near.field())
            .arg(above.field())
            .arg(events.field())
            .query_async(&mut connection)
            .await?;
        let expected = [2 * two_to_52 + 3, 4 * two_to_52 + 2, 10].map(|v| v.to_string());
        assert_eq!(totals, expected, "{granularity:?}");
        let scores: Vec<(i64, f64)> = redis::cmd("ZRANGE")
            .arg(keys.ranking(bucket, Ranking::Revenue))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut connection)
            .await?;
        assert_eq!(scores, [(7, 2.0), (42, 2000.0)], "{granularity:?}");
    }
    common::delete_redis_namespace(&redis_url(), &namespace, 1).await
}

/// A user set written whole by the consumer (`store::hll`) is the
/// HyperLogLog Redis builds with `PFADD` of the same users: same registers,
/// same count, and Redis goes on adding to it.
#[tokio::test]
async fn a_user_set_written_whole_equals_the_one_pfadd_builds() -> anyhow::Result<()> {
    let mut connection = redis().await?;
    let prefix = format!("rtap-test-hll-{}", common::unique_suffix());
    let (ours, theirs) = (format!("{prefix}:ours"), format!("{prefix}:theirs"));
    // Written whole again, as the union, as a later batch does.
    let rewritten = format!("{prefix}:rewritten");
    let mut random = rand::rng();
    for size in [1_usize, 2, 10, 100, 600] {
        let users: Vec<i64> = (0..size)
            .map(|_| random.random_range(1..i64::MAX))
            .collect();
        let whole = hll::sparse(users.iter().copied()).context("a small set fits")?;
        let more: Vec<i64> = (0..50).map(|_| random.random_range(1..1_000_000)).collect();
        let (written, _, count, theirs_count): (bool, i64, u64, u64) = redis::pipe()
            .cmd("SET")
            .arg(&ours)
            .arg(&whole)
            .arg("NX")
            .arg("EX")
            .arg(60)
            .cmd("PFADD")
            .arg(&theirs)
            .arg(&users)
            .cmd("PFCOUNT")
            .arg(&ours)
            .cmd("PFCOUNT")
            .arg(&theirs)
            .query_async(&mut connection)
            .await?;
        assert!(written);
        assert_eq!(count, theirs_count, "{size} users");
        for key in [&ours, &theirs] {
            redis::cmd("PFADD")
                .arg(key)
                .arg(&more)
                .query_async::<i64>(&mut connection)
                .await?;
        }
        let union = hll::union(
            &hll::registers(users.iter().copied()),
            &hll::registers(more.iter().copied()),
        );
        let union = hll::encode_sparse(&union).context("the union fits")?;
        redis::cmd("SET")
            .arg(&rewritten)
            .arg(union)
            .arg("EX")
            .arg(60)
            .query_async::<()>(&mut connection)
            .await?;
        let registers = |key: &String| redis::cmd("PFDEBUG").arg("GETREG").arg(key).clone();
        let ours_registers: Vec<i64> = registers(&ours).query_async(&mut connection).await?;
        let theirs_registers: Vec<i64> = registers(&theirs).query_async(&mut connection).await?;
        let rewritten_registers: Vec<i64> =
            registers(&rewritten).query_async(&mut connection).await?;
        assert_eq!(ours_registers.len(), 16_384);
        assert_eq!(ours_registers, theirs_registers, "{size} users");
        assert_eq!(
            rewritten_registers, theirs_registers,
            "{size} users, rewritten"
        );
        let counts: (u64, u64) = redis::pipe()
            .cmd("PFCOUNT")
            .arg(&rewritten)
            .cmd("PFCOUNT")
            .arg(&theirs)
            .query_async(&mut connection)
            .await?;
        assert_eq!(counts.0, counts.1, "{size} users, rewritten");
        redis::cmd("DEL")
            .arg(&ours)
            .arg(&theirs)
            .arg(&rewritten)
            .query_async::<i64>(&mut connection)
            .await?;
    }
    Ok(())
}
