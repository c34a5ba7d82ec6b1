//! The analytics service's access to the metric store: shared connections
//! to its nodes, the ranking cache, and the stored watermark.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use rtap::v1::{PartitionOffset, Watermark};

use super::{
    metric::{Metric, Query, Refreshed},
    window::ResolvedWindow,
};
use crate::{
    error::Error,
    infra::time::timestamp_from_millis,
    store::{
        Retention,
        commit::{PartitionState, load_states},
        nodes::Nodes,
        read::{MetricReader, Offsets},
        settled::SettledRankings,
        status::{PartitionVitals, Totals},
    },
};

/// Shared metric-store access of the analytics service.
#[derive(Clone)]
pub(crate) struct StoreClient {
    /// The nodes, through shared connections (one per node).
    pub(super) nodes: Nodes,
    /// Feeds read through connections of their own: a burst of feed
    /// refreshes never queues a unary call behind it.
    feed_nodes: Nodes,
    namespace: String,
    /// Bucket retentions, for window resolution.
    pub(crate) retention: Retention,
    /// Unions of settled ranking buckets, shared by every query.
    settled: Arc<SettledRankings>,
    /// The partitions feeds read, as last discovered: feeds refresh
    /// thousands of times a second, and a partition appears only with its
    /// first commit, whose delta clears this ([`Self::partition_seen`]).
    feed_partitions: Arc<StdMutex<KnownPartitions>>,
}

/// Partitions as last discovered, and how many times they were cleared
/// (a discovery that started before a clear does not store its answer).
#[derive(Default)]
struct KnownPartitions {
    cleared: u64,
    partitions: Option<Vec<i32>>,
}

impl StoreClient {
    /// Access to `namespace` on `nodes`; calls give up after `timeout`.
    pub(crate) fn new(
        nodes: &Nodes,
        namespace: String,
        retention: Retention,
        timeout: Duration,
    ) -> Self {
        Self {
            nodes: nodes.with_timeout(timeout),
            feed_nodes: nodes.with_timeout(timeout),
            namespace,
            retention,
            settled: Arc::new(SettledRankings::new(retention)),
            feed_partitions: Arc::default(),
        }
    }

    /// The namespace.
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Every consumed partition's stored state.
    pub(crate) async fn partition_states(&self) -> Result<Vec<(i32, PartitionState)>, Error> {
        Ok(load_states(&self.nodes, &self.namespace).await?)
    }

    /// Runs `query` over `window` on every consumed partition.
    pub(crate) async fn run<M: Metric>(
        &self,
        query: &Query<M>,
        window: ResolvedWindow,
    ) -> Result<M::Response, Error> {
        let reader = self.reader(&self.nodes).await?;
        query
            .run(&self.nodes, &reader, window, &self.retention)
            .await
    }

    /// [`Self::run`] for a feed, on the feeds' connection, with the buckets
    /// ahead of the window until `until` (additive metrics) and the stored
    /// offsets the reads saw, when they all saw the same.
    pub(crate) async fn feed_read<M: Metric>(
        &self,
        query: &Query<M>,
        window: ResolvedWindow,
        until: i64,
    ) -> Result<(M::Response, M::Ahead, Option<Offsets>), Error> {
        let reader = self.feed_reader().await?;
        let (result, ahead) = query
            .run_ahead(&self.feed_nodes, &reader, (window, until), &self.retention)
            .await?;
        Ok((result, ahead, reader.observed()))
    }

    /// Brings a feed's `held` result, read over `held_window`, up to date
    /// for `window` after `buckets` of it changed, on the feeds' connection.
    pub(crate) async fn feed_refresh<M: Metric>(
        &self,
        query: &Query<M>,
        (held_window, window): (ResolvedWindow, ResolvedWindow),
        held: &mut M::Response,
        buckets: &BTreeSet<i64>,
    ) -> Result<Refreshed, Error> {
        let reader = self.feed_reader().await?;
        query
            .refresh(
                &self.feed_nodes,
                &reader,
                (held_window, window, &self.retention),
                held,
                buckets,
            )
            .await
    }

    /// A partition of the namespace committed: if feeds did not know it,
    /// they discover the partitions again.
    pub(crate) fn partition_seen(&self, partition: i32) {
        let known = self
            .feed_partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let unknown = known
            .partitions
            .as_ref()
            .is_some_and(|partitions| !partitions.contains(&partition));
        drop(known);
        if unknown {
            self.forget_partitions();
        }
    }

    /// Feeds discover the partitions again (after deltas may have been
    /// missed: a new partition's first among them).
    pub(crate) fn forget_partitions(&self) {
        let mut known = self
            .feed_partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        known.cleared += 1;
        known.partitions = None;
    }

    /// A reader of every consumed partition, for feeds: as last discovered.
    async fn feed_reader(&self) -> Result<MetricReader, Error> {
        let (cleared, partitions) = {
            let known = self
                .feed_partitions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            (known.cleared, known.partitions.clone())
        };
        let partitions = match partitions {
            Some(partitions) => partitions,
            None => {
                let partitions = self.reader(&self.feed_nodes).await?.partitions();
                let mut known = self
                    .feed_partitions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if known.cleared == cleared {
                    known.partitions = Some(partitions.clone());
                }
                partitions
            }
        };
        Ok(MetricReader::new(&self.namespace, partitions).with_settled(self.settled.clone()))
    }

    /// A reader of every consumed partition.
    async fn reader(&self, nodes: &Nodes) -> Result<MetricReader, Error> {
        Ok(MetricReader::discover(nodes, &self.namespace)
            .await?
            .with_settled(self.settled.clone()))
    }

    /// The watermark as stored: every partition's next offset and the latest
    /// event time.
    pub(crate) async fn watermark(&self) -> Result<Watermark, Error> {
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
