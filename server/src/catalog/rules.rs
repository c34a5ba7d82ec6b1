//! The catalog's validation rules, as plain functions over plain values so
//! they can be tested without a database or a gRPC stack.
//!
//! Names (user first/last names, product names and categories) are stored
//! with surrounding whitespace trimmed, must be 1 to 256 characters after
//! trimming, and may not contain control characters. Uniqueness compares them
//! case-insensitively (`lower(...)` unique indexes), on create and update
//! alike: "Ada Lovelace" and " ada lovelace " are the same user.

use crate::error::{Error, FieldViolation, quote};

/// Longest name, in characters, as in the original schema (`VARCHAR(256)`).
pub(crate) const MAX_NAME_CHARS: usize = 256;
/// Longest email address, in characters.
pub(crate) const MAX_EMAIL_CHARS: usize = 256;
/// Page size when the request gives none.
pub(crate) const DEFAULT_PAGE_SIZE: u64 = 10;
/// Largest page size served; larger requests are lowered to it.
pub(crate) const MAX_PAGE_SIZE: u64 = 1000;

/// Collects the violations of one request, so every bad field is reported at
/// once rather than the first only.
#[derive(Debug, Default)]
pub(crate) struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Records that `field` is invalid.
    pub(crate) fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// The value of a rule that passed; `None` (and the violation recorded)
    /// if it failed.
    pub(crate) fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        result.map_err(|v| self.0.push(v)).ok()
    }

    /// As [`Violations::check`], for a rule that reports several violations.
    pub(crate) fn check_all<T>(&mut self, result: Result<T, Vec<FieldViolation>>) -> Option<T> {
        result.map_err(|all| self.0.extend(all)).ok()
    }

    /// The request's validated values if nothing was recorded, else
    /// INVALID_ARGUMENT with every violation.
    pub(crate) fn finish<T>(self, values: Option<T>) -> Result<T, Error> {
        self.into_result().map_err(Error::InvalidArgument)?;
        values.ok_or_else(|| Error::Internal("a rule failed without a violation".into()))
    }

    /// `Ok` if nothing was recorded, else every violation.
    pub(crate) fn into_result(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// The trimmed, lower-cased text of a list filter (`name_prefix`,
/// `category`), or a violation of `field`: control characters (PostgreSQL
/// rejects NUL in text) and text longer than any name can never match.
pub(crate) fn filter(field: &str, value: &str) -> Result<String, FieldViolation> {
    let trimmed = value.trim();
    if trimmed.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain control characters",
        ));
    }
    let chars = trimmed.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters (got {chars})"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// The trimmed name, or a violation of `field`.
pub(crate) fn name(field: &str, value: &str) -> Result<String, FieldViolation> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(FieldViolation::new(field, "must not be blank"));
    }
    let chars = trimmed.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters (got {chars})"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// The trimmed email address (`None` for absent or empty), or a violation.
/// The check is deliberately shallow (`local@domain.tld`, no spaces): the only
/// real test of an address is sending mail to it.
pub(crate) fn email(field: &str, value: Option<&str>) -> Result<Option<String>, FieldViolation> {
    let Some(trimmed) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let invalid = || FieldViolation::new(field, "must be an email address like name@example.com");
    if trimmed.chars().count() > MAX_EMAIL_CHARS {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {MAX_EMAIL_CHARS} characters"),
        ));
    }
    let (local, domain) = trimmed.split_once('@').ok_or_else(invalid)?;
    let well_formed = !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !trimmed.chars().any(|c| c.is_whitespace() || c.is_control());
    if well_formed {
        Ok(Some(trimmed.to_owned()))
    } else {
        Err(invalid())
    }
}

/// A price must be finite and not negative.
pub(crate) fn price(field: &str, value: f64) -> Result<f64, FieldViolation> {
    if !value.is_finite() {
        return Err(FieldViolation::new(field, "must be a finite number"));
    }
    if value < 0.0 {
        return Err(FieldViolation::new(field, "must not be negative"));
    }
    // -0.0 is stored as 0.
    Ok(value + 0.0)
}

/// Ids are server-assigned and positive.
pub(crate) fn id(field: &str, value: i64) -> Result<i64, FieldViolation> {
    if value > 0 {
        Ok(value)
    } else {
        Err(FieldViolation::new(field, "must be a positive id"))
    }
}

/// The page size to use for a requested `page_size`.
pub(crate) fn page_size(requested: i32) -> Result<u64, FieldViolation> {
    match u64::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
        Err(_) => Err(FieldViolation::new("page_size", "must not be negative")),
    }
}

/// The fields an update changes: the mask's paths (each checked against
/// `mutable`, with output-only fields named as such), or every mutable field
/// when the mask is empty (AIP-134). Duplicates are ignored.
pub(crate) fn update_mask(
    paths: &[String],
    mutable: &[&'static str],
    output_only: &[&str],
) -> Result<Vec<&'static str>, Vec<FieldViolation>> {
    if paths.is_empty() {
        return Ok(mutable.to_vec());
    }
    let mut fields = Vec::new();
    let mut violations = Violations::default();
    for (index, path) in paths.iter().enumerate() {
        let field = format!("update_mask.paths[{index}]");
        if let Some(known) = mutable.iter().find(|m| **m == path.as_str()) {
            if !fields.contains(known) {
                fields.push(*known);
            }
        } else if output_only.contains(&path.as_str()) {
            violations.add(
                field,
                format!("{} is output only and cannot be updated", quote(path)),
            );
        } else {
            violations.add(
                field,
                format!(
                    "unknown field {}; updatable fields: {}",
                    quote(path),
                    mutable.join(", ")
                ),
            );
        }
    }
    violations.into_result().map(|()| fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(name("f", "  Ada ").unwrap(), "Ada");
        assert!(name("f", "   ").is_err());
        assert!(name("f", "").is_err());
        assert!(name("f", &"x".repeat(256)).is_ok());
        let too_long = name("f", &"é".repeat(257)).unwrap_err();
        assert!(too_long.description.contains("256"));
        assert!(name("f", "a\0b").is_err());
    }

    #[test]
    fn emails_are_checked_and_empty_means_none() {
        assert_eq!(email("e", None).unwrap(), None);
        assert_eq!(email("e", Some("  ")).unwrap(), None);
        assert_eq!(
            email("e", Some(" ada@example.com ")).unwrap().as_deref(),
            Some("ada@example.com")
        );
        for bad in [
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@b@c.d",
            "a@.com",
            "a@x..com",
        ] {
            assert!(email("e", Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn prices_must_be_finite_and_not_negative() {
        assert_eq!(price("p", 0.0).unwrap(), 0.0);
        assert_eq!(price("p", 9.99).unwrap(), 9.99);
        assert!(price("p", -0.01).is_err());
        assert!(price("p", f64::NAN).is_err());
        assert!(price("p", f64::INFINITY).is_err());
        assert!(price("p", -0.0).unwrap().is_sign_positive());
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5).unwrap(), 5);
        assert_eq!(page_size(5000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn empty_masks_mean_every_mutable_field() {
        let fields = update_mask(&[], &["name", "price"], &["id"]).unwrap();
        assert_eq!(fields, ["name", "price"]);
    }

    #[test]
    fn masks_reject_output_only_and_unknown_paths_by_index() {
        let paths = ["price".to_owned(), "id".to_owned(), "colour".to_owned()];
        let violations = update_mask(&paths, &["name", "price"], &["id"]).unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["update_mask.paths[1]", "update_mask.paths[2]"]);
        assert!(violations[0].description.contains("output only"));
    }
}
