//! `rtap-server keys`: create, list and revoke API keys, straight in
//! PostgreSQL (so the first key needs no key).

use sea_orm::DatabaseConnection;

use super::{policy::AccessRole, registry};
use crate::error::Error;

/// What `rtap-server keys` does.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum KeysAction {
    /// Create a key and print it once on standard output (it is stored only
    /// as a hash: keep it now).
    Create {
        /// Who holds it (unique among live keys); request logs name it.
        #[arg(long)]
        name: String,
        /// What it may call.
        #[arg(long = "role", id = "key_role", value_enum)]
        role: AccessRole,
    },
    /// List keys: name, role, creation, last use, revocation.
    List,
    /// Revoke the live key with this name; every server refuses it within
    /// `--auth-refresh-interval` plus one reload.
    Revoke {
        /// The key's name.
        name: String,
    },
}

/// Runs `action` against `db` (migrated).
pub async fn run(db: &DatabaseConnection, action: KeysAction) -> Result<(), Error> {
    match action {
        KeysAction::Create { name, role } => {
            let key = registry::create(db, &name, role).await?;
            eprintln!(
                "created the {role} key `{}`; it is shown only now:",
                name.trim()
            );
            println!("{key}");
        }
        KeysAction::List => {
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                )
            };
            println!(
                "{:<32} {:<7} {:<20} {:<20} {:<20}",
                "NAME", "ROLE", "CREATED", "LAST USED", "REVOKED"
            );
            for key in registry::list(db).await? {
                println!(
                    "{:<32} {:<7} {:<20} {:<20} {:<20}",
                    key.name,
                    key.role,
                    time(Some(key.create_time)),
                    time(key.last_use_time),
                    time(key.revoke_time)
                );
            }
        }
        KeysAction::Revoke { name } => {
            registry::revoke(db, &name).await?;
            eprintln!("revoked the key `{}`", name.trim());
        }
    }
    Ok(())
}
