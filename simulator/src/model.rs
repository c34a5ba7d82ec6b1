//! Who does what, and when: a discrete-event model of shoppers.
//!
//! Sessions arrive as a Poisson process in simulated time. Each session
//! belongs to one user (drawn with Zipf-skewed activity, so a few users are
//! heavy), on one source (web or mobile app, by a configurable mix), and
//! goes through the funnel one step at a time: a landing page, maybe a
//! search, then — with the configured funnel rates — product views (products
//! drawn with Zipf popularity), an add to cart (sometimes removed and
//! replaced), and a purchase. Each step is drawn when the session reaches
//! it, so a session under way is a few bytes of state rather than a plan.
//! Gaps inside a session stay below the session inactivity gap, and a
//! user's next session starts more than a gap later, so a consumer that
//! splits sessions on inactivity sees the sessions the model made.
//!
//! Everything is drawn from one seeded generator, in one order, so a seed
//! and a start time fully determine the output. It is xoshiro256++, not a
//! cryptographic generator: the model draws a dozen numbers per event, and
//! ChaCha8 took twice as long for them.

use std::{
    cmp::{Ordering, Reverse},
    collections::{BinaryHeap, VecDeque},
    time::Duration,
};

use chrono::{DateTime, Utc};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use rand_xoshiro::Xoshiro256PlusPlus;
use rtap::v1::{EventType, Source};
use uuid::Uuid;

mod agenda;
mod alias;
mod availability;
mod event;
pub mod params;

use agenda::Agenda;
use alias::AliasTable;
use availability::Availability;
pub use event::Event;
use event::{SEARCH_WORDS, SearchQuery};
pub use params::{ModelParams, validate};

const MICROS_PER_SECOND: i64 = 1_000_000;
/// Longest time on one page: dwell times are drawn from an exponential
/// distribution and cut here.
const MAX_DWELL_MICROS: i64 = 10 * 60 * MICROS_PER_SECOND;
/// Most product views in one session.
const MAX_VIEWS_PER_SESSION: u32 = 8;
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

/// A model that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Parameters that contradict each other.
    #[error("invalid model parameters: {0}")]
    Params(String),
    /// Nothing to simulate.
    #[error("the population needs at least one user and one product")]
    EmptyPopulation,
}

/// A product that can be viewed and bought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProductInfo {
    /// Catalog id.
    pub id: i64,
    /// Unit price in millionths of the currency unit.
    pub price_micros: i64,
}

/// The users and products a run simulates. Users earlier in the list are the
/// heavier ones, products earlier in the list the more popular ones.
#[derive(Debug, Clone)]
pub struct Population {
    /// User ids.
    pub users: Vec<i64>,
    /// Products.
    pub products: Vec<ProductInfo>,
}

impl Population {
    /// Users `1..=users` and products `1..=products`, with prices from 5 to
    /// 199 currency units spread over the ids.
    pub fn synthetic(users: u32, products: u32) -> Self {
        Self {
            users: (1..=i64::from(users)).collect(),
            products: (1..=i64::from(products))
                .map(|id| ProductInfo {
                    id,
                    price_micros: (5 + (id * 7919) % 195) * MICROS_PER_SECOND,
                })
                .collect(),
        }
    }
}

/// One record for Kafka. Its value is encoded where the producer asks for
/// it ([`Emission::write_value`]), straight into the batch it joins: an
/// encoded copy per record, moved from buffer to buffer, cost more than
/// encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Emission {
    /// The user the record is keyed by (see [`rtap::kafka::record_key`]).
    pub user_id: i64,
    /// Event time, used as the record timestamp.
    pub occurred_at: DateTime<Utc>,
    /// What the record is.
    pub kind: EmissionKind,
}

/// What a record is, for the ground truth, and what its value is made of.
#[derive(Debug, Clone, PartialEq)]
pub enum EmissionKind {
    /// A valid event produced for the first time.
    Event {
        /// The event.
        event: Event,
        /// It was held back and produced after newer events.
        late: bool,
    },
    /// A repeat of an event already produced (same `event_id`, same value).
    Duplicate(Event),
    /// A payload a consumer must reject.
    Malformed {
        /// How it is broken.
        kind: MalformedKind,
        /// The record value.
        payload: Vec<u8>,
    },
}

impl Emission {
    /// The record key.
    pub fn key(&self) -> Vec<u8> {
        rtap::kafka::record_key(self.user_id)
    }

    /// The record value: the encoded event, or the malformed payload.
    pub fn value(&self) -> Vec<u8> {
        let mut value = Vec::new();
        self.write_value(&mut value);
        value
    }

    /// Appends the record value to `buffer`.
    pub fn write_value(&self, buffer: &mut Vec<u8>) {
        match &self.kind {
            EmissionKind::Event { event, .. } | EmissionKind::Duplicate(event) => {
                event.encode(buffer);
            }
            EmissionKind::Malformed { payload, .. } => buffer.extend_from_slice(payload),
        }
    }
}

/// The kinds of malformed payload the simulator injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MalformedKind {
    /// Not protobuf at all.
    Garbage,
    /// A valid event cut short.
    Truncated,
    /// Event type left unspecified.
    UnspecifiedType,
    /// No `event_id`.
    MissingEventId,
    /// Event time a week in the future.
    FutureTime,
    /// Negative dwell time.
    NegativeDwell,
}

impl MalformedKind {
    const ALL: [Self; 6] = [
        Self::Garbage,
        Self::Truncated,
        Self::UnspecifiedType,
        Self::MissingEventId,
        Self::FutureTime,
        Self::NegativeDwell,
    ];

    /// Stable name, as written to the ground truth.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Garbage => "garbage",
            Self::Truncated => "truncated",
            Self::UnspecifiedType => "unspecified_type",
            Self::MissingEventId => "missing_event_id",
            Self::FutureTime => "future_time",
            Self::NegativeDwell => "negative_dwell",
        }
    }
}

/// One event of a session, as drawn at its step.
#[derive(Debug, Clone, Copy)]
struct SessionEvent {
    event_type: EventType,
    product: Option<ProductInfo>,
    /// Time until the session's next event (dwell time on this page).
    gap_micros: i64,
    quantity: u32,
    search: SearchQuery,
}

/// Who a drawn event belongs to.
#[derive(Debug, Clone, Copy)]
struct SessionInfo {
    user_id: i64,
    source: Source,
    session_id: Uuid,
}

/// A session under way: whose it is and where it stands in the funnel.
/// Tens of thousands are under way, each in the agenda, which moves them
/// from bucket to bucket: it is kept to 40 bytes (the generator's time went
/// mostly to cache misses while sessions carried their whole plan).
#[derive(Debug, Clone, Copy)]
struct Session {
    id: Uuid,
    user_id: i64,
    /// Position in `Generator::users`, to free the user at the end.
    user: u32,
    /// Position in `Generator::products` of the product in the cart, or to
    /// be added to it: the first one viewed.
    cart_item: u32,
    /// Position of the product that replaces a removed cart item: one of the
    /// products viewed, each as likely (reservoir sampling).
    replacement: u32,
    step: Step,
    mobile: bool,
    /// Products viewed so far.
    views: u8,
    /// Quantity in the cart.
    quantity: u8,
}

// The size the `Session` docs promise.
const _: () = assert!(std::mem::size_of::<Session>() == 40);

/// The next event of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Landing,
    Search,
    ProductView,
    /// A page view after a product view.
    Browse,
    AddToCart,
    RemoveFromCart,
    /// The add to cart of the replacement of a removed item.
    AddReplacement,
    Purchase,
}

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
        let events_per_session = expected_events_per_session(&params);
        let requested = events_per_second / events_per_session;
        // One session per user at a time, and a gap before the next: a small
        // population cannot sustain any rate. Arrivals beyond half that
        // capacity would mostly find their user busy and be skipped, so the
        // rate is capped there instead, with a warning.
        let capacity = population.users.len() as f64
            / (params.session_gap.as_secs_f64() + TYPICAL_SESSION_SECONDS)
            / 2.0;
        if requested > capacity {
            tracing::warn!(
                users = population.users.len(),
                requested_events_per_second = events_per_second,
                achievable_events_per_second = capacity * events_per_session,
                "too few users for this event rate; producing at the achievable rate (add users, shorten --session-gap or lower the rate)"
            );
        }
        let sessions_per_micro = requested.min(capacity) / MICROS_PER_SECOND as f64;
        let interarrival = Exp::new(sessions_per_micro)
            .map_err(|e| ModelError::Params(format!("session arrival rate: {e}")))?;
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
                let emission = Self::emission_of(event, true);
                self.held_back.push(Reverse(HeldBack {
                    release_micros: event.occurred_at_micros + hold,
                    sequence: self.sequence,
                    emission,
                }));
                continue;
            }
            let duplicate = chance(self.params.duplicate_share);
            let malformed = chance(self.params.malformed_share).then(|| self.malformed(&event));
            let emission = Self::emission_of(event, false);
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

    /// The record of a valid event.
    fn emission_of(event: Event, late: bool) -> Emission {
        Emission {
            user_id: event.user_id,
            occurred_at: event.occurred_at(),
            kind: EmissionKind::Event { event, late },
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
            let (drawn, next) = self.take_step(&mut session);
            let info = SessionInfo {
                user_id: session.user_id,
                source: if session.mobile {
                    Source::MobileApp
                } else {
                    Source::Web
                },
                session_id: session.id,
            };
            match next {
                Some(step) => {
                    session.step = step;
                    self.agenda.push(time + drawn.gap_micros, session);
                }
                None => {
                    let free_at = time + micros(self.params.session_gap) + MICROS_PER_SECOND;
                    self.availability.cool_down(session.user, free_at);
                }
            }
            return (time, info, drawn);
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
        let session = Session {
            id: random_uuid(&mut self.rng),
            user_id,
            // `new` checked that positions fit a u32.
            user: user as u32,
            cart_item: 0,
            replacement: 0,
            step: Step::Landing,
            mobile: self.rng.random_bool(self.params.mobile_share),
            views: 0,
            quantity: 0,
        };
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

    /// Draws the event of `session`'s step, and the step after it (`None`:
    /// that was the session's last event). Each decision is drawn when the
    /// session reaches it, with the rate of the funnel stage it decides.
    fn take_step(&mut self, session: &mut Session) -> (SessionEvent, Option<Step>) {
        match session.step {
            Step::Landing => {
                let event = self.page(EventType::PageView);
                let next = self
                    .maybe(self.params.search_rate, Step::Search)
                    .or_else(|| self.first_view());
                (event, next)
            }
            Step::Search => {
                let mut search = SearchQuery {
                    len: self.rng.random_range(1..=2),
                    ..SearchQuery::default()
                };
                for word in 0..usize::from(search.len) {
                    // SEARCH_WORDS has fewer than 256 words.
                    search.words[word] = self.rng.random_range(0..SEARCH_WORDS.len()) as u8;
                }
                let event = SessionEvent {
                    search,
                    ..self.page(EventType::Search)
                };
                (event, self.first_view())
            }
            Step::ProductView => {
                let position = self.product_rank.sample(&mut self.rng) as u32;
                session.views += 1;
                if session.views == 1 {
                    session.cart_item = position;
                }
                if self.rng.random_range(0..session.views) == 0 {
                    session.replacement = position;
                }
                let event = SessionEvent {
                    product: Some(self.products[position as usize]),
                    gap_micros: self.dwell(),
                    ..self.page(EventType::ProductView)
                };
                let next = self
                    .maybe(0.3, Step::Browse)
                    .or_else(|| self.after_views(session));
                (event, next)
            }
            Step::Browse => {
                let event = self.page(EventType::PageView);
                (event, self.after_views(session))
            }
            Step::AddToCart => {
                session.quantity = self.quantity();
                let event = self.cart(EventType::AddToCart, session);
                let next = self
                    .maybe(self.params.remove_rate, Step::RemoveFromCart)
                    .or_else(|| self.purchase());
                (event, next)
            }
            Step::RemoveFromCart => {
                let event = self.cart(EventType::RemoveFromCart, session);
                session.cart_item = session.replacement;
                (event, Some(Step::AddReplacement))
            }
            Step::AddReplacement => {
                session.quantity = self.quantity();
                let event = self.cart(EventType::AddToCart, session);
                (event, self.purchase())
            }
            Step::Purchase => (self.cart(EventType::Purchase, session), None),
        }
    }

    /// `step` with probability `share`.
    fn maybe(&mut self, share: f64, step: Step) -> Option<Step> {
        self.rng.random_bool(share).then_some(step)
    }

    /// After the landing page (and search): a product view, or leaving.
    fn first_view(&mut self) -> Option<Step> {
        self.maybe(self.params.view_rate, Step::ProductView)
    }

    /// After a product view (and the page view that may follow it): another
    /// view (the number of views is geometric, at most
    /// `MAX_VIEWS_PER_SESSION`), an add to cart, or leaving.
    fn after_views(&mut self, session: &Session) -> Option<Step> {
        let another = (u32::from(session.views) < MAX_VIEWS_PER_SESSION)
            .then(|| self.maybe(0.6, Step::ProductView))
            .flatten();
        another.or_else(|| self.maybe(self.params.cart_rate, Step::AddToCart))
    }

    /// After the cart is settled: a purchase, or leaving.
    fn purchase(&mut self) -> Option<Step> {
        self.maybe(self.params.purchase_rate, Step::Purchase)
    }

    fn page(&mut self, event_type: EventType) -> SessionEvent {
        SessionEvent {
            event_type,
            product: None,
            gap_micros: self
                .rng
                .random_range(2 * MICROS_PER_SECOND..=45 * MICROS_PER_SECOND),
            quantity: 0,
            search: SearchQuery::default(),
        }
    }

    /// A cart event of `session`'s cart item and quantity.
    fn cart(&mut self, event_type: EventType, session: &Session) -> SessionEvent {
        SessionEvent {
            product: Some(self.products[session.cart_item as usize]),
            quantity: u32::from(session.quantity),
            ..self.page(event_type)
        }
    }

    fn quantity(&mut self) -> u8 {
        match self.rng.random_range(0..10) {
            0..=6 => 1,
            7..=8 => 2,
            _ => 3,
        }
    }

    fn dwell(&mut self) -> i64 {
        let mean = micros(self.params.mean_dwell) as f64;
        let drawn = -mean * (1.0 - self.rng.random::<f64>()).ln();
        let cap = MAX_DWELL_MICROS.min(micros(self.params.session_gap) / 2);
        (drawn as i64).clamp(MICROS_PER_SECOND, cap)
    }

    fn malformed(&mut self, event: &Event) -> Emission {
        let kind = MalformedKind::ALL[self.rng.random_range(0..MalformedKind::ALL.len())];
        let mut broken = event.to_message();
        broken.event_id = random_uuid(&mut self.rng).hyphenated().to_string();
        let value = match kind {
            MalformedKind::Garbage => {
                // 0x0f: field 1 with wire type 7, which does not exist.
                let mut bytes = vec![0x0f];
                let len = self.rng.random_range(8..32);
                bytes.extend((0..len).map(|_| self.rng.random::<u8>()));
                bytes
            }
            MalformedKind::Truncated => {
                // Cuts through the 36-character event_id, the first field.
                let mut bytes = broken.encode_to_vec();
                bytes.truncate(10);
                bytes
            }
            MalformedKind::UnspecifiedType => {
                broken.r#type = EventType::Unspecified as i32;
                broken.encode_to_vec()
            }
            MalformedKind::MissingEventId => {
                broken.event_id.clear();
                broken.encode_to_vec()
            }
            MalformedKind::FutureTime => {
                let time = broken.occurred_at.unwrap_or_default();
                broken.occurred_at = Some(prost_types::Timestamp {
                    seconds: time.seconds + 7 * 24 * 3600,
                    nanos: time.nanos,
                });
                broken.encode_to_vec()
            }
            MalformedKind::NegativeDwell => {
                broken.dwell_time = Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                });
                broken.encode_to_vec()
            }
        };
        Emission {
            user_id: event.user_id,
            occurred_at: event.occurred_at(),
            kind: EmissionKind::Malformed {
                kind,
                payload: value,
            },
        }
    }
}

/// Draws positions `0..n` with Zipf weights `1 / (position + 1)^exponent`.
enum ZipfRank {
    /// Alias method: one look-up per draw, in a table of 8 bytes per
    /// position.
    Table(AliasTable),
    /// Rejection-inversion: a few `powf` per draw and no table, faster than
    /// a table far too big for the cache (a million users: 8 MB). The
    /// second field is the last position.
    Formula(Zipf<f64>, usize),
}

impl ZipfRank {
    /// Largest population drawn from a table (2 MB): covers a shard of the
    /// default million users over four partitions, where the table was
    /// faster than the formula's `powf` calls end to end.
    const MAX_TABLE: usize = 1 << 18;

    fn new(n: usize, exponent: f64) -> Result<Self, ModelError> {
        if n <= Self::MAX_TABLE {
            Self::table(n, exponent)
        } else {
            Self::formula(n, exponent)
        }
    }

    fn table(n: usize, exponent: f64) -> Result<Self, ModelError> {
        let weights: Vec<f64> = (1..=n).map(|rank| (rank as f64).powf(-exponent)).collect();
        AliasTable::new(&weights)
            .map(Self::Table)
            .map_err(|e| ModelError::Params(format!("Zipf ranks: {e}")))
    }

    fn formula(n: usize, exponent: f64) -> Result<Self, ModelError> {
        Zipf::new(n as f64, exponent)
            .map(|zipf| Self::Formula(zipf, n.saturating_sub(1)))
            .map_err(|e| ModelError::Params(format!("Zipf ranks: {e}")))
    }

    fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> usize {
        let [position] = self.sample_array(rng);
        position
    }

    /// `N` independent draws (see [`AliasTable::sample_array`]).
    fn sample_array<const N: usize>(&self, rng: &mut Xoshiro256PlusPlus) -> [usize; N] {
        match self {
            Self::Table(table) => table.sample_array(rng),
            // Ranks 1..=n, as whole numbers in an f64.
            Self::Formula(zipf, last) => {
                std::array::from_fn(|_| (zipf.sample(rng) as usize).saturating_sub(1).min(*last))
            }
        }
    }
}

/// Average events in a session, to turn an event rate into a session rate.
fn expected_events_per_session(p: &ModelParams) -> f64 {
    // Views: 1 + a geometric tail (p = 0.6, cut at MAX_VIEWS_PER_SESSION);
    // each view is followed by a page view 30% of the time.
    let tail: f64 = (1..MAX_VIEWS_PER_SESSION)
        .map(|k| 0.6_f64.powi(k as i32))
        .sum();
    let views = 1.0 + tail;
    let carts = p.view_rate * p.cart_rate;
    1.0 + p.search_rate
        + p.view_rate * views * 1.3
        + carts * (1.0 + 2.0 * p.remove_rate)
        + carts * p.purchase_rate
}

/// A version 4 (random) UUID.
fn random_uuid(rng: &mut Xoshiro256PlusPlus) -> Uuid {
    // One u128, not `[u8; 16]`: rand draws an array element by element, a
    // word of the generator per byte.
    uuid::Builder::from_random_bytes(rng.random::<u128>().to_le_bytes()).into_uuid()
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use rtap::v1::InteractionEvent;

    use super::*;

    fn start() -> DateTime<Utc> {
        "2026-01-05T08:00:00Z".parse().expect("a valid time")
    }

    fn generator(params: ModelParams, seed: u64, events_per_second: f64) -> Generator {
        Generator::new(
            params,
            Population::synthetic(1_000_000, 1000),
            seed,
            start(),
            events_per_second,
        )
        .expect("valid model")
    }

    fn events(emissions: &[Emission]) -> Vec<InteractionEvent> {
        emissions
            .iter()
            .filter(|e| matches!(e.kind, EmissionKind::Event { .. }))
            .map(|e| InteractionEvent::decode(e.value().as_slice()).expect("valid events decode"))
            .collect()
    }

    /// Defaults, with every kind of record: duplicates and malformed ones.
    fn with_duplicates_and_malformed() -> ModelParams {
        ModelParams {
            duplicate_share: 0.05,
            malformed_share: 0.05,
            ..ModelParams::default()
        }
    }

    fn take(generator: &mut Generator, n: usize) -> Vec<Emission> {
        (0..n).map(|_| generator.next_emission()).collect()
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
    fn product_views_follow_the_zipf_law() {
        let exponent = 1.1;
        let emissions = take(&mut generator(ModelParams::default(), 7, 1000.0), 200_000);
        let mut views: HashMap<i64, u64> = HashMap::new();
        for event in events(&emissions) {
            if event.r#type() == EventType::ProductView {
                *views.entry(event.product_id).or_default() += 1;
            }
        }
        let total: u64 = views.values().sum();
        let mut counts: Vec<u64> = views.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top10: u64 = counts.iter().take(10).sum();
        let harmonic = |n: u32| (1..=n).map(|k| f64::from(k).powf(-exponent)).sum::<f64>();
        let expected = harmonic(10) / harmonic(1000);
        let observed = top10 as f64 / total as f64;
        assert!(
            (observed - expected).abs() < 0.02,
            "top-10 share {observed:.3}, Zipf {expected:.3}"
        );
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
    fn zipf_ranks_from_the_table_and_the_formula_agree() {
        let (n, exponent, draws) = (50_000, 0.8, 400_000);
        let harmonic = |n: u32| (1..=n).map(|k| f64::from(k).powf(-exponent)).sum::<f64>();
        let expected_top_100 = harmonic(100) / harmonic(50_000);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        for ranks in [
            ZipfRank::table(n, exponent).expect("a table"),
            ZipfRank::formula(n, exponent).expect("a formula"),
        ] {
            let mut first = 0_u32;
            let mut top_100 = 0_u32;
            for _ in 0..draws {
                let rank = ranks.sample(&mut rng);
                assert!(rank < n);
                first += u32::from(rank == 0);
                top_100 += u32::from(rank < 100);
            }
            let share = f64::from(top_100) / f64::from(draws);
            assert!(
                (share - expected_top_100).abs() < 0.005,
                "top-100 share {share:.4}, Zipf {expected_top_100:.4}"
            );
            let first_share = f64::from(first) / f64::from(draws);
            let expected_first = 1.0 / harmonic(50_000);
            assert!(
                (first_share - expected_first).abs() < 0.0015,
                "rank-1 share {first_share:.4}, Zipf {expected_first:.4}"
            );
        }
    }

    #[test]
    fn funnel_rates_and_source_mix_are_reproduced() {
        let params = ModelParams::default();
        // A low rate stretches the run over hours, so few sessions are cut
        // by its start or end; those are left out below anyway.
        let emissions = take(&mut generator(params.clone(), 11, 10.0), 150_000);
        let events = events(&emissions);
        let last = events
            .iter()
            .filter_map(|e| e.occurred_at.map(|t| t.seconds))
            .max()
            .expect("events");
        #[derive(Default)]
        struct Stages {
            landed_at: Option<i64>,
            mobile: bool,
            viewed: bool,
            carted: bool,
            bought: bool,
        }
        let mut sessions: HashMap<String, Stages> = HashMap::new();
        for event in &events {
            let stages = sessions.entry(event.session_id.clone()).or_default();
            if stages.landed_at.is_none() && event.r#type() == EventType::PageView {
                stages.landed_at = event.occurred_at.map(|t| t.seconds);
            }
            stages.mobile = event.source() == Source::MobileApp;
            stages.viewed |= event.r#type() == EventType::ProductView;
            stages.carted |= event.r#type() == EventType::AddToCart;
            stages.bought |= event.r#type() == EventType::Purchase;
        }
        // Whole sessions: seen from their landing page, started an hour
        // before the end.
        let whole: Vec<_> = sessions
            .values()
            .filter(|s| s.landed_at.is_some_and(|t| t < last - 3600))
            .collect();
        let count = |f: fn(&Stages) -> bool| whole.iter().filter(|s| f(s)).count() as f64;
        let n = whole.len() as f64;
        assert!(n > 20_000.0, "{n} whole sessions");
        let view = count(|s| s.viewed) / n;
        let cart = count(|s| s.carted) / count(|s| s.viewed);
        let buy = count(|s| s.bought) / count(|s| s.carted);
        let mobile = count(|s| s.mobile) / n;
        for (name, observed, expected, tolerance) in [
            ("view", view, params.view_rate, 0.015),
            ("cart", cart, params.cart_rate, 0.02),
            ("purchase", buy, params.purchase_rate, 0.03),
            ("mobile", mobile, params.mobile_share, 0.015),
        ] {
            assert!(
                (observed - expected).abs() < tolerance,
                "{name}: observed {observed:.3}, configured {expected}"
            );
        }
    }

    #[test]
    fn ids_are_random_version_4_uuids() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        let ids: Vec<Uuid> = (0..1000).map(|_| random_uuid(&mut rng)).collect();
        for id in &ids {
            assert_eq!(id.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
        // The other 122 bits vary: every bit position takes both values.
        let (ones, zeros) = ids.iter().fold((0u128, 0u128), |(ones, zeros), id| {
            (ones | id.as_u128(), zeros | !id.as_u128())
        });
        let fixed = (0xf << 76) | (0b11 << 62);
        assert_eq!(ones & zeros, !fixed);
    }

    #[test]
    fn carts_hold_products_the_session_viewed() {
        let params = ModelParams {
            cart_rate: 1.0,
            remove_rate: 1.0,
            late_share: 0.0,
            ..ModelParams::default()
        };
        // About 14 hours of events. Sessions under way at the start were
        // partly produced during the warm-up; a session lasts less than
        // four hours, so those first seen later are seen whole.
        let events = events(&take(&mut generator(params, 5, 2.0), 100_000));
        let whole_after = start().timestamp() + 4 * 3600;
        #[derive(Default)]
        struct Cart {
            whole: bool,
            viewed: Vec<i64>,
            item: Option<(i64, u32)>,
            removed: bool,
        }
        let mut sessions: HashMap<&str, Cart> = HashMap::new();
        // For sessions of two views that swap their item: how often the
        // replacement is the first product viewed.
        let (mut swaps_of_two, mut first_chosen) = (0, 0);
        for event in &events {
            let cart = sessions
                .entry(event.session_id.as_str())
                .or_insert_with(|| Cart {
                    whole: event.occurred_at.is_some_and(|t| t.seconds > whole_after),
                    ..Cart::default()
                });
            if !cart.whole {
                continue;
            }
            let item = (event.product_id, event.quantity);
            match event.r#type() {
                EventType::ProductView => cart.viewed.push(event.product_id),
                EventType::AddToCart if cart.removed => {
                    assert!(cart.viewed.contains(&event.product_id), "{event:?}");
                    if cart.viewed.len() == 2 && cart.viewed[0] != cart.viewed[1] {
                        swaps_of_two += 1;
                        first_chosen += i32::from(event.product_id == cart.viewed[0]);
                    }
                    cart.item = Some(item);
                }
                EventType::AddToCart => {
                    assert_eq!(event.product_id, cart.viewed[0], "{event:?}");
                    cart.item = Some(item);
                }
                EventType::RemoveFromCart => {
                    assert_eq!(cart.item, Some(item));
                    cart.removed = true;
                }
                EventType::Purchase => assert_eq!(cart.item, Some(item)),
                _ => {}
            }
        }
        assert!(swaps_of_two > 1000, "{swaps_of_two} swaps");
        let share = f64::from(first_chosen) / f64::from(swaps_of_two);
        assert!((share - 0.5).abs() < 0.05, "first viewed chosen {share}");
    }

    #[test]
    fn duplicate_and_malformed_shares_are_honoured() {
        let params = ModelParams {
            duplicate_share: 0.05,
            malformed_share: 0.02,
            late_share: 0.0,
            ..ModelParams::default()
        };
        let emissions = take(&mut generator(params, 3, 1000.0), 100_000);
        let mut originals = 0.0_f64;
        let mut duplicates = 0.0_f64;
        let mut malformed: HashMap<MalformedKind, f64> = HashMap::new();
        for (i, emission) in emissions.iter().enumerate() {
            match &emission.kind {
                EmissionKind::Event { .. } => originals += 1.0,
                EmissionKind::Duplicate(_) => {
                    duplicates += 1.0;
                    assert_eq!(
                        emission.value(),
                        emissions[i - 1].value(),
                        "same payload, same event_id"
                    );
                }
                EmissionKind::Malformed { kind, .. } => {
                    *malformed.entry(*kind).or_default() += 1.0;
                    let decoded = InteractionEvent::decode(emission.value().as_slice());
                    match kind {
                        MalformedKind::Garbage | MalformedKind::Truncated => {
                            assert!(decoded.is_err())
                        }
                        MalformedKind::UnspecifiedType => {
                            assert_eq!(decoded.expect("decodes").r#type(), EventType::Unspecified);
                        }
                        MalformedKind::MissingEventId => {
                            assert!(decoded.expect("decodes").event_id.is_empty());
                        }
                        MalformedKind::FutureTime => {
                            let time = decoded.expect("decodes").occurred_at.expect("time");
                            assert!(time.seconds > emission.occurred_at.timestamp() + 6 * 86_400);
                        }
                        MalformedKind::NegativeDwell => {
                            assert!(
                                decoded.expect("decodes").dwell_time.expect("dwell").seconds < 0
                            );
                        }
                    }
                }
            }
        }
        assert!(
            (duplicates / originals - 0.05).abs() < 0.004,
            "{duplicates}"
        );
        let bad: f64 = malformed.values().sum();
        assert!((bad / originals - 0.02).abs() < 0.003, "{bad}");
        assert_eq!(
            malformed.len(),
            MalformedKind::ALL.len(),
            "every kind appears"
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
