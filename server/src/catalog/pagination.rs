//! Keyset pagination (AIP-158) for the catalog's List methods.
//!
//! A page token records the sort order, a digest of the filters and the sort
//! key of the last row returned; the next page continues strictly after that
//! key, ties broken by id. Unlike OFFSET, pages stay correct when rows are
//! inserted or deleted between calls: no row is skipped or repeated, apart
//! from rows whose sort key itself changed in between.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, IdenStatic, ModelTrait, Order, QueryFilter, QueryOrder,
    QuerySelect, Select, sea_query::SimpleExpr,
};

use super::rules::{self, Violations};
use crate::error::{Error, FieldViolation, quote};

const TOKEN_VERSION: &str = "1";
const SEPARATOR: char = '\u{1f}';

/// The order of a List call: one field, then id in the same direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SortOrder {
    /// The sort field, one of the List method's documented fields.
    pub(crate) field: &'static str,
    /// `desc` was given.
    pub(crate) descending: bool,
}

impl SortOrder {
    /// The SQL direction.
    pub(crate) fn direction(self) -> Order {
        if self.descending {
            Order::Desc
        } else {
            Order::Asc
        }
    }
}

/// Parses `order_by`: `field` or `field asc|desc`; empty means `id`.
pub(crate) fn parse_order_by(
    text: &str,
    allowed: &[&'static str],
) -> Result<SortOrder, FieldViolation> {
    let invalid = || {
        FieldViolation::new(
            "order_by",
            format!(
                "must be one of {} optionally followed by ` desc` (got {})",
                allowed.join(", "),
                quote(text)
            ),
        )
    };
    let mut words = text.split_whitespace();
    let Some(field) = words.next() else {
        return Ok(SortOrder {
            field: "id",
            descending: false,
        });
    };
    let field = *allowed.iter().find(|a| **a == field).ok_or_else(invalid)?;
    let descending = match words.next() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(_) => return Err(invalid()),
    };
    if words.next().is_some() {
        return Err(invalid());
    }
    Ok(SortOrder { field, descending })
}

/// The sort key of a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SortValue {
    /// An integer column (id).
    Int(i64),
    /// A text column.
    Text(String),
    /// A floating-point column (price).
    Float(f64),
    /// A timestamp column, in microseconds since the epoch.
    Time(i64),
}

impl SortValue {
    /// The key of a column's value; `None` for a type no List sorts by,
    /// and for NULL (no sortable column is nullable).
    pub(crate) fn of(value: sea_orm::Value) -> Option<Self> {
        use sea_orm::Value;
        match value {
            Value::BigInt(Some(v)) => Some(Self::Int(v)),
            Value::String(Some(v)) => Some(Self::Text(v)),
            Value::Double(Some(v)) => Some(Self::Float(v)),
            Value::ChronoDateTimeUtc(Some(v)) => Some(Self::Time(v.timestamp_micros())),
            _ => None,
        }
    }

    fn encode(&self) -> String {
        match self {
            Self::Int(v) => format!("i{v}"),
            Self::Text(v) => format!("s{v}"),
            Self::Float(v) => format!("f{}", v.to_bits()),
            Self::Time(v) => format!("t{v}"),
        }
    }

    fn decode(text: &str) -> Option<Self> {
        let (tag, rest) = text.split_at_checked(1)?;
        match tag {
            "i" => rest.parse().ok().map(Self::Int),
            "s" => Some(Self::Text(rest.to_owned())),
            "f" => rest.parse().ok().map(f64::from_bits).map(Self::Float),
            "t" => rest.parse().ok().map(Self::Time),
            _ => None,
        }
    }

    fn into_value(self) -> sea_orm::Value {
        match self {
            Self::Int(v) => v.into(),
            Self::Text(v) => v.into(),
            Self::Float(v) => v.into(),
            Self::Time(v) => DateTime::<Utc>::from_timestamp_micros(v).into(),
        }
    }
}

/// Where the next page starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PageToken {
    /// The order the token was issued for.
    pub(crate) order: SortOrder,
    /// Digest of the filters the token was issued for.
    pub(crate) filter_digest: u64,
    /// Sort key of the last row returned.
    pub(crate) last_value: SortValue,
    /// Id of the last row returned.
    pub(crate) last_id: i64,
}

impl PageToken {
    /// The opaque text form handed to clients.
    pub(crate) fn encode(&self) -> String {
        let direction = if self.order.descending { "d" } else { "a" };
        let text = [
            TOKEN_VERSION,
            self.order.field,
            direction,
            &format!("{:x}", self.filter_digest),
            &self.last_id.to_string(),
            &self.last_value.encode(),
        ]
        .join(&SEPARATOR.to_string());
        URL_SAFE_NO_PAD.encode(text)
    }

    /// Decodes `text`, which must have been issued for `order` and the same
    /// filters; `None` for an empty token (first page).
    pub(crate) fn decode(
        text: &str,
        order: SortOrder,
        filter_digest: u64,
    ) -> Result<Option<Self>, FieldViolation> {
        if text.is_empty() {
            return Ok(None);
        }
        let invalid = |why: &str| FieldViolation::new("page_token", why);
        let malformed = || invalid("is not a token returned by this List method");
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| malformed())?;
        let text = String::from_utf8(bytes).map_err(|_| malformed())?;
        let parts: Vec<&str> = text.splitn(6, SEPARATOR).collect();
        let [version, field, direction, digest, last_id, last_value] = parts[..] else {
            return Err(malformed());
        };
        if version != TOKEN_VERSION {
            return Err(malformed());
        }
        let issued_descending = direction == "d";
        if field != order.field || issued_descending != order.descending {
            return Err(invalid(
                "was issued for another order_by; send the same order_by as for the first page",
            ));
        }
        if u64::from_str_radix(digest, 16).ok() != Some(filter_digest) {
            return Err(invalid(
                "was issued for other filters; send the same filters as for the first page",
            ));
        }
        let last_id = last_id.parse().map_err(|_| malformed())?;
        let last_value = SortValue::decode(last_value).ok_or_else(malformed)?;
        Ok(Some(Self {
            order,
            filter_digest,
            last_value,
            last_id,
        }))
    }

    /// Rows strictly after the token's row in its order:
    /// `(sort, id) > (last_value, last_id)` (or `<` when descending).
    pub(crate) fn after<C: ColumnTrait>(self, sort_column: C, id_column: C) -> Condition {
        let value = self.last_value.into_value();
        let beyond = |column: C, value: sea_orm::Value| -> SimpleExpr {
            if self.order.descending {
                column.lt(value)
            } else {
                column.gt(value)
            }
        };
        Condition::any()
            .add(beyond(sort_column, value.clone()))
            .add(
                Condition::all()
                    .add(sort_column.eq(value))
                    .add(beyond(id_column, self.last_id.into())),
            )
    }
}

/// A validated List request: how many rows, in which order, from where.
#[derive(Debug, Clone)]
pub(crate) struct PageRequest {
    size: u64,
    order: SortOrder,
    filter_digest: u64,
    after: Option<PageToken>,
}

impl PageRequest {
    /// Validates the paging fields of a List request whose filters are
    /// `filters`; INVALID_ARGUMENT names every bad field.
    pub(crate) fn parse(
        page_size: i32,
        order_by: &str,
        page_token: &str,
        sort_fields: &[&'static str],
        filters: &[&str],
    ) -> Result<Self, Error> {
        let mut violations = Violations::default();
        let size = violations.check(rules::page_size(page_size));
        let order = violations.check(parse_order_by(order_by, sort_fields));
        let filter_digest = filter_digest(filters);
        let after = order.and_then(|order| {
            violations.check(PageToken::decode(page_token, order, filter_digest))
        });
        let (size, order, after) = violations.finish((|| Some((size?, order?, after?)))())?;
        Ok(Self {
            size,
            order,
            filter_digest,
            after,
        })
    }

    /// The sort field.
    pub(crate) fn sort_field(&self) -> &'static str {
        self.order.field
    }

    /// Orders `query` by the sort column then id, starts it after the
    /// token's row, and fetches one row more than the page, to learn whether
    /// another page follows.
    pub(crate) fn apply<E: EntityTrait>(
        &self,
        mut query: Select<E>,
        sort_column: E::Column,
        id_column: E::Column,
    ) -> Select<E> {
        if let Some(after) = self.after.clone() {
            query = query.filter(after.after(sort_column, id_column));
        }
        query
            .order_by(sort_column, self.order.direction())
            .order_by(id_column, self.order.direction())
            .limit(self.size + 1)
    }

    /// Drops the extra row fetched by [`PageRequest::apply`] and returns the
    /// next page's token (empty on the last page), keyed by the last row's
    /// `sort_column` and `id_column`.
    pub(crate) fn finish<M: ModelTrait>(
        &self,
        rows: &mut Vec<M>,
        sort_column: Column<M>,
        id_column: Column<M>,
    ) -> Result<String, Error> {
        let has_more = rows.len() as u64 > self.size;
        rows.truncate(usize::try_from(self.size).unwrap_or(usize::MAX));
        let Some(last) = rows.last().filter(|_| has_more) else {
            return Ok(String::new());
        };
        // Only a column of a type no List sorts by can fail here: a
        // declaration error, which the resources' unit tests catch.
        let key = |column: Column<M>| {
            SortValue::of(last.get(column))
                .ok_or_else(|| Error::Internal(format!("cannot page by {}", column.as_str())))
        };
        let SortValue::Int(last_id) = key(id_column)? else {
            return Err(Error::Internal("ids must be integers".into()));
        };
        Ok(PageToken {
            order: self.order,
            filter_digest: self.filter_digest,
            last_value: key(sort_column)?,
            last_id,
        }
        .encode())
    }
}

/// The column type of a model's entity.
type Column<M> = <<M as ModelTrait>::Entity as EntityTrait>::Column;

/// A stable digest of a List call's filters (FNV-1a, so tokens stay valid
/// across server builds and replicas).
pub(crate) fn filter_digest(filters: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for filter in filters {
        for byte in filter.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// `prefix%` for a LIKE pattern, with LIKE's wildcards in `prefix` escaped.
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[&str] = &["id", "name", "price"];

    #[test]
    fn order_by_accepts_documented_fields_and_directions() {
        let order = parse_order_by("", FIELDS).unwrap();
        assert_eq!((order.field, order.descending), ("id", false));
        let order = parse_order_by(" price  desc ", FIELDS).unwrap();
        assert_eq!((order.field, order.descending), ("price", true));
        for bad in ["colour", "name sideways", "name desc extra", "NAME"] {
            assert!(parse_order_by(bad, FIELDS).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_round_trip_every_value_kind() {
        let order = parse_order_by("name desc", FIELDS).unwrap();
        for last_value in [
            SortValue::Int(-3),
            SortValue::Text("Ada\u{1f}x Lovelace".into()),
            SortValue::Float(12.5),
            SortValue::Time(1_764_000_000_123_456),
        ] {
            let token = PageToken {
                order,
                filter_digest: 42,
                last_value,
                last_id: 7,
            };
            let decoded = PageToken::decode(&token.encode(), order, 42).unwrap();
            assert_eq!(decoded, Some(token));
        }
    }

    #[test]
    fn tokens_are_bound_to_their_order_and_filters() {
        let order = parse_order_by("name", FIELDS).unwrap();
        let token = PageToken {
            order,
            filter_digest: filter_digest(&["a"]),
            last_value: SortValue::Text("x".into()),
            last_id: 1,
        }
        .encode();
        let other_order = parse_order_by("name desc", FIELDS).unwrap();
        assert!(PageToken::decode(&token, other_order, filter_digest(&["a"])).is_err());
        assert!(PageToken::decode(&token, order, filter_digest(&["b"])).is_err());
        assert!(PageToken::decode("garbage!", order, 0).is_err());
        assert!(PageToken::decode("", order, 0).unwrap().is_none());
    }

    #[test]
    fn digests_separate_filter_boundaries() {
        assert_ne!(filter_digest(&["ab", ""]), filter_digest(&["a", "b"]));
    }

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(like_prefix("50%_off\\"), "50\\%\\_off\\\\%");
    }
}
