//! Many distinct subscriptions against a live pipeline: every stream's
//! snapshot plus its deltas equals its unary query at the end, and a feed
//! that misses a commit's delta re-reads and ends exact.

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, ensure};
use chrono::Utc;
use common::{
    TestDatabase, TestServer,
    pipeline::{PARTITIONS, event, ingest_config, produce, redis, wait_caught_up},
};
use prost::Message;
use rtap::v1::{
    CommitDelta, EventType, GetEngagementRequest, GetEventCountsRequest, GetFunnelRequest,
    GetPipelineStatusRequest, GetTopProductsRequest, GetUniqueUsersRequest, Granularity,
    InteractionEvent, ProductRanking, Source, SubscribeRequest, SubscribeResponse, TimeWindow,
    analytics_service_client::AnalyticsServiceClient, delta, snapshot, subscribe_request,
    subscribe_response, time_window::Window,
};
use rtap_server::{
    Config,
    config::Role,
    store::{Bucket, Counter, commit::load_state, keys::PartitionKeys},
};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Client = AnalyticsServiceClient<Channel>;

fn trailing(seconds: i64) -> Option<TimeWindow> {
    Some(TimeWindow {
        window: Some(Window::Trailing(prost_types::Duration {
            seconds,
            nanos: 0,
        })),
    })
}

/// What a client holds of a result, in a form a delta applies to and the
/// unary result compares with (derived fields, like rates, left out).
#[derive(Debug, Clone, PartialEq, Default)]
struct Model {
    /// Event counts: (bucket start, type, source) → count; unique users:
    /// (0, 0, 0) → users; engagement: (0, field, 0) → value; top products:
    /// (product, 0, 0) → value; funnel: (source, stage, 0) → sessions.
    values: BTreeMap<(i64, i32, i32), i64>,
}

impl Model {
    fn set(&mut self, key: (i64, i32, i32), value: i64) {
        self.values.insert(key, value);
        self.values.retain(|_, v| *v != 0);
    }

    fn add(&mut self, key: (i64, i32, i32), by: i64) {
        *self.values.entry(key).or_default() += by;
        self.values.retain(|_, v| *v != 0);
    }

    fn of(result: &snapshot::Result) -> Self {
        let mut model = Self::default();
        let micros = |d: &Option<prost_types::Duration>| {
            d.map_or(0, |d| d.seconds * 1_000_000 + i64::from(d.nanos) / 1000)
        };
        match result {
            snapshot::Result::EventCounts(r) => {
                for bucket in &r.buckets {
                    let start = bucket.start_time.map_or(0, |t| t.seconds);
                    for c in &bucket.counts {
                        model.set((start, c.event_type, c.source), c.count);
                    }
                }
            }
            snapshot::Result::UniqueUsers(r) => model.set((0, 0, 0), r.unique_users),
            snapshot::Result::Engagement(r) => {
                let sessions = r.sessions.unwrap_or_default();
                model.set((0, 0, 0), r.unique_users);
                model.set((0, 1, 0), r.product_views);
                model.set((0, 2, 0), micros(&r.total_dwell_time));
                model.set((0, 3, 0), sessions.session_count);
                model.set((0, 4, 0), micros(&sessions.total_length));
                model.set((0, 5, 0), sessions.total_events);
            }
            snapshot::Result::TopProducts(r) => {
                for p in &r.products {
                    model.set((p.product_id, 0, 0), p.value);
                }
            }
            snapshot::Result::Funnel(r) => {
                for f in &r.funnels {
                    let source = i64::from(f.source);
                    model.set((source, 0, 0), f.sessions);
                    model.set((source, 1, 0), f.product_view_sessions);
                    model.set((source, 2, 0), f.add_to_cart_sessions);
                    model.set((source, 3, 0), f.purchase_sessions);
                }
            }
        }
        model
    }

    fn apply(&mut self, change: &delta::Change) {
        let micros = |d: &Option<prost_types::Duration>| {
            d.map_or(0, |d| d.seconds * 1_000_000 + i64::from(d.nanos) / 1000)
        };
        match change {
            delta::Change::EventCounts(d) => {
                for bucket in &d.buckets {
                    let start = bucket.start_time.map_or(0, |t| t.seconds);
                    for c in &bucket.counts {
                        self.add((start, c.event_type, c.source), c.count);
                    }
                }
                for removed in &d.removed_bucket_start_times {
                    self.values
                        .retain(|(start, _, _), _| *start != removed.seconds);
                }
            }
            delta::Change::UniqueUsers(d) => self.add((0, 0, 0), d.unique_users_change),
            delta::Change::Engagement(d) => {
                self.add((0, 0, 0), d.unique_users_change);
                self.add((0, 1, 0), d.product_views_change);
                self.add((0, 2, 0), micros(&d.total_dwell_time_change));
                self.add((0, 3, 0), d.session_count_change);
                self.add((0, 4, 0), micros(&d.session_total_length_change));
                self.add((0, 5, 0), d.session_total_events_change);
            }
            delta::Change::TopProducts(d) => {
                for p in &d.upserted {
                    self.set((p.product_id, 0, 0), p.value);
                }
                for id in &d.removed_product_ids {
                    self.values.remove(&(*id, 0, 0));
                }
            }
            delta::Change::Funnel(d) => {
                for c in &d.changes {
                    let source = i64::from(c.source);
                    self.add((source, 0, 0), c.sessions_change);
                    self.add((source, 1, 0), c.product_view_sessions_change);
                    self.add((source, 2, 0), c.add_to_cart_sessions_change);
                    self.add((source, 3, 0), c.purchase_sessions_change);
                }
            }
        }
    }
}

/// The unary result of a subscribed query, as a model.
async fn unary(client: &mut Client, query: &subscribe_request::Query) -> anyhow::Result<Model> {
    use subscribe_request::Query as Q;
    let result = match query.clone() {
        Q::EventCounts(r) => {
            snapshot::Result::EventCounts(client.get_event_counts(r).await?.into_inner())
        }
        Q::UniqueUsers(r) => {
            snapshot::Result::UniqueUsers(client.get_unique_users(r).await?.into_inner())
        }
        Q::Engagement(r) => {
            snapshot::Result::Engagement(client.get_engagement(r).await?.into_inner())
        }
        Q::TopProducts(r) => {
            snapshot::Result::TopProducts(client.get_top_products(r).await?.into_inner())
        }
        Q::Funnel(r) => snapshot::Result::Funnel(client.get_funnel(r).await?.into_inner()),
    };
    Ok(Model::of(&result))
}

/// One open subscription, read as messages come (as a client would: an
/// h2 client that leaves many small messages unread ends the connection),
/// and what its client holds.
struct Subscribed {
    query: subscribe_request::Query,
    held: Arc<Mutex<Held>>,
    reader: tokio::task::JoinHandle<()>,
}

/// What a subscriber holds: its model, the last sequence number, and the
/// first thing that went wrong.
#[derive(Default)]
struct Held {
    model: Model,
    sequence: u64,
    error: Option<String>,
}

impl Held {
    fn apply(&mut self, message: &SubscribeResponse) {
        self.sequence += 1;
        if message.sequence != self.sequence && self.error.is_none() {
            self.error = Some(format!(
                "sequence {} after {}",
                message.sequence,
                self.sequence - 1
            ));
        }
        match &message.update {
            Some(subscribe_response::Update::Snapshot(snapshot)) => {
                if let Some(result) = &snapshot.result {
                    self.model = Model::of(result);
                }
            }
            Some(subscribe_response::Update::Delta(delta)) => {
                if let Some(change) = &delta.change {
                    self.model.apply(change);
                }
            }
            _ => {}
        }
    }
}

impl Subscribed {
    /// Subscribes, waits for the snapshot, then reads in the background.
    async fn open(client: &mut Client, query: subscribe_request::Query) -> anyhow::Result<Self> {
        let mut stream = client
            .subscribe(SubscribeRequest {
                query: Some(query.clone()),
                heartbeat_interval: None,
                resume_token: Vec::new(),
            })
            .await?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("no snapshot within 30 s")?
            .context("the stream ended")??;
        let held = Arc::new(Mutex::new(Held::default()));
        held.lock().await.apply(&first);
        let sink = held.clone();
        let reader = tokio::spawn(async move {
            loop {
                let message = stream.next().await;
                let mut held = sink.lock().await;
                match message {
                    Some(Ok(message)) => held.apply(&message),
                    Some(Err(status)) => {
                        held.error.get_or_insert(format!("stream failed: {status}"));
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(Self {
            query,
            held,
            reader,
        })
    }

    /// Waits until what the client holds equals the unary query.
    async fn settle(&self, client: &mut Client) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let expected = unary(client, &self.query).await?;
            {
                let held = self.held.lock().await;
                if let Some(error) = &held.error {
                    anyhow::bail!("{:?}: {error}", self.query);
                }
                if held.model == expected {
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    let activity = client
                        .get_pipeline_status(GetPipelineStatusRequest {})
                        .await?
                        .into_inner()
                        .feed_activity;
                    anyhow::bail!(
                        "{:?}: held {:?} != unary {:?} (feeds: {activity:?})",
                        self.query,
                        held.model,
                        expected
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn model(&self) -> Model {
        self.held.lock().await.model.clone()
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// 1,000 distinct queries: products × windows × kinds, a quarter of them
/// trailing-day minute series.
fn distinct_queries() -> Vec<subscribe_request::Query> {
    use subscribe_request::Query as Q;
    let mut queries = Vec::new();
    for product in 1..=250 {
        queries.push(Q::EventCounts(GetEventCountsRequest {
            window: trailing(24 * 3600),
            granularity: Granularity::Minute as i32,
            product_id: product,
            ..Default::default()
        }));
        queries.push(Q::EventCounts(GetEventCountsRequest {
            window: trailing(3600),
            product_id: product,
            event_types: vec![EventType::ProductView as i32],
            ..Default::default()
        }));
        queries.push(Q::EventCounts(GetEventCountsRequest {
            window: trailing(6 * 3600),
            granularity: Granularity::Hour as i32,
            product_id: product,
            ..Default::default()
        }));
    }
    for product in 1..=120 {
        queries.push(Q::UniqueUsers(GetUniqueUsersRequest {
            window: trailing(3600),
            product_id: product,
            ..Default::default()
        }));
    }
    for product in 1..=80 {
        queries.push(Q::Engagement(GetEngagementRequest {
            window: trailing(2 * 3600),
            product_id: product,
        }));
    }
    for ranking in [
        ProductRanking::Views,
        ProductRanking::AddToCarts,
        ProductRanking::Purchases,
        ProductRanking::Revenue,
    ] {
        for limit in 1..=10 {
            for hours in [1, 3] {
                queries.push(Q::TopProducts(GetTopProductsRequest {
                    window: trailing(hours * 3600),
                    ranking: ranking as i32,
                    limit,
                    include_product_names: false,
                }));
            }
        }
    }
    let sources = [Source::Web, Source::MobileApp, Source::Server].map(|s| s as i32);
    for minutes in [30, 60, 90, 120, 150, 180, 240, 300, 360, 420] {
        for subset in [vec![], vec![sources[0]], vec![sources[1], sources[2]]] {
            queries.push(Q::Funnel(GetFunnelRequest {
                window: trailing(minutes * 60),
                sources: subset,
            }));
        }
    }
    queries.truncate(1000);
    queries
}

/// A wave of events over the last 20 minutes and the next two (device
/// clocks run ahead): views, carts and purchases of products 1..=250 from
/// every source.
fn wave(seed: i64, count: i64) -> Vec<InteractionEvent> {
    let now = Utc::now();
    (0..count)
        .map(|i| {
            let user = seed * 10_000 + i;
            let mut event = event(user, now + chrono::Duration::seconds(120 - (i * 7) % 1320));
            event.product_id = (i * 13 + seed) % 250 + 1;
            event.source =
                [Source::Web, Source::MobileApp, Source::Server][(i % 3) as usize] as i32;
            event.r#type = match i % 5 {
                0..=2 => EventType::ProductView,
                3 => EventType::AddToCart,
                _ => EventType::Purchase,
            } as i32;
            event.quantity = if event.r#type == EventType::ProductView as i32 {
                0
            } else {
                1
            };
            event.amount_micros = if event.r#type == EventType::Purchase as i32 {
                1_000_000 * (i % 9 + 1)
            } else {
                0
            };
            event.dwell_time =
                (event.r#type == EventType::ProductView as i32).then_some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                });
            event
        })
        .collect()
}

#[tokio::test]
async fn a_thousand_distinct_subscriptions_end_equal_to_their_unary_queries() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    config.role = Role::All;
    let brokers = config.kafka_brokers[0].clone();
    produce(&brokers, &config.events_topic, &wave(0, 300)).await?;
    let server = TestServer::start(config.clone()).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    // A thousand streams on one connection: with HTTP/2's default 64 KiB
    // connection window the server would have to cut their messages into
    // frames so small that the client's h2 calls it abuse.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))?
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(1 << 20))
        .connect()
        .await?;
    let mut client = AnalyticsServiceClient::new(channel);

    let mut subscriptions = Vec::new();
    for query in distinct_queries() {
        subscriptions.push(Subscribed::open(&mut client, query).await?);
    }
    let status = client
        .get_pipeline_status(GetPipelineStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(
        status.active_feeds,
        i64::try_from(subscriptions.len())?,
        "every query has a feed of its own"
    );

    for seed in 1..=4 {
        produce(&brokers, &config.events_topic, &wave(seed, 500)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    for subscribed in &subscriptions {
        subscribed.settle(&mut client).await?;
    }
    let activity = client
        .get_pipeline_status(GetPipelineStatusRequest {})
        .await?
        .into_inner()
        .feed_activity
        .context("feed activity")?;
    assert!(
        activity.applied_deltas > 0,
        "event counts applied commits in memory: {activity:?}"
    );
    assert!(activity.skipped_deltas > 0, "{activity:?}");

    drop(subscriptions);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn a_rolling_series_takes_in_the_events_counted_ahead_of_it_without_a_read()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    config.role = Role::All;
    let brokers = config.kafka_brokers[0].clone();
    let server = TestServer::start(config.clone()).await?;
    let mut client = AnalyticsServiceClient::new(server.channel());
    let query = subscribe_request::Query::EventCounts(GetEventCountsRequest {
        window: trailing(600),
        granularity: Granularity::Minute as i32,
        product_id: 3,
        ..Default::default()
    });
    let subscribed = Subscribed::open(&mut client, query).await?;
    let activity = || async {
        let mut client = AnalyticsServiceClient::new(server.channel());
        let status = client
            .get_pipeline_status(GetPipelineStatusRequest {})
            .await?
            .into_inner();
        status.feed_activity.context("feed activity")
    };
    // An event of this minute reaches the feed only through a delta, so
    // once it shows, the server listens to deltas (its first connection
    // makes every feed re-read) and the count below starts from there.
    let now = Utc::now();
    produce(&brokers, &config.events_topic, &[event(5, now)]).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    subscribed.settle(&mut client).await?;
    ensure!(
        !subscribed.model().await.values.is_empty(),
        "the event of this minute arrived"
    );
    let before = activity().await?;

    // Events of the next minute, whose bucket is not in the window yet;
    // with time to see them wait there before the minute starts.
    let second = Utc::now().timestamp().rem_euclid(60);
    if second > 30 {
        tokio::time::sleep(Duration::from_secs(u64::try_from(61 - second)?)).await;
    }
    let minute = Utc::now().timestamp().div_euclid(60) * 60;
    let next = chrono::DateTime::from_timestamp(minute + 90, 0).context("time")?;
    let events: Vec<_> = (1..=4).map(|user| event(user, next)).collect();
    produce(&brokers, &config.events_topic, &events).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    subscribed.settle(&mut client).await?;
    let key = (
        minute + 60,
        EventType::ProductView as i32,
        Source::MobileApp as i32,
    );
    ensure!(!subscribed.model().await.values.contains_key(&key));

    // Past the boundary the window holds that minute.
    let boundary = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(minute + 61)?);
    if let Ok(wait) = boundary.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    subscribed.settle(&mut client).await?;
    ensure!(
        subscribed.model().await.values.get(&key) == Some(&4),
        "the events counted ahead arrived with the minute: {:?}",
        subscribed.model().await
    );
    // Every full refresh since came from a resync of the whole replica (a
    // delta the hub thought lost on a loaded machine), none from the roll.
    let after = activity().await?;
    ensure!(
        after.full_refreshes - before.full_refreshes <= after.resyncs - before.resyncs,
        "the feed counted and rolled without re-reading: before {before:?}, after {after:?}"
    );

    drop(subscribed);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// A server that ingested 30 views of product 3 made `now`, and a settled
/// subscription to that product's trailing hour of minute counts.
struct ProductFeed {
    database: TestDatabase,
    config: Config,
    server: TestServer,
    client: Client,
    subscribed: Subscribed,
    now: chrono::DateTime<Utc>,
}

impl ProductFeed {
    async fn start() -> anyhow::Result<Self> {
        let database = TestDatabase::create().await?;
        let mut config = ingest_config(&database);
        config.role = Role::All;
        let now = Utc::now();
        let events: Vec<_> = (1..=30).map(|user| event(user, now)).collect();
        produce(&config.kafka_brokers[0], &config.events_topic, &events).await?;
        let server = TestServer::start(config.clone()).await?;
        wait_caught_up(&config, Duration::from_secs(60)).await?;
        let mut client = AnalyticsServiceClient::new(server.channel());
        // `event` views product 3 from the mobile app.
        let query = subscribe_request::Query::EventCounts(GetEventCountsRequest {
            window: trailing(3600),
            granularity: Granularity::Minute as i32,
            product_id: 3,
            ..Default::default()
        });
        let subscribed = Subscribed::open(&mut client, query).await?;
        subscribed.settle(&mut client).await?;
        Ok(Self {
            database,
            config,
            server,
            client,
            subscribed,
            now,
        })
    }

    /// Partition 0's keys and stored offset, and the counter key and field
    /// of the views of product 3 in the minute of `now`: where a commit the
    /// feed never hears of adds counts.
    async fn unheard_commit_target(
        &self,
        redis: &mut redis::aio::MultiplexedConnection,
    ) -> anyhow::Result<(PartitionKeys, i64, String, String)> {
        let keys = PartitionKeys::new(&self.config.redis_namespace, 0);
        let stored = load_state(redis, &keys)
            .await?
            .offset
            .context("partition 0 has a stored offset")?;
        let minute = Bucket::containing(
            rtap_server::store::Granularity::Minute,
            self.now.timestamp(),
        );
        let field = Counter::ProductEvents {
            event_type: EventType::ProductView as i32,
            source: Source::MobileApp as i32,
            product: 3,
        }
        .field();
        let counters = keys.counters(minute);
        Ok((keys, stored, counters, field))
    }

    /// Settles the subscription and checks that the unheard counts reached it.
    async fn ends_exact_past(mut self, before: Model, what: &str) -> anyhow::Result<()> {
        self.subscribed.settle(&mut self.client).await?;
        ensure!(
            self.subscribed.model().await != before,
            "{what} reached the subscriber"
        );
        drop(self.subscribed);
        self.server.stop().await?;
        common::delete_redis_namespace(
            &self.config.redis_url,
            &self.config.redis_namespace,
            PARTITIONS,
        )
        .await?;
        self.database.drop().await
    }
}

#[tokio::test]
async fn a_feed_that_misses_a_commit_delta_rereads_and_ends_exact() -> anyhow::Result<()> {
    let feed = ProductFeed::start().await?;
    // A commit whose delta never came: its counts land in Redis, and the
    // next delta the feed sees starts past the offset it knew.
    let mut redis = redis().await?;
    let (_, stored, counters, field) = feed.unheard_commit_target(&mut redis).await?;
    let _: i64 = redis::cmd("HINCRBY")
        .arg(counters)
        .arg(&field)
        .arg(5)
        .query_async(&mut redis)
        .await?;
    let later = CommitDelta {
        partition: 0,
        first_offset: stored + 10,
        next_offset: stored + 11,
        previous_next_offset: Some(stored + 10),
        ..CommitDelta::default()
    };
    let _: i64 = redis::cmd("SPUBLISH")
        .arg(rtap_server::store::keys::PartitionKeys::new(&feed.config.redis_namespace, 0).deltas())
        .arg(later.encode_to_vec())
        .query_async(&mut redis)
        .await?;
    let before = feed.subscribed.model().await;
    feed.ends_exact_past(before, "the missed counts").await
}

#[tokio::test]
async fn a_lost_delta_of_a_partitions_last_commit_is_noticed_from_the_stored_offsets()
-> anyhow::Result<()> {
    let feed = ProductFeed::start().await?;
    // A commit whose delta never came, and no commit after it: its counts
    // and offset land in Redis, nothing is published.
    let mut redis = redis().await?;
    let (keys, stored, counters, field) = feed.unheard_commit_target(&mut redis).await?;
    redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(counters)
        .arg(&field)
        .arg(5)
        .cmd("HSET")
        .arg(keys.state())
        .arg("offset")
        .arg(stored + 1)
        .query_async::<()>(&mut redis)
        .await?;
    let before = feed.subscribed.model().await;
    feed.ends_exact_past(before, "the counts of the commit whose delta was lost")
        .await
}
