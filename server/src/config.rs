//! The server's one configuration: command-line flags, each with an
//! environment-variable fallback and a default that works on a developer
//! machine with `scripts/services.sh up`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    auth::{KeysAction, OpenService},
    infra::tls::TlsFiles,
    store::{StoreError, nodes::Nodes},
};

/// `rtap-server [FLAGS] [serve|migrate]`.
#[derive(Debug, Parser)]
#[command(
    name = "rtap-server",
    version,
    about = "RTAP's gRPC server: catalog CRUD on PostgreSQL, live metrics from Kafka in Redis"
)]
pub struct Cli {
    /// Settings shared by every subcommand.
    #[command(flatten)]
    pub config: Config,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The server's subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default). Applies pending migrations first.
    Serve,
    /// Apply pending database migrations, then exit.
    Migrate,
    /// Drop the namespace's aggregates and offsets and recompute them from
    /// the earliest offsets Kafka keeps, with progress; refuses while an
    /// ingest process consumes the namespace.
    Rebuild,
    /// Print a live one-line summary of the last 5 minutes from the server
    /// at `--listen-addr`, until Ctrl-C.
    Watch,
    /// Ask the server at `--listen-addr` for its health; exit 0 if SERVING
    /// (for container health checks and scripts).
    Health,
    /// Manage API keys in the catalog database (applies pending migrations
    /// first).
    Keys {
        /// What to do with keys.
        #[command(subcommand)]
        action: KeysAction,
    },
}

/// Every setting of the server.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(
        long,
        env = "RTAP_LISTEN_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen_addr: SocketAddr,

    /// Address `/metrics` is served on, in the Prometheus text format over
    /// plain HTTP; `off` serves none. Loopback by default: metrics hold no
    /// user data but tell much about a deployment.
    #[arg(
        long,
        env = "RTAP_METRICS_ADDR",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    pub metrics_addr: rtap::telemetry::MetricsAddr,

    /// Serve the live dashboard on the gRPC port, at `/dashboard/` (by a
    /// process that serves the API); `false` serves none. The API answers
    /// grpc-web on that port either way.
    #[arg(
        long,
        env = "RTAP_DASHBOARD",
        default_value_t = true,
        action = clap::ArgAction::Set,
        global = true
    )]
    pub dashboard: bool,

    /// PostgreSQL URL of the catalog database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/rtap",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// Redis URL of the metric store; with `--redis-cluster`, the URLs of
    /// one or more seed nodes of a Redis Cluster, comma-separated.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        hide_env_values = true,
        global = true
    )]
    pub redis_url: String,

    /// The metric store is a Redis Cluster reached through the seed nodes of
    /// `--redis-url`.
    #[arg(long, env = "RTAP_REDIS_CLUSTER", global = true)]
    pub redis_cluster: bool,

    /// Prefix of every Redis key RTAP writes, so several deployments (or
    /// tests) can share one Redis. Letters, digits, `_`, `-` and `.` only.
    #[arg(
        long,
        env = "RTAP_REDIS_NAMESPACE",
        default_value = "rtap",
        value_parser = parse_namespace,
        global = true
    )]
    pub redis_namespace: String,

    /// Kafka bootstrap brokers, comma-separated `host:port`.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        value_delimiter = ',',
        value_parser = rtap::kafka::parse_broker,
        global = true
    )]
    pub kafka_brokers: Vec<String>,

    /// Connect to the Kafka brokers over TLS, trusting the broker
    /// certificates that chain to this PEM CA.
    #[arg(long, env = "RTAP_KAFKA_TLS_CA", global = true)]
    pub kafka_tls_ca: Option<PathBuf>,

    /// Kafka topic of interaction events (`rtap.v1.InteractionEvent`).
    #[arg(
        long,
        env = "RTAP_EVENTS_TOPIC",
        default_value = "rtap.interactions",
        value_parser = rtap::kafka::parse_topic,
        global = true
    )]
    pub events_topic: String,

    /// Kafka topic that receives records the pipeline cannot apply.
    #[arg(
        long,
        env = "RTAP_DEAD_LETTER_TOPIC",
        default_value = "rtap.interactions.dead-letter",
        value_parser = rtap::kafka::parse_topic,
        global = true
    )]
    pub dead_letter_topic: String,

    /// Partitions of the events topic when the server has to create it.
    #[arg(
        long,
        env = "RTAP_EVENTS_PARTITIONS",
        default_value_t = 4,
        value_parser = clap::value_parser!(i32).range(1..=1024),
        global = true
    )]
    pub events_partitions: i32,

    /// Longest wait for the broker to acknowledge an event sent through the
    /// ingest RPCs (then UNAVAILABLE).
    #[arg(
        long,
        env = "RTAP_INGEST_ACK_TIMEOUT",
        default_value = "5s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub ingest_ack_timeout: Duration,

    /// Most events in one TrackStream call (RESOURCE_EXHAUSTED past it).
    #[arg(
        long,
        env = "RTAP_MAX_STREAM_EVENTS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    pub max_stream_events: u32,

    /// Retention of minute buckets; also the oldest event time accepted,
    /// relative to now (older events could no longer be counted).
    #[arg(
        long,
        env = "RTAP_MINUTE_RETENTION",
        default_value = "48h",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub minute_retention: Duration,

    /// Retention of hour buckets (at least the minute retention).
    #[arg(
        long,
        env = "RTAP_HOUR_RETENTION",
        default_value = "30days",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub hour_retention: Duration,

    /// Retention of day buckets (at least the hour retention).
    #[arg(
        long,
        env = "RTAP_DAY_RETENTION",
        default_value = "400days",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub day_retention: Duration,

    /// What this process does: `all` serves the API and consumes Kafka,
    /// `api` only serves, `ingest` only consumes (and serves health). Not
    /// global, as `keys create --role` is a key's role: give it before a
    /// subcommand.
    #[arg(long, env = "RTAP_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,

    /// Partitions of the events topic this process consumes, comma-separated
    /// (all when empty). Each partition must have exactly one consumer.
    #[arg(
        long,
        env = "RTAP_INGEST_PARTITIONS",
        value_delimiter = ',',
        value_parser = clap::value_parser!(i32).range(0..),
        global = true
    )]
    pub ingest_partitions: Vec<i32>,

    /// Most bytes one Kafka fetch returns per partition (bounds the memory
    /// of records in flight: two fetches per partition at most).
    #[arg(
        long,
        env = "RTAP_FETCH_MAX_BYTES",
        default_value_t = 4 * 1024 * 1024,
        value_parser = clap::value_parser!(i32).range(1024..),
        global = true
    )]
    pub fetch_max_bytes: i32,

    /// Longest the broker holds a fetch open waiting for new records. Short,
    /// because some brokers (Nisshi) answer only when it expires: it bounds
    /// the delay from produce to metrics.
    #[arg(
        long,
        env = "RTAP_FETCH_MAX_WAIT",
        default_value = "20ms",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub fetch_max_wait: Duration,

    /// Most records applied by one Redis commit (a commit never spans two
    /// fetches, so `--fetch-max-bytes` caps it too). A commit holds Redis for
    /// about 3 µs per record while it runs: smaller keeps queries fast while
    /// ingest catches up, larger ingests faster, as a batch's events share
    /// more of its keys. Measured by the ingest bench while catching up:
    /// 2000 gives 0.9 Redis commands per event and queries waiting up to
    /// about 40 ms behind commits; 20,000 gives 0.2 commands per event,
    /// twice the throughput, and waits up to about 110 ms.
    #[arg(
        long,
        env = "RTAP_COMMIT_MAX_EVENTS",
        default_value_t = 20_000,
        value_parser = clap::value_parser!(u32).range(1..=100_000),
        global = true
    )]
    pub commit_max_events: u32,

    /// How long an `event_id` is remembered to discard duplicates. Memory:
    /// about 80 bytes of Redis per event received within the window.
    #[arg(
        long,
        env = "RTAP_DEDUPE_WINDOW",
        default_value = "15m",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub dedupe_window: Duration,

    /// How long a consumer's claim on a partition lasts without renewal: a
    /// crashed consumer's partitions are taken over after at most this long.
    #[arg(
        long,
        env = "RTAP_PARTITION_LEASE",
        default_value = "10s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub partition_lease: Duration,

    /// How often ingest logs its vital signs (offsets, lag, counters) per
    /// partition.
    #[arg(
        long,
        env = "RTAP_STATUS_LOG_INTERVAL",
        default_value = "30s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub status_log_interval: Duration,

    /// Inactivity (in event time) after which a user's session ends.
    #[arg(
        long,
        env = "RTAP_SESSION_GAP",
        default_value = "30m",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub session_gap: Duration,

    /// How far in the future an event time may be (device clock skew).
    #[arg(
        long,
        env = "RTAP_MAX_CLOCK_SKEW",
        default_value = "5m",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub max_clock_skew: Duration,

    /// How often PostgreSQL, Redis and Kafka are checked for the health
    /// service (for example `5s`, `500ms`).
    #[arg(
        long,
        env = "RTAP_HEALTH_CHECK_INTERVAL",
        default_value = "5s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub health_check_interval: Duration,

    /// How long one call to a dependency may take before it counts as down.
    #[arg(
        long,
        env = "RTAP_DEPENDENCY_TIMEOUT",
        default_value = "3s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub dependency_timeout: Duration,

    /// Shortest time between two re-reads of one subscribed query: the
    /// changes of the commits within it are read together (`Subscribe`
    /// deltas are at most about this much later than the commit).
    #[arg(
        long,
        env = "RTAP_FEED_REFRESH_INTERVAL",
        default_value = "50ms",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub feed_refresh_interval: Duration,

    /// Subscribed queries re-read from Redis at once; the others wait, their
    /// changes coalescing, so subscriptions never starve other calls.
    #[arg(
        long,
        env = "RTAP_FEED_REFRESH_SLOTS",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=1024),
        global = true
    )]
    pub feed_refresh_slots: u32,

    /// Deltas each feed keeps for subscribers that resume a cut stream
    /// (with `--subscription-history-bytes` and `-age`, whichever binds
    /// first); 0 keeps none: a resume after any change is a resync.
    #[arg(
        long,
        env = "RTAP_SUBSCRIPTION_HISTORY",
        default_value_t = 256,
        global = true
    )]
    pub subscription_history: u32,

    /// Bytes of encoded deltas each feed keeps for resuming subscribers.
    #[arg(
        long,
        env = "RTAP_SUBSCRIPTION_HISTORY_BYTES",
        default_value_t = 65_536,
        global = true
    )]
    pub subscription_history_bytes: u32,

    /// How long a feed keeps a delta for resuming subscribers, and keeps
    /// running after its last subscriber went (so one that resumes finds it).
    #[arg(
        long,
        env = "RTAP_SUBSCRIPTION_HISTORY_AGE",
        default_value = "60s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    pub subscription_history_age: Duration,

    /// This replica's stable name, written into resume tokens: a token of
    /// another replica resumes with a resync saying so, one of this
    /// replica before a restart one saying that. Default: the host name and
    /// the listen port.
    #[arg(long, env = "RTAP_REPLICA_ID", global = true)]
    pub replica_id: Option<String>,

    /// On SIGINT/SIGTERM, how long in-flight RPCs may take to finish before
    /// the server exits anyway.
    #[arg(
        long,
        env = "RTAP_SHUTDOWN_GRACE",
        default_value = "10s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub shutdown_grace: Duration,

    /// Authentication of calls: `keys` requires an API key
    /// (`authorization: Bearer <key>`, see `rtap-server keys`); `none`
    /// admits everyone, and is refused on a non-loopback address unless
    /// `--insecure`.
    #[arg(
        long,
        env = "RTAP_AUTH",
        value_enum,
        default_value_t = Auth::None,
        global = true
    )]
    pub auth: Auth,

    /// How often the server reloads API keys from PostgreSQL: a revoked key
    /// is refused by every server within this plus one reload.
    #[arg(
        long,
        env = "RTAP_AUTH_REFRESH_INTERVAL",
        default_value = "2s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub auth_refresh_interval: Duration,

    /// Services open to everyone by default that should need a key (of any
    /// role) too, comma-separated: `health`, `reflection`.
    #[arg(
        long,
        env = "RTAP_AUTH_ALSO",
        value_enum,
        value_delimiter = ',',
        global = true
    )]
    pub auth_also: Vec<OpenService>,

    /// PEM certificate chain of the gRPC port; with `--tls-key`, the port
    /// serves TLS only. Re-read when the file changes or on SIGHUP.
    #[arg(long, env = "RTAP_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "RTAP_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates for mutual TLS: clients must present a
    /// certificate that chains to one of them.
    #[arg(long, env = "RTAP_TLS_CLIENT_CA", global = true, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for a change.
    #[arg(
        long,
        env = "RTAP_TLS_RELOAD_INTERVAL",
        default_value = "10s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub tls_reload_interval: Duration,

    /// `watch` and `health`: connect with TLS, trusting the server
    /// certificates that chain to this PEM CA.
    #[arg(long, env = "RTAP_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// `watch` and `health`: the name the server's certificate must carry
    /// (default: the host of `--listen-addr`).
    #[arg(long, env = "RTAP_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,

    /// `watch` and `health` against a mutual-TLS server: this client's PEM
    /// certificate (with `--tls-client-key`).
    #[arg(
        long,
        env = "RTAP_TLS_CLIENT_CERT",
        global = true,
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,

    /// The PEM private key of `--tls-client-cert`.
    #[arg(
        long,
        env = "RTAP_TLS_CLIENT_KEY",
        global = true,
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,

    /// Calls a second one caller may make (a key, or without keys an IP
    /// address), in bursts of up to a second's worth; over it a call is
    /// RESOURCE_EXHAUSTED with the time to wait. 0: no limit.
    #[arg(
        long,
        env = "RTAP_MAX_CALLS_PER_SECOND",
        default_value_t = 10_000,
        global = true
    )]
    pub max_calls_per_second: u32,

    /// Events a second one caller may track: over it `Track` is
    /// RESOURCE_EXHAUSTED and a `TrackStream` is read no faster. 0: no
    /// limit.
    #[arg(
        long,
        env = "RTAP_MAX_EVENTS_PER_SECOND",
        default_value_t = 100_000,
        global = true
    )]
    pub max_events_per_second: u32,

    /// Subscriptions one caller may hold open. 0: no limit.
    #[arg(
        long,
        env = "RTAP_MAX_SUBSCRIPTIONS_PER_CALLER",
        default_value_t = 5_000,
        global = true
    )]
    pub max_subscriptions_per_caller: u32,

    /// Subscriptions this server holds open in all. 0: no limit.
    #[arg(
        long,
        env = "RTAP_MAX_SUBSCRIPTIONS",
        default_value_t = 50_000,
        global = true
    )]
    pub max_subscriptions: u32,

    /// Calls one HTTP/2 connection may have open at once (HTTP/2's
    /// SETTINGS_MAX_CONCURRENT_STREAMS). 0: no limit.
    #[arg(
        long,
        env = "RTAP_MAX_CONCURRENT_STREAMS",
        default_value_t = 10_000,
        global = true
    )]
    pub max_concurrent_streams: u32,

    /// Longest a call may take to answer (DEADLINE_EXCEEDED past it; a
    /// shorter `grpc-timeout` from the client wins). A subscription counts
    /// until its first message, a `TrackStream` until its reply.
    #[arg(
        long,
        env = "RTAP_REQUEST_TIMEOUT",
        default_value = "60s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub request_timeout: Duration,

    /// Largest request message a call may send.
    #[arg(
        long,
        env = "RTAP_MAX_MESSAGE_BYTES",
        default_value_t = 4 * 1024 * 1024,
        value_parser = clap::value_parser!(u32).range(1024..),
        global = true
    )]
    pub max_message_bytes: u32,

    /// Age after which a connection is asked to close (GOAWAY), so clients
    /// spread over replicas again; its calls then have
    /// `--max-connection-age-grace` to finish. Off when unset.
    #[arg(long, env = "RTAP_MAX_CONNECTION_AGE", value_parser = parse_positive_duration, global = true)]
    pub max_connection_age: Option<Duration>,

    /// How long calls of a connection past its age may still run.
    #[arg(
        long,
        env = "RTAP_MAX_CONNECTION_AGE_GRACE",
        default_value = "30s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub max_connection_age_grace: Duration,

    /// HTTP/2 PING sent on a connection idle this long, to find dead
    /// clients (and their subscriptions).
    #[arg(
        long,
        env = "RTAP_HTTP2_KEEPALIVE_INTERVAL",
        default_value = "30s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub http2_keepalive_interval: Duration,

    /// How long a keepalive PING may go unanswered before the connection is
    /// closed.
    #[arg(
        long,
        env = "RTAP_HTTP2_KEEPALIVE_TIMEOUT",
        default_value = "10s",
        value_parser = parse_positive_duration,
        global = true
    )]
    pub http2_keepalive_timeout: Duration,

    /// Serve on a non-loopback address without TLS or without
    /// authentication anyway (for a private network you trust).
    #[arg(long, env = "RTAP_INSECURE", global = true)]
    pub insecure: bool,

    /// API key that `watch` and `health` present to the server.
    #[arg(long, env = "RTAP_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,

    /// Log line format; the level comes from `RUST_LOG` (default `info`).
    #[arg(
        long,
        env = "RTAP_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

/// What one `rtap-server` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Serve the API and consume Kafka.
    All,
    /// Serve the API only.
    Api,
    /// Consume Kafka only (the health service is still served).
    Ingest,
}

impl Role {
    /// Whether this role serves the catalog, analytics and ingest RPCs.
    pub(crate) fn serves_api(self) -> bool {
        matches!(self, Self::All | Self::Api)
    }

    /// Whether this role runs the Kafka consumers.
    pub(crate) fn consumes(self) -> bool {
        matches!(self, Self::All | Self::Ingest)
    }

    /// The role's name, as given on the command line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Api => "api",
            Self::Ingest => "ingest",
        }
    }
}

/// How calls are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Auth {
    /// Every call needs an API key whose role allows the method.
    Keys,
    /// No authentication (loopback, or with `--insecure`).
    None,
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl Config {
    /// The configuration that `rtap-server` would use with no flags and the
    /// current environment; tests adjust it field by field.
    pub fn from_env() -> Result<Self, clap::Error> {
        Cli::try_parse_from(["rtap-server"]).map(|cli| cli.config)
    }

    /// Checks the rules that span several settings.
    /// The metric store's nodes, as `--redis-url` and `--redis-cluster` say.
    pub fn redis_nodes(&self) -> Result<Nodes, String> {
        let invalid = |error: StoreError| format!("REDIS_URL is invalid: {error}");
        if self.redis_cluster {
            let seeds: Vec<String> = self
                .redis_url
                .split(',')
                .map(str::trim)
                .filter(|seed| !seed.is_empty())
                .map(str::to_owned)
                .collect();
            Nodes::cluster(&seeds).map_err(invalid)
        } else {
            let client = redis::Client::open(self.redis_url.as_str())
                .map_err(|error| invalid(error.into()))?;
            Ok(Nodes::single(client))
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.hour_retention < self.minute_retention || self.day_retention < self.hour_retention {
            return Err(
                "retentions must grow with the bucket size: --minute-retention <= --hour-retention <= --day-retention"
                    .into(),
            );
        }
        if self.dead_letter_topic == self.events_topic {
            return Err("--dead-letter-topic must differ from --events-topic".into());
        }
        self.check_exposure()
    }

    /// Refuses to serve beyond loopback without authentication (or TLS)
    /// unless `--insecure` says so deliberately.
    fn check_exposure(&self) -> Result<(), String> {
        let ip = self.listen_addr.ip();
        if ip.is_loopback() || self.insecure {
            return Ok(());
        }
        if self.tls_files().is_none() {
            return Err(format!(
                "refusing to serve {ip} without TLS: set --tls-cert and --tls-key (RTAP_TLS_CERT, RTAP_TLS_KEY), or --insecure to accept it"
            ));
        }
        if self.auth == Auth::None {
            return Err(format!(
                "refusing to serve {ip} without authentication: set --auth keys (RTAP_AUTH=keys), or --insecure to accept it"
            ));
        }
        Ok(())
    }

    /// The Kafka brokers and how to reach them (`--kafka-tls-ca`).
    pub fn kafka(&self) -> Result<crate::infra::kafka::Brokers, String> {
        let addrs = self.kafka_brokers.clone();
        match &self.kafka_tls_ca {
            Some(ca) => crate::infra::kafka::Brokers::tls(addrs, ca)
                .map_err(|e| format!("--kafka-tls-ca: {e}")),
            None => Ok(crate::infra::kafka::Brokers::plaintext(addrs)),
        }
    }

    /// This replica's name in resume tokens (`--replica-id`, or the host
    /// name and the port of `local_addr`).
    pub fn replica_id(&self, local_addr: Option<SocketAddr>) -> String {
        if let Some(id) = &self.replica_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "rtap".to_owned());
        let port = local_addr.map_or(self.listen_addr.port(), |addr| addr.port());
        format!("{host}:{port}")
    }

    /// The limits on callers.
    pub fn limit_settings(&self) -> crate::auth::LimitSettings {
        crate::auth::LimitSettings {
            calls_per_second: self.max_calls_per_second,
            events_per_second: self.max_events_per_second,
            subscriptions_per_caller: self.max_subscriptions_per_caller,
            subscriptions: self.max_subscriptions,
        }
    }

    /// How `watch` and `health` reach the server.
    pub fn client_settings(&self) -> rtap::client::ClientSettings {
        rtap::client::ClientSettings {
            api_key: self.api_key.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_server_name: self.tls_server_name.clone(),
            tls_identity: self
                .tls_client_cert
                .clone()
                .zip(self.tls_client_key.clone()),
        }
    }

    /// The gRPC port's TLS files, when it serves TLS.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

/// Namespaces end up inside Redis Cluster hash tags, so braces and spaces are
/// ruled out.
fn parse_namespace(text: &str) -> Result<String, String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if text.is_empty() || text.len() > 64 || !text.chars().all(legal) {
        return Err("a namespace is 1 to 64 characters of a-z, A-Z, 0-9, '.', '_', '-'".into());
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("rtap-server").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_serve_on_loopback() {
        let cli = parse(&[]).expect("defaults parse");
        assert_eq!(cli.command, None);
        assert_eq!(cli.config.listen_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(cli.config.kafka_brokers, vec!["127.0.0.1:9092".to_owned()]);
        assert_eq!(cli.config.metrics_addr.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn the_dashboard_is_served_unless_turned_off() {
        assert!(parse(&[]).expect("defaults parse").config.dashboard);
        let off = parse(&["--dashboard", "false"]).expect("parses");
        assert!(!off.config.dashboard);
        assert!(parse(&["--dashboard", "maybe"]).is_err());
    }

    #[test]
    fn metrics_can_be_served_elsewhere_or_not_at_all() {
        let off = parse(&["--metrics-addr", "off"]).expect("parses");
        assert_eq!(off.config.metrics_addr, rtap::telemetry::MetricsAddr(None));
        let any = parse(&["--metrics-addr", "0.0.0.0:9100"]).expect("parses");
        assert_eq!(any.config.metrics_addr.to_string(), "0.0.0.0:9100");
        let error = parse(&["--metrics-addr", "localhost"]).expect_err("no port");
        assert!(error.to_string().contains("`off`"), "{error}");
    }

    #[test]
    fn flags_after_the_subcommand_are_accepted() {
        let cli = parse(&["migrate", "--database-url", "postgres://x/y"]).expect("parses");
        assert_eq!(cli.command, Some(Command::Migrate));
        assert_eq!(cli.config.database_url, "postgres://x/y");
    }

    #[test]
    fn broker_lists_split_on_commas() {
        let cli = parse(&["--kafka-brokers", "a:1,b:2"]).expect("parses");
        assert_eq!(
            cli.config.kafka_brokers,
            vec!["a:1".to_owned(), "b:2".to_owned()]
        );
    }

    #[test]
    fn serving_beyond_loopback_needs_authentication_or_insecure() {
        let config = |args: &[&str]| parse(args).expect("parses").config;
        assert_eq!(config(&[]).validate(), Ok(()));
        let exposed = config(&["--listen-addr", "0.0.0.0:50051"]).validate();
        assert!(exposed.is_err_and(|e| e.contains("--tls-cert") && e.contains("--insecure")));
        let exposed = config(&[
            "--listen-addr",
            "0.0.0.0:50051",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ])
        .validate();
        assert!(exposed.is_err_and(|e| e.contains("--auth keys") && e.contains("--insecure")));
        let secured = config(&[
            "--listen-addr",
            "0.0.0.0:50051",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--auth",
            "keys",
        ]);
        assert_eq!(secured.validate(), Ok(()));
        let insecure = config(&["--listen-addr", "0.0.0.0:50051", "--insecure"]);
        assert_eq!(insecure.validate(), Ok(()));
    }

    #[test]
    fn a_key_role_after_keys_create_is_not_the_process_role() {
        let cli = parse(&[
            "--role", "api", "keys", "create", "--name", "a", "--role", "reader",
        ])
        .expect("parses");
        assert_eq!(cli.config.role, Role::Api);
        assert_eq!(
            cli.command,
            Some(Command::Keys {
                action: KeysAction::Create {
                    name: "a".into(),
                    role: crate::auth::AccessRole::Reader
                }
            })
        );
    }

    #[test]
    fn invalid_values_are_rejected_with_the_flag_named() {
        for args in [
            &["--events-topic", "bad topic"][..],
            &["--redis-namespace", "a{b}"],
            &["--health-check-interval", "0s"],
            &["--health-check-interval", "soon"],
            &["--listen-addr", "nowhere"],
            &["--log-format", "xml"],
            &["--kafka-brokers", "localhost"],
            &["--kafka-brokers", "a:1,"],
        ] {
            let error = parse(args).expect_err("must be rejected");
            assert!(error.to_string().contains(args[0]), "{error}");
        }
    }
}
