//! Which users may start a session: none that is in a session, or whose
//! last one ended less than the session gap ago.
//!
//! A session start draws users until it finds a free one, often a dozen
//! times (heavy users are mostly busy). With a time per user in the table of
//! users, each draw was a cache miss at a random place in megabytes, an
//! eighth of the generator's time. Here a draw tests one bit, in a set small
//! enough for the cache (32 KB for 250,000 users), and the times live in a
//! queue that is only read at its front: sessions end in event-time order,
//! so users become free in the order they were queued.

use std::collections::VecDeque;

pub(super) struct Availability {
    /// One bit per user, set while the user may not start a session.
    busy: Vec<u64>,
    /// Users whose session has ended, with the time they become free, in
    /// that order.
    cooling: VecDeque<(i64, u32)>,
}

impl Availability {
    /// `users` users, all free.
    pub(super) fn new(users: usize) -> Self {
        Self {
            busy: vec![0; users.div_ceil(64)],
            cooling: VecDeque::new(),
        }
    }

    /// Frees every user whose cool-down is over at `now`.
    pub(super) fn release_until(&mut self, now: i64) {
        while let Some(&(free_at, user)) = self.cooling.front()
            && free_at <= now
        {
            self.cooling.pop_front();
            self.set(user as usize, false);
        }
    }

    pub(super) fn is_free(&self, user: usize) -> bool {
        self.busy
            .get(user / 64)
            .is_some_and(|word| word & (1 << (user % 64)) == 0)
    }

    /// Marks `user` busy until [`Availability::cool_down`] and its
    /// cool-down.
    pub(super) fn occupy(&mut self, user: usize) {
        self.set(user, true);
    }

    /// `user`'s session has ended: free from `free_at`, which is no earlier
    /// than that of any user queued before (the caller ends sessions in
    /// event-time order, with the same gap for all).
    pub(super) fn cool_down(&mut self, user: u32, free_at: i64) {
        debug_assert!(
            self.cooling.back().is_none_or(|&(last, _)| last <= free_at),
            "users must cool down in the order they become free"
        );
        self.cooling.push_back((free_at, user));
    }

    fn set(&mut self, user: usize, busy: bool) {
        if let Some(word) = self.busy.get_mut(user / 64) {
            let bit = 1 << (user % 64);
            if busy {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_busy_from_its_session_until_its_cool_down_is_over() {
        let mut users = Availability::new(130);
        assert!((0..130).all(|user| users.is_free(user)));
        users.occupy(3);
        users.occupy(129);
        assert!(!users.is_free(3) && !users.is_free(129));
        assert!(users.is_free(2) && users.is_free(4) && users.is_free(128));
        users.cool_down(129, 100);
        users.cool_down(3, 250);
        users.release_until(99);
        assert!(!users.is_free(129), "cooling down until 100");
        users.release_until(100);
        assert!(users.is_free(129));
        assert!(!users.is_free(3), "cooling down until 250");
        users.release_until(1000);
        assert!(users.is_free(3));
    }
}
