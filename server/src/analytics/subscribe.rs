//! Subscriptions: a snapshot of a query's result, then deltas as ingest
//! commits change it, heartbeats while nothing does.
//!
//! - The [`Hub`] (one per process) listens to the `CommitDelta`s every
//!   ingest process publishes on Redis, so a replica's subscribers see events
//!   ingested anywhere, and keeps the latest watermark.
//! - A feed per distinct query (shared by all its subscribers, see
//!   [`super::feed`]) re-reads what commits changed in its result and
//!   publishes the difference as a versioned delta. Deltas are differences
//!   of exact results, so a snapshot plus the deltas after it always equals
//!   the unary query.
//! - Each stream reads its feed's broadcast channel (bounded, shared): a
//!   subscriber that falls more than [`FEED_QUEUE`] deltas behind gets a fresh
//!   snapshot marked `resync`. No task per stream: a stream is a state
//!   machine polled by its connection, so a slow client holds only its place
//!   in the channel and never delays others or ingest.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    pin::Pin,
    sync::{
        Arc, Mutex as StdMutex, Weak,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use futures_util::Stream;
use prost::Message;
use rtap::v1::{
    CommitDelta, FeedActivity, Heartbeat, PartitionOffset, ResyncReason, Snapshot,
    SubscribeResponse, Watermark, snapshot, subscribe_response,
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{
    feed::{Feed, FeedSettings, FeedUpdate, Refreshes, SharedFeed, Trigger, run_feed},
    metric::{Metric, Query},
    resume::{self, Position, QueryId, Tokens, Verdict},
    store_client::StoreClient,
};
use crate::{
    error::Error,
    infra::time::timestamp_from_seconds,
    retry::{Backoff, RECONNECT_MAX},
    store::delta_channel::{DeltaListener, Heard},
};

/// Deltas a feed keeps for slow subscribers before they must resync.
pub(crate) const FEED_QUEUE: usize = 64;
/// Commit notifications the hub buffers for its feeds.
const HUB_QUEUE: usize = 1024;
/// How often the hub compares the stored offsets with the deltas it saw.
const STORED_OFFSETS_CHECK: Duration = Duration::from_secs(1);
/// How long a stored offset may stay unseen before its delta counts as
/// lost: deltas of a busy ingest can trail their commit by a second or
/// more, and a false alarm makes every feed re-read.
const LOST_DELTA_GRACE: Duration = Duration::from_secs(4);
/// Commit notifications buffered for the feeds of one product (a feed that
/// falls further behind re-reads everything).
const PRODUCT_QUEUE: usize = 64;

/// Live counts of this process's subscriptions, for operators and leak
/// tests.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    /// Open subscription streams.
    pub(crate) streams: AtomicI64,
    /// Running feeds.
    pub(crate) feeds: AtomicI64,
    /// Deltas sent to subscribers.
    deltas_sent: AtomicI64,
    /// Resync snapshots sent to subscribers that fell behind.
    slow_resyncs: AtomicI64,
}

impl Gauges {
    /// Copies the subscription figures of `hub` into the Prometheus
    /// metrics, every second until `shutdown`: the streams' path only
    /// counts into the hub's atomics.
    async fn export(hub: Weak<Hub>, shutdown: CancellationToken) {
        use crate::telemetry::{
            DELTAS_SENT, FEED_DELTAS_APPLIED, FEED_HISTORY_BYTES, FEED_MAX_BEHIND, FEED_REFRESHES,
            FEED_RESYNCS, FEED_WAITING, FEEDS, SUBSCRIBER_RESYNCS, SUBSCRIPTIONS_OPEN,
        };
        use metrics::{counter, gauge};
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let mut ticker = tokio::time::interval(EXPORT_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let Some(hub) = hub.upgrade() else { return };
            let gauges = &hub.gauges;
            gauge!(SUBSCRIPTIONS_OPEN).set(gauges.streams.load(Ordering::Relaxed) as f64);
            gauge!(FEEDS).set(gauges.feeds.load(Ordering::Relaxed) as f64);
            counter!(DELTAS_SENT).absolute(count(gauges.deltas_sent.load(Ordering::Relaxed)));
            counter!(SUBSCRIBER_RESYNCS, "reason" => "client_too_slow")
                .absolute(count(gauges.slow_resyncs.load(Ordering::Relaxed)));
            let activity = hub.feed_activity();
            for (kind, refreshes) in [
                ("partial", activity.partial_refreshes),
                ("full", activity.full_refreshes),
                ("failed", activity.failed_refreshes),
            ] {
                counter!(FEED_REFRESHES, "kind" => kind).absolute(count(refreshes));
            }
            counter!(FEED_DELTAS_APPLIED).absolute(count(activity.applied_deltas));
            counter!(FEED_RESYNCS).absolute(count(activity.resyncs));
            gauge!(FEED_WAITING).set(activity.waiting_feeds as f64);
            gauge!(FEED_HISTORY_BYTES).set(activity.history_bytes as f64);
            let behind = activity.max_behind.unwrap_or_default();
            gauge!(FEED_MAX_BEHIND).set(behind.seconds as f64 + f64::from(behind.nanos) / 1e9);
        }
    }
}

/// How often the hub's figures are copied into the Prometheus metrics.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// An open subscription: its messages, until the server shuts down.
pub(crate) type Subscription =
    Pin<Box<dyn Stream<Item = Result<SubscribeResponse, tonic::Status>> + Send>>;

/// The process's fan-out point.
pub(crate) struct Hub {
    store: StoreClient,
    /// Every commit, for feeds any commit may concern.
    triggers: broadcast::Sender<Trigger>,
    /// The commits that mention a product, for feeds of that product only:
    /// a commit wakes the few feeds it concerns, not every feed.
    by_product: StdMutex<HashMap<i64, broadcast::Sender<Trigger>>>,
    watermark: watch::Sender<Watermark>,
    /// Running feeds by their query's canonical key.
    feeds: StdMutex<HashMap<String, Weak<dyn SharedFeed>>>,
    refreshes: Arc<Refreshes>,
    gauges: Arc<Gauges>,
    /// Issues and reads resume tokens.
    tokens: Arc<Tokens>,
    shutdown: CancellationToken,
}

impl Hub {
    /// Starts listening to `store`'s delta channel until `shutdown`.
    pub(crate) fn start(
        store: StoreClient,
        settings: FeedSettings,
        tokens: Tokens,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (triggers, _) = broadcast::channel(HUB_QUEUE);
        let hub = Arc::new(Self {
            store,
            triggers,
            by_product: StdMutex::new(HashMap::new()),
            watermark: watch::Sender::new(Watermark::default()),
            feeds: StdMutex::new(HashMap::new()),
            refreshes: Arc::new(Refreshes::new(settings)),
            gauges: Arc::new(Gauges::default()),
            tokens: Arc::new(tokens),
            shutdown,
        });
        tokio::spawn(listen(Arc::downgrade(&hub), hub.shutdown.clone()));
        tokio::spawn(Gauges::export(Arc::downgrade(&hub), hub.shutdown.clone()));
        hub
    }

    /// The subscription gauges.
    pub(crate) fn gauges(&self) -> &Gauges {
        &self.gauges
    }

    /// The metric store.
    pub(crate) fn store(&self) -> &StoreClient {
        &self.store
    }

    /// Opens a subscription to `request` of metric `M`: checks it (field
    /// names under `M::NAME`), then the first message is a snapshot.
    ///
    /// With a `resume_token` (empty: none), the stream continues where the
    /// token's stream stopped: the deltas missed, sequence numbers going on,
    /// or a snapshot marked `resync` with the reason it could not.
    pub(crate) async fn open<M: Metric>(
        self: &Arc<Self>,
        request: M::Request,
        heartbeat: Duration,
        resume_token: &[u8],
    ) -> Result<Subscription, Error> {
        let prefix = format!("{}.", M::NAME);
        let query = Query::<M>::new(request, &prefix)?;
        // Reject an invalid window now rather than in the stream.
        query.window(Utc::now(), &self.store.retention, &prefix)?;
        let query_id = resume::query_id(&query.canonical_key());
        let verdict = if resume_token.is_empty() {
            None
        } else {
            Some(self.tokens.read(resume_token, &query_id)?)
        };
        let feed = self.feed(query);
        let (start, sequence) = match verdict {
            None => (Start::Snapshot(ResyncReason::Unspecified), 0),
            Some(Verdict::Resume(position)) if position.feed == feed.id() => {
                (Start::Replay(position.version), position.sequence)
            }
            // The feed was started again since: its past is gone.
            Some(Verdict::Resume(position)) => (
                Start::Snapshot(ResyncReason::HistoryExpired),
                position.sequence,
            ),
            Some(Verdict::Resync { reason, sequence }) => (Start::Snapshot(reason), sequence),
        };
        // Replaced when the stream starts.
        let (_, updates) = broadcast::channel(1);
        let stream = SubscriptionState {
            feed,
            store: self.store.clone(),
            version: 0,
            updates,
            start: Some(start),
            replay: VecDeque::new(),
            sequence,
            heartbeat,
            watermark: self.watermark.subscribe(),
            tokens: self.tokens.clone(),
            query_id,
            shutdown: self.shutdown.clone(),
            ended: false,
            open: StreamGuard::new(self.gauges.clone()),
        };
        Ok(Box::pin(futures_util::stream::unfold(stream, next_message)))
    }

    /// The feed of `query`, started if none runs.
    fn feed<M: Metric>(self: &Arc<Self>, query: Query<M>) -> Arc<dyn SharedFeed> {
        let key = query.canonical_key();
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(feed) = feeds.get(&key).and_then(Weak::upgrade) {
            return feed;
        }
        let feed = Arc::new(Feed::new(query, FEED_QUEUE, self.refreshes.clone()));
        let shared: Arc<dyn SharedFeed> = feed.clone();
        feeds.insert(key.clone(), Arc::downgrade(&shared));
        feeds.retain(|_, feed| feed.strong_count() > 0);
        drop(feeds);
        self.gauges.feeds.fetch_add(1, Ordering::Relaxed);
        let hub = self.clone();
        let triggers = match feed.product_interest() {
            Some(product) => self
                .by_product
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(product)
                .or_insert_with(|| broadcast::channel(PRODUCT_QUEUE).0)
                .subscribe(),
            None => self.triggers.subscribe(),
        };
        tokio::spawn(async move {
            run_feed(feed, hub.store.clone(), triggers, hub.shutdown.clone()).await;
            hub.forget(&key);
            hub.gauges.feeds.fetch_sub(1, Ordering::Relaxed);
        });
        shared
    }

    /// What this process's feeds are doing.
    pub(crate) fn feed_activity(&self) -> FeedActivity {
        let behind = {
            let feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
            feeds
                .values()
                .filter_map(Weak::upgrade)
                .map(|feed| feed.behind())
                .max()
                .unwrap_or_default()
        };
        self.refreshes.activity(behind)
    }

    fn forget(&self, key: &str) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if feeds.get(key).is_some_and(|f| f.strong_count() == 0) {
            feeds.remove(key);
        }
        drop(feeds);
        self.by_product
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, sender| sender.receiver_count() > 0);
    }

    /// After deltas were missed: the watermark moves up to what the store
    /// holds (what they would have told), and every feed re-reads.
    fn resync_to(&self, stored: &Watermark) {
        self.watermark
            .send_modify(|watermark| merge(watermark, stored));
        self.trigger(Trigger::Resync);
    }

    /// Compares the stored offsets with the deltas seen: a partition whose
    /// stored offset has stayed unseen for `LOST_DELTA_GRACE` missed a
    /// delta that no later commit revealed (the last before a pause, or
    /// one published to a node that then failed): feeds re-read, and the
    /// offsets count as seen. `behind` carries, from one check to the
    /// next, each partition's oldest unseen stored offset and when it was
    /// first stored-but-unseen.
    async fn check_stored_offsets(&self, behind: &mut BTreeMap<i32, (i64, Instant)>) {
        let Ok(stored) = self.store.watermark().await else {
            return;
        };
        let seen = |partition: i32| {
            self.watermark
                .borrow()
                .offsets
                .iter()
                .find(|o| o.partition == partition)
                .map_or(-1, |o| o.next_offset)
        };
        let now = Instant::now();
        let missed = behind.iter().any(|(partition, (stored_then, since))| {
            seen(*partition) < *stored_then && now.duration_since(*since) >= LOST_DELTA_GRACE
        });
        if missed {
            tracing::debug!("a commit's delta never came; feeds re-read");
            self.resync_to(&stored);
        }
        behind.retain(|partition, (stored_then, _)| seen(*partition) < *stored_then);
        for offset in &stored.offsets {
            if offset.next_offset > seen(offset.partition) {
                behind
                    .entry(offset.partition)
                    .or_insert((offset.next_offset, now));
            }
        }
    }

    /// Takes in a published delta.
    fn heard(&self, payload: &[u8]) {
        match CommitDelta::decode(payload) {
            Ok(delta) => {
                self.store.partition_seen(delta.partition);
                let mut missed = false;
                self.watermark.send_modify(|w| missed = advance(w, &delta));
                self.trigger(Trigger::Commit(Arc::new(delta)));
                if missed {
                    tracing::debug!("a commit delta was missed; feeds re-read");
                    self.trigger(Trigger::Resync);
                }
            }
            Err(error) => tracing::warn!(error = %error, "undecodable commit delta ignored"),
        }
    }

    /// Passes `trigger` to every feed, or (a commit) to the feeds it may
    /// concern: those of any commit, and those of the products it mentions.
    fn trigger(&self, trigger: Trigger) {
        let by_product = self.by_product.lock().unwrap_or_else(|e| e.into_inner());
        match &trigger {
            Trigger::Resync => {
                // Deltas may have been missed, a new partition's first too.
                self.refreshes.resyncs.fetch_add(1, Ordering::Relaxed);
                self.store.forget_partitions();
                for sender in by_product.values() {
                    let _ = sender.send(trigger.clone());
                }
            }
            Trigger::Commit(delta) => {
                let mut products: Vec<i64> = delta
                    .minutes
                    .iter()
                    .flat_map(|m| {
                        m.counts
                            .iter()
                            .map(|c| c.product_id)
                            .chain(m.products_with_users.iter().copied())
                    })
                    .filter(|product| *product > 0)
                    .collect();
                products.sort_unstable();
                products.dedup();
                for product in products {
                    if let Some(sender) = by_product.get(&product) {
                        let _ = sender.send(trigger.clone());
                    }
                }
            }
        }
        drop(by_product);
        let _ = self.triggers.send(trigger);
    }
}

/// Receives every `CommitDelta` of the namespace and passes it on; on
/// (re)connection, reloads the watermark and tells feeds to recompute.
async fn listen(hub: Weak<Hub>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_MAX);
    loop {
        let Some(strong) = hub.upgrade() else { return };
        let nodes = strong.store.nodes.clone();
        let namespace = strong.store.namespace().to_owned();
        drop(strong);
        let mut listener = tokio::select! {
            () = shutdown.cancelled() => return,
            connected = DeltaListener::connect(&nodes, &namespace) => match connected {
                Ok(listener) => listener,
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
            hub.trigger(Trigger::Resync);
        }
        let mut checks = tokio::time::interval(STORED_OFFSETS_CHECK);
        let mut behind = BTreeMap::new();
        loop {
            // The listener's step lives across checks: dropped mid-way, it
            // would lose the subscriptions it was making to new partitions.
            let mut next = std::pin::pin!(listener.next());
            let heard = loop {
                // Deltas first: a check must not run while deltas wait unread.
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    heard = &mut next => break heard,
                    _ = checks.tick() => {
                        let Some(hub) = hub.upgrade() else { return };
                        hub.check_stored_offsets(&mut behind).await;
                    }
                }
            };
            let Some(hub) = hub.upgrade() else { return };
            match heard {
                Ok(Some(Heard::Delta(payload))) => hub.heard(&payload),
                Ok(Some(Heard::Gap)) => match hub.store.watermark().await {
                    Ok(stored) => hub.resync_to(&stored),
                    Err(_) => hub.trigger(Trigger::Resync),
                },
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(error = %error, "ingest delta channel failed");
                    break;
                }
            }
        }
        tracing::warn!("lost the ingest delta channel; reconnecting");
    }
}

/// Moves `watermark` past `delta`; true if a commit before it was missed:
/// it starts past the partition's last known offset, or it is not its
/// partition's first commit and the partition was unknown (the watermark
/// loaded at connection holds every partition committed before).
fn advance(watermark: &mut Watermark, delta: &CommitDelta) -> bool {
    let missed = match watermark
        .offsets
        .iter_mut()
        .find(|o| o.partition == delta.partition)
    {
        Some(offset) => {
            let missed = delta
                .previous_next_offset
                .is_some_and(|previous| previous > offset.next_offset);
            offset.next_offset = offset.next_offset.max(delta.next_offset);
            missed
        }
        None => {
            watermark.offsets.push(PartitionOffset {
                partition: delta.partition,
                next_offset: delta.next_offset,
            });
            watermark.offsets.sort_unstable_by_key(|o| o.partition);
            delta.previous_next_offset.is_some()
        }
    };
    let later = |t: &prost_types::Timestamp| (t.seconds, t.nanos);
    if let Some(time) = delta.watermark
        && watermark
            .latest_event_time
            .is_none_or(|current| later(&time) > later(&current))
    {
        watermark.latest_event_time = Some(time);
    }
    missed
}

/// Moves `watermark` up to `stored` (read from the store), partition by
/// partition: never back, as deltas heard meanwhile may be newer.
fn merge(watermark: &mut Watermark, stored: &Watermark) {
    for offset in &stored.offsets {
        advance(
            watermark,
            &CommitDelta {
                partition: offset.partition,
                next_offset: offset.next_offset,
                watermark: stored.latest_event_time,
                ..CommitDelta::default()
            },
        );
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
    feed: Arc<dyn SharedFeed>,
    store: StoreClient,
    /// The feed version the subscriber's result includes.
    version: u64,
    updates: broadcast::Receiver<Arc<FeedUpdate>>,
    /// How the stream begins, at its first poll.
    start: Option<Start>,
    /// Deltas a resumed stream missed, to send before the live ones.
    replay: VecDeque<Arc<FeedUpdate>>,
    sequence: u64,
    heartbeat: Duration,
    watermark: watch::Receiver<Watermark>,
    tokens: Arc<Tokens>,
    query_id: QueryId,
    shutdown: CancellationToken,
    /// After an error: the stream ends.
    ended: bool,
    /// Counts the stream open while it lives, and what it sends.
    open: StreamGuard,
}

impl SubscriptionState {
    fn message(&mut self, update: subscribe_response::Update) -> SubscribeResponse {
        self.sequence += 1;
        let position = Position {
            feed: self.feed.id(),
            version: self.version,
            sequence: self.sequence,
        };
        SubscribeResponse {
            sequence: self.sequence,
            update: Some(update),
            watermark: Some(self.watermark.borrow().clone()),
            resume_token: self.tokens.issue(&self.query_id, position),
        }
    }
}

impl Drop for SubscriptionState {
    /// The feed runs on, its past kept, for as long as that past lasts: a
    /// subscriber whose stream was cut finds it when it resumes.
    fn drop(&mut self) {
        let linger = self.feed.history_age();
        if linger.is_zero() || self.shutdown.is_cancelled() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (feed, shutdown) = (self.feed.clone(), self.shutdown.clone());
            runtime.spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(linger) => {}
                }
                drop(feed);
            });
        }
    }
}

fn snapshot_of(result: snapshot::Result, reason: ResyncReason) -> subscribe_response::Update {
    subscribe_response::Update::Snapshot(Snapshot {
        resync: reason != ResyncReason::Unspecified,
        result: Some(result),
        resync_reason: reason as i32,
    })
}

/// How a stream begins. Decided when it is opened, carried out at its
/// first poll: a stream waiting for its snapshot (a burst of new feeds
/// queues for the refresh slots) is a stream already, which the server's
/// `--request-timeout` does not cut.
enum Start {
    /// A snapshot, marked `resync` for this reason unless `Unspecified`.
    Snapshot(ResyncReason),
    /// The deltas after this version, from the feed's history, or a
    /// snapshot (`HistoryExpired`) when it no longer has them all.
    Replay(u64),
}

/// Carries `start` out: the first message, or `None` when deltas are
/// replayed.
async fn begin(
    state: &mut SubscriptionState,
    start: Start,
) -> Result<Option<SubscribeResponse>, Error> {
    let reason = match start {
        Start::Replay(version) => match state.feed.resume(version).await {
            Some((missed, updates)) => {
                state.version = version;
                state.updates = updates;
                state.replay = missed.into();
                return Ok(None);
            }
            None => ResyncReason::HistoryExpired,
        },
        Start::Snapshot(reason) => reason,
    };
    let (version, result, updates) = state.feed.snapshot(&state.store).await?;
    state.version = version;
    state.updates = updates;
    Ok(Some(state.message(snapshot_of(result, reason))))
}

/// The next message of a stream, or `None` when it ends.
async fn next_message(
    mut state: SubscriptionState,
) -> Option<(Result<SubscribeResponse, tonic::Status>, SubscriptionState)> {
    if state.ended {
        return None;
    }
    if let Some(start) = state.start.take() {
        let shutdown = state.shutdown.clone();
        let begun = tokio::select! {
            () = shutdown.cancelled() => return None,
            begun = begin(&mut state, start) => begun,
        };
        match begun {
            Ok(Some(message)) => return Some((Ok(message), state)),
            Ok(None) => {}
            Err(error) => {
                state.ended = true;
                return Some((Err(error.into()), state));
            }
        }
    }
    while let Some(update) = state.replay.pop_front() {
        if update.version > state.version {
            state.version = update.version;
            state.open.0.deltas_sent.fetch_add(1, Ordering::Relaxed);
            let message = state.message(subscribe_response::Update::Delta(update.delta.clone()));
            return Some((Ok(message), state));
        }
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
                state.open.0.deltas_sent.fetch_add(1, Ordering::Relaxed);
                subscribe_response::Update::Delta(update.delta.clone())
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                // Too far behind: start again from a fresh snapshot.
                match state.feed.snapshot(&state.store).await {
                    Ok((version, result, updates)) => {
                        state.version = version;
                        state.updates = updates;
                        state.open.0.slow_resyncs.fetch_add(1, Ordering::Relaxed);
                        snapshot_of(result, ResyncReason::ClientTooSlow)
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
        return Some((Ok(message), state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(partition: i32, previous: Option<i64>, next_offset: i64) -> CommitDelta {
        CommitDelta {
            partition,
            first_offset: previous.unwrap_or(0),
            next_offset,
            previous_next_offset: previous,
            ..CommitDelta::default()
        }
    }

    #[test]
    fn a_commit_that_starts_past_the_known_offset_reveals_a_missed_one() {
        let mut watermark = Watermark::default();
        assert!(
            !advance(&mut watermark, &commit(0, None, 10)),
            "a first commit"
        );
        assert!(
            !advance(&mut watermark, &commit(0, Some(10), 20)),
            "the next one"
        );
        assert!(
            advance(&mut watermark, &commit(0, Some(30), 40)),
            "20..30 missed"
        );
        // A late delta of a commit already passed is no gap.
        assert!(!advance(&mut watermark, &commit(0, Some(20), 30)));
        assert_eq!(watermark.offsets[0].next_offset, 40);
        // An unknown partition whose delta is not its first: one was missed.
        assert!(advance(&mut watermark, &commit(1, Some(5), 9)));
        // Deltas of ingest versions without the field are never gaps.
        assert!(!advance(&mut watermark, &commit(2, None, 3)));
        assert!(!advance(&mut watermark, &commit(2, None, 90)));
    }

    #[test]
    fn a_stored_watermark_moves_the_known_one_forward_only() {
        let time = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        let mut watermark = Watermark::default();
        advance(
            &mut watermark,
            &CommitDelta {
                watermark: Some(time(50)),
                ..commit(0, None, 30)
            },
        );
        let stored = Watermark {
            offsets: vec![
                PartitionOffset {
                    partition: 0,
                    next_offset: 20,
                },
                PartitionOffset {
                    partition: 1,
                    next_offset: 7,
                },
            ],
            latest_event_time: Some(time(40)),
        };
        merge(&mut watermark, &stored);
        let offsets: Vec<_> = watermark
            .offsets
            .iter()
            .map(|o| (o.partition, o.next_offset))
            .collect();
        assert_eq!(offsets, [(0, 30), (1, 7)]);
        assert_eq!(watermark.latest_event_time, Some(time(50)));
    }
}
