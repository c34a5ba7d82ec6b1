//! A partition consumer's copy of the session states it wrote, so that a
//! batch reads from Redis only the sessions it has not seen: a session's
//! later events, the most of them, continue a state the consumer wrote
//! itself, so reading every session of a batch (an `HMGET` in two epochs)
//! would cost Redis and the consumer's reply parsing for nothing.
//!
//! Exact for the same reasons as the bucket [`super::mirror::Mirror`]: the
//! lease holder is the only writer of its partition's keys and every commit
//! is fenced, the copy is updated only once a commit has applied, and the
//! consumer drops it (with the mirror) whenever anything fails. A state is
//! answered from the copy only when Redis's read would return that very
//! state: it was written in the current session epoch or the one before (the
//! two that [`super::commit::prefetch`] reads). Anything else is read from
//! Redis, so a state the copy lacks, after a restart or an eviction, costs a
//! read, never a wrong count.

use foldhash::{HashMap, HashMapExt};

use super::aggregate::{SessionKey, SessionState};

/// Sessions kept per partition; past it the copy is emptied, and sessions
/// are read from Redis again. About 150 bytes a session (key, state and
/// hash table): 30 MB.
pub(crate) const MAX_SESSIONS: usize = 200_000;

/// Session states written by this consumer, with the epoch of their write.
#[derive(Debug)]
pub(crate) struct SessionMirror {
    states: HashMap<SessionKey, (SessionState, i64)>,
    /// The latest epoch written in.
    epoch: Option<i64>,
    max_sessions: usize,
}

impl Default for SessionMirror {
    fn default() -> Self {
        Self::with_capacity_limit(MAX_SESSIONS)
    }
}

impl SessionMirror {
    /// A mirror that keeps at most `max_sessions` states.
    pub(crate) fn with_capacity_limit(max_sessions: usize) -> Self {
        Self {
            states: HashMap::new(),
            epoch: None,
            max_sessions,
        }
    }

    /// The state Redis holds for `session` as read in `epoch`, if known.
    pub(crate) fn get(&self, session: &SessionKey, epoch: i64) -> Option<SessionState> {
        // A clock that went back: what was written "later" is not where
        // the read looks.
        if self.epoch.is_some_and(|latest| latest > epoch) {
            return None;
        }
        self.states
            .get(session)
            .filter(|(_, written)| *written >= epoch - 1 && *written <= epoch)
            .map(|(state, _)| *state)
    }

    /// Records the states a commit applied in `epoch`.
    pub(crate) fn applied<'a>(
        &mut self,
        states: impl IntoIterator<Item = (&'a SessionKey, &'a SessionState)>,
        epoch: i64,
    ) {
        if self.epoch != Some(epoch) {
            // States of earlier epochs are no longer read: drop them.
            if self.epoch.is_some_and(|latest| latest > epoch) {
                self.states.clear();
            } else {
                self.states.retain(|_, (_, written)| *written >= epoch - 1);
            }
            self.epoch = Some(epoch);
        }
        for (session, state) in states {
            // Most are known: updated in place, without cloning their key.
            match self.states.get_mut(session) {
                Some(known) => *known = (*state, epoch),
                None => {
                    self.states.insert(session.clone(), (*state, epoch));
                }
            }
        }
        if self.states.len() > self.max_sessions {
            self.states.clear();
        }
    }

    /// Sessions known.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether no session is known.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(events: i64) -> SessionState {
        SessionState {
            anchor_ms: 0,
            first_ms: 0,
            last_ms: 1000,
            events,
            stages: 0,
            source: 1,
        }
    }

    fn key(user: i64) -> SessionKey {
        (user, format!("s{user}"))
    }

    #[test]
    fn a_state_is_known_while_the_read_would_find_it() {
        let mut mirror = SessionMirror::default();
        assert_eq!(mirror.get(&key(1), 10), None, "never written: ask Redis");
        mirror.applied([(&key(1), &state(1))], 10);
        assert_eq!(mirror.get(&key(1), 10), Some(state(1)));
        assert_eq!(mirror.get(&key(1), 11), Some(state(1)), "previous epoch");
        assert_eq!(mirror.get(&key(1), 12), None, "two epochs on: not read");
        assert_eq!(mirror.get(&key(2), 10), None);
        mirror.applied([(&key(1), &state(2))], 11);
        assert_eq!(mirror.get(&key(1), 11), Some(state(2)), "the latest write");
    }

    #[test]
    fn old_epochs_and_a_clock_that_went_back_are_forgotten() {
        let mut mirror = SessionMirror::default();
        mirror.applied([(&key(1), &state(1)), (&key(2), &state(1))], 10);
        mirror.applied([(&key(2), &state(2))], 11);
        assert_eq!(mirror.len(), 2);
        mirror.applied([(&key(3), &state(3))], 12);
        assert_eq!(mirror.len(), 2, "the state written in epoch 10 is dropped");
        assert_eq!(mirror.get(&key(2), 12), Some(state(2)));
        assert_eq!(mirror.get(&key(2), 11), None, "the clock went back");
        mirror.applied([(&key(4), &state(4))], 11);
        assert_eq!(mirror.len(), 1);
        assert_eq!(mirror.get(&key(4), 11), Some(state(4)));
    }

    #[test]
    fn past_the_limit_it_starts_empty() {
        let mut mirror = SessionMirror::with_capacity_limit(2);
        mirror.applied([(&key(1), &state(1)), (&key(2), &state(1))], 10);
        assert_eq!(mirror.len(), 2);
        mirror.applied([(&key(3), &state(1))], 10);
        assert!(mirror.is_empty());
        assert_eq!(mirror.get(&key(1), 10), None);
    }
}
