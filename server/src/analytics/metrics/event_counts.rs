//! GetEventCounts: events per bucket by type and source, for every product or
//! one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::store::nodes::Route;
use rtap::v1::{
    CommitDelta, CountChange, EventCount, EventCountBucket, EventCountsDelta, EventType,
    GetEventCountsRequest, GetEventCountsResponse, TimeWindow, delta, snapshot,
};

use crate::{
    analytics::{
        metric::{
            EVENT_TYPES, Metric, Reads, Reread, SOURCES, Touched, Violations, admits, distinct,
            minutes_in, selected,
        },
        window::ResolvedWindow,
    },
    error::Error,
    infra::time::timestamp_from_seconds,
    store::{Bucket, Counter, Granularity},
};

/// GetEventCounts.
pub(crate) struct EventCounts;

impl Metric for EventCounts {
    type Request = GetEventCountsRequest;
    type Response = GetEventCountsResponse;
    /// Buckets past the window's end that commits counted in, by start.
    type Ahead = BTreeMap<i64, EventCountBucket>;
    const NAME: &'static str = "event_counts";
    const ADDITIVE: bool = true;

    fn validate(request: &Self::Request, violations: &mut Violations) {
        for (index, value) in request.event_types.iter().enumerate() {
            if !matches!(EventType::try_from(*value), Ok(t) if t != EventType::Unspecified) {
                violations.add(
                    &format!("event_types[{index}]"),
                    format!("unknown event type {value}"),
                );
            }
        }
        violations.check_sources(&request.sources);
        violations.check_product(request.product_id);
    }

    fn window(request: &Self::Request) -> (Option<&TimeWindow>, i32) {
        (request.window.as_ref(), request.granularity)
    }

    fn canonical(request: &Self::Request) -> Self::Request {
        GetEventCountsRequest {
            event_types: distinct(&request.event_types),
            sources: distinct(&request.sources),
            ..request.clone()
        }
    }

    async fn read<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
    ) -> Result<Self::Response, Error> {
        let window = reads.window;
        let buckets = read_buckets(request, reads, &window.buckets()).await?;
        Ok(GetEventCountsResponse {
            granularity: window.proto_granularity(),
            range: Some(window.range()),
            buckets,
        })
    }

    fn product_interest(request: &Self::Request) -> Option<i64> {
        (request.product_id > 0).then_some(request.product_id)
    }

    /// The buckets holding a minute with a count the request selects.
    fn touched(request: &Self::Request, window: &ResolvedWindow, delta: &CommitDelta) -> Touched {
        Touched::buckets(
            minutes_in(window, delta)
                .filter(|(_, minute)| minute.counts.iter().any(|c| selects(request, c)))
                .map(|(start, _)| window.granularity.bucket_start(start))
                .collect(),
        )
    }

    async fn read_ahead<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
        until: i64,
    ) -> Result<(Self::Response, Self::Ahead), Error> {
        let window = reads.window;
        let mut buckets = window.buckets();
        let inside = buckets.len();
        let step = window.granularity.seconds();
        buckets.extend(
            (0..)
                .map(|i| window.end + i * step)
                .take_while(|start| *start < until)
                .map(|start| Bucket {
                    granularity: window.granularity,
                    start,
                }),
        );
        let mut held = read_buckets(request, reads, &buckets).await?;
        let ahead = held
            .split_off(inside)
            .into_iter()
            .filter(|bucket| !bucket.counts.is_empty())
            .filter_map(|bucket| Some((bucket.start_time?.seconds, bucket)))
            .collect();
        let result = GetEventCountsResponse {
            granularity: window.proto_granularity(),
            range: Some(window.range()),
            buckets: held,
        };
        Ok((result, ahead))
    }

    /// Adds the commit's selected counts to their buckets: those of the
    /// window change (and the change is their increase), later ones wait in
    /// `ahead`, earlier ones are out of the window for good.
    fn apply(
        request: &Self::Request,
        window: &ResolvedWindow,
        (held, ahead): (&mut Self::Response, &mut Self::Ahead),
        delta: &CommitDelta,
    ) -> Result<Option<delta::Change>, Reread> {
        let mut added: BTreeMap<i64, BTreeMap<(i32, i32), i64>> = BTreeMap::new();
        for minute in &delta.minutes {
            let Some(start) = minute.minute_start.map(|t| t.seconds) else {
                continue;
            };
            let bucket = window.granularity.bucket_start(start);
            if bucket < window.start {
                continue;
            }
            for count in minute.counts.iter().filter(|c| selects(request, c)) {
                *added
                    .entry(bucket)
                    .or_default()
                    .entry((count.r#type, count.source))
                    .or_default() += count.events;
            }
        }
        let step = window.granularity.seconds();
        let mut changed = Vec::new();
        for (start, counts) in added {
            if start >= window.end {
                let bucket = ahead.entry(start).or_insert_with(|| empty_bucket(start));
                add_counts(bucket, &counts);
                continue;
            }
            let slot = usize::try_from((start - window.start) / step)
                .ok()
                .and_then(|index| held.buckets.get_mut(index))
                .filter(|slot| slot.start_time.map(|t| t.seconds) == Some(start))
                .ok_or(Reread)?;
            changed.push(add_counts(slot, &counts));
        }
        Ok((!changed.is_empty()).then(|| {
            delta::Change::EventCounts(EventCountsDelta {
                buckets: changed,
                removed_bucket_start_times: Vec::new(),
                range: held.range,
            })
        }))
    }

    /// Drops the buckets left behind, takes those gained from `ahead` (a
    /// bucket no commit counted in since the read is empty).
    fn roll(
        _request: &Self::Request,
        (held_window, window): (ResolvedWindow, ResolvedWindow),
        (held, ahead): (&mut Self::Response, &mut Self::Ahead),
    ) -> Result<Option<delta::Change>, Reread> {
        if held_window.granularity != window.granularity {
            return Err(Reread);
        }
        if held_window == window {
            return Ok(None);
        }
        let mut kept: BTreeMap<i64, EventCountBucket> = std::mem::take(&mut held.buckets)
            .into_iter()
            .filter_map(|b| Some((b.start_time?.seconds, b)))
            .collect();
        let removed: Vec<prost_types::Timestamp> = kept
            .keys()
            .filter(|start| !(window.start..window.end).contains(*start))
            .map(|start| timestamp_from_seconds(*start))
            .collect();
        let mut gained = Vec::new();
        held.buckets = window
            .buckets()
            .into_iter()
            .map(|bucket| {
                kept.remove(&bucket.start).unwrap_or_else(|| {
                    let taken = ahead
                        .remove(&bucket.start)
                        .unwrap_or_else(|| empty_bucket(bucket.start));
                    gained.push(taken.clone());
                    taken
                })
            })
            .collect();
        ahead.retain(|start, _| *start >= window.end);
        held.range = Some(window.range());
        Ok(Some(delta::Change::EventCounts(EventCountsDelta {
            buckets: gained,
            removed_bucket_start_times: removed,
            range: held.range,
        })))
    }

    fn diff(old: &Self::Response, new: &Self::Response) -> Option<delta::Change> {
        let held: HashMap<i64, &EventCountBucket> = old
            .buckets
            .iter()
            .filter_map(|b| Some((b.start_time?.seconds, b)))
            .collect();
        let mut buckets = Vec::new();
        for bucket in &new.buckets {
            let start = bucket.start_time.map_or(0, |t| t.seconds);
            match held.get(&start) {
                Some(previous) => buckets.extend(bucket_change(previous, bucket)),
                None => buckets.push(bucket.clone()),
            }
        }
        let kept: BTreeSet<i64> = new
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

    fn snapshot(result: Self::Response) -> snapshot::Result {
        snapshot::Result::EventCounts(result)
    }
}

/// The counts of `buckets` (all of the reads' granularity), in their order.
async fn read_buckets<C: Route>(
    request: &GetEventCountsRequest,
    reads: Reads<'_, C>,
    buckets: &[Bucket],
) -> Result<Vec<EventCountBucket>, Error> {
    let Reads {
        route,
        reader,
        window,
        ..
    } = reads;
    let pairs = pairs(request);
    let rows = if request.product_id > 0 {
        let fields: Vec<String> = pairs
            .iter()
            .map(|&(event_type, source)| {
                Counter::ProductEvents {
                    event_type,
                    source,
                    product: request.product_id,
                }
                .field()
            })
            .collect();
        reader.fields(route, buckets, &fields).await?
    } else if window.granularity == Granularity::Minute {
        let minutes: Vec<i64> = buckets.iter().map(|b| b.start).collect();
        reader.minute_events(route, &minutes, &pairs).await?
    } else {
        let fields: Vec<String> = pairs
            .iter()
            .map(|&(event_type, source)| Counter::Events { event_type, source }.field())
            .collect();
        reader.fields(route, buckets, &fields).await?
    };
    Ok(buckets
        .iter()
        .zip(rows)
        .map(|(bucket, row)| {
            let counts: Vec<EventCount> = pairs
                .iter()
                .zip(row)
                .filter(|(_, count)| *count != 0)
                .map(|(&(event_type, source), count)| EventCount {
                    event_type,
                    source,
                    count,
                })
                .collect();
            EventCountBucket {
                start_time: Some(timestamp_from_seconds(bucket.start)),
                total: counts.iter().map(|c| c.count).sum(),
                counts,
            }
        })
        .collect())
}

/// Whether the request counts `count`.
fn selects(request: &GetEventCountsRequest, count: &CountChange) -> bool {
    count.events != 0
        && admits(&request.event_types, count.r#type)
        && admits(&request.sources, count.source)
        && (request.product_id == 0 || count.product_id == request.product_id)
}

/// A bucket with no events.
fn empty_bucket(start: i64) -> EventCountBucket {
    EventCountBucket {
        start_time: Some(timestamp_from_seconds(start)),
        ..EventCountBucket::default()
    }
}

/// Adds `counts` (by type and source) to `bucket`, keeping its counts in
/// the order reads give them (by type, then source); the increase.
fn add_counts(
    bucket: &mut EventCountBucket,
    counts: &BTreeMap<(i32, i32), i64>,
) -> EventCountBucket {
    let mut increase = Vec::with_capacity(counts.len());
    for (&(event_type, source), &count) in counts {
        let key = |c: &EventCount| (c.event_type, c.source);
        match bucket
            .counts
            .binary_search_by_key(&(event_type, source), key)
        {
            Ok(index) => bucket.counts[index].count += count,
            Err(index) => bucket.counts.insert(
                index,
                EventCount {
                    event_type,
                    source,
                    count,
                },
            ),
        }
        bucket.total += count;
        increase.push(EventCount {
            event_type,
            source,
            count,
        });
    }
    EventCountBucket {
        start_time: bucket.start_time,
        total: increase.iter().map(|c| c.count).sum(),
        counts: increase,
    }
}

/// Every `(event type, source)` the request reads.
fn pairs(request: &GetEventCountsRequest) -> Vec<(i32, i32)> {
    let sources = selected(&request.sources, &SOURCES);
    selected(&request.event_types, &EVENT_TYPES)
        .into_iter()
        .flat_map(|event_type| sources.iter().map(move |source| (event_type, *source)))
        .collect()
}

/// The change of one bucket held in both results, if any: each count's
/// difference, zeros left out.
fn bucket_change(before: &EventCountBucket, after: &EventCountBucket) -> Option<EventCountBucket> {
    let counts = |bucket: &EventCountBucket| -> HashMap<(i32, i32), i64> {
        bucket
            .counts
            .iter()
            .map(|c| ((c.event_type, c.source), c.count))
            .collect()
    };
    let (old, new) = (counts(before), counts(after));
    let keys: BTreeSet<(i32, i32)> = old.keys().chain(new.keys()).copied().collect();
    let changes: Vec<EventCount> = keys
        .into_iter()
        .filter_map(|(event_type, source)| {
            let key = (event_type, source);
            let change = new.get(&key).unwrap_or(&0) - old.get(&key).unwrap_or(&0);
            (change != 0).then_some(EventCount {
                event_type,
                source,
                count: change,
            })
        })
        .collect();
    (!changes.is_empty()).then(|| EventCountBucket {
        start_time: after.start_time,
        total: after.total - before.total,
        counts: changes,
    })
}

#[cfg(test)]
mod tests {
    use rtap::v1::{MinuteChange, Source};

    use super::*;

    const MINUTE: i64 = 60;
    const T0: i64 = 1_800_000_000 / MINUTE * MINUTE;

    fn window(start: i64, minutes: i64) -> ResolvedWindow {
        ResolvedWindow {
            granularity: Granularity::Minute,
            start,
            end: start + minutes * MINUTE,
        }
    }

    fn held(window: &ResolvedWindow) -> GetEventCountsResponse {
        GetEventCountsResponse {
            granularity: window.proto_granularity(),
            range: Some(window.range()),
            buckets: window
                .buckets()
                .iter()
                .map(|b| empty_bucket(b.start))
                .collect(),
        }
    }

    fn views(minute: i64, product_id: i64, source: Source, events: i64) -> MinuteChange {
        MinuteChange {
            minute_start: Some(timestamp_from_seconds(minute)),
            counts: vec![CountChange {
                r#type: EventType::ProductView.into(),
                source: source.into(),
                product_id,
                events,
                ..CountChange::default()
            }],
            ..MinuteChange::default()
        }
    }

    fn counts(bucket: &EventCountBucket) -> Vec<(i32, i32, i64)> {
        bucket
            .counts
            .iter()
            .map(|c| (c.event_type, c.source, c.count))
            .collect()
    }

    #[test]
    fn a_commit_adds_the_selected_counts_in_read_order_and_sends_the_increase() {
        let request = GetEventCountsRequest {
            product_id: 7,
            ..GetEventCountsRequest::default()
        };
        let window = window(T0, 3);
        let mut result = held(&window);
        let mut ahead = BTreeMap::new();
        let delta = CommitDelta {
            minutes: vec![
                views(T0 + MINUTE, 7, Source::MobileApp, 2),
                views(T0 + MINUTE, 7, Source::Web, 1),
                views(T0 + MINUTE, 8, Source::Web, 5),
                views(T0 - MINUTE, 7, Source::Web, 4),
                views(T0 + 3 * MINUTE, 7, Source::Web, 3),
            ],
            ..CommitDelta::default()
        };
        let change = EventCounts::apply(&request, &window, (&mut result, &mut ahead), &delta);
        let Ok(Some(delta::Change::EventCounts(change))) = change else {
            panic!("expected a change, got {change:?}");
        };
        let view = i32::from(EventType::ProductView);
        let (web, app) = (i32::from(Source::Web), i32::from(Source::MobileApp));
        assert_eq!(change.buckets.len(), 1);
        assert_eq!(counts(&change.buckets[0]), [(view, web, 1), (view, app, 2)]);
        assert_eq!(change.buckets[0].total, 3);
        assert_eq!(counts(&result.buckets[1]), [(view, web, 1), (view, app, 2)]);
        assert_eq!(result.buckets[1].total, 3);
        assert_eq!(result.buckets[0].total + result.buckets[2].total, 0);
        // The minute past the window waits ahead.
        assert_eq!(ahead.get(&(T0 + 3 * MINUTE)).map(|b| b.total), Some(3));
    }

    #[test]
    fn rolling_takes_the_buckets_counted_ahead_and_drops_those_left_behind() {
        let request = GetEventCountsRequest::default();
        let before = window(T0, 3);
        let mut result = held(&before);
        let mut ahead = BTreeMap::new();
        let delta = CommitDelta {
            minutes: vec![views(T0 + 3 * MINUTE, 1, Source::Web, 5)],
            ..CommitDelta::default()
        };
        let applied = EventCounts::apply(&request, &before, (&mut result, &mut ahead), &delta);
        assert!(matches!(applied, Ok(None)), "{applied:?}");
        let after = window(T0 + 2 * MINUTE, 3);
        let rolled = EventCounts::roll(&request, (before, after), (&mut result, &mut ahead));
        let Ok(Some(delta::Change::EventCounts(change))) = rolled else {
            panic!("expected a change, got {rolled:?}");
        };
        let starts = |buckets: &[EventCountBucket]| -> Vec<i64> {
            buckets
                .iter()
                .filter_map(|b| Some(b.start_time?.seconds))
                .collect()
        };
        assert_eq!(
            starts(&result.buckets),
            [T0 + 2 * MINUTE, T0 + 3 * MINUTE, T0 + 4 * MINUTE]
        );
        assert_eq!(result.buckets[1].total, 5);
        assert_eq!(starts(&change.buckets), [T0 + 3 * MINUTE, T0 + 4 * MINUTE]);
        let removed: Vec<i64> = change
            .removed_bucket_start_times
            .iter()
            .map(|t| t.seconds)
            .collect();
        assert_eq!(removed, [T0, T0 + MINUTE]);
        assert_eq!(change.range, Some(after.range()));
        assert!(ahead.is_empty());
    }

    #[test]
    fn a_window_of_another_granularity_cannot_roll() {
        let request = GetEventCountsRequest::default();
        let before = window(T0, 3);
        let after = ResolvedWindow {
            granularity: Granularity::Hour,
            ..before
        };
        let mut result = held(&before);
        let rolled = EventCounts::roll(
            &request,
            (before, after),
            (&mut result, &mut BTreeMap::new()),
        );
        assert!(rolled.is_err());
    }
}
