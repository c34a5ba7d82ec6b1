//! The catalog: user and product CRUD over gRPC, stored in PostgreSQL through
//! SeaORM. Validation rules live in [`rules`], keyset pagination in
//! [`pagination`]; the two services only translate between them, the
//! protobuf messages and the entities.

mod lookup;
pub mod pagination;
mod products;
pub mod rules;
mod users;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{DbErr, SqlErr};

pub use products::{ProductApi, ProductServer};
pub use users::{UserApi, UserServer};

use crate::error::{Error, FieldViolation};

/// Timestamps the catalog stores: now, at the microsecond precision of
/// `timestamptz`, so what the API returns round-trips exactly.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or_default(),
    }
}

/// A write that failed: a unique-index violation means the resource already
/// exists (`conflict` says which); anything else is a database error.
fn write_error(error: DbErr, conflict: impl FnOnce() -> String) -> Error {
    match error.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => Error::AlreadyExists(conflict()),
        _ => Error::Database(error),
    }
}

fn invalid(violation: FieldViolation) -> Error {
    Error::InvalidArgument(vec![violation])
}

/// SQL that moves `update_time` to now, and strictly forward even if the
/// clock stepped back since the last update.
const NEXT_UPDATE_TIME: &str = "GREATEST($1, \"update_time\" + interval '1 microsecond')";

fn missing(field: &str) -> FieldViolation {
    FieldViolation::new(field, "is required")
}
