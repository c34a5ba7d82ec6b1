//! Shared harness of the integration tests: a real `rtap-server` on an
//! ephemeral port against the real PostgreSQL, Redis and Kafka, with a
//! database, Redis namespace and Kafka topics of its own so tests run in
//! parallel.
//!
//! Where the services are: `RTAP_TEST_POSTGRES_URL` (server URL without a
//! database, default `postgres://postgres:postgres@127.0.0.1:5432`),
//! `REDIS_URL` (default `redis://127.0.0.1:6379/`), `KAFKA_BROKERS` (default
//! `127.0.0.1:9092`). `scripts/services.sh up` provides all three.

#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod counts;
pub mod pipeline;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use rtap_server::Config;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A loopback port free when asked (another process may take it before
/// it is bound: good enough for tests).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Postgres server URL, without a database name.
pub fn postgres_url() -> String {
    std::env::var("RTAP_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into())
}

/// A short random id for names that must not collide between tests.
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A database of its own for one test, dropped by [`TestDatabase::drop`].
pub struct TestDatabase {
    /// `postgres://.../<name>`.
    pub url: String,
    name: String,
}

/// A connection to the server's `postgres` database, to create, drop and
/// manage test databases.
async fn admin() -> anyhow::Result<DatabaseConnection> {
    Database::connect(format!("{}/postgres", postgres_url()))
        .await
        .context("connect to PostgreSQL (is `scripts/services.sh up` done?)")
}

impl TestDatabase {
    /// Creates an empty database with a unique name.
    pub async fn create() -> anyhow::Result<Self> {
        let name = format!("rtap_test_{}", unique_suffix());
        let admin = admin().await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .context("create the test database")?;
        admin.close().await?;
        Ok(Self {
            url: format!("{}/{name}", postgres_url()),
            name,
        })
    }

    /// Closes, from PostgreSQL's side, every connection open to the database
    /// (as a database restart does). Returns how many there were.
    pub async fn terminate_connections(&self) -> anyhow::Result<usize> {
        let admin = admin().await?;
        let terminated = admin
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                [self.name.clone().into()],
            ))
            .await
            .context("terminate the test database's connections")?
            .len();
        admin.close().await?;
        Ok(terminated)
    }

    /// Drops the database, closing any connection still open to it.
    pub async fn drop(self) -> anyhow::Result<()> {
        let admin = admin().await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await?;
        admin.close().await?;
        Ok(())
    }
}

/// A configuration pointing at `database`, with a unique Redis namespace and
/// Kafka topics, quick health checks and an ephemeral port.
pub fn test_config(database: &TestDatabase) -> Config {
    let mut config = Config::from_env().expect("the default configuration parses");
    let suffix = unique_suffix();
    config.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_addr = rtap::telemetry::MetricsAddr(None);
    config.database_url = database.url.clone();
    config.redis_namespace = format!("rtap-test-{suffix}");
    config.events_topic = format!("rtap-test-{suffix}.interactions");
    config.dead_letter_topic = format!("rtap-test-{suffix}.dead-letter");
    config.health_check_interval = Duration::from_millis(200);
    config.dependency_timeout = Duration::from_secs(2);
    config.shutdown_grace = Duration::from_secs(5);
    if on_cluster() {
        use_cluster(&mut config);
    }
    config
}

/// Whether the suites run against the local Redis Cluster instead of one
/// Redis: `RTAP_TEST_REDIS=cluster`, as `scripts/test.sh` runs the pipeline
/// and analytics suites a second time.
pub fn on_cluster() -> bool {
    std::env::var("RTAP_TEST_REDIS").is_ok_and(|redis| redis == "cluster")
}

/// The nodes of the Redis the tests run against (one Redis, or the cluster
/// when [`on_cluster`]).
pub fn test_nodes() -> anyhow::Result<rtap_server::store::nodes::Nodes> {
    let mut config = Config::from_env().context("the default configuration parses")?;
    if on_cluster() {
        use_cluster(&mut config);
    }
    config.redis_nodes().map_err(anyhow::Error::msg)
}

/// Points `config` at the local Redis Cluster (`scripts/services.sh
/// cluster`), or at the seed nodes in `RTAP_TEST_REDIS_CLUSTER`.
pub fn use_cluster(config: &mut Config) {
    config.redis_url = std::env::var("RTAP_TEST_REDIS_CLUSTER").unwrap_or_else(|_| {
        "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into()
    });
    config.redis_cluster = true;
}

/// An in-process `rtap-server`.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), rtap_server::Error>>,
}

impl TestServer {
    /// Binds an ephemeral port and serves `config` in the background.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let listener = rtap_server::bind(&config).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(rtap_server::serve(config, listener, shutdown.clone()));
        Ok(Self {
            addr,
            shutdown,
            task,
        })
    }

    /// Starts `config` and waits until the catalog is SERVING, which means
    /// its schema is migrated.
    pub async fn start_with_catalog(config: Config) -> anyhow::Result<Self> {
        let server = Self::start(config).await?;
        wait_for_health(
            server.channel(),
            "rtap.v1.UserService",
            ServingStatus::Serving,
            Duration::from_secs(30),
        )
        .await?;
        Ok(server)
    }

    /// A channel to the server (connects on first use).
    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("a socket address is a valid URI")
            .connect_lazy()
    }

    /// Shuts the server down gracefully and returns what `serve` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

/// The health status of `service` (`""` for the whole server).
pub async fn health_status(channel: Channel, service: &str) -> anyhow::Result<ServingStatus> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Polls the health of `service` until it is `expected`; fails after
/// `within` with the last status seen.
pub async fn wait_for_health(
    channel: Channel,
    service: &str,
    expected: ServingStatus,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = health_status(channel.clone(), service).await;
        if matches!(status, Ok(s) if s == expected) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("health of {service:?} is {status:?}, expected {expected:?} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of `topic`, per partition, in offset order: (key, value).
pub async fn read_topic(
    brokers: &str,
    topic: &str,
) -> anyhow::Result<std::collections::BTreeMap<i32, Vec<(Vec<u8>, Vec<u8>)>>> {
    use rskafka::client::{ClientBuilder, partition::UnknownTopicHandling};

    let client = ClientBuilder::new(vec![brokers.to_owned()]).build().await?;
    let partitions = client
        .list_topics()
        .await?
        .into_iter()
        .find(|t| t.name == topic)
        .map(|t| t.partitions)
        .unwrap_or_default();
    let mut all = std::collections::BTreeMap::new();
    for partition in partitions {
        let reader = client
            .partition_client(topic, partition, UnknownTopicHandling::Retry)
            .await?;
        let mut records = Vec::new();
        let mut offset = 0;
        loop {
            // The high watermark comes from the fetch itself: the test
            // broker's ListOffsets(latest) is not reliable.
            let (batch, high_watermark) = reader.fetch_records(offset, 1..1_000_000, 100).await?;
            for record in batch {
                offset = record.offset + 1;
                records.push((
                    record.record.key.unwrap_or_default(),
                    record.record.value.unwrap_or_default(),
                ));
            }
            if offset >= high_watermark {
                break;
            }
        }
        all.insert(partition, records);
    }
    Ok(all)
}

/// Field paths of the `google.rpc.BadRequest` detail of an INVALID_ARGUMENT.
pub fn bad_request_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// A loopback TCP proxy in front of a real service, which a test can cut
/// (close every connection and refuse new ones) and restore, to play an
/// outage of that service without stopping it for the other tests.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    up: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Proxies a fresh loopback port to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, _) = tokio::sync::watch::channel(true);
        let up = std::sync::Arc::new(up);
        let accept_up = up.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*accept_up.borrow() {
                    continue; // dropping the socket refuses the connection
                }
                let mut cut = accept_up.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Self { addr, up, task })
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A broker of the test's own, with SQLite storage so its data survives a
/// restart.
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    port: u16,
    process: Option<tokio::process::Child>,
}

impl PrivateBroker {
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut broker = Self {
            dir: tempfile::tempdir()?,
            port,
            process: None,
        };
        broker.restart().await?;
        Ok(broker)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://{}", self.address());
        let process = tokio::process::Command::new(nisshi())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://broker.db"])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.process = Some(process);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.address()).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("nisshi did not open {}", self.address())
    }

    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill().await?;
        }
        Ok(())
    }
}

/// `nisshi` from cargo's bin folder (where scripts/services.sh installs it),
/// else from PATH.
pub fn nisshi() -> std::path::PathBuf {
    std::env::var_os("HOME")
        .map(|home| std::path::Path::new(&home).join(".cargo/bin/nisshi"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| std::path::PathBuf::from("nisshi"))
}

/// A connection for the tests' own reads and clean-up. Its response
/// timeout is longer than redis-rs's default of 500 ms: a pipeline's commit
/// holds Redis for its whole transaction, and with debug builds and tests
/// running side by side on two cores, a read queued behind one has waited
/// longer than that.
pub async fn redis_connection(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// Every node of `config`'s Redis: the one Redis, or a cluster's primaries
/// and replicas.
pub async fn every_redis_node(config: &Config) -> anyhow::Result<Vec<redis::Client>> {
    if !config.redis_cluster {
        return Ok(vec![redis::Client::open(config.redis_url.as_str())?]);
    }
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    let seed = nodes
        .primaries()
        .await?
        .into_iter()
        .next()
        .context("a primary")?;
    let mut connection = seed.get_multiplexed_async_connection().await?;
    let listing: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut connection)
        .await?;
    // `<id> <host:port@bus> <flags> …` per node.
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1)?.split('@').next())
        .map(|address| Ok(redis::Client::open(format!("redis://{address}"))?))
        .collect()
}

/// CPU time (user and system) the Redis behind `connection` has used since
/// it started, in seconds.
pub async fn redis_cpu_seconds(
    connection: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(connection)
        .await?;
    let mut total = 0.0;
    for line in info.lines() {
        if let Some((field, value)) = line.trim().split_once(':')
            && matches!(field, "used_cpu_sys" | "used_cpu_user")
        {
            total += value.parse::<f64>()?;
        }
    }
    Ok(total)
}

/// [`redis_cpu_seconds`] summed over `nodes`.
pub async fn redis_cpu_seconds_on(nodes: &[redis::Client]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for node in nodes {
        total += redis_cpu_seconds(&mut node.get_multiplexed_async_connection().await?).await?;
    }
    Ok(total)
}

/// A subscription to the commit deltas of some partitions, as API
/// processes listen: sharded pub/sub over RESP3.
pub struct ShardSubscription {
    _connection: ShardConnection,
    pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
}

/// What a [`ShardSubscription`] holds open.
enum ShardConnection {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ShardSubscription {
    /// The next delta's payload; `None` when the connection is gone.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        while let Some(push) = self.pushes.recv().await {
            if push.kind == redis::PushKind::SMessage
                && let Some(redis::Value::BulkString(payload)) = push.data.into_iter().nth(1)
            {
                return Some(payload);
            }
        }
        None
    }
}

/// Subscribes to the deltas of `partitions` of `config`'s namespace, on
/// its Redis or cluster.
pub async fn shard_subscription(
    config: &Config,
    partitions: i32,
) -> anyhow::Result<ShardSubscription> {
    use redis::aio::ConnectionLike as _;
    let (sender, pushes) = tokio::sync::mpsc::unbounded_channel();
    let channels = (0..partitions).map(|partition| {
        rtap_server::store::keys::PartitionKeys::new(&config.redis_namespace, partition).deltas()
    });
    let connection = if config.redis_cluster {
        let seeds: Vec<&str> = config.redis_url.split(',').collect();
        let mut connection = redis::cluster::ClusterClientBuilder::new(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender)
            .build()?
            .get_async_connection()
            .await?;
        for channel in channels {
            connection.ssubscribe(channel).await?;
        }
        ShardConnection::Cluster(connection)
    } else {
        let settings = redis::AsyncConnectionConfig::new().set_push_sender(sender);
        let mut connection = redis::Client::open(format!("{}?protocol=resp3", config.redis_url))?
            .get_multiplexed_async_connection_with_config(&settings)
            .await?;
        // One channel per command: a RESP3 confirmation is the reply.
        for channel in channels {
            connection
                .req_packed_command(redis::cmd("SSUBSCRIBE").arg(channel))
                .await?;
        }
        ShardConnection::Single(connection)
    };
    Ok(ShardSubscription {
        _connection: connection,
        pushes,
    })
}

/// Deletes the Redis keys of `partitions` of `config`'s namespace, on
/// whichever Redis it points at, so test runs do not fill Redis.
pub async fn delete_namespace(config: &Config, partitions: i32) -> anyhow::Result<()> {
    let nodes = config.redis_nodes().map_err(anyhow::Error::msg)?;
    delete_namespace_on(&nodes, &config.redis_namespace, partitions).await
}

/// Deletes the Redis keys of `partitions` of `namespace` on the one Redis at
/// `url`.
pub async fn delete_redis_namespace(
    url: &str,
    namespace: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let nodes = rtap_server::store::nodes::Nodes::single(redis::Client::open(url)?);
    delete_namespace_on(&nodes, namespace, partitions).await
}

/// Deletes the keys of `partitions` of `namespace`, each on the node that
/// holds it.
pub async fn delete_namespace_on(
    nodes: &rtap_server::store::nodes::Nodes,
    namespace: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    use rtap_server::store::nodes::Route;
    for partition in 0..partitions {
        let keys = rtap_server::store::keys::PartitionKeys::new(namespace, partition);
        let mut connection = nodes.connection(&keys.state()).await?;
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(keys.pattern())
            .query_async(&mut connection)
            .await?;
        let keys = found;
        for chunk in keys.chunks(1000) {
            redis::cmd("UNLINK")
                .arg(chunk)
                .query_async::<()>(&mut connection)
                .await?;
        }
    }
    Ok(())
}

/// `rtap-server keys ARGS` against `database`; its standard output (a
/// created key, a listing).
pub async fn keys_command(database: &TestDatabase, args: &[&str]) -> anyhow::Result<String> {
    let binary = option_env!("CARGO_BIN_EXE_rtap-server")
        .context("only the server's tests and benches can run rtap-server")?;
    let output = tokio::process::Command::new(binary)
        .arg("keys")
        .args(args)
        .args(["--database-url", &database.url])
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "keys {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// A subscription to the event counts of the trailing `seconds`, with a
/// heartbeat every `heartbeat_seconds` (0: the server's default).
pub fn counts_subscription(seconds: i64, heartbeat_seconds: i64) -> rtap::v1::SubscribeRequest {
    use rtap::v1::{GetEventCountsRequest, TimeWindow, subscribe_request, time_window::Window};
    rtap::v1::SubscribeRequest {
        query: Some(subscribe_request::Query::EventCounts(
            GetEventCountsRequest {
                window: Some(TimeWindow {
                    window: Some(Window::Trailing(prost_types::Duration {
                        seconds,
                        nanos: 0,
                    })),
                }),
                ..Default::default()
            },
        )),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: heartbeat_seconds,
            nanos: 0,
        }),
        resume_token: Vec::new(),
    }
}

/// One HTTP/1.1 request on a fresh connection (`head`: the request line
/// and any headers), within 30 s; the whole response, head and body.
pub async fn http1(addr: &str, head: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .context("no complete HTTP response within 30 s")??;
    Ok(response)
}
