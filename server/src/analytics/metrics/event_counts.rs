//! GetEventCounts: events per bucket by type and source, for every product or
//! one.

use std::collections::{BTreeSet, HashMap};

use redis::aio::ConnectionLike;
use rtap::v1::{
    EventCount, EventCountBucket, EventCountsDelta, EventType, GetEventCountsRequest,
    GetEventCountsResponse, TimeWindow, delta, snapshot,
};

use crate::{
    analytics::metric::{EVENT_TYPES, Metric, Reads, SOURCES, Violations, distinct, selected},
    error::Error,
    infra::time::timestamp_from_seconds,
    store::{Counter, Granularity},
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
        let Reads {
            connection,
            reader,
            window,
            ..
        } = reads;
        let pairs = pairs(request);
        let buckets = window.buckets();
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
            reader.fields(connection, &buckets, &fields).await?
        } else if window.granularity == Granularity::Minute {
            let minutes: Vec<i64> = buckets.iter().map(|b| b.start).collect();
            reader.minute_events(connection, &minutes, &pairs).await?
        } else {
            let fields: Vec<String> = pairs
                .iter()
                .map(|&(event_type, source)| Counter::Events { event_type, source }.field())
                .collect();
            reader.fields(connection, &buckets, &fields).await?
        };
        let buckets = buckets
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
            .collect();
        Ok(GetEventCountsResponse {
            granularity: window.proto_granularity(),
            range: Some(window.range()),
            buckets,
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
