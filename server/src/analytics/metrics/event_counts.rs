//! GetEventCounts: events per bucket by type and source, for every product or
//! one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redis::aio::ConnectionLike;
use rtap::v1::{
    CommitDelta, CountChange, EventCount, EventCountBucket, EventCountsDelta, EventType,
    GetEventCountsRequest, GetEventCountsResponse, TimeWindow, delta, snapshot,
};

use crate::{
    analytics::{
        metric::{
            EVENT_TYPES, Metric, Reads, Refreshed, SOURCES, Touched, Violations, admits, distinct,
            minutes_in, reread, selected,
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
    const NAME: &'static str = "event_counts";

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

    async fn read<C: ConnectionLike + Send>(
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
        let selects = |count: &CountChange| {
            count.events != 0
                && admits(&request.event_types, count.r#type)
                && admits(&request.sources, count.source)
                && (request.product_id == 0 || count.product_id == request.product_id)
        };
        Touched::buckets(
            minutes_in(window, delta)
                .filter(|(_, minute)| minute.counts.iter().any(selects))
                .map(|(start, _)| window.granularity.bucket_start(start))
                .collect(),
        )
    }

    /// Re-reads the named buckets, and those a rolling window gained; keeps
    /// the others.
    async fn refresh<C: ConnectionLike + Send>(
        request: &Self::Request,
        reads: Reads<'_, C>,
        held: &mut Self::Response,
        held_window: ResolvedWindow,
        buckets: &BTreeSet<i64>,
    ) -> Result<Refreshed, Error> {
        let window = reads.window;
        if held_window.granularity != window.granularity {
            return reread::<Self, C>(request, reads, held).await;
        }
        let change = if held_window == window {
            patch(request, reads, held, buckets).await?
        } else {
            roll(request, reads, held, buckets).await?
        };
        Ok(Refreshed {
            change: change.map(delta::Change::EventCounts),
            whole: false,
        })
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

/// Re-reads `buckets` of `held` (same window) in place; the change of
/// those.
async fn patch<C: ConnectionLike + Send>(
    request: &GetEventCountsRequest,
    reads: Reads<'_, C>,
    held: &mut GetEventCountsResponse,
    buckets: &BTreeSet<i64>,
) -> Result<Option<EventCountsDelta>, Error> {
    let window = reads.window;
    let wanted: Vec<Bucket> = buckets
        .iter()
        .filter(|start| (window.start..window.end).contains(*start))
        .map(|start| Bucket {
            granularity: window.granularity,
            start: *start,
        })
        .collect();
    let step = window.granularity.seconds();
    let fresh = read_buckets(request, reads, &wanted).await?;
    // Every bucket's place first: `held` changes only if all fit.
    let mut places = Vec::with_capacity(fresh.len());
    for bucket in &fresh {
        let start = bucket.start_time.map_or(0, |t| t.seconds);
        let index = usize::try_from((start - window.start) / step)
            .ok()
            .filter(|index| {
                held.buckets
                    .get(*index)
                    .is_some_and(|slot| slot.start_time == bucket.start_time)
            })
            .ok_or_else(|| Error::Internal("a feed's buckets do not match its window".into()))?;
        places.push(index);
    }
    let mut changed = Vec::new();
    for (index, bucket) in places.into_iter().zip(fresh) {
        let slot = &mut held.buckets[index];
        changed.extend(bucket_change(slot, &bucket));
        *slot = bucket;
    }
    Ok((!changed.is_empty()).then(|| EventCountsDelta {
        buckets: changed,
        removed_bucket_start_times: Vec::new(),
        range: held.range,
    }))
}

/// Moves `held` to the reads' window (same granularity): keeps the buckets
/// both windows share unless named in `buckets`, reads the rest, drops
/// those left behind.
async fn roll<C: ConnectionLike + Send>(
    request: &GetEventCountsRequest,
    reads: Reads<'_, C>,
    held: &mut GetEventCountsResponse,
    buckets: &BTreeSet<i64>,
) -> Result<Option<EventCountsDelta>, Error> {
    let window = reads.window;
    let mut kept: BTreeMap<i64, EventCountBucket> = std::mem::take(&mut held.buckets)
        .into_iter()
        .filter_map(|b| Some((b.start_time?.seconds, b)))
        .collect();
    let removed: Vec<prost_types::Timestamp> = kept
        .keys()
        .filter(|start| !(window.start..window.end).contains(*start))
        .map(|start| timestamp_from_seconds(*start))
        .collect();
    let all = window.buckets();
    let wanted: Vec<Bucket> = all
        .iter()
        .filter(|b| buckets.contains(&b.start) || !kept.contains_key(&b.start))
        .copied()
        .collect();
    let fresh = match read_buckets(request, reads, &wanted).await {
        Ok(fresh) => fresh,
        Err(error) => {
            // `held` stays as it was.
            held.buckets = kept.into_values().collect();
            return Err(error);
        }
    };
    let mut fresh: BTreeMap<i64, EventCountBucket> = fresh
        .into_iter()
        .filter_map(|b| Some((b.start_time?.seconds, b)))
        .collect();
    let mut changed = Vec::new();
    let mut now_held = Vec::with_capacity(all.len());
    for bucket in &all {
        let old = kept.remove(&bucket.start);
        let new = fresh.remove(&bucket.start);
        let current = match (old, new) {
            (Some(old), Some(new)) => {
                changed.extend(bucket_change(&old, &new));
                new
            }
            (Some(old), None) => old,
            (None, Some(new)) => {
                changed.push(new.clone());
                new
            }
            (None, None) => EventCountBucket {
                start_time: Some(timestamp_from_seconds(bucket.start)),
                ..EventCountBucket::default()
            },
        };
        now_held.push(current);
    }
    held.buckets = now_held;
    held.range = Some(window.range());
    Ok(Some(EventCountsDelta {
        buckets: changed,
        removed_bucket_start_times: removed,
        range: held.range,
    }))
}

/// The counts of `buckets` (all of the reads' granularity), in their order.
async fn read_buckets<C: ConnectionLike + Send>(
    request: &GetEventCountsRequest,
    reads: Reads<'_, C>,
    buckets: &[Bucket],
) -> Result<Vec<EventCountBucket>, Error> {
    let Reads {
        connection,
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
        reader.fields(connection, buckets, &fields).await?
    } else if window.granularity == Granularity::Minute {
        let minutes: Vec<i64> = buckets.iter().map(|b| b.start).collect();
        reader.minute_events(connection, &minutes, &pairs).await?
    } else {
        let fields: Vec<String> = pairs
            .iter()
            .map(|&(event_type, source)| Counter::Events { event_type, source }.field())
            .collect();
        reader.fields(connection, buckets, &fields).await?
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
