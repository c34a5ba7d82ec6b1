//! Bench sizes read from the environment. Shared by the simulator's produce
//! bench and the server's benches.

use std::{fmt, str::FromStr};

/// A bench setting that is set to something other than a count.
pub struct BadSetting(String);

impl fmt::Display for BadSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The message alone: a bench's `main` prints the error it returns with
/// `Debug`.
impl fmt::Debug for BadSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadSetting {}

/// The count in environment variable `name`, or `default` when it is unset.
/// Set to anything else, it is an error naming the variable: a typo must not
/// run the bench at its default size as if asked to.
pub fn env_count<T>(name: &str, default: T) -> Result<T, BadSetting>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Ok(value) => value
            .trim()
            .parse()
            .map_err(|error| BadSetting(format!("{name}={value:?} is not a count: {error}"))),
        Err(error) => Err(BadSetting(format!("{name}: {error}"))),
    }
}
