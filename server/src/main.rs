//! The `rtap-server` binary: parses flags, sets up logging, runs a subcommand.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use rtap_server::{
    Cli, Command, Config, Error, LogFormat, app, auth, database, infra, ingest::rebuild, shutdown,
    watch,
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.config.log_format);
    // One TLS provider for every rustls client and server in the process
    // (the gRPC port, rediss://, PostgreSQL), whatever features the
    // dependencies enable.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
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
    let result = runtime.block_on(run(cli.command.unwrap_or(Command::Serve), cli.config));
    // `run` kept to its grace period; a blocking call that outlived it (a
    // name resolution, say) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "rtap-server failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> Result<(), Error> {
    match command {
        Command::Migrate => database::migrate_once(&config).await,
        Command::Keys { action } => {
            let db = database::connect_migrated(&config).await?;
            auth::manage_keys(&db, action).await
        }
        Command::Health => infra::client::probe_server(&config).await,
        Command::Watch => {
            let shutdown = CancellationToken::new();
            shutdown::cancel_on_signal(shutdown.clone())?;
            watch::run(&config, shutdown).await
        }
        Command::Rebuild => {
            let shutdown = CancellationToken::new();
            shutdown::cancel_on_signal(shutdown.clone())?;
            rebuild::run(&config, shutdown).await
        }
        Command::Serve => {
            let shutdown = CancellationToken::new();
            shutdown::cancel_on_signal(shutdown.clone())?;
            let listener = app::bind(&config).await?;
            app::serve(config, listener, shutdown).await
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rskafka=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
