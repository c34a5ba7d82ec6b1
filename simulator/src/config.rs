//! The simulator's flags, each with an environment fallback.

use std::{path::PathBuf, time::Duration};

use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};

use crate::model::{ModelParams, params::parse_positive};

/// `rtap-simulator [FLAGS]`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "rtap-simulator",
    version,
    about = "Produces realistic user-interaction events (rtap.v1.InteractionEvent) to Kafka"
)]
pub struct SimulatorConfig {
    /// Kafka bootstrap brokers, comma-separated `host:port`.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        value_delimiter = ',',
        value_parser = rtap::kafka::parse_broker
    )]
    pub kafka_brokers: Vec<String>,

    /// Topic to produce to; created if missing.
    #[arg(
        long,
        env = "RTAP_EVENTS_TOPIC",
        default_value = "rtap.interactions",
        value_parser = rtap::kafka::parse_topic
    )]
    pub topic: String,

    /// Partitions of the topic when the simulator creates it.
    #[arg(long, env = "RTAP_SIM_PARTITIONS", default_value_t = 4,
          value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub partitions: i32,

    /// Events per second, paced smoothly; unpaced (as fast as the broker
    /// takes them) when omitted.
    #[arg(long, env = "RTAP_SIM_RATE", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Stop after this many records (events, duplicates and malformed
    /// payloads together), then exit.
    #[arg(long, env = "RTAP_SIM_COUNT")]
    pub count: Option<u64>,

    /// Stop after this long (for example `10m`).
    #[arg(long, env = "RTAP_SIM_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Seed of the random generator. The same seed, flags and `--start-time`
    /// produce the same events in the same order. Random when omitted (and
    /// logged, so a run can be replayed).
    #[arg(long, env = "RTAP_SIM_SEED")]
    pub seed: Option<u64>,

    /// Event time of the first event (RFC 3339); now when omitted.
    #[arg(long, env = "RTAP_SIM_START_TIME")]
    pub start_time: Option<DateTime<Utc>>,

    /// Simulated seconds per real second: 1440 produces a day of traffic in a
    /// minute.
    #[arg(long, env = "RTAP_SIM_SPEEDUP", default_value_t = 1.0, value_parser = parse_positive)]
    pub speedup: f64,

    /// RTAP server to take user and product ids from (for example
    /// `http://127.0.0.1:50051`). Without it, or when it cannot be reached,
    /// synthetic ids are used.
    #[arg(long, env = "RTAP_SERVER_ADDR")]
    pub server_addr: Option<String>,

    /// API key presented to `--server-addr` (`authorization: Bearer`);
    /// listing needs a `reader` key, seeding an `admin` key.
    #[arg(long, env = "RTAP_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Connect to `--server-addr` with TLS, trusting server certificates
    /// that chain to this PEM CA.
    #[arg(long, env = "RTAP_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// The name the server's certificate must carry (default: the host of
    /// `--server-addr`).
    #[arg(long, env = "RTAP_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// Create this many users through the server's UserService first.
    #[arg(long, default_value_t = 0)]
    pub seed_users: u32,

    /// Create this many products through the server's ProductService first.
    #[arg(long, default_value_t = 0)]
    pub seed_products: u32,

    /// Synthetic users (ids 1..=N) when no catalog is used. A user has one
    /// session at a time, and waits a session gap before the next, so high
    /// rates need many users (about 1,000 per event/s with the default
    /// session gap).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub users: u32,

    /// Synthetic products (ids 1..=N) when no catalog is used.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub products: u32,

    /// Behaviour of the simulated users.
    #[command(flatten)]
    pub model: ModelParams,

    /// Record compression. The test broker (Nisshi) rejects some codecs.
    #[arg(long, env = "RTAP_SIM_COMPRESSION", value_enum, default_value_t = CompressionArg::None)]
    pub compression: CompressionArg,

    /// Records in one produce request, at most.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Records waiting per partition before the generator blocks (the bound
    /// on buffered data), rounded down to whole batches (at least one).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub buffer_per_partition: u32,

    /// On shutdown, how long to keep trying to deliver buffered records.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub flush_timeout: Duration,

    /// Write the ground truth of what was produced to this JSON file.
    #[arg(long, env = "RTAP_SIM_TRUTH_FILE")]
    pub truth_file: Option<PathBuf>,

    /// Address `/metrics` is served on (Prometheus text format, plain
    /// HTTP); `off` serves none.
    #[arg(long, env = "RTAP_SIM_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    pub metrics_addr: rtap::telemetry::MetricsAddr,

    /// Progress display: a bar on a terminal, log lines otherwise.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

/// Compression codecs offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// No compression.
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
}

impl From<CompressionArg> for rskafka::client::partition::Compression {
    fn from(value: CompressionArg) -> Self {
        match value {
            CompressionArg::None => Self::NoCompression,
            CompressionArg::Gzip => Self::Gzip,
            CompressionArg::Snappy => Self::Snappy,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    /// A bar when standard error is a terminal, log lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// Always log lines.
    Log,
    /// Nothing but the final summary.
    None,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate = parse_positive(text)?;
    if rate > 10_000_000.0 {
        return Err("at most 10000000 events per second".into());
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<SimulatorConfig, clap::Error> {
        SimulatorConfig::try_parse_from(
            std::iter::once("rtap-simulator").chain(args.iter().copied()),
        )
    }

    #[test]
    fn defaults_parse() {
        let config = parse(&[]).expect("defaults");
        assert_eq!(config.partitions, 4);
        assert_eq!(config.rate, None);
    }

    #[test]
    fn bad_values_name_their_flag() {
        for args in [
            &["--rate", "0"][..],
            &["--rate", "fast"],
            &["--speedup", "0"],
            &["--duplicate-share", "1.5"],
            &["--malformed-share", "NaN"],
            &["--partitions", "0"],
            &["--product-zipf-exponent", "0"],
            &["--start-time", "yesterday"],
            &["--compression", "zstd"],
        ] {
            let error = parse(args).expect_err("must be rejected");
            assert!(error.to_string().contains(args[0]), "{error}");
        }
    }
}
