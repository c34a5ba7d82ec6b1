//! The dead-letter topic: records the pipeline cannot apply, kept byte for
//! byte with why and where they came from, so an operator can inspect and
//! replay them.
//!
//! Each dead letter has the original key, value and timestamp, and headers:
//! `rtap-reason` (a [`Reason`](super::validate::Reason) name), `rtap-detail`
//! (the invalid fields or the decoder's message), `rtap-source-topic`,
//! `rtap-source-partition` and `rtap-source-offset`. A record on source
//! partition `p` goes to dead-letter partition `p mod n`.
//!
//! Dead letters are written before the commit that counts them, so none is
//! lost; a crash between the two writes them again (at least once).

use std::collections::BTreeMap;

use rskafka::{
    client::partition::{Compression, PartitionClient},
    record::{Record, RecordAndOffset},
};

use super::validate::Rejection;

/// Header with the rejection reason.
pub const REASON_HEADER: &str = "rtap-reason";
/// Header with the details of the rejection.
pub(crate) const DETAIL_HEADER: &str = "rtap-detail";
/// Header with the source topic.
pub(crate) const SOURCE_TOPIC_HEADER: &str = "rtap-source-topic";
/// Header with the source partition.
pub(crate) const SOURCE_PARTITION_HEADER: &str = "rtap-source-partition";
/// Header with the source offset.
pub const SOURCE_OFFSET_HEADER: &str = "rtap-source-offset";

/// The dead letter of `record`, read at `partition`/`offset` of `topic`.
pub(crate) fn dead_letter(
    record: &RecordAndOffset,
    topic: &str,
    partition: i32,
    rejection: &Rejection,
) -> Record {
    let detail = if rejection.violations.is_empty() {
        rejection.detail.clone()
    } else {
        rejection
            .violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let headers = BTreeMap::from([
        (
            REASON_HEADER.to_owned(),
            rejection.reason.as_str().as_bytes().to_vec(),
        ),
        (DETAIL_HEADER.to_owned(), detail.into_bytes()),
        (SOURCE_TOPIC_HEADER.to_owned(), topic.as_bytes().to_vec()),
        (
            SOURCE_PARTITION_HEADER.to_owned(),
            partition.to_string().into_bytes(),
        ),
        (
            SOURCE_OFFSET_HEADER.to_owned(),
            record.offset.to_string().into_bytes(),
        ),
    ]);
    Record {
        key: record.record.key.clone(),
        value: record.record.value.clone(),
        headers,
        timestamp: record.record.timestamp,
    }
}

/// Writes dead letters to one partition of the dead-letter topic.
pub(crate) struct DeadLetterSink {
    partition: PartitionClient,
}

impl DeadLetterSink {
    /// A sink writing to `partition`.
    pub(crate) fn new(partition: PartitionClient) -> Self {
        Self { partition }
    }

    /// Stores `records`; returns once the broker acknowledged them.
    pub(crate) async fn send(
        &self,
        records: Vec<Record>,
    ) -> Result<(), rskafka::client::error::Error> {
        if records.is_empty() {
            return Ok(());
        }
        self.partition
            .produce(records, Compression::NoCompression)
            .await
            .map(|_| ())
    }
}
