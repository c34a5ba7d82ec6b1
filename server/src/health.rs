//! Background checks of PostgreSQL, Redis and Kafka that drive the
//! `grpc.health.v1` service. Checks run on a timer, never per request, so a
//! health probe costs nothing and always answers at once.
//!
//! Statuses reported:
//! - `""` (the whole server): SERVING only while all three dependencies are
//!   reachable and the schema is migrated;
//! - `rtap.v1.UserService`, `rtap.v1.ProductService`: PostgreSQL reachable and
//!   migrated;
//! - `rtap.v1.AnalyticsService`: Redis reachable;
//! - `rtap.v1.IngestService`: Kafka reachable.
//!
//! A dependency that answered is reported down only after
//! [`FAILURES_TO_REPORT_DOWN`] checks in a row failed: one slow answer on a
//! loaded machine is no evidence of an outage, and a load balancer must not
//! pull a healthy instance for it. One success reports it up again.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use rskafka::{
    BackoffConfig,
    client::{Client as KafkaClient, ClientBuilder},
};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    analytics::AnalyticsServer, catalog::ProductServer, catalog::UserServer, config::Config,
    database::Database, error::Error, ingest::IngestServer,
};

/// Consecutive failed checks after which a dependency that was up is
/// reported down (with the default 5 s interval: 10 to 15 s of failures).
pub const FAILURES_TO_REPORT_DOWN: u32 = 3;

/// Whether each dependency answered its last check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DependencyStatus {
    /// PostgreSQL answered and the schema is migrated.
    pub postgres: bool,
    /// Redis answered PING.
    pub redis: bool,
    /// A Kafka broker returned cluster metadata.
    pub kafka: bool,
}

impl DependencyStatus {
    fn statuses(self) -> [(&'static str, bool); 5] {
        [
            ("", self.postgres && self.redis && self.kafka),
            (UserServer::NAME, self.postgres),
            (ProductServer::NAME, self.postgres),
            (AnalyticsServer::NAME, self.redis),
            (IngestServer::NAME, self.kafka),
        ]
    }
}

/// Sets every status to NOT_SERVING: before the first check, and at shutdown.
pub async fn report_not_serving(reporter: &HealthReporter) {
    for (service, _) in DependencyStatus::default().statuses() {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}

/// Checks the dependencies. Holds its connections between checks, and drops
/// one after a failure so the next check reconnects.
pub struct DependencyProbe {
    database: Database,
    redis: redis::Client,
    redis_connection: Option<MultiplexedConnection>,
    kafka_brokers: Vec<String>,
    kafka: Option<KafkaClient>,
    timeout: Duration,
}

impl DependencyProbe {
    /// A probe whose every call is bounded by `timeout`.
    pub fn new(
        database: Database,
        redis: redis::Client,
        kafka_brokers: Vec<String>,
        timeout: Duration,
    ) -> Self {
        Self {
            database,
            redis,
            redis_connection: None,
            kafka_brokers,
            kafka: None,
            timeout,
        }
    }

    /// Runs the three checks concurrently.
    pub async fn check(&mut self) -> (DependencyStatus, Vec<(&'static str, String)>) {
        let timeout = self.timeout;
        let database = self.database.clone();
        let postgres = async move {
            database.ping(timeout).await?;
            if database.schema_ready() {
                Ok(())
            } else {
                Err("schema migrations not applied yet".to_owned())
            }
        };
        let (postgres, redis, kafka) = tokio::join!(
            postgres,
            check_redis(&self.redis, &mut self.redis_connection, timeout),
            check_kafka(&self.kafka_brokers, &mut self.kafka, timeout),
        );
        let mut failures = Vec::new();
        for (name, result) in [
            ("postgres", &postgres),
            ("redis", &redis),
            ("kafka", &kafka),
        ] {
            if let Err(reason) = result {
                failures.push((name, reason.clone()));
            }
        }
        let status = DependencyStatus {
            postgres: postgres.is_ok(),
            redis: redis.is_ok(),
            kafka: kafka.is_ok(),
        };
        (status, failures)
    }
}

async fn check_redis(
    client: &redis::Client,
    connection: &mut Option<MultiplexedConnection>,
    timeout: Duration,
) -> Result<(), String> {
    let result = tokio::time::timeout(timeout, async {
        let conn = match connection {
            Some(conn) => conn,
            None => connection.insert(client.get_multiplexed_async_connection().await?),
        };
        redis::cmd("PING").query_async::<String>(conn).await
    })
    .await;
    let outcome = match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    if outcome.is_err() {
        *connection = None;
    }
    outcome
}

async fn check_kafka(
    brokers: &[String],
    client: &mut Option<KafkaClient>,
    timeout: Duration,
) -> Result<(), String> {
    let result = tokio::time::timeout(timeout, async {
        let kafka = match client {
            Some(kafka) => kafka,
            None => client.insert(kafka_client(brokers, timeout).await?),
        };
        kafka.list_topics().await.map(|_| ())
    })
    .await;
    let outcome = match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    if outcome.is_err() {
        *client = None;
    }
    outcome
}

/// An rskafka client whose retries give up after `deadline`: rskafka retries
/// forever without one, which would turn a broker outage into a silent hang.
pub async fn kafka_client(
    brokers: &[String],
    deadline: Duration,
) -> Result<KafkaClient, rskafka::client::error::Error> {
    ClientBuilder::new(brokers.to_vec())
        .client_id("rtap-server")
        .backoff_config(BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
            deadline: Some(deadline),
        })
        .build()
        .await
}

/// What is reported of the dependencies, from the checks' outcomes: up at
/// the first success, down at the start and after
/// [`FAILURES_TO_REPORT_DOWN`] failures in a row.
#[derive(Debug, Default)]
struct Evidence {
    reported: DependencyStatus,
    failures: [u32; 3],
}

impl Evidence {
    fn observe(&mut self, checked: DependencyStatus) -> DependencyStatus {
        let reported = [
            &mut self.reported.postgres,
            &mut self.reported.redis,
            &mut self.reported.kafka,
        ];
        let answered = [checked.postgres, checked.redis, checked.kafka];
        for ((reported, answered), failures) in
            reported.into_iter().zip(answered).zip(&mut self.failures)
        {
            if answered {
                *failures = 0;
                *reported = true;
            } else {
                *failures = failures.saturating_add(1);
                if *failures >= FAILURES_TO_REPORT_DOWN {
                    *reported = false;
                }
            }
        }
        self.reported
    }
}

/// Checks the dependencies every `interval` and publishes the statuses until
/// `shutdown`, then reports NOT_SERVING. Logs only transitions, so a long
/// outage is one warning, not one per check.
pub async fn monitor(
    mut probe: DependencyProbe,
    reporter: HealthReporter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<DependencyStatus> = None;
    let mut evidence = Evidence::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let (checked, failures) = tokio::select! {
            () = shutdown.cancelled() => break,
            checked = probe.check() => checked,
        };
        if checked != evidence.reported {
            for (dependency, reason) in &failures {
                tracing::debug!(dependency, reason = %reason, "dependency check failed");
            }
        }
        let status = evidence.observe(checked);
        if previous != Some(status) {
            for (dependency, reason) in &failures {
                tracing::warn!(dependency, reason = %reason, "dependency unreachable");
            }
            tracing::info!(
                postgres = status.postgres,
                redis = status.redis,
                kafka = status.kafka,
                "dependency status changed"
            );
            for (service, up) in status.statuses() {
                let serving = if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status(service, serving).await;
            }
            previous = Some(status);
        }
    }
    report_not_serving(&reporter).await;
}

/// A channel to the server at `--listen-addr` (loopback when it listens on
/// every address), each call bounded by `call_timeout` when given.
pub async fn server_channel(
    config: &Config,
    call_timeout: Option<Duration>,
) -> Result<(tonic::transport::Channel, std::net::SocketAddr), Error> {
    let mut addr = config.listen_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Config(format!("invalid listen address {addr}: {e}")))?
        .connect_timeout(config.dependency_timeout);
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let channel = endpoint.connect().await.map_err(|e| Error::Unavailable {
        dependency: "rtap-server",
        reason: format!(
            "cannot connect to {addr} (is rtap-server running? set --listen-addr): {e}"
        ),
    })?;
    Ok((channel, addr))
}

/// `rtap-server health`: asks the server at `config.listen_addr` (an
/// unspecified address means this machine) for its overall health and fails
/// unless it is SERVING.
pub async fn probe_server(config: &Config) -> Result<(), Error> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let (channel, addr) = server_channel(config, Some(config.dependency_timeout)).await?;
    let unavailable = |reason: String| Error::Unavailable {
        dependency: "rtap-server",
        reason,
    };
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|e| unavailable(format!("health check at {addr} failed: {e}")))?
        .into_inner()
        .status();
    if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
        tracing::info!(%addr, "SERVING");
        Ok(())
    } else {
        Err(unavailable(format!(
            "{addr} reports {}",
            status.as_str_name()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: DependencyStatus = DependencyStatus {
        postgres: true,
        redis: true,
        kafka: true,
    };

    #[test]
    fn a_dependency_is_reported_down_only_after_failures_in_a_row() {
        let mut evidence = Evidence::default();
        assert_eq!(
            evidence.observe(DependencyStatus::default()),
            DependencyStatus::default()
        );
        assert_eq!(evidence.observe(UP), UP);
        let redis_failed = DependencyStatus { redis: false, ..UP };
        for _ in 1..FAILURES_TO_REPORT_DOWN {
            assert_eq!(evidence.observe(redis_failed), UP);
        }
        assert_eq!(evidence.observe(redis_failed), redis_failed);
        assert_eq!(evidence.observe(UP), UP);
        // A blip between successes never reports down.
        assert_eq!(evidence.observe(redis_failed), UP);
        assert_eq!(evidence.observe(UP), UP);
        assert_eq!(evidence.observe(redis_failed), UP);
    }
}
