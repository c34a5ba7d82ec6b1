//! Helpers of the tests that run the ingest pipeline: simulated traffic with
//! its ground truth, hand-built events, and waiting for ingest to catch up.

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use anyhow::{Context, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use prost::Message;
use rskafka::client::{ClientBuilder, partition::UnknownTopicHandling};
use rtap::v1::{EventType, InteractionEvent, Source};
use rtap_server::{
    Config,
    config::Role,
    store::{
        Bucket, Counter, FunnelStage, Granularity, Ranking, UserSet,
        commit::{PartitionState, load_state},
        keys::PartitionKeys,
        nodes::Route,
        read::MetricReader,
    },
};
use rtap_simulator::{config::SimulatorConfig, truth::GroundTruth};
use tokio_util::sync::CancellationToken;

use super::{TestDatabase, test_config};

pub const PARTITIONS: i32 = 3;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

pub async fn redis() -> anyhow::Result<redis::aio::MultiplexedConnection> {
    super::redis_connection(&redis_url()).await
}

/// A pipeline configuration of its own (namespace, topics), consuming only.
pub fn ingest_config(database: &TestDatabase) -> Config {
    let mut config = test_config(database);
    config.role = Role::Ingest;
    config.events_partitions = PARTITIONS;
    config
}

/// Produces `count` simulated events (plus the requested shares of
/// duplicates and malformed records) and returns their ground truth.
pub async fn simulate(
    brokers: &str,
    topic: &str,
    count: u64,
    seed: u64,
    extra: &[&str],
) -> anyhow::Result<GroundTruth> {
    let truth_dir = tempfile::tempdir()?;
    let truth_file = truth_dir.path().join("truth.json");
    let start = (Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let count = count.to_string();
    let seed = seed.to_string();
    let partitions = PARTITIONS.to_string();
    let mut args = vec![
        "rtap-simulator",
        "--kafka-brokers",
        brokers,
        "--topic",
        topic,
        "--partitions",
        &partitions,
        "--count",
        &count,
        "--seed",
        &seed,
        "--start-time",
        &start,
        "--users",
        "50000",
        "--session-gap",
        "5m",
        "--products",
        "150",
        "--progress",
        "none",
    ];
    args.push("--truth-file");
    let truth_path = truth_file.to_str().context("temporary paths are UTF-8")?;
    args.push(truth_path);
    args.extend_from_slice(extra);
    let config = SimulatorConfig::try_parse_from(args)?;
    let report = rtap_simulator::run::run(config, CancellationToken::new())
        .await
        .context("simulate")?;
    Ok(report.truth)
}

/// Every partition's settled version (see `rtap_server::store::settled`).
pub async fn settled_versions(namespace: &str) -> anyhow::Result<Vec<Option<String>>> {
    let nodes = super::test_nodes()?;
    let mut versions = Vec::new();
    for partition in 0..PARTITIONS {
        let key = PartitionKeys::new(namespace, partition).settled_version();
        let mut connection = nodes.connection(&key).await?;
        versions.push(
            redis::cmd("GET")
                .arg(key)
                .query_async(&mut connection)
                .await?,
        );
    }
    Ok(versions)
}

/// Every partition's high watermark.
pub async fn high_watermarks(brokers: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let client = ClientBuilder::new(vec![brokers.to_owned()]).build().await?;
    let mut marks = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let reader = client
            .partition_client(topic, partition, UnknownTopicHandling::Retry)
            .await?;
        // The test broker's ListOffsets(latest) is not reliable: a fetch
        // reports the high watermark.
        let (_, high_watermark) = reader
            .fetch_records(0, 1..65_536, 10)
            .await
            .with_context(|| format!("fetch partition {partition} of {topic}"))?;
        marks.insert(partition, high_watermark);
    }
    Ok(marks)
}

pub async fn states(namespace: &str) -> anyhow::Result<Vec<PartitionState>> {
    states_on(&super::test_nodes()?, namespace).await
}

/// Every partition's stored state, each read from the node that holds it.
pub async fn states_on(route: &impl Route, namespace: &str) -> anyhow::Result<Vec<PartitionState>> {
    let mut states = Vec::new();
    for partition in 0..PARTITIONS {
        let keys = PartitionKeys::new(namespace, partition);
        let mut connection = route.connection(&keys.state()).await?;
        states.push(load_state(&mut connection, &keys).await?);
    }
    Ok(states)
}

/// Events counted so far, over every partition.
pub async fn applied(namespace: &str) -> anyhow::Result<i64> {
    Ok(states(namespace).await?.iter().map(|s| s.applied).sum())
}

/// Waits until every partition's stored offset reached its high watermark.
pub async fn wait_caught_up(config: &Config, within: Duration) -> anyhow::Result<()> {
    let brokers = &config.kafka_brokers[0];
    let marks = high_watermarks(brokers, &config.events_topic).await?;
    let deadline = tokio::time::Instant::now() + within;
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    loop {
        let offsets: BTreeMap<i32, Option<i64>> = (0..PARTITIONS)
            .zip(states_on(&nodes, &config.redis_namespace).await?)
            .map(|(p, s)| (p, s.offset))
            .collect();
        let caught_up = marks
            .iter()
            .all(|(p, mark)| *mark == 0 || offsets.get(p) == Some(&Some(*mark)));
        if caught_up {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "not caught up within {within:?}: stored {offsets:?}, high watermarks {marks:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn source_number(name: &str) -> anyhow::Result<i32> {
    Source::from_str_name(name)
        .map(|s| s as i32)
        .with_context(|| format!("unknown source {name}"))
}

pub fn days(truth: &GroundTruth) -> anyhow::Result<Vec<Bucket>> {
    let first = truth.first_event_time.context("events were produced")?;
    let last = truth.last_event_time.context("events were produced")?;
    Ok(buckets(Granularity::Day, first, last))
}

pub fn buckets(granularity: Granularity, first: DateTime<Utc>, last: DateTime<Utc>) -> Vec<Bucket> {
    let step = granularity.seconds();
    let mut start = granularity.bucket_start(first.timestamp());
    let mut all = Vec::new();
    while start <= last.timestamp() {
        all.push(Bucket { granularity, start });
        start += step;
    }
    all
}

/// Whether an HLL estimate is within its error bound of the truth: 0.81 %
/// standard error, checked at over four standard errors, never below one.
pub fn hll_close(estimate: u64, truth: u64) -> bool {
    let bound = (truth as f64 * 0.035).max(1.0);
    (estimate as f64 - truth as f64).abs() <= bound
}

/// What Redis's HyperLogLog estimates for `users`, counted as the pipeline
/// counts them: one HyperLogLog per partition (all of a user's records go to
/// one), added up. A HyperLogLog depends only on the set added to it, and a
/// union of them equals the HyperLogLog of the union, so the pipeline's
/// count must equal this exactly; against the true count it is only within
/// the estimator's error (which, for a few dozen users, is register
/// collisions: about n² / 32768 users missed).
pub async fn redis_estimate(users: impl IntoIterator<Item = i64>) -> anyhow::Result<u64> {
    let mut by_partition: Vec<Vec<i64>> = vec![Vec::new(); usize::try_from(PARTITIONS)?];
    for user in users {
        let partition = rtap::kafka::partition_for_key(&rtap::kafka::record_key(user), PARTITIONS);
        by_partition[usize::try_from(partition)?].push(user);
    }
    let mut connection = redis().await?;
    let key = format!("rtap-test-hll-{}", uuid::Uuid::new_v4().simple());
    let mut total = 0;
    for users in by_partition.iter().filter(|users| !users.is_empty()) {
        let (_, count, _): (i64, u64, i64) = redis::pipe()
            .atomic()
            .cmd("PFADD")
            .arg(&key)
            .arg(users)
            .cmd("PFCOUNT")
            .arg(&key)
            .cmd("DEL")
            .arg(&key)
            .query_async(&mut connection)
            .await?;
        total += count;
    }
    Ok(total)
}

pub fn event(user_id: i64, time: DateTime<Utc>) -> InteractionEvent {
    InteractionEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: time.timestamp(),
            nanos: 0,
        }),
        user_id,
        product_id: 3,
        source: Source::MobileApp as i32,
        r#type: EventType::ProductView as i32,
        session_id: format!("s-{user_id}"),
        dwell_time: None,
        amount_micros: 0,
        quantity: 0,
        search_query: String::new(),
    }
}

/// Produces `events` to `topic`, keyed by user like every producer.
pub async fn produce(
    brokers: &str,
    topic: &str,
    events: &[InteractionEvent],
) -> anyhow::Result<()> {
    EventWriter::connect(brokers, topic)
        .await?
        .send(events)
        .await
}

/// Produces events to a topic of [`PARTITIONS`] partitions, keyed by user
/// like every RTAP producer, one request per partition per call.
pub struct EventWriter {
    partitions: Vec<rskafka::client::partition::PartitionClient>,
}

impl EventWriter {
    /// Connects, creating the topic if needed.
    pub async fn connect(brokers: &str, topic: &str) -> anyhow::Result<Self> {
        let client = ClientBuilder::new(vec![brokers.to_owned()]).build().await?;
        rtap::kafka::admin::ensure_topic(&client, topic, PARTITIONS).await?;
        let mut partitions = Vec::new();
        for partition in 0..PARTITIONS {
            partitions.push(
                client
                    .partition_client(topic, partition, UnknownTopicHandling::Retry)
                    .await?,
            );
        }
        Ok(Self { partitions })
    }

    /// Stores `events`; returns once the broker acknowledged them.
    pub async fn send(&self, events: &[InteractionEvent]) -> anyhow::Result<()> {
        use rskafka::{client::partition::Compression, record::Record};
        let mut batches: Vec<Vec<Record>> = vec![Vec::new(); self.partitions.len()];
        for event in events {
            let key = rtap::kafka::record_key(event.user_id);
            let partition = rtap::kafka::partition_for_key(&key, PARTITIONS);
            batches[usize::try_from(partition)?].push(Record {
                key: Some(key),
                value: Some(event.encode_to_vec()),
                headers: Default::default(),
                timestamp: Utc::now(),
            });
        }
        let sends = self
            .partitions
            .iter()
            .zip(batches)
            .filter(|(_, batch)| !batch.is_empty())
            .map(|(client, batch)| client.produce(batch, Compression::NoCompression));
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }
}

/// `buckets`, each added.
fn signed(buckets: &[Bucket]) -> Vec<(Bucket, i64)> {
    buckets.iter().map(|b| (*b, 1)).collect()
}

/// Compares every aggregate with the ground truth (on the Redis or cluster
/// that `config` names).
pub async fn assert_matches_truth(config: &Config, truth: &GroundTruth) -> anyhow::Result<()> {
    let connection = config.redis_nodes().map_err(anyhow::Error::msg)?;
    let reader = MetricReader::new(&config.redis_namespace, 0..PARTITIONS);
    let first = truth.first_event_time.context("events were produced")?;
    let last = truth.last_event_time.context("events were produced")?;

    // The pipeline's own counters.
    let partition_states = states_on(&connection, &config.redis_namespace).await?;
    let applied: i64 = partition_states.iter().map(|s| s.applied).sum();
    let duplicates: i64 = partition_states.iter().map(|s| s.duplicates).sum();
    let dead: i64 = partition_states
        .iter()
        .flat_map(|s| s.dead_lettered.values())
        .sum();
    ensure!(
        applied == i64::try_from(truth.events)?,
        "applied {applied} of {} events; states {partition_states:?}; truth records {} duplicates {}",
        truth.events,
        truth.records,
        truth.duplicates
    );
    ensure!(
        duplicates == i64::try_from(truth.duplicates)?,
        "duplicates {duplicates} != {}",
        truth.duplicates
    );
    let malformed: u64 = truth.malformed.values().sum();
    ensure!(dead == i64::try_from(malformed)?, "dead-lettered {dead}");

    // Counts per source and type, at each granularity.
    for granularity in Granularity::ALL {
        let counters = reader
            .counters(&connection, &buckets(granularity, first, last))
            .await?;
        for (key, expected) in &truth.events_by_source_and_type {
            let (source, event_type) = key.split_once('/').context("SOURCE/TYPE")?;
            let event_type = EventType::from_str_name(event_type).context("type")? as i32;
            let field = Counter::Events {
                event_type,
                source: source_number(source)?,
            }
            .field();
            let actual = counters.get(&field).copied().unwrap_or(0);
            ensure!(
                actual == i64::try_from(*expected)?,
                "{granularity:?} {key}: {actual} counted, {expected} produced"
            );
        }
    }

    // Events per minute.
    for (minute, expected) in &truth.events_per_minute {
        let start: DateTime<Utc> = minute.parse()?;
        let counters = reader
            .counters(
                &connection,
                &[Bucket::containing(Granularity::Minute, start.timestamp())],
            )
            .await?;
        let actual: i64 = counters
            .iter()
            .filter(|(field, _)| field.starts_with("e:"))
            .map(|(_, v)| v)
            .sum();
        ensure!(
            actual == i64::try_from(*expected)?,
            "minute {minute}: {actual} counted, {expected} produced"
        );
    }
    // The dense minute series holds what the minute buckets' hashes hold.
    let minutes = buckets(Granularity::Minute, first, last);
    let pairs: Vec<(i32, i32)> = (1..=6)
        .flat_map(|event_type| (1..=3).map(move |source| (event_type, source)))
        .collect();
    let fields: Vec<String> = pairs
        .iter()
        .map(|&(event_type, source)| Counter::Events { event_type, source }.field())
        .collect();
    let from_hashes = reader.fields(&connection, &minutes, &fields).await?;
    let starts: Vec<i64> = minutes.iter().map(|b| b.start).collect();
    let from_series = reader.minute_events(&connection, &starts, &pairs).await?;
    ensure!(
        from_series == from_hashes,
        "minute series differ from the minute hashes"
    );
    ensure!(
        from_series.iter().flatten().sum::<i64>() == i64::try_from(truth.events)?,
        "minute series total"
    );

    // Products, funnel and users, over the whole run.
    let days = days(truth)?;
    let counters = reader.counters(&connection, &days).await?;
    let sum = |fields: &[Counter]| -> i64 {
        fields
            .iter()
            .map(|c| counters.get(&c.field()).copied().unwrap_or(0))
            .sum()
    };
    let sources: Vec<i32> = [Source::Web, Source::MobileApp, Source::Server]
        .iter()
        .map(|s| *s as i32)
        .collect();
    let views = reader
        .ranking(&connection, &signed(&days), Ranking::Views)
        .await?;
    let revenue_ranking = reader
        .ranking(&connection, &signed(&days), Ranking::Revenue)
        .await?;
    for (product, expected) in &truth.products {
        let product = *product;
        let per_source = |make: &dyn Fn(i32) -> Counter| -> Vec<Counter> {
            sources.iter().map(|s| make(*s)).collect()
        };
        let events = |event_type: EventType| {
            sum(&per_source(&|source| Counter::ProductEvents {
                event_type: event_type as i32,
                source,
                product,
            }))
        };
        let quantity = |event_type: EventType| {
            sum(&per_source(&|source| Counter::Quantity {
                event_type: event_type as i32,
                source,
                product,
            }))
        };
        let actual = (
            events(EventType::ProductView),
            sum(&per_source(&|source| Counter::Dwell { source, product })),
            events(EventType::AddToCart),
            quantity(EventType::AddToCart),
            events(EventType::Purchase),
            quantity(EventType::Purchase),
            sum(&per_source(&|source| Counter::ProductRevenue {
                source,
                product,
            })),
        );
        let wanted = (
            i64::try_from(expected.views)?,
            expected.dwell_micros,
            i64::try_from(expected.add_to_carts)?,
            i64::try_from(expected.items_added)?,
            i64::try_from(expected.purchases)?,
            i64::try_from(expected.items_purchased)?,
            expected.revenue_micros,
        );
        ensure!(
            actual == wanted,
            "product {product}: (views, dwell, carts, items, purchases, items, revenue) {actual:?} != {wanted:?}"
        );
        ensure!(views.get(&product).copied().unwrap_or(0) == wanted.0);
        ensure!(revenue_ranking.get(&product).copied().unwrap_or(0) == wanted.6);
        let users = reader
            .unique_users(&connection, &days, UserSet::Product(product))
            .await?;
        let estimate = redis_estimate(truth.product_user_ids(product)).await?;
        ensure!(
            users == estimate,
            "product {product}: {users} unique users counted, where Redis estimates {estimate} \
             for the {} true ones",
            expected.unique_users
        );
    }
    let revenue = sum(&sources
        .iter()
        .map(|s| Counter::Revenue { source: *s })
        .collect::<Vec<_>>());
    ensure!(revenue == truth.revenue_micros, "revenue {revenue}");

    for (source, expected) in &truth.funnel {
        let source = source_number(source)?;
        let funnel = |stage| sum(&[Counter::Funnel { stage, source }]);
        let actual = (
            sum(&[Counter::Sessions { source }]),
            funnel(FunnelStage::ProductView),
            funnel(FunnelStage::AddToCart),
            funnel(FunnelStage::Purchase),
        );
        let wanted = (
            i64::try_from(expected.sessions)?,
            i64::try_from(expected.product_view_sessions)?,
            i64::try_from(expected.add_to_cart_sessions)?,
            i64::try_from(expected.purchase_sessions)?,
        );
        ensure!(
            actual == wanted,
            "funnel of source {source}: {actual:?} != {wanted:?}"
        );
    }
    let session_events: i64 = sources
        .iter()
        .map(|s| sum(&[Counter::SessionEvents { source: *s }]))
        .sum();
    ensure!(session_events == i64::try_from(truth.events)?);

    let users = reader
        .unique_users(&connection, &days, UserSet::All)
        .await?;
    let estimate = redis_estimate(truth.user_ids()).await?;
    ensure!(
        users == estimate,
        "{users} unique users counted, where Redis estimates {estimate} for the {} true ones",
        truth.unique_users
    );

    Ok(())
}

/// `rtap-server` (the `binary` cargo built for the test) with `config`'s
/// services, namespace and topics.
pub fn server_command(binary: &str, config: &Config, args: &[&str]) -> tokio::process::Command {
    server_command_as("ingest", binary, config, args)
}

/// [`server_command`] in `role`.
pub fn server_command_as(
    role: &str,
    binary: &str,
    config: &Config,
    args: &[&str],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary);
    // `--role` (the process's) goes before a subcommand in `args`.
    command
        .args(["--role", role])
        .args(args)
        .args(["--listen-addr", &config.listen_addr.to_string()])
        .args(["--metrics-addr", &config.metrics_addr.to_string()])
        .args(["--database-url", &config.database_url])
        .args(["--redis-url", &config.redis_url])
        .args(["--redis-namespace", &config.redis_namespace])
        .args(["--kafka-brokers", &config.kafka_brokers.join(",")])
        .args(["--events-topic", &config.events_topic])
        .args(["--dead-letter-topic", &config.dead_letter_topic])
        .args(["--events-partitions", &PARTITIONS.to_string()])
        .args(config.redis_cluster.then_some("--redis-cluster"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Simulated traffic ingested by `rtap-server` processes (`binary`, short
/// leases, small commits) SIGKILLed at random moments, eight times, then by
/// one that finishes: every aggregate equals the ground truth.
pub async fn killed_at_random_moments(binary: &str, config: &Config) -> anyhow::Result<()> {
    use rand::Rng;
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(
        &brokers,
        &config.events_topic,
        200_000,
        23,
        &["--duplicate-share", "0.01", "--malformed-share", "0.005"],
    )
    .await?;
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    let applied = || async {
        let states = states_on(&nodes, &config.redis_namespace).await?;
        anyhow::Ok(states.iter().map(|s| s.applied).sum::<i64>())
    };
    // Small commits, so kills land between and during many of them; a
    // short lease, so each restart takes over the killed one's partitions.
    let extra = [
        "--commit-max-events",
        "300",
        "--fetch-max-bytes",
        "65536",
        "--partition-lease",
        "1s",
    ];
    let mut kills = 0;
    for run in 0..8 {
        let mut child = server_command(binary, config, &extra).spawn()?;
        if run == 0 {
            // On a loaded machine a process can take longer than the random
            // moments below to start and commit, and each later one waits out
            // its predecessor's lease: the first is killed only once it has
            // committed, so the kills land on a pipeline under way.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while applied().await? == 0 {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the first server never committed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let alive = Duration::from_millis(rand::rng().random_range(100..600));
        tokio::time::sleep(alive).await;
        child.start_kill()?; // SIGKILL
        child.wait().await?;
        kills += 1;
    }
    let applied_before_last_run = applied().await?;
    ensure!(
        applied_before_last_run > 0 && applied_before_last_run < i64::try_from(truth.events)?,
        "the killed servers made progress but did not finish ({kills} kills, {applied_before_last_run} applied)"
    );

    let mut child = server_command(binary, config, &extra).spawn()?;
    wait_caught_up(config, Duration::from_secs(180)).await?;
    child.start_kill()?;
    child.wait().await?;
    assert_matches_truth(config, &truth).await
}
