//! Authentication and roles, end to end: keys made with `rtap-server keys`,
//! and every RPC called with every kind of credential.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::{
    TestDatabase, TestServer,
    pipeline::{PARTITIONS, event, high_watermarks, ingest_config},
};
use prost::Message;
use rtap::v1::{
    CreateProductRequest, CreateUserRequest, DeleteProductRequest, DeleteUserRequest,
    GetEngagementRequest, GetEventCountsRequest, GetFunnelRequest, GetPipelineStatusRequest,
    GetProductRequest, GetTopProductsRequest, GetUniqueUsersRequest, GetUserRequest,
    ListProductsRequest, ListUsersRequest, Product, SubscribeRequest, TrackRequest,
    TrackStreamRequest, UpdateProductRequest, UpdateUserRequest, User,
};
use rtap_server::config::Auth;
use tonic::{Code, Status, transport::Channel};

async fn keys(database: &TestDatabase, args: &[&str]) -> anyhow::Result<String> {
    common::keys_command(database, args).await
}

/// What a caller presents as `authorization`.
#[derive(Debug, Clone)]
struct Caller {
    label: &'static str,
    authorization: Option<String>,
}

impl Caller {
    fn bearer(label: &'static str, key: &str) -> Self {
        Self {
            label,
            authorization: Some(format!("Bearer {key}")),
        }
    }

    fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse()?);
        }
        Ok(request)
    }
}

/// Calls the unary method `path` with `message`, the response ignored.
async fn unary<M: Message + Send + Sync + 'static>(
    channel: &Channel,
    caller: &Caller,
    path: &'static str,
    message: M,
) -> anyhow::Result<Result<(), Status>> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<M, ()>::default();
    Ok(grpc
        .unary(
            caller.request(message)?,
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .map(drop))
}

/// Every RPC, called by `caller` with a request that succeeds (or fails
/// on its own merits) once admitted: `(path, result)`.
async fn call_everything(
    channel: &Channel,
    caller: &Caller,
    existing: (i64, i64),
) -> anyhow::Result<Vec<(&'static str, Result<(), Status>)>> {
    let (user_id, product_id) = existing;
    let user = User {
        first_name: "Made".into(),
        last_name: format!("By {}", caller.label),
        ..Default::default()
    };
    let product = Product {
        name: format!("Made by {}", caller.label),
        category: "tests".into(),
        price: 1.0,
        ..Default::default()
    };
    let renamed = |field: &str| prost_types::FieldMask {
        paths: vec![field.into()],
    };
    let mut results = vec![
        (
            "/rtap.v1.UserService/GetUser",
            unary(
                channel,
                caller,
                "/rtap.v1.UserService/GetUser",
                GetUserRequest { id: user_id },
            )
            .await?,
        ),
        (
            "/rtap.v1.UserService/ListUsers",
            unary(
                channel,
                caller,
                "/rtap.v1.UserService/ListUsers",
                ListUsersRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.UserService/CreateUser",
            unary(
                channel,
                caller,
                "/rtap.v1.UserService/CreateUser",
                CreateUserRequest { user: Some(user) },
            )
            .await?,
        ),
        (
            "/rtap.v1.UserService/UpdateUser",
            unary(
                channel,
                caller,
                "/rtap.v1.UserService/UpdateUser",
                UpdateUserRequest {
                    user: Some(User {
                        id: user_id,
                        first_name: format!("Renamed by {}", caller.label),
                        ..Default::default()
                    }),
                    update_mask: Some(renamed("first_name")),
                },
            )
            .await?,
        ),
        (
            "/rtap.v1.ProductService/GetProduct",
            unary(
                channel,
                caller,
                "/rtap.v1.ProductService/GetProduct",
                GetProductRequest { id: product_id },
            )
            .await?,
        ),
        (
            "/rtap.v1.ProductService/ListProducts",
            unary(
                channel,
                caller,
                "/rtap.v1.ProductService/ListProducts",
                ListProductsRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.ProductService/CreateProduct",
            unary(
                channel,
                caller,
                "/rtap.v1.ProductService/CreateProduct",
                CreateProductRequest {
                    product: Some(product),
                },
            )
            .await?,
        ),
        (
            "/rtap.v1.ProductService/UpdateProduct",
            unary(
                channel,
                caller,
                "/rtap.v1.ProductService/UpdateProduct",
                UpdateProductRequest {
                    product: Some(Product {
                        id: product_id,
                        price: 99.0,
                        ..Default::default()
                    }),
                    update_mask: Some(renamed("price")),
                },
            )
            .await?,
        ),
        (
            "/rtap.v1.AnalyticsService/GetEventCounts",
            unary(
                channel,
                caller,
                "/rtap.v1.AnalyticsService/GetEventCounts",
                GetEventCountsRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.AnalyticsService/GetUniqueUsers",
            unary(
                channel,
                caller,
                "/rtap.v1.AnalyticsService/GetUniqueUsers",
                GetUniqueUsersRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.AnalyticsService/GetEngagement",
            unary(
                channel,
                caller,
                "/rtap.v1.AnalyticsService/GetEngagement",
                GetEngagementRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.AnalyticsService/GetTopProducts",
            unary(
                channel,
                caller,
                "/rtap.v1.AnalyticsService/GetTopProducts",
                GetTopProductsRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.AnalyticsService/GetFunnel",
            unary(
                channel,
                caller,
                "/rtap.v1.AnalyticsService/GetFunnel",
                GetFunnelRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.AnalyticsService/GetPipelineStatus",
            unary(
                channel,
                caller,
                "/rtap.v1.AnalyticsService/GetPipelineStatus",
                GetPipelineStatusRequest::default(),
            )
            .await?,
        ),
        (
            "/rtap.v1.IngestService/Track",
            unary(
                channel,
                caller,
                "/rtap.v1.IngestService/Track",
                TrackRequest {
                    event: Some(event(1, chrono::Utc::now())),
                },
            )
            .await?,
        ),
    ];
    results.push((
        "/rtap.v1.AnalyticsService/Subscribe",
        subscribe(channel, caller).await?,
    ));
    results.push((
        "/rtap.v1.IngestService/TrackStream",
        track_stream(channel, caller).await?,
    ));
    // Deletions last, so the calls above find the rows.
    results.push((
        "/rtap.v1.UserService/DeleteUser",
        unary(
            channel,
            caller,
            "/rtap.v1.UserService/DeleteUser",
            DeleteUserRequest { id: user_id },
        )
        .await?,
    ));
    results.push((
        "/rtap.v1.ProductService/DeleteProduct",
        unary(
            channel,
            caller,
            "/rtap.v1.ProductService/DeleteProduct",
            DeleteProductRequest { id: product_id },
        )
        .await?,
    ));
    Ok(results)
}

/// Opens a subscription and reads its first message (the snapshot).
async fn subscribe(channel: &Channel, caller: &Caller) -> anyhow::Result<Result<(), Status>> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let request = common::counts_subscription(3600, 0);
    let codec = tonic_prost::ProstCodec::<SubscribeRequest, ()>::default();
    let path = http::uri::PathAndQuery::from_static("/rtap.v1.AnalyticsService/Subscribe");
    let result = match grpc
        .server_streaming(caller.request(request)?, path, codec)
        .await
    {
        Ok(response) => response.into_inner().message().await.map(drop),
        Err(status) => Err(status),
    };
    Ok(result)
}

/// Sends one event through TrackStream.
async fn track_stream(channel: &Channel, caller: &Caller) -> anyhow::Result<Result<(), Status>> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let events = tokio_stream::iter(vec![TrackStreamRequest {
        event: Some(event(2, chrono::Utc::now())),
    }]);
    let codec = tonic_prost::ProstCodec::<TrackStreamRequest, ()>::default();
    let path = http::uri::PathAndQuery::from_static("/rtap.v1.IngestService/TrackStream");
    Ok(grpc
        .client_streaming(caller.request(events)?, path, codec)
        .await
        .map(drop))
}

/// The role each path needs, as the README documents it.
fn needs(path: &str) -> &'static str {
    match path.rsplit('/').next().unwrap_or_default() {
        "Track" | "TrackStream" => "writer",
        "CreateUser" | "UpdateUser" | "DeleteUser" | "CreateProduct" | "UpdateProduct"
        | "DeleteProduct" | "GetPipelineStatus" => "admin",
        _ => "reader",
    }
}

/// Polls `caller`'s `GetUser` until its code satisfies `done`.
async fn wait_for(
    channel: &Channel,
    caller: &Caller,
    within: Duration,
    done: impl Fn(Code) -> bool,
) -> anyhow::Result<Duration> {
    let start = tokio::time::Instant::now();
    loop {
        let code = match unary(
            channel,
            caller,
            "/rtap.v1.UserService/GetUser",
            GetUserRequest { id: 1 },
        )
        .await?
        {
            Ok(()) => Code::Ok,
            Err(status) => status.code(),
        };
        if done(code) {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < within,
            "{}: still {code:?} after {within:?}",
            caller.label
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_rpc_admits_exactly_the_roles_that_may_call_it() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = ingest_config(&database);
    config.role = rtap_server::config::Role::Api;
    config.auth = Auth::Keys;
    config.auth_refresh_interval = Duration::from_millis(200);
    let brokers = config.kafka_brokers[0].clone();
    let server = TestServer::start_with_catalog(config.clone()).await?;
    let channel = server.channel();

    let admin = Caller::bearer(
        "admin",
        &keys(&database, &["create", "--name", "ops", "--role", "admin"]).await?,
    );
    let reader = Caller::bearer(
        "reader",
        &keys(
            &database,
            &["create", "--name", "dashboard", "--role", "reader"],
        )
        .await?,
    );
    let writer = Caller::bearer(
        "writer",
        &keys(
            &database,
            &["create", "--name", "web app", "--role", "writer"],
        )
        .await?,
    );
    let revoked_key = keys(&database, &["create", "--name", "old", "--role", "admin"]).await?;
    let revoked = Caller::bearer("revoked", &revoked_key);
    // Loaded within the refresh interval.
    wait_for(&channel, &reader, Duration::from_secs(10), |code| {
        code != Code::Unauthenticated && code != Code::Unavailable
    })
    .await?;
    wait_for(&channel, &revoked, Duration::from_secs(10), |code| {
        code == Code::NotFound
    })
    .await?;
    keys(&database, &["revoke", "old"]).await?;
    let took = wait_for(&channel, &revoked, Duration::from_secs(10), |code| {
        code == Code::Unauthenticated
    })
    .await?;
    ensure!(took < Duration::from_secs(3), "a revocation took {took:?}");

    // A user and a product for the calls to work on.
    let mut catalog = rtap::v1::user_service_client::UserServiceClient::new(channel.clone());
    let user_id = catalog
        .create_user(admin.request(CreateUserRequest {
            user: Some(User {
                first_name: "Kept".into(),
                last_name: "Intact".into(),
                ..Default::default()
            }),
        })?)
        .await?
        .into_inner()
        .user
        .context("created user")?
        .id;
    let mut products = rtap::v1::product_service_client::ProductServiceClient::new(channel.clone());
    let product_id = products
        .create_product(admin.request(CreateProductRequest {
            product: Some(Product {
                name: "Kept intact".into(),
                category: "tests".into(),
                price: 5.0,
                ..Default::default()
            }),
        })?)
        .await?
        .into_inner()
        .product
        .context("created product")?
        .id;

    let unknown_key = format!("rtap_0123456789abcdef_{}", "A".repeat(43));
    let callers = [
        Caller {
            label: "nobody",
            authorization: None,
        },
        Caller {
            label: "basic",
            authorization: Some("Basic dXNlcjpwYXNz".into()),
        },
        Caller {
            label: "malformed",
            authorization: Some("Bearer not-a-key".into()),
        },
        Caller::bearer("unknown", &unknown_key),
        revoked.clone(),
        Caller::bearer(
            "wrong secret",
            &format!("{}B", &revoked_key[..revoked_key.len() - 1]),
        ),
        reader.clone(),
        writer.clone(),
    ];
    for caller in &callers {
        for (path, result) in call_everything(&channel, caller, (user_id, product_id)).await? {
            let code = result.as_ref().err().map_or(Code::Ok, Status::code);
            let expected = match caller.label {
                "reader" | "writer" if needs(path) == caller.label => None,
                "reader" | "writer" => Some(Code::PermissionDenied),
                _ => Some(Code::Unauthenticated),
            };
            match expected {
                Some(expected) => ensure!(
                    code == expected,
                    "{} → {path}: {result:?}, not {expected:?}",
                    caller.label
                ),
                None => ensure!(
                    !matches!(
                        code,
                        Code::Unauthenticated | Code::PermissionDenied | Code::Unavailable
                    ),
                    "{} → {path}: {result:?}",
                    caller.label
                ),
            }
        }
    }

    // No refused call changed anything: the user and product are as made,
    // and only the writer's two events reached Kafka.
    let kept = catalog
        .get_user(reader.request(GetUserRequest { id: user_id })?)
        .await?
        .into_inner()
        .user
        .context("user")?;
    ensure!(kept.first_name == "Kept", "{kept:?}");
    let users = catalog
        .list_users(reader.request(ListUsersRequest::default())?)
        .await?
        .into_inner()
        .users;
    ensure!(users.len() == 1, "{users:?}");
    let listed = products
        .list_products(reader.request(ListProductsRequest::default())?)
        .await?
        .into_inner()
        .products;
    ensure!(listed.len() == 1 && listed[0].price == 5.0, "{listed:?}");
    let produced: i64 = high_watermarks(&brokers, &config.events_topic)
        .await?
        .values()
        .sum();
    ensure!(produced == 2, "{produced} events reached Kafka");

    // The admin may call everything.
    for (path, result) in call_everything(&channel, &admin, (user_id, product_id)).await? {
        ensure!(
            !matches!(
                result.as_ref().map_err(Status::code),
                Err(Code::Unauthenticated | Code::PermissionDenied | Code::Unavailable)
            ),
            "admin → {path}: {result:?}"
        );
    }
    let users = catalog
        .list_users(reader.request(ListUsersRequest::default())?)
        .await?
        .into_inner()
        .users;
    ensure!(
        users
            .iter()
            .map(|u| u.last_name.as_str())
            .collect::<Vec<_>>()
            == ["By admin"],
        "{users:?}"
    );

    // Health and reflection stay open.
    ensure!(
        common::health_status(channel.clone(), "").await.is_ok(),
        "health needs no key"
    );
    let listed = keys(&database, &["list"]).await?;
    ensure!(listed.lines().count() == 5, "{listed}");
    ensure!(
        !listed.contains(&revoked_key[..20]),
        "keys list never shows a key"
    );

    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}

#[tokio::test]
async fn a_revoked_key_ends_its_open_subscription_and_is_refused_within_the_bound()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = common::test_config(&database);
    config.role = rtap_server::config::Role::Api;
    config.auth = Auth::Keys;
    config.auth_refresh_interval = Duration::from_millis(200);
    let server = TestServer::start_with_catalog(config.clone()).await?;
    let channel = server.channel();
    let key = keys(
        &database,
        &["create", "--name", "wall screen", "--role", "reader"],
    )
    .await?;
    let reader = Caller::bearer("reader", &key);
    wait_for(&channel, &reader, Duration::from_secs(10), |code| {
        code == Code::NotFound
    })
    .await?;

    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let request = common::counts_subscription(600, 1);
    let codec = tonic_prost::ProstCodec::<SubscribeRequest, ()>::default();
    let path = http::uri::PathAndQuery::from_static("/rtap.v1.AnalyticsService/Subscribe");
    let mut stream = grpc
        .server_streaming(reader.request(request)?, path, codec)
        .await?
        .into_inner();
    stream.message().await?.context("snapshot")?;

    keys(&database, &["revoke", "wall screen"]).await?;
    let revoked_at = tokio::time::Instant::now();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Err(_) => anyhow::bail!("the stream of a revoked key went on"),
            Ok(Ok(Some(()))) => continue, // heartbeats until the reload
            Ok(other) => break other,
        }
    };
    let code = ended.as_ref().err().map(Status::code);
    ensure!(code == Some(Code::Unauthenticated), "{ended:?}");
    ensure!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "ended {:?} after the revocation",
        revoked_at.elapsed()
    );
    wait_for(&channel, &reader, Duration::from_secs(1), |code| {
        code == Code::Unauthenticated
    })
    .await?;

    server.stop().await?;
    common::delete_namespace(&config, PARTITIONS).await?;
    database.drop().await
}
