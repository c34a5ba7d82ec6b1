//! A product of the catalogue. Unique by name, compared case-insensitively
//! (see the `products_name_key` index in `migration`).

use sea_orm::entity::prelude::*;

/// A row of `products`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "products")]
pub struct Model {
    /// Server-assigned identifier (bigserial).
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Display name, trimmed, 1..=256 characters.
    pub name: String,
    /// Category, trimmed, 1..=256 characters.
    pub category: String,
    /// Unit price; finite and not negative (checked by a constraint too).
    pub price: f64,
    /// When the row was created (UTC, microsecond precision).
    pub create_time: DateTimeUtc,
    /// When the row last changed (UTC, microsecond precision).
    pub update_time: DateTimeUtc,
}

/// Products relate to nothing else in the database: metrics refer to them by
/// id in Redis, so deleting a product leaves its metrics intact.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
