//! A user profile. Unique by (first_name, last_name), compared
//! case-insensitively (see the `users_name_key` index in `migration`).

use sea_orm::entity::prelude::*;

/// A row of `users`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    /// Server-assigned identifier (bigserial).
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Given name, trimmed, 1..=256 characters.
    pub first_name: String,
    /// Family name, trimmed, 1..=256 characters.
    pub last_name: String,
    /// Contact address, if known.
    pub email: Option<String>,
    /// When the row was created (UTC, microsecond precision).
    pub create_time: DateTimeUtc,
    /// When the row last changed (UTC, microsecond precision).
    pub update_time: DateTimeUtc,
}

/// Users relate to nothing else in the database: metrics refer to them by id
/// in Redis, so deleting a user leaves its metrics intact.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
