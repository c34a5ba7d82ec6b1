//! A feed: one subscribed query, shared by all its subscribers, kept current
//! at a cost that grows with what changed.
//!
//! Each commit's `CommitDelta` tells the feed what changed.
//! - Additive metrics (event counts: sums of what commits add) apply it to
//!   the result they hold, in memory, and read Redis only to start or to
//!   resync. Their reads see each partition at one stored offset (a `MULTI`
//!   block per partition), and the feed keeps those offsets: a delta whose
//!   commit the read already held is skipped, a later one is added, one that
//!   does not follow (a rebuild, a partition the read did not know) makes
//!   the feed re-read. They also hold the buckets past the window's end that
//!   commits counted in (events may be up to the clock skew ahead), so a
//!   rolling window moves without a read.
//! - Other metrics say which part of their result a commit touches
//!   ([`Metric::touched`]): nothing (no read at all), some buckets (only
//!   those are re-read), or everything (unique users and rankings, which
//!   cannot be re-read in part). Re-reads take absolute values from the
//!   store, so a result is exact whatever the order deltas arrive in.
//!   Changes are coalesced: a feed reads at most once per
//!   `--feed-refresh-interval`, never twice at once, and every feed of the
//!   process shares `--feed-refresh-slots` concurrent reads on a connection
//!   of their own, so feeds never starve unary calls or ingest.
//!
//! A missed delta (the hub lagged, or a commit's delta never came) makes the
//! feed re-read everything.
//!
//! A feed keeps its latest deltas ([`History`], bounded by
//! `--subscription-history`, `-bytes` and `-age`), so a subscriber whose
//! stream was cut resumes with exactly the deltas it missed.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use futures_util::future::BoxFuture;
use prost::Message;
use rtap::v1::{CommitDelta, Delta, FeedActivity, delta, snapshot};
use tokio::{
    sync::{Mutex, Semaphore, broadcast},
    time::Instant,
};

use super::{
    metric::{Metric, Query, Refreshed, Touched},
    store_client::StoreClient,
    window::ResolvedWindow,
};
use crate::{
    error::Error,
    infra::time::duration_from_micros,
    store::{Granularity, read::Offsets},
};

/// How long a feed waits after a failed refresh before it tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// How often a feed may re-read, and how many may at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FeedSettings {
    /// Shortest time between two refreshes of one feed: changes within it
    /// are read together.
    pub(crate) refresh_interval: Duration,
    /// Refreshes of the process's feeds running at once.
    pub(crate) refresh_slots: usize,
    /// How far past now a commit may count events (the ingest's clock
    /// skew, plus a margin for clocks that differ between processes):
    /// additive feeds read the buckets up to there with their window.
    pub(crate) ahead: Duration,
    /// What each feed keeps of its past for resuming subscribers.
    pub(crate) history: HistoryLimits,
}

impl Drop for History {
    fn drop(&mut self) {
        self.total
            .fetch_sub(i64::try_from(self.bytes).unwrap_or(0), Ordering::Relaxed);
    }
}

/// How much of its past a feed keeps: whichever limit binds first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistoryLimits {
    /// Deltas.
    pub(crate) count: usize,
    /// Bytes of encoded deltas.
    pub(crate) bytes: usize,
    /// Age of a delta; also how long a feed runs on after its last
    /// subscriber left, so that one resuming finds it.
    pub(crate) age: Duration,
}

/// A feed's latest deltas, oldest first, versions consecutive.
struct History {
    kept: VecDeque<(Instant, usize, Arc<FeedUpdate>)>,
    bytes: usize,
    /// What every feed of the process keeps, in bytes.
    total: Arc<AtomicI64>,
}

impl History {
    fn new(total: Arc<AtomicI64>) -> Self {
        Self {
            kept: VecDeque::new(),
            bytes: 0,
            total,
        }
    }

    fn push(&mut self, update: Arc<FeedUpdate>, limits: &HistoryLimits) {
        let size = update.delta.encoded_len();
        self.kept.push_back((Instant::now(), size, update));
        self.bytes += size;
        self.total
            .fetch_add(i64::try_from(size).unwrap_or(0), Ordering::Relaxed);
        self.prune(limits);
    }

    fn prune(&mut self, limits: &HistoryLimits) {
        while let Some((at, size, _)) = self.kept.front() {
            let over = self.kept.len() > limits.count
                || self.bytes > limits.bytes
                || at.elapsed() > limits.age;
            if !over {
                break;
            }
            self.bytes -= size;
            self.total
                .fetch_sub(i64::try_from(*size).unwrap_or(0), Ordering::Relaxed);
            self.kept.pop_front();
        }
    }

    /// The deltas after `version` up to `current`, if all are still kept.
    fn after(
        &mut self,
        version: u64,
        current: u64,
        limits: &HistoryLimits,
    ) -> Option<Vec<Arc<FeedUpdate>>> {
        self.prune(limits);
        if version > current {
            return None;
        }
        if version == current {
            return Some(Vec::new());
        }
        let (_, _, oldest) = self.kept.front()?;
        (oldest.version <= version + 1).then(|| {
            self.kept
                .iter()
                .filter(|(_, _, update)| update.version > version)
                .map(|(_, _, update)| update.clone())
                .collect()
        })
    }
}

/// What a feed is woken by.
#[derive(Debug, Clone)]
pub(crate) enum Trigger {
    /// A commit landed (its delta).
    Commit(Arc<CommitDelta>),
    /// Deltas may have been missed: re-read everything.
    Resync,
}

/// The refresh budget of a process's feeds, and what they did with it.
pub(crate) struct Refreshes {
    settings: FeedSettings,
    slots: Semaphore,
    partial: AtomicI64,
    full: AtomicI64,
    skipped: AtomicI64,
    read_micros: AtomicI64,
    waiting: AtomicI64,
    failed: AtomicI64,
    applied: AtomicI64,
    /// Times the hub told every feed to re-read.
    pub(crate) resyncs: AtomicI64,
    /// Bytes the feeds' histories keep.
    history_bytes: Arc<AtomicI64>,
}

impl Refreshes {
    pub(crate) fn new(settings: FeedSettings) -> Self {
        Self {
            settings,
            slots: Semaphore::new(settings.refresh_slots.max(1)),
            partial: AtomicI64::new(0),
            full: AtomicI64::new(0),
            skipped: AtomicI64::new(0),
            read_micros: AtomicI64::new(0),
            waiting: AtomicI64::new(0),
            failed: AtomicI64::new(0),
            applied: AtomicI64::new(0),
            resyncs: AtomicI64::new(0),
            history_bytes: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Waits for a refresh slot. Taken after the feed's state lock, never
    /// before: a task holding a slot never waits for a lock.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let slot = self.slots.acquire().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        slot.map_err(|_| Error::Internal("the feed refresh slots are closed".into()))
    }

    /// Counts one refresh that read for `read`.
    fn count(&self, whole: bool, read: Duration) {
        let micros = i64::try_from(read.as_micros()).unwrap_or(i64::MAX);
        self.read_micros.fetch_add(micros, Ordering::Relaxed);
        let count = if whole { &self.full } else { &self.partial };
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far; `max_behind` comes from the feeds.
    pub(crate) fn activity(&self, max_behind: Duration) -> FeedActivity {
        let partial = self.partial.load(Ordering::Relaxed);
        let full = self.full.load(Ordering::Relaxed);
        let read_micros = self.read_micros.load(Ordering::Relaxed);
        FeedActivity {
            partial_refreshes: partial,
            full_refreshes: full,
            skipped_deltas: self.skipped.load(Ordering::Relaxed),
            mean_refresh_latency: Some(duration_from_micros(
                read_micros.checked_div(partial + full).unwrap_or(0),
            )),
            max_behind: Some(prost_types::Duration {
                seconds: i64::try_from(max_behind.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(max_behind.subsec_nanos()).unwrap_or(0),
            }),
            refresh_slots: i32::try_from(self.settings.refresh_slots).unwrap_or(i32::MAX),
            waiting_feeds: self.waiting.load(Ordering::Relaxed),
            failed_refreshes: self.failed.load(Ordering::Relaxed),
            applied_deltas: self.applied.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            history_bytes: self.history_bytes.load(Ordering::Relaxed),
        }
    }
}

/// One subscribed query, shared by its subscribers.
pub(crate) struct Feed<M: Metric> {
    query: Query<M>,
    state: Mutex<FeedState<M>>,
    updates: broadcast::Sender<Arc<FeedUpdate>>,
    /// When the oldest change not yet read was seen (ms since the feed
    /// started; -1 when the feed is current).
    behind_since_ms: AtomicI64,
    started: Instant,
    /// The process's refresh budget, which first reads share too.
    refreshes: Arc<Refreshes>,
    /// This instance, in resume tokens.
    id: u64,
}

struct FeedState<M: Metric> {
    version: u64,
    current: Option<Held<M>>,
    history: History,
    limits: HistoryLimits,
}

impl<M: Metric> FeedState<M> {
    /// Numbers `change`, keeps it and sends it to the feed's subscribers.
    fn publish(&mut self, updates: &broadcast::Sender<Arc<FeedUpdate>>, change: delta::Change) {
        self.version += 1;
        let update = Arc::new(FeedUpdate {
            version: self.version,
            delta: Delta {
                change: Some(change),
            },
        });
        if self.limits.count > 0 {
            self.history.push(update.clone(), &self.limits);
        }
        let _ = updates.send(update);
    }
}

/// A feed's result, and what it needs to keep it current.
struct Held<M: Metric> {
    window: ResolvedWindow,
    result: M::Response,
    /// Additive metrics: buckets past the window's end.
    ahead: M::Ahead,
    /// Additive metrics: the stored offsets the result is exact at; `None`
    /// when unknown (every commit then makes the feed re-read).
    as_of: Option<Offsets>,
}

/// Where a commit stands against the offsets a result is exact at.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    /// The result holds it already.
    Held,
    /// It comes after what the result holds (commits in between that this
    /// feed did not see concerned other feeds: the hub tells every feed of a
    /// delta missed).
    After,
    /// It does not follow: a rebuild started the partition over, or the
    /// read did not know the partition.
    Unknown,
}

/// Where `delta` stands against `as_of`, which moves past it if it comes
/// after.
fn standing(as_of: &mut Offsets, delta: &CommitDelta) -> Standing {
    let known = as_of.get(&delta.partition).copied().flatten();
    let standing = match (known, delta.previous_next_offset) {
        // The partition's first commit, after a read that found none.
        (None, None) => Standing::After,
        (Some(at), Some(_)) if delta.next_offset <= at => Standing::Held,
        (Some(at), Some(previous)) if previous >= at => Standing::After,
        _ => Standing::Unknown,
    };
    if standing == Standing::After {
        as_of.insert(delta.partition, Some(delta.next_offset));
    }
    standing
}

/// What a commit did to an additive feed.
enum Applied {
    /// Changed its result (and the change went out).
    Changed,
    /// Changed nothing it shows, or was held already.
    Nothing,
    /// It cannot tell: re-read everything.
    Reread,
}

/// A delta of a feed's result, numbered.
pub(crate) struct FeedUpdate {
    pub(crate) version: u64,
    pub(crate) delta: Delta,
}

/// A feed's current result and version, with a receiver of every later
/// delta.
pub(crate) type FeedSnapshot = (u64, snapshot::Result, broadcast::Receiver<Arc<FeedUpdate>>);

/// The deltas a resuming subscriber missed, with a receiver of every later
/// one.
pub(crate) type FeedReplay = (Vec<Arc<FeedUpdate>>, broadcast::Receiver<Arc<FeedUpdate>>);

/// What the hub and streams need of a feed, whatever its metric.
pub(crate) trait SharedFeed: Send + Sync {
    /// The current result, computing it if needed; the receiver is taken
    /// under the same lock, so no delta is missed or repeated.
    fn snapshot<'a>(&'a self, store: &'a StoreClient)
    -> BoxFuture<'a, Result<FeedSnapshot, Error>>;

    /// How long its oldest unread change has waited; zero when current.
    fn behind(&self) -> Duration;

    /// This feed instance (a feed started again numbers its deltas anew).
    fn id(&self) -> u64;

    /// The deltas after `version`, if the feed still keeps them all; the
    /// receiver is taken under the same lock, so none is missed or
    /// repeated.
    fn resume(&self, version: u64) -> BoxFuture<'_, Option<FeedReplay>>;

    /// How long a feed keeps its past, and runs on after its last
    /// subscriber.
    fn history_age(&self) -> Duration;
}

impl<M: Metric> SharedFeed for Feed<M> {
    fn snapshot<'a>(
        &'a self,
        store: &'a StoreClient,
    ) -> BoxFuture<'a, Result<FeedSnapshot, Error>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let result = match &state.current {
                Some(held) => held.result.clone(),
                None => {
                    // A burst of new subscriptions queues for the refresh
                    // slots rather than flooding Redis.
                    let _slot = self.refreshes.slot().await?;
                    let held = self.read(store).await?;
                    let result = held.result.clone();
                    state.current = Some(held);
                    result
                }
            };
            Ok((state.version, M::snapshot(result), self.updates.subscribe()))
        })
    }

    fn id(&self) -> u64 {
        self.id
    }

    fn resume(&self, version: u64) -> BoxFuture<'_, Option<FeedReplay>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let FeedState {
                version: current,
                history,
                limits,
                ..
            } = &mut *state;
            let missed = history.after(version, *current, limits)?;
            Some((missed, self.updates.subscribe()))
        })
    }

    fn history_age(&self) -> Duration {
        self.refreshes.settings.history.age
    }

    fn behind(&self) -> Duration {
        let since = self.behind_since_ms.load(Ordering::Relaxed);
        let now = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        if since < 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(u64::try_from(now - since).unwrap_or(0))
        }
    }
}

impl<M: Metric> Feed<M> {
    /// A feed of `query`, publishing on a channel of `queue` updates, reading
    /// within `refreshes`.
    pub(crate) fn new(query: Query<M>, queue: usize, refreshes: Arc<Refreshes>) -> Self {
        let (updates, _) = broadcast::channel(queue);
        Self {
            query,
            state: Mutex::new(FeedState {
                version: 0,
                current: None,
                history: History::new(refreshes.history_bytes.clone()),
                limits: refreshes.settings.history,
            }),
            id: rand::random(),
            updates,
            behind_since_ms: AtomicI64::new(-1),
            started: Instant::now(),
            refreshes,
        }
    }

    /// The product whose commits alone concern it, if any.
    pub(crate) fn product_interest(&self) -> Option<i64> {
        self.query.product_interest()
    }

    pub(crate) fn is_rolling(&self) -> bool {
        self.query.is_rolling()
    }

    /// Whether a subscriber still reads it (or is about to).
    pub(crate) fn is_subscribed(self: &Arc<Self>) -> bool {
        self.updates.receiver_count() > 0 || Arc::strong_count(self) > 1
    }

    /// Reads the whole result (and, for an additive metric, the buckets
    /// ahead of the window and the offsets it is exact at).
    async fn read(&self, store: &StoreClient) -> Result<Held<M>, Error> {
        let now = Utc::now();
        let window = self.query.window(now, &store.retention, "")?;
        let until = if M::ADDITIVE {
            let step = window.granularity.seconds();
            let ahead = i64::try_from(self.refreshes.settings.ahead.as_secs()).unwrap_or(0);
            window.granularity.bucket_start(now.timestamp() + ahead) + step
        } else {
            window.end
        };
        let (result, ahead, as_of) = store.feed_read(&self.query, window, until).await?;
        Ok(Held {
            window,
            result,
            ahead,
            as_of: as_of.filter(|_| M::ADDITIVE),
        })
    }

    /// Applies a commit to an additive feed's held result, in memory.
    async fn apply(&self, delta: &CommitDelta) -> Applied {
        let mut state = self.state.lock().await;
        let Some(held) = state.current.as_mut() else {
            // The first read, still to come, holds it: the commit came first.
            return Applied::Nothing;
        };
        let Some(as_of) = held.as_of.as_mut() else {
            return Applied::Reread;
        };
        match standing(as_of, delta) {
            Standing::Held => return Applied::Nothing,
            Standing::Unknown => return Applied::Reread,
            Standing::After => {}
        }
        // Events later than the read could see must not have been counted
        // before it: an ingest allowing more clock skew than this server
        // expects could have.
        let ahead = i64::try_from(self.refreshes.settings.ahead.as_secs()).unwrap_or(0);
        let latest = Utc::now().timestamp() + ahead;
        if delta
            .minutes
            .iter()
            .any(|m| m.minute_start.is_some_and(|t| t.seconds > latest))
        {
            return Applied::Reread;
        }
        let request = self.query.request();
        let applied = M::apply(
            request,
            &held.window,
            (&mut held.result, &mut held.ahead),
            delta,
        );
        match applied {
            Ok(Some(change)) => {
                state.publish(&self.updates, change);
                Applied::Changed
            }
            Ok(None) => Applied::Nothing,
            Err(_) => Applied::Reread,
        }
    }

    /// What a rolling window's move at a bucket boundary leaves to read:
    /// an additive feed moves in memory (everything if it cannot), others
    /// read the buckets the window gained.
    async fn moved(&self, store: &StoreClient) -> Touched {
        if !M::ADDITIVE {
            Touched::Buckets(BTreeSet::new())
        } else if self.roll(store).await {
            Touched::Nothing
        } else {
            Touched::Everything
        }
    }

    /// Moves an additive feed's rolling window to now, in memory; `false`
    /// if it must re-read.
    async fn roll(&self, store: &StoreClient) -> bool {
        let mut state = self.state.lock().await;
        let Some(held) = state.current.as_mut() else {
            return true;
        };
        let Ok(window) = self.query.window(Utc::now(), &store.retention, "") else {
            return false;
        };
        let rolled = M::roll(
            self.query.request(),
            (held.window, window),
            (&mut held.result, &mut held.ahead),
        );
        match rolled {
            Ok(change) => {
                held.window = window;
                if let Some(change) = change {
                    state.publish(&self.updates, change);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// What a trigger changed in the held result.
    async fn touched_by(&self, trigger: &Trigger) -> Touched {
        let window = self
            .state
            .lock()
            .await
            .current
            .as_ref()
            .map(|held| held.window);
        match (trigger, window) {
            (Trigger::Commit(delta), Some(window)) => self.query.touched(&window, delta),
            _ => Touched::Everything,
        }
    }

    /// Notes that `touched` waits to be read.
    fn mark(&self, dirty: &mut Touched, touched: Touched) {
        if dirty.is_nothing() && !touched.is_nothing() {
            let now = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
            self.behind_since_ms.store(now, Ordering::Relaxed);
        }
        dirty.merge(touched);
    }

    /// Re-reads what `touched` names (everything if the window moved);
    /// publishes the change if there is one.
    async fn refresh(&self, store: &StoreClient, touched: Touched) -> Result<(), Error> {
        let mut state = self.state.lock().await;
        let _slot = self.refreshes.slot().await?;
        let reading = Instant::now();
        let refreshed = match (&mut state.current, touched) {
            (Some(held), Touched::Buckets(buckets)) if !M::ADDITIVE => {
                let window = self.query.window(Utc::now(), &store.retention, "")?;
                let refreshed = store
                    .feed_refresh(
                        &self.query,
                        (held.window, window),
                        &mut held.result,
                        &buckets,
                    )
                    .await?;
                held.window = window;
                refreshed
            }
            (Some(held), _) => {
                let fresh = self.read(store).await?;
                let change = M::diff(&held.result, &fresh.result);
                *held = fresh;
                Refreshed {
                    change,
                    whole: true,
                }
            }
            (None, _) => {
                state.current = Some(self.read(store).await?);
                Refreshed {
                    change: None,
                    whole: true,
                }
            }
        };
        self.refreshes.count(refreshed.whole, reading.elapsed());
        if let Some(change) = refreshed.change {
            state.publish(&self.updates, change);
        }
        Ok(())
    }
}

/// A feed's loop, until no subscriber is left or `shutdown`: collects what
/// commits and bucket boundaries changed, and re-reads it at most once per
/// refresh interval, in one of the shared refresh slots.
pub(crate) async fn run_feed<M: Metric>(
    feed: Arc<Feed<M>>,
    store: StoreClient,
    mut triggers: broadcast::Receiver<Trigger>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let refreshes = feed.refreshes.clone();
    let mut idle = tokio::time::interval(Duration::from_secs(1));
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rolling = feed.is_rolling();
    let mut dirty = Touched::Nothing;
    let mut not_before = Instant::now();
    // Kept across iterations: a sleep made afresh each time something else
    // woke the loop would skip a boundary that passed a moment before.
    let mut boundary = Instant::now() + next_boundary(rolling);
    loop {
        let due = (!dirty.is_nothing()).then_some(not_before);
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = idle.tick() => if !feed.is_subscribed() { break },
            () = tokio::time::sleep_until(boundary) => {
                boundary = Instant::now() + next_boundary(rolling);
                if rolling {
                    let moved = feed.moved(&store).await;
                    feed.mark(&mut dirty, moved);
                }
            }
            trigger = triggers.recv() => match trigger {
                Ok(Trigger::Commit(delta)) if M::ADDITIVE => match feed.apply(&delta).await {
                    Applied::Changed => {
                        refreshes.applied.fetch_add(1, Ordering::Relaxed);
                    }
                    Applied::Nothing => {
                        refreshes.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    Applied::Reread => feed.mark(&mut dirty, Touched::Everything),
                },
                Ok(trigger) => {
                    let touched = feed.touched_by(&trigger).await;
                    if touched.is_nothing() {
                        refreshes.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    feed.mark(&mut dirty, touched);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    feed.mark(&mut dirty, Touched::Everything);
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            () = tokio::time::sleep_until(due.unwrap_or(not_before)), if due.is_some() => {
                let work = std::mem::take(&mut dirty);
                let started = Instant::now();
                not_before = started + refreshes.settings.refresh_interval;
                let refreshed = tokio::select! {
                    () = shutdown.cancelled() => break,
                    refreshed = feed.refresh(&store, work) => refreshed,
                };
                match refreshed {
                    Ok(()) => {}
                    Err(error) => {
                        tracing::debug!(error = %error, "feed refresh failed; retrying");
                        refreshes.failed.fetch_add(1, Ordering::Relaxed);
                        feed.mark(&mut dirty, Touched::Everything);
                        not_before = Instant::now() + RETRY_AFTER_FAILURE;
                    }
                }
                if dirty.is_nothing() {
                    feed.behind_since_ms.store(-1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// How long until a rolling window may move: the next minute boundary (every
/// bucket boundary is one); a refresh that finds no change sends nothing.
/// Fixed windows never move.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(partition: i32, previous: Option<i64>, next_offset: i64) -> CommitDelta {
        CommitDelta {
            partition,
            next_offset,
            previous_next_offset: previous,
            ..CommitDelta::default()
        }
    }

    #[test]
    fn a_commit_the_read_held_is_skipped_and_a_later_one_moves_the_offsets() {
        let mut as_of = Offsets::from([(0, Some(100)), (1, Some(50))]);
        assert_eq!(
            standing(&mut as_of, &commit(0, Some(90), 100)),
            Standing::Held
        );
        assert_eq!(
            standing(&mut as_of, &commit(0, Some(100), 120)),
            Standing::After
        );
        // Commits of partition 0 between 120 and 130 concerned other feeds.
        assert_eq!(
            standing(&mut as_of, &commit(0, Some(130), 140)),
            Standing::After
        );
        assert_eq!(as_of, Offsets::from([(0, Some(140)), (1, Some(50))]));
    }

    #[test]
    fn a_commit_that_does_not_follow_the_read_makes_the_feed_reread() {
        // A rebuild starts the partition over: no previous offset.
        let mut as_of = Offsets::from([(0, Some(100))]);
        assert_eq!(
            standing(&mut as_of, &commit(0, None, 20)),
            Standing::Unknown
        );
        // Straddles the offset read.
        assert_eq!(
            standing(&mut as_of, &commit(0, Some(90), 110)),
            Standing::Unknown
        );
        // A partition the read did not know, past its first commit.
        assert_eq!(
            standing(&mut as_of, &commit(3, Some(10), 20)),
            Standing::Unknown
        );
        assert_eq!(as_of, Offsets::from([(0, Some(100))]));
    }

    #[test]
    fn the_first_commit_of_a_partition_the_read_found_empty_follows_it() {
        let mut as_of = Offsets::from([(0, None)]);
        assert_eq!(standing(&mut as_of, &commit(0, None, 7)), Standing::After);
        assert_eq!(standing(&mut as_of, &commit(2, None, 3)), Standing::After);
        assert_eq!(as_of, Offsets::from([(0, Some(7)), (2, Some(3))]));
    }

    fn update(version: u64) -> Arc<FeedUpdate> {
        Arc::new(FeedUpdate {
            version,
            delta: Delta {
                change: Some(delta::Change::EventCounts(rtap::v1::EventCountsDelta {
                    removed_bucket_start_times: vec![prost_types::Timestamp {
                        seconds: 60,
                        nanos: 0,
                    }],
                    ..Default::default()
                })),
            },
        })
    }

    #[test]
    fn a_history_replays_only_what_it_still_holds_and_accounts_its_bytes() {
        let total = Arc::new(AtomicI64::new(0));
        let limits = HistoryLimits {
            count: 3,
            bytes: usize::MAX,
            age: Duration::from_secs(60),
        };
        let mut history = History::new(total.clone());
        for version in 1..=5 {
            history.push(update(version), &limits);
        }
        let versions = |kept: Option<Vec<Arc<FeedUpdate>>>| {
            kept.map(|kept| kept.iter().map(|u| u.version).collect::<Vec<_>>())
        };
        assert_eq!(versions(history.after(2, 5, &limits)), Some(vec![3, 4, 5]));
        assert_eq!(versions(history.after(4, 5, &limits)), Some(vec![5]));
        assert_eq!(versions(history.after(5, 5, &limits)), Some(vec![]));
        assert_eq!(versions(history.after(1, 5, &limits)), None, "2 is gone");
        assert_eq!(
            versions(history.after(6, 5, &limits)),
            None,
            "not issued yet"
        );
        let size = i64::try_from(update(1).delta.encoded_len()).unwrap_or(0);
        assert!(size > 0);
        assert_eq!(total.load(Ordering::Relaxed), 3 * size);
        // A byte bound of two deltas keeps two.
        let tight = HistoryLimits {
            bytes: usize::try_from(2 * size).unwrap_or(0),
            ..limits
        };
        assert_eq!(versions(history.after(2, 5, &tight)), None);
        assert_eq!(versions(history.after(3, 5, &tight)), Some(vec![4, 5]));
        drop(history);
        assert_eq!(
            total.load(Ordering::Relaxed),
            0,
            "a dropped feed's history is no longer counted"
        );
    }
}
