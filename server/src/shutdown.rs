//! Turns SIGINT and SIGTERM into a cancellation every task watches.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// Cancels `shutdown` on the first SIGINT or SIGTERM. Installing the handlers
/// happens before this returns, so a signal that arrives during start-up is
/// not lost.
pub fn cancel_on_signal(shutdown: CancellationToken) -> Result<(), Error> {
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|source| Error::Io {
            context: format!("cannot install the {name} handler"),
            source,
        })
    };
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT")?;
    let mut terminate = install(SignalKind::terminate(), "SIGTERM")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
        shutdown.cancel();
    });
    Ok(())
}
