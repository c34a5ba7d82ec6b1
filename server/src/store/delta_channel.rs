//! The channels commit deltas travel on, from ingest processes to every API
//! process.
//!
//! Sharded pub/sub (Redis 7.0+), on one Redis as on a cluster: each
//! partition's deltas go out with `SPUBLISH` on the shard channel
//! `{<namespace>:<partition>}:deltas`, in the partition's slot, so on a
//! cluster a delta reaches only the nodes of that shard and delta traffic
//! grows with the cluster instead of reaching every node. A listener
//! subscribes to every partition's channel over RESP3 and looks for new
//! partitions every second. On a cluster the redis crate's cluster client
//! subscribes again by itself after failovers and slot moves; on one Redis a
//! lost connection ends the listener, and its owner connects again.

use std::{collections::BTreeSet, time::Duration};

use redis::{
    Client, ProtocolVersion, PushInfo, PushKind, Value,
    aio::{ConnectionLike as _, MultiplexedConnection},
    cluster_async::ClusterConnection,
};
use tokio::sync::mpsc;

use super::{
    StoreError,
    keys::PartitionKeys,
    nodes::{Nodes, Route},
    read::MetricReader,
};

/// How often a listener looks for partitions it does not follow yet.
const NEW_PARTITIONS_EVERY: Duration = Duration::from_secs(1);

/// Publishes `delta` (an encoded `CommitDelta`) of `partition`.
pub(crate) async fn publish(
    nodes: &Nodes,
    namespace: &str,
    partition: i32,
    delta: &[u8],
) -> Result<(), StoreError> {
    let channel = PartitionKeys::new(namespace, partition).deltas();
    let mut connection = nodes.connection(&channel).await?;
    redis::cmd("SPUBLISH")
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

/// The connection a listener subscribes on.
enum Subscriber {
    /// One Redis: a RESP3 connection whose pushes go to the listener.
    Single(MultiplexedConnection),
    /// A cluster: the cluster client routes each channel to its shard.
    Cluster(ClusterConnection),
}

impl Subscriber {
    async fn ssubscribe(&mut self, channel: &str) -> Result<(), StoreError> {
        match self {
            // The multiplexed connection has no `ssubscribe`; a RESP3
            // `ssubscribe` confirmation is taken as the command's reply, one
            // per channel, so one channel per command.
            Self::Single(connection) => {
                connection
                    .req_packed_command(redis::cmd("SSUBSCRIBE").arg(channel))
                    .await?;
            }
            Self::Cluster(connection) => connection.ssubscribe(channel).await?,
        }
        Ok(())
    }
}

/// A subscription to every partition's deltas.
pub(crate) struct DeltaListener {
    subscriber: Subscriber,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    nodes: Nodes,
    namespace: String,
    followed: BTreeSet<i32>,
    ticker: tokio::time::Interval,
}

impl DeltaListener {
    /// Subscribes to the deltas of `namespace`.
    pub(crate) async fn connect(nodes: &Nodes, namespace: &str) -> Result<Self, StoreError> {
        let (sender, pushes) = mpsc::unbounded_channel();
        let subscriber = match nodes.cluster_seeds() {
            Some(seeds) => {
                let client = redis::cluster::ClusterClientBuilder::new(seeds)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(sender)
                    .build()?;
                Subscriber::Cluster(client.get_async_connection().await?)
            }
            None => {
                let info = nodes
                    .client_for_key(namespace)
                    .await?
                    .get_connection_info()
                    .clone();
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client = Client::open(info.set_redis_settings(settings))?;
                let config = redis::AsyncConnectionConfig::new().set_push_sender(sender);
                Subscriber::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
        };
        let mut ticker = tokio::time::interval(NEW_PARTITIONS_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listener = Self {
            subscriber,
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
            let push = tokio::select! {
                push = self.pushes.recv() => push,
                _ = self.ticker.tick() => {
                    if self.follow_new_partitions().await? {
                        return Ok(Some(Heard::Gap));
                    }
                    continue;
                }
            };
            let Some(push) = push else { return Ok(None) };
            match push.kind {
                PushKind::SMessage => {
                    if let Some(Value::BulkString(payload)) = push.data.into_iter().nth(1) {
                        return Ok(Some(Heard::Delta(payload)));
                    }
                }
                // What was published meanwhile is lost. The cluster client
                // subscribes again by itself; one Redis's connection is gone.
                PushKind::Disconnection => {
                    return Ok(match self.subscriber {
                        Subscriber::Cluster(_) => Some(Heard::Gap),
                        Subscriber::Single(_) => None,
                    });
                }
                _ => {}
            }
        }
    }

    /// Subscribes to the channels of partitions not followed yet; whether
    /// there were any (their first deltas may have gone out before).
    async fn follow_new_partitions(&mut self) -> Result<bool, StoreError> {
        let partitions = MetricReader::discover(&self.nodes, &self.namespace)
            .await?
            .partitions();
        let new: Vec<i32> = partitions
            .into_iter()
            .filter(|partition| !self.followed.contains(partition))
            .collect();
        if new.is_empty() {
            return Ok(false);
        }
        for partition in new {
            // One command per channel: on a cluster the channels are in
            // different slots.
            let channel = PartitionKeys::new(&self.namespace, partition).deltas();
            self.subscriber.ssubscribe(&channel).await?;
            self.followed.insert(partition);
        }
        Ok(true)
    }
}
