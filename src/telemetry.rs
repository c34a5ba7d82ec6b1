//! The Prometheus side of RTAP's binaries: one recorder per process behind
//! the `metrics` facade, and `/metrics` in the Prometheus text format on an
//! address of its own.
//!
//! Recording is an atomic add on a handle the caller keeps (or a hash
//! look-up through the macros); histograms are drained into their buckets
//! by a periodic upkeep, never on the recording path.

use std::{future::Future, net::SocketAddr, sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub use metrics_exporter_prometheus::PrometheusHandle;

/// Upper bounds of every histogram whose name ends in `_seconds`: from half
/// a millisecond (a cached query) to ten seconds (a stalled dependency).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histograms are drained into their buckets when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The recorder could not be built or installed.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    /// Another `metrics` recorder was installed in this process first.
    #[error("another metrics recorder is installed in this process")]
    Taken,
    /// The metrics address could not be bound.
    #[error(
        "cannot serve metrics on {addr} (is another process using it? set --metrics-addr): {source}"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Where `/metrics` is served: an address, or nowhere (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        text.parse()
            .map(|addr| Self(Some(addr)))
            .map_err(|_| format!("expected host:port (an IP address) or `off`, got `{text}`"))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once: later calls, from servers started
/// in the same process by tests, get the same handle). Histograms whose
/// name ends in `_seconds` get [`SECONDS_BUCKETS`]; `histograms` gives the
/// buckets of the others, by full name.
pub fn install(
    histograms: &[(&'static str, &'static [f64])],
) -> Result<&'static PrometheusHandle, TelemetryError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let mut builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?;
    for (name, buckets) in histograms {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).into()), buckets)?;
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    // Two servers of one process racing here: the loser keeps the winner's.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle);
    }
    HANDLE.get().ok_or(TelemetryError::Taken)
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, TelemetryError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes, and
/// drains histograms every few seconds meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: &'static PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{http::header::CONTENT_TYPE, routing::get};
    let app = axum::Router::new().route(
        "/metrics",
        get(move || async move {
            handle.run_upkeep();
            (
                [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                handle.render(),
            )
        }),
    );
    let upkeep = async move {
        let mut ticker = tokio::time::interval(UPKEEP_EVERY);
        loop {
            ticker.tick().await;
            handle.run_upkeep();
        }
    };
    tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(shutdown) => served,
        () = upkeep => Ok(()),
    }
}
