//! A session under way, and the funnel it goes through: a landing page,
//! maybe a search, then product views, an add to cart (sometimes removed and
//! replaced) and a purchase, each step drawn when the session reaches it
//! with the rate of the funnel stage it decides.

use rand::Rng;
use rand_xoshiro::Xoshiro256PlusPlus;
use rtap::v1::{EventType, Source};
use uuid::Uuid;

use super::{
    MICROS_PER_SECOND,
    event::{SEARCH_WORDS, SearchQuery},
    micros,
    params::ModelParams,
    population::ProductInfo,
    zipf::ZipfRank,
};

/// Longest time on one page: dwell times are drawn from an exponential
/// distribution and cut here.
const MAX_DWELL_MICROS: i64 = 10 * 60 * MICROS_PER_SECOND;
/// Most product views in one session.
const MAX_VIEWS_PER_SESSION: u32 = 8;
/// Chance that a product view is followed by a page view.
const BROWSE_AFTER_VIEW: f64 = 0.3;
/// Chance of another product view after one (below the most views): the
/// number of views is geometric.
const ANOTHER_VIEW: f64 = 0.6;

/// One event of a session, as drawn at its step.
#[derive(Debug, Clone, Copy)]
pub(super) struct SessionEvent {
    pub(super) event_type: EventType,
    pub(super) product: Option<ProductInfo>,
    /// Time until the session's next event (dwell time on this page).
    pub(super) gap_micros: i64,
    pub(super) quantity: u32,
    pub(super) search: SearchQuery,
}

/// Who a drawn event belongs to.
#[derive(Debug, Clone, Copy)]
pub(super) struct SessionInfo {
    pub(super) user_id: i64,
    pub(super) source: Source,
    pub(super) session_id: Uuid,
}

/// A session under way: whose it is and where it stands in the funnel.
/// Tens of thousands are under way, each in the agenda, which moves them
/// from bucket to bucket: it is kept to 40 bytes (the generator's time went
/// mostly to cache misses while sessions carried their whole plan).
#[derive(Debug, Clone, Copy)]
pub(super) struct Session {
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

impl Session {
    /// A session of user `user_id` (at position `user`), at its landing page.
    pub(super) fn landing(id: Uuid, user_id: i64, user: u32, mobile: bool) -> Self {
        Self {
            id,
            user_id,
            user,
            cart_item: 0,
            replacement: 0,
            step: Step::Landing,
            mobile,
            views: 0,
            quantity: 0,
        }
    }

    /// The user's position in the population.
    pub(super) fn user(&self) -> u32 {
        self.user
    }

    /// Whose events these are, and where.
    pub(super) fn info(&self) -> SessionInfo {
        SessionInfo {
            user_id: self.user_id,
            source: if self.mobile {
                Source::MobileApp
            } else {
                Source::Web
            },
            session_id: self.id,
        }
    }
}

/// What a session's steps are drawn from: the generator's random stream, the
/// funnel's rates and the products with their popularity, borrowed from the
/// generator for one step.
pub(super) struct Steps<'a> {
    pub(super) rng: &'a mut Xoshiro256PlusPlus,
    pub(super) params: &'a ModelParams,
    pub(super) products: &'a [ProductInfo],
    pub(super) product_rank: &'a ZipfRank,
}

impl Steps<'_> {
    /// Draws the event of `session`'s step and moves the session to the
    /// step after it; `false`: that was the session's last event.
    pub(super) fn take_step(&mut self, session: &mut Session) -> (SessionEvent, bool) {
        let (event, next) = self.draw(session);
        if let Some(step) = next {
            session.step = step;
        }
        (event, next.is_some())
    }

    /// The event of `session`'s step, and the step after it (`None`: none).
    fn draw(&mut self, session: &mut Session) -> (SessionEvent, Option<Step>) {
        match session.step {
            Step::Landing => {
                let event = self.page(EventType::PageView);
                let next = self
                    .maybe(self.params.search_rate, Step::Search)
                    .or_else(|| self.first_view());
                (event, next)
            }
            Step::Search => (self.search(), self.first_view()),
            Step::ProductView => {
                let event = self.product_view(session);
                let next = self
                    .maybe(BROWSE_AFTER_VIEW, Step::Browse)
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
    /// view (at most `MAX_VIEWS_PER_SESSION`), an add to cart, or leaving.
    fn after_views(&mut self, session: &Session) -> Option<Step> {
        let another = (u32::from(session.views) < MAX_VIEWS_PER_SESSION)
            .then(|| self.maybe(ANOTHER_VIEW, Step::ProductView))
            .flatten();
        another.or_else(|| self.maybe(self.params.cart_rate, Step::AddToCart))
    }

    /// After the cart is settled: a purchase, or leaving.
    fn purchase(&mut self) -> Option<Step> {
        self.maybe(self.params.purchase_rate, Step::Purchase)
    }

    /// A search of one or two words.
    fn search(&mut self) -> SessionEvent {
        let mut search = SearchQuery {
            len: self.rng.random_range(1..=2),
            ..SearchQuery::default()
        };
        for word in 0..usize::from(search.len) {
            // SEARCH_WORDS has fewer than 256 words.
            search.words[word] = self.rng.random_range(0..SEARCH_WORDS.len()) as u8;
        }
        SessionEvent {
            search,
            ..self.page(EventType::Search)
        }
    }

    /// A view of a product drawn by popularity. The first one viewed is the
    /// cart item; each one viewed is as likely to be its replacement.
    fn product_view(&mut self, session: &mut Session) -> SessionEvent {
        let position = self.product_rank.sample(self.rng) as u32;
        session.views += 1;
        if session.views == 1 {
            session.cart_item = position;
        }
        if self.rng.random_range(0..session.views) == 0 {
            session.replacement = position;
        }
        SessionEvent {
            product: Some(self.products[position as usize]),
            gap_micros: self.dwell(),
            ..self.page(EventType::ProductView)
        }
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
}

/// Average events in a session, to turn an event rate into a session rate.
pub(super) fn expected_events_per_session(p: &ModelParams) -> f64 {
    // Views: 1 + a geometric tail (cut at MAX_VIEWS_PER_SESSION), each
    // followed by a page view at BROWSE_AFTER_VIEW.
    let tail: f64 = (1..MAX_VIEWS_PER_SESSION)
        .map(|k| ANOTHER_VIEW.powi(k as i32))
        .sum();
    let views = 1.0 + tail;
    let carts = p.view_rate * p.cart_rate;
    1.0 + p.search_rate
        + p.view_rate * views * (1.0 + BROWSE_AFTER_VIEW)
        + carts * (1.0 + 2.0 * p.remove_rate)
        + carts * p.purchase_rate
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::testing::{events, generator, start, take};

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
}
