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
    infra::time::{check_duration, check_timestamp, timestamp_from_seconds},
    store::{Bucket, Granularity, Retention},
};

/// Most buckets one query reads: a day of minutes, with room for the partial
/// buckets at both ends of an unaligned window.
pub(crate) const MAX_POINTS: i64 = 1500;

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
    pub(crate) fn buckets(&self) -> Vec<Bucket> {
        let step = self.granularity.seconds();
        (0..(self.end - self.start) / step)
            .map(|i| Bucket {
                granularity: self.granularity,
                start: self.start + i * step,
            })
            .collect()
    }

    /// The fewest buckets that tile the window exactly: whole days and hours
    /// inside it, finer buckets at its edges. Unique users over the window
    /// read these (HyperLogLogs merge but cannot subtract; additive totals
    /// read [`Self::signed_cover`]): a day of minutes is then 24 hours, not
    /// 1440 minutes. Coarser buckets are kept at least as long, and hold
    /// exactly the sums of their finer ones.
    pub(crate) fn covering_buckets(&self) -> Vec<Bucket> {
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

    /// Buckets whose signed sum is exactly the window, for additive totals
    /// (counters and rankings; unique users cannot subtract and read
    /// [`Self::covering_buckets`]). A bucket is added whole, or split into
    /// its finer buckets, or added whole minus the finer buckets outside the
    /// window, whichever reads least: a trailing day is then yesterday minus
    /// its early hours plus today (whose later hours, being in the future,
    /// cost nothing), not 24 hours and up to 118 minutes. Exact because each
    /// coarser bucket holds exactly the sum of its finer ones (written in
    /// the same commit); a bucket is only subtracted while it is still
    /// retained, so the sum never loses a part that expired.
    pub fn signed_cover(&self, now: i64, retention: &Retention) -> Vec<SignedBucket> {
        let cover = Cover { now, retention };
        let mut parts = Vec::new();
        let mut day = Granularity::Day.bucket_start(self.start);
        while day < self.end {
            let bucket = Bucket {
                granularity: Granularity::Day,
                start: day,
            };
            let end = day + Granularity::Day.seconds();
            match cover.plan(bucket, self.start.max(day), self.end.min(end), false) {
                Some(plan) => parts.extend(plan.parts),
                // Not aligned to minutes (a window never is): add the tiling.
                None => {
                    return self
                        .covering_buckets()
                        .into_iter()
                        .map(|b| (b, 1))
                        .collect();
                }
            }
            day = end;
        }
        parts
    }

    /// The window as returned to clients.
    pub(crate) fn range(&self) -> TimeRange {
        TimeRange {
            start_time: Some(timestamp_from_seconds(self.start)),
            end_time: Some(timestamp_from_seconds(self.end)),
        }
    }

    /// The granularity as returned to clients.
    pub(crate) fn proto_granularity(&self) -> i32 {
        to_proto(self.granularity) as i32
    }
}

/// A bucket added (`1`) or subtracted (`-1`) by a [`ResolvedWindow::signed_cover`].
pub(crate) type SignedBucket = (Bucket, i64);

/// How recently a subtracted bucket must still be kept: a query reads it
/// well within this margin of planning.
const SUBTRACT_MARGIN_SECONDS: i64 = 300;

/// Plans a signed cover: what reading a bucket costs (roughly, the members
/// it holds: a day of rankings holds more than an hour, an hour more than a
/// minute; buckets after `now` are empty).
struct Cover<'a> {
    now: i64,
    retention: &'a Retention,
}

/// Signed buckets and what reading them costs.
#[derive(Default)]
struct Plan {
    cost: u64,
    parts: Vec<SignedBucket>,
}

impl Plan {
    fn add(&mut self, other: Self, sign: i64) {
        self.cost += other.cost;
        self.parts
            .extend(other.parts.into_iter().map(|(b, s)| (b, s * sign)));
    }
}

impl Cover<'_> {
    fn cost(&self, bucket: Bucket) -> u64 {
        if bucket.start > self.now {
            return 0;
        }
        match bucket.granularity {
            Granularity::Minute => 1,
            Granularity::Hour => 20,
            Granularity::Day => 60,
        }
    }

    fn retained(&self, bucket: Bucket) -> bool {
        self.retention.expires_at(bucket) > self.now + SUBTRACT_MARGIN_SECONDS
    }

    /// The cheapest signed buckets summing to `[lo, hi)` inside `bucket`;
    /// `outside` regions (beyond the window) may only use retained buckets.
    /// `None` when there is none.
    fn plan(&self, bucket: Bucket, lo: i64, hi: i64, outside: bool) -> Option<Plan> {
        let end = bucket.start + bucket.granularity.seconds();
        if lo >= hi {
            return Some(Plan::default());
        }
        if lo == bucket.start && hi == end {
            if outside && !self.retained(bucket) {
                return None;
            }
            return Some(Plan {
                cost: self.cost(bucket),
                parts: vec![(bucket, 1)],
            });
        }
        let finer = match bucket.granularity {
            Granularity::Day => Granularity::Hour,
            Granularity::Hour => Granularity::Minute,
            Granularity::Minute => return None,
        };
        // The finer buckets' plans of the region, and of its complement.
        let mut split = Some(Plan::default());
        let mut whole_minus = self.retained(bucket).then(|| Plan {
            cost: self.cost(bucket),
            parts: vec![(bucket, 1)],
        });
        let mut start = bucket.start;
        while start < end {
            let child = Bucket {
                granularity: finer,
                start,
            };
            let child_end = start + finer.seconds();
            if let Some(plan) = split.as_mut() {
                match self.plan(child, lo.max(start), hi.min(child_end), outside) {
                    Some(part) => plan.add(part, 1),
                    None => split = None,
                }
            }
            for (a, b) in [(start, child_end.min(lo)), (start.max(hi), child_end)] {
                if let Some(plan) = whole_minus.as_mut() {
                    match self.plan(child, a, b, true) {
                        Some(part) => plan.add(part, -1),
                        None => whole_minus = None,
                    }
                }
            }
            start = child_end;
        }
        match (split, whole_minus) {
            (Some(split), Some(whole)) if whole.cost < split.cost => Some(whole),
            (Some(split), _) => Some(split),
            (None, whole) => whole,
        }
    }
}

/// The protobuf form of a granularity.
pub(crate) fn to_proto(granularity: Granularity) -> ProtoGranularity {
    match granularity {
        Granularity::Minute => ProtoGranularity::Minute,
        Granularity::Hour => ProtoGranularity::Hour,
        Granularity::Day => ProtoGranularity::Day,
    }
}

/// Resolves `window` and `granularity` (raw enum number) at `now`; field
/// names in violations start with `prefix` (empty for top-level fields).
pub(crate) fn resolve(
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
    let bounds = Bounds {
        start,
        end,
        now: now.timestamp(),
        retention,
    };
    let window_field = field("window");
    match requested {
        Some(granularity) => bounds
            .at(granularity)
            .map_err(|description| vec![FieldViolation::new(window_field, description)]),
        None => Granularity::ALL
            .into_iter()
            .find_map(|granularity| bounds.at(granularity).ok())
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

/// A window's unaligned bounds, to align to a granularity.
struct Bounds<'a> {
    start: i64,
    end: i64,
    now: i64,
    retention: &'a Retention,
}

impl Bounds<'_> {
    /// The window aligned to `granularity`, or why that granularity cannot
    /// serve it (too many buckets, or buckets no longer kept).
    fn at(&self, granularity: Granularity) -> Result<ResolvedWindow, String> {
        let step = granularity.seconds();
        let resolved = ResolvedWindow {
            granularity,
            start: granularity.bucket_start(self.start),
            end: granularity.bucket_start(self.end - 1) + step,
        };
        let points = (resolved.end - resolved.start) / step;
        if points > MAX_POINTS {
            return Err(format!(
                "spans {points} {granularity:?} buckets; at most {MAX_POINTS} (use a coarser granularity)"
            ));
        }
        let kept = self.retention.of(granularity);
        let kept_seconds = i64::try_from(kept.as_secs()).unwrap_or(i64::MAX);
        if resolved.start + step < self.now.saturating_sub(kept_seconds) {
            return Err(format!(
                "starts before the oldest {granularity:?} bucket kept ({kept:?} retention); use a coarser granularity or leave it unspecified"
            ));
        }
        Ok(resolved)
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
            // Valid timestamps keep every computation below far from
            // overflow (about ±2.6e11 seconds).
            for (name, time) in [("start_time", &start), ("end_time", &end)] {
                check_timestamp(time).map_err(|error| {
                    FieldViolation::new(field(&format!("window.range.{name}")), error)
                })?;
            }
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
            check_duration(duration)
                .map_err(|error| FieldViolation::new(field("window.trailing"), error))?;
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
                start_time: Some(timestamp_from_seconds(start)),
                end_time: Some(timestamp_from_seconds(end)),
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

    /// Each minute's net sign in `cover`.
    fn net_minutes(cover: &[SignedBucket]) -> std::collections::BTreeMap<i64, i64> {
        let mut net = std::collections::BTreeMap::new();
        for (bucket, sign) in cover {
            let mut minute = bucket.start;
            while minute < bucket.start + bucket.granularity.seconds() {
                *net.entry(minute).or_insert(0) += sign;
                minute += 60;
            }
        }
        net.retain(|_, sign| *sign != 0);
        net
    }

    #[test]
    fn a_signed_cover_adds_up_to_exactly_the_window() {
        let now = now().timestamp();
        let day = Granularity::Day.bucket_start(now);
        // Windows of each granularity, ending at and before now, with edges
        // at every kind of offset inside their hours and days.
        for (granularity, start, end) in [
            (
                Granularity::Minute,
                day - 86_400 + 7 * 3600 + 59 * 60,
                day + 8 * 3600,
            ),
            (
                Granularity::Minute,
                day - 86_400 + 23 * 3600 + 60,
                day + 3 * 60,
            ),
            (
                Granularity::Minute,
                day - 30 * 3600 + 17 * 60,
                day - 3600 - 13 * 60,
            ),
            (
                Granularity::Minute,
                day + 3600 + 5 * 60,
                day + 3600 + 10 * 60,
            ),
            (
                Granularity::Hour,
                day - 20 * 86_400 + 3600,
                day - 86_400 + 5 * 3600,
            ),
            (Granularity::Day, day - 30 * 86_400, day + 86_400),
        ] {
            let w = ResolvedWindow {
                granularity,
                start,
                end,
            };
            let cover = w.signed_cover(now, &retention());
            let expected: std::collections::BTreeMap<i64, i64> =
                (start / 60..end / 60).map(|m| (m * 60, 1)).collect();
            assert_eq!(net_minutes(&cover), expected, "{w:?}");
            // Every bucket read is still retained.
            assert!(
                cover.iter().all(|(b, _)| retention().expires_at(*b) > now),
                "{cover:?}"
            );
        }
    }

    #[test]
    fn a_trailing_day_reads_yesterday_minus_its_early_hours_plus_today() {
        let day = Granularity::Day.bucket_start(now().timestamp());
        let now = day + 7 * 3600 + 59 * 60 + 30;
        let w = ResolvedWindow {
            granularity: Granularity::Minute,
            start: now - 86_400 - 30,
            end: day + 8 * 3600,
        };
        let cover = w.signed_cover(now, &retention());
        let past: Vec<_> = cover.iter().filter(|(b, _)| b.start <= now).collect();
        // Yesterday, minus its hours 0 to 7, plus its minute 07:59; today.
        assert_eq!(past.len(), 1 + 8 + 1 + 1, "{cover:?}");
        assert!(cover.contains(&(Bucket::containing(Granularity::Day, day - 1), 1)));
        assert!(cover.contains(&(Bucket::containing(Granularity::Day, day), 1)));
        // The positive tiling reads 16 + 8 hours and a minute.
        assert_eq!(w.covering_buckets().len(), 25);
    }

    #[test]
    fn expired_buckets_are_never_subtracted() {
        let day = Granularity::Day.bucket_start(now().timestamp());
        let now = day + 12 * 3600;
        // Minutes are kept 6 hours: the window starts at the oldest kept
        // minute, so its hour's earlier minutes are gone and must not be
        // subtracted from the hour.
        let retention = Retention {
            minute: Duration::from_secs(6 * 3600),
            ..retention()
        };
        let w = ResolvedWindow {
            granularity: Granularity::Minute,
            start: day + 5 * 3600 + 59 * 60,
            end: day + 12 * 3600 + 60,
        };
        let cover = w.signed_cover(now, &retention);
        let expected: std::collections::BTreeMap<i64, i64> =
            (w.start / 60..w.end / 60).map(|m| (m * 60, 1)).collect();
        assert_eq!(net_minutes(&cover), expected);
        assert!(
            cover
                .iter()
                .filter(|(_, sign)| *sign < 0)
                .all(|(b, _)| retention.expires_at(*b) > now),
            "{cover:?}"
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
        assert_eq!(w.range().start_time, Some(timestamp_from_seconds(hour)));
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
