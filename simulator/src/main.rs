//! The `rtap-simulator` binary.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use rtap_simulator::{config::SimulatorConfig, run};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Every record is a few small allocations freed on another thread once
/// produced; mimalloc handles that pattern far better than glibc's malloc,
/// whose slow path for memory freed by another thread took a large share
/// of the simulator's CPU time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = SimulatorConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rskafka=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        if let Err(error) = stop_on_signals(shutdown.clone()) {
            tracing::error!(error = %error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        if let Some(addr) = config.metrics_addr.0 {
            match serve_metrics(addr, shutdown.clone()).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::error!(error = %error, "cannot serve metrics");
                    return ExitCode::FAILURE;
                }
            }
        }
        match run::run(config, shutdown).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %error, "simulation failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Serves `/metrics` on `addr` until `shutdown`.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), rtap::telemetry::TelemetryError> {
    let handle = rtap_simulator::telemetry::install()?;
    let listener = rtap::telemetry::bind(addr).await?;
    tracing::info!(addr = %addr, "metrics served on /metrics");
    tokio::spawn(async move {
        let stopping = shutdown.cancelled_owned();
        if let Err(error) = rtap::telemetry::serve(listener, handle, stopping).await {
            tracing::error!(error = %error, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// First SIGINT/SIGTERM: stop generating, flush, report. Second: exit now.
fn stop_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("stopping: flushing buffered events (interrupt again to quit at once)");
        shutdown.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::warn!("interrupted again: quitting without flushing");
        std::process::exit(130);
    });
    Ok(())
}
