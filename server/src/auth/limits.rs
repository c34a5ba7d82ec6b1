//! How often a caller may call: token buckets per caller, for calls and for
//! tracked events. A caller over its rate is refused (unary calls) or held
//! back (a `TrackStream` reads its next event only when a token is there),
//! so it never slows anyone else: the check is a map look-up under a lock
//! held for a few arithmetic operations.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Callers remembered before idle ones are forgotten.
const REMEMBERED_CALLERS: usize = 10_000;

/// A token bucket per caller: `rate` tokens a second, at most `burst`.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_second` tokens a second with a burst of one second's worth;
    /// `None` for 0 (no limit).
    pub(crate) fn per_second(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            rate: f64::from(per_second),
            burst: f64::from(per_second),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes `count` tokens of `caller`'s bucket, or says how long until
    /// they are there.
    pub(crate) fn take(&self, caller: &Arc<str>, count: u32) -> Result<(), Duration> {
        let now = Instant::now();
        let count = f64::from(count).min(self.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= REMEMBERED_CALLERS && !buckets.contains_key(caller) {
            // Forget callers whose buckets have refilled: they lose nothing.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(caller.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refilled = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate)
            .min(self.burst);
        if refilled >= count {
            *bucket = Bucket {
                tokens: refilled - count,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket {
                tokens: refilled,
                at: now,
            };
            Err(Duration::from_secs_f64((count - refilled) / self.rate))
        }
    }

    /// Waits until `caller` has `count` tokens, and takes them.
    pub(crate) async fn wait(&self, caller: &Arc<str>, count: u32) {
        while let Err(wait) = self.take(caller, count) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// RESOURCE_EXHAUSTED for `what`, with `google.rpc.RetryInfo` saying when
/// to retry.
pub(crate) fn exhausted(what: &str, retry_after: Duration) -> Status {
    // Round up to whole milliseconds, so a client that waits exactly this
    // long finds its token.
    let retry_after = Duration::from_millis(
        u64::try_from(retry_after.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1),
    );
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{what}; retry in {} ms", retry_after.as_millis()),
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::per_second(10).expect("a limit");
        let caller: Arc<str> = "a".into();
        for _ in 0..10 {
            assert!(limiter.take(&caller, 1).is_ok());
        }
        let wait = limiter.take(&caller, 1).expect_err("the burst is spent");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another caller has a bucket of its own.
        assert!(limiter.take(&"b".into(), 10).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.take(&caller, 1).is_ok());
    }

    #[test]
    fn zero_means_no_limit_and_retry_info_travels_in_the_details() {
        assert!(RateLimiter::per_second(0).is_none());
        let status = exhausted("too many calls", Duration::from_millis(250));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_error_details().retry_info().cloned();
        assert_eq!(
            retry.and_then(|r| r.retry_delay),
            Some(Duration::from_millis(251))
        );
    }
}

/// How many subscriptions may be open, per caller and in all; 0: no limit.
#[derive(Debug)]
pub(crate) struct StreamSlots {
    per_caller: usize,
    total: usize,
    open: Mutex<(usize, HashMap<Arc<str>, usize>)>,
}

impl StreamSlots {
    pub(crate) fn new(per_caller: u32, total: u32) -> Self {
        let limit = |n: u32| match n {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        Self {
            per_caller: limit(per_caller),
            total: limit(total),
            open: Mutex::new((0, HashMap::new())),
        }
    }

    /// A slot for one more subscription of `caller`, held until dropped.
    pub(crate) fn claim(self: &Arc<Self>, caller: &Arc<str>) -> Result<StreamSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.total {
            return Err(Status::resource_exhausted(format!(
                "this server holds its most subscriptions ({}); retry later or on another replica",
                self.total
            )));
        }
        let mine = open.1.entry(caller.clone()).or_insert(0);
        if *mine >= self.per_caller {
            return Err(Status::resource_exhausted(format!(
                "at most {} open subscriptions per caller; close some first",
                self.per_caller
            )));
        }
        *mine += 1;
        open.0 += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            caller: caller.clone(),
        })
    }
}

/// One open subscription's place; released when dropped.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    slots: Arc<StreamSlots>,
    caller: Arc<str>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(mine) = open.1.get_mut(&self.caller) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                open.1.remove(&self.caller);
            }
        }
    }
}

/// Every limit on callers, shared by the gate and the handlers that
/// stream.
#[derive(Debug)]
pub struct Limits {
    /// Calls a second per caller.
    pub(crate) calls: Option<RateLimiter>,
    /// Tracked events a second per caller.
    pub(crate) events: Option<RateLimiter>,
    /// Open subscriptions.
    pub(crate) subscriptions: Arc<StreamSlots>,
}

/// The numbers behind [`Limits`]; 0 means no limit.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// Calls a second per caller.
    pub calls_per_second: u32,
    /// Tracked events a second per caller.
    pub events_per_second: u32,
    /// Open subscriptions per caller.
    pub subscriptions_per_caller: u32,
    /// Open subscriptions on this server.
    pub subscriptions: u32,
}

impl Limits {
    /// The limits of `settings`.
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            calls: RateLimiter::per_second(settings.calls_per_second),
            events: RateLimiter::per_second(settings.events_per_second),
            subscriptions: Arc::new(StreamSlots::new(
                settings.subscriptions_per_caller,
                settings.subscriptions,
            )),
        }
    }

    /// No limits at all.
    pub fn none() -> Self {
        Self::new(LimitSettings {
            calls_per_second: 0,
            events_per_second: 0,
            subscriptions_per_caller: 0,
            subscriptions: 0,
        })
    }
}
