//! A partition's vital signs, and their sum over partitions: the one
//! reckoning behind `GetPipelineStatus`, the ingest status log lines and the
//! subscription watermark.

use std::collections::BTreeMap;

use super::commit::PartitionState;

/// What is known of one partition: its stored state, and the broker's high
/// watermark when it could be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionVitals {
    /// The partition.
    pub(crate) partition: i32,
    /// What the store holds about it.
    pub(crate) state: PartitionState,
    /// The offset after its last record, when the broker answered.
    pub(crate) high_watermark: Option<i64>,
}

impl PartitionVitals {
    /// The next offset to apply (0 before the first commit).
    pub(crate) fn stored_offset(&self) -> i64 {
        self.state.offset.unwrap_or(0)
    }

    /// Records in the topic not applied yet; `None` when the high watermark
    /// is unknown.
    pub(crate) fn lag(&self) -> Option<i64> {
        self.high_watermark
            .map(|mark| mark.saturating_sub(self.stored_offset()).max(0))
    }
}

/// The sum of several partitions' vital signs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Events counted.
    pub(crate) applied: i64,
    /// Duplicates skipped.
    pub(crate) duplicates: i64,
    /// Late events counted.
    pub(crate) late: i64,
    /// Lag of the partitions whose high watermark is known.
    pub(crate) lag: i64,
    /// Dead letters per reason.
    pub(crate) dead_lettered: BTreeMap<String, i64>,
    /// The latest event time applied anywhere, Unix ms.
    pub(crate) latest_event_ms: Option<i64>,
}

impl Totals {
    /// The sum over `partitions`.
    pub(crate) fn of<'a>(partitions: impl IntoIterator<Item = &'a PartitionVitals>) -> Self {
        let mut totals = Self::default();
        for vitals in partitions {
            let state = &vitals.state;
            totals.applied += state.applied;
            totals.duplicates += state.duplicates;
            totals.late += state.late;
            totals.lag += vitals.lag().unwrap_or(0);
            for (reason, count) in &state.dead_lettered {
                *totals.dead_lettered.entry(reason.clone()).or_default() += count;
            }
            totals.latest_event_ms = totals.latest_event_ms.max(state.watermark_ms);
        }
        totals
    }

    /// Records dead-lettered, all reasons together.
    pub(crate) fn dead_lettered_count(&self) -> i64 {
        self.dead_lettered.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vitals(
        partition: i32,
        offset: i64,
        mark: Option<i64>,
        dead: &[(&str, i64)],
    ) -> PartitionVitals {
        PartitionVitals {
            partition,
            state: PartitionState {
                offset: Some(offset),
                watermark_ms: Some(1_000 * i64::from(partition)),
                applied: offset,
                duplicates: 1,
                late: 2,
                dead_lettered: dead.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
                ..PartitionState::default()
            },
            high_watermark: mark,
        }
    }

    #[test]
    fn totals_add_up_and_leave_unknown_lags_out() {
        let partitions = [
            vitals(0, 10, Some(15), &[("too_old", 1)]),
            vitals(1, 20, None, &[("too_old", 2), ("decode_error", 1)]),
            vitals(2, 30, Some(25), &[]),
        ];
        assert_eq!(partitions[0].lag(), Some(5));
        assert_eq!(partitions[1].lag(), None);
        assert_eq!(partitions[2].lag(), Some(0));
        let totals = Totals::of(&partitions);
        assert_eq!(totals.applied, 60);
        assert_eq!(totals.duplicates, 3);
        assert_eq!(totals.late, 6);
        assert_eq!(totals.lag, 5);
        assert_eq!(totals.dead_lettered["too_old"], 3);
        assert_eq!(totals.dead_lettered_count(), 4);
        assert_eq!(totals.latest_event_ms, Some(2_000));
    }
}
