//! The records a run produces: valid events, their repeats, and the
//! malformed payloads a consumer must reject.

use chrono::{DateTime, Utc};
use prost::Message;
use rand::Rng;
use rand_xoshiro::Xoshiro256PlusPlus;
use rtap::v1::EventType;

use super::event::{Event, random_uuid};

/// One record for Kafka. Its value is encoded where the producer asks for
/// it ([`Emission::write_value`]), straight into the batch it joins: an
/// encoded copy per record, moved from buffer to buffer, cost more than
/// encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Emission {
    /// The user the record is keyed by (see [`rtap::kafka::record_key`]).
    pub user_id: i64,
    /// Event time, used as the record timestamp.
    pub occurred_at: DateTime<Utc>,
    /// What the record is.
    pub kind: EmissionKind,
}

/// What a record is, for the ground truth, and what its value is made of.
#[derive(Debug, Clone, PartialEq)]
pub enum EmissionKind {
    /// A valid event produced for the first time.
    Event {
        /// The event.
        event: Event,
        /// It was held back and produced after newer events.
        late: bool,
    },
    /// A repeat of an event already produced (same `event_id`, same value).
    Duplicate(Event),
    /// A payload a consumer must reject.
    Malformed {
        /// How it is broken.
        kind: MalformedKind,
        /// The record value.
        payload: Vec<u8>,
    },
}

impl Emission {
    /// The record key.
    pub fn key(&self) -> Vec<u8> {
        rtap::kafka::record_key(self.user_id)
    }

    /// The record value: the encoded event, or the malformed payload.
    pub fn value(&self) -> Vec<u8> {
        let mut value = Vec::new();
        self.write_value(&mut value);
        value
    }

    /// Appends the record value to `buffer`.
    pub fn write_value(&self, buffer: &mut Vec<u8>) {
        match &self.kind {
            EmissionKind::Event { event, .. } | EmissionKind::Duplicate(event) => {
                event.encode(buffer);
            }
            EmissionKind::Malformed { payload, .. } => buffer.extend_from_slice(payload),
        }
    }

    /// The record of a valid event.
    pub(super) fn event(event: Event, late: bool) -> Self {
        Self {
            user_id: event.user_id,
            occurred_at: event.occurred_at(),
            kind: EmissionKind::Event { event, late },
        }
    }

    /// A malformed payload of a random kind, made from `event` (with an id
    /// of its own, so it never shares the valid event's).
    pub(super) fn malformed(event: &Event, rng: &mut Xoshiro256PlusPlus) -> Self {
        let kind = MalformedKind::ALL[rng.random_range(0..MalformedKind::ALL.len())];
        let mut broken = event.to_message();
        broken.event_id = random_uuid(rng).hyphenated().to_string();
        let value = match kind {
            MalformedKind::Garbage => {
                // 0x0f: field 1 with wire type 7, which does not exist.
                let mut bytes = vec![0x0f];
                let len = rng.random_range(8..32);
                bytes.extend((0..len).map(|_| rng.random::<u8>()));
                bytes
            }
            MalformedKind::Truncated => {
                // Cuts through the 36-character event_id, the first field.
                let mut bytes = broken.encode_to_vec();
                bytes.truncate(10);
                bytes
            }
            MalformedKind::UnspecifiedType => {
                broken.r#type = EventType::Unspecified as i32;
                broken.encode_to_vec()
            }
            MalformedKind::MissingEventId => {
                broken.event_id.clear();
                broken.encode_to_vec()
            }
            MalformedKind::FutureTime => {
                let time = broken.occurred_at.unwrap_or_default();
                broken.occurred_at = Some(prost_types::Timestamp {
                    seconds: time.seconds + 7 * 24 * 3600,
                    nanos: time.nanos,
                });
                broken.encode_to_vec()
            }
            MalformedKind::NegativeDwell => {
                broken.dwell_time = Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                });
                broken.encode_to_vec()
            }
        };
        Self {
            user_id: event.user_id,
            occurred_at: event.occurred_at(),
            kind: EmissionKind::Malformed {
                kind,
                payload: value,
            },
        }
    }
}

/// The kinds of malformed payload the simulator injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MalformedKind {
    /// Not protobuf at all.
    Garbage,
    /// A valid event cut short.
    Truncated,
    /// Event type left unspecified.
    UnspecifiedType,
    /// No `event_id`.
    MissingEventId,
    /// Event time a week in the future.
    FutureTime,
    /// Negative dwell time.
    NegativeDwell,
}

impl MalformedKind {
    const ALL: [Self; 6] = [
        Self::Garbage,
        Self::Truncated,
        Self::UnspecifiedType,
        Self::MissingEventId,
        Self::FutureTime,
        Self::NegativeDwell,
    ];

    /// Stable name, as written to the ground truth.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Garbage => "garbage",
            Self::Truncated => "truncated",
            Self::UnspecifiedType => "unspecified_type",
            Self::MissingEventId => "missing_event_id",
            Self::FutureTime => "future_time",
            Self::NegativeDwell => "negative_dwell",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rtap::v1::InteractionEvent;

    use super::*;
    use crate::model::{
        ModelParams,
        testing::{generator, take},
    };

    #[test]
    fn duplicate_and_malformed_shares_are_honoured() {
        let params = ModelParams {
            duplicate_share: 0.05,
            malformed_share: 0.02,
            late_share: 0.0,
            ..ModelParams::default()
        };
        let emissions = take(&mut generator(params, 3, 1000.0), 100_000);
        let mut originals = 0.0_f64;
        let mut duplicates = 0.0_f64;
        let mut malformed: HashMap<MalformedKind, f64> = HashMap::new();
        for (i, emission) in emissions.iter().enumerate() {
            match &emission.kind {
                EmissionKind::Event { .. } => originals += 1.0,
                EmissionKind::Duplicate(_) => {
                    duplicates += 1.0;
                    assert_eq!(
                        emission.value(),
                        emissions[i - 1].value(),
                        "same payload, same event_id"
                    );
                }
                EmissionKind::Malformed { kind, .. } => {
                    *malformed.entry(*kind).or_default() += 1.0;
                    let decoded = InteractionEvent::decode(emission.value().as_slice());
                    match kind {
                        MalformedKind::Garbage | MalformedKind::Truncated => {
                            assert!(decoded.is_err())
                        }
                        MalformedKind::UnspecifiedType => {
                            assert_eq!(decoded.expect("decodes").r#type(), EventType::Unspecified);
                        }
                        MalformedKind::MissingEventId => {
                            assert!(decoded.expect("decodes").event_id.is_empty());
                        }
                        MalformedKind::FutureTime => {
                            let time = decoded.expect("decodes").occurred_at.expect("time");
                            assert!(time.seconds > emission.occurred_at.timestamp() + 6 * 86_400);
                        }
                        MalformedKind::NegativeDwell => {
                            assert!(
                                decoded.expect("decodes").dwell_time.expect("dwell").seconds < 0
                            );
                        }
                    }
                }
            }
        }
        assert!(
            (duplicates / originals - 0.05).abs() < 0.004,
            "{duplicates}"
        );
        let bad: f64 = malformed.values().sum();
        assert!((bad / originals - 0.02).abs() < 0.003, "{bad}");
        assert_eq!(
            malformed.len(),
            MalformedKind::ALL.len(),
            "every kind appears"
        );
    }
}
