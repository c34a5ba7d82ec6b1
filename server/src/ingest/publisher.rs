//! Publishes each commit's `CommitDelta` for the streaming API, off the
//! commit path: a bounded queue and a task of its own, so publishing can
//! drop a delta but never delays or fails a commit (subscribers that miss
//! one resync).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{delta_channel, nodes::Nodes};

/// A commit's `CommitDelta`, encoded, with its partition.
pub(crate) type Published = (i32, Vec<u8>);

/// Publishes the deltas of `queued` (encoded, by partition) of `namespace`
/// in order until `shutdown`; a failed publish is logged (once per outage)
/// and dropped.
pub(crate) async fn publish_deltas(
    redis: Nodes,
    namespace: String,
    mut queued: mpsc::Receiver<Published>,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    loop {
        let delta = tokio::select! {
            () = shutdown.cancelled() => return,
            delta = queued.recv() => match delta { Some(delta) => delta, None => return },
        };
        let (partition, delta) = delta;
        let publish = delta_channel::publish(&redis, &namespace, partition, &delta);
        // Reaching Redis can take long while it is unreachable: never past
        // shutdown.
        let published = tokio::select! {
            () = shutdown.cancelled() => return,
            published = publish => published,
        };
        match published {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("publishing deltas again");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(error = %error, "cannot publish deltas; subscribers will resync");
            }
            Err(_) => {}
        }
    }
}
