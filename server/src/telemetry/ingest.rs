//! A partition's metrics, as handles its consumer keeps: a commit records
//! into them without a look-up.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::{
    COMMIT_DURATION, COMMIT_RECORDS, COMMIT_ROUND_TRIPS, COMMITS, DEAD_LETTERS, DUPLICATES,
    EVENTS_APPLIED, HIGH_WATERMARK, LAG, LAST_COMMIT, LATE_EVENTS, PARTITION_OWNED, RECORDS,
    STORED_OFFSET,
};

/// What one commit did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CommitFigures {
    /// Records of the chunk (dead letters and duplicates included).
    pub(crate) records: usize,
    /// Events counted.
    pub(crate) applied: i64,
    /// Duplicates skipped.
    pub(crate) duplicates: i64,
    /// Late events among those counted.
    pub(crate) late: i64,
    /// Redis round trips, the commit's included.
    pub(crate) round_trips: usize,
    /// How long the commit transaction took.
    pub(crate) took: Duration,
    /// The offset stored by the commit.
    pub(crate) next_offset: i64,
    /// The partition's high watermark as last fetched (negative: unknown).
    pub(crate) high_watermark: i64,
}

/// The handles of one partition.
pub(crate) struct PartitionMetrics {
    records: Counter,
    applied: Counter,
    duplicates: Counter,
    late: Counter,
    commits: Counter,
    commit_duration: Histogram,
    commit_records: Histogram,
    round_trips: Histogram,
    stored_offset: Gauge,
    high_watermark: Gauge,
    lag: Gauge,
    last_commit: Gauge,
    owned: Gauge,
    /// Dead letters by reason.
    dead_letters: Vec<(&'static str, Counter)>,
}

impl PartitionMetrics {
    /// The handles of `partition`, whose records may be dead-lettered for
    /// `reasons`. Every series starts at zero, so that rates and alerts
    /// see it before its first increment.
    pub(crate) fn new(partition: i32, reasons: &[&'static str]) -> Self {
        let label = partition.to_string();
        let labels = [("partition", label.clone())];
        let dead_letters = reasons
            .iter()
            .map(|reason| {
                let counter =
                    counter!(DEAD_LETTERS, "partition" => label.clone(), "reason" => *reason);
                counter.increment(0);
                (*reason, counter)
            })
            .collect();
        let metrics = Self {
            dead_letters,
            records: counter!(RECORDS, &labels),
            applied: counter!(EVENTS_APPLIED, &labels),
            duplicates: counter!(DUPLICATES, &labels),
            late: counter!(LATE_EVENTS, &labels),
            commits: counter!(COMMITS, &labels),
            commit_duration: histogram!(COMMIT_DURATION, &labels),
            commit_records: histogram!(COMMIT_RECORDS, &labels),
            round_trips: histogram!(COMMIT_ROUND_TRIPS, &labels),
            stored_offset: gauge!(STORED_OFFSET, &labels),
            high_watermark: gauge!(HIGH_WATERMARK, &labels),
            lag: gauge!(LAG, &labels),
            last_commit: gauge!(LAST_COMMIT, &labels),
            owned: gauge!(PARTITION_OWNED, &labels),
        };
        for counter in [
            &metrics.records,
            &metrics.applied,
            &metrics.duplicates,
            &metrics.late,
            &metrics.commits,
        ] {
            counter.increment(0);
        }
        metrics.owned(false);
        metrics
    }

    /// Records a commit, and the dead letters it wrote by reason.
    pub(crate) fn committed(&self, figures: CommitFigures, dead_lettered: &[(&'static str, i64)]) {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        self.records
            .increment(u64::try_from(figures.records).unwrap_or(u64::MAX));
        self.applied.increment(count(figures.applied));
        self.duplicates.increment(count(figures.duplicates));
        self.late.increment(count(figures.late));
        self.commits.increment(1);
        self.commit_duration.record(figures.took.as_secs_f64());
        self.commit_records.record(figures.records as f64);
        self.round_trips.record(figures.round_trips as f64);
        self.stored_offset.set(figures.next_offset as f64);
        if figures.high_watermark >= 0 {
            self.high_watermark.set(figures.high_watermark as f64);
            self.lag.set(
                figures
                    .high_watermark
                    .saturating_sub(figures.next_offset)
                    .max(0) as f64,
            );
        }
        self.last_commit.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        for (reason, letters) in dead_lettered {
            if let Some((_, counter)) = self.dead_letters.iter().find(|(name, _)| name == reason) {
                counter.increment(count(*letters));
            }
        }
    }

    /// Whether this process holds the partition's lease.
    pub(crate) fn owned(&self, owned: bool) {
        self.owned.set(if owned { 1.0 } else { 0.0 });
    }
}
