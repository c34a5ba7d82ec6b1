//! Subscriptions: a snapshot of a query's result, then deltas as ingest
//! commits change it, heartbeats while nothing does.
//!
//! - The [`Hub`] (one per process) listens to the `CommitDelta`s every
//!   ingest process publishes on Redis, so a replica's subscribers see events
//!   ingested anywhere, and keeps the latest watermark.
//! - A [`Feed`] per distinct query (shared by all its subscribers) re-runs the
//!   query when a commit touched its window or a rolling window crossed a
//!   bucket boundary, and publishes the difference from its previous result
//!   as a versioned delta. Deltas are differences of exact results, so a
//!   snapshot plus the deltas after it always equals the unary query.
//! - Each stream reads its feed's broadcast channel (bounded, shared): a
//!   subscriber that falls more than [`FEED_QUEUE`] deltas behind gets a fresh
//!   snapshot marked `resync`. No task per stream: a stream is a state
//!   machine polled by its connection, so a slow client holds only its place
//!   in the channel and never delays others or ingest.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex as StdMutex, Weak,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use futures_util::StreamExt as _;
use prost::Message;
use redis::aio::ConnectionManager;
use rtap::v1::{
    CommitDelta, Delta, EngagementDelta, EventCountBucket, EventCountsDelta, FunnelChange,
    FunnelDelta, Heartbeat, PartitionOffset, ProductScore, Snapshot, SubscribeResponse,
    TopProductsDelta, UniqueUsersDelta, Watermark, delta, snapshot, subscribe_response,
};
use tokio::sync::{Mutex, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{
    query::{Query, QueryResult},
    window::ResolvedWindow,
};
use crate::{
    error::Error,
    infra::{
        reconnect::Reconnecting,
        time::{
            duration_from_micros, duration_micros, timestamp_from_millis, timestamp_from_seconds,
        },
    },
    retry::{Backoff, RECONNECT_MAX},
    store::{
        Granularity, Retention,
        commit::{PartitionState, load_states},
        keys::deltas_channel,
        read::MetricReader,
        settled::SettledRankings,
        status::{PartitionVitals, Totals},
    },
};

/// Deltas a feed keeps for slow subscribers before they must resync.
pub const FEED_QUEUE: usize = 64;
/// Commit notifications the hub buffers for its feeds.
const HUB_QUEUE: usize = 1024;
/// How often an idle feed checks whether it still has subscribers.
const FEED_IDLE_CHECK: Duration = Duration::from_secs(1);

/// Shared metric-store access of the analytics service.
#[derive(Clone)]
pub struct StoreClient {
    client: redis::Client,
    connection: Arc<Reconnecting<ConnectionManager, Error>>,
    namespace: String,
    /// Bucket retentions, for window resolution.
    pub retention: Retention,
    /// Unions of settled ranking buckets, shared by every query.
    settled: Arc<SettledRankings>,
}

impl StoreClient {
    /// Access to `namespace` through `client`; calls give up after `timeout`.
    pub fn new(
        client: redis::Client,
        namespace: String,
        retention: Retention,
        timeout: Duration,
    ) -> Self {
        let connect = client.clone();
        let connection = Reconnecting::new(move || {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            let client = connect.clone();
            async move {
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|e| Error::Unavailable {
                        dependency: "redis",
                        reason: e.to_string(),
                    })
            }
        });
        Self {
            client,
            connection: Arc::new(connection),
            namespace,
            retention,
            settled: Arc::new(SettledRankings::new(retention)),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A (shared, multiplexed) connection; UNAVAILABLE if Redis is down.
    pub async fn connection(&self) -> Result<ConnectionManager, Error> {
        self.connection.get().await
    }

    /// Every consumed partition's stored state.
    pub async fn partition_states(&self) -> Result<Vec<(i32, PartitionState)>, Error> {
        let mut connection = self.connection().await?;
        Ok(load_states(&mut connection, &self.namespace).await?)
    }

    /// Validates nothing: runs `query` over `window` on every consumed
    /// partition.
    pub async fn run(&self, query: &Query, window: ResolvedWindow) -> Result<QueryResult, Error> {
        let mut connection = self.connection().await?;
        let reader = MetricReader::discover(&mut connection, &self.namespace)
            .await?
            .with_settled(self.settled.clone());
        query
            .run(&mut connection, &reader, window, &self.retention)
            .await
    }

    /// The watermark as stored: every partition's next offset and the latest
    /// event time.
    pub async fn watermark(&self) -> Result<Watermark, Error> {
        let vitals: Vec<PartitionVitals> = self
            .partition_states()
            .await?
            .into_iter()
            .map(|(partition, state)| PartitionVitals {
                partition,
                state,
                high_watermark: None,
            })
            .collect();
        Ok(Watermark {
            offsets: vitals
                .iter()
                .map(|v| PartitionOffset {
                    partition: v.partition,
                    next_offset: v.stored_offset(),
                })
                .collect(),
            latest_event_time: Totals::of(&vitals)
                .latest_event_ms
                .map(timestamp_from_millis),
        })
    }
}

/// Live counts of this process's subscriptions, for operators and leak
/// tests.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Open subscription streams.
    pub streams: AtomicI64,
    /// Running feeds.
    pub feeds: AtomicI64,
}

/// What a feed is woken by.
#[derive(Debug, Clone)]
enum Trigger {
    /// A commit landed (its delta).
    Commit(Arc<CommitDelta>),
    /// Notifications may have been missed: recompute.
    Resync,
}

/// The process's fan-out point.
pub struct Hub {
    store: StoreClient,
    triggers: broadcast::Sender<Trigger>,
    watermark: watch::Sender<Watermark>,
    feeds: StdMutex<HashMap<String, Weak<Feed>>>,
    gauges: Arc<Gauges>,
    shutdown: CancellationToken,
}

impl Hub {
    /// Starts listening to `store`'s delta channel until `shutdown`.
    pub fn start(store: StoreClient, shutdown: CancellationToken) -> Arc<Self> {
        let (triggers, _) = broadcast::channel(HUB_QUEUE);
        let hub = Arc::new(Self {
            store,
            triggers,
            watermark: watch::Sender::new(Watermark::default()),
            feeds: StdMutex::new(HashMap::new()),
            gauges: Arc::new(Gauges::default()),
            shutdown,
        });
        tokio::spawn(listen(Arc::downgrade(&hub), hub.shutdown.clone()));
        hub
    }

    /// The subscription gauges.
    pub fn gauges(&self) -> &Gauges {
        &self.gauges
    }

    /// The metric store.
    pub fn store(&self) -> &StoreClient {
        &self.store
    }

    /// Opens a subscription to `query` (validated): the first message is a
    /// snapshot; the stream ends on server shutdown.
    pub async fn subscribe(
        self: &Arc<Self>,
        query: Query,
        heartbeat: Duration,
    ) -> Result<impl futures_util::Stream<Item = SubscribeResponse> + Send + 'static, Error> {
        let feed = self.feed(query);
        let (version, result, updates) = feed.snapshot(&self.store).await?;
        let stream = SubscriptionState {
            feed,
            hub_store: self.store.clone(),
            version,
            updates,
            first: Some(result),
            sequence: 0,
            heartbeat,
            watermark: self.watermark.subscribe(),
            shutdown: self.shutdown.clone(),
            _open: StreamGuard::new(self.gauges.clone()),
        };
        Ok(futures_util::stream::unfold(stream, next_message))
    }

    /// The feed of `query`, started if none runs.
    fn feed(self: &Arc<Self>, query: Query) -> Arc<Feed> {
        let key = query.canonical_key();
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(feed) = feeds.get(&key).and_then(Weak::upgrade) {
            return feed;
        }
        let (updates, _) = broadcast::channel(FEED_QUEUE);
        let feed = Arc::new(Feed {
            query,
            state: Mutex::new(FeedState::default()),
            updates,
        });
        feeds.insert(key.clone(), Arc::downgrade(&feed));
        feeds.retain(|_, feed| feed.strong_count() > 0);
        drop(feeds);
        self.gauges.feeds.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(run_feed(
            self.clone(),
            key,
            feed.clone(),
            self.triggers.subscribe(),
        ));
        feed
    }
}

/// Receives every `CommitDelta` of the namespace and passes it on; on
/// (re)connection, reloads the watermark and tells feeds to recompute.
async fn listen(hub: Weak<Hub>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_MAX);
    loop {
        let Some(strong) = hub.upgrade() else { return };
        let client = strong.store.client.clone();
        let channel = deltas_channel(strong.store.namespace());
        drop(strong);
        let connected = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let mut pubsub = tokio::select! {
            () = shutdown.cancelled() => return,
            connected = connected => match connected {
                Ok(pubsub) => pubsub,
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %error, retry_in = ?delay, "cannot listen to ingest deltas");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        backoff.reset();
        if let Some(hub) = hub.upgrade() {
            if let Ok(watermark) = hub.store.watermark().await {
                hub.watermark.send_replace(watermark);
            }
            let _ = hub.triggers.send(Trigger::Resync);
        }
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                message = messages.next() => message,
            };
            let Some(message) = message else { break };
            let Some(hub) = hub.upgrade() else { return };
            match CommitDelta::decode(message.get_payload_bytes()) {
                Ok(delta) => {
                    hub.watermark.send_modify(|w| advance(w, &delta));
                    let _ = hub.triggers.send(Trigger::Commit(Arc::new(delta)));
                }
                Err(error) => tracing::warn!(error = %error, "undecodable commit delta ignored"),
            }
        }
        tracing::warn!("lost the ingest delta channel; reconnecting");
    }
}

fn advance(watermark: &mut Watermark, delta: &CommitDelta) {
    match watermark
        .offsets
        .iter_mut()
        .find(|o| o.partition == delta.partition)
    {
        Some(offset) => offset.next_offset = offset.next_offset.max(delta.next_offset),
        None => {
            watermark.offsets.push(PartitionOffset {
                partition: delta.partition,
                next_offset: delta.next_offset,
            });
            watermark.offsets.sort_unstable_by_key(|o| o.partition);
        }
    }
    let later = |t: &prost_types::Timestamp| (t.seconds, t.nanos);
    if let Some(time) = delta.watermark
        && watermark
            .latest_event_time
            .is_none_or(|current| later(&time) > later(&current))
    {
        watermark.latest_event_time = Some(time);
    }
}

/// One subscribed query, shared by its subscribers.
struct Feed {
    query: Query,
    state: Mutex<FeedState>,
    updates: broadcast::Sender<Arc<FeedUpdate>>,
}

#[derive(Default)]
struct FeedState {
    version: u64,
    current: Option<(ResolvedWindow, QueryResult)>,
}

struct FeedUpdate {
    version: u64,
    delta: Delta,
}

impl Feed {
    /// The current result and its version, computing it if needed, with a
    /// receiver of every later delta (taken under the same lock, so none is
    /// missed or repeated).
    async fn snapshot(
        &self,
        store: &StoreClient,
    ) -> Result<(u64, QueryResult, broadcast::Receiver<Arc<FeedUpdate>>), Error> {
        let mut state = self.state.lock().await;
        if state.current.is_none() {
            let window = self.query.window(Utc::now(), &store.retention, "")?;
            let result = store.run(&self.query, window).await?;
            state.current = Some((window, result));
        }
        let result = state
            .current
            .as_ref()
            .map(|(_, result)| result.clone())
            .ok_or_else(|| Error::Internal("a feed lost its result".into()))?;
        Ok((state.version, result, self.updates.subscribe()))
    }

    /// Re-runs the query; publishes the difference if there is one.
    async fn refresh(&self, store: &StoreClient) -> Result<(), Error> {
        let window = self.query.window(Utc::now(), &store.retention, "")?;
        let result = store.run(&self.query, window).await?;
        let mut state = self.state.lock().await;
        let delta = match &state.current {
            Some((_, old)) => diff(old, &result),
            None => None,
        };
        state.current = Some((window, result));
        if let Some(delta) = delta {
            state.version += 1;
            let _ = self.updates.send(Arc::new(FeedUpdate {
                version: state.version,
                delta,
            }));
        }
        Ok(())
    }

    async fn window(&self) -> Option<ResolvedWindow> {
        self.state.lock().await.current.as_ref().map(|(w, _)| *w)
    }
}

impl Hub {
    fn forget(&self, key: &str) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if feeds.get(key).is_some_and(|f| f.strong_count() == 0) {
            feeds.remove(key);
        }
    }
}

/// A feed's loop: recompute on relevant commits and bucket boundaries, until
/// no subscriber is left or the server shuts down.
async fn run_feed(
    hub: Arc<Hub>,
    key: String,
    feed: Arc<Feed>,
    mut triggers: broadcast::Receiver<Trigger>,
) {
    let mut idle = tokio::time::interval(FEED_IDLE_CHECK);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rolling = feed.query.is_rolling();
    loop {
        let boundary = next_boundary(rolling);
        let mut dirty = tokio::select! {
            () = hub.shutdown.cancelled() => break,
            _ = idle.tick() => {
                if feed.updates.receiver_count() == 0 && Arc::strong_count(&feed) <= 1 {
                    break;
                }
                false
            }
            () = tokio::time::sleep(boundary) => rolling,
            trigger = triggers.recv() => match trigger {
                Ok(trigger) => touches(feed.window().await, &trigger),
                Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        // Fold every queued notification into one recomputation.
        loop {
            match triggers.try_recv() {
                Ok(trigger) => dirty |= touches(feed.window().await, &trigger),
                Err(broadcast::error::TryRecvError::Lagged(_)) => dirty = true,
                Err(_) => break,
            }
        }
        if dirty && let Err(error) = feed.refresh(&hub.store).await {
            tracing::debug!(error = %error, "feed refresh failed; retrying on the next trigger");
        }
    }
    hub.forget(&key);
    hub.gauges.feeds.fetch_sub(1, Ordering::Relaxed);
}

/// How long until a rolling window may move: the next minute boundary (every
/// bucket boundary is one); a recomputation that finds no change sends
/// nothing. Fixed windows never move.
fn next_boundary(rolling: bool) -> Duration {
    if !rolling {
        return Duration::from_secs(3600);
    }
    let now_ms = Utc::now().timestamp_millis();
    let step_ms = Granularity::Minute.seconds() * 1000;
    let next = (now_ms.div_euclid(step_ms) + 1) * step_ms;
    // Just past the boundary, so the new bucket is the current one.
    Duration::from_millis(u64::try_from(next - now_ms).unwrap_or(1000) + 5)
}

/// Whether a commit changed buckets inside `window`.
fn touches(window: Option<ResolvedWindow>, trigger: &Trigger) -> bool {
    match (window, trigger) {
        (Some(window), Trigger::Commit(delta)) => delta.minutes.iter().any(|m| {
            m.minute_start
                .is_some_and(|t| (window.start..window.end).contains(&t.seconds))
        }),
        _ => true,
    }
}

/// Ends the stream count when a stream is dropped, however it ends.
struct StreamGuard(Arc<Gauges>);

impl StreamGuard {
    fn new(gauges: Arc<Gauges>) -> Self {
        gauges.streams.fetch_add(1, Ordering::Relaxed);
        Self(gauges)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

struct SubscriptionState {
    feed: Arc<Feed>,
    hub_store: StoreClient,
    version: u64,
    updates: broadcast::Receiver<Arc<FeedUpdate>>,
    first: Option<QueryResult>,
    sequence: u64,
    heartbeat: Duration,
    watermark: watch::Receiver<Watermark>,
    shutdown: CancellationToken,
    _open: StreamGuard,
}

impl SubscriptionState {
    fn message(&mut self, update: subscribe_response::Update) -> SubscribeResponse {
        self.sequence += 1;
        SubscribeResponse {
            sequence: self.sequence,
            update: Some(update),
            watermark: Some(self.watermark.borrow().clone()),
        }
    }
}

fn snapshot_of(result: QueryResult, resync: bool) -> subscribe_response::Update {
    let result = match result {
        QueryResult::EventCounts(r) => snapshot::Result::EventCounts(r),
        QueryResult::UniqueUsers(r) => snapshot::Result::UniqueUsers(r),
        QueryResult::Engagement(r) => snapshot::Result::Engagement(r),
        QueryResult::TopProducts(r) => snapshot::Result::TopProducts(r),
        QueryResult::Funnel(r) => snapshot::Result::Funnel(r),
    };
    subscribe_response::Update::Snapshot(Snapshot {
        resync,
        result: Some(result),
    })
}

/// The next message of a stream, or `None` when it ends.
async fn next_message(
    mut state: SubscriptionState,
) -> Option<(SubscribeResponse, SubscriptionState)> {
    if let Some(result) = state.first.take() {
        let message = state.message(snapshot_of(result, false));
        return Some((message, state));
    }
    loop {
        let received = tokio::select! {
            () = state.shutdown.cancelled() => return None,
            received = tokio::time::timeout(state.heartbeat, state.updates.recv()) => received,
        };
        let update = match received {
            Err(_) => subscribe_response::Update::Heartbeat(Heartbeat {
                server_time: Some(timestamp_from_seconds(Utc::now().timestamp())),
            }),
            Ok(Ok(update)) if update.version <= state.version => continue,
            Ok(Ok(update)) => {
                state.version = update.version;
                subscribe_response::Update::Delta(update.delta.clone())
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                // Too far behind: start again from a fresh snapshot.
                match state.feed.snapshot(&state.hub_store).await {
                    Ok((version, result, updates)) => {
                        state.version = version;
                        state.updates = updates;
                        snapshot_of(result, true)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => return None,
        };
        let message = state.message(update);
        return Some((message, state));
    }
}

/// The change from `old` to `new`, if any.
fn diff(old: &QueryResult, new: &QueryResult) -> Option<Delta> {
    let change = match (old, new) {
        (QueryResult::EventCounts(old), QueryResult::EventCounts(new)) => {
            diff_event_counts(old, new)
        }
        (QueryResult::UniqueUsers(old), QueryResult::UniqueUsers(new)) => {
            diff_unique_users(old, new)
        }
        (QueryResult::Engagement(old), QueryResult::Engagement(new)) => diff_engagement(old, new),
        (QueryResult::TopProducts(old), QueryResult::TopProducts(new)) => {
            diff_top_products(old, new)
        }
        (QueryResult::Funnel(old), QueryResult::Funnel(new)) => diff_funnel(old, new),
        _ => None,
    }?;
    Some(Delta {
        change: Some(change),
    })
}

/// The change between two event-count results, if any.
fn diff_event_counts(
    old: &rtap::v1::GetEventCountsResponse,
    new: &rtap::v1::GetEventCountsResponse,
) -> Option<delta::Change> {
    let held: HashMap<i64, &EventCountBucket> = old
        .buckets
        .iter()
        .filter_map(|b| Some((b.start_time?.seconds, b)))
        .collect();
    let mut buckets = Vec::new();
    for bucket in &new.buckets {
        let start = bucket.start_time.map_or(0, |t| t.seconds);
        match held.get(&start) {
            Some(previous) => {
                let mut counts = Vec::new();
                let before: HashMap<(i32, i32), i64> = previous
                    .counts
                    .iter()
                    .map(|c| ((c.event_type, c.source), c.count))
                    .collect();
                let after: HashMap<(i32, i32), i64> = bucket
                    .counts
                    .iter()
                    .map(|c| ((c.event_type, c.source), c.count))
                    .collect();
                let mut keys: Vec<_> = before.keys().chain(after.keys()).copied().collect();
                keys.sort_unstable();
                keys.dedup();
                for key in keys {
                    let change = after.get(&key).unwrap_or(&0) - before.get(&key).unwrap_or(&0);
                    if change != 0 {
                        counts.push(rtap::v1::EventCount {
                            event_type: key.0,
                            source: key.1,
                            count: change,
                        });
                    }
                }
                if !counts.is_empty() {
                    buckets.push(EventCountBucket {
                        start_time: bucket.start_time,
                        total: bucket.total - previous.total,
                        counts,
                    });
                }
            }
            None => buckets.push(bucket.clone()),
        }
    }
    let kept: std::collections::HashSet<i64> = new
        .buckets
        .iter()
        .filter_map(|b| Some(b.start_time?.seconds))
        .collect();
    let removed: Vec<prost_types::Timestamp> = old
        .buckets
        .iter()
        .filter_map(|b| b.start_time)
        .filter(|t| !kept.contains(&t.seconds))
        .collect();
    if buckets.is_empty() && removed.is_empty() && old.range == new.range {
        return None;
    }
    Some(delta::Change::EventCounts(EventCountsDelta {
        buckets,
        removed_bucket_start_times: removed,
        range: new.range,
    }))
}

/// The change between two unique-user results, if any.
fn diff_unique_users(
    old: &rtap::v1::GetUniqueUsersResponse,
    new: &rtap::v1::GetUniqueUsersResponse,
) -> Option<delta::Change> {
    let change = new.unique_users - old.unique_users;
    if change == 0 && old.range == new.range {
        return None;
    }
    Some(delta::Change::UniqueUsers(UniqueUsersDelta {
        unique_users_change: change,
        range: new.range,
    }))
}

/// The change between two engagement results, if any.
fn diff_engagement(
    old: &rtap::v1::GetEngagementResponse,
    new: &rtap::v1::GetEngagementResponse,
) -> Option<delta::Change> {
    let micros_of = |d: Option<prost_types::Duration>| d.as_ref().map_or(0, duration_micros);
    let sessions = |r: &rtap::v1::GetEngagementResponse| {
        let s = r.sessions.unwrap_or_default();
        (s.session_count, micros_of(s.total_length), s.total_events)
    };
    let (old_sessions, new_sessions) = (sessions(old), sessions(new));
    let engagement = EngagementDelta {
        unique_users_change: new.unique_users - old.unique_users,
        product_views_change: new.product_views - old.product_views,
        total_dwell_time_change: Some(duration_from_micros(
            micros_of(new.total_dwell_time) - micros_of(old.total_dwell_time),
        )),
        session_count_change: new_sessions.0 - old_sessions.0,
        session_total_length_change: Some(duration_from_micros(new_sessions.1 - old_sessions.1)),
        session_total_events_change: new_sessions.2 - old_sessions.2,
        range: new.range,
    };
    let unchanged = engagement.unique_users_change == 0
        && engagement.product_views_change == 0
        && micros_of(new.total_dwell_time) == micros_of(old.total_dwell_time)
        && old_sessions == new_sessions
        && old.range == new.range;
    if unchanged {
        return None;
    }
    Some(delta::Change::Engagement(engagement))
}

/// The change between two rankings, if any.
fn diff_top_products(
    old: &rtap::v1::GetTopProductsResponse,
    new: &rtap::v1::GetTopProductsResponse,
) -> Option<delta::Change> {
    let before: HashMap<i64, i64> = old
        .products
        .iter()
        .map(|p| (p.product_id, p.value))
        .collect();
    let upserted: Vec<ProductScore> = new
        .products
        .iter()
        .filter(|p| before.get(&p.product_id) != Some(&p.value))
        .cloned()
        .collect();
    let now_listed: std::collections::HashSet<i64> =
        new.products.iter().map(|p| p.product_id).collect();
    let removed: Vec<i64> = old
        .products
        .iter()
        .map(|p| p.product_id)
        .filter(|id| !now_listed.contains(id))
        .collect();
    if upserted.is_empty() && removed.is_empty() && old.range == new.range {
        return None;
    }
    Some(delta::Change::TopProducts(TopProductsDelta {
        upserted,
        removed_product_ids: removed,
        range: new.range,
    }))
}

/// The change between two funnels, if any.
fn diff_funnel(
    old: &rtap::v1::GetFunnelResponse,
    new: &rtap::v1::GetFunnelResponse,
) -> Option<delta::Change> {
    let counts = |f: &rtap::v1::Funnel| {
        [
            f.sessions,
            f.product_view_sessions,
            f.add_to_cart_sessions,
            f.purchase_sessions,
        ]
    };
    let before: HashMap<i32, [i64; 4]> =
        old.funnels.iter().map(|f| (f.source, counts(f))).collect();
    let mut changes = Vec::new();
    let listed: std::collections::HashSet<i32> = new.funnels.iter().map(|f| f.source).collect();
    for (source, previous) in &before {
        if !listed.contains(source) {
            changes.push(FunnelChange {
                source: *source,
                sessions_change: -previous[0],
                product_view_sessions_change: -previous[1],
                add_to_cart_sessions_change: -previous[2],
                purchase_sessions_change: -previous[3],
            });
        }
    }
    for funnel in &new.funnels {
        let previous = before.get(&funnel.source).copied().unwrap_or_default();
        let current = counts(funnel);
        if previous != current {
            changes.push(FunnelChange {
                source: funnel.source,
                sessions_change: current[0] - previous[0],
                product_view_sessions_change: current[1] - previous[1],
                add_to_cart_sessions_change: current[2] - previous[2],
                purchase_sessions_change: current[3] - previous[3],
            });
        }
    }
    if changes.is_empty() && old.range == new.range {
        return None;
    }
    Some(delta::Change::Funnel(FunnelDelta {
        changes,
        range: new.range,
    }))
}
