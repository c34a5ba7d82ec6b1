//! The server's copy of the live keys, so a call never waits on
//! PostgreSQL: reloaded every `--auth-refresh-interval`, which bounds how
//! long a revoked key still works.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use sea_orm::DatabaseConnection;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{
    Principal,
    key::{self, SecretHash},
    policy::AccessRole,
    registry,
};
use crate::database::Database;

/// A live key as the cache holds it.
#[derive(Debug)]
struct KnownKey {
    principal: Principal,
    secret_hash: SecretHash,
    /// Unix seconds of the last call it authenticated since the last time
    /// that was recorded in PostgreSQL; 0 when none.
    last_use: AtomicI64,
}

/// Why a presented key authenticates nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The text cannot be a key.
    Malformed,
    /// No live key has this id and secret (unknown, revoked, or a wrong
    /// secret: the caller cannot tell which).
    Invalid,
    /// The keys have not been loaded yet.
    NotLoaded,
}

/// The live keys by key id.
type KeyMap = HashMap<String, Arc<KnownKey>>;

/// The live keys; `None` until the first load.
#[derive(Debug)]
pub(crate) struct KeyCache {
    keys: RwLock<Option<Arc<KeyMap>>>,
    /// Bumped by every reload that dropped a key, for open streams to look.
    dropped: watch::Sender<u64>,
}

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            keys: RwLock::default(),
            dropped: watch::Sender::new(0),
        }
    }
}

impl KeyCache {
    /// Whether the key `key_id` is live (as of the last reload).
    pub(crate) fn is_live(&self, key_id: &str) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|keys| keys.contains_key(key_id))
    }

    /// Completes once a reload finds the key `key_id` revoked.
    pub(crate) async fn revoked(self: Arc<Self>, key_id: Arc<str>) {
        let mut dropped = self.dropped.subscribe();
        while self.is_live(&key_id) {
            if dropped.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// `stream`, ended with UNAUTHENTICATED once `principal`'s key is
    /// revoked: a key is checked when a call starts, and a subscription
    /// lives on.
    pub(crate) fn end_on_revocation<T: Send + 'static>(
        self: &Arc<Self>,
        principal: &Principal,
        stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
        let revoked = Box::pin(self.clone().revoked(principal.key_id.clone()));
        futures_util::stream::unfold(
            (Box::pin(stream), Some(revoked)),
            |(mut stream, revoked)| async move {
                let mut revoked = revoked?;
                tokio::select! {
                    item = stream.next() => item.map(|item| (item, (stream, Some(revoked)))),
                    () = &mut revoked => Some((
                        Err(Status::unauthenticated("the API key of this subscription was revoked")),
                        (stream, None),
                    )),
                }
            },
        )
    }

    /// Who `text` (a key) authenticates.
    pub(crate) fn verify(&self, text: &str) -> Result<Principal, Refusal> {
        let (id, secret) = key::parse(text).ok_or(Refusal::Malformed)?;
        let keys = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(Refusal::NotLoaded)?;
        let presented = key::hash_secret(secret);
        let known = keys.get(id).ok_or(Refusal::Invalid)?;
        if !bool::from(known.secret_hash.ct_eq(&presented)) {
            return Err(Refusal::Invalid);
        }
        known
            .last_use
            .store(Utc::now().timestamp(), Ordering::Relaxed);
        Ok(known.principal.clone())
    }

    /// Records the keys' last uses, then reloads the live keys.
    pub(crate) async fn refresh(&self, db: &DatabaseConnection) -> Result<usize, sea_orm::DbErr> {
        let current = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(current) = &current {
            record_uses(db, current).await?;
        }
        let rows = registry::live(db).await?;
        let mut keys = HashMap::with_capacity(rows.len());
        for row in rows {
            let (Some(role), Ok(secret_hash)) = (
                AccessRole::from_name(&row.role),
                SecretHash::try_from(row.secret_hash.as_slice()),
            ) else {
                tracing::warn!(name = %row.name, "API key with an unknown role or hash ignored");
                continue;
            };
            // The same key keeps its entry, and so its unrecorded last use.
            let reused = current
                .as_ref()
                .and_then(|c| c.get(&row.key_id))
                .filter(|k| k.secret_hash == secret_hash && k.principal.role == role)
                .cloned();
            let known = reused.unwrap_or_else(|| {
                Arc::new(KnownKey {
                    principal: Principal {
                        name: row.name.as_str().into(),
                        role,
                        key_id: row.key_id.as_str().into(),
                        caller_id: format!("key:{}", row.name).into(),
                    },
                    secret_hash,
                    last_use: AtomicI64::new(0),
                })
            });
            keys.insert(row.key_id, known);
        }
        let count = keys.len();
        let dropped = current
            .as_ref()
            .is_some_and(|current| current.keys().any(|id| !keys.contains_key(id)));
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
        if dropped {
            self.dropped.send_modify(|generation| *generation += 1);
        }
        Ok(count)
    }
}

/// Writes the last uses not recorded yet; on failure they are kept for the
/// next attempt.
async fn record_uses(db: &DatabaseConnection, keys: &KeyMap) -> Result<(), sea_orm::DbErr> {
    for (id, known) in keys {
        let used = known.last_use.swap(0, Ordering::Relaxed);
        if used == 0 {
            continue;
        }
        let time = DateTime::<Utc>::from_timestamp(used, 0).unwrap_or_else(Utc::now);
        if let Err(error) = registry::record_use(db, id, time).await {
            known.last_use.fetch_max(used, Ordering::Relaxed);
            return Err(error);
        }
    }
    Ok(())
}

/// Reloads `cache` from `database` every `interval` until `shutdown`,
/// logging when loading starts and stops failing. While PostgreSQL cannot be
/// reached, the keys last loaded stay in force.
pub(crate) async fn keep_fresh(
    cache: Arc<KeyCache>,
    database: Database,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Ok(db) = database.connection() else {
            continue; // migrations still running
        };
        match cache.refresh(db).await {
            Ok(count) => {
                if failing {
                    tracing::info!(keys = count, "API keys reloaded");
                }
                failing = false;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "cannot reload API keys; the last loaded stay in force");
                }
                failing = true;
            }
        }
    }
}
