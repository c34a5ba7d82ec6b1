//! The one writer of a partition's keys.
//!
//! Exactly-once rests on one invariant, and this type owns all of it: only
//! the holder of a partition's lease writes the partition's keys, and every
//! write is one transaction fenced on the offset the writer last stored
//! ([`commit`]). While that holds,
//! - a batch is applied entirely or not at all, and once: a crash before
//!   `EXEC` leaves the offset where it was, a crash after it moves it, and a
//!   second writer can only lose the race;
//! - the three mirrors (the bucket values of [`Mirror`], the session states
//!   of [`SessionMirror`], the dedupe ids of [`IdMirror`]) are exact copies
//!   of what this writer committed, so
//!   their values need not be read again; any failed commit empties them,
//!   and a writer opened again starts with them empty.
//!
//! The writer's connection is its own and never reconnects by itself: the
//! commit's `WATCH` must not be lost to a silent reconnection. After a Redis
//! error the caller drops the writer and opens a new one, which reads the
//! stored offset again.

use std::time::Duration;

use foldhash::{HashMap, HashMapExt, HashSet};
use redis::aio::MultiplexedConnection;

use super::{
    Bucket, StoreError,
    aggregate::{BatchAggregate, SessionKey},
    commit::{
        self, CommitMeta, CommitSettings, Committed, DedupeWrite, PartitionState, Prefetched,
    },
    id_mirror::IdMirror,
    keys::PartitionKeys,
    mirror::Mirror,
    session_epoch,
    session_mirror::SessionMirror,
};

/// Where a partition stands, as last committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Position {
    /// The offset of the next record to apply; `None` before the first
    /// commit.
    pub(crate) stored: Option<i64>,
    /// The latest event time applied, Unix ms.
    pub(crate) watermark_ms: Option<i64>,
    /// The dedupe clock, Unix ms (see `ingest::dedupe`).
    pub(crate) dedupe_clock_ms: Option<i64>,
}

impl From<&PartitionState> for Position {
    fn from(state: &PartitionState) -> Self {
        Self {
            stored: state.offset,
            watermark_ms: state.watermark_ms,
            dedupe_clock_ms: state.dedupe_clock_ms,
        }
    }
}

/// What a batch needs read before it is folded.
#[derive(Debug, Default)]
pub(crate) struct Prefetch {
    /// The batch's event ids, in order: in which stored dedupe generation
    /// was each counted?
    pub(crate) ids: Vec<[u8; 16]>,
    /// The dedupe generations whose sets may hold them.
    pub(crate) dedupe_generations: Vec<i64>,
    /// The sessions its events continue.
    pub(crate) sessions: HashSet<SessionKey>,
    /// The minutes its events fall in, whose buckets it will write.
    pub(crate) minutes: Vec<i64>,
    /// Processing time, Unix ms.
    pub(crate) now_ms: i64,
}

/// Everything a commit writes besides the batch's aggregates.
#[derive(Debug, Clone, Default)]
pub(crate) struct BatchWrite {
    /// The offset after the batch's last record.
    pub(crate) next_offset: i64,
    /// Duplicates discarded.
    pub(crate) duplicates: i64,
    /// The ids counted and the dedupe clock.
    pub(crate) dedupe: DedupeWrite,
    /// Dead-lettered records, per reason.
    pub(crate) dead_lettered: Vec<(&'static str, i64)>,
    /// Commit time, Unix ms.
    pub(crate) now_ms: i64,
}

/// Owns a partition's writes (see the module's notes). Opened by the lease
/// holder only.
pub(crate) struct PartitionWriter {
    connection: MultiplexedConnection,
    keys: PartitionKeys,
    owner: String,
    lease: Duration,
    settings: CommitSettings,
    position: Position,
    mirror: Mirror,
    sessions: SessionMirror,
    ids: IdMirror,
}

impl PartitionWriter {
    /// Takes the lease of `keys`' partition for `owner` on `connection` (a
    /// connection no other task uses, to the node holding the partition)
    /// and reads where the partition stands. `Ok(Err(holder))` when another
    /// process holds the lease.
    pub(crate) async fn open(
        mut connection: MultiplexedConnection,
        keys: PartitionKeys,
        (owner, lease): (String, Duration),
        settings: CommitSettings,
    ) -> Result<Result<Self, String>, StoreError> {
        if let Err(holder) = commit::take_lease(&mut connection, &keys, &owner, lease).await? {
            return Ok(Err(holder));
        }
        let state = commit::load_state(&mut connection, &keys).await?;
        Ok(Ok(Self {
            connection,
            position: Position::from(&state),
            keys,
            owner,
            lease,
            mirror: Mirror::new(settings.retention),
            sessions: SessionMirror::default(),
            ids: IdMirror::default(),
            settings,
        }))
    }

    /// Where the partition stands.
    pub(crate) fn position(&self) -> Position {
        self.position
    }

    /// Renews the lease; `Ok(Err(holder))` if another process took it.
    pub(crate) async fn renew_lease(&mut self) -> Result<Result<(), String>, StoreError> {
        commit::take_lease(&mut self.connection, &self.keys, &self.owner, self.lease).await
    }

    /// Gives the lease up, so that a successor need not wait for it to
    /// expire.
    pub(crate) async fn release(mut self) -> Result<(), StoreError> {
        commit::release_lease(&mut self.connection, &self.keys, &self.owner).await
    }

    /// Reads, in one round trip, what folding a batch needs that the mirrors
    /// lack: when its ids were counted, the sessions it continues, and the
    /// values of the buckets its events fall in (those of the sessions'
    /// earlier minutes are read by the commit if needed).
    pub(crate) async fn prefetch(&mut self, ask: Prefetch) -> Result<Prefetched, StoreError> {
        let now_seconds = ask.now_ms.div_euclid(1000);
        let unknown = self.mirror.missing(
            ask.minutes
                .iter()
                .flat_map(|minute| Bucket::of_minute(*minute)),
            now_seconds,
        );
        let epoch = session_epoch(ask.now_ms, self.settings.session_ttl_ms);
        let mut known = HashMap::with_capacity(ask.sessions.len());
        let mut unknown_sessions = Vec::new();
        for session in ask.sessions {
            match self.sessions.get(&session, epoch) {
                Some(state) => {
                    known.insert(session, state);
                }
                None => unknown_sessions.push(session),
            }
        }
        let generations = self.ids.generations_to_read(&ask.dedupe_generations);
        let read = commit::prefetch(
            &mut self.connection,
            &self.keys,
            (&ask.ids, &generations),
            unknown_sessions,
            epoch,
            (&mut self.mirror, &unknown),
        )
        .await;
        let mut read = match read {
            Ok(read) => read,
            Err(error) => {
                self.forget();
                return Err(error);
            }
        };
        read.sessions.extend(known);
        for (counted_in, id) in read.counted_in.iter_mut().zip(&ask.ids) {
            let mirrored = self.ids.counted_in(id, &ask.dedupe_generations);
            *counted_in = (*counted_in).max(mirrored);
        }
        Ok(read)
    }

    /// Commits `batch` and `write` atomically, fenced on the stored offset,
    /// and moves the position past it. Any failure empties the mirrors; the
    /// caller then drops the writer (see the module's notes).
    pub(crate) async fn commit(
        &mut self,
        batch: &BatchAggregate,
        write: BatchWrite,
    ) -> Result<Committed, StoreError> {
        let meta = CommitMeta {
            expected_offset: self.position.stored,
            next_offset: write.next_offset,
            duplicates: write.duplicates,
            dedupe: write.dedupe,
            dead_lettered: write.dead_lettered,
            now_ms: write.now_ms,
        };
        let committed = commit::commit(
            &mut self.connection,
            &self.keys,
            batch,
            &meta,
            &self.settings,
            &mut self.mirror,
        )
        .await;
        let committed = match committed {
            Ok(committed) => committed,
            Err(error) => {
                self.forget();
                return Err(error);
            }
        };
        let epoch = session_epoch(meta.now_ms, self.settings.session_ttl_ms);
        self.sessions.applied(&batch.sessions, epoch);
        self.ids
            .applied(&meta.dedupe.counted, &meta.dedupe.forgotten);
        self.position = Position {
            stored: Some(meta.next_offset),
            watermark_ms: batch.watermark_ms,
            dedupe_clock_ms: meta.dedupe.clock_ms.or(self.position.dedupe_clock_ms),
        };
        Ok(committed)
    }

    fn forget(&mut self) {
        self.mirror.clear();
        self.sessions = SessionMirror::default();
        self.ids = IdMirror::default();
    }
}
