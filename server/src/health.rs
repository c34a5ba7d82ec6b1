//! Background checks of PostgreSQL, Redis and Kafka that drive the
//! `grpc.health.v1` service. Checks run on a timer, never per request, so a
//! health probe costs nothing and always answers at once.
//!
//! Each watched service (listed by [`crate::app`]) is SERVING while the
//! dependencies it needs are up.
//!
//! A dependency that answered is reported down only after
//! [`FAILURES_TO_REPORT_DOWN`] checks in a row failed: one slow answer on a
//! loaded machine is no evidence of an outage, and a load balancer must not
//! pull a healthy instance for it. One success reports it up again.

use std::{sync::Arc, time::Duration};

use rskafka::client::Client as KafkaClient;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    database::Database,
    infra::{
        kafka::{self, Brokers},
        reconnect::Reconnecting,
    },
    store::nodes::Nodes,
};

/// Consecutive failed checks after which a dependency that was up is
/// reported down (with the default 5 s interval: 10 to 15 s of failures).
pub(crate) const FAILURES_TO_REPORT_DOWN: u32 = 3;

/// A dependency the server checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dependency {
    /// PostgreSQL, migrated.
    Postgres,
    /// Redis.
    Redis,
    /// The Kafka brokers.
    Kafka,
}

/// A service whose health status follows the dependencies it needs (the
/// server's are listed where it is assembled, so health knows no service).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Watched {
    /// The service's name in `grpc.health.v1` (`""`: the whole server).
    pub(crate) service: &'static str,
    /// SERVING while each of these is up.
    pub(crate) needs: &'static [Dependency],
}

/// Whether each dependency answered its last check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DependencyStatus {
    /// PostgreSQL answered and the schema is migrated.
    pub(crate) postgres: bool,
    /// Redis answered PING (every primary, on a cluster).
    pub(crate) redis: bool,
    /// A Kafka broker returned cluster metadata.
    pub(crate) kafka: bool,
}

impl DependencyStatus {
    fn is_up(self, dependency: Dependency) -> bool {
        match dependency {
            Dependency::Postgres => self.postgres,
            Dependency::Redis => self.redis,
            Dependency::Kafka => self.kafka,
        }
    }

    fn serves(self, watched: &Watched) -> bool {
        watched.needs.iter().all(|needed| self.is_up(*needed))
    }
}

/// Sets every status to NOT_SERVING: before the first check, and at shutdown.
pub(crate) async fn report_not_serving(reporter: &HealthReporter, watched: &[Watched]) {
    for service in watched {
        reporter
            .set_service_status(service.service, ServingStatus::NotServing)
            .await;
    }
}

/// Checks the dependencies. Holds its connections between checks, and drops
/// one after a failure so the next check reconnects.
pub(crate) struct DependencyProbe {
    database: Database,
    redis: Nodes,
    kafka: Reconnecting<Arc<KafkaClient>, rskafka::client::error::Error>,
    timeout: Duration,
}

impl DependencyProbe {
    /// A probe whose every call is bounded by `timeout`.
    pub(crate) fn new(
        database: Database,
        redis: Nodes,
        kafka_brokers: Brokers,
        timeout: Duration,
    ) -> Self {
        Self {
            database,
            redis,
            kafka: Reconnecting::new(move || {
                let brokers = kafka_brokers.clone();
                async move { kafka::client(&brokers, timeout).await.map(Arc::new) }
            }),
            timeout,
        }
    }

    /// Runs the three checks concurrently.
    pub(crate) async fn check(&self) -> (DependencyStatus, Vec<(&'static str, String)>) {
        let timeout = self.timeout;
        let postgres = async {
            self.database.ping(timeout).await?;
            if self.database.schema_ready() {
                Ok(())
            } else {
                Err("schema migrations not applied yet".to_owned())
            }
        };
        let redis = bounded(timeout, self.redis.ping());
        let kafka = bounded(timeout, async {
            let client = self.kafka.get().await?;
            let listed = client.list_topics().await;
            if listed.is_err() {
                self.kafka.drop_connection().await;
            }
            listed.map(|_| ())
        });
        let (postgres, redis, kafka) = tokio::join!(postgres, redis, kafka);
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

/// `check` within `timeout`, its error as text.
async fn bounded<E: std::fmt::Display>(
    timeout: Duration,
    check: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
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
pub(crate) async fn monitor(
    probe: DependencyProbe,
    reporter: HealthReporter,
    watched: &'static [Watched],
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
        crate::telemetry::dependency_up("postgresql", status.postgres);
        crate::telemetry::dependency_up("redis", status.redis);
        crate::telemetry::dependency_up("kafka", status.kafka);
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
            for service in watched {
                let serving = if status.serves(service) {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status(service.service, serving).await;
            }
            previous = Some(status);
        }
    }
    report_not_serving(&reporter, watched).await;
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
