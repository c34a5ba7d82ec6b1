//! Creates `users` and `products`.
//!
//! Uniqueness lives in the database, not in a check before insert, so that
//! concurrent creates cannot race: names are stored trimmed and compared
//! case-insensitively through unique indexes on `lower(...)`. Every statement
//! is idempotent (`IF NOT EXISTS` / `IF EXISTS`), so a half-applied run can be
//! repeated.

use sea_orm_migration::prelude::*;

use crate::run_all;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261125_000001_create_catalog"
    }
}

const UP: &[&str] = &[
    r#"CREATE TABLE IF NOT EXISTS users (
        id          BIGSERIAL PRIMARY KEY,
        first_name  VARCHAR(256) NOT NULL CHECK (length(btrim(first_name)) > 0),
        last_name   VARCHAR(256) NOT NULL CHECK (length(btrim(last_name)) > 0),
        email       VARCHAR(256),
        create_time TIMESTAMPTZ NOT NULL,
        update_time TIMESTAMPTZ NOT NULL
    )"#,
    "CREATE UNIQUE INDEX IF NOT EXISTS users_name_key ON users (lower(first_name), lower(last_name))",
    "CREATE INDEX IF NOT EXISTS users_last_name_idx ON users (last_name, id)",
    "CREATE INDEX IF NOT EXISTS users_create_time_idx ON users (create_time, id)",
    "CREATE INDEX IF NOT EXISTS users_update_time_idx ON users (update_time, id)",
    r#"CREATE TABLE IF NOT EXISTS products (
        id          BIGSERIAL PRIMARY KEY,
        name        VARCHAR(256) NOT NULL CHECK (length(btrim(name)) > 0),
        category    VARCHAR(256) NOT NULL CHECK (length(btrim(category)) > 0),
        price       DOUBLE PRECISION NOT NULL
                    CHECK (price >= 0 AND price < 'Infinity'::float8),
        create_time TIMESTAMPTZ NOT NULL,
        update_time TIMESTAMPTZ NOT NULL
    )"#,
    "CREATE UNIQUE INDEX IF NOT EXISTS products_name_key ON products (lower(name))",
    "CREATE INDEX IF NOT EXISTS products_category_idx ON products (category, id)",
    "CREATE INDEX IF NOT EXISTS products_price_idx ON products (price, id)",
    "CREATE INDEX IF NOT EXISTS products_create_time_idx ON products (create_time, id)",
    "CREATE INDEX IF NOT EXISTS products_update_time_idx ON products (update_time, id)",
];

const DOWN: &[&str] = &[
    "DROP TABLE IF EXISTS products",
    "DROP TABLE IF EXISTS users",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_all(manager, DOWN).await
    }
}
