//! An API key (`rtap-server keys`). Only the hash of its secret is stored;
//! names are unique among live keys, compared case-insensitively (see the
//! `api_keys_live_name_key` index in `migration`).

use sea_orm::entity::prelude::*;

/// A row of `api_keys`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    /// Row identifier (bigserial).
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The public part of the key, which finds its row.
    #[sea_orm(unique)]
    pub key_id: String,
    /// Who holds the key, as logs name the caller.
    pub name: String,
    /// `reader`, `writer` or `admin`.
    pub role: String,
    /// SHA-256 of the key's secret part.
    pub secret_hash: Vec<u8>,
    /// When the key was created.
    pub create_time: DateTimeUtc,
    /// When the key last authenticated a call (recorded every few seconds).
    pub last_use_time: Option<DateTimeUtc>,
    /// When the key was revoked; live keys have none.
    pub revoke_time: Option<DateTimeUtc>,
}

/// Keys relate to nothing else in the database.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
