//! GetEngagement: users, product views and dwell time of the shop or one
//! product, with the shop's session statistics.

use crate::store::nodes::Route;
use rtap::v1::{
    CommitDelta, EngagementDelta, EventType, GetEngagementRequest, GetEngagementResponse,
    SessionStats, TimeWindow, delta, snapshot,
};

use crate::{
    analytics::{
        metric::{Metric, Reads, SOURCES, Touched, Violations, everything_if, ratio, ratio_i64},
        window::ResolvedWindow,
    },
    error::Error,
    infra::time::{duration_from_micros, duration_micros},
    store::{Counter, UserSet},
};

/// GetEngagement.
pub(crate) struct Engagement;

/// The additive totals an engagement result is built from.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    views: i64,
    dwell_micros: i64,
    sessions: i64,
    session_length_ms: i64,
    session_events: i64,
}

impl Metric for Engagement {
    type Request = GetEngagementRequest;
    type Response = GetEngagementResponse;
    type Ahead = ();
    const NAME: &'static str = "engagement";

    fn validate(request: &Self::Request, violations: &mut Violations) {
        violations.check_product(request.product_id);
    }

    fn window(request: &Self::Request) -> (Option<&TimeWindow>, i32) {
        (request.window.as_ref(), 0)
    }

    async fn read<C: Route>(
        request: &Self::Request,
        reads: Reads<'_, C>,
    ) -> Result<Self::Response, Error> {
        let product = request.product_id;
        let cover = reads.cover();
        let Reads {
            route,
            reader,
            window,
            ..
        } = reads;
        let mut totals = Totals::default();
        for (counter, value) in reader
            .counter_totals(route, &cover, &counters(product))
            .await?
        {
            let total = match counter {
                Counter::Events { .. } | Counter::ProductEvents { .. } => &mut totals.views,
                Counter::Dwell { .. } | Counter::TotalDwell { .. } => &mut totals.dwell_micros,
                Counter::Sessions { .. } => &mut totals.sessions,
                Counter::SessionLength { .. } => &mut totals.session_length_ms,
                Counter::SessionEvents { .. } => &mut totals.session_events,
                _ => continue,
            };
            *total += value;
        }
        let set = if product > 0 {
            UserSet::Product(product)
        } else {
            UserSet::All
        };
        let users = reader
            .unique_users(route, &window.covering_buckets(), set)
            .await?;
        let users = i64::try_from(users).unwrap_or(i64::MAX);
        Ok(GetEngagementResponse {
            granularity: window.proto_granularity(),
            range: Some(window.range()),
            unique_users: users,
            product_views: totals.views,
            total_dwell_time: Some(duration_from_micros(totals.dwell_micros)),
            average_dwell_time_per_user: Some(duration_from_micros(ratio_i64(
                totals.dwell_micros,
                users,
            ))),
            sessions: Some(session_stats(&totals)),
        })
    }

    fn diff(old: &Self::Response, new: &Self::Response) -> Option<delta::Change> {
        let micros_of = |d: Option<prost_types::Duration>| d.as_ref().map_or(0, duration_micros);
        let sessions = |r: &GetEngagementResponse| {
            let s = r.sessions.unwrap_or_default();
            (s.session_count, micros_of(s.total_length), s.total_events)
        };
        let (old_sessions, new_sessions) = (sessions(old), sessions(new));
        let unchanged = new.unique_users == old.unique_users
            && new.product_views == old.product_views
            && micros_of(new.total_dwell_time) == micros_of(old.total_dwell_time)
            && old_sessions == new_sessions
            && old.range == new.range;
        if unchanged {
            return None;
        }
        Some(delta::Change::Engagement(EngagementDelta {
            unique_users_change: new.unique_users - old.unique_users,
            product_views_change: new.product_views - old.product_views,
            total_dwell_time_change: Some(duration_from_micros(
                micros_of(new.total_dwell_time) - micros_of(old.total_dwell_time),
            )),
            session_count_change: new_sessions.0 - old_sessions.0,
            session_total_length_change: Some(duration_from_micros(
                new_sessions.1 - old_sessions.1,
            )),
            session_total_events_change: new_sessions.2 - old_sessions.2,
            range: new.range,
        }))
    }

    /// Re-read whole (its unique users are a union of HyperLogLogs) when
    /// the shop's sessions changed, or the product's (or the shop's) views
    /// or users.
    fn touched(request: &Self::Request, window: &ResolvedWindow, delta: &CommitDelta) -> Touched {
        let product = request.product_id;
        everything_if(window, delta, |minute| {
            !minute.sessions.is_empty()
                || if product > 0 {
                    minute.products_with_users.contains(&product)
                        || minute.counts.iter().any(|c| {
                            c.product_id == product && c.r#type == EventType::ProductView as i32
                        })
                } else {
                    minute.counts.iter().any(|c| c.events != 0)
                }
        })
    }

    fn snapshot(result: Self::Response) -> snapshot::Result {
        snapshot::Result::Engagement(result)
    }
}

/// The counters read, per source: views and dwell of the product (or the
/// shop), and the shop's sessions.
fn counters(product: i64) -> Vec<Counter> {
    let view = EventType::ProductView as i32;
    SOURCES
        .map(|s| s as i32)
        .into_iter()
        .flat_map(|source| {
            let (views, dwell) = if product > 0 {
                (
                    Counter::ProductEvents {
                        event_type: view,
                        source,
                        product,
                    },
                    Counter::Dwell { source, product },
                )
            } else {
                (
                    Counter::Events {
                        event_type: view,
                        source,
                    },
                    Counter::TotalDwell { source },
                )
            };
            [
                views,
                dwell,
                Counter::Sessions { source },
                Counter::SessionLength { source },
                Counter::SessionEvents { source },
            ]
        })
        .collect()
}

/// Session statistics from their sums.
fn session_stats(totals: &Totals) -> SessionStats {
    let length_micros = totals.session_length_ms.saturating_mul(1000);
    SessionStats {
        session_count: totals.sessions,
        total_length: Some(duration_from_micros(length_micros)),
        total_events: totals.session_events,
        average_length: Some(duration_from_micros(ratio_i64(
            length_micros,
            totals.sessions,
        ))),
        average_events_per_session: ratio(totals.session_events, totals.sessions),
    }
}
