//! The generator: sessions arriving in simulated time, their events in
//! event-time order, and the records made of them (late, repeated or
//! malformed by the configured shares).

use std::{
    cmp::{Ordering, Reverse},
    collections::{BinaryHeap, VecDeque},
};

use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp};
use rand_xoshiro::Xoshiro256PlusPlus;
use rtap::v1::EventType;

use super::{
    MICROS_PER_SECOND, ModelError,
    agenda::Agenda,
    availability::Availability,
    emission::{Emission, EmissionKind},
    event::{Event, random_uuid},
    micros,
    params::{ModelParams, validate},
    population::{Population, ProductInfo},
    session::{Session, SessionEvent, SessionInfo, Steps, expected_events_per_session},
    zipf::ZipfRank,
};

/// Users a new session draws by activity (Zipf) before it takes any user:
/// heavy users are often mid-session.
const ACTIVITY_DRAWS: usize = 4;
/// Activity-weighted users drawn ahead at once (see
/// [`Generator::activity_draw`]).
const ACTIVITY_BLOCK: usize = 128;
/// Users drawn uniformly after those, before the arrival is skipped when
/// every user drawn is in a session or just out of one.
const ANY_USER_DRAWS: usize = 12;
/// A rough session length, for the capacity warning.
const TYPICAL_SESSION_SECONDS: f64 = 180.0;
/// How far before the start time the model starts running (silently), so
/// that sessions are already under way when the first event is produced.
const WARM_UP_MICROS: i64 = 15 * 60 * MICROS_PER_SECOND;

/// A late event waiting for its release time; the sequence keeps those
/// released at the same time in the order they were held back.
#[derive(Debug)]
struct HeldBack {
    release_micros: i64,
    sequence: u64,
    emission: Emission,
}

impl PartialEq for HeldBack {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for HeldBack {}
impl PartialOrd for HeldBack {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeldBack {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.release_micros, self.sequence).cmp(&(other.release_micros, other.sequence))
    }
}

/// Generates the records of a run, one at a time.
pub struct Generator {
    params: ModelParams,
    /// The population's user ids, heaviest first.
    users: Vec<i64>,
    /// Which of `users` may start a session.
    availability: Availability,
    products: Vec<ProductInfo>,
    rng: Xoshiro256PlusPlus,
    /// Zipf-weighted positions in `products`.
    product_rank: ZipfRank,
    /// Zipf-weighted positions in `users`.
    user_rank: ZipfRank,
    /// Positions drawn from `user_rank` ahead of need, with their user ids;
    /// the next is last.
    activity_draws: Vec<(usize, i64)>,
    /// Mean simulated time between session arrivals.
    interarrival: Exp<f64>,
    clock_micros: i64,
    next_arrival_micros: i64,
    /// Sessions under way, by the time of their next event.
    agenda: Agenda<Session>,
    held_back: BinaryHeap<Reverse<HeldBack>>,
    ready: VecDeque<Emission>,
    sequence: u64,
}

impl Generator {
    /// A generator whose event times start at `start` and advance by about
    /// `events_per_second` events per simulated second.
    pub fn new(
        params: ModelParams,
        population: Population,
        seed: u64,
        start: DateTime<Utc>,
        events_per_second: f64,
    ) -> Result<Self, ModelError> {
        validate(&params)?;
        if population.users.is_empty() || population.products.is_empty() {
            return Err(ModelError::EmptyPopulation);
        }
        // Sessions hold positions in the population as `u32`.
        if u32::try_from(population.users.len().max(population.products.len())).is_err() {
            return Err(ModelError::Params(
                "at most 4,294,967,295 users and as many products".into(),
            ));
        }
        if !(events_per_second.is_finite() && events_per_second > 0.0) {
            return Err(ModelError::Params("the event rate must be positive".into()));
        }
        let product_rank = ZipfRank::new(population.products.len(), params.product_zipf_exponent)?;
        let user_rank = ZipfRank::new(population.users.len(), params.user_zipf_exponent)?;
        let interarrival = interarrival(&params, population.users.len(), events_per_second)?;
        let start_micros = start.timestamp_micros();
        let mut generator = Self {
            params,
            availability: Availability::new(population.users.len()),
            users: population.users,
            products: population.products,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            product_rank,
            user_rank,
            activity_draws: Vec::with_capacity(ACTIVITY_BLOCK),
            interarrival,
            clock_micros: start_micros,
            next_arrival_micros: start_micros,
            agenda: Agenda::starting_at(start_micros - WARM_UP_MICROS),
            held_back: BinaryHeap::new(),
            ready: VecDeque::new(),
            sequence: 0,
        };
        generator.warm_up(start_micros);
        Ok(generator)
    }

    /// The simulated clock: the event time of the latest event generated.
    pub fn clock(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.clock_micros).unwrap_or_default()
    }

    /// The next record to produce.
    pub fn next_emission(&mut self) -> Emission {
        loop {
            if let Some(emission) = self.ready.pop_front() {
                return emission;
            }
            if self
                .held_back
                .peek()
                .is_some_and(|Reverse(held)| held.release_micros <= self.clock_micros)
                && let Some(Reverse(held)) = self.held_back.pop()
            {
                return held.emission;
            }
            let event = self.next_event();
            // Shares are often zero: no draw then (`random_bool` draws even
            // for a probability of zero).
            let mut chance = |share: f64| share > 0.0 && self.rng.random_bool(share);
            if chance(self.params.late_share) {
                let max_hold = micros(self.params.max_lateness).max(MICROS_PER_SECOND + 1);
                let hold = self.rng.random_range(MICROS_PER_SECOND..max_hold);
                self.sequence += 1;
                self.held_back.push(Reverse(HeldBack {
                    release_micros: event.occurred_at_micros + hold,
                    sequence: self.sequence,
                    emission: Emission::event(event, true),
                }));
                continue;
            }
            let duplicate = chance(self.params.duplicate_share);
            let malformed = chance(self.params.malformed_share)
                .then(|| Emission::malformed(&event, &mut self.rng));
            let emission = Emission::event(event, false);
            // `ready` is empty: what follows this emission waits there.
            if duplicate {
                self.ready.push_back(Emission {
                    kind: EmissionKind::Duplicate(event),
                    ..emission.clone()
                });
            }
            self.ready.extend(malformed);
            return emission;
        }
    }

    /// The next valid event, in event-time order.
    fn next_event(&mut self) -> Event {
        let (time, session, drawn) = self.advance();
        Event {
            event_id: random_uuid(&mut self.rng),
            occurred_at_micros: time,
            user_id: session.user_id,
            product_id: drawn.product.map_or(0, |p| p.id),
            source: session.source,
            event_type: drawn.event_type,
            session_id: session.session_id,
            dwell_micros: matches!(
                drawn.event_type,
                EventType::PageView | EventType::ProductView
            )
            .then_some(drawn.gap_micros),
            amount_micros: if drawn.event_type == EventType::Purchase {
                drawn.product.map_or(0, |p| p.price_micros) * i64::from(drawn.quantity)
            } else {
                0
            },
            quantity: drawn.quantity,
            search: drawn.search,
        }
    }

    /// Moves the simulation to its next event: starts the sessions that
    /// arrive first, then takes the step of the session due first. Returns
    /// its time, its session (user, source, id) and the event drawn.
    fn advance(&mut self) -> (i64, SessionInfo, SessionEvent) {
        loop {
            let next_session_event = self.agenda.peek();
            if next_session_event.is_none_or(|time| self.next_arrival_micros <= time) {
                let at = self.next_arrival_micros;
                let gap = self.interarrival.sample(&mut self.rng).ceil() as i64;
                self.next_arrival_micros = at + gap.max(1);
                self.start_session(at);
                continue;
            }
            let Some((time, mut session)) = self.agenda.pop() else {
                continue;
            };
            self.clock_micros = self.clock_micros.max(time);
            let (drawn, goes_on) = self.steps().take_step(&mut session);
            if goes_on {
                self.agenda.push(time + drawn.gap_micros, session);
            } else {
                let free_at = time + micros(self.params.session_gap) + MICROS_PER_SECOND;
                self.availability.cool_down(session.user(), free_at);
            }
            return (time, session.info(), drawn);
        }
    }

    /// What a session's next step is drawn from.
    fn steps(&mut self) -> Steps<'_> {
        Steps {
            rng: &mut self.rng,
            params: &self.params,
            products: &self.products,
            product_rank: &self.product_rank,
        }
    }

    /// Runs the model from `WARM_UP` before `start` without emitting, so the
    /// first events produced come from a shop already in full swing rather
    /// than from sessions that all begin at once.
    fn warm_up(&mut self, start_micros: i64) {
        self.clock_micros = start_micros - WARM_UP_MICROS;
        self.next_arrival_micros = self.clock_micros;
        while self.peek_time().is_some_and(|time| time < start_micros) {
            self.advance();
        }
        self.clock_micros = start_micros;
    }

    fn peek_time(&mut self) -> Option<i64> {
        let next_step = self.agenda.peek();
        Some(next_step.map_or(self.next_arrival_micros, |t| {
            t.min(self.next_arrival_micros)
        }))
    }

    fn start_session(&mut self, at: i64) {
        self.availability.release_until(at);
        let mut by_activity = None;
        for _ in 0..ACTIVITY_DRAWS {
            let (user, user_id) = self.activity_draw();
            if self.availability.is_free(user) {
                by_activity = Some((user, user_id));
                break;
            }
        }
        let user = by_activity.or_else(|| {
            (0..ANY_USER_DRAWS)
                .map(|_| self.rng.random_range(0..self.users.len()))
                .find(|&user| self.availability.is_free(user))
                .map(|user| (user, self.users[user]))
        });
        let Some((user, user_id)) = user else {
            return; // every user drawn is mid-session: this arrival is skipped
        };
        self.availability.occupy(user);
        let session = Session::landing(
            random_uuid(&mut self.rng),
            user_id,
            // `new` checked that positions fit a u32.
            user as u32,
            self.rng.random_bool(self.params.mobile_share),
        );
        self.agenda.push(at, session);
    }

    /// The next activity-weighted user: position and id. They are drawn a
    /// block at a time, so that the reads of the block's table entries and
    /// ids (each likely a cache miss in a shard's megabytes) overlap instead
    /// of waiting for one another at every session start. The draws are
    /// independent, so drawing them ahead draws the same distribution.
    fn activity_draw(&mut self) -> (usize, i64) {
        loop {
            if let Some(draw) = self.activity_draws.pop() {
                return draw;
            }
            let positions: [usize; ACTIVITY_BLOCK] = self.user_rank.sample_array(&mut self.rng);
            let users = &self.users;
            self.activity_draws
                .extend(positions.iter().rev().map(|&user| (user, users[user])));
        }
    }
}

/// The time between session arrivals, in microseconds, for
/// `events_per_second` from `users`.
///
/// One session per user at a time, and a gap before the next: a small
/// population cannot sustain any rate. Arrivals beyond half that capacity
/// would mostly find their user busy and be skipped, so the rate is capped
/// there instead, with a warning.
fn interarrival(
    params: &ModelParams,
    users: usize,
    events_per_second: f64,
) -> Result<Exp<f64>, ModelError> {
    let events_per_session = expected_events_per_session(params);
    let requested = events_per_second / events_per_session;
    let capacity =
        users as f64 / (params.session_gap.as_secs_f64() + TYPICAL_SESSION_SECONDS) / 2.0;
    if requested > capacity {
        tracing::warn!(
            users,
            requested_events_per_second = events_per_second,
            achievable_events_per_second = capacity * events_per_session,
            "too few users for this event rate; producing at the achievable rate (add users, shorten --session-gap or lower the rate)"
        );
    }
    let sessions_per_micro = requested.min(capacity) / MICROS_PER_SECOND as f64;
    Exp::new(sessions_per_micro)
        .map_err(|e| ModelError::Params(format!("session arrival rate: {e}")))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{HashMap, HashSet},
        time::Duration,
    };

    use prost::Message;
    use rtap::v1::{InteractionEvent, Source};
    use uuid::Uuid;

    use super::*;
    use crate::model::testing::{events, generator, start, take};

    /// Defaults, with every kind of record: duplicates and malformed ones.
    fn with_duplicates_and_malformed() -> ModelParams {
        ModelParams {
            duplicate_share: 0.05,
            malformed_share: 0.05,
            ..ModelParams::default()
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_records_and_another_seed_does_not() {
        let params = with_duplicates_and_malformed();
        let a = take(&mut generator(params.clone(), 42, 500.0), 5000);
        let b = take(&mut generator(params.clone(), 42, 500.0), 5000);
        let c = take(&mut generator(params, 43, 500.0), 5000);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn events_decode_with_the_rtap_types_and_are_complete() {
        let emissions = take(&mut generator(ModelParams::default(), 1, 500.0), 20_000);
        for emission in &emissions {
            let EmissionKind::Event { event, .. } = &emission.kind else {
                panic!("only events without injection shares");
            };
            let decoded = InteractionEvent::decode(emission.value().as_slice()).expect("decodes");
            assert_eq!(decoded, event.to_message());
            assert_eq!(emission.key(), decoded.user_id.to_string().into_bytes());
            assert_eq!(decoded.event_id.len(), 36);
            assert!(decoded.user_id > 0);
            assert_ne!(decoded.r#type(), EventType::Unspecified);
            assert_ne!(decoded.source(), Source::Unspecified);
            let needs_product =
                !matches!(decoded.r#type(), EventType::PageView | EventType::Search);
            assert_eq!(decoded.product_id > 0, needs_product, "{decoded:?}");
            if decoded.r#type() == EventType::Purchase {
                assert!(decoded.amount_micros > 0 && decoded.quantity > 0);
            }
            assert!(
                decoded
                    .occurred_at
                    .is_some_and(|t| t.seconds >= start().timestamp())
            );
        }
        let ids: HashSet<_> = events(&emissions).into_iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), emissions.len(), "event ids are unique");
    }

    #[test]
    fn a_few_heavy_users_open_many_sessions_and_most_users_few() {
        // Users are heaviest first: with the default exponent (0.8) over a
        // million users, a draw by activity falls in the first 1 % about a
        // third of the time and in the second half about an eighth. At 20
        // events/s the heavy users are not all mid-session or in their gap
        // (at 1,000 they are, and new sessions go to lighter users).
        let emissions = take(&mut generator(ModelParams::default(), 11, 20.0), 200_000);
        let sessions: HashSet<(i64, String)> = events(&emissions)
            .into_iter()
            .map(|event| (event.user_id, event.session_id))
            .collect();
        let share = |range: std::ops::RangeInclusive<i64>| {
            let within = sessions
                .iter()
                .filter(|(user, _)| range.contains(user))
                .count();
            within as f64 / sessions.len() as f64
        };
        let (top, bottom_half) = (share(1..=10_000), share(500_001..=1_000_000));
        assert!(sessions.len() > 20_000, "{} sessions", sessions.len());
        assert!(
            top > 0.10,
            "the heaviest 1 % of users hold {top:.3} of sessions"
        );
        assert!(
            bottom_half < 0.30,
            "the lighter half holds {bottom_half:.3} of sessions"
        );
    }

    #[test]
    fn late_events_arrive_after_newer_ones_and_users_never_overlap_sessions() {
        let params = ModelParams {
            late_share: 0.02,
            ..ModelParams::default()
        };
        let gap = params.session_gap.as_secs() as i64;
        let emissions = take(&mut generator(params, 5, 20.0), 60_000);
        let mut newest = i64::MIN;
        let mut late = 0;
        // user -> (session, last event time)
        let mut current: HashMap<i64, (Uuid, i64)> = HashMap::new();
        for emission in &emissions {
            let EmissionKind::Event {
                event,
                late: is_late,
            } = &emission.kind
            else {
                continue;
            };
            let time = emission.occurred_at.timestamp_micros();
            if *is_late {
                late += 1;
                assert!(
                    time < newest,
                    "a late event is older than one produced before it"
                );
                continue; // late events are out of order by design
            }
            newest = newest.max(time);
            if let Some((session, last)) = current.get(&event.user_id)
                && *session != event.session_id
            {
                assert!(
                    time - last > gap * 1_000_000,
                    "a new session starts after the gap"
                );
            }
            current.insert(event.user_id, (event.session_id, time));
        }
        assert!(late > 900, "{late} late events");
    }

    #[test]
    fn contradictory_parameters_are_refused() {
        let bad = ModelParams {
            mean_dwell: Duration::from_secs(3600),
            ..ModelParams::default()
        };
        assert!(Generator::new(bad, Population::synthetic(10, 10), 1, start(), 10.0).is_err());
        assert!(
            Generator::new(
                ModelParams::default(),
                Population::synthetic(0, 10),
                1,
                start(),
                10.0
            )
            .is_err()
        );
    }
}
