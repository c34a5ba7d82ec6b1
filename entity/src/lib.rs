//! SeaORM entities of RTAP's catalog, stored in PostgreSQL.

pub mod product;
pub mod user;
