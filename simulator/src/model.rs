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
//! and a start time fully determine the output: moving code must not
//! reorder draws. It is xoshiro256++, not a cryptographic generator: the
//! model draws a dozen numbers per event, and nothing here needs them
//! unpredictable, only fast.
//!
//! - [`params`]: the parameters, their defaults and the rules between them;
//! - `population`: the users and products simulated;
//! - `generator`: session arrivals, the event-time order, late, repeated
//!   and malformed records;
//! - `session`: a session under way and the funnel steps it draws;
//! - `emission`: the records produced, and how malformed ones are broken;
//! - `event`: an event and its wire encoding;
//! - `agenda`, `availability`, `alias`, `zipf`: the data structures and
//!   draws those stand on.

mod agenda;
mod alias;
mod availability;
mod emission;
mod event;
mod generator;
pub mod params;
mod population;
mod session;
#[cfg(test)]
mod testing;
mod zipf;

pub use emission::{Emission, EmissionKind, MalformedKind};
pub use event::Event;
pub use generator::Generator;
pub use params::{ModelParams, validate};
pub use population::{Population, ProductInfo};

const MICROS_PER_SECOND: i64 = 1_000_000;

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

/// `duration` in whole microseconds, saturating.
fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
