//! The resource pattern of AIP-131..135, written once for every catalog
//! table: Get through the coalesced [`Lookup`], List with keyset pages,
//! Create, Update with a field mask and Delete, with one mapping of database
//! errors. A table takes part by implementing [`Resource`]; `service.rs`
//! puts the result behind tonic.

use std::fmt;

use prost_types::FieldMask;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, DbErr, EntityTrait, IdenStatic, IntoActiveModel,
    ModelTrait, QueryFilter, SqlErr, Value,
    sea_query::{Expr, ExprTrait, Func, LikeExpr, SimpleExpr},
};

use super::{
    invalid,
    lookup::Lookup,
    missing, now,
    pagination::{PageRequest, like_prefix},
    rules::{self, Violations},
};
use crate::{
    database::Database,
    error::{Error, FieldViolation, quote},
};

/// A catalog table served as an API resource, declared on its entity. The
/// API names a field as its column is named.
///
/// `pub` (as are the types it names) only because the exported `UserApi`
/// and `ProductApi` are bound by it; this module is private, so nothing
/// outside the catalog can name or implement it.
pub(crate) trait Resource:
    EntityTrait<Model: IntoActiveModel<Self::ActiveModel> + Clone + Send + Sync, ActiveModel: Send>
{
    /// The protobuf message of one resource.
    type Message: Send + Sync;
    /// The message of a row.
    fn to_proto(row: Self::Model) -> Self::Message;

    /// The fields `order_by` accepts besides the standard ones.
    const SORT_FIELDS: &'static [Self::Column];
    /// The id and timestamps.
    const STANDARD: Standard<Self::Column>;
    /// The List request, for [`Resource::filters`].
    type ListRequest: Sync;
    /// A List request's validated filters.
    fn filters(request: &Self::ListRequest) -> Result<Filters, Error>;

    /// The fields Create sets and Update may change, in the order
    /// violations are reported.
    const MUTABLE_FIELDS: &'static [(Self::Column, Field<Self::Message>)];
    /// Names the resource in errors (`user 7 not found`) and prefixes its
    /// fields in violations (`user.email`).
    const NAME: &'static str;
    /// What a write collided with, for ALREADY_EXISTS: `changes` are the
    /// values it wrote.
    fn conflict(changes: &Changes<Self>) -> String;
}

/// The standard fields (AIP-148) every catalog resource has: server-assigned,
/// output only, and sortable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Standard<C> {
    /// The `bigint` primary key.
    id: C,
    /// When the row was created.
    create_time: C,
    /// When the row last changed; moves strictly forward.
    update_time: C,
}

impl<C: ColumnTrait> Standard<C> {
    /// The columns `id`, `create_time` and `update_time`, in that order.
    pub(crate) const fn new(id: C, create_time: C, update_time: C) -> Self {
        Self {
            id,
            create_time,
            update_time,
        }
    }

    fn all(self) -> [C; 3] {
        [self.id, self.create_time, self.update_time]
    }
}

/// A mutable field of a message `M`: where it sits in the message, and so
/// which rule of [`rules`] validates it.
pub(crate) enum Field<M> {
    /// A name: trimmed, 1 to 256 characters.
    Name(fn(&M) -> &str),
    /// An optional email address; empty clears it.
    Email(fn(&M) -> Option<&str>),
    /// A price: finite and not negative.
    Price(fn(&M) -> f64),
}

impl<M> Field<M> {
    /// The value its column stores, or a violation of `path`.
    fn validate(&self, message: &M, path: &str) -> Result<Value, FieldViolation> {
        match self {
            Self::Name(get) => rules::name(path, get(message)).map(Into::into),
            Self::Email(get) => rules::email(path, get(message)).map(Into::into),
            Self::Price(get) => rules::price(path, get(message)).map(Into::into),
        }
    }
}

/// The validated values a Create or Update writes, by column.
#[derive(Debug)]
pub(crate) struct Changes<R: Resource>(Vec<(R::Column, Value)>);

impl<R: Resource> Changes<R> {
    /// Validates `fields` of `message` with their rules, reporting every
    /// violation.
    fn validate(message: &R::Message, fields: &[&str]) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Violations::default();
        let mut values = Vec::with_capacity(fields.len());
        for field in fields {
            match R::MUTABLE_FIELDS.iter().find(|(c, _)| c.as_str() == *field) {
                Some((column, rule)) => {
                    let path = format!("{}.{field}", R::NAME);
                    if let Some(value) = violations.check(rule.validate(message, &path)) {
                        values.push((*column, value));
                    }
                }
                None => violations.add("update_mask", format!("unknown field {}", quote(field))),
            }
        }
        violations.into_result().map(|()| Self(values))
    }

    /// The text written to `column`, if this write sets it.
    pub(crate) fn text(&self, column: R::Column) -> Option<&str> {
        self.0.iter().find_map(|(c, value)| match value {
            Value::String(Some(text)) if c.as_str() == column.as_str() => Some(text.as_str()),
            _ => None,
        })
    }
}

/// Where a List page starts and how long it is: the AIP-158 fields every
/// List request has.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Paging<'a> {
    /// `page_size`.
    pub(crate) size: i32,
    /// `order_by`.
    pub(crate) order_by: &'a str,
    /// `page_token`.
    pub(crate) token: &'a str,
}

/// A List call's validated filters: their texts, which its page tokens are
/// bound to, and the rows they select.
#[derive(Debug)]
pub(crate) struct Filters {
    texts: Vec<String>,
    condition: Condition,
}

impl Default for Filters {
    /// No filters: every row.
    fn default() -> Self {
        Self {
            texts: Vec::new(),
            condition: Condition::all(),
        }
    }
}

impl Filters {
    /// Adds a filter with the validated `text`, selecting the rows of
    /// `select(text)`; an empty text selects every row.
    pub(crate) fn with<C: Into<Condition>>(
        mut self,
        text: String,
        select: impl FnOnce(&str) -> C,
    ) -> Self {
        if !text.is_empty() {
            self.condition = self.condition.add(select(&text));
        }
        self.texts.push(text);
        self
    }
}

/// Rows whose `column`, lower-cased, starts with `prefix`, which must be
/// lower-cased already.
pub(crate) fn starts_with(column: impl ColumnTrait, prefix: &str) -> SimpleExpr {
    Expr::expr(Func::lower(Expr::col(column))).like(LikeExpr::new(like_prefix(prefix)).escape('\\'))
}

/// The standard methods of one resource, free of gRPC.
pub(crate) struct ResourceApi<R: Resource> {
    database: Database,
    by_id: Lookup<R>,
}

impl<R: Resource> Clone for ResourceApi<R> {
    fn clone(&self) -> Self {
        Self {
            database: self.database.clone(),
            by_id: self.by_id.clone(),
        }
    }
}

impl<R: Resource> fmt::Debug for ResourceApi<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceApi")
            .field("resource", &R::NAME)
            .field("by_id", &self.by_id)
            .finish_non_exhaustive()
    }
}

impl<R: Resource> ResourceApi<R> {
    /// The methods over `database`. Starts the look-up task, so needs a
    /// Tokio runtime.
    pub(crate) fn new(database: Database) -> Self {
        let by_id = Lookup::start(database.clone(), R::STANDARD.id, row_id::<R>);
        Self { database, by_id }
    }

    /// Get: the resource with this id.
    pub(crate) async fn get(&self, id: i64) -> Result<R::Message, Error> {
        let id = rules::id("id", id).map_err(invalid)?;
        self.by_id
            .get(id)
            .await?
            .map(R::to_proto)
            .ok_or_else(|| not_found::<R>(id))
    }

    /// List: one page of the resources `request`'s filters select, and the
    /// next page's token (empty after the last page).
    pub(crate) async fn list(
        &self,
        request: &R::ListRequest,
        paging: Paging<'_>,
    ) -> Result<(Vec<R::Message>, String), Error> {
        // Filters first: a bad filter is reported alone, as before paging.
        let filters = R::filters(request)?;
        let id = R::STANDARD.id;
        let sortable = sortable::<R>();
        let names: Vec<&'static str> = sortable.iter().map(|c| c.as_str()).collect();
        let texts: Vec<&str> = filters.texts.iter().map(String::as_str).collect();
        let page = PageRequest::parse(paging.size, paging.order_by, paging.token, &names, &texts)?;
        let sort_column = sortable
            .into_iter()
            .find(|c| c.as_str() == page.sort_field())
            .unwrap_or(id);
        let mut query = R::find();
        if !filters.condition.is_empty() {
            query = query.filter(filters.condition);
        }
        let mut rows = page
            .apply(query, sort_column, id)
            .all(self.database.connection()?)
            .await?;
        let next_page_token = page.finish(&mut rows, sort_column, id)?;
        Ok((rows.into_iter().map(R::to_proto).collect(), next_page_token))
    }

    /// Create: stores `message`'s mutable fields as a new row.
    pub(crate) async fn create(&self, message: Option<R::Message>) -> Result<R::Message, Error> {
        let message = message.ok_or_else(|| invalid(missing(R::NAME)))?;
        let mut violations = Violations::default();
        let names = mutable_names::<R>();
        let changes = violations.check_all(Changes::<R>::validate(&message, &names));
        let changes = violations.finish(changes)?;
        let created = now();
        let mut row = <R::ActiveModel as ActiveModelTrait>::default();
        for (column, value) in &changes.0 {
            row.try_set(*column, value.clone())?;
        }
        row.try_set(R::STANDARD.create_time, created.into())?;
        row.try_set(R::STANDARD.update_time, created.into())?;
        let row = row
            .insert(self.database.connection()?)
            .await
            .map_err(|e| write_error(e, &changes))?;
        Ok(R::to_proto(row))
    }

    /// Update: changes the fields of `mask` (every mutable one if empty) of
    /// the row with the message's `id` to the message's values. The message
    /// comes with its `id`.
    pub(crate) async fn update(
        &self,
        message: Option<(i64, R::Message)>,
        mask: Option<FieldMask>,
    ) -> Result<R::Message, Error> {
        let (id, message) = message.ok_or_else(|| invalid(missing(R::NAME)))?;
        let mut violations = Violations::default();
        let id = violations.check(rules::id(&format!("{}.id", R::NAME), id));
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        let output_only = R::STANDARD.all().map(|c| c.as_str());
        let fields = violations.check_all(rules::update_mask(
            &paths,
            &mutable_names::<R>(),
            &output_only,
        ));
        let changes = fields
            .and_then(|fields| violations.check_all(Changes::<R>::validate(&message, &fields)));
        let (id, changes) = violations.finish(id.zip(changes))?;

        let mut update = R::update_many().filter(R::STANDARD.id.eq(id));
        for (column, value) in &changes.0 {
            update = update.col_expr(*column, Expr::value(value.clone()));
        }
        // Now, and strictly forward even if the clock stepped back since the
        // last update.
        let next_update_time = format!(
            "GREATEST($1, \"{}\" + interval '1 microsecond')",
            R::STANDARD.update_time.as_str()
        );
        let rows = update
            .col_expr(
                R::STANDARD.update_time,
                Expr::cust_with_values(next_update_time, [now()]),
            )
            .exec_with_returning(self.database.connection()?)
            .await
            .map_err(|e| write_error(e, &changes))?;
        rows.into_iter()
            .next()
            .map(R::to_proto)
            .ok_or_else(|| not_found::<R>(id))
    }

    /// Delete: removes the row with this id.
    pub(crate) async fn delete(&self, id: i64) -> Result<(), Error> {
        let id = rules::id("id", id).map_err(invalid)?;
        let result = R::delete_many()
            .filter(R::STANDARD.id.eq(id))
            .exec(self.database.connection()?)
            .await?;
        if result.rows_affected == 0 {
            return Err(not_found::<R>(id));
        }
        Ok(())
    }
}

/// The id of a row, as the look-up needs it. Every catalog id is a `bigint`,
/// so the fallback (an id no caller asks for) is never taken.
fn row_id<R: Resource>(row: &R::Model) -> i64 {
    match row.get(R::STANDARD.id) {
        Value::BigInt(Some(id)) => id,
        _ => 0,
    }
}

/// The columns `order_by` accepts, in the order its errors list them: the
/// id, the resource's own, then the timestamps.
fn sortable<R: Resource>() -> Vec<R::Column> {
    let Standard {
        id,
        create_time,
        update_time,
    } = R::STANDARD;
    [id].into_iter()
        .chain(R::SORT_FIELDS.iter().copied())
        .chain([create_time, update_time])
        .collect()
}

fn mutable_names<R: Resource>() -> Vec<&'static str> {
    R::MUTABLE_FIELDS.iter().map(|(c, _)| c.as_str()).collect()
}

fn not_found<R: Resource>(id: i64) -> Error {
    Error::NotFound(format!("{} {id}", R::NAME))
}

/// A write that failed: a unique-index violation means the resource already
/// exists; anything else is a database error.
fn write_error<R: Resource>(error: DbErr, changes: &Changes<R>) -> Error {
    match error.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => Error::AlreadyExists(R::conflict(changes)),
        _ => Error::Database(error),
    }
}

/// The message of a catalog row: the fields named alike in both, copied,
/// and the two timestamps every catalog resource has, converted.
macro_rules! message_from_row {
    ($row:expr => $message:ident { $($field:ident),* $(,)? }) => {{
        let row = $row;
        $message {
            $($field: row.$field,)*
            create_time: Some($crate::infra::time::timestamp_from_datetime(row.create_time)),
            update_time: Some($crate::infra::time::timestamp_from_datetime(row.update_time)),
        }
    }};
}
pub(crate) use message_from_row;

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use entity::{product, user};
    use rtap::v1::{ListProductsRequest, ListUsersRequest, User};
    use sea_orm::{DbBackend, QueryTrait};

    use super::*;
    use crate::catalog::pagination::SortValue;

    fn names(columns: &[impl IdenStatic]) -> Vec<&'static str> {
        columns.iter().map(IdenStatic::as_str).collect()
    }

    fn a_user() -> user::Model {
        let time = Utc.timestamp_micros(1_764_000_000_123_456).unwrap();
        user::Model {
            id: 7,
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            email: None,
            create_time: time,
            update_time: time,
        }
    }

    fn a_product() -> product::Model {
        let time = Utc.timestamp_micros(1_764_000_000_123_456).unwrap();
        product::Model {
            id: 9,
            name: "Kettle".into(),
            category: "kitchen".into(),
            price: 25.0,
            create_time: time,
            update_time: time,
        }
    }

    #[test]
    fn resources_sort_and_update_the_fields_their_api_documents() {
        assert_eq!(
            names(&sortable::<user::Entity>()),
            [
                "id",
                "first_name",
                "last_name",
                "create_time",
                "update_time"
            ]
        );
        assert_eq!(
            mutable_names::<user::Entity>(),
            ["first_name", "last_name", "email"]
        );
        assert_eq!(
            names(&sortable::<product::Entity>()),
            [
                "id",
                "name",
                "category",
                "price",
                "create_time",
                "update_time"
            ]
        );
        assert_eq!(
            mutable_names::<product::Entity>(),
            ["name", "category", "price"]
        );
        assert_eq!(
            names(&user::Entity::STANDARD.all()),
            ["id", "create_time", "update_time"]
        );
    }

    #[test]
    fn every_sortable_column_gives_a_page_key_and_rows_their_ids() {
        let user = a_user();
        for column in sortable::<user::Entity>() {
            assert!(SortValue::of(user.get(column)).is_some(), "{column:?}");
        }
        assert_eq!(row_id::<user::Entity>(&user), 7);
        let product = a_product();
        for column in sortable::<product::Entity>() {
            assert!(SortValue::of(product.get(column)).is_some(), "{column:?}");
        }
        assert_eq!(row_id::<product::Entity>(&product), 9);
    }

    #[test]
    fn fields_are_validated_into_column_values_reporting_every_violation() {
        let bad = User {
            first_name: " Ada ".into(),
            email: Some("not-an-address".into()),
            ..User::default()
        };
        let all = mutable_names::<user::Entity>();
        let violations = Changes::<user::Entity>::validate(&bad, &all).unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["user.last_name", "user.email"]);

        let good = User {
            last_name: "Lovelace".into(),
            email: Some("  ".into()),
            ..bad
        };
        let changes = Changes::<user::Entity>::validate(&good, &all).unwrap();
        assert_eq!(changes.text(user::Column::FirstName), Some("Ada"));
        assert_eq!(
            changes.0[2].1,
            Value::String(None),
            "empty clears the email"
        );
    }

    #[test]
    fn conflicts_name_what_the_write_set() {
        let rename = User {
            first_name: "Ada".into(),
            ..User::default()
        };
        let changes = Changes::<user::Entity>::validate(&rename, &["first_name"]).unwrap();
        assert_eq!(
            user::Entity::conflict(&changes),
            r#"a user named "Ada" "(unchanged)" (names compare case-insensitively)"#
        );
        let reprice = Changes::<product::Entity>(vec![(product::Column::Price, 1.0.into())]);
        assert_eq!(
            product::Entity::conflict(&reprice),
            r#"a product named "" (names compare case-insensitively)"#
        );
    }

    #[test]
    fn rows_become_messages_with_their_timestamps() {
        let user = user::Entity::to_proto(a_user());
        assert_eq!((user.id, user.last_name.as_str()), (7, "Lovelace"));
        let created = user.create_time.unwrap();
        assert_eq!(
            (created.seconds, created.nanos),
            (1_764_000_000, 123_456_000)
        );
        assert_eq!(user.update_time, Some(created));
    }

    #[test]
    fn filters_select_by_prefix_and_category_and_empty_ones_select_all() {
        let sql = |filters: Filters| {
            let mut query = product::Entity::find();
            if !filters.condition.is_empty() {
                query = query.filter(filters.condition);
            }
            query.build(DbBackend::Postgres).to_string()
        };
        let request = ListProductsRequest {
            name_prefix: " 50%".into(),
            category: "kitchen".into(),
            ..ListProductsRequest::default()
        };
        let filters = product::Entity::filters(&request).unwrap();
        assert_eq!(filters.texts, ["50%", "kitchen"]);
        assert!(sql(filters).ends_with(
            r#"WHERE LOWER("name") LIKE E'50\\%%' ESCAPE E'\\' AND "products"."category" = 'kitchen'"#
        ));
        let filters = product::Entity::filters(&ListProductsRequest::default()).unwrap();
        assert_eq!(filters.texts, ["", ""]);
        assert!(!sql(filters).contains("WHERE"));

        let request = ListUsersRequest {
            name_prefix: "ADA".into(),
            ..ListUsersRequest::default()
        };
        let filters = user::Entity::filters(&request).unwrap();
        assert_eq!(filters.texts, ["ada"]);
    }
}
