//! Protobuf `Timestamp` and `Duration`: their validity as the well-known
//! types define it, and conversions from and to the integer seconds,
//! milliseconds and microseconds RTAP keeps. The one place that builds them.

use chrono::{DateTime, Utc};

/// Seconds of the earliest valid `Timestamp`, 0001-01-01T00:00:00Z.
pub(crate) const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// Seconds of the latest valid `Timestamp`, 9999-12-31T23:59:59Z.
pub(crate) const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
/// Most seconds of a valid `Duration`, about 10,000 years either way.
pub(crate) const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
const NANOS_PER_SECOND: i32 = 1_000_000_000;

/// Checks `t` as `google.protobuf.Timestamp` defines it: nanos in
/// `[0, 1e9)`, seconds from 0001-01-01 to 9999-12-31 UTC. The error says
/// what is wrong, for a field violation.
pub(crate) fn check_timestamp(t: &prost_types::Timestamp) -> Result<(), String> {
    if !(0..NANOS_PER_SECOND).contains(&t.nanos) {
        return Err(format!(
            "is not a valid timestamp: nanos must be in [0, 999999999], got {}",
            t.nanos
        ));
    }
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds) {
        return Err(format!(
            "is not a valid timestamp: seconds must be within 0001-01-01..9999-12-31 ({MIN_TIMESTAMP_SECONDS}..={MAX_TIMESTAMP_SECONDS}), got {}",
            t.seconds
        ));
    }
    Ok(())
}

/// Checks `d` as `google.protobuf.Duration` defines it: at most about
/// 10,000 years either way, nanos in `(-1e9, 1e9)` with the sign of the
/// seconds.
pub(crate) fn check_duration(d: &prost_types::Duration) -> Result<(), String> {
    if !(-MAX_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&d.seconds) {
        return Err(format!(
            "is not a valid duration: seconds must be within ±{MAX_DURATION_SECONDS}, got {}",
            d.seconds
        ));
    }
    if d.nanos <= -NANOS_PER_SECOND || d.nanos >= NANOS_PER_SECOND {
        return Err(format!(
            "is not a valid duration: nanos must be within ±999999999, got {}",
            d.nanos
        ));
    }
    if (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err(format!(
            "is not a valid duration: nanos ({}) must have the sign of seconds ({})",
            d.nanos, d.seconds
        ));
    }
    Ok(())
}

/// A timestamp from whole Unix seconds.
pub(crate) fn timestamp_from_seconds(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// A timestamp from a time, to the nanosecond.
pub(crate) fn timestamp_from_datetime(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A timestamp from Unix milliseconds.
pub(crate) fn timestamp_from_millis(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Unix milliseconds of a timestamp.
pub(crate) fn timestamp_millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// A duration from microseconds.
pub(crate) fn duration_from_micros(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// Microseconds of a duration.
pub(crate) fn duration_micros(d: &prost_types::Duration) -> i64 {
    d.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(d.nanos) / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_checked_as_the_well_known_type_defines_them() {
        let at = |seconds, nanos| check_timestamp(&prost_types::Timestamp { seconds, nanos });
        assert!(at(0, 0).is_ok());
        assert!(at(MIN_TIMESTAMP_SECONDS, 0).is_ok());
        assert!(at(MAX_TIMESTAMP_SECONDS, 999_999_999).is_ok());
        assert!(at(0, 2_000_000_000).is_err());
        assert!(at(0, 1_000_000_000).is_err());
        assert!(at(0, -5).is_err());
        assert!(at(MIN_TIMESTAMP_SECONDS - 1, 0).is_err());
        assert!(at(MAX_TIMESTAMP_SECONDS + 1, 0).is_err());
        assert!(at(i64::MIN, 0).is_err());
        assert!(at(i64::MAX, 0).is_err());
    }

    #[test]
    fn durations_are_checked_as_the_well_known_type_defines_them() {
        let of = |seconds, nanos| check_duration(&prost_types::Duration { seconds, nanos });
        assert!(of(0, 0).is_ok());
        assert!(of(-1, -999_999_999).is_ok());
        assert!(of(0, -5).is_ok());
        assert!(of(MAX_DURATION_SECONDS, 999_999_999).is_ok());
        assert!(of(1, -5).is_err());
        assert!(of(-1, 5).is_err());
        assert!(of(0, 2_000_000_000).is_err());
        assert!(of(0, -1_000_000_000).is_err());
        assert!(of(MAX_DURATION_SECONDS + 1, 0).is_err());
        assert!(of(i64::MIN, 0).is_err());
    }

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
