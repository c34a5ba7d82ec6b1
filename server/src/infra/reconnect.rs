//! A connection made on first use, shared while it works, and dropped after
//! a failure so that the next use connects afresh.

use std::{future::Future, pin::Pin};

use tokio::sync::Mutex;

type Connect<T, E> =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<T, E>> + Send>> + Send + Sync>;

/// A lazily made, replaceable connection of type `T` (cheap to clone: a
/// multiplexed Redis connection, an `Arc` of a Kafka client).
///
/// Callers that fail on a connection call [`Reconnecting::drop_connection`];
/// concurrent callers wait for one connection attempt rather than each
/// making their own.
pub(crate) struct Reconnecting<T, E> {
    connect: Connect<T, E>,
    slot: Mutex<Option<T>>,
}

impl<T: Clone, E> Reconnecting<T, E> {
    /// Connects with `connect` on first use and after every drop.
    pub(crate) fn new<F, Fut>(connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        Self {
            connect: Box::new(move || Box::pin(connect())),
            slot: Mutex::new(None),
        }
    }

    /// The connection, made now if there is none.
    pub(crate) async fn get(&self) -> Result<T, E> {
        let mut slot = self.slot.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = (self.connect)().await?;
        Ok(slot.insert(connection).clone())
    }

    /// Forgets the connection after a failure: the next [`Reconnecting::get`]
    /// connects again.
    pub(crate) async fn drop_connection(&self) {
        *self.slot.lock().await = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn connects_once_until_dropped_and_again_after() {
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = attempts.clone();
        let connection: Reconnecting<u32, String> = Reconnecting::new(move || {
            let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(attempt) }
        });
        assert_eq!(connection.get().await, Ok(1));
        assert_eq!(connection.get().await, Ok(1));
        connection.drop_connection().await;
        assert_eq!(connection.get().await, Ok(2));
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_attempt_keeps_nothing() {
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = attempts.clone();
        let connection: Reconnecting<u32, String> = Reconnecting::new(move || {
            let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if attempt == 1 {
                    Err("refused".to_owned())
                } else {
                    Ok(attempt)
                }
            }
        });
        assert_eq!(connection.get().await, Err("refused".to_owned()));
        assert_eq!(connection.get().await, Ok(2));
    }
}
