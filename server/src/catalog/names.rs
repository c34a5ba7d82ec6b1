//! Product names for analytics answers (`include_product_names`): a cache in
//! front of the coalesced look-up, so a ranking of 100 products costs at
//! most one query, and a live ranking's repeated answers cost none.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use rtap::v1::ProductScore;

use super::lookup::Lookup;
use crate::database::Database;

/// How long a name (or a product's absence) is believed: a rename or a
/// deletion shows in analytics answers within this.
pub(crate) const NAME_TTL: Duration = Duration::from_secs(30);
/// How long an answer waits for the catalog before it goes without names:
/// a slow or unreachable PostgreSQL must not slow the metrics down.
const LOOKUP_WAIT: Duration = Duration::from_millis(500);
/// After a failed look-up, how long answers use only what is cached: during
/// a PostgreSQL outage every message would otherwise wait [`LOOKUP_WAIT`].
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Names kept at most; the cache starts afresh when it would hold more
/// (rankings name few products, so this is never reached in practice).
const MAX_CACHED: usize = 100_000;

/// The catalog's product names, cached. Cheap to share behind an `Arc`.
pub(crate) struct ProductNames {
    lookup: Lookup<entity::product::Entity>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Product id → its name (`None`: not in the catalog) and when read.
    names: HashMap<i64, (Option<String>, Instant)>,
    /// No look-up before this: the last one failed.
    paused_until: Option<Instant>,
}

impl std::fmt::Debug for ProductNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProductNames").finish_non_exhaustive()
    }
}

impl ProductNames {
    /// Names read from `database`. Starts a look-up task (and its own
    /// connection), so needs a Tokio runtime.
    pub(crate) fn start(database: Database) -> Self {
        Self {
            lookup: Lookup::start(
                database,
                entity::product::Column::Id,
                |row: &entity::product::Model| row.id,
            ),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Fills each score's `product_name`. A product not in the catalog keeps
    /// an empty name. When the catalog cannot be read within
    /// [`LOOKUP_WAIT`] (logged), names last read are used however old, the
    /// others stay empty, and for [`RETRY_AFTER`] no answer waits for the
    /// catalog: names are a convenience, the metrics do not depend on them.
    pub(crate) async fn fill(&self, scores: &mut [ProductScore]) {
        if scores.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut missing = Vec::new();
        let paused = {
            let cache = self.lock();
            for score in scores.iter_mut() {
                match cache.names.get(&score.product_id) {
                    Some((name, read)) if now.duration_since(*read) < NAME_TTL => {
                        score.product_name = name.clone().unwrap_or_default();
                    }
                    _ => missing.push(score.product_id),
                }
            }
            cache.paused_until.is_some_and(|until| now < until)
        };
        if missing.is_empty() {
            return;
        }
        let read = if paused {
            None
        } else {
            match tokio::time::timeout(LOOKUP_WAIT, self.lookup.get_many(missing.clone())).await {
                Ok(Ok(rows)) => Some(rows),
                Ok(Err(error)) => {
                    tracing::debug!(error = %error, "product names not read; cached names only");
                    None
                }
                Err(_) => {
                    tracing::debug!(wait = ?LOOKUP_WAIT, "product names not read in time; cached names only");
                    None
                }
            }
        };
        let mut cache = self.lock();
        let Some(rows) = read else {
            if !paused {
                cache.paused_until = Some(now + RETRY_AFTER);
            }
            for score in scores.iter_mut() {
                if let Some((Some(name), _)) = cache.names.get(&score.product_id) {
                    score.product_name.clone_from(name);
                }
            }
            return;
        };
        cache.paused_until = None;
        let found: HashMap<i64, String> = rows.into_iter().map(|row| (row.id, row.name)).collect();
        if cache.names.len() + missing.len() > MAX_CACHED {
            cache.names.clear();
        }
        for id in missing {
            cache.names.insert(id, (found.get(&id).cloned(), now));
        }
        for score in scores.iter_mut() {
            if let Some(name) = found.get(&score.product_id) {
                score.product_name.clone_from(name);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves a valid cache.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
