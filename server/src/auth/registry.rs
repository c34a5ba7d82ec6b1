//! API keys in PostgreSQL: what `rtap-server keys` does, and what the
//! server's key cache loads.

use chrono::{DateTime, Utc};
use entity::api_key;
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, SqlErr, Statement,
};

use super::{key::NewKey, policy::AccessRole};
use crate::error::{Error, FieldViolation, quote};

/// Longest key name.
const MAX_NAME_CHARS: usize = 128;

/// Creates a key named `name` with `role`; returns its text, which exists
/// nowhere else from then on.
pub(crate) async fn create(
    db: &DatabaseConnection,
    name: &str,
    role: AccessRole,
) -> Result<String, Error> {
    let name = check_name(name)?;
    let key = NewKey::generate().map_err(Error::Internal)?;
    let row = api_key::ActiveModel {
        id: NotSet,
        key_id: Set(key.id.clone()),
        name: Set(name.clone()),
        role: Set(role.as_str().to_owned()),
        secret_hash: Set(key.secret_hash.to_vec()),
        create_time: Set(Utc::now()),
        last_use_time: Set(None),
        revoke_time: Set(None),
    };
    match api_key::Entity::insert(row).exec(db).await {
        Ok(_) => Ok(key.text),
        Err(error) => Err(match error.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => {
                Error::AlreadyExists(format!("a live key named {}", quote(&name)))
            }
            _ => Error::Database(error),
        }),
    }
}

/// Every key, live and revoked, oldest first.
pub(crate) async fn list(db: &DatabaseConnection) -> Result<Vec<api_key::Model>, Error> {
    Ok(api_key::Entity::find()
        .order_by_asc(api_key::Column::CreateTime)
        .order_by_asc(api_key::Column::Id)
        .all(db)
        .await?)
}

/// Revokes the live key named `name` (case-insensitively).
pub(crate) async fn revoke(db: &DatabaseConnection, name: &str) -> Result<(), Error> {
    let result = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE api_keys SET revoke_time = now() \
             WHERE lower(name) = lower($1) AND revoke_time IS NULL",
            [name.trim().into()],
        ))
        .await?;
    if result.rows_affected() == 0 {
        return Err(Error::NotFound(format!("live key named {}", quote(name))));
    }
    Ok(())
}

/// The keys that authenticate calls.
pub(crate) async fn live(db: &DatabaseConnection) -> Result<Vec<api_key::Model>, sea_orm::DbErr> {
    api_key::Entity::find()
        .filter(api_key::Column::RevokeTime.is_null())
        .all(db)
        .await
}

/// Records that the key `key_id` authenticated a call at `time` (never
/// moving a later record back).
pub(crate) async fn record_use(
    db: &DatabaseConnection,
    key_id: &str,
    time: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE api_keys SET last_use_time = $2 \
         WHERE key_id = $1 AND (last_use_time IS NULL OR last_use_time < $2)",
        [key_id.into(), time.into()],
    ))
    .await
    .map(|_| ())
}

fn check_name(name: &str) -> Result<String, Error> {
    let name = name.trim();
    let problem = if name.is_empty() {
        Some("must not be blank".to_owned())
    } else if name.chars().count() > MAX_NAME_CHARS {
        Some(format!("must be at most {MAX_NAME_CHARS} characters"))
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters".to_owned())
    } else {
        None
    };
    match problem {
        Some(description) => Err(Error::InvalidArgument(vec![FieldViolation::new(
            "name",
            description,
        )])),
        None => Ok(name.to_owned()),
    }
}
