//! What an event-count subscriber holds: a snapshot, and the deltas
//! applied to it in order, as the examples in other languages do.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::Context;
use rtap::v1::{GetEventCountsResponse, SubscribeResponse, delta, snapshot, subscribe_response};
use tonic::Streaming;

/// Counts by bucket start, then by (event type, source).
pub type Held = BTreeMap<i64, HashMap<(i32, i32), i64>>;

pub fn held_of(response: &GetEventCountsResponse) -> Held {
    response
        .buckets
        .iter()
        .map(|b| {
            (
                b.start_time.map_or(0, |t| t.seconds),
                b.counts
                    .iter()
                    .map(|c| ((c.event_type, c.source), c.count))
                    .collect(),
            )
        })
        .collect()
}

/// Applies one stream message to what the client holds; returns whether it
/// was a delta.
pub fn apply(held: &mut Held, message: &SubscribeResponse) -> anyhow::Result<bool> {
    match &message.update {
        Some(subscribe_response::Update::Snapshot(snapshot)) => {
            let Some(snapshot::Result::EventCounts(result)) = &snapshot.result else {
                anyhow::bail!("an event-count snapshot");
            };
            *held = held_of(result);
            Ok(false)
        }
        Some(subscribe_response::Update::Delta(delta)) => {
            let Some(delta::Change::EventCounts(change)) = &delta.change else {
                anyhow::bail!("an event-count delta");
            };
            for bucket in &change.buckets {
                let counts = held
                    .entry(bucket.start_time.map_or(0, |t| t.seconds))
                    .or_default();
                for count in &bucket.counts {
                    *counts.entry((count.event_type, count.source)).or_default() += count.count;
                }
                counts.retain(|_, c| *c != 0);
            }
            for removed in &change.removed_bucket_start_times {
                held.remove(&removed.seconds);
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

pub async fn next(stream: &mut Streaming<SubscribeResponse>) -> anyhow::Result<SubscribeResponse> {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .context("no message within 30 s")??
        .context("the stream ended")
}
