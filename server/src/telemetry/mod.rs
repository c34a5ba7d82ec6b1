//! What RTAP tells Prometheus. Every metric's name, unit and help are in
//! [`describe`], the one list an operator reads; `rtap::telemetry` holds the
//! recorder and serves `/metrics` on `--metrics-addr`.
//!
//! Label sets are bounded: services and methods of the contract, gRPC
//! codes, partitions, dead-letter reasons, dependencies; never a user or a
//! product. Recording costs an atomic operation on a handle kept by its
//! owner: per commit and per call, never per event.

pub(crate) mod grpc;
pub(crate) mod ingest;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};

use crate::error::Error;

/// gRPC calls handled, by `service`, `method` and `code`.
pub(crate) const GRPC_REQUESTS: &str = "rtap_grpc_requests_total";
/// Time from a call's arrival to its end (a stream's whole life), by
/// `service` and `method`.
pub(crate) const GRPC_DURATION: &str = "rtap_grpc_request_duration_seconds";
/// Open Subscribe streams.
pub(crate) const SUBSCRIPTIONS_OPEN: &str = "rtap_subscriptions_open";
/// Running feeds (distinct subscribed queries).
pub(crate) const FEEDS: &str = "rtap_feeds";
/// Deltas sent to subscribers.
pub(crate) const DELTAS_SENT: &str = "rtap_subscription_deltas_sent_total";
/// Resync snapshots sent to subscribers, by `reason`.
pub(crate) const SUBSCRIBER_RESYNCS: &str = "rtap_subscription_resyncs_total";
/// Feed refreshes that read Redis, by `kind` (`partial`, `full`, `failed`).
pub(crate) const FEED_REFRESHES: &str = "rtap_feed_refreshes_total";
/// Commit deltas feeds applied in memory.
pub(crate) const FEED_DELTAS_APPLIED: &str = "rtap_feed_deltas_applied_total";
/// Times the process told every feed to re-read (a reconnection, a gap).
pub(crate) const FEED_RESYNCS: &str = "rtap_feed_resyncs_total";
/// How long the feed furthest behind has had a change unread.
pub(crate) const FEED_MAX_BEHIND: &str = "rtap_feed_max_behind_seconds";
/// Feeds waiting for a refresh slot.
pub(crate) const FEED_WAITING: &str = "rtap_feed_waiting";
/// Bytes of deltas the feeds keep for resuming subscribers.
pub(crate) const FEED_HISTORY_BYTES: &str = "rtap_feed_history_bytes";
/// Commit deltas the ingest publisher dropped because it was behind.
pub(crate) const DELTAS_DROPPED: &str = "rtap_ingest_deltas_dropped_total";
/// Records fetched and committed, by `partition`.
pub(crate) const RECORDS: &str = "rtap_ingest_records_total";
/// Events counted, by `partition`.
pub(crate) const EVENTS_APPLIED: &str = "rtap_ingest_events_applied_total";
/// Duplicates skipped, by `partition`.
pub(crate) const DUPLICATES: &str = "rtap_ingest_duplicates_total";
/// Late events counted, by `partition`.
pub(crate) const LATE_EVENTS: &str = "rtap_ingest_late_events_total";
/// Records dead-lettered, by `partition` and `reason`.
pub(crate) const DEAD_LETTERS: &str = "rtap_ingest_dead_letters_total";
/// Commits, by `partition`.
pub(crate) const COMMITS: &str = "rtap_ingest_commits_total";
/// Time of one commit transaction, by `partition`.
pub(crate) const COMMIT_DURATION: &str = "rtap_ingest_commit_duration_seconds";
/// Records per commit, by `partition`.
pub(crate) const COMMIT_RECORDS: &str = "rtap_ingest_commit_records";
/// Redis round trips per commit (reads before it, and the commit), by
/// `partition`.
pub(crate) const COMMIT_ROUND_TRIPS: &str = "rtap_ingest_commit_redis_round_trips";
/// The next offset to apply, as stored with the aggregates, by `partition`.
pub(crate) const STORED_OFFSET: &str = "rtap_ingest_stored_offset";
/// The partition's high watermark as last fetched, by `partition`.
pub(crate) const HIGH_WATERMARK: &str = "rtap_ingest_high_watermark";
/// Records not applied yet, by `partition`.
pub(crate) const LAG: &str = "rtap_ingest_lag_records";
/// Unix time of the partition's last commit here, by `partition`.
pub(crate) const LAST_COMMIT: &str = "rtap_ingest_last_commit_timestamp_seconds";
/// 1 while this process holds the partition's lease, by `partition`.
pub(crate) const PARTITION_OWNED: &str = "rtap_ingest_partition_owned";
/// 1 while a dependency answers its health checks, by `dependency`.
pub(crate) const DEPENDENCY_UP: &str = "rtap_dependency_up";
/// 1, with the `version` and `role` as labels.
pub(crate) const BUILD_INFO: &str = "rtap_build_info";

/// Buckets of the histograms not measured in seconds.
const HISTOGRAMS: &[(&str, &[f64])] = &[
    (
        COMMIT_RECORDS,
        &[
            1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 20000.0,
        ],
    ),
    (
        COMMIT_ROUND_TRIPS,
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0],
    ),
];

/// Installs the process's recorder and describes every metric; `role` goes
/// into the build information.
pub(crate) fn install(
    role: &'static str,
) -> Result<&'static rtap::telemetry::PrometheusHandle, Error> {
    let handle = rtap::telemetry::install(HISTOGRAMS).map_err(|e| Error::Config(e.to_string()))?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "role" => role).set(1.0);
    Ok(handle)
}

/// Help and unit of every metric.
fn describe() {
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls handled, by service, method and status code"
    );
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "Time from a call's arrival to its end (a stream's whole life)"
    );
    describe_gauge!(SUBSCRIPTIONS_OPEN, "Open Subscribe streams");
    describe_gauge!(FEEDS, "Running feeds: distinct subscribed queries");
    describe_counter!(DELTAS_SENT, "Deltas sent to subscribers");
    describe_counter!(
        SUBSCRIBER_RESYNCS,
        "Resync snapshots sent to subscribers, by reason"
    );
    describe_counter!(
        FEED_REFRESHES,
        "Feed refreshes that read Redis, by kind (partial, full, failed)"
    );
    describe_counter!(
        FEED_DELTAS_APPLIED,
        "Commit deltas feeds applied in memory, without reading Redis"
    );
    describe_counter!(
        FEED_RESYNCS,
        "Times every feed was told to re-read (a reconnection, a missed delta)"
    );
    describe_gauge!(
        FEED_MAX_BEHIND,
        Unit::Seconds,
        "How long the feed furthest behind has had a change unread"
    );
    describe_gauge!(FEED_WAITING, "Feeds waiting for a refresh slot");
    describe_gauge!(
        FEED_HISTORY_BYTES,
        Unit::Bytes,
        "Bytes of encoded deltas the feeds keep for resuming subscribers"
    );
    describe_counter!(
        DELTAS_DROPPED,
        "Commit deltas dropped because the publisher was behind"
    );
    describe_counter!(RECORDS, "Records fetched from Kafka and committed");
    describe_counter!(EVENTS_APPLIED, "Events counted into the metrics");
    describe_counter!(DUPLICATES, "Duplicate events skipped");
    describe_counter!(
        LATE_EVENTS,
        "Events counted after their minute had passed the partition's watermark"
    );
    describe_counter!(
        DEAD_LETTERS,
        "Records sent to the dead-letter topic, by reason"
    );
    describe_counter!(COMMITS, "Commits of aggregates and offset");
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Time of one commit transaction"
    );
    describe_histogram!(COMMIT_RECORDS, Unit::Count, "Records per commit");
    describe_histogram!(
        COMMIT_ROUND_TRIPS,
        Unit::Count,
        "Redis round trips per commit, reads included"
    );
    describe_gauge!(
        STORED_OFFSET,
        "The next offset to apply, as stored with the aggregates"
    );
    describe_gauge!(
        HIGH_WATERMARK,
        "The partition's high watermark as last fetched"
    );
    describe_gauge!(
        LAG,
        "Records in the partition not applied yet (at the last commit)"
    );
    describe_gauge!(
        LAST_COMMIT,
        Unit::Seconds,
        "Unix time of the partition's last commit by this process"
    );
    describe_gauge!(
        PARTITION_OWNED,
        "1 while this process holds the partition's lease"
    );
    describe_gauge!(
        DEPENDENCY_UP,
        "1 while the dependency is reported up by the health checks"
    );
    describe_gauge!(
        BUILD_INFO,
        "1, labelled with the version and role of this process"
    );
}

/// Records what the health checks report of `dependency`.
pub(crate) fn dependency_up(dependency: &'static str, up: bool) {
    gauge!(DEPENDENCY_UP, "dependency" => dependency).set(if up { 1.0 } else { 0.0 });
}
