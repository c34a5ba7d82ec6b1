//! The parameters of the model: what they mean, their defaults and the
//! rules between them.
//!
//! Each default is a named constant here, and both the flags (`#[arg]`) and
//! [`ModelParams::default`] read it, so the two cannot disagree. Duration
//! defaults are written as the text `--help` shows and clap parses.

use std::time::Duration;

use clap::Args;

use super::ModelError;

/// Default share of sessions on the mobile app.
pub const DEFAULT_MOBILE_SHARE: f64 = 0.4;
/// Default Zipf exponent of product popularity.
pub const DEFAULT_PRODUCT_ZIPF_EXPONENT: f64 = 1.1;
/// Default Zipf exponent of user activity.
pub const DEFAULT_USER_ZIPF_EXPONENT: f64 = 0.8;
/// Default share of sessions that view at least one product.
pub const DEFAULT_VIEW_RATE: f64 = 0.7;
/// Default share of product-viewing sessions that add to cart.
pub const DEFAULT_CART_RATE: f64 = 0.3;
/// Default share of sessions with a cart that purchase.
pub const DEFAULT_PURCHASE_RATE: f64 = 0.4;
/// Default share of sessions that search.
pub const DEFAULT_SEARCH_RATE: f64 = 0.25;
/// Default share of sessions with a cart that swap the item.
pub const DEFAULT_REMOVE_RATE: f64 = 0.15;
/// Default mean time on a product page.
pub const DEFAULT_MEAN_DWELL: &str = "40s";
/// Default inactivity that ends a session.
pub const DEFAULT_SESSION_GAP: &str = "30m";
/// Default share of events delivered late.
pub const DEFAULT_LATE_SHARE: f64 = 0.01;
/// Default longest hold-back of a late event.
pub const DEFAULT_MAX_LATENESS: &str = "10m";
/// Default share of events produced twice.
pub const DEFAULT_DUPLICATE_SHARE: f64 = 0.0;
/// Default share of events followed by a malformed payload.
pub const DEFAULT_MALFORMED_SHARE: f64 = 0.0;

/// Behaviour of the simulated users.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct ModelParams {
    /// Share of sessions on the mobile app; the rest are on the website.
    #[arg(long, default_value_t = DEFAULT_MOBILE_SHARE, value_parser = parse_share)]
    pub mobile_share: f64,
    /// Zipf exponent of product popularity (higher: fewer products dominate).
    #[arg(long, default_value_t = DEFAULT_PRODUCT_ZIPF_EXPONENT, value_parser = parse_positive)]
    pub product_zipf_exponent: f64,
    /// Zipf exponent of user activity (higher: fewer, heavier users).
    #[arg(long, default_value_t = DEFAULT_USER_ZIPF_EXPONENT, value_parser = parse_positive)]
    pub user_zipf_exponent: f64,
    /// Share of sessions that view at least one product.
    #[arg(long, default_value_t = DEFAULT_VIEW_RATE, value_parser = parse_share)]
    pub view_rate: f64,
    /// Share of product-viewing sessions that add to cart.
    #[arg(long, default_value_t = DEFAULT_CART_RATE, value_parser = parse_share)]
    pub cart_rate: f64,
    /// Share of sessions with a cart that purchase.
    #[arg(long, default_value_t = DEFAULT_PURCHASE_RATE, value_parser = parse_share)]
    pub purchase_rate: f64,
    /// Share of sessions that search.
    #[arg(long, default_value_t = DEFAULT_SEARCH_RATE, value_parser = parse_share)]
    pub search_rate: f64,
    /// Share of sessions with a cart that remove the item and add another.
    #[arg(long, default_value_t = DEFAULT_REMOVE_RATE, value_parser = parse_share)]
    pub remove_rate: f64,
    /// Mean time spent on a product page.
    #[arg(long, default_value = DEFAULT_MEAN_DWELL, value_parser = humantime::parse_duration)]
    pub mean_dwell: Duration,
    /// Inactivity that ends a session (at least 2 minutes).
    #[arg(long, default_value = DEFAULT_SESSION_GAP, value_parser = humantime::parse_duration)]
    pub session_gap: Duration,
    /// Share of events delivered late: held back, then produced after newer
    /// events, with their original event time.
    #[arg(long, default_value_t = DEFAULT_LATE_SHARE, value_parser = parse_share)]
    pub late_share: f64,
    /// Longest hold-back of a late event, in event time.
    #[arg(long, default_value = DEFAULT_MAX_LATENESS, value_parser = humantime::parse_duration)]
    pub max_lateness: Duration,
    /// Share of events produced a second time with the same `event_id` (as a
    /// retrying producer would).
    #[arg(long, default_value_t = DEFAULT_DUPLICATE_SHARE, value_parser = parse_share)]
    pub duplicate_share: f64,
    /// Share of events followed by a malformed payload of a random kind.
    #[arg(long, default_value_t = DEFAULT_MALFORMED_SHARE, value_parser = parse_share)]
    pub malformed_share: f64,
}

impl Default for ModelParams {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            mobile_share: DEFAULT_MOBILE_SHARE,
            product_zipf_exponent: DEFAULT_PRODUCT_ZIPF_EXPONENT,
            user_zipf_exponent: DEFAULT_USER_ZIPF_EXPONENT,
            view_rate: DEFAULT_VIEW_RATE,
            cart_rate: DEFAULT_CART_RATE,
            purchase_rate: DEFAULT_PURCHASE_RATE,
            search_rate: DEFAULT_SEARCH_RATE,
            remove_rate: DEFAULT_REMOVE_RATE,
            mean_dwell: const { duration(DEFAULT_MEAN_DWELL) },
            session_gap: const { duration(DEFAULT_SESSION_GAP) },
            late_share: DEFAULT_LATE_SHARE,
            max_lateness: const { duration(DEFAULT_MAX_LATENESS) },
            duplicate_share: DEFAULT_DUPLICATE_SHARE,
            malformed_share: DEFAULT_MALFORMED_SHARE,
        }
    }
}

/// Refuses parameters that contradict each other.
pub fn validate(params: &ModelParams) -> Result<(), ModelError> {
    if params.session_gap < Duration::from_secs(120) {
        return Err(ModelError::Params(
            "--session-gap must be at least 2m".into(),
        ));
    }
    if params.mean_dwell.is_zero() || params.mean_dwell * 4 > params.session_gap {
        return Err(ModelError::Params(
            "--mean-dwell must be positive and at most a quarter of --session-gap".into(),
        ));
    }
    if params.late_share > 0.0 && params.max_lateness < Duration::from_secs(2) {
        return Err(ModelError::Params(
            "--max-lateness must be at least 2s".into(),
        ));
    }
    Ok(())
}

/// A positive, finite number (a flag's value parser).
pub(crate) fn parse_positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("`{text}` is not a positive number")),
    }
}

/// A share from 0 to 1 (a flag's value parser).
pub(crate) fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("`{text}` is not a share between 0 and 1")),
    }
}

/// A duration default's text as the `Duration` clap parses it into, at
/// compile time, so `Default` needs no parse that could fail. It reads the
/// forms the defaults use, a whole number of seconds (`40s`) or minutes
/// (`30m`); any other stops the build (the test below checks it agrees with
/// humantime).
const fn duration(text: &str) -> Duration {
    let bytes = text.as_bytes();
    let Some((unit, digits)) = bytes.split_last() else {
        panic!("an empty duration default");
    };
    assert!(!digits.is_empty(), "a duration default without a number");
    let mut number = 0_u64;
    let mut i = 0;
    while i < digits.len() {
        assert!(digits[i].is_ascii_digit(), "a duration default is whole");
        number = number * 10 + (digits[i] - b'0') as u64;
        i += 1;
    }
    match unit {
        b's' => Duration::from_secs(number),
        b'm' => Duration::from_secs(number * 60),
        _ => panic!("a duration default is in s or m"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        params: ModelParams,
    }

    #[test]
    fn the_flags_defaults_are_the_default_params() {
        let flags = Flags::try_parse_from(["rtap-simulator"]).expect("defaults parse");
        assert_eq!(flags.params, ModelParams::default());
        assert!(validate(&flags.params).is_ok());
    }

    #[test]
    fn duration_defaults_read_as_humantime_reads_them() {
        for text in [
            DEFAULT_MEAN_DWELL,
            DEFAULT_SESSION_GAP,
            DEFAULT_MAX_LATENESS,
            "0s",
            "1m",
            "125s",
        ] {
            assert_eq!(
                Ok(duration(text)),
                humantime::parse_duration(text),
                "{text}"
            );
        }
    }

    #[test]
    fn each_contradiction_between_parameters_is_refused() {
        let short_gap = ModelParams {
            session_gap: Duration::from_secs(60),
            ..ModelParams::default()
        };
        let long_dwell = ModelParams {
            mean_dwell: Duration::from_secs(3600),
            ..ModelParams::default()
        };
        let no_lateness = ModelParams {
            late_share: 0.1,
            max_lateness: Duration::from_secs(1),
            ..ModelParams::default()
        };
        for params in [short_gap, long_dwell, no_lateness] {
            assert!(validate(&params).is_err(), "{params:?}");
        }
    }
}
