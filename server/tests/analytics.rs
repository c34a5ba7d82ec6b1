//! AnalyticsService against a live pipeline: every query checked against the
//! ground truth of simulated traffic, and subscriptions (snapshot + deltas
//! equal the unary query, fan-out across replicas, heartbeats, no leaks).

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, ensure};
use chrono::{DateTime, Utc};
use common::{
    TestDatabase, TestServer,
    counts::{Held, apply, held_of, next},
    pipeline::{
        PARTITIONS, event, hll_close, ingest_config, produce, settled_versions, simulate,
        source_number, wait_caught_up,
    },
};
use rtap::v1::{
    EventType, GetEngagementRequest, GetEngagementResponse, GetEventCountsRequest,
    GetFunnelRequest, GetFunnelResponse, GetPipelineStatusRequest, GetTopProductsRequest,
    GetTopProductsResponse, GetUniqueUsersRequest, Granularity, ProductRanking, Source,
    SubscribeRequest, TimeRange, TimeWindow, analytics_service_client::AnalyticsServiceClient,
    delta, subscribe_request, subscribe_response, time_window::Window,
};
use rtap_server::{
    Config,
    analytics::window::ResolvedWindow,
    config::Role,
    store::{
        self, Bucket, Counter, Ranking, Retention,
        read::MetricReader,
        settled::{self, SettledRankings},
    },
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

fn client(server: &TestServer) -> AnalyticsServiceClient<Channel> {
    AnalyticsServiceClient::new(server.channel())
}

fn range(start: i64, end: i64) -> TimeWindow {
    TimeWindow {
        window: Some(Window::Range(TimeRange {
            start_time: Some(prost_types::Timestamp {
                seconds: start,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: end,
                nanos: 0,
            }),
        })),
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

/// Every query that reads totals over `window` (top products by views and
/// revenue, engagement of `product` and of the shop, the funnel), with the
/// replies' ranges cleared so that windows can be compared.
async fn totals_over(
    analytics: &mut AnalyticsServiceClient<Channel>,
    window: TimeWindow,
    product: i64,
) -> anyhow::Result<(
    Vec<GetTopProductsResponse>,
    Vec<GetEngagementResponse>,
    GetFunnelResponse,
)> {
    let mut tops = Vec::new();
    for ranking in [ProductRanking::Views, ProductRanking::Revenue] {
        let mut top = analytics
            .get_top_products(GetTopProductsRequest {
                window: Some(window),
                ranking: ranking as i32,
                limit: 100,
                include_product_names: false,
            })
            .await?
            .into_inner();
        top.range = None;
        tops.push(top);
    }
    let mut engagements = Vec::new();
    for product_id in [product, 0] {
        let mut engagement = analytics
            .get_engagement(GetEngagementRequest {
                window: Some(window),
                product_id,
            })
            .await?
            .into_inner();
        engagement.range = None;
        engagements.push(engagement);
    }
    let mut funnel = analytics
        .get_funnel(GetFunnelRequest {
            window: Some(window),
            sources: vec![],
        })
        .await?
        .into_inner();
    funnel.range = None;
    Ok((tops, engagements, funnel))
}

fn api_config(database: &TestDatabase) -> Config {
    let mut config = ingest_config(database);
    config.role = Role::All;
    config
}

#[tokio::test]
async fn every_query_matches_the_ground_truth() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = api_config(&database);
    let brokers = config.kafka_brokers[0].clone();
    let truth = simulate(
        &brokers,
        &config.events_topic,
        20_000,
        5,
        &["--duplicate-share", "0.01", "--malformed-share", "0.01"],
    )
    .await?;
    let server = TestServer::start(config.clone()).await?;
    wait_caught_up(&config, Duration::from_secs(120)).await?;
    let mut analytics = client(&server);
    let first = truth.first_event_time.context("events")?.timestamp();
    let last = truth.last_event_time.context("events")?.timestamp();
    let window = range(first, last + 1);

    // Event counts, per minute and in total, at each granularity.
    for granularity in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
        let counts = analytics
            .get_event_counts(GetEventCountsRequest {
                window: Some(window),
                granularity: granularity as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(counts.granularity, granularity as i32);
        let total: i64 = counts.buckets.iter().map(|b| b.total).sum();
        assert_eq!(total, i64::try_from(truth.events)?, "{granularity:?}");
        let mut by_pair: BTreeMap<String, i64> = BTreeMap::new();
        for bucket in &counts.buckets {
            for count in &bucket.counts {
                let name = format!(
                    "{}/{}",
                    Source::try_from(count.source)?.as_str_name(),
                    EventType::try_from(count.event_type)?.as_str_name()
                );
                *by_pair.entry(name).or_default() += count.count;
            }
        }
        let expected: BTreeMap<String, i64> = truth
            .events_by_source_and_type
            .iter()
            .map(|(k, v)| (k.clone(), i64::try_from(*v).unwrap_or(0)))
            .collect();
        assert_eq!(by_pair, expected);
        if granularity == Granularity::Minute {
            let per_minute: BTreeMap<String, u64> = counts
                .buckets
                .iter()
                .filter(|b| b.total > 0)
                .filter_map(|b| {
                    let start = DateTime::from_timestamp(b.start_time?.seconds, 0)?;
                    Some((
                        start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        u64::try_from(b.total).ok()?,
                    ))
                })
                .collect();
            assert_eq!(per_minute, truth.events_per_minute);
            // Empty buckets are present with zero counts.
            let minutes = (last / 60 - first / 60 + 1) as usize;
            assert_eq!(counts.buckets.len(), minutes);
        }
    }

    // Filters: one product's views from the web.
    let (top_product, top) = truth
        .products
        .iter()
        .max_by_key(|(id, p)| (p.views, -**id))
        .context("products")?;
    let filtered = analytics
        .get_event_counts(GetEventCountsRequest {
            window: Some(window),
            granularity: Granularity::Hour as i32,
            event_types: vec![EventType::ProductView as i32],
            sources: vec![],
            product_id: *top_product,
        })
        .await?
        .into_inner();
    let views: i64 = filtered.buckets.iter().map(|b| b.total).sum();
    assert_eq!(views, i64::try_from(top.views)?);

    // Unique users.
    let users = analytics
        .get_unique_users(GetUniqueUsersRequest {
            window: Some(window),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(hll_close(
        u64::try_from(users.unique_users)?,
        truth.unique_users
    ));
    let product_users = analytics
        .get_unique_users(GetUniqueUsersRequest {
            window: Some(window),
            product_id: *top_product,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(hll_close(
        u64::try_from(product_users.unique_users)?,
        top.unique_users
    ));

    // Engagement: the seed platform's two metrics.
    let engagement = analytics
        .get_engagement(GetEngagementRequest {
            window: Some(window),
            product_id: *top_product,
        })
        .await?
        .into_inner();
    assert_eq!(engagement.product_views, i64::try_from(top.views)?);
    let dwell = engagement.total_dwell_time.context("dwell")?;
    assert_eq!(
        dwell.seconds * 1_000_000 + i64::from(dwell.nanos) / 1000,
        top.dwell_micros
    );
    let average = engagement.average_dwell_time_per_user.context("average")?;
    let expected_average = top.dwell_micros / engagement.unique_users;
    assert_eq!(
        average.seconds * 1_000_000 + i64::from(average.nanos) / 1000,
        expected_average
    );
    let nothing = analytics
        .get_engagement(GetEngagementRequest {
            window: Some(window),
            product_id: 987_654_321,
        })
        .await?
        .into_inner();
    assert_eq!((nothing.unique_users, nothing.product_views), (0, 0));
    assert_eq!(
        nothing.average_dwell_time_per_user,
        Some(prost_types::Duration::default())
    );
    let shop = analytics
        .get_engagement(GetEngagementRequest {
            window: Some(window),
            product_id: 0,
        })
        .await?
        .into_inner();
    let sessions = shop.sessions.context("sessions")?;
    let truth_sessions: u64 = truth.funnel.values().map(|f| f.sessions).sum();
    assert_eq!(sessions.session_count, i64::try_from(truth_sessions)?);
    assert_eq!(sessions.total_events, i64::try_from(truth.events)?);

    // Top products, by views and by revenue, ties by ascending id.
    for (ranking, value) in [
        (
            ProductRanking::Views,
            (|p: &rtap_simulator::truth::ProductTruth| i64::try_from(p.views).unwrap_or(0))
                as fn(&rtap_simulator::truth::ProductTruth) -> i64,
        ),
        (ProductRanking::Revenue, |p| p.revenue_micros),
        (ProductRanking::Purchases, |p| {
            i64::try_from(p.items_purchased).unwrap_or(0)
        }),
    ] {
        let top = analytics
            .get_top_products(GetTopProductsRequest {
                window: Some(window),
                ranking: ranking as i32,
                limit: 10,
                include_product_names: false,
            })
            .await?
            .into_inner();
        let mut expected: Vec<(i64, i64)> = truth
            .products
            .iter()
            .map(|(id, p)| (*id, value(p)))
            .filter(|(_, v)| *v != 0)
            .collect();
        expected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        expected.truncate(10);
        let actual: Vec<(i64, i64)> = top
            .products
            .iter()
            .map(|p| (p.product_id, p.value))
            .collect();
        assert_eq!(actual, expected, "{ranking:?}");
    }

    // The funnel per source, with its rates.
    let funnel = analytics
        .get_funnel(GetFunnelRequest {
            window: Some(window),
            sources: vec![],
        })
        .await?
        .into_inner();
    for (source, expected) in &truth.funnel {
        let source = source_number(source)?;
        let actual = funnel
            .funnels
            .iter()
            .find(|f| f.source == source)
            .context("a funnel per source seen")?;
        assert_eq!(
            (
                actual.sessions,
                actual.product_view_sessions,
                actual.add_to_cart_sessions,
                actual.purchase_sessions
            ),
            (
                i64::try_from(expected.sessions)?,
                i64::try_from(expected.product_view_sessions)?,
                i64::try_from(expected.add_to_cart_sessions)?,
                i64::try_from(expected.purchase_sessions)?
            )
        );
        let rate = expected.purchase_sessions as f64 / expected.sessions as f64;
        assert!((actual.conversion_rate - rate).abs() < 1e-9);
    }
    let total = funnel.total.context("total")?;
    assert_eq!(total.sessions, i64::try_from(truth_sessions)?);

    // Totals read a signed cover: over a window that also holds all the
    // events but is an hour minus an empty edge minute, they read the hour
    // minus that minute, and must not change.
    let hour = |t: i64| t.div_euclid(3600) * 3600;
    let minute = |t: i64| t.div_euclid(60) * 60;
    let mut start = hour(first);
    if minute(first) > start {
        start += 60;
    }
    let mut end = hour(last) + 3600;
    if minute(last) + 60 < end {
        end -= 60;
    }
    let signed = ResolvedWindow {
        granularity: store::Granularity::Minute,
        start,
        end,
    }
    .signed_cover(Utc::now().timestamp(), &Retention::from_config(&config));
    assert!(signed.iter().any(|(_, sign)| *sign < 0), "{signed:?}");
    assert_eq!(
        totals_over(&mut analytics, range(start, end), *top_product).await?,
        totals_over(&mut analytics, window, *top_product).await?
    );
    // And subtraction is real: the hours of the run minus all their minutes
    // leave every ranking score and counter at zero.
    let reader = MetricReader::new(&config.redis_namespace, 0..PARTITIONS);
    let connection = common::test_nodes()?;
    let mut nothing = Vec::new();
    for hour_start in (hour(first)..=hour(last)).step_by(3600) {
        nothing.push((Bucket::containing(store::Granularity::Hour, hour_start), 1));
        nothing.extend((0..60).map(|m| {
            (
                Bucket::containing(store::Granularity::Minute, hour_start + 60 * m),
                -1,
            )
        }));
    }
    let scores = reader
        .ranking(&connection, &nothing, Ranking::Views)
        .await?;
    assert!(
        !scores.is_empty() && scores.values().all(|s| *s == 0),
        "{scores:?}"
    );
    let fields = [
        Counter::Sessions { source: 1 }.field(),
        Counter::TotalDwell { source: 2 }.field(),
    ];
    let totals = reader.totals(&connection, &nothing, &fields).await?;
    assert_eq!(totals, [0, 0]);
    let hours: Vec<(Bucket, i64)> = nothing.iter().filter(|(_, s)| *s > 0).copied().collect();
    let counted = reader.totals(&connection, &hours, &fields).await?;
    assert!(counted.iter().all(|c| *c > 0), "{counted:?}");

    // The pipeline's vital signs.
    let status = analytics
        .get_pipeline_status(GetPipelineStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.partitions.len(), usize::try_from(PARTITIONS)?);
    for partition in &status.partitions {
        assert_eq!(partition.high_watermark, partition.stored_offset);
        assert_eq!(partition.lag, 0);
        assert!(partition.last_commit_time.is_some());
    }
    let total = status.total.context("total")?;
    assert_eq!(total.events_applied, i64::try_from(truth.events)?);
    assert_eq!(total.duplicates_skipped, i64::try_from(truth.duplicates)?);
    let dead: i64 = total.dead_lettered.iter().map(|d| d.count).sum();
    assert_eq!(dead, i64::try_from(truth.malformed.values().sum::<u64>())?);
    assert!(
        total
            .dead_lettered
            .iter()
            .any(|d| d.reason == "decode_error"),
        "{total:?}"
    );

    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// Settled ranking buckets are read from Redis once per settled version: a
/// second read of the same cover comes from the cache, only a late event
/// into a settled hour changes its partition's version, and every read,
/// cached or not, through the reader or the API, equals the uncached one.
#[tokio::test]
async fn settled_rankings_are_cached_until_a_late_event_changes_them() -> anyhow::Result<()> {
    // A cover's settled part moves at hour boundaries: start clear of one.
    let to_next_hour = 3600 - Utc::now().timestamp().rem_euclid(3600);
    if to_next_hour < 120 {
        tokio::time::sleep(Duration::from_secs(u64::try_from(to_next_hour)? + 1)).await;
    }
    let database = TestDatabase::create().await?;
    let config = api_config(&database);
    let (brokers, topic) = (&config.kafka_brokers[0], &config.events_topic);
    let server = TestServer::start(config.clone()).await?;
    let now = Utc::now();
    let settled_time = now - chrono::Duration::hours(5);
    let view = |user: i64, product: i64, time: DateTime<Utc>| {
        let mut event = event(user, time);
        event.product_id = product;
        event
    };
    // Sixty users (every partition has some): one settled view each of
    // products 1 to 4, one fresh view each of product 5.
    let mut events: Vec<_> = (1..=60)
        .map(|user| view(user, 1 + user % 4, settled_time))
        .collect();
    events.extend((1..=60).map(|user| view(user, 5, now - chrono::Duration::minutes(1))));
    produce(brokers, topic, &events).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;

    let retention = Retention::from_config(&config);
    let minute = now.timestamp() / 60 * 60;
    let window = ResolvedWindow {
        granularity: store::Granularity::Minute,
        start: minute - 6 * 3600,
        end: minute + 60,
    };
    let cover = window.signed_cover(now.timestamp(), &retention);
    ensure!(
        cover
            .iter()
            .any(|(bucket, _)| settled::is_settled(*bucket, now.timestamp())),
        "nothing settled in {cover:?}"
    );
    let cache = Arc::new(SettledRankings::new(retention));
    let cached =
        MetricReader::new(&config.redis_namespace, 0..PARTITIONS).with_settled(cache.clone());
    let plain = MetricReader::new(&config.redis_namespace, 0..PARTITIONS);
    let connection = common::test_nodes()?;
    let mut analytics = client(&server);
    let api_top = |analytics: &mut AnalyticsServiceClient<Channel>| {
        let mut analytics = analytics.clone();
        async move {
            let top = analytics
                .get_top_products(GetTopProductsRequest {
                    window: Some(range(window.start, window.end)),
                    ranking: ProductRanking::Views as i32,
                    limit: 100,
                    include_product_names: false,
                })
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>(
                top.products
                    .iter()
                    .map(|p| (p.product_id, p.value))
                    .collect::<HashMap<i64, i64>>(),
            )
        }
    };

    let nonzero = |scores: &HashMap<i64, i64>| -> HashMap<i64, i64> {
        scores
            .iter()
            .filter(|(_, s)| **s != 0)
            .map(|(p, s)| (*p, *s))
            .collect()
    };
    let partitions = u64::try_from(PARTITIONS)?;
    let versions = settled_versions(&config.redis_namespace).await?;
    assert!(versions.iter().all(Option::is_some), "{versions:?}");
    let first = cached.ranking(&connection, &cover, Ranking::Views).await?;
    assert_eq!(cache.stats(), (partitions, 0));
    let second = cached.ranking(&connection, &cover, Ranking::Views).await?;
    assert_eq!(cache.stats(), (2 * partitions, partitions));
    let truth = plain.ranking(&connection, &cover, Ranking::Views).await?;
    assert_eq!(first, truth);
    assert_eq!(second, truth);
    assert_eq!(truth.get(&5), Some(&60));
    assert_eq!((1..=4).filter_map(|p| truth.get(&p)).sum::<i64>(), 60);
    for _ in 0..2 {
        assert_eq!(api_top(&mut analytics).await?, nonzero(&truth));
    }

    // A fresh event changes no settled version.
    produce(brokers, topic, &[view(7, 5, Utc::now())]).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    assert_eq!(settled_versions(&config.redis_namespace).await?, versions);
    let truth = plain.ranking(&connection, &cover, Ranking::Views).await?;
    assert_eq!(truth.get(&5), Some(&61));
    assert_eq!(
        cached.ranking(&connection, &cover, Ranking::Views).await?,
        truth
    );
    assert_eq!(cache.stats(), (3 * partitions, 2 * partitions));

    // A late one changes its partition's, and only that partition reads
    // its settled buckets again.
    let late_time = settled_time + chrono::Duration::minutes(10);
    produce(brokers, topic, &[view(7, 1, late_time)]).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;
    let late_versions = settled_versions(&config.redis_namespace).await?;
    let changed = late_versions
        .iter()
        .zip(&versions)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(changed, 1, "{versions:?} -> {late_versions:?}");
    let truth = plain.ranking(&connection, &cover, Ranking::Views).await?;
    assert_eq!(
        truth.get(&1),
        Some(&(first.get(&1).copied().unwrap_or(0) + 1))
    );
    assert_eq!(
        cached.ranking(&connection, &cover, Ranking::Views).await?,
        truth
    );
    assert_eq!(cache.stats(), (4 * partitions, 3 * partitions - 1));
    assert_eq!(api_top(&mut analytics).await?, nonzero(&truth));

    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn invalid_windows_and_fields_are_invalid_argument_and_a_down_redis_is_unavailable()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = api_config(&database);
    let server = TestServer::start(config.clone()).await?;
    let mut analytics = client(&server);
    let now = Utc::now().timestamp();
    let cases: Vec<(GetEventCountsRequest, &str)> = vec![
        (
            GetEventCountsRequest {
                window: Some(range(now, now - 60)),
                ..Default::default()
            },
            "window.range.end_time",
        ),
        (
            GetEventCountsRequest {
                window: Some(range(now, now)),
                ..Default::default()
            },
            "window.range.end_time",
        ),
        (GetEventCountsRequest::default(), "window"),
        (
            GetEventCountsRequest {
                window: Some(trailing(30 * 86_400)),
                granularity: Granularity::Minute as i32,
                ..Default::default()
            },
            "window",
        ),
        (
            GetEventCountsRequest {
                window: Some(trailing(60)),
                event_types: vec![42],
                ..Default::default()
            },
            "event_types[0]",
        ),
    ];
    for (request, field) in cases {
        let status = analytics
            .get_event_counts(request)
            .await
            .expect_err("invalid");
        assert_eq!(common::bad_request_fields(&status), [field]);
    }
    let status = analytics
        .get_top_products(GetTopProductsRequest {
            window: Some(trailing(60)),
            ranking: 0,
            limit: 500,
            include_product_names: false,
        })
        .await
        .expect_err("invalid");
    assert_eq!(common::bad_request_fields(&status), ["ranking", "limit"]);
    let status = analytics
        .subscribe(SubscribeRequest::default())
        .await
        .expect_err("invalid");
    assert_eq!(common::bad_request_fields(&status), ["query"]);
    server.stop().await?;

    // Redis down: UNAVAILABLE, and the server stays up.
    let mut down = config.clone();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    down.redis_url = format!("redis://{closed}/");
    down.redis_cluster = false;
    let server = TestServer::start(down).await?;
    let status = client(&server)
        .get_unique_users(GetUniqueUsersRequest {
            window: Some(trailing(60)),
            ..Default::default()
        })
        .await
        .expect_err("redis is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn out_of_range_times_are_invalid_argument_naming_the_field_never_a_panic()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let server = TestServer::start(api_config(&database)).await?;
    let mut analytics = client(&server);
    let extreme = || Some(range(i64::MIN, i64::MAX));
    let start = "window.range.start_time";
    // Each of the five queries, with the widest window a client can send.
    let status = analytics
        .get_event_counts(GetEventCountsRequest {
            window: extreme(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(common::bad_request_fields(&status), [start], "{status:?}");
    let status = analytics
        .get_unique_users(GetUniqueUsersRequest {
            window: extreme(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(common::bad_request_fields(&status), [start], "{status:?}");
    let status = analytics
        .get_engagement(GetEngagementRequest {
            window: extreme(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(common::bad_request_fields(&status), [start], "{status:?}");
    let status = analytics
        .get_top_products(GetTopProductsRequest {
            window: extreme(),
            ranking: ProductRanking::Views as i32,
            limit: 10,
            include_product_names: false,
        })
        .await
        .expect_err("invalid");
    assert_eq!(common::bad_request_fields(&status), [start], "{status:?}");
    let status = analytics
        .get_funnel(GetFunnelRequest {
            window: extreme(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(common::bad_request_fields(&status), [start], "{status:?}");

    // Nanos outside what the well-known types allow.
    let now = Utc::now().timestamp();
    let mut bad_nanos = range(now - 60, now);
    if let Some(Window::Range(range)) = bad_nanos.window.as_mut() {
        range.end_time = Some(prost_types::Timestamp {
            seconds: now,
            nanos: 2_000_000_000,
        });
    }
    let status = analytics
        .get_event_counts(GetEventCountsRequest {
            window: Some(bad_nanos),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(
        common::bad_request_fields(&status),
        ["window.range.end_time"]
    );
    for nanos in [2_000_000_000, -5] {
        let window = TimeWindow {
            window: Some(Window::Trailing(prost_types::Duration {
                seconds: 60,
                nanos,
            })),
        };
        let status = analytics
            .get_event_counts(GetEventCountsRequest {
                window: Some(window),
                ..Default::default()
            })
            .await
            .expect_err("invalid");
        assert_eq!(common::bad_request_fields(&status), ["window.trailing"]);
        let status = analytics
            .subscribe(SubscribeRequest {
                query: Some(subscribe_request::Query::EventCounts(
                    GetEventCountsRequest {
                        window: Some(trailing(60)),
                        ..Default::default()
                    },
                )),
                heartbeat_interval: Some(prost_types::Duration { seconds: 5, nanos }),
                resume_token: Vec::new(),
            })
            .await
            .expect_err("invalid");
        assert_eq!(common::bad_request_fields(&status), ["heartbeat_interval"]);
    }
    server.stop().await?;
    database.drop().await
}

/// Event counts a client holds: bucket start → (type, source) → count.
#[tokio::test]
async fn snapshot_plus_deltas_equals_the_unary_query_across_replicas() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    // One replica ingests, another serves: the subscriber is on the latter.
    let ingest = ingest_config(&database);
    let mut api = ingest.clone();
    api.role = Role::Api;
    let ingesting = TestServer::start(ingest.clone()).await?;
    let serving = TestServer::start(api).await?;
    let mut analytics = client(&serving);
    let query = GetEventCountsRequest {
        window: Some(trailing(30 * 60)),
        granularity: Granularity::Minute as i32,
        ..Default::default()
    };
    let mut stream = analytics
        .subscribe(SubscribeRequest {
            query: Some(subscribe_request::Query::EventCounts(query.clone())),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            resume_token: Vec::new(),
        })
        .await?
        .into_inner();
    let mut held = Held::new();
    let first = next(&mut stream).await?;
    assert_eq!(first.sequence, 1);
    ensure!(
        !apply(&mut held, &first)?,
        "the first message is a snapshot"
    );
    let mut sequence = 1;

    let brokers = ingest.kafka_brokers[0].clone();
    let now = Utc::now();
    for wave in 0..5 {
        let events: Vec<_> = (1..=40)
            .map(|user| event(user * 10 + wave, now - chrono::Duration::minutes(user % 7)))
            .collect();
        produce(&brokers, &ingest.events_topic, &events).await?;
        wait_caught_up(&ingest, Duration::from_secs(30)).await?;
        // Read until the held result equals the unary query.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let unary = analytics
                .get_event_counts(query.clone())
                .await?
                .into_inner();
            let mut expected = held_of(&unary);
            expected.retain(|_, c| !c.is_empty());
            let mut have = held.clone();
            have.retain(|_, c| !c.is_empty());
            if have == expected {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "wave {wave}: held {have:?} != unary {expected:?}"
            );
            let message = next(&mut stream).await?;
            sequence += 1;
            assert_eq!(
                message.sequence, sequence,
                "sequence numbers follow each other"
            );
            apply(&mut held, &message)?;
        }
    }
    let total: i64 = held.values().flat_map(|c| c.values()).sum();
    assert_eq!(total, 200);

    // Idle: heartbeats carry the watermark.
    let heartbeat = loop {
        let message = next(&mut stream).await?;
        if let Some(subscribe_response::Update::Heartbeat(_)) = message.update {
            break message;
        }
    };
    let watermark = heartbeat.watermark.context("watermark")?;
    assert!(watermark.latest_event_time.is_some());
    assert_eq!(watermark.offsets.len(), usize::try_from(PARTITIONS)?);

    drop(stream);
    serving.stop().await?;
    ingesting.stop().await?;
    common::delete_namespace(&ingest, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn thousands_of_dropped_subscriptions_leave_no_streams_or_feeds() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = api_config(&database);
    // Feeds run on that long after their last subscriber, for resumers.
    config.subscription_history_age = Duration::from_secs(2);
    let server = TestServer::start(config.clone()).await?;
    let mut analytics = client(&server);
    let mut streams = Vec::new();
    for index in 0..2000 {
        // A few distinct queries, shared by many subscribers.
        let query = GetFunnelRequest {
            window: Some(trailing(60 * (1 + index % 5))),
            sources: vec![],
        };
        let mut stream = analytics
            .subscribe(SubscribeRequest {
                query: Some(subscribe_request::Query::Funnel(query)),
                heartbeat_interval: None,
                resume_token: Vec::new(),
            })
            .await?
            .into_inner();
        next(&mut stream).await?;
        streams.push(stream);
    }
    let status = analytics
        .get_pipeline_status(GetPipelineStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.active_subscriptions, 2000);
    assert_eq!(status.active_feeds, 5);
    drop(streams);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = analytics
            .get_pipeline_status(GetPipelineStatusRequest {})
            .await?
            .into_inner();
        if status.active_subscriptions == 0 && status.active_feeds == 0 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "left: {} streams, {} feeds",
            status.active_subscriptions,
            status.active_feeds
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_gets_a_resync_snapshot_then_stays_exact()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = api_config(&database);
    let server = TestServer::start(config.clone()).await?;
    // A tiny HTTP/2 window: the server can buffer only a few messages for
    // this client while it does not read.
    let slow = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))?
        .initial_stream_window_size(Some(512))
        .initial_connection_window_size(Some(512))
        .connect()
        .await?;
    let query = GetEventCountsRequest {
        window: Some(trailing(10 * 60)),
        granularity: Granularity::Minute as i32,
        ..Default::default()
    };
    let mut stream = AnalyticsServiceClient::new(slow)
        .subscribe(SubscribeRequest {
            query: Some(subscribe_request::Query::EventCounts(query.clone())),
            heartbeat_interval: None,
            resume_token: Vec::new(),
        })
        .await?
        .into_inner();
    let mut held = Held::new();
    apply(&mut held, &next(&mut stream).await?)?;

    // Many separate commits, each a delta, while the client does not read.
    let writer =
        common::pipeline::EventWriter::connect(&config.kafka_brokers[0], &config.events_topic)
            .await?;
    for user in 1..=200 {
        writer.send(&[event(user, Utc::now())]).await?;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_caught_up(&config, Duration::from_secs(30)).await?;

    let mut analytics = client(&server);
    let mut resynced = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let message = next(&mut stream).await?;
        if let Some(subscribe_response::Update::Snapshot(snapshot)) = &message.update {
            assert!(snapshot.resync, "a later snapshot is a resync");
            resynced = true;
        }
        apply(&mut held, &message)?;
        let mut expected = held_of(
            &analytics
                .get_event_counts(query.clone())
                .await?
                .into_inner(),
        );
        expected.retain(|_, c| !c.is_empty());
        let mut have = held.clone();
        have.retain(|_, c| !c.is_empty());
        if resynced && have == expected {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "resynced {resynced}; held {have:?} != unary {expected:?}"
        );
    }
    let total: i64 = held.values().flat_map(|c| c.values()).sum();
    assert_eq!(total, 200);
    drop(stream);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn a_rolling_window_rolls_forward_and_stays_equal_to_the_unary_query() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = api_config(&database);
    let server = TestServer::start(config.clone()).await?;
    let mut analytics = client(&server);
    // The last minute: two minute buckets, the older one leaves at the next
    // minute boundary.
    let query = GetEventCountsRequest {
        window: Some(trailing(60)),
        granularity: Granularity::Minute as i32,
        ..Default::default()
    };
    let mut stream = analytics
        .subscribe(SubscribeRequest {
            query: Some(subscribe_request::Query::EventCounts(query.clone())),
            heartbeat_interval: None,
            resume_token: Vec::new(),
        })
        .await?
        .into_inner();
    let mut held = Held::new();
    apply(&mut held, &next(&mut stream).await?)?;
    let before: Vec<i64> = held.keys().copied().collect();
    let events: Vec<_> = (1..=10).map(|user| event(user, Utc::now())).collect();
    produce(&config.kafka_brokers[0], &config.events_topic, &events).await?;

    // Read until a minute boundary has passed and the held result is the
    // unary one again.
    let mut removed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let message = tokio::time::timeout(Duration::from_secs(70), stream.next())
            .await
            .context("no message within 70 s")?
            .context("the stream ended")??;
        if let Some(subscribe_response::Update::Delta(delta)) = &message.update
            && let Some(delta::Change::EventCounts(change)) = &delta.change
        {
            removed += change.removed_bucket_start_times.len();
        }
        apply(&mut held, &message)?;
        let unary = analytics
            .get_event_counts(query.clone())
            .await?
            .into_inner();
        let starts: Vec<i64> = unary
            .buckets
            .iter()
            .map(|b| b.start_time.map_or(0, |t| t.seconds))
            .collect();
        let mut expected = held_of(&unary);
        expected.retain(|_, c| !c.is_empty());
        let mut have = held.clone();
        have.retain(|_, c| !c.is_empty());
        let rolled = starts != before && held.keys().copied().collect::<Vec<_>>() == starts;
        if removed > 0 && rolled && have == expected {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "removed {removed}, held {:?} vs unary {starts:?}",
            held.keys().collect::<Vec<_>>()
        );
    }
    drop(stream);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// What a top-products subscriber holds: product id → (value, name).
type HeldRanking = BTreeMap<i64, (i64, String)>;

/// A ranking as a top-products subscriber holds it.
fn ranking_of(products: &[rtap::v1::ProductScore]) -> HeldRanking {
    products
        .iter()
        .map(|p| (p.product_id, (p.value, p.product_name.clone())))
        .collect()
}

/// Applies one message of a top-products stream to `held`.
fn apply_ranking(held: &mut HeldRanking, message: &rtap::v1::SubscribeResponse) {
    use rtap::v1::snapshot;
    match &message.update {
        Some(subscribe_response::Update::Snapshot(rtap::v1::Snapshot {
            result: Some(snapshot::Result::TopProducts(top)),
            ..
        })) => *held = ranking_of(&top.products),
        Some(subscribe_response::Update::Delta(rtap::v1::Delta {
            change: Some(delta::Change::TopProducts(change)),
        })) => {
            for id in &change.removed_product_ids {
                held.remove(id);
            }
            for p in &change.upserted {
                held.insert(p.product_id, (p.value, p.product_name.clone()));
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn rankings_carry_catalog_names_when_asked_and_a_deleted_product_keeps_its_id()
-> anyhow::Result<()> {
    use rtap::v1::{
        CreateProductRequest, DeleteProductRequest, Product,
        product_service_client::ProductServiceClient,
    };
    let database = TestDatabase::create().await?;
    let mut config = api_config(&database);
    // PostgreSQL behind a proxy, to take it away at the end.
    let proxy = common::TcpProxy::start("127.0.0.1:5432".parse()?).await?;
    config.database_url = database
        .url
        .replace("127.0.0.1:5432", &proxy.addr.to_string());
    config.dependency_timeout = Duration::from_millis(500);
    let server = TestServer::start_with_catalog(config.clone()).await?;
    let mut products = ProductServiceClient::new(server.channel());
    let mut ids = Vec::new();
    for name in ["Espresso machine", "Burr grinder", "Discontinued kettle"] {
        let created = products
            .create_product(CreateProductRequest {
                product: Some(Product {
                    name: name.to_owned(),
                    category: "kitchen".to_owned(),
                    price: 10.0,
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .product
            .context("created product")?;
        ids.push(created.id);
    }
    let (espresso, grinder, kettle) = (ids[0], ids[1], ids[2]);
    products
        .delete_product(DeleteProductRequest { id: kettle })
        .await?;

    let mut analytics = client(&server);
    let named = GetTopProductsRequest {
        window: Some(trailing(3600)),
        ranking: ProductRanking::Views as i32,
        limit: 10,
        include_product_names: true,
    };
    let mut stream = analytics
        .subscribe(SubscribeRequest {
            query: Some(subscribe_request::Query::TopProducts(named)),
            heartbeat_interval: None,
            resume_token: Vec::new(),
        })
        .await?
        .into_inner();
    let mut held = HeldRanking::new();
    apply_ranking(&mut held, &next(&mut stream).await?);

    let now = Utc::now();
    let mut events = Vec::new();
    for (product, views) in [(espresso, 3), (grinder, 2), (kettle, 1)] {
        for user in 0..views {
            let mut view = event(100 + user, now);
            view.product_id = product;
            events.push(view);
        }
    }
    produce(&config.kafka_brokers[0], &config.events_topic, &events).await?;
    wait_caught_up(&config, Duration::from_secs(30)).await?;

    let expected: HeldRanking = [
        (espresso, (3, "Espresso machine".to_owned())),
        (grinder, (2, "Burr grinder".to_owned())),
        (kettle, (1, String::new())),
    ]
    .into();
    let unary = analytics.get_top_products(named).await?.into_inner();
    assert_eq!(
        ranking_of(&unary.products),
        expected,
        "the unary answer names the products"
    );
    let unnamed = analytics
        .get_top_products(GetTopProductsRequest {
            include_product_names: false,
            ..named
        })
        .await?
        .into_inner();
    assert!(
        unnamed.products.iter().all(|p| p.product_name.is_empty()),
        "names only when asked: {unnamed:?}"
    );
    assert_eq!(unnamed.products.len(), 3);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while held != expected {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the subscriber holds {held:?}, not {expected:?}"
        );
        apply_ranking(&mut held, &next(&mut stream).await?);
    }

    // The catalog unreachable: rankings are still answered, with the names
    // already read and none for a product never looked up.
    proxy.cut();
    let newcomer = kettle + 1000;
    let views: Vec<_> = (0..4)
        .map(|user| {
            let mut view = event(200 + user, now);
            view.product_id = newcomer;
            view
        })
        .collect();
    produce(&config.kafka_brokers[0], &config.events_topic, &views).await?;
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    let mut expected = expected;
    expected.insert(newcomer, (4, String::new()));
    for attempt in ["the look-up fails", "look-ups paused"] {
        let answer = analytics.get_top_products(named).await?.into_inner();
        assert_eq!(ranking_of(&answer.products), expected, "{attempt}");
    }

    drop(stream);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}
