//! Limits on callers: a caller over its call rate or its subscriptions is
//! refused (with when to retry) while another caller goes on, and recovers.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::{TestDatabase, TestServer, pipeline::event, test_config};
use rtap::v1::{
    GetUserRequest, SubscribeRequest, TrackRequest, TrackStreamRequest,
    analytics_service_client::AnalyticsServiceClient, ingest_service_client::IngestServiceClient,
    user_service_client::UserServiceClient,
};
use rtap_server::{Config, config::Auth};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

/// `rtap-server keys create` of a `role` key named `name`.
async fn create_key(database: &TestDatabase, name: &str, role: &str) -> anyhow::Result<String> {
    common::keys_command(database, &["create", "--name", name, "--role", role]).await
}

fn keyed<T>(key: &str, message: T) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    Ok(request)
}

/// A server requiring keys, with two reader keys and an admin key.
async fn keyed_server(
    database: &TestDatabase,
    adjust: impl FnOnce(&mut Config),
) -> anyhow::Result<(TestServer, Config, [String; 3])> {
    let mut config = test_config(database);
    config.auth = Auth::Keys;
    config.auth_refresh_interval = Duration::from_millis(100);
    adjust(&mut config);
    let server = TestServer::start_with_catalog(config.clone()).await?;
    let keys = [
        create_key(database, "a", "reader").await?,
        create_key(database, "b", "reader").await?,
        create_key(database, "ops", "admin").await?,
    ];
    // Loaded within the refresh interval.
    let mut users = UserServiceClient::new(server.channel());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let code = match users
            .get_user(keyed(&keys[2], GetUserRequest { id: 1 })?)
            .await
        {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        if code == Code::NotFound {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "keys never loaded: {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, config, keys))
}

fn code(result: &Result<impl Sized, Status>) -> Code {
    result.as_ref().map_or_else(Status::code, |_| Code::Ok)
}

#[tokio::test]
async fn a_caller_over_its_call_rate_waits_its_turn_while_another_is_served() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let (server, _config, [a, b, _]) = keyed_server(&database, |config| {
        config.max_calls_per_second = 20;
    })
    .await?;
    let mut users = UserServiceClient::new(server.channel());

    // `a` spends its burst, then is refused with the time to wait.
    let mut refusal = None;
    for _ in 0..100 {
        let result = users.get_user(keyed(&a, GetUserRequest { id: 1 })?).await;
        if code(&result) == Code::ResourceExhausted {
            refusal = result.err();
            break;
        }
        ensure!(code(&result) == Code::NotFound, "{result:?}");
    }
    let refusal = refusal.context("a caller past its rate was never refused")?;
    let wait = refusal
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
        .context("RESOURCE_EXHAUSTED carries google.rpc.RetryInfo")?;
    ensure!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );

    // `b` has a budget of its own.
    for _ in 0..10 {
        let result = users.get_user(keyed(&b, GetUserRequest { id: 1 })?).await;
        ensure!(code(&result) == Code::NotFound, "b was refused: {result:?}");
    }

    // After the wait it was told, `a` is served again.
    tokio::time::sleep(wait).await;
    let result = users.get_user(keyed(&a, GetUserRequest { id: 1 })?).await;
    ensure!(
        code(&result) == Code::NotFound,
        "a did not recover: {result:?}"
    );

    server.stop().await?;
    database.drop().await
}

fn counts() -> SubscribeRequest {
    common::counts_subscription(600, 0)
}

#[tokio::test]
async fn subscriptions_are_bounded_per_caller_and_per_server() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (server, config, [a, b, _]) = keyed_server(&database, |config| {
        config.max_subscriptions_per_caller = 2;
        config.max_subscriptions = 3;
    })
    .await?;
    let mut analytics = AnalyticsServiceClient::new(server.channel());
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(
            analytics
                .subscribe(keyed(&a, counts())?)
                .await?
                .into_inner(),
        );
    }
    let third = analytics.subscribe(keyed(&a, counts())?).await;
    ensure!(
        code(&third) == Code::ResourceExhausted,
        "a's third: {:?}",
        third.err()
    );
    open.push(
        analytics
            .subscribe(keyed(&b, counts())?)
            .await?
            .into_inner(),
    );
    let fourth = analytics.subscribe(keyed(&b, counts())?).await;
    ensure!(
        code(&fourth) == Code::ResourceExhausted,
        "the server's fourth: {:?}",
        fourth.err()
    );

    // Closing one gives its place back.
    drop(open.remove(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match analytics.subscribe(keyed(&a, counts())?).await {
            Ok(stream) => {
                open.push(stream.into_inner());
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the slot never came back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }

    drop(open);
    server.stop().await?;
    common::delete_namespace(&config, 4).await?;
    database.drop().await
}

#[tokio::test]
async fn tracked_events_are_limited_per_caller() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (server, _config, [_, _, admin]) = keyed_server(&database, |config| {
        config.max_events_per_second = 5;
        config.role = rtap_server::config::Role::Api;
    })
    .await?;
    let mut ingest = IngestServiceClient::new(server.channel());
    let track = || TrackRequest {
        event: Some(event(1, chrono::Utc::now())),
    };
    let mut refused = None;
    for _ in 0..20 {
        if let Err(status) = ingest.track(keyed(&admin, track())?).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.context("Track past the events rate was never refused")?;
    ensure!(refused.code() == Code::ResourceExhausted, "{refused:?}");
    ensure!(
        refused.get_error_details().retry_info().is_some(),
        "{refused:?}"
    );

    // A stream is held back to the rate instead: 10 events at 5 a second
    // (the burst spent above) take more than a second, and all are stored.
    let events: Vec<_> = (1..=10)
        .map(|user| TrackStreamRequest {
            event: Some(event(user, chrono::Utc::now())),
        })
        .collect();
    let started = tokio::time::Instant::now();
    let reply = ingest
        .track_stream(keyed(&admin, tokio_stream::iter(events))?)
        .await?
        .into_inner();
    ensure!(reply.accepted_count == 10, "{reply:?}");
    ensure!(
        started.elapsed() >= Duration::from_millis(1500),
        "a stream past the rate was not held back: {:?}",
        started.elapsed()
    );

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn a_request_message_over_the_size_limit_is_resource_exhausted() -> anyhow::Result<()> {
    use rtap::v1::{CreateUserRequest, User};
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database);
    config.max_message_bytes = 1024;
    config.role = rtap_server::config::Role::Api;
    let server = TestServer::start_with_catalog(config).await?;
    let huge = "x".repeat(4096);
    let created = UserServiceClient::new(server.channel())
        .create_user(CreateUserRequest {
            user: Some(User {
                first_name: huge.clone(),
                last_name: "Big".into(),
                ..Default::default()
            }),
        })
        .await;
    ensure!(code(&created) == Code::ResourceExhausted, "{created:?}");
    let mut big = event(1, chrono::Utc::now());
    big.session_id = huge;
    let streamed = IngestServiceClient::new(server.channel())
        .track_stream(tokio_stream::iter(vec![TrackStreamRequest {
            event: Some(big),
        }]))
        .await;
    ensure!(code(&streamed) == Code::ResourceExhausted, "{streamed:?}");
    // A message within the limit still goes through.
    let small = UserServiceClient::new(server.channel())
        .create_user(CreateUserRequest {
            user: Some(User {
                first_name: "Small".into(),
                last_name: "Enough".into(),
                ..Default::default()
            }),
        })
        .await;
    ensure!(code(&small) == Code::Ok, "{small:?}");
    server.stop().await?;
    database.drop().await
}
