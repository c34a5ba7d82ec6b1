//! Conversions between protobuf `Timestamp`/`Duration` and the integer
//! milliseconds and microseconds the metric store keeps: one place, shared
//! by ingest and analytics.

/// A timestamp from Unix milliseconds.
pub fn timestamp_from_millis(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Unix milliseconds of a timestamp.
pub fn timestamp_millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// A duration from microseconds.
pub fn duration_from_micros(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// Microseconds of a duration.
pub fn duration_micros(d: &prost_types::Duration) -> i64 {
    d.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(d.nanos) / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_including_before_the_epoch() {
        for ms in [-1_500, 0, 1, 1_764_000_000_123] {
            assert_eq!(timestamp_millis(&timestamp_from_millis(ms)), ms);
        }
        for micros in [-2_500_001, 0, 37_979_925] {
            assert_eq!(duration_micros(&duration_from_micros(micros)), micros);
        }
    }
}
