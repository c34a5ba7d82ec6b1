//! Subscriptions resumed after a disconnect: a stream cut mid-flight
//! continues with exactly the messages it missed; a resume that cannot do
//! that says why; tokens of another query or garbage are refused; a
//! thousand clients resume at once after a network blip.

mod common;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, ensure};
use chrono::Utc;
use common::{
    TcpProxy, TestDatabase, TestServer,
    counts::{Held, apply, held_of, next},
    pipeline::{EventWriter, PARTITIONS, event, ingest_config, wait_caught_up},
};
use rtap::v1::{
    GetEventCountsRequest, Granularity, ResyncReason, SubscribeRequest, SubscribeResponse,
    TimeWindow, analytics_service_client::AnalyticsServiceClient, subscribe_request,
    subscribe_response, time_window::Window,
};
use rtap_server::{Config, config::Role};
use tonic::{Streaming, transport::Channel};

fn api_config(database: &TestDatabase) -> Config {
    let mut config = ingest_config(database);
    config.role = Role::All;
    config.replica_id = Some("replica-a".into());
    config
}

fn query(product_id: i64) -> GetEventCountsRequest {
    GetEventCountsRequest {
        window: Some(TimeWindow {
            window: Some(Window::Trailing(prost_types::Duration {
                seconds: 30 * 60,
                nanos: 0,
            })),
        }),
        granularity: Granularity::Minute as i32,
        product_id,
        ..Default::default()
    }
}

fn request(query: GetEventCountsRequest, resume_token: Vec<u8>) -> SubscribeRequest {
    SubscribeRequest {
        query: Some(subscribe_request::Query::EventCounts(query)),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        resume_token,
    }
}

fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?.connect_lazy())
}

/// What one client holds, and where its stream stands.
#[derive(Default)]
struct Client {
    held: Held,
    sequence: u64,
    token: Vec<u8>,
    resyncs: Vec<ResyncReason>,
}

impl Client {
    /// Applies `message`, checking its sequence number follows.
    fn take(&mut self, message: &SubscribeResponse) -> anyhow::Result<()> {
        ensure!(
            message.sequence == self.sequence + 1,
            "sequence {} after {}",
            message.sequence,
            self.sequence
        );
        self.sequence = message.sequence;
        self.token.clone_from(&message.resume_token);
        if let Some(subscribe_response::Update::Snapshot(snapshot)) = &message.update
            && snapshot.resync
        {
            self.resyncs.push(snapshot.resync_reason());
        }
        apply(&mut self.held, message)?;
        Ok(())
    }

    /// Reads `stream` until what the client holds equals the unary query.
    async fn read_until_exact(
        &mut self,
        stream: &mut Streaming<SubscribeResponse>,
        analytics: &mut AnalyticsServiceClient<Channel>,
        query: &GetEventCountsRequest,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let expected = held_of(
                &analytics
                    .get_event_counts(query.clone())
                    .await?
                    .into_inner(),
            );
            if non_empty(&self.held) == non_empty(&expected) {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "held {:?} != unary {:?}",
                non_empty(&self.held),
                non_empty(&expected)
            );
            let message = next(stream).await?;
            self.take(&message)?;
        }
    }
}

fn non_empty(held: &Held) -> Held {
    let mut held = held.clone();
    held.retain(|_, counts| !counts.is_empty());
    held
}

/// Sends `count` views of `product`, one commit's worth at a time.
async fn views(writer: &EventWriter, product: i64, count: i64) -> anyhow::Result<()> {
    for user in 1..=count {
        let mut view = event(user, Utc::now());
        view.product_id = product;
        writer.send(&[view]).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_stream_cut_mid_flight_resumes_with_exactly_the_messages_it_missed() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let config = api_config(&database);
    let server = TestServer::start(config.clone()).await?;
    let proxy = TcpProxy::start(server.addr).await?;
    let writer = EventWriter::connect(&config.kafka_brokers[0], &config.events_topic).await?;
    let mut analytics = AnalyticsServiceClient::new(server.channel());
    let query = query(41);

    let mut client = Client::default();
    let mut stream = AnalyticsServiceClient::new(channel(proxy.addr)?)
        .subscribe(request(query.clone(), Vec::new()))
        .await?
        .into_inner();
    client.take(&next(&mut stream).await?)?;
    views(&writer, 41, 30).await?;
    // Some deltas through, then the network drops the connection while
    // commits go on.
    let mut deltas = 0;
    while deltas < 3 {
        let message = next(&mut stream).await?;
        deltas += usize::from(matches!(
            message.update,
            Some(subscribe_response::Update::Delta(_))
        ));
        client.take(&message)?;
    }
    proxy.cut();
    views(&writer, 41, 40).await?;
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    let cut_at = client.sequence;
    drop(stream);
    proxy.restore();

    let mut resumed = AnalyticsServiceClient::new(channel(proxy.addr)?)
        .subscribe(request(query.clone(), client.token.clone()))
        .await?
        .into_inner();
    client
        .read_until_exact(&mut resumed, &mut analytics, &query)
        .await?;
    assert!(
        client.sequence > cut_at,
        "the resumed stream went on from {cut_at}"
    );
    assert_eq!(client.resyncs, [], "every missed message was replayed");
    let total: i64 = client.held.values().flat_map(|c| c.values()).sum();
    assert_eq!(total, 70);

    drop(resumed);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

/// The first message of a stream resumed with `token`, or its refusal.
async fn resume_with(
    addr: std::net::SocketAddr,
    query: &GetEventCountsRequest,
    token: Vec<u8>,
) -> Result<SubscribeResponse, tonic::Status> {
    let mut stream = AnalyticsServiceClient::new(
        channel(addr).map_err(|e| tonic::Status::internal(e.to_string()))?,
    )
    .subscribe(request(query.clone(), token))
    .await?
    .into_inner();
    next(&mut stream)
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))
}

fn resync_reason(message: &SubscribeResponse) -> Option<ResyncReason> {
    match &message.update {
        Some(subscribe_response::Update::Snapshot(snapshot)) if snapshot.resync => {
            Some(snapshot.resync_reason())
        }
        _ => None,
    }
}

#[tokio::test]
async fn a_resume_that_cannot_replay_says_why_and_bad_tokens_are_refused() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = api_config(&database);
    config.subscription_history = 1;
    let server = TestServer::start(config.clone()).await?;
    let writer = EventWriter::connect(&config.kafka_brokers[0], &config.events_topic).await?;
    let query = query(42);
    let mut stream = AnalyticsServiceClient::new(server.channel())
        .subscribe(request(query.clone(), Vec::new()))
        .await?
        .into_inner();
    let first = next(&mut stream).await?;
    drop(stream);
    // Another subscriber of the query shows when the feed has published.
    let mut watcher = AnalyticsServiceClient::new(server.channel())
        .subscribe(request(query.clone(), Vec::new()))
        .await?
        .into_inner();
    next(&mut watcher).await?;

    // Another query, and garbage: refused, naming the field.
    for (token, query) in [
        (first.resume_token.clone(), self::query(43)),
        (b"not a token".to_vec(), query.clone()),
    ] {
        let status = resume_with(server.addr, &query, token)
            .await
            .expect_err("refused");
        assert_eq!(common::bad_request_fields(&status), ["resume_token"]);
    }

    // Three commits later, each a delta of the feed (still running for
    // resumers), it no longer keeps them all.
    for _ in 0..3 {
        views(&writer, 42, 2).await?;
        while !matches!(
            next(&mut watcher).await?.update,
            Some(subscribe_response::Update::Delta(_))
        ) {}
    }
    drop(watcher);
    let expired = resume_with(server.addr, &query, first.resume_token.clone()).await?;
    assert_eq!(resync_reason(&expired), Some(ResyncReason::HistoryExpired));
    assert_eq!(expired.sequence, first.sequence + 1);
    server.stop().await?;

    // The same replica after a restart, and another replica.
    let restarted = TestServer::start(config.clone()).await?;
    let after_restart = resume_with(restarted.addr, &query, first.resume_token.clone()).await?;
    assert_eq!(
        resync_reason(&after_restart),
        Some(ResyncReason::ServerRestarted)
    );
    restarted.stop().await?;
    let mut other = config.clone();
    other.replica_id = Some("replica-b".into());
    let other = TestServer::start(other).await?;
    let elsewhere = resume_with(other.addr, &query, first.resume_token.clone()).await?;
    assert_eq!(resync_reason(&elsewhere), Some(ResyncReason::OtherReplica));
    other.stop().await?;

    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn a_thousand_clients_resume_at_once_after_a_network_blip() -> anyhow::Result<()> {
    const CLIENTS: usize = 1_000;
    const CONNECTIONS: usize = 10;
    let database = TestDatabase::create().await?;
    let config = api_config(&database);
    let server = TestServer::start(config.clone()).await?;
    let proxy = TcpProxy::start(server.addr).await?;
    let writer = EventWriter::connect(&config.kafka_brokers[0], &config.events_topic).await?;
    // Ten products, a hundred clients each, over ten connections.
    let product = |client: usize| 100 + i64::try_from(client % 10).unwrap_or(0);
    let connect = || -> anyhow::Result<Vec<Channel>> {
        (0..CONNECTIONS).map(|_| channel(proxy.addr)).collect()
    };
    let channels = connect()?;
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::default()).collect();
    let mut streams = Vec::with_capacity(CLIENTS);
    for (index, client) in clients.iter_mut().enumerate() {
        let mut stream = AnalyticsServiceClient::new(channels[index % CONNECTIONS].clone())
            .subscribe(request(query(product(index)), Vec::new()))
            .await?
            .into_inner();
        client.take(&next(&mut stream).await?)?;
        streams.push(stream);
    }
    for product in 100..110 {
        views(&writer, product, 2).await?;
    }
    for (client, stream) in clients.iter_mut().zip(&mut streams) {
        let message = next(stream).await?;
        client.take(&message)?;
    }

    // The blip: every connection drops, commits go on, then everyone
    // resumes at once.
    proxy.cut();
    drop(streams);
    for product in 100..110 {
        views(&writer, product, 3).await?;
    }
    wait_caught_up(&config, Duration::from_secs(30)).await?;
    proxy.restore();
    let channels = connect()?;
    let resumed = clients.iter().enumerate().map(|(index, client)| {
        let mut analytics = AnalyticsServiceClient::new(channels[index % CONNECTIONS].clone());
        let request = request(query(product(index)), client.token.clone());
        async move { Ok::<_, tonic::Status>(analytics.subscribe(request).await?.into_inner()) }
    });
    let mut streams = futures_util::future::try_join_all(resumed).await?;

    let mut analytics = AnalyticsServiceClient::new(server.channel());
    let mut expected = BTreeMap::new();
    for product in 100..110 {
        let unary = held_of(
            &analytics
                .get_event_counts(query(product))
                .await?
                .into_inner(),
        );
        expected.insert(product, non_empty(&unary));
    }
    for (index, (client, stream)) in clients.iter_mut().zip(&mut streams).enumerate() {
        let want = &expected[&product(index)];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while non_empty(&client.held) != *want {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "client {index} holds {:?}, not {want:?}",
                client.held
            );
            let message = next(stream)
                .await
                .with_context(|| format!("client {index}"))?;
            client.take(&message)?;
        }
        assert_eq!(
            client.resyncs,
            [],
            "client {index} resumed without a resync"
        );
    }
    // The documented bound: at most --subscription-history-bytes per feed.
    let activity = analytics
        .get_pipeline_status(rtap::v1::GetPipelineStatusRequest {})
        .await?
        .into_inner()
        .feed_activity
        .context("feed activity")?;
    let bound = 10 * i64::from(config.subscription_history_bytes);
    assert!(
        (1..=bound).contains(&activity.history_bytes),
        "history of {} bytes, bound {bound}",
        activity.history_bytes
    );

    drop(streams);
    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}
