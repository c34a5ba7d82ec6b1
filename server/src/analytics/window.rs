//! Turns a request's `TimeWindow` and `Granularity` into the buckets a query
//! reads. Pure logic.
//!
//! Rules: windows are half-open `[start, end)` in event time and rounded
//! outwards to whole buckets. Rolling windows (`trailing`, `current`) end now,
//! the bucket holding now included. Without an explicit granularity the
//! server takes the finest one whose retention still covers the window's
//! start and which needs at most [`MAX_POINTS`] buckets.

use chrono::{DateTime, Utc};
use rtap::v1::{
    CalendarPeriod, Granularity as ProtoGranularity, TimeRange, TimeWindow, time_window::Window,
};

use crate::{
    error::FieldViolation,
    store::{Bucket, Granularity, Retention},
};

/// Most buckets one query reads: a day of minutes, with room for the partial
/// buckets at both ends of an unaligned window.
pub const MAX_POINTS: i64 = 1500;

/// A resolved window: a granularity and an aligned `[start, end)`, Unix
/// seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResolvedWindow {
    /// The granularity read.
    pub granularity: Granularity,
    /// Aligned start, inclusive.
    pub start: i64,
    /// Aligned end, exclusive.
    pub end: i64,
}

impl ResolvedWindow {
    /// Every bucket of the window, in time order.
    pub fn buckets(&self) -> Vec<Bucket> {
        let step = self.granularity.seconds();
        (0..(self.end - self.start) / step)
            .map(|i| Bucket {
                granularity: self.granularity,
                start: self.start + i * step,
            })
            .collect()
    }

    /// The fewest buckets that tile the window exactly: whole days and hours
    /// inside it, finer buckets at its edges. Totals over the window (not
    /// series) read these: a day of minutes is then 24 hours, not 1440
    /// minutes. Coarser buckets are kept at least as long, and hold exactly
    /// the sums of their finer ones.
    pub fn covering_buckets(&self) -> Vec<Bucket> {
        let mut buckets = Vec::new();
        let mut start = self.start;
        while start < self.end {
            let granularity = [Granularity::Day, Granularity::Hour, Granularity::Minute]
                .into_iter()
                .filter(|g| *g >= self.granularity)
                .find(|g| start % g.seconds() == 0 && start + g.seconds() <= self.end)
                .unwrap_or(self.granularity);
            buckets.push(Bucket { granularity, start });
            start += granularity.seconds();
        }
        buckets
    }

    /// The window as returned to clients.
    pub fn range(&self) -> TimeRange {
        TimeRange {
            start_time: Some(timestamp(self.start)),
            end_time: Some(timestamp(self.end)),
        }
    }

    /// The granularity as returned to clients.
    pub fn proto_granularity(&self) -> i32 {
        to_proto(self.granularity) as i32
    }
}

/// A whole-second protobuf timestamp.
pub fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// The protobuf form of a granularity.
pub fn to_proto(granularity: Granularity) -> ProtoGranularity {
    match granularity {
        Granularity::Minute => ProtoGranularity::Minute,
        Granularity::Hour => ProtoGranularity::Hour,
        Granularity::Day => ProtoGranularity::Day,
    }
}

/// Resolves `window` and `granularity` (raw enum number) at `now`; field
/// names in violations start with `prefix` (empty for top-level fields).
pub fn resolve(
    window: Option<&TimeWindow>,
    granularity: i32,
    now: DateTime<Utc>,
    retention: &Retention,
    prefix: &str,
) -> Result<ResolvedWindow, Vec<FieldViolation>> {
    let field = |name: &str| format!("{prefix}{name}");
    let mut violations = Vec::new();
    let requested = match ProtoGranularity::try_from(granularity) {
        Ok(ProtoGranularity::Unspecified) => None,
        Ok(ProtoGranularity::Minute) => Some(Granularity::Minute),
        Ok(ProtoGranularity::Hour) => Some(Granularity::Hour),
        Ok(ProtoGranularity::Day) => Some(Granularity::Day),
        Err(_) => {
            violations.push(FieldViolation::new(
                field("granularity"),
                format!("unknown granularity {granularity}"),
            ));
            None
        }
    };
    let raw = raw_bounds(window, now, &field);
    let (start, end) = match raw {
        Ok(bounds) if violations.is_empty() => bounds,
        Ok(_) => return Err(violations),
        Err(violation) => {
            violations.push(violation);
            return Err(violations);
        }
    };
    let now_seconds = now.timestamp();
    let aligned = |granularity: Granularity| {
        let step = granularity.seconds();
        let start = granularity.bucket_start(start);
        let end = granularity.bucket_start(end - 1) + step;
        ResolvedWindow {
            granularity,
            start,
            end,
        }
    };
    let points = |w: &ResolvedWindow| (w.end - w.start) / w.granularity.seconds();
    let retained = |w: &ResolvedWindow| {
        let kept = i64::try_from(retention.of(w.granularity).as_secs()).unwrap_or(i64::MAX);
        w.start + w.granularity.seconds() >= now_seconds.saturating_sub(kept)
    };
    let window_field = field("window");
    match requested {
        Some(granularity) => {
            let resolved = aligned(granularity);
            if points(&resolved) > MAX_POINTS {
                return Err(vec![FieldViolation::new(
                    window_field,
                    format!(
                        "spans {} {granularity:?} buckets; at most {MAX_POINTS} (use a coarser granularity)",
                        points(&resolved)
                    ),
                )]);
            }
            if !retained(&resolved) {
                return Err(vec![FieldViolation::new(
                    window_field,
                    format!(
                        "starts before the oldest {granularity:?} bucket kept ({:?} retention); use a coarser granularity or leave it unspecified",
                        retention.of(granularity)
                    ),
                )]);
            }
            Ok(resolved)
        }
        None => Granularity::ALL
            .into_iter()
            .map(aligned)
            .find(|w| retained(w) && points(w) <= MAX_POINTS)
            .ok_or_else(|| {
                vec![FieldViolation::new(
                    window_field,
                    format!(
                        "is longer than {MAX_POINTS} days or starts before the oldest day bucket kept"
                    ),
                )]
            }),
    }
}

/// The unaligned `[start, end)` of a window, Unix seconds.
fn raw_bounds(
    window: Option<&TimeWindow>,
    now: DateTime<Utc>,
    field: &dyn Fn(&str) -> String,
) -> Result<(i64, i64), FieldViolation> {
    // A rolling window includes the current second.
    let end_now = now.timestamp() + 1;
    let bounds = match window.and_then(|w| w.window.as_ref()) {
        None => return Err(FieldViolation::new(field("window"), "is required")),
        Some(Window::Range(range)) => {
            let (Some(start), Some(end)) = (range.start_time, range.end_time) else {
                return Err(FieldViolation::new(
                    field("window.range"),
                    "needs start_time and end_time",
                ));
            };
            // Round outwards to whole seconds.
            let end = end.seconds + i64::from(end.nanos > 0);
            if end <= start.seconds {
                return Err(FieldViolation::new(
                    field("window.range.end_time"),
                    "must be after start_time",
                ));
            }
            (start.seconds, end)
        }
        Some(Window::Trailing(duration)) => {
            if duration.seconds < 0
                || duration.nanos < 0
                || (duration.seconds == 0 && duration.nanos == 0)
            {
                return Err(FieldViolation::new(
                    field("window.trailing"),
                    "must be a positive duration",
                ));
            }
            let seconds = duration.seconds + i64::from(duration.nanos > 0);
            (end_now.saturating_sub(seconds), end_now)
        }
        Some(Window::Current(period)) => match CalendarPeriod::try_from(*period) {
            Ok(CalendarPeriod::CurrentHour) => {
                (Granularity::Hour.bucket_start(now.timestamp()), end_now)
            }
            Ok(CalendarPeriod::Today) => (Granularity::Day.bucket_start(now.timestamp()), end_now),
            _ => {
                return Err(FieldViolation::new(
                    field("window.current"),
                    format!("unknown or unspecified calendar period {period}"),
                ));
            }
        },
    };
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-06-01T12:34:56Z".parse().expect("valid time")
    }

    fn retention() -> Retention {
        Retention {
            minute: Duration::from_secs(48 * 3600),
            hour: Duration::from_secs(30 * 86_400),
            day: Duration::from_secs(400 * 86_400),
        }
    }

    fn trailing(seconds: i64) -> TimeWindow {
        TimeWindow {
            window: Some(Window::Trailing(prost_types::Duration {
                seconds,
                nanos: 0,
            })),
        }
    }

    fn range(start: i64, end: i64) -> TimeWindow {
        TimeWindow {
            window: Some(Window::Range(TimeRange {
                start_time: Some(timestamp(start)),
                end_time: Some(timestamp(end)),
            })),
        }
    }

    fn resolve_auto(window: &TimeWindow) -> Result<ResolvedWindow, Vec<FieldViolation>> {
        resolve(Some(window), 0, now(), &retention(), "")
    }

    #[test]
    fn a_trailing_window_includes_the_current_bucket() {
        let w = resolve_auto(&trailing(300)).expect("valid");
        assert_eq!(w.granularity, Granularity::Minute);
        let now = now().timestamp();
        assert_eq!(w.end, Granularity::Minute.bucket_start(now) + 60);
        assert_eq!(w.buckets().len(), 6);
    }

    #[test]
    fn the_granularity_coarsens_with_the_window() {
        assert_eq!(
            resolve_auto(&trailing(24 * 3600)).map(|w| w.granularity),
            Ok(Granularity::Minute)
        );
        assert_eq!(
            resolve_auto(&trailing(3 * 86_400)).map(|w| w.granularity),
            Ok(Granularity::Hour)
        );
        assert_eq!(
            resolve_auto(&trailing(90 * 86_400)).map(|w| w.granularity),
            Ok(Granularity::Day)
        );
        let today = TimeWindow {
            window: Some(Window::Current(CalendarPeriod::Today as i32)),
        };
        let w = resolve_auto(&today).expect("valid");
        assert_eq!(
            (w.granularity, w.buckets().len()),
            (Granularity::Minute, 755)
        );
    }

    #[test]
    fn covering_buckets_tile_the_window_with_the_coarsest_buckets() {
        let w = ResolvedWindow {
            granularity: Granularity::Minute,
            start: 86_400 - 120,
            end: 2 * 86_400 + 3600 + 60,
        };
        let covering = w.covering_buckets();
        let count = |g| covering.iter().filter(|b| b.granularity == g).count();
        assert_eq!(
            (
                count(Granularity::Minute),
                count(Granularity::Hour),
                count(Granularity::Day)
            ),
            (3, 1, 1)
        );
        let covered: i64 = covering.iter().map(|b| b.granularity.seconds()).sum();
        assert_eq!(covered, w.end - w.start);
        assert!(
            covering
                .windows(2)
                .all(|p| p[0].start + p[0].granularity.seconds() == p[1].start)
        );
    }

    #[test]
    fn ranges_round_outwards_to_whole_buckets() {
        let hour = Granularity::Hour.bucket_start(now().timestamp()) - 10 * 3600;
        let w = resolve(
            Some(&range(hour + 1, hour + 3601)),
            2,
            now(),
            &retention(),
            "",
        )
        .expect("valid");
        assert_eq!((w.start, w.end), (hour, hour + 7200));
        assert_eq!(w.range().start_time, Some(timestamp(hour)));
    }

    #[test]
    fn invalid_windows_name_the_field() {
        let field = |result: Result<ResolvedWindow, Vec<FieldViolation>>| {
            result.expect_err("invalid")[0].field.clone()
        };
        let now = now().timestamp();
        assert_eq!(
            field(resolve(
                Some(&range(now, now)),
                0,
                now_time(),
                &retention(),
                "q."
            )),
            "q.window.range.end_time"
        );
        assert_eq!(
            field(resolve(None, 0, now_time(), &retention(), "")),
            "window"
        );
        assert_eq!(field(resolve_auto(&trailing(0))), "window.trailing");
        assert_eq!(
            field(resolve(
                Some(&trailing(90 * 86_400)),
                2,
                now_time(),
                &retention(),
                ""
            )),
            "window"
        );
        assert_eq!(
            field(resolve(
                Some(&trailing(60)),
                9,
                now_time(),
                &retention(),
                ""
            )),
            "granularity"
        );
        assert_eq!(field(resolve_auto(&trailing(2000 * 86_400))), "window");
        assert_eq!(
            field(resolve(
                Some(&trailing(2 * 86_400)),
                1,
                now_time(),
                &retention(),
                ""
            )),
            "window"
        );
    }

    fn now_time() -> DateTime<Utc> {
        now()
    }
}
