//! The catalog database: a lazily connected PostgreSQL pool, and the schema
//! migrations that must be applied before the catalog serves.

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database as SeaDatabase, DatabaseConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    error::{Error, is_connection_error},
    retry::{Backoff, RECONNECT_MAX},
};

/// Largest number of pooled PostgreSQL connections one server holds.
const MAX_CONNECTIONS: u32 = 32;

/// A handle on the catalog database, cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Database {
    connection: DatabaseConnection,
    schema_ready: watch::Receiver<bool>,
}

/// Marks the schema as migrated once migrations succeed.
#[derive(Debug)]
pub(crate) struct SchemaGate(watch::Sender<bool>);

impl Database {
    /// Creates the pool without connecting, so the server can start (and
    /// report NOT_SERVING) while PostgreSQL is down. Fails only on an invalid
    /// URL.
    pub(crate) async fn connect_lazy(config: &Config) -> Result<(Self, SchemaGate), Error> {
        let connection = open_pool(config, true).await?;
        let (ready_tx, schema_ready) = watch::channel(false);
        Ok((
            Self {
                connection,
                schema_ready,
            },
            SchemaGate(ready_tx),
        ))
    }

    /// The pool, for queries. Fails with UNAVAILABLE until the schema is
    /// migrated, so no RPC runs against a half-built schema.
    pub(crate) fn connection(&self) -> Result<&DatabaseConnection, Error> {
        if *self.schema_ready.borrow() {
            Ok(&self.connection)
        } else {
            Err(Error::Unavailable {
                dependency: "database",
                reason: "schema migrations have not been applied yet".into(),
            })
        }
    }

    /// Whether migrations have been applied.
    pub(crate) fn schema_ready(&self) -> bool {
        *self.schema_ready.borrow()
    }

    /// Round trip to PostgreSQL, bounded by `timeout`.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.connection.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Applies pending migrations, retrying with backoff while PostgreSQL is
    /// unreachable, until they succeed or `shutdown` fires.
    pub(crate) async fn migrate_until_ready(&self, gate: SchemaGate, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), RECONNECT_MAX);
        loop {
            match Migrator::up(&self.connection, None).await {
                Ok(()) => {
                    tracing::info!("database schema is up to date");
                    gate.0.send_replace(true);
                    return;
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    let unreachable = is_connection_error(&error);
                    tracing::warn!(
                        error = %error,
                        unreachable,
                        retry_in = ?delay,
                        "cannot apply database migrations yet"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// `rtap-server migrate`: one attempt, with a clear error if it fails.
pub async fn migrate_once(config: &Config) -> Result<(), Error> {
    connect_migrated(config).await.map(drop)
}

/// A connection to the database with its schema up to date (one attempt),
/// for one-off commands such as `rtap-server keys`.
pub async fn connect_migrated(config: &Config) -> Result<DatabaseConnection, Error> {
    let connection = open_pool(config, false).await?;
    Migrator::up(&connection, None).await?;
    tracing::debug!("database schema is up to date");
    Ok(connection)
}

/// The server's pool settings for `url`, waiting at most `timeout` to
/// connect or for a free connection (also used by the catalog benchmark).
pub fn pool_options(url: String, timeout: Duration) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(MAX_CONNECTIONS)
        .min_connections(0)
        .connect_timeout(timeout)
        .acquire_timeout(timeout)
        // No ping round trip before every query (it halved GetUser
        // throughput); a connection broken by a database restart fails one
        // call with UNAVAILABLE and is then replaced.
        .test_before_acquire(false)
        .sqlx_logging(false);
    options
}

async fn open_pool(config: &Config, lazy: bool) -> Result<DatabaseConnection, Error> {
    let mut options = pool_options(config.database_url.clone(), config.dependency_timeout);
    options.connect_lazy(lazy);
    SeaDatabase::connect(options).await.map_err(|error| {
        if lazy {
            Error::Config(format!(
                "DATABASE_URL is not a valid PostgreSQL URL: {error}"
            ))
        } else {
            Error::Database(error)
        }
    })
}
