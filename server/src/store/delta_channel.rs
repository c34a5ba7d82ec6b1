//! The channels commit deltas travel on, from ingest processes to every API
//! process.
//!
//! - On a Redis Cluster: sharded pub/sub. Each partition's deltas go out
//!   with `SPUBLISH` on the shard channel `{<namespace>:<partition>}:deltas`,
//!   in the partition's slot, so a delta reaches only the nodes of that
//!   shard and delta traffic grows with the cluster instead of reaching
//!   every node. A listener subscribes to every partition's channel through
//!   the redis crate's cluster client (RESP3), which subscribes again after
//!   failovers and slot moves, and looks for new partitions every second.
//! - On one Redis: `PUBLISH` on `<namespace>:deltas`. A single node has no
//!   shards to spread over, and the redis crate subscribes to shard channels
//!   only through its cluster client.

use std::{collections::BTreeSet, time::Duration};

use futures_util::StreamExt as _;
use redis::{PushInfo, PushKind, Value, aio::PubSub, cluster_async::ClusterConnection};
use tokio::sync::mpsc;

use super::{
    StoreError,
    keys::{PartitionKeys, deltas_channel},
    nodes::{Nodes, Route},
    read::MetricReader,
};

/// How often a cluster listener looks for partitions it does not follow yet.
const NEW_PARTITIONS_EVERY: Duration = Duration::from_secs(1);

/// Publishes `delta` (an encoded `CommitDelta`) of `partition`.
pub(crate) async fn publish(
    nodes: &Nodes,
    namespace: &str,
    partition: i32,
    delta: &[u8],
) -> Result<(), StoreError> {
    let (command, channel) = if nodes.is_cluster() {
        (
            "SPUBLISH",
            PartitionKeys::new(namespace, partition).deltas(),
        )
    } else {
        ("PUBLISH", deltas_channel(namespace))
    };
    let mut connection = nodes.connection(&channel).await?;
    redis::cmd(command)
        .arg(&channel)
        .arg(delta)
        .query_async::<i64>(&mut connection)
        .await?;
    Ok(())
}

/// What a listener received.
pub(crate) enum Heard {
    /// An encoded `CommitDelta`.
    Delta(Vec<u8>),
    /// Deltas may have been missed (a partition newly followed, a node
    /// reconnected): what was built from them must be read again.
    Gap,
}

/// A subscription to every partition's deltas.
pub(crate) enum DeltaListener {
    /// One Redis.
    Single(PubSub),
    /// A cluster: shard channels.
    Sharded {
        connection: ClusterConnection,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        nodes: Nodes,
        namespace: String,
        followed: BTreeSet<i32>,
        ticker: tokio::time::Interval,
    },
}

impl DeltaListener {
    /// Subscribes to the deltas of `namespace`.
    pub(crate) async fn connect(nodes: &Nodes, namespace: &str) -> Result<Self, StoreError> {
        let Some(seeds) = nodes.cluster_seeds() else {
            let channel = deltas_channel(namespace);
            let client = nodes.client_for_key(&channel).await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            return Ok(Self::Single(pubsub));
        };
        let (sender, pushes) = mpsc::unbounded_channel();
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender)
            .build()?;
        let connection = client.get_async_connection().await?;
        let mut ticker = tokio::time::interval(NEW_PARTITIONS_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listener = Self::Sharded {
            connection,
            pushes,
            nodes: nodes.clone(),
            namespace: namespace.to_owned(),
            followed: BTreeSet::new(),
            ticker,
        };
        listener.follow_new_partitions().await?;
        Ok(listener)
    }

    /// The next delta or gap; `Ok(None)` when the subscription is lost
    /// (connect again).
    pub(crate) async fn next(&mut self) -> Result<Option<Heard>, StoreError> {
        loop {
            let push = match self {
                Self::Single(pubsub) => {
                    let message = pubsub.on_message().next().await;
                    return Ok(message.map(|m| Heard::Delta(m.get_payload_bytes().to_vec())));
                }
                Self::Sharded { pushes, ticker, .. } => tokio::select! {
                    push = pushes.recv() => Some(push),
                    _ = ticker.tick() => None,
                },
            };
            match push {
                Some(None) => return Ok(None),
                Some(Some(push)) => match push.kind {
                    PushKind::SMessage => {
                        if let Some(Value::BulkString(payload)) = push.data.into_iter().nth(1) {
                            return Ok(Some(Heard::Delta(payload)));
                        }
                    }
                    // The client subscribes again by itself; what was
                    // published meanwhile is lost.
                    PushKind::Disconnection => return Ok(Some(Heard::Gap)),
                    _ => {}
                },
                None => {
                    if self.follow_new_partitions().await? {
                        return Ok(Some(Heard::Gap));
                    }
                }
            }
        }
    }

    /// Subscribes to the channels of partitions not followed yet; whether
    /// there were any (their first deltas may have gone out before).
    async fn follow_new_partitions(&mut self) -> Result<bool, StoreError> {
        let Self::Sharded {
            connection,
            nodes,
            namespace,
            followed,
            ..
        } = self
        else {
            return Ok(false);
        };
        let partitions = MetricReader::discover(nodes, namespace).await?.partitions();
        let new: Vec<i32> = partitions
            .into_iter()
            .filter(|partition| !followed.contains(partition))
            .collect();
        if new.is_empty() {
            return Ok(false);
        }
        for partition in new {
            // One command per channel: the channels are in different slots.
            let channel = PartitionKeys::new(namespace, partition).deltas();
            connection.ssubscribe(&channel).await?;
            followed.insert(partition);
        }
        Ok(true)
    }
}
