//! `/metrics` of a live `rtap-server` process: what an operator's Prometheus
//! reads after real calls, real ingest and a real subscription.

mod common;

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use anyhow::{Context, ensure};
use chrono::Utc;
use common::{
    TestDatabase,
    pipeline::{PARTITIONS, event, ingest_config, produce, server_command_as, wait_caught_up},
};
use rtap::v1::{GetUserRequest, user_service_client::UserServiceClient};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// Every sample of a `/metrics` page: `name{labels}` → value.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of metric `name` whose series contains every one
/// of `labels` (`key="value"`).
fn sum(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series
                .split_once('{')
                .map_or(series.as_str(), |(metric, _)| metric)
                == name
                && labels.iter().all(|label| series.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}

async fn scrape(addr: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let reply = String::from_utf8(common::http1(addr, "GET /metrics HTTP/1.1", b"").await?)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("an HTTP reply")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Ok(samples(body))
}

#[tokio::test]
async fn metrics_show_calls_ingest_subscriptions_and_dependencies() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    let metrics_addr = format!("127.0.0.1:{}", common::free_port()?);
    let api_addr = format!("127.0.0.1:{}", common::free_port()?);
    config.listen_addr = api_addr.parse()?;
    config.metrics_addr = metrics_addr.parse().map_err(anyhow::Error::msg)?;
    let mut server = server_command_as(
        "all",
        env!("CARGO_BIN_EXE_rtap-server"),
        &config,
        &["--health-check-interval", "200ms"],
    )
    .stderr(Stdio::null())
    .spawn()?;
    let channel = Channel::from_shared(format!("http://{api_addr}"))?.connect_lazy();
    common::wait_for_health(
        channel.clone(),
        "",
        ServingStatus::Serving,
        Duration::from_secs(60),
    )
    .await?;

    // A call answered NOT_FOUND, one to a method nobody serves, ingest of
    // 25 events, and a subscription that hears them.
    let missing = UserServiceClient::new(channel.clone())
        .get_user(GetUserRequest { id: 987_654_321 })
        .await
        .expect_err("no such user");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut analytics =
        rtap::v1::analytics_service_client::AnalyticsServiceClient::new(channel.clone());
    let mut subscription = analytics
        .subscribe(common::counts_subscription(600, 1))
        .await?
        .into_inner();
    subscription.next().await.context("a snapshot")??;
    let brokers = config.kafka_brokers[0].clone();
    let events: Vec<_> = (1..=25).map(|user| event(user, Utc::now())).collect();
    produce(&brokers, &config.events_topic, &events).await?;
    wait_caught_up(&config, Duration::from_secs(60)).await?;

    // The figures are copied into the metrics within a second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let scraped = loop {
        let scraped = scrape(&metrics_addr).await?;
        let ready = sum(&scraped, "rtap_subscription_deltas_sent_total", &[]) >= 1.0
            && sum(&scraped, "rtap_ingest_events_applied_total", &[]) >= 25.0
            && sum(&scraped, "rtap_dependency_up", &[]) >= 3.0;
        if ready || tokio::time::Instant::now() > deadline {
            break scraped;
        }
        // Keep the subscription read, as a client does.
        let _ = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
    };
    let calls = |labels: &[&str]| sum(&scraped, "rtap_grpc_requests_total", labels);
    assert_eq!(
        calls(&[
            r#"service="rtap.v1.UserService""#,
            r#"method="GetUser""#,
            r#"code="NOT_FOUND""#
        ]),
        1.0,
        "{scraped:#?}"
    );
    assert!(calls(&[r#"method="Check""#, r#"code="OK""#]) >= 1.0);
    assert_eq!(sum(&scraped, "rtap_ingest_events_applied_total", &[]), 25.0);
    assert_eq!(sum(&scraped, "rtap_ingest_lag_records", &[]), 0.0);
    assert_eq!(
        sum(&scraped, "rtap_ingest_partition_owned", &[]),
        f64::from(PARTITIONS)
    );
    assert!(sum(&scraped, "rtap_ingest_commit_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        sum(
            &scraped,
            "rtap_ingest_dead_letters_total",
            &[r#"reason="too_old""#]
        ),
        0.0,
        "dead-letter series start at zero"
    );
    assert_eq!(sum(&scraped, "rtap_subscriptions_open", &[]), 1.0);
    assert!(sum(&scraped, "rtap_subscription_deltas_sent_total", &[]) >= 1.0);
    for dependency in ["postgresql", "redis", "kafka"] {
        assert_eq!(
            sum(
                &scraped,
                "rtap_dependency_up",
                &[&format!(r#"dependency="{dependency}""#)]
            ),
            1.0,
            "{dependency}"
        );
    }
    assert_eq!(sum(&scraped, "rtap_build_info", &[r#"role="all""#]), 1.0);

    // A path outside the contract is counted under `other`, never by name.
    let unknown = tonic::client::Grpc::new(channel.clone());
    let _ = unknown_call(unknown).await;
    drop(subscription);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = scrape(&metrics_addr).await?;
        let other = sum(
            &scraped,
            "rtap_grpc_requests_total",
            &[r#"method="other""#, r#"code="UNIMPLEMENTED""#],
        );
        let closed = sum(&scraped, "rtap_subscriptions_open", &[]) == 0.0;
        if other == 1.0 && closed {
            assert!(
                !scraped.keys().any(|series| series.contains("NoSuchMethod")),
                "a client's path never becomes a label"
            );
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "other: {other}, subscription closed: {closed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    server.start_kill()?;
    server.wait().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// Calls `/rtap.v1.UserService/NoSuchMethod`.
async fn unknown_call(mut grpc: tonic::client::Grpc<Channel>) -> Result<(), tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/rtap.v1.UserService/NoSuchMethod");
    let codec = tonic_prost::ProstCodec::<GetUserRequest, GetUserRequest>::default();
    grpc.unary(tonic::Request::new(GetUserRequest { id: 1 }), path, codec)
        .await
        .map(|_| ())
}
