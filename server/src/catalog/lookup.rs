//! Look-ups by id, coalesced: concurrent `Get` calls for rows of one table
//! share one `SELECT ... WHERE id = ANY($1)`.
//!
//! A primary-key look-up costs PostgreSQL far less than the round trip
//! around it. So one query per table runs at a time, and callers that arrive
//! meanwhile wait and join the next one, up to [`MAX_BATCH`] ids. A lone
//! caller's query starts at once: nothing waits for a batch to fill.
//! (Measured with the `catalog_get` bench at 16 callers: one query at a time
//! served more calls than two or three, which split the waiting callers into
//! smaller batches.)
//!
//! The batching task keeps one connection of its own, outside the pool:
//! sqlx sends a `Sync` ping and waits for its answer every time a
//! connection goes back to its pool, which doubled the round trips per
//! query. The statement is the same for any number of ids, so PostgreSQL
//! parses it once per connection. A connection that fails or times out is
//! dropped; one found closed when a query starts (database restarted) is
//! replaced at once and the query retried once.
//!
//! A query is sent only after every caller in its batch has arrived, so a
//! caller sees every write that finished before its call. The cost: while
//! the database is unreachable, a caller may wait for the query ahead of it
//! to fail before its own is tried, so UNAVAILABLE can take up to twice
//! `--dependency-timeout`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use sea_orm::{
    ConnAcquireErr, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryResult,
    QueryTrait, RuntimeErr,
    sea_query::{Expr, ExprTrait, extension::postgres::PgFunc},
    sqlx::{self, AssertSqlSafe, Connection as _, PgConnection, PgPool, SqlSafeStr, SqlStr},
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    database::Database,
    error::{Error, is_connection_error},
};

/// A batch takes no more look-ups once it holds this many ids.
const MAX_BATCH: usize = 256;
/// Callers that may wait for a query before `get` waits to enqueue.
const QUEUE: usize = 4096;
/// A look-up may take this many `--dependency-timeout`s on a working
/// connection (see `Batcher::find`).
const QUERY_TIMEOUTS: u32 = 3;
/// How long closing the connection at shutdown may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a caller gets back: the rows of its ids that exist.
type Reply<M> = Result<Vec<M>, Error>;

struct Waiting<M> {
    ids: Vec<i64>,
    reply: oneshot::Sender<Reply<M>>,
}

/// Coalesces look-ups by id of one entity. Cheap to clone; the batching task
/// ends when the last clone is dropped.
pub(crate) struct Lookup<E: EntityTrait> {
    requests: mpsc::Sender<Waiting<E::Model>>,
}

impl<E: EntityTrait> Clone for Lookup<E> {
    fn clone(&self) -> Self {
        Self {
            requests: self.requests.clone(),
        }
    }
}

impl<E: EntityTrait> std::fmt::Debug for Lookup<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookup")
            .field("table", &E::default().table_name())
            .finish_non_exhaustive()
    }
}

impl<E> Lookup<E>
where
    E: EntityTrait,
    E::Model: Send + Sync + Clone + 'static,
{
    /// Starts the batching task for the table of `E`, whose primary key is
    /// `id_column`, read back from a row by `id_of`. Needs a Tokio runtime.
    pub(crate) fn start(
        database: Database,
        id_column: E::Column,
        id_of: fn(&E::Model) -> i64,
    ) -> Self {
        let (requests, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(
            Batcher::<E> {
                database,
                select: select_by_ids::<E>(id_column),
                id_of,
                receiver,
                connection: None,
            }
            .run(),
        );
        Self { requests }
    }

    /// The row with this id, if any.
    pub(crate) async fn get(&self, id: i64) -> Result<Option<E::Model>, Error> {
        Ok(self.get_many(vec![id]).await?.into_iter().next())
    }

    /// The rows with these ids that exist, in one query (with whatever
    /// other look-ups it coalesces).
    pub(crate) async fn get_many(&self, ids: Vec<i64>) -> Result<Vec<E::Model>, Error> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Waiting { ids, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The batching task is gone: the server is shutting down.
fn stopped() -> Error {
    Error::Unavailable {
        dependency: "database",
        reason: "the look-up task has stopped (server shutting down)".into(),
    }
}

struct Batcher<E: EntityTrait> {
    database: Database,
    /// The entity's `SELECT`, for the ids bound to `$1`.
    select: SqlStr,
    id_of: fn(&E::Model) -> i64,
    receiver: mpsc::Receiver<Waiting<E::Model>>,
    /// Outside the pool; `None` until the first query, and after one
    /// failed.
    connection: Option<PgConnection>,
}

impl<E> Batcher<E>
where
    E: EntityTrait,
    E::Model: Send + Sync + Clone + 'static,
{
    async fn run(mut self) {
        while let Some(first) = self.receiver.recv().await {
            let mut ids = first.ids.len();
            let mut batch = vec![first];
            while ids < MAX_BATCH {
                match self.receiver.try_recv() {
                    Ok(waiting) => {
                        ids += waiting.ids.len();
                        batch.push(waiting);
                    }
                    Err(_) => break,
                }
            }
            self.query(batch).await;
        }
        // Every handle is gone: the server is stopping. Close the connection
        // properly, so PostgreSQL does not log an unexpected disconnect.
        if let Some(connection) = self.connection.take() {
            let closed = tokio::time::timeout(CLOSE_TIMEOUT, connection.close()).await;
            if !matches!(closed, Ok(Ok(()))) {
                tracing::debug!("the look-up connection did not close cleanly");
            }
        }
    }

    /// Looks up the batch's ids in one query and answers each caller.
    async fn query(&mut self, batch: Vec<Waiting<E::Model>>) {
        let mut ids: Vec<i64> = batch
            .iter()
            .flat_map(|waiting| waiting.ids.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        // A caller that gave up no longer listens: its reply is dropped.
        match self.find(&ids).await {
            Ok(rows) => {
                let by_id: HashMap<i64, E::Model> = rows
                    .into_iter()
                    .map(|row| ((self.id_of)(&row), row))
                    .collect();
                for waiting in batch {
                    let rows = waiting
                        .ids
                        .iter()
                        .filter_map(|id| by_id.get(id).cloned())
                        .collect();
                    let _ = waiting.reply.send(Ok(rows));
                }
            }
            Err(error) => {
                for waiting in batch {
                    let _ = waiting.reply.send(Err(copy_for_caller(&error)));
                }
            }
        }
    }

    /// The rows with these ids, over the batcher's own connection. The
    /// look-up is bounded by [`QUERY_TIMEOUTS`] times the pool's acquire
    /// timeout (`--dependency-timeout`): a connection attempt alone gets one
    /// timeout (a database that is down answers at once), but a query on a
    /// working connection can be slow on a loaded machine without PostgreSQL
    /// being down, and failing it made GetUser and GetProduct fail while
    /// ingest caught up on the same cores.
    async fn find(&mut self, ids: &[i64]) -> Result<Vec<E::Model>, Error> {
        let pool = self.database.connection()?.get_postgres_connection_pool();
        let timeout = pool.options().get_acquire_timeout();
        let found = tokio::time::timeout(
            timeout.saturating_mul(QUERY_TIMEOUTS),
            fetch(&mut self.connection, pool, timeout, &self.select, ids),
        )
        .await;
        let rows = match found {
            Ok(Ok(rows)) => rows,
            Ok(Err(error)) => {
                // Broken, or left mid-statement: never reuse it.
                self.connection = None;
                return Err(error.into());
            }
            Err(_) => {
                self.connection = None;
                return Err(DbErr::ConnectionAcquire(ConnAcquireErr::Timeout).into());
            }
        };
        rows.into_iter()
            .map(|row| Ok(E::Model::from_query_result(&QueryResult::from(row), "")?))
            .collect()
    }
}

/// Runs `select` for `ids` over `connection`, first opening one with the
/// settings of `pool` if there is none. A kept connection can have been
/// closed since its last query (database restarted, idle connection cut):
/// then the query is tried once more on a fresh one, as reading twice is
/// harmless.
async fn fetch(
    connection: &mut Option<PgConnection>,
    pool: &PgPool,
    connect_timeout: Duration,
    select: &SqlStr,
    ids: &[i64],
) -> Result<Vec<sqlx::postgres::PgRow>, DbErr> {
    if let Some(kept) = connection {
        match run(kept, select, ids).await {
            Err(error) if is_connection_error(&error) => *connection = None,
            result => return result,
        }
    }
    // A new connection, not one from the pool: after a restart, the pool's
    // idle connections are as dead as the one just dropped.
    let fresh = tokio::time::timeout(
        connect_timeout,
        PgConnection::connect_with(&pool.connect_options()),
    )
    .await
    .map_err(|_| DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))?
    .map_err(|error| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(error))))?;
    run(connection.insert(fresh), select, ids).await
}

async fn run(
    connection: &mut PgConnection,
    select: &SqlStr,
    ids: &[i64],
) -> Result<Vec<sqlx::postgres::PgRow>, DbErr> {
    sqlx::query(select.clone())
        .bind(ids)
        .fetch_all(connection)
        .await
        .map_err(|error| DbErr::Query(RuntimeErr::SqlxError(Arc::new(error))))
}

/// `SELECT <the entity's columns> FROM <its table> WHERE <id_column> =
/// ANY($1)`, built by SeaORM so that it reads every column as `find` does.
fn select_by_ids<E: EntityTrait>(id_column: E::Column) -> SqlStr {
    let sql = E::find()
        .filter(Expr::col((E::default(), id_column)).eq(PgFunc::any(Expr::cust("$1"))))
        .build(DbBackend::Postgres)
        .sql;
    AssertSqlSafe(Arc::<str>::from(sql)).into_sql_str()
}

/// The error of a batch's query, for each of its callers: the same status
/// code and message (errors that wrap a source cannot be cloned).
fn copy_for_caller(error: &Error) -> Error {
    match error {
        Error::Database(db) if is_connection_error(db) => {
            tracing::warn!(error = %db, "database unreachable");
            Error::Unavailable {
                dependency: "database",
                reason: "retry later".into(),
            }
        }
        Error::Unavailable { dependency, reason } => Error::Unavailable {
            dependency,
            reason: reason.clone(),
        },
        other => Error::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_select_reads_every_column_for_the_ids_bound_to_one_parameter() {
        let select = select_by_ids::<entity::user::Entity>(entity::user::Column::Id);
        assert_eq!(
            select.as_str(),
            r#"SELECT "users"."id", "users"."first_name", "users"."last_name", "users"."email", "users"."create_time", "users"."update_time" FROM "users" WHERE "users"."id" = ANY($1)"#
        );
    }
}
