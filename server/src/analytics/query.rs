//! The five metric queries: validate a request, resolve its window, read the
//! buckets from the metric store and build the reply. Used by the unary RPCs
//! and by subscriptions (which diff successive results), so both always
//! agree.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;
use rtap::v1::{
    EventCount, EventCountBucket, EventType, Funnel, GetEngagementRequest, GetEngagementResponse,
    GetEventCountsRequest, GetEventCountsResponse, GetFunnelRequest, GetFunnelResponse,
    GetTopProductsRequest, GetTopProductsResponse, GetUniqueUsersRequest, GetUniqueUsersResponse,
    ProductRanking, ProductScore, SessionStats, Source,
};

use super::window::{self, ResolvedWindow, SignedBucket};
use crate::{
    error::{Error, FieldViolation},
    infra::time::{duration_from_micros, timestamp_from_seconds},
    store::{Counter, FunnelStage, Granularity, Ranking, Retention, UserSet, read::MetricReader},
};

/// `limit` of GetTopProducts when the request gives none (at most
/// [`MAX_TOP_LIMIT`]).
pub const DEFAULT_TOP_LIMIT: i32 = 10;
/// Largest `limit` of GetTopProducts.
pub const MAX_TOP_LIMIT: i32 = 100;

/// Every event type and source a query can ask for.
const EVENT_TYPES: [EventType; 6] = [
    EventType::PageView,
    EventType::ProductView,
    EventType::AddToCart,
    EventType::RemoveFromCart,
    EventType::Purchase,
    EventType::Search,
];
const SOURCES: [Source; 3] = [Source::Web, Source::MobileApp, Source::Server];

/// A validated query, ready to run at any moment (rolling windows are
/// resolved when it runs).
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// GetEventCounts.
    EventCounts(GetEventCountsRequest),
    /// GetUniqueUsers.
    UniqueUsers(GetUniqueUsersRequest),
    /// GetEngagement.
    Engagement(GetEngagementRequest),
    /// GetTopProducts.
    TopProducts(GetTopProductsRequest),
    /// GetFunnel.
    Funnel(GetFunnelRequest),
}

/// A query's result.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryResult {
    /// GetEventCounts.
    EventCounts(GetEventCountsResponse),
    /// GetUniqueUsers.
    UniqueUsers(GetUniqueUsersResponse),
    /// GetEngagement.
    Engagement(GetEngagementResponse),
    /// GetTopProducts.
    TopProducts(GetTopProductsResponse),
    /// GetFunnel.
    Funnel(GetFunnelResponse),
}

impl Query {
    /// The query's canonical form, which keys Subscribe's feeds: requests
    /// that always give the same result give the same key (filters are
    /// sets, a `limit` of 0 is the default), so their subscribers share one
    /// feed.
    pub fn canonical_key(&self) -> String {
        use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
        use prost::Message;

        let set = |values: &[i32]| {
            let mut values = values.to_vec();
            values.sort_unstable();
            values.dedup();
            values
        };
        let (kind, bytes) = match self {
            Self::EventCounts(request) => {
                let request = GetEventCountsRequest {
                    event_types: set(&request.event_types),
                    sources: set(&request.sources),
                    ..request.clone()
                };
                ("event_counts", request.encode_to_vec())
            }
            Self::UniqueUsers(request) => ("unique_users", request.encode_to_vec()),
            Self::Engagement(request) => ("engagement", request.encode_to_vec()),
            Self::TopProducts(request) => {
                let limit = if request.limit == 0 {
                    DEFAULT_TOP_LIMIT
                } else {
                    request.limit
                };
                let request = GetTopProductsRequest { limit, ..*request };
                ("top_products", request.encode_to_vec())
            }
            Self::Funnel(request) => {
                let request = GetFunnelRequest {
                    sources: set(&request.sources),
                    ..request.clone()
                };
                ("funnel", request.encode_to_vec())
            }
        };
        format!("{kind}:{}", STANDARD_NO_PAD.encode(bytes))
    }

    /// Checks every field except the window (which depends on the time the
    /// query runs); field names start with `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), Error> {
        let mut violations = Vec::new();
        let mut violate = |field: &str, description: String| {
            violations.push(FieldViolation::new(format!("{prefix}{field}"), description));
        };
        let check_product = |product_id: i64, violate: &mut dyn FnMut(&str, String)| {
            if product_id < 0 {
                violate("product_id", "must not be negative".into());
            }
        };
        match self {
            Self::EventCounts(request) => {
                for (index, value) in request.event_types.iter().enumerate() {
                    if !matches!(EventType::try_from(*value), Ok(t) if t != EventType::Unspecified)
                    {
                        violate(
                            &format!("event_types[{index}]"),
                            format!("unknown event type {value}"),
                        );
                    }
                }
                check_sources(&request.sources, &mut violate);
                check_product(request.product_id, &mut violate);
            }
            Self::UniqueUsers(request) => {
                check_product(request.product_id, &mut violate);
                if Source::try_from(request.source).is_err() {
                    violate("source", format!("unknown source {}", request.source));
                }
            }
            Self::Engagement(request) => check_product(request.product_id, &mut violate),
            Self::TopProducts(request) => {
                if !matches!(ProductRanking::try_from(request.ranking), Ok(r) if r != ProductRanking::Unspecified)
                {
                    violate(
                        "ranking",
                        format!("unknown or unspecified ranking {}", request.ranking),
                    );
                }
                if !(0..=MAX_TOP_LIMIT).contains(&request.limit) {
                    violate(
                        "limit",
                        format!(
                            "must be between 0 (meaning {DEFAULT_TOP_LIMIT}) and {MAX_TOP_LIMIT}"
                        ),
                    );
                }
            }
            Self::Funnel(request) => check_sources(&request.sources, &mut violate),
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(violations))
        }
    }

    /// Whether the window ends now (and so moves forward with time).
    pub fn is_rolling(&self) -> bool {
        let window = match self {
            Self::EventCounts(r) => r.window.as_ref(),
            Self::UniqueUsers(r) => r.window.as_ref(),
            Self::Engagement(r) => r.window.as_ref(),
            Self::TopProducts(r) => r.window.as_ref(),
            Self::Funnel(r) => r.window.as_ref(),
        };
        !matches!(
            window.and_then(|w| w.window.as_ref()),
            Some(rtap::v1::time_window::Window::Range(_))
        )
    }

    /// The window this query covers at `now`.
    pub fn window(
        &self,
        now: DateTime<Utc>,
        retention: &Retention,
        prefix: &str,
    ) -> Result<ResolvedWindow, Error> {
        let (window, granularity) = match self {
            Self::EventCounts(r) => (r.window.as_ref(), r.granularity),
            Self::UniqueUsers(r) => (r.window.as_ref(), 0),
            Self::Engagement(r) => (r.window.as_ref(), 0),
            Self::TopProducts(r) => (r.window.as_ref(), 0),
            Self::Funnel(r) => (r.window.as_ref(), 0),
        };
        window::resolve(window, granularity, now, retention, prefix).map_err(Error::InvalidArgument)
    }

    /// Runs the query over `window`, reading buckets still kept under
    /// `retention`.
    pub async fn run(
        &self,
        connection: &mut impl ConnectionLike,
        reader: &MetricReader,
        window: ResolvedWindow,
        retention: &Retention,
    ) -> Result<QueryResult, Error> {
        // Totals read the signed cover; which buckets it picks depends on
        // the time (future buckets are free), its sum never does.
        let cover = || window.signed_cover(Utc::now().timestamp(), retention);
        Ok(match self {
            Self::EventCounts(r) => {
                QueryResult::EventCounts(event_counts(connection, reader, window, r).await?)
            }
            Self::UniqueUsers(r) => {
                QueryResult::UniqueUsers(unique_users(connection, reader, window, r).await?)
            }
            Self::Engagement(r) => {
                QueryResult::Engagement(engagement(connection, reader, window, &cover(), r).await?)
            }
            Self::TopProducts(r) => QueryResult::TopProducts(
                top_products(connection, reader, window, &cover(), r).await?,
            ),
            Self::Funnel(r) => {
                QueryResult::Funnel(funnel(connection, reader, window, &cover(), r).await?)
            }
        })
    }
}

fn check_sources(sources: &[i32], violate: &mut dyn FnMut(&str, String)) {
    for (index, value) in sources.iter().enumerate() {
        if !matches!(Source::try_from(*value), Ok(s) if s != Source::Unspecified) {
            violate(
                &format!("sources[{index}]"),
                format!("unknown source {value}"),
            );
        }
    }
}

/// The requested values, or every value when none is requested.
fn selected<T: Copy + Into<i32>>(requested: &[i32], all: &[T]) -> Vec<i32> {
    if requested.is_empty() {
        all.iter().map(|v| (*v).into()).collect()
    } else {
        let mut values = requested.to_vec();
        values.sort_unstable();
        values.dedup();
        values
    }
}

async fn event_counts(
    connection: &mut impl ConnectionLike,
    reader: &MetricReader,
    window: ResolvedWindow,
    request: &GetEventCountsRequest,
) -> Result<GetEventCountsResponse, Error> {
    let types = selected(&request.event_types, &EVENT_TYPES);
    let sources = selected(&request.sources, &SOURCES);
    let mut pairs = Vec::new();
    for event_type in &types {
        for source in &sources {
            pairs.push((*event_type, *source));
        }
    }
    let buckets = window.buckets();
    let rows = if request.product_id > 0 {
        let fields: Vec<String> = pairs
            .iter()
            .map(|&(event_type, source)| {
                Counter::ProductEvents {
                    event_type,
                    source,
                    product: request.product_id,
                }
                .field()
            })
            .collect();
        reader.fields(connection, &buckets, &fields).await?
    } else if window.granularity == Granularity::Minute {
        let minutes: Vec<i64> = buckets.iter().map(|b| b.start).collect();
        reader.minute_events(connection, &minutes, &pairs).await?
    } else {
        let fields: Vec<String> = pairs
            .iter()
            .map(|&(event_type, source)| Counter::Events { event_type, source }.field())
            .collect();
        reader.fields(connection, &buckets, &fields).await?
    };
    let buckets = buckets
        .iter()
        .zip(rows)
        .map(|(bucket, row)| {
            let counts: Vec<EventCount> = pairs
                .iter()
                .zip(row)
                .filter(|(_, count)| *count != 0)
                .map(|(&(event_type, source), count)| EventCount {
                    event_type,
                    source,
                    count,
                })
                .collect();
            EventCountBucket {
                start_time: Some(timestamp_from_seconds(bucket.start)),
                total: counts.iter().map(|c| c.count).sum(),
                counts,
            }
        })
        .collect();
    Ok(GetEventCountsResponse {
        granularity: window.proto_granularity(),
        range: Some(window.range()),
        buckets,
    })
}

async fn unique_users(
    connection: &mut impl ConnectionLike,
    reader: &MetricReader,
    window: ResolvedWindow,
    request: &GetUniqueUsersRequest,
) -> Result<GetUniqueUsersResponse, Error> {
    // A product and a source together would need per-(product, source) sets;
    // the product filter wins, as documented in the README.
    let set = if request.product_id > 0 {
        UserSet::Product(request.product_id)
    } else if request.source != Source::Unspecified as i32 {
        UserSet::Source(request.source)
    } else {
        UserSet::All
    };
    let users = reader
        .unique_users(connection, &window.covering_buckets(), set)
        .await?;
    Ok(GetUniqueUsersResponse {
        granularity: window.proto_granularity(),
        range: Some(window.range()),
        unique_users: i64::try_from(users).unwrap_or(i64::MAX),
    })
}

async fn engagement(
    connection: &mut impl ConnectionLike,
    reader: &MetricReader,
    window: ResolvedWindow,
    cover: &[SignedBucket],
    request: &GetEngagementRequest,
) -> Result<GetEngagementResponse, Error> {
    let product = request.product_id;
    let view = EventType::ProductView as i32;
    let mut fields = Vec::new();
    for source in SOURCES.map(|s| s as i32) {
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
        fields.extend([
            views,
            dwell,
            Counter::Sessions { source },
            Counter::SessionLength { source },
            Counter::SessionEvents { source },
        ]);
    }
    let fields: Vec<String> = fields.iter().map(Counter::field).collect();
    let mut totals = [0i64; 5];
    for (index, value) in reader
        .totals(connection, cover, &fields)
        .await?
        .into_iter()
        .enumerate()
    {
        totals[index % 5] += value;
    }
    let [views, dwell_micros, sessions, length_ms, session_events] = totals;
    let set = if product > 0 {
        UserSet::Product(product)
    } else {
        UserSet::All
    };
    let users = i64::try_from(
        reader
            .unique_users(connection, &window.covering_buckets(), set)
            .await?,
    )
    .unwrap_or(i64::MAX);
    Ok(GetEngagementResponse {
        granularity: window.proto_granularity(),
        range: Some(window.range()),
        unique_users: users,
        product_views: views,
        total_dwell_time: Some(duration_from_micros(dwell_micros)),
        average_dwell_time_per_user: Some(duration_from_micros(ratio_i64(dwell_micros, users))),
        sessions: Some(session_stats(sessions, length_ms, session_events)),
    })
}

/// Session statistics from their sums.
pub fn session_stats(sessions: i64, length_ms: i64, events: i64) -> SessionStats {
    SessionStats {
        session_count: sessions,
        total_length: Some(duration_from_micros(length_ms.saturating_mul(1000))),
        total_events: events,
        average_length: Some(duration_from_micros(ratio_i64(
            length_ms.saturating_mul(1000),
            sessions,
        ))),
        average_events_per_session: ratio(events, sessions),
    }
}

async fn top_products(
    connection: &mut impl ConnectionLike,
    reader: &MetricReader,
    window: ResolvedWindow,
    cover: &[SignedBucket],
    request: &GetTopProductsRequest,
) -> Result<GetTopProductsResponse, Error> {
    let ranking = match ProductRanking::try_from(request.ranking) {
        Ok(ProductRanking::AddToCarts) => Ranking::AddToCarts,
        Ok(ProductRanking::Purchases) => Ranking::Purchases,
        Ok(ProductRanking::Revenue) => Ranking::Revenue,
        _ => Ranking::Views,
    };
    let limit = if request.limit == 0 {
        DEFAULT_TOP_LIMIT
    } else {
        request.limit
    };
    let scores = reader.ranking(connection, cover, ranking).await?;
    let mut products: Vec<ProductScore> = scores
        .into_iter()
        .filter(|(_, value)| *value != 0)
        .map(|(product_id, value)| ProductScore { product_id, value })
        .collect();
    products.sort_unstable_by(|a, b| b.value.cmp(&a.value).then(a.product_id.cmp(&b.product_id)));
    products.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(GetTopProductsResponse {
        granularity: window.proto_granularity(),
        range: Some(window.range()),
        ranking: request.ranking,
        products,
    })
}

async fn funnel(
    connection: &mut impl ConnectionLike,
    reader: &MetricReader,
    window: ResolvedWindow,
    cover: &[SignedBucket],
    request: &GetFunnelRequest,
) -> Result<GetFunnelResponse, Error> {
    let sources = selected(&request.sources, &SOURCES);
    let mut fields = Vec::new();
    for source in &sources {
        let source = *source;
        fields.push(Counter::Sessions { source });
        for stage in FunnelStage::ALL {
            fields.push(Counter::Funnel { stage, source });
        }
    }
    let fields: Vec<String> = fields.iter().map(Counter::field).collect();
    let mut counts: BTreeMap<i32, [i64; 4]> = BTreeMap::new();
    for (index, value) in reader
        .totals(connection, cover, &fields)
        .await?
        .into_iter()
        .enumerate()
    {
        counts.entry(sources[index / 4]).or_default()[index % 4] += value;
    }
    let explicit = !request.sources.is_empty();
    let funnels: Vec<Funnel> = counts
        .into_iter()
        .filter(|(_, c)| explicit || c[0] != 0)
        .map(|(source, c)| funnel_of(source, c))
        .collect();
    let mut total = [0i64; 4];
    for f in &funnels {
        total[0] += f.sessions;
        total[1] += f.product_view_sessions;
        total[2] += f.add_to_cart_sessions;
        total[3] += f.purchase_sessions;
    }
    Ok(GetFunnelResponse {
        granularity: window.proto_granularity(),
        range: Some(window.range()),
        funnels,
        total: Some(funnel_of(Source::Unspecified as i32, total)),
    })
}

/// A funnel with its rates, from (sessions, viewed, carted, bought).
pub fn funnel_of(source: i32, [sessions, viewed, carted, bought]: [i64; 4]) -> Funnel {
    Funnel {
        source,
        sessions,
        product_view_sessions: viewed,
        add_to_cart_sessions: carted,
        purchase_sessions: bought,
        view_to_cart_rate: ratio(carted, viewed),
        cart_to_purchase_rate: ratio(bought, carted),
        conversion_rate: ratio(bought, sessions),
    }
}

/// `numerator / denominator`, 0 when the denominator is 0.
fn ratio(numerator: i64, denominator: i64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

fn ratio_i64(numerator: i64, denominator: i64) -> i64 {
    if denominator == 0 {
        0
    } else {
        numerator / denominator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_that_give_the_same_result_share_a_canonical_key() {
        let counts = |event_types: Vec<i32>| {
            Query::EventCounts(GetEventCountsRequest {
                event_types,
                ..GetEventCountsRequest::default()
            })
            .canonical_key()
        };
        assert_eq!(counts(vec![2, 1, 1]), counts(vec![1, 2]));
        assert_ne!(counts(vec![1]), counts(vec![1, 2]));
        let top = |limit| {
            Query::TopProducts(GetTopProductsRequest {
                limit,
                ..GetTopProductsRequest::default()
            })
            .canonical_key()
        };
        assert_eq!(top(0), top(DEFAULT_TOP_LIMIT));
        assert_ne!(top(5), top(DEFAULT_TOP_LIMIT));
        // Identical bytes of two kinds are two queries.
        let users = Query::UniqueUsers(GetUniqueUsersRequest::default()).canonical_key();
        let engagement = Query::Engagement(GetEngagementRequest::default()).canonical_key();
        assert_ne!(users, engagement);
    }
}
