//! SeaORM entities of RTAP's PostgreSQL tables: the catalog and API keys.

pub mod api_key;
pub mod product;
pub mod user;
