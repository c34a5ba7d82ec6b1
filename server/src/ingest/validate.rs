//! The one validator of interaction events, shared by every way events come
//! in (the Kafka pipeline and the ingest RPCs), so both accept exactly the
//! same events. Plain Rust over the protobuf message: no Kafka, no Redis.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message;
use rtap::v1::{EventType, InteractionEvent, Source};

use crate::{
    error::FieldViolation,
    infra::time::{check_duration, check_timestamp},
};

/// Longest `session_id`, in characters.
pub(crate) const MAX_SESSION_ID_CHARS: usize = 128;
/// Longest `search_query`, in characters.
pub(crate) const MAX_SEARCH_QUERY_CHARS: usize = 512;
/// Longest dwell time accepted for one page.
pub(crate) const MAX_DWELL: Duration = Duration::from_secs(24 * 3600);

/// Why a record was rejected, as counted and written to the dead-letter
/// topic. The first failed rule gives the reason; every failed field is
/// listed in the violations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The bytes are not an `rtap.v1.InteractionEvent`.
    DecodeError,
    /// A field is missing or out of range.
    InvalidField,
    /// The event time is further in the future than the allowed clock skew.
    FutureTime,
    /// The event time is older than the retention of the finest bucket.
    TooOld,
}

impl Reason {
    /// Every reason.
    pub(crate) const ALL: [Self; 4] = [
        Self::DecodeError,
        Self::InvalidField,
        Self::FutureTime,
        Self::TooOld,
    ];

    /// Stable name, for counters and dead-letter headers.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::DecodeError => "decode_error",
            Self::InvalidField => "invalid_field",
            Self::FutureTime => "future_time",
            Self::TooOld => "too_old",
        }
    }
}

/// A rejected event: the reason and every invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The main reason.
    pub reason: Reason,
    /// Each invalid field (empty for a decode error).
    pub violations: Vec<FieldViolation>,
    /// Decoder message, for a decode error.
    pub detail: String,
}

/// How far event times may stray from the validator's clock.
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    /// Latest accepted event time, relative to now (device clock skew).
    pub max_future_skew: Duration,
    /// Oldest accepted event time, relative to now (the finest bucket's
    /// retention: older events could no longer be counted).
    pub max_age: Duration,
}

impl TimeBounds {
    /// The bounds the server is configured with.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_future_skew: config.max_clock_skew,
            max_age: config.minute_retention,
        }
    }
}

impl Default for TimeBounds {
    fn default() -> Self {
        Self {
            max_future_skew: Duration::from_secs(5 * 60),
            max_age: Duration::from_secs(48 * 3600),
        }
    }
}

/// Decodes and validates a Kafka record value.
pub fn decode(
    bytes: &[u8],
    now: DateTime<Utc>,
    bounds: TimeBounds,
) -> Result<InteractionEvent, Rejection> {
    let event = InteractionEvent::decode(bytes).map_err(|error| Rejection {
        reason: Reason::DecodeError,
        violations: Vec::new(),
        detail: error.to_string(),
    })?;
    validate(&event, "event", now, bounds)?;
    Ok(event)
}

/// Checks every rule; `prefix` is the path of the event in its request
/// (`event` for the RPCs), used in field names.
pub(crate) fn validate(
    event: &InteractionEvent,
    prefix: &str,
    now: DateTime<Utc>,
    bounds: TimeBounds,
) -> Result<(), Rejection> {
    let mut violations = Vec::new();
    let mut violate = |field: &str, description: String| {
        violations.push(FieldViolation::new(
            format!("{prefix}.{field}"),
            description,
        ));
    };
    let event_type = check_identity_and_kind(event, &mut violate);
    check_details(event, event_type, &mut violate);
    let time_reason = check_time(event, now, bounds, &mut violate);

    if violations.is_empty() {
        return Ok(());
    }
    // A field error outranks a time error: the event is malformed whatever
    // its time.
    let only_time = violations.len() == 1 && time_reason.is_some();
    let reason = match time_reason {
        Some(time) if only_time => time,
        _ => Reason::InvalidField,
    };
    Err(Rejection {
        reason,
        violations,
        detail: String::new(),
    })
}

/// The id, user, type, source and product; returns the event type when it
/// is known.
fn check_identity_and_kind(
    event: &InteractionEvent,
    violate: &mut dyn FnMut(&str, String),
) -> Option<EventType> {
    if event.event_id.is_empty() {
        violate("event_id", "is required".into());
    } else if uuid::Uuid::try_parse(&event.event_id).is_err() || event.event_id.len() != 36 {
        violate("event_id", "must be a UUID in its 36-character form".into());
    }
    if event.user_id <= 0 {
        violate("user_id", "must be a positive user id".into());
    }
    let event_type = EventType::try_from(event.r#type).ok();
    match event_type {
        None => violate("type", format!("unknown event type {}", event.r#type)),
        Some(EventType::Unspecified) => violate("type", "is required".into()),
        Some(_) => {}
    }
    match Source::try_from(event.source).ok() {
        None => violate("source", format!("unknown source {}", event.source)),
        Some(Source::Unspecified) => violate("source", "is required".into()),
        Some(_) => {}
    }
    let needs_product = matches!(
        event_type,
        Some(
            EventType::ProductView
                | EventType::AddToCart
                | EventType::RemoveFromCart
                | EventType::Purchase
        )
    );
    if event.product_id < 0 || (needs_product && event.product_id == 0) {
        violate(
            "product_id",
            "must be a positive product id for this event type".into(),
        );
    }
    event_type
}

/// The session, dwell time, amount, quantity and search query.
fn check_details(
    event: &InteractionEvent,
    event_type: Option<EventType>,
    violate: &mut dyn FnMut(&str, String),
) {
    if event.session_id.trim().is_empty() {
        violate("session_id", "is required".into());
    } else if event.session_id.chars().count() > MAX_SESSION_ID_CHARS {
        violate(
            "session_id",
            format!("must be at most {MAX_SESSION_ID_CHARS} characters"),
        );
    }
    if let Some(dwell) = event.dwell_time {
        let valid = check_duration(&dwell).is_ok()
            && dwell.seconds >= 0
            && (0..1_000_000_000).contains(&dwell.nanos)
            && dwell.seconds <= i64::try_from(MAX_DWELL.as_secs()).unwrap_or(i64::MAX);
        if !valid {
            violate(
                "dwell_time",
                format!("must be between 0 and {} hours", MAX_DWELL.as_secs() / 3600),
            );
        }
    }
    if event.amount_micros < 0 {
        violate("amount_micros", "must not be negative".into());
    }
    let needs_quantity = matches!(
        event_type,
        Some(EventType::AddToCart | EventType::RemoveFromCart | EventType::Purchase)
    );
    if needs_quantity && event.quantity == 0 {
        violate("quantity", "must be at least 1 for this event type".into());
    }
    if event.search_query.chars().count() > MAX_SEARCH_QUERY_CHARS {
        violate(
            "search_query",
            format!("must be at most {MAX_SEARCH_QUERY_CHARS} characters"),
        );
    }
}

/// The event time, against `bounds` around `now`; the reason to give when
/// it is the only thing wrong.
fn check_time(
    event: &InteractionEvent,
    now: DateTime<Utc>,
    bounds: TimeBounds,
    violate: &mut dyn FnMut(&str, String),
) -> Option<Reason> {
    let mut time_reason = None;
    // chrono takes nanos up to 2e9 (leap seconds): the well-known type's
    // rules first.
    match event
        .occurred_at
        .filter(|t| check_timestamp(t).is_ok())
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
    {
        None => violate(
            "occurred_at",
            "is required and must be a valid timestamp".into(),
        ),
        Some(time) => {
            let latest = now + bounds.max_future_skew;
            let oldest = now - bounds.max_age;
            if time > latest {
                violate(
                    "occurred_at",
                    format!("is more than {:?} in the future", bounds.max_future_skew),
                );
                time_reason = Some(Reason::FutureTime);
            } else if time < oldest {
                violate(
                    "occurred_at",
                    format!("is older than the {:?} retention", bounds.max_age),
                );
                time_reason = Some(Reason::TooOld);
            }
        }
    }

    time_reason
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-06-01T12:00:00Z".parse().expect("valid time")
    }

    fn valid() -> InteractionEvent {
        InteractionEvent {
            event_id: "7d444840-9dc0-11d1-b245-5ffdce74fad2".into(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: now().timestamp() - 60,
                nanos: 5,
            }),
            user_id: 42,
            product_id: 7,
            source: Source::Web as i32,
            r#type: EventType::Purchase as i32,
            session_id: "s-1".into(),
            dwell_time: None,
            amount_micros: 19_990_000,
            quantity: 2,
            search_query: String::new(),
        }
    }

    fn fields(event: &InteractionEvent) -> Vec<String> {
        validate(event, "event", now(), TimeBounds::default())
            .err()
            .map(|r| r.violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_complete_event_passes_and_round_trips_through_bytes() {
        let event = valid();
        assert!(fields(&event).is_empty());
        let decoded = decode(&event.encode_to_vec(), now(), TimeBounds::default());
        assert_eq!(decoded, Ok(event));
    }

    #[test]
    fn every_invalid_field_is_named() {
        let event = InteractionEvent {
            event_id: "not-a-uuid".into(),
            user_id: 0,
            product_id: 0,
            source: 99,
            r#type: EventType::Unspecified as i32,
            session_id: " ".into(),
            dwell_time: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            amount_micros: -1,
            occurred_at: None,
            ..valid()
        };
        assert_eq!(
            fields(&event),
            [
                "event.event_id",
                "event.user_id",
                "event.type",
                "event.source",
                "event.session_id",
                "event.dwell_time",
                "event.amount_micros",
                "event.occurred_at",
            ]
        );
    }

    #[test]
    fn out_of_range_timestamp_and_duration_nanos_are_invalid() {
        let second = now().timestamp() - 60;
        for nanos in [1_000_000_000, 2_000_000_000, -5] {
            let event = InteractionEvent {
                occurred_at: Some(prost_types::Timestamp {
                    seconds: second,
                    nanos,
                }),
                ..valid()
            };
            assert_eq!(fields(&event), ["event.occurred_at"], "nanos {nanos}");
            let event = InteractionEvent {
                dwell_time: Some(prost_types::Duration { seconds: 1, nanos }),
                ..valid()
            };
            assert_eq!(fields(&event), ["event.dwell_time"], "nanos {nanos}");
        }
    }

    #[test]
    fn products_and_quantities_are_required_where_the_type_needs_them() {
        let no_product = InteractionEvent {
            product_id: 0,
            ..valid()
        };
        assert_eq!(fields(&no_product), ["event.product_id"]);
        let no_quantity = InteractionEvent {
            quantity: 0,
            ..valid()
        };
        assert_eq!(fields(&no_quantity), ["event.quantity"]);
        let page_view = InteractionEvent {
            r#type: EventType::PageView as i32,
            product_id: 0,
            quantity: 0,
            amount_micros: 0,
            ..valid()
        };
        assert!(fields(&page_view).is_empty());
    }

    #[test]
    fn times_outside_the_bounds_have_their_own_reasons() {
        let at = |seconds: i64| InteractionEvent {
            occurred_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..valid()
        };
        let check = |event: &InteractionEvent| {
            validate(event, "event", now(), TimeBounds::default()).map_err(|r| r.reason)
        };
        let now = now().timestamp();
        assert_eq!(check(&at(now + 4 * 60)), Ok(()));
        assert_eq!(check(&at(now + 6 * 60)), Err(Reason::FutureTime));
        assert_eq!(check(&at(now - 47 * 3600)), Ok(()));
        assert_eq!(check(&at(now - 49 * 3600)), Err(Reason::TooOld));
        let both = InteractionEvent {
            user_id: -1,
            ..at(now + 3600)
        };
        assert_eq!(check(&both), Err(Reason::InvalidField));
    }

    #[test]
    fn undecodable_bytes_are_a_decode_error() {
        let rejection = decode(&[0x0f, 1, 2, 3], now(), TimeBounds::default()).unwrap_err();
        assert_eq!(rejection.reason, Reason::DecodeError);
        assert!(!rejection.detail.is_empty());
    }
}
