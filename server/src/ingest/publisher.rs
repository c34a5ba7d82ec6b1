//! Publishes each commit's `CommitDelta` for the streaming API, off the
//! commit path: a bounded queue and a task of its own, so publishing can
//! drop a delta but never delays or fails a commit (subscribers that miss
//! one resync).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{
    StoreError,
    nodes::{Nodes, Route},
};

/// Publishes the deltas of `queued` on `channel` in order until `shutdown`;
/// a failed publish is logged (once per outage) and dropped.
pub(crate) async fn publish_deltas(
    redis: Nodes,
    channel: String,
    mut queued: mpsc::Receiver<Vec<u8>>,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    loop {
        let delta = tokio::select! {
            () = shutdown.cancelled() => return,
            delta = queued.recv() => match delta { Some(delta) => delta, None => return },
        };
        let publish = async {
            let mut connection = redis.connection(&channel).await?;
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(delta)
                .query_async::<i64>(&mut connection)
                .await
                .map_err(StoreError::from)
        };
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
