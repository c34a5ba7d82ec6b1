//! What the simulator produces meets RTAP's event validator: every event it
//! means to be valid passes, every malformed payload is rejected.

use chrono::{DateTime, TimeDelta, Utc};
use rtap_server::ingest::validate::{Reason, TimeBounds, decode};
use rtap_simulator::model::{EmissionKind, Generator, MalformedKind, ModelParams, Population};

#[test]
fn valid_events_pass_and_malformed_payloads_are_rejected_for_their_reason() {
    let start: DateTime<Utc> = "2026-02-02T10:00:00Z".parse().expect("valid time");
    let params = ModelParams {
        malformed_share: 0.05,
        duplicate_share: 0.02,
        ..ModelParams::default()
    };
    let mut generator =
        Generator::new(params, Population::synthetic(100_000, 500), 8, start, 500.0)
            .expect("valid model");
    let emissions: Vec<_> = (0..30_000).map(|_| generator.next_emission()).collect();
    let now = generator.clock() + TimeDelta::minutes(1);
    let mut rejected_kinds = std::collections::BTreeSet::new();
    for emission in &emissions {
        let verdict = decode(&emission.value(), now, TimeBounds::default());
        match &emission.kind {
            EmissionKind::Event { .. } | EmissionKind::Duplicate(_) => {
                assert!(verdict.is_ok(), "{verdict:?}");
            }
            EmissionKind::Malformed { kind, .. } => {
                let reason = verdict.expect_err("malformed payloads are rejected").reason;
                let expected = match kind {
                    MalformedKind::Garbage | MalformedKind::Truncated => Reason::DecodeError,
                    MalformedKind::FutureTime => Reason::FutureTime,
                    _ => Reason::InvalidField,
                };
                assert_eq!(reason, expected, "{kind:?}");
                rejected_kinds.insert(*kind);
            }
        }
    }
    assert_eq!(rejected_kinds.len(), 6, "every malformed kind was seen");
}
