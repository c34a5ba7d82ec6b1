//! The pipeline's vital signs in the log, every `--status-log-interval`: one
//! line per partition consumed here and one with the totals, so an operator
//! without a client sees the pipeline breathing.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use tokio_util::sync::CancellationToken;

use super::consumer::PipelineSettings;
use crate::store::{
    StoreError, commit,
    keys::PartitionKeys,
    nodes::{Nodes, Route},
    status::{PartitionVitals, Totals},
};

/// Logs until `shutdown`; `high_watermarks` are the latest each partition's
/// fetcher saw (negative: none yet).
pub(crate) async fn log_status(
    settings: Arc<PipelineSettings>,
    redis: Nodes,
    high_watermarks: Vec<(i32, Arc<AtomicI64>)>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(settings.status_log_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Reading Redis can take long while it is unreachable: never past
        // shutdown.
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            read = vitals(&settings.namespace, &redis, &high_watermarks) => read,
        };
        match read {
            Ok(vitals) => log(&vitals),
            Err(error) => {
                tracing::warn!(error = %error, "pipeline status: cannot read partition states");
            }
        }
    }
}

async fn vitals(
    namespace: &str,
    nodes: &Nodes,
    high_watermarks: &[(i32, Arc<AtomicI64>)],
) -> Result<Vec<PartitionVitals>, StoreError> {
    let mut vitals = Vec::with_capacity(high_watermarks.len());
    for (partition, high_watermark) in high_watermarks {
        let keys = PartitionKeys::new(namespace, *partition);
        let high_watermark = high_watermark.load(Ordering::Relaxed);
        let mut redis = nodes.connection(&keys.state()).await?;
        vitals.push(PartitionVitals {
            partition: *partition,
            state: commit::load_state(&mut redis, &keys).await?,
            high_watermark: (high_watermark >= 0).then_some(high_watermark),
        });
    }
    Ok(vitals)
}

fn log(vitals: &[PartitionVitals]) {
    for partition in vitals {
        let state = &partition.state;
        tracing::info!(
            partition = partition.partition,
            offset = partition.stored_offset(),
            high_watermark = partition.high_watermark.unwrap_or(-1),
            lag = partition.lag().unwrap_or(-1),
            applied = state.applied,
            duplicates = state.duplicates,
            dead_lettered = ?state.dead_lettered,
            late = state.late,
            last_commit_ms = state.last_commit_ms,
            "pipeline partition status"
        );
    }
    let totals = Totals::of(vitals);
    tracing::info!(
        partitions = vitals.len(),
        applied = totals.applied,
        duplicates = totals.duplicates,
        dead_lettered = totals.dead_lettered_count(),
        late = totals.late,
        lag = totals.lag,
        "pipeline status"
    );
}
