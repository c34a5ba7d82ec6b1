//! Creates `api_keys`: the credentials `rtap-server keys` manages.
//!
//! A key is `rtap_<key_id>_<secret>`; only the SHA-256 hash of the secret is
//! stored. A revoked key keeps its row (with `revoke_time`), so `keys list`
//! can show it and its name can be given to a new key: names are unique
//! among live keys only. Every statement is idempotent.

use sea_orm_migration::prelude::*;

use crate::run_all;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000002_create_api_keys"
    }
}

const UP: &[&str] = &[
    r#"CREATE TABLE IF NOT EXISTS api_keys (
        id            BIGSERIAL PRIMARY KEY,
        key_id        VARCHAR(32) NOT NULL UNIQUE,
        name          VARCHAR(128) NOT NULL CHECK (length(btrim(name)) > 0),
        role          VARCHAR(16) NOT NULL CHECK (role IN ('reader', 'writer', 'admin')),
        secret_hash   BYTEA NOT NULL CHECK (length(secret_hash) = 32),
        create_time   TIMESTAMPTZ NOT NULL,
        last_use_time TIMESTAMPTZ,
        revoke_time   TIMESTAMPTZ
    )"#,
    "CREATE UNIQUE INDEX IF NOT EXISTS api_keys_live_name_key ON api_keys (lower(name)) WHERE revoke_time IS NULL",
];

const DOWN: &[&str] = &["DROP TABLE IF EXISTS api_keys"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_all(manager, DOWN).await
    }
}
