//! The server skeleton against real services: reflection, health, stubs that
//! say UNIMPLEMENTED, migrations, and a clean exit on SIGTERM.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    TcpProxy, TestDatabase, TestServer, health_status, http1, test_config, wait_for_health,
};
use rtap::v1::{GetUserRequest, user_service_client::UserServiceClient};
use sea_orm::{ConnectionTrait, Database, Statement};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICES: &[&str] = &[
    "rtap.v1.UserService",
    "rtap.v1.ProductService",
    "rtap.v1.AnalyticsService",
    "rtap.v1.IngestService",
    "grpc.health.v1.Health",
];

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn reflection_v1_lists_every_service() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let database = TestDatabase::create().await?;
    let server = TestServer::start(test_config(&database)).await?;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(server.channel())
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let reply = replies.next().await.expect("one reply")?;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply: {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing from {names:?}"
        );
    }

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn reflection_v1alpha_describes_the_event_message_for_old_grpcurl() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let database = TestDatabase::create().await?;
    let server = TestServer::start(test_config(&database)).await?;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "rtap.v1.InteractionEvent".into(),
        )),
    };
    let mut replies = ServerReflectionClient::new(server.channel())
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let reply = replies.next().await.expect("one reply")?;
    let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
        panic!("unexpected reflection reply: {reply:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn health_is_serving_when_every_dependency_is_up() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let server = TestServer::start(test_config(&database)).await?;

    wait_for_health(server.channel(), "", ServingStatus::Serving, SETTLE).await?;
    for service in &SERVICES[..4] {
        assert_eq!(
            health_status(server.channel(), service).await?,
            ServingStatus::Serving,
            "{service}"
        );
    }

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn health_ignores_a_blip_and_reports_an_outage_on_evidence() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database);
    let redis: std::net::SocketAddr = "127.0.0.1:6379".parse()?;
    let proxy = TcpProxy::start(redis).await?;
    config.redis_url = format!("redis://{}/", proxy.addr);
    // Checks far enough apart that a 300 ms blip meets at most two, even
    // on a loaded machine.
    config.health_check_interval = Duration::from_millis(500);
    let server = TestServer::start(config).await?;
    const ANALYTICS: &str = "rtap.v1.AnalyticsService";
    wait_for_health(server.channel(), ANALYTICS, ServingStatus::Serving, SETTLE).await?;

    // A blip shorter than two check intervals: one or two failures, no
    // outage.
    proxy.cut();
    let blip = tokio::time::Instant::now();
    while blip.elapsed() < Duration::from_millis(300) {
        assert_eq!(
            health_status(server.channel(), ANALYTICS).await?,
            ServingStatus::Serving,
            "reported down {:?} into a blip",
            blip.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        health_status(server.channel(), ANALYTICS).await?,
        ServingStatus::Serving
    );

    // An outage is reported, and so is the recovery.
    proxy.cut();
    wait_for_health(
        server.channel(),
        ANALYTICS,
        ServingStatus::NotServing,
        SETTLE,
    )
    .await?;
    proxy.restore();
    wait_for_health(server.channel(), ANALYTICS, ServingStatus::Serving, SETTLE).await?;
    server.stop().await?;
    database.drop().await
}

/// Clients reconnecting at once (after a server restart, say) must all be
/// served: a short accept queue overflows, and the kernel resets the rest.
#[tokio::test]
async fn a_burst_of_new_connections_is_served_without_resets() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let server = TestServer::start(test_config(&database)).await?;
    wait_for_health(server.channel(), "", ServingStatus::Serving, SETTLE).await?;

    let calls: Vec<_> = (0..500)
        .map(|_| tokio::spawn(health_status(server.channel(), "")))
        .collect();
    let mut failures = Vec::new();
    for call in calls {
        if let Err(error) = call.await? {
            failures.push(error.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 500 failed: {:?}",
        failures.len(),
        failures.first()
    );

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn health_is_not_serving_when_the_broker_address_is_wrong() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database);
    config.kafka_brokers = vec![closed_port_address()];
    let server = TestServer::start(config).await?;

    // The catalog depends on PostgreSQL alone: once it is SERVING, the first
    // round of checks has run, so the overall status is a real verdict.
    wait_for_health(
        server.channel(),
        "rtap.v1.UserService",
        ServingStatus::Serving,
        SETTLE,
    )
    .await?;
    assert_eq!(
        health_status(server.channel(), "").await?,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_status(server.channel(), "rtap.v1.IngestService").await?,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_status(server.channel(), "rtap.v1.AnalyticsService").await?,
        ServingStatus::Serving
    );

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn catalog_is_unavailable_while_postgres_is_unreachable() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database);
    config.database_url = format!("postgres://postgres@{}/rtap", closed_port_address());
    config.dependency_timeout = Duration::from_millis(500);
    let server = TestServer::start(config).await?;

    wait_for_health(
        server.channel(),
        "rtap.v1.AnalyticsService",
        ServingStatus::Serving,
        SETTLE,
    )
    .await?;
    assert_eq!(
        health_status(server.channel(), "rtap.v1.UserService").await?,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_status(server.channel(), "").await?,
        ServingStatus::NotServing
    );
    let error = UserServiceClient::new(server.channel())
        .get_user(GetUserRequest { id: 1 })
        .await
        .expect_err("no database");
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn migrate_subcommand_creates_the_schema_and_can_run_twice() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    for _ in 0..2 {
        let status = Command::new(env!("CARGO_BIN_EXE_rtap-server"))
            .arg("migrate")
            .env("DATABASE_URL", &database.url)
            .stderr(Stdio::null())
            .status()?;
        assert!(status.success(), "migrate exited with {status}");
    }
    let connection = Database::connect(&database.url).await?;
    let tables = connection
        .query_all_raw(Statement::from_string(
            connection.get_database_backend(),
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name IN ('users', 'products')",
        ))
        .await?;
    assert_eq!(tables.len(), 2);
    connection.close().await?;
    database.drop().await
}

#[tokio::test]
async fn sigterm_stops_the_server_with_exit_code_zero() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let addr = free_local_address();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rtap-server"))
        .env("RTAP_LISTEN_ADDR", &addr)
        .env("RTAP_METRICS_ADDR", "off")
        .env("DATABASE_URL", &database.url)
        .env(
            "RTAP_REDIS_NAMESPACE",
            format!("rtap-test-{}", common::unique_suffix()),
        )
        .env("RTAP_HEALTH_CHECK_INTERVAL", "200ms")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
    wait_for_health(channel, "", ServingStatus::Serving, SETTLE).await?;

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().expect("running"))?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert_eq!(status.code(), Some(0), "exit status {status}");

    database.drop().await
}

/// A loopback address on which nothing listens.
fn closed_port_address() -> String {
    free_local_address()
}

/// A loopback address that was free a moment ago.
fn free_local_address() -> String {
    let port = common::free_port().expect("bind an ephemeral port");
    format!("127.0.0.1:{port}")
}

#[tokio::test]
async fn migrations_go_down_and_up_again() -> anyhow::Result<()> {
    use migration::{Migrator, MigratorTrait};
    let database = TestDatabase::create().await?;
    let connection = Database::connect(&database.url).await?;
    let catalog_tables = async |connection: &sea_orm::DatabaseConnection| {
        connection
            .query_all_raw(Statement::from_string(
                connection.get_database_backend(),
                "SELECT table_name FROM information_schema.tables \
                 WHERE table_schema = 'public' AND table_name IN ('users', 'products')",
            ))
            .await
            .map(|rows| rows.len())
    };
    Migrator::up(&connection, None).await?;
    assert_eq!(catalog_tables(&connection).await?, 2);
    Migrator::down(&connection, None).await?;
    assert_eq!(catalog_tables(&connection).await?, 0);
    Migrator::up(&connection, None).await?;
    assert_eq!(catalog_tables(&connection).await?, 2);
    connection.close().await?;
    database.drop().await
}

#[test]
fn compose_runs_redis_durably() {
    let compose = include_str!("../../compose.yaml");
    let redis = compose
        .split("\n  redis:\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("compose.yaml has a redis service");
    for setting in [
        r#""--appendonly", "yes""#,
        r#""--appendfsync", "everysec""#,
        "redis-data:/data",
    ] {
        assert!(redis.contains(setting), "redis lacks {setting}:\n{redis}");
    }
}

#[tokio::test]
async fn the_dashboard_and_grpc_web_are_served_on_the_grpc_port_over_http1() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = test_config(&database);
    let server = TestServer::start(config.clone()).await?;

    let moved = String::from_utf8(http1(&server.addr.to_string(), "GET / HTTP/1.1", b"").await?)?;
    assert!(moved.starts_with("HTTP/1.1 308"), "{moved}");
    assert!(
        moved.to_ascii_lowercase().contains("location: /dashboard/"),
        "{moved}"
    );
    let page =
        String::from_utf8(http1(&server.addr.to_string(), "GET /dashboard/ HTTP/1.1", b"").await?)?;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let lower = page.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/html"), "{page}");
    assert!(lower.contains("content-security-policy: default-src 'none'"));
    assert!(page.contains("/dashboard/assets/dashboard.js"));
    let script = http1(
        &server.addr.to_string(),
        "GET /dashboard/assets/dashboard.js HTTP/1.1",
        b"",
    )
    .await?;
    assert!(script.starts_with(b"HTTP/1.1 200"));

    // A grpc-web unary call: one framed, empty HealthCheckRequest; the
    // reply's trailers travel in the body, after the message.
    let call = http1(
        &server.addr.to_string(),
        "POST /grpc.health.v1.Health/Check HTTP/1.1\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1",
        &[0, 0, 0, 0, 0],
    )
    .await?;
    let text = String::from_utf8_lossy(&call).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("content-type: application/grpc-web+proto"),
        "{text}"
    );
    assert!(text.contains("grpc-status:0"), "{text}");
    server.stop().await?;

    // Off: the paths are the gRPC router's again (no such service).
    let mut off = config;
    off.dashboard = false;
    let server = TestServer::start(off).await?;
    let page = String::from_utf8_lossy(
        &http1(&server.addr.to_string(), "GET /dashboard/ HTTP/1.1", b"").await?,
    )
    .into_owned();
    assert!(!page.contains("<html"), "{page}");
    server.stop().await?;
    database.drop().await
}
