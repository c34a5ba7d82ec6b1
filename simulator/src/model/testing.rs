//! What the model's tests share: a generator over a million synthetic users
//! and the records it makes.

use chrono::{DateTime, Utc};
use prost::Message;
use rtap::v1::InteractionEvent;

use super::{Emission, EmissionKind, Generator, ModelParams, Population};

/// The start time of every test run.
pub(super) fn start() -> DateTime<Utc> {
    "2026-01-05T08:00:00Z".parse().expect("a valid time")
}

/// A generator over a million users and a thousand products.
pub(super) fn generator(params: ModelParams, seed: u64, events_per_second: f64) -> Generator {
    Generator::new(
        params,
        Population::synthetic(1_000_000, 1000),
        seed,
        start(),
        events_per_second,
    )
    .expect("valid model")
}

/// The first `n` records.
pub(super) fn take(generator: &mut Generator, n: usize) -> Vec<Emission> {
    (0..n).map(|_| generator.next_emission()).collect()
}

/// The valid events produced for the first time, decoded.
pub(super) fn events(emissions: &[Emission]) -> Vec<InteractionEvent> {
    emissions
        .iter()
        .filter(|e| matches!(e.kind, EmissionKind::Event { .. }))
        .map(|e| InteractionEvent::decode(e.value().as_slice()).expect("valid events decode"))
        .collect()
}
