//! The metric kinds, one module each (see [`super::metric::Metric`]).
//!
//! To add a metric: its request, response and delta in
//! `proto/rtap/v1/analytics.proto` (a unary RPC, a field of
//! `SubscribeRequest.query`, `Snapshot.result` and `Delta.change`), a module
//! here implementing `Metric`, its line in [`open`] below and its unary
//! handler in [`super::AnalyticsApi`] (one call of `unary`).

mod engagement;
mod event_counts;
mod funnel;
mod top_products;
mod unique_users;

use std::time::Duration;

use rtap::v1::subscribe_request::Query as Requested;

pub(crate) use engagement::Engagement;
pub(crate) use event_counts::EventCounts;
pub(crate) use funnel::Funnel;
pub(crate) use top_products::TopProducts;
pub(crate) use unique_users::UniqueUsers;

use super::subscribe::{Hub, Subscription};
use crate::error::Error;

/// Opens a subscription to the query a `SubscribeRequest` names.
pub(super) async fn open(
    hub: &std::sync::Arc<Hub>,
    requested: Requested,
    heartbeat: Duration,
    resume_token: &[u8],
) -> Result<Subscription, Error> {
    let token = resume_token;
    match requested {
        Requested::EventCounts(request) => hub.open::<EventCounts>(request, heartbeat, token).await,
        Requested::UniqueUsers(request) => hub.open::<UniqueUsers>(request, heartbeat, token).await,
        Requested::Engagement(request) => hub.open::<Engagement>(request, heartbeat, token).await,
        Requested::TopProducts(request) => hub.open::<TopProducts>(request, heartbeat, token).await,
        Requested::Funnel(request) => hub.open::<Funnel>(request, heartbeat, token).await,
    }
}

#[cfg(test)]
mod tests {
    use rtap::v1::{
        GetEngagementRequest, GetEventCountsRequest, GetTopProductsRequest, GetUniqueUsersRequest,
    };

    use super::*;
    use crate::analytics::metric::Query;
    use top_products::DEFAULT_TOP_LIMIT;

    #[test]
    fn queries_that_give_the_same_result_share_a_canonical_key() -> Result<(), Error> {
        let counts = |event_types: Vec<i32>| {
            let request = GetEventCountsRequest {
                event_types,
                ..GetEventCountsRequest::default()
            };
            Query::<EventCounts>::new(request, "").map(|q| q.canonical_key())
        };
        assert_eq!(counts(vec![2, 1, 1])?, counts(vec![1, 2])?);
        assert_ne!(counts(vec![1])?, counts(vec![1, 2])?);
        let top = |limit| {
            let request = GetTopProductsRequest {
                limit,
                ranking: 1,
                ..GetTopProductsRequest::default()
            };
            Query::<TopProducts>::new(request, "").map(|q| q.canonical_key())
        };
        assert_eq!(top(0)?, top(DEFAULT_TOP_LIMIT)?);
        assert_ne!(top(5)?, top(DEFAULT_TOP_LIMIT)?);
        // Identical bytes of two kinds are two queries.
        let users =
            Query::<UniqueUsers>::new(GetUniqueUsersRequest::default(), "")?.canonical_key();
        let engagement =
            Query::<Engagement>::new(GetEngagementRequest::default(), "")?.canonical_key();
        assert_ne!(users, engagement);
        Ok(())
    }

    #[test]
    fn violations_name_the_field_under_the_prefix() {
        let request = GetEventCountsRequest {
            event_types: vec![1, 99],
            product_id: -1,
            ..GetEventCountsRequest::default()
        };
        let Err(Error::InvalidArgument(violations)) =
            Query::<EventCounts>::new(request, "event_counts.")
        else {
            panic!("an unknown event type and a negative product are invalid");
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["event_counts.event_types[1]", "event_counts.product_id"]
        );
    }
}
