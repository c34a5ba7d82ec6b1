//! Look-ups by id, coalesced: concurrent `Get` calls for rows of one table
//! share one `SELECT ... WHERE id IN (...)`.
//!
//! A primary-key look-up costs PostgreSQL far less than the round trip
//! around it, and sqlx adds a second round trip (a `Sync` ping) every time a
//! connection goes back to its pool. So one query per table runs at a time,
//! and callers that arrive meanwhile wait and join the next one, up to
//! [`MAX_BATCH`] ids. A lone caller's query starts at once: nothing waits for
//! a batch to fill. (Measured with the `catalog_get` bench at 16 callers:
//! one query at a time served more calls than two or three, which split the
//! waiting callers into smaller batches.)
//!
//! A query is sent only after every caller in its batch has arrived, so a
//! caller sees every write that finished before its call. The cost: while
//! the database is unreachable, a caller may wait for the query ahead of it
//! to fail before its own is tried, so UNAVAILABLE can take up to twice
//! `--dependency-timeout`.

use std::collections::HashMap;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::sync::{mpsc, oneshot};

use crate::{
    database::Database,
    error::{Error, is_connection_error},
};

/// Most ids in one query.
const MAX_BATCH: usize = 256;
/// Callers that may wait for a query before `get` waits to enqueue.
const QUEUE: usize = 4096;

/// What a caller gets back: the row, or `None` if there is no such id.
type Reply<M> = Result<Option<M>, Error>;

struct Waiting<M> {
    id: i64,
    reply: oneshot::Sender<Reply<M>>,
}

/// Coalesces look-ups by id of one entity. Cheap to clone; the batching task
/// ends when the last clone is dropped.
pub struct Lookup<E: EntityTrait> {
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
    pub fn start(database: Database, id_column: E::Column, id_of: fn(&E::Model) -> i64) -> Self {
        let (requests, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(
            Batcher::<E> {
                database,
                id_column,
                id_of,
                receiver,
            }
            .run(),
        );
        Self { requests }
    }

    /// The row with this id, if any.
    pub async fn get(&self, id: i64) -> Result<Option<E::Model>, Error> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Waiting { id, reply })
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
    id_column: E::Column,
    id_of: fn(&E::Model) -> i64,
    receiver: mpsc::Receiver<Waiting<E::Model>>,
}

impl<E> Batcher<E>
where
    E: EntityTrait,
    E::Model: Send + Sync + Clone + 'static,
{
    async fn run(mut self) {
        while let Some(first) = self.receiver.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.receiver.try_recv() {
                    Ok(waiting) => batch.push(waiting),
                    Err(_) => break,
                }
            }
            self.query(batch).await;
        }
    }

    /// Looks up the batch's ids in one query and answers each caller.
    async fn query(&self, batch: Vec<Waiting<E::Model>>) {
        let mut ids: Vec<i64> = batch.iter().map(|waiting| waiting.id).collect();
        ids.sort_unstable();
        ids.dedup();
        // A caller that gave up no longer listens: its reply is dropped.
        match find::<E>(&self.database, self.id_column, ids).await {
            Ok(rows) => {
                let by_id: HashMap<i64, E::Model> = rows
                    .into_iter()
                    .map(|row| ((self.id_of)(&row), row))
                    .collect();
                for waiting in batch {
                    let _ = waiting.reply.send(Ok(by_id.get(&waiting.id).cloned()));
                }
            }
            Err(error) => {
                for waiting in batch {
                    let _ = waiting.reply.send(Err(copy_for_caller(&error)));
                }
            }
        }
    }
}

async fn find<E: EntityTrait>(
    database: &Database,
    id_column: E::Column,
    ids: Vec<i64>,
) -> Result<Vec<E::Model>, Error> {
    Ok(E::find()
        .filter(id_column.is_in(ids))
        .all(database.connection()?)
        .await?)
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
