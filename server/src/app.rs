//! Assembles the server: dependencies, background tasks and the gRPC router,
//! and runs it until shutdown.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_web::GrpcWebLayer;

use crate::{
    analytics::{
        AnalyticsApi,
        feed::{FeedSettings, HistoryLimits},
        resume::Tokens,
        store_client::StoreClient,
        subscribe::Hub,
    },
    auth::{self, AuthLayer, Gate, KeyCache, Limits},
    catalog::{ProductApi, ProductNames, UserApi},
    config::{Auth, Config},
    dashboard::DashboardLayer,
    database::{Database, SchemaGate},
    error::Error,
    health::{self, Dependency, DependencyProbe, Watched},
    infra::{TCP_KEEPALIVE, kafka::Brokers, tls::ReloadingTls},
    ingest::{
        IngestApi,
        consumer::{self, PipelineSettings, PipelineStats},
    },
    store::{Retention, nodes::Nodes},
    telemetry::{self, grpc::MetricsLayer},
};

/// Connections the kernel queues for `accept`. The standard library's 128
/// overflows when many clients connect at once (after a restart, say), and
/// the overflow is reset; the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;
/// Added to `--max-clock-skew` for how far ahead of this process's clock a
/// commit may count events: another process's clock may run ahead.
const FEED_CLOCK_MARGIN: Duration = Duration::from_secs(60);

/// HTTP/2 receive window of one request stream: the most a client can send
/// ahead of a handler that reads slower than it sends (a `TrackStream`
/// waiting on the broker), after which flow control holds the client back.
///
/// Small on purpose. h2 charges every small DATA frame a handler has not
/// read yet against a per-connection budget of half the connection window,
/// and answers an exhausted budget with `GOAWAY ENHANCE_YOUR_CALM
/// too_many_data_frames`, killing every call on the connection. With
/// hyper's default 1 MiB stream window, about 2,400 unread 40-byte messages
/// were enough; with 64 KiB a stalled stream of the smallest messages
/// charges at most about 0.5 MiB.
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// HTTP/2 receive window of a whole connection: the budget above is half of
/// it, enough for four stalled streams of the smallest messages at once.
const CONNECTION_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// The services health reports on, and what each needs.
const WATCHED: &[Watched] = {
    use Dependency::{Kafka, Postgres, Redis};
    use tonic::server::NamedService;
    &[
        Watched {
            service: "",
            needs: &[Postgres, Redis, Kafka],
        },
        Watched {
            service: <crate::catalog::UserServer as NamedService>::NAME,
            needs: &[Postgres],
        },
        Watched {
            service: <crate::catalog::ProductServer as NamedService>::NAME,
            needs: &[Postgres],
        },
        Watched {
            service: <crate::analytics::AnalyticsServer as NamedService>::NAME,
            needs: &[Redis],
        },
        Watched {
            service: <crate::ingest::IngestServer as NamedService>::NAME,
            needs: &[Kafka],
        },
    ]
};

/// Binds the configured listen address.
pub async fn bind(config: &Config) -> Result<TcpListener, Error> {
    let addr = config.listen_addr;
    let listen = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As `TcpListener::bind`: a restarted server can rebind at once.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| Error::Io {
        context: format!("cannot listen on {addr} (is another server using it? set --listen-addr)"),
        source,
    })
}

/// Serves the gRPC API on `listener` until `shutdown` is cancelled, then
/// stops accepting, lets in-flight RPCs finish (up to the configured grace
/// period) and stops the background tasks.
///
/// Dependencies that are down do not stop the server from starting: health
/// reports NOT_SERVING and the background tasks keep retrying.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate().map_err(Error::Config)?;
    let tls = config
        .tls_files()
        .map(ReloadingTls::load)
        .transpose()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let local_addr: Option<SocketAddr> = listener.local_addr().ok();
    serve_metrics(&config, &shutdown).await?;
    let (database, schema_gate) = Database::connect_lazy(&config).await?;
    let redis = config.redis_nodes().map_err(Error::Config)?;
    let kafka = config.kafka().map_err(Error::Config)?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health::report_not_serving(&health_reporter, WATCHED).await;

    let reflection_v1 = reflection_builder().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(reflection_error)?;

    let keys = (config.auth == Auth::Keys).then(|| Arc::new(KeyCache::default()));
    let tasks = spawn_background(
        &config,
        (&database, schema_gate),
        (&redis, &kafka),
        keys.clone(),
        health_reporter,
        &shutdown,
    );

    let limits = Arc::new(Limits::new(config.limit_settings()));
    let gate = Gate::new(keys.clone(), config.auth_also.clone(), limits.clone());
    // Outermost first: the dashboard's files, grpc-web turned into gRPC (so
    // what follows sees gRPC only), the call metrics, the auth gate.
    let mut server = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(DashboardLayer {
            enabled: config.dashboard && config.role.serves_api(),
        })
        .layer(GrpcWebLayer::new())
        .layer(MetricsLayer)
        .layer(AuthLayer::new(gate))
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_concurrent_streams(
            (config.max_concurrent_streams > 0).then_some(config.max_concurrent_streams),
        )
        .timeout(config.request_timeout)
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout));
    if let Some(age) = config.max_connection_age {
        server = server
            .max_connection_age(age)
            .max_connection_age_grace(config.max_connection_age_grace);
    }
    let router = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let router = if config.role.serves_api() {
        add_api(
            router,
            &config,
            database,
            (&redis, &kafka),
            (limits, keys),
            local_addr,
            &shutdown,
        )
    } else {
        router
    };

    tracing::info!(addr = ?local_addr, tls = tls.is_some(), auth = ?config.auth, "rtap-server listening");
    let stopping = shutdown.clone().cancelled_owned();
    let serving: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match tls {
            Some(tls) => {
                tokio::spawn(
                    tls.clone()
                        .keep_fresh(config.tls_reload_interval, shutdown.clone()),
                );
                let incoming = tls.incoming(listener, shutdown.clone());
                Box::pin(router.serve_with_incoming_shutdown(incoming, stopping))
            }
            None => {
                // Small unary replies must not wait for Nagle's algorithm.
                let incoming = tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(TCP_KEEPALIVE));
                Box::pin(router.serve_with_incoming_shutdown(incoming, stopping))
            }
        };
    // Everything, RPCs and background tasks alike, gets the grace period
    // from the signal on and not a moment more, whatever a dependency is
    // doing: a task still waiting on one is dropped with the runtime.
    let grace = config.shutdown_grace;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    let stopped = async {
        let served = serving.await;
        tasks.wait().await;
        served
    };
    tokio::select! {
        served = stopped => served?,
        () = deadline => {
            tracing::warn!(grace = ?grace, "RPCs or background tasks did not finish within the grace period");
        }
    }
    tracing::info!("rtap-server stopped");
    Ok(())
}

/// Serves `/metrics` on `--metrics-addr` (unless `off`) until `shutdown`.
async fn serve_metrics(config: &Config, shutdown: &CancellationToken) -> Result<(), Error> {
    let Some(addr) = config.metrics_addr.0 else {
        return Ok(());
    };
    let handle = telemetry::install(config.role.as_str())?;
    let listener = rtap::telemetry::bind(addr)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let bound = listener.local_addr().ok();
    tracing::info!(addr = ?bound, "metrics served on /metrics");
    let stopping = shutdown.clone().cancelled_owned();
    tokio::spawn(async move {
        if let Err(error) = rtap::telemetry::serve(listener, handle, stopping).await {
            tracing::error!(error = %error, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// Starts what runs beside the RPCs: migrations, the API keys' reloads,
/// the health monitor and, for roles that consume, the ingest pipeline.
fn spawn_background(
    config: &Config,
    (database, schema_gate): (&Database, SchemaGate),
    (redis, kafka): (&Nodes, &Brokers),
    keys: Option<Arc<KeyCache>>,
    health_reporter: tonic_health::server::HealthReporter,
    shutdown: &CancellationToken,
) -> TaskTracker {
    let tasks = TaskTracker::new();
    {
        let database = database.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { database.migrate_until_ready(schema_gate, shutdown).await });
    }
    if let Some(keys) = keys {
        tasks.spawn(auth::keep_fresh(
            keys,
            database.clone(),
            config.auth_refresh_interval,
            shutdown.clone(),
        ));
    }
    let probe = DependencyProbe::new(
        database.clone(),
        redis.clone(),
        kafka.clone(),
        config.dependency_timeout,
    );
    tasks.spawn(health::monitor(
        probe,
        health_reporter,
        WATCHED,
        config.health_check_interval,
        shutdown.clone(),
    ));
    if config.role.consumes() {
        tasks.spawn(consumer::run(
            PipelineSettings::from_config(config, kafka.clone()),
            redis.clone(),
            Arc::new(PipelineStats::default()),
            shutdown.clone(),
        ));
    }
    tasks.close();
    tasks
}

/// The router's layers, outermost last.
type Layered = tower_layer::Stack<
    AuthLayer,
    tower_layer::Stack<
        MetricsLayer,
        tower_layer::Stack<GrpcWebLayer, tower_layer::Stack<DashboardLayer, tower_layer::Identity>>,
    >,
>;

/// The API services, for roles that serve it.
fn add_api(
    router: tonic::transport::server::Router<Layered>,
    config: &Config,
    database: Database,
    (redis, kafka): (&Nodes, &Brokers),
    (limits, keys): (Arc<Limits>, Option<Arc<KeyCache>>),
    local_addr: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> tonic::transport::server::Router<Layered> {
    let store = StoreClient::new(
        redis,
        config.redis_namespace.clone(),
        Retention::from_config(config),
        config.dependency_timeout,
    );
    let tokens = Tokens::new(&config.replica_id(local_addr));
    let feeds = FeedSettings {
        refresh_interval: config.feed_refresh_interval,
        refresh_slots: usize::try_from(config.feed_refresh_slots).unwrap_or(1),
        ahead: config.max_clock_skew + FEED_CLOCK_MARGIN,
        history: HistoryLimits {
            count: usize::try_from(config.subscription_history).unwrap_or(usize::MAX),
            bytes: usize::try_from(config.subscription_history_bytes).unwrap_or(usize::MAX),
            age: config.subscription_history_age,
        },
    };
    let hub = Hub::start(store, feeds, tokens, shutdown.clone());
    let max_message = usize::try_from(config.max_message_bytes).unwrap_or(usize::MAX);
    router
        .add_service(
            UserApi::new(database.clone())
                .into_server()
                .max_decoding_message_size(max_message),
        )
        .add_service(
            ProductApi::new(database.clone())
                .into_server()
                .max_decoding_message_size(max_message),
        )
        .add_service(
            AnalyticsApi::new(
                hub,
                config,
                kafka.clone(),
                (limits.subscriptions.clone(), keys),
                Arc::new(ProductNames::start(database)),
            )
            .into_server()
            .max_decoding_message_size(max_message),
        )
        .add_service(
            IngestApi::new(config, kafka.clone(), limits)
                .into_server()
                .max_decoding_message_size(max_message),
        )
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rtap::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.Status and the error details (BadRequest), so that
        // grpcurl prints field violations instead of base64.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

fn reflection_error(error: tonic_reflection::server::Error) -> Error {
    Error::Internal(format!("cannot build the reflection service: {error}"))
}
