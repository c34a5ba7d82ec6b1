//! What the simulator tells Prometheus, served by the binary on
//! `--metrics-addr` (`rtap::telemetry`). The names are in one list here;
//! shards and the producer keep counting into their own atomics and
//! arrays, and [`export`] copies them every second, so producing a record
//! costs no metric call.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use tokio_util::sync::CancellationToken;

use crate::producer::{ProducerStats, QueueProbe};

/// Events generated and handed to the producer, by `type` and `source`.
pub const EVENTS: &str = "rtap_simulator_events_total";
/// Records generated, by `kind` (`event`, `duplicate`, `malformed`).
pub const RECORDS: &str = "rtap_simulator_records_total";
/// Records the broker acknowledged.
pub const ACKNOWLEDGED: &str = "rtap_simulator_records_acknowledged_total";
/// Records dropped at shutdown, undelivered.
pub const UNDELIVERED: &str = "rtap_simulator_records_undelivered_total";
/// Time of one produce request, retries not included.
pub const PRODUCE_DURATION: &str = "rtap_simulator_produce_duration_seconds";
/// Produce requests that failed and were retried.
pub const RETRIES: &str = "rtap_simulator_produce_retries_total";
/// Batches waiting for the partitions' producers.
pub const QUEUE_DEPTH: &str = "rtap_simulator_queued_batches";

/// How often the counters are copied into the metrics.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Installs the process's recorder and describes every metric.
pub fn install()
-> Result<&'static rtap::telemetry::PrometheusHandle, rtap::telemetry::TelemetryError> {
    let handle = rtap::telemetry::install(&[])?;
    describe_counter!(
        EVENTS,
        "Events generated and handed to the producer, by type and source"
    );
    describe_counter!(
        RECORDS,
        "Records generated, by kind (event, duplicate, malformed)"
    );
    describe_counter!(ACKNOWLEDGED, "Records the broker acknowledged");
    describe_counter!(UNDELIVERED, "Records dropped at shutdown, undelivered");
    describe_histogram!(
        PRODUCE_DURATION,
        Unit::Seconds,
        "Time of one produce request"
    );
    describe_counter!(RETRIES, "Produce requests that failed and were retried");
    describe_gauge!(QUEUE_DEPTH, "Batches waiting for the partitions' producers");
    Ok(handle)
}

/// Copies the producer's counters and queue depth into the metrics every
/// second until `stop`.
pub(crate) async fn export(stats: Arc<ProducerStats>, queue: QueueProbe, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(EXPORT_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        counter!(ACKNOWLEDGED).absolute(stats.acknowledged.load(Ordering::Relaxed));
        counter!(RETRIES).absolute(stats.failed_requests.load(Ordering::Relaxed));
        counter!(UNDELIVERED).absolute(stats.undelivered.load(Ordering::Relaxed));
        gauge!(QUEUE_DEPTH).set(queue.queued() as f64);
    }
}

/// What one shard's metrics were last told, so each export adds only what
/// its ground truth counted since.
#[derive(Debug)]
pub(crate) struct ShardExport {
    events: std::collections::HashMap<(&'static str, &'static str), u64>,
    records: [u64; 3],
    last: std::time::Instant,
}

impl Default for ShardExport {
    fn default() -> Self {
        Self {
            events: std::collections::HashMap::new(),
            records: [0; 3],
            last: std::time::Instant::now(),
        }
    }
}

impl ShardExport {
    /// [`Self::export`], at most once a second.
    pub(crate) fn export_every_second(&mut self, truth: &crate::truth::GroundTruth) {
        if self.last.elapsed() >= EXPORT_EVERY {
            self.export(truth);
        }
    }

    /// Adds what `truth` counted since the last call to the metrics.
    pub(crate) fn export(&mut self, truth: &crate::truth::GroundTruth) {
        self.last = std::time::Instant::now();
        for (source, event_type, count) in truth.events_by_slot() {
            let exported = self.events.entry((source, event_type)).or_default();
            if count > *exported {
                counter!(EVENTS, "type" => event_type, "source" => source)
                    .increment(count - *exported);
                *exported = count;
            }
        }
        let malformed = truth.records - truth.events - truth.duplicates;
        let records = [truth.events, truth.duplicates, malformed];
        for ((kind, now), exported) in ["event", "duplicate", "malformed"]
            .into_iter()
            .zip(records)
            .zip(&mut self.records)
        {
            if now > *exported {
                counter!(RECORDS, "kind" => kind).increment(now - *exported);
                *exported = now;
            }
        }
    }
}
