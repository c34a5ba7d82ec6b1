//! Migrations of RTAP's schema: the catalog and the API keys. `rtap-server` applies them at
//! start-up; the `migration` binary runs them by hand (`up`, `down`, `status`).

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_create_catalog;
mod m20261206_000002_create_api_keys;

/// Every migration, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_create_catalog::Migration),
            Box::new(m20261206_000002_create_api_keys::Migration),
        ]
    }
}

/// Runs `statements` in order: the migrations are plain SQL, each
/// statement idempotent.
async fn run_all(manager: &SchemaManager<'_>, statements: &[&str]) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for statement in statements {
        db.execute_unprepared(statement).await?;
    }
    Ok(())
}
