//! Folds a batch of valid, deduplicated events into the changes it makes to
//! the metric store, in memory, so a commit is a handful of Redis commands per
//! bucket rather than several per event. Pure logic: no Redis, no Kafka.
//!
//! Sessions. A session is a user's run of events with one `session_id` and no
//! gap longer than the session gap (in event time). It is counted in the
//! minute of its first event seen (its anchor), by the source of that event:
//! its count, funnel stages, events and length (latest minus earliest event
//! time) all accumulate in the anchor's buckets, so they stay additive. An
//! event further than the gap from a session's events starts a new session.

use std::{borrow::Cow, collections::BTreeMap};

// foldhash rather than std's SipHash, which took a tenth of the consumer's
// CPU. The keys are ids from events; foldhash's per-process random seed still
// keeps colliding keys from being crafted in advance.
use foldhash::{HashMap, HashSet};

use rtap::v1::{
    CommitDelta, CountChange, EventType, InteractionEvent, MinuteChange, SessionChange,
};

use crate::{
    infra::time::{
        duration_micros, timestamp_from_millis, timestamp_from_seconds, timestamp_millis,
    },
    store::{Bucket, Counter, FunnelStage, Granularity, Ranking, UserSet},
};

/// A session's key: user id and client session id.
pub(crate) type SessionKey = (i64, String);

/// The stored state of an open session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionState {
    /// Event time (Unix ms) of the first event seen; fixes the session's
    /// bucket.
    pub anchor_ms: i64,
    /// Earliest event time, Unix ms.
    pub first_ms: i64,
    /// Latest event time, Unix ms.
    pub last_ms: i64,
    /// Events in the session.
    pub events: i64,
    /// Funnel stages reached ([`FunnelStage::bit`]s).
    pub stages: u8,
    /// `Source` number of the first event.
    pub source: i32,
}

/// The stored text form, which [`SessionState::decode`] parses.
impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {}",
            self.anchor_ms, self.first_ms, self.last_ms, self.events, self.stages, self.source
        )
    }
}

/// Written into a command as its stored text form, without an intermediate
/// `String` (a commit writes thousands).
impl redis::ToRedisArgs for SessionState {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

impl SessionState {
    /// Parses the stored text form (`Display`'s output).
    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let mut next = || parts.next()?.parse::<i64>().ok();
        let state = Self {
            anchor_ms: next()?,
            first_ms: next()?,
            last_ms: next()?,
            events: next()?,
            stages: u8::try_from(next()?).ok()?,
            source: i32::try_from(next()?).ok()?,
        };
        parts.next().is_none().then_some(state)
    }
}

/// What a batch changes in one bucket.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BucketChanges {
    /// Counter increments.
    pub counters: HashMap<Counter, i64>,
    /// Users to add to each user set.
    pub users: HashMap<UserSet, HashSet<i64>>,
    /// Score increments per product, per ranking.
    pub rankings: HashMap<Ranking, HashMap<i64, i64>>,
}

impl BucketChanges {
    fn count(&mut self, counter: Counter, by: i64) {
        if by != 0 {
            *self.counters.entry(counter).or_default() += by;
        }
    }

    fn rank(&mut self, ranking: Ranking, product: i64, by: i64) {
        *self
            .rankings
            .entry(ranking)
            .or_default()
            .entry(product)
            .or_default() += by;
    }

    fn merge(&mut self, other: &Self) {
        for (counter, by) in &other.counters {
            self.count(*counter, *by);
        }
        for (set, users) in &other.users {
            self.users.entry(*set).or_default().extend(users);
        }
        for (ranking, scores) in &other.rankings {
            for (product, by) in scores {
                self.rank(*ranking, *product, *by);
            }
        }
    }
}

/// The changes of one batch of events on one partition.
#[derive(Debug, Default)]
pub struct BatchAggregate {
    /// Changes per minute bucket, by minute start (hour and day buckets are
    /// their sums: [`BatchAggregate::buckets`]).
    pub minutes: BTreeMap<i64, BucketChanges>,
    /// Sessions the batch touched, with their new state.
    pub sessions: HashMap<SessionKey, SessionState>,
    /// Events counted.
    pub applied: i64,
    /// Of them, events that were late.
    pub late: i64,
    /// The partition's watermark (latest event time, Unix ms) after the batch.
    pub watermark_ms: Option<i64>,
    session_gap_ms: i64,
}

impl BatchAggregate {
    /// An empty batch on a partition whose watermark is `watermark_ms`, with
    /// the stored state of the sessions its events belong to.
    pub fn new(
        watermark_ms: Option<i64>,
        sessions: HashMap<SessionKey, SessionState>,
        session_gap_ms: i64,
    ) -> Self {
        Self {
            watermark_ms,
            sessions,
            session_gap_ms,
            ..Self::default()
        }
    }

    /// Counts one valid event (the validator guarantees its time, enums and
    /// id).
    pub fn add(&mut self, event: &InteractionEvent) {
        let time_ms = event_time_ms(event);
        let minute = Granularity::Minute.bucket_start(time_ms.div_euclid(1000));
        self.applied += 1;

        let late = self
            .watermark_ms
            .is_some_and(|w| minute < Granularity::Minute.bucket_start(w.div_euclid(1000)));
        self.watermark_ms = Some(self.watermark_ms.map_or(time_ms, |w| w.max(time_ms)));

        let (event_type, source, product) = (event.r#type, event.source, event.product_id);
        let changes = self.minutes.entry(minute).or_default();
        if late {
            self.late += 1;
            changes.count(Counter::Late, 1);
        }
        changes.count(Counter::Events { event_type, source }, 1);
        changes
            .users
            .entry(UserSet::All)
            .or_default()
            .insert(event.user_id);
        changes
            .users
            .entry(UserSet::Source(source))
            .or_default()
            .insert(event.user_id);
        if product > 0 {
            changes.count(
                Counter::ProductEvents {
                    event_type,
                    source,
                    product,
                },
                1,
            );
            changes
                .users
                .entry(UserSet::Product(product))
                .or_default()
                .insert(event.user_id);
            let quantity = i64::from(event.quantity);
            if matches!(
                event.r#type(),
                EventType::AddToCart | EventType::RemoveFromCart | EventType::Purchase
            ) {
                let items = Counter::Quantity {
                    event_type,
                    source,
                    product,
                };
                changes.count(items, quantity);
            }
            match event.r#type() {
                EventType::ProductView => {
                    let dwell = dwell_micros(event);
                    changes.count(Counter::Dwell { source, product }, dwell);
                    changes.count(Counter::TotalDwell { source }, dwell);
                    changes.rank(Ranking::Views, product, 1);
                }
                EventType::AddToCart => changes.rank(Ranking::AddToCarts, product, quantity),
                EventType::Purchase => {
                    changes.count(Counter::Revenue { source }, event.amount_micros);
                    changes.count(
                        Counter::ProductRevenue { source, product },
                        event.amount_micros,
                    );
                    changes.rank(Ranking::Purchases, product, quantity);
                    changes.rank(Ranking::Revenue, product, event.amount_micros);
                }
                _ => {}
            }
        }
        self.add_to_session(event, time_ms);
    }

    fn add_to_session(&mut self, event: &InteractionEvent, time_ms: i64) {
        let stage = match event.r#type() {
            EventType::ProductView => FunnelStage::ProductView.bit(),
            EventType::AddToCart => FunnelStage::AddToCart.bit(),
            EventType::Purchase => FunnelStage::Purchase.bit(),
            _ => 0,
        };
        let gap = self.session_gap_ms;
        let key = (event.user_id, event.session_id.clone());
        let continued = self
            .sessions
            .get(&key)
            .filter(|s| time_ms <= s.last_ms + gap && time_ms >= s.first_ms - gap)
            .copied();
        let (state, new_stages, length_change, is_new) = match continued {
            Some(old) => {
                let state = SessionState {
                    first_ms: old.first_ms.min(time_ms),
                    last_ms: old.last_ms.max(time_ms),
                    events: old.events + 1,
                    stages: old.stages | stage,
                    ..old
                };
                let length_change = (state.last_ms - state.first_ms) - (old.last_ms - old.first_ms);
                (state, stage & !old.stages, length_change, false)
            }
            None => {
                let state = SessionState {
                    anchor_ms: time_ms,
                    first_ms: time_ms,
                    last_ms: time_ms,
                    events: 1,
                    stages: stage,
                    source: event.source,
                };
                (state, stage, 0, true)
            }
        };
        let source = state.source;
        let anchor = Granularity::Minute.bucket_start(state.anchor_ms.div_euclid(1000));
        let changes = self.minutes.entry(anchor).or_default();
        changes.count(Counter::Sessions { source }, i64::from(is_new));
        changes.count(Counter::SessionEvents { source }, 1);
        changes.count(Counter::SessionLength { source }, length_change);
        for funnel_stage in FunnelStage::ALL {
            if new_stages & funnel_stage.bit() != 0 {
                changes.count(
                    Counter::Funnel {
                        stage: funnel_stage,
                        source,
                    },
                    1,
                );
            }
        }
        self.sessions.insert(key, state);
    }

    /// Every bucket the batch writes: the minutes it changes, and their
    /// hours and days.
    pub fn touched_buckets(&self) -> impl Iterator<Item = Bucket> + '_ {
        self.minutes
            .keys()
            .flat_map(|minute| Bucket::of_minute(*minute))
    }

    /// The changes per bucket of `granularity`: minute buckets as they are
    /// (borrowed), hour and day buckets as the sums of their minutes.
    pub(crate) fn buckets(
        &self,
        granularity: Granularity,
    ) -> BTreeMap<Bucket, Cow<'_, BucketChanges>> {
        let mut buckets: BTreeMap<Bucket, Cow<'_, BucketChanges>> = BTreeMap::new();
        for (minute, changes) in &self.minutes {
            let bucket = Bucket::containing(granularity, *minute);
            if granularity == Granularity::Minute {
                buckets.insert(bucket, Cow::Borrowed(changes));
            } else {
                buckets
                    .entry(bucket)
                    .or_insert_with(|| Cow::Owned(BucketChanges::default()))
                    .to_mut()
                    .merge(changes);
            }
        }
        buckets
    }
}

impl BatchAggregate {
    /// The published description of the batch's changes (minute buckets
    /// only; see `rtap.v1.CommitDelta`).
    pub(crate) fn delta(&self, partition: i32, first_offset: i64, next_offset: i64) -> CommitDelta {
        let minutes = self
            .minutes
            .iter()
            .map(|(minute, changes)| minute_change(*minute, changes))
            .collect();
        CommitDelta {
            partition,
            first_offset,
            next_offset,
            watermark: self.watermark_ms.map(timestamp_from_millis),
            events_applied: self.applied,
            minutes,
            previous_next_offset: None,
        }
    }
}

fn minute_change(minute: i64, changes: &BucketChanges) -> MinuteChange {
    let mut change = MinuteChangeBuilder::default();
    for (counter, by) in &changes.counters {
        change.add(*counter, *by);
    }
    let mut products_with_users: Vec<i64> = changes
        .users
        .keys()
        .filter_map(|set| match set {
            UserSet::Product(product) => Some(*product),
            _ => None,
        })
        .collect();
    products_with_users.sort_unstable();
    change.finish(minute, products_with_users)
}

/// A minute's counter changes regrouped by (type, source, product) and by
/// source, as `MinuteChange` publishes them.
#[derive(Default)]
struct MinuteChangeBuilder {
    counts: BTreeMap<(i32, i32, i64), CountChange>,
    sessions: BTreeMap<i32, SessionChange>,
    /// Events of a (type, source) without a product: the type's events
    /// minus those with one.
    without_product: BTreeMap<(i32, i32), i64>,
}

impl MinuteChangeBuilder {
    fn add(&mut self, counter: Counter, by: i64) {
        match counter {
            Counter::Events { event_type, source } => {
                *self
                    .without_product
                    .entry((event_type, source))
                    .or_default() += by;
            }
            Counter::ProductEvents {
                event_type,
                source,
                product,
            } => {
                *self
                    .without_product
                    .entry((event_type, source))
                    .or_default() -= by;
                self.count(event_type, source, product).events += by;
            }
            Counter::Quantity {
                event_type,
                source,
                product,
            } => self.count(event_type, source, product).quantity += by,
            Counter::Dwell { source, product } => {
                self.count(EventType::ProductView as i32, source, product)
                    .dwell_micros += by;
            }
            Counter::ProductRevenue { source, product } => {
                self.count(EventType::Purchase as i32, source, product)
                    .revenue_micros += by;
            }
            Counter::Sessions { source } => self.session(source).sessions += by,
            Counter::SessionLength { source } => self.session(source).length_millis += by,
            Counter::SessionEvents { source } => self.session(source).events += by,
            Counter::Funnel { stage, source } => {
                let change = self.session(source);
                match stage {
                    FunnelStage::ProductView => change.reached_product_view += by,
                    FunnelStage::AddToCart => change.reached_add_to_cart += by,
                    FunnelStage::Purchase => change.reached_purchase += by,
                }
            }
            Counter::TotalDwell { .. } | Counter::Revenue { .. } | Counter::Late => {}
        }
    }

    fn count(&mut self, event_type: i32, source: i32, product: i64) -> &mut CountChange {
        self.counts
            .entry((event_type, source, product))
            .or_insert_with(|| CountChange {
                r#type: event_type,
                source,
                product_id: product,
                ..CountChange::default()
            })
    }

    fn session(&mut self, source: i32) -> &mut SessionChange {
        self.sessions
            .entry(source)
            .or_insert_with(|| SessionChange {
                source,
                ..SessionChange::default()
            })
    }

    fn finish(mut self, minute: i64, products_with_users: Vec<i64>) -> MinuteChange {
        for ((event_type, source), events) in std::mem::take(&mut self.without_product) {
            if events != 0 {
                self.count(event_type, source, 0).events += events;
            }
        }
        MinuteChange {
            minute_start: Some(timestamp_from_seconds(minute)),
            counts: self.counts.into_values().collect(),
            sessions: self.sessions.into_values().collect(),
            products_with_users,
        }
    }
}

/// Event time in Unix milliseconds (the validator guarantees it is set).
pub(crate) fn event_time_ms(event: &InteractionEvent) -> i64 {
    event.occurred_at.as_ref().map_or(0, timestamp_millis)
}

/// Dwell time in microseconds.
pub(crate) fn dwell_micros(event: &InteractionEvent) -> i64 {
    event.dwell_time.as_ref().map_or(0, duration_micros)
}

#[cfg(test)]
mod tests {
    use foldhash::HashMapExt;
    use rtap::v1::Source;

    use super::*;

    const GAP_MS: i64 = 30 * 60 * 1000;

    fn event(user: i64, session: &str, seconds: i64, kind: EventType) -> InteractionEvent {
        InteractionEvent {
            event_id: String::new(),
            occurred_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            user_id: user,
            product_id: if kind == EventType::PageView { 0 } else { 5 },
            source: Source::Web as i32,
            r#type: kind as i32,
            session_id: session.into(),
            dwell_time: Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000,
            }),
            amount_micros: if kind == EventType::Purchase { 7 } else { 0 },
            quantity: 3,
            search_query: String::new(),
        }
    }

    fn counter(batch: &BatchAggregate, granularity: Granularity, counter: Counter) -> i64 {
        batch
            .buckets(granularity)
            .values()
            .map(|c| c.counters.get(&counter).copied().unwrap_or(0))
            .sum()
    }

    const WEB: i32 = Source::Web as i32;

    #[test]
    fn counts_land_in_the_event_time_buckets_and_roll_up() {
        let mut batch = BatchAggregate::new(None, HashMap::new(), GAP_MS);
        batch.add(&event(1, "a", 3600 + 5, EventType::ProductView));
        batch.add(&event(1, "a", 3600 + 65, EventType::Purchase));
        batch.add(&event(2, "b", 3600 + 70, EventType::PageView));
        assert_eq!(batch.minutes.len(), 2);
        let hours = batch.buckets(Granularity::Hour);
        assert_eq!(hours.len(), 1);
        let hour = &hours[&Bucket::containing(Granularity::Hour, 3600)];
        assert_eq!(
            hour.counters[&Counter::Events {
                event_type: EventType::PageView as i32,
                source: WEB
            }],
            1
        );
        assert_eq!(
            hour.counters[&Counter::Dwell {
                source: WEB,
                product: 5
            }],
            2_000_500
        );
        assert_eq!(
            hour.counters[&Counter::ProductRevenue {
                source: WEB,
                product: 5
            }],
            7
        );
        assert_eq!(hour.users[&UserSet::All].len(), 2);
        assert_eq!(hour.users[&UserSet::Product(5)].len(), 1);
        assert_eq!(hour.rankings[&Ranking::Views][&5], 1);
        assert_eq!(batch.watermark_ms, Some((3600 + 70) * 1000));
    }

    #[test]
    fn sessions_are_counted_once_in_their_anchor_minute_with_funnel_and_length() {
        let mut batch = BatchAggregate::new(None, HashMap::new(), GAP_MS);
        batch.add(&event(1, "a", 600, EventType::ProductView));
        batch.add(&event(1, "a", 700, EventType::AddToCart));
        batch.add(&event(1, "a", 760, EventType::ProductView));
        let day = Granularity::Day;
        assert_eq!(counter(&batch, day, Counter::Sessions { source: WEB }), 1);
        assert_eq!(
            counter(&batch, day, Counter::SessionEvents { source: WEB }),
            3
        );
        assert_eq!(
            counter(&batch, day, Counter::SessionLength { source: WEB }),
            160_000
        );
        let funnel = |stage| counter(&batch, day, Counter::Funnel { stage, source: WEB });
        assert_eq!(funnel(FunnelStage::ProductView), 1);
        assert_eq!(funnel(FunnelStage::AddToCart), 1);
        assert_eq!(funnel(FunnelStage::Purchase), 0);
        // Everything sits in the anchor minute.
        let minutes = batch.buckets(Granularity::Minute);
        let anchor = &minutes[&Bucket::containing(Granularity::Minute, 600)];
        assert_eq!(
            anchor.counters[&Counter::SessionLength { source: WEB }],
            160_000
        );
    }

    #[test]
    fn a_session_continues_across_batches_and_a_gap_starts_a_new_one() {
        let stored = SessionState {
            anchor_ms: 600_000,
            first_ms: 600_000,
            last_ms: 700_000,
            events: 2,
            stages: FunnelStage::ProductView.bit(),
            source: WEB,
        };
        let sessions = [((1, "a".to_owned()), stored)].into_iter().collect();
        let mut batch = BatchAggregate::new(Some(700_000), sessions, GAP_MS);
        batch.add(&event(1, "a", 800, EventType::ProductView));
        let day = Granularity::Day;
        assert_eq!(counter(&batch, day, Counter::Sessions { source: WEB }), 0);
        assert_eq!(
            counter(&batch, day, Counter::SessionLength { source: WEB }),
            100_000
        );
        let funnel = Counter::Funnel {
            stage: FunnelStage::ProductView,
            source: WEB,
        };
        assert_eq!(counter(&batch, day, funnel), 0);
        batch.add(&event(1, "a", 800 + 31 * 60, EventType::PageView));
        assert_eq!(counter(&batch, day, Counter::Sessions { source: WEB }), 1);
        assert_eq!(batch.sessions[&(1, "a".to_owned())].events, 1);
    }

    #[test]
    fn events_behind_the_watermark_minute_are_late() {
        let mut batch = BatchAggregate::new(Some(120_000), HashMap::new(), GAP_MS);
        batch.add(&event(1, "a", 125, EventType::PageView));
        batch.add(&event(1, "a", 119, EventType::PageView));
        assert_eq!(batch.late, 1);
        assert_eq!(counter(&batch, Granularity::Minute, Counter::Late), 1);
        assert_eq!(batch.watermark_ms, Some(125_000));
    }

    #[test]
    fn the_delta_sums_to_the_batch_per_type_source_and_product() {
        let mut batch = BatchAggregate::new(None, HashMap::new(), GAP_MS);
        batch.add(&event(1, "a", 60, EventType::PageView));
        batch.add(&event(1, "a", 61, EventType::ProductView));
        batch.add(&event(1, "a", 62, EventType::Purchase));
        batch.add(&event(2, "b", 125, EventType::PageView));
        let delta = batch.delta(3, 10, 14);
        assert_eq!((delta.partition, delta.events_applied), (3, 4));
        assert_eq!(delta.minutes.len(), 2);
        let first = &delta.minutes[0];
        let find = |kind: EventType| {
            first
                .counts
                .iter()
                .find(|c| c.r#type == kind as i32)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(
            (
                find(EventType::PageView).events,
                find(EventType::PageView).product_id
            ),
            (1, 0)
        );
        assert_eq!(find(EventType::ProductView).dwell_micros, 2_000_500);
        let purchase = find(EventType::Purchase);
        assert_eq!(
            (purchase.events, purchase.quantity, purchase.revenue_micros),
            (1, 3, 7)
        );
        assert_eq!(first.products_with_users, vec![5]);
        assert_eq!(first.sessions[0].sessions, 1);
        assert_eq!(first.sessions[0].reached_purchase, 1);
        assert_eq!(first.sessions[0].length_millis, 2000);
        assert_eq!(delta.minutes[1].sessions[0].sessions, 1);
    }

    #[test]
    fn session_state_round_trips_and_rejects_garbage() {
        let state = SessionState {
            anchor_ms: -1,
            first_ms: 2,
            last_ms: 3,
            events: 4,
            stages: 5,
            source: 6,
        };
        assert_eq!(SessionState::decode(&state.to_string()), Some(state));
        assert_eq!(SessionState::decode("1 2 3"), None);
        assert_eq!(SessionState::decode("1 2 3 4 5 6 7"), None);
    }
}
