//! A feed: one subscribed query, shared by all its subscribers, kept current
//! at a cost that grows with what changed.
//!
//! Each commit's `CommitDelta` tells the feed what changed; the metric says
//! which part of its result that touches ([`Metric::touched`]): nothing (no
//! read at all), some buckets (only those are re-read: a day of minutes
//! costs what one minute does), or everything (unique users and rankings,
//! which cannot be re-read in part). Re-reads take absolute values from the
//! store, so a result is exact whatever the order deltas arrive in: a bucket
//! re-read after its last change holds it. Changes are coalesced: a feed
//! reads at most once per `--feed-refresh-interval`, never twice at once,
//! and every feed of the process shares `--feed-refresh-slots` concurrent
//! reads on a connection of their own, so feeds never starve unary calls or
//! ingest. A missed delta (the hub lagged, or a commit's delta never came)
//! makes the feed re-read everything.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use futures_util::future::BoxFuture;
use rtap::v1::{CommitDelta, Delta, FeedActivity, snapshot};
use tokio::{
    sync::{Mutex, Semaphore, broadcast},
    time::Instant,
};

use super::{
    metric::{Metric, Query, Refreshed, Touched},
    store_client::StoreClient,
    window::ResolvedWindow,
};
use crate::{error::Error, infra::time::duration_from_micros, store::Granularity};

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
        }
    }
}

/// One subscribed query, shared by its subscribers.
pub(crate) struct Feed<M: Metric> {
    query: Query<M>,
    state: Mutex<FeedState<M::Response>>,
    updates: broadcast::Sender<Arc<FeedUpdate>>,
    /// When the oldest change not yet read was seen (ms since the feed
    /// started; -1 when the feed is current).
    behind_since_ms: AtomicI64,
    started: Instant,
    /// The process's refresh budget, which first reads share too.
    refreshes: Arc<Refreshes>,
}

struct FeedState<R> {
    version: u64,
    current: Option<(ResolvedWindow, R)>,
}

/// A delta of a feed's result, numbered.
pub(crate) struct FeedUpdate {
    pub(crate) version: u64,
    pub(crate) delta: Delta,
}

/// A feed's current result and version, with a receiver of every later
/// delta.
pub(crate) type FeedSnapshot = (u64, snapshot::Result, broadcast::Receiver<Arc<FeedUpdate>>);

/// What the hub and streams need of a feed, whatever its metric.
pub(crate) trait SharedFeed: Send + Sync {
    /// The current result, computing it if needed; the receiver is taken
    /// under the same lock, so no delta is missed or repeated.
    fn snapshot<'a>(&'a self, store: &'a StoreClient)
    -> BoxFuture<'a, Result<FeedSnapshot, Error>>;

    /// How long its oldest unread change has waited; zero when current.
    fn behind(&self) -> Duration;
}

impl<M: Metric> SharedFeed for Feed<M> {
    fn snapshot<'a>(
        &'a self,
        store: &'a StoreClient,
    ) -> BoxFuture<'a, Result<FeedSnapshot, Error>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let result = match &state.current {
                Some((_, result)) => result.clone(),
                None => {
                    // A burst of new subscriptions queues for the refresh
                    // slots rather than flooding Redis.
                    let _slot = self.refreshes.slot().await?;
                    let window = self.query.window(Utc::now(), &store.retention, "")?;
                    let result = store.feed_run(&self.query, window).await?;
                    state.current = Some((window, result.clone()));
                    result
                }
            };
            Ok((state.version, M::snapshot(result), self.updates.subscribe()))
        })
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
            }),
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

    /// What a trigger changed in the held result.
    async fn touched_by(&self, trigger: &Trigger) -> Touched {
        let window = self.state.lock().await.current.as_ref().map(|(w, _)| *w);
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
        let window = self.query.window(Utc::now(), &store.retention, "")?;
        let refreshed = match (&mut state.current, touched) {
            (Some((held_window, held)), Touched::Buckets(buckets)) => {
                let refreshed = store
                    .feed_refresh(&self.query, (*held_window, window), held, &buckets)
                    .await?;
                *held_window = window;
                refreshed
            }
            (Some((held_window, held)), _) => {
                let fresh = store.feed_run(&self.query, window).await?;
                let change = M::diff(held, &fresh);
                (*held_window, *held) = (window, fresh);
                Refreshed {
                    change,
                    whole: true,
                }
            }
            (None, _) => {
                let fresh = store.feed_run(&self.query, window).await?;
                state.current = Some((window, fresh));
                Refreshed {
                    change: None,
                    whole: true,
                }
            }
        };
        self.refreshes.count(refreshed.whole, reading.elapsed());
        if let Some(change) = refreshed.change {
            state.version += 1;
            let _ = self.updates.send(Arc::new(FeedUpdate {
                version: state.version,
                delta: Delta {
                    change: Some(change),
                },
            }));
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
    loop {
        let due = (!dirty.is_nothing()).then_some(not_before);
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = idle.tick() => if !feed.is_subscribed() { break },
            () = tokio::time::sleep(next_boundary(rolling)) => {
                if rolling {
                    // Nothing changed in place; the window may have moved.
                    feed.mark(&mut dirty, Touched::Buckets(BTreeSet::new()));
                }
            }
            trigger = triggers.recv() => match trigger {
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
