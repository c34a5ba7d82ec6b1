//! `rtap.v1.UserService`.

use entity::user;
use rtap::v1::{
    CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
    GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, UpdateUserResponse,
    User,
    user_service_server::{UserService, UserServiceServer},
};
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::NotSet,
    ColumnTrait, Condition, EntityTrait, QueryFilter, Set,
    sea_query::{Expr, ExprTrait, Func, LikeExpr},
};
use tonic::{Request, Response, Status};

use super::{
    NEXT_UPDATE_TIME, invalid,
    lookup::Lookup,
    missing, now,
    pagination::{PageRequest, SortValue, like_prefix},
    rules::{self, Violations},
    timestamp, write_error,
};
use crate::{
    database::Database,
    error::{Error, FieldViolation, quote},
};

/// The gRPC server type of the user service.
pub type UserServer = UserServiceServer<UserApi>;

const SORT_FIELDS: &[&str] = &[
    "id",
    "first_name",
    "last_name",
    "create_time",
    "update_time",
];
const MUTABLE_FIELDS: &[&str] = &["first_name", "last_name", "email"];
const OUTPUT_ONLY_FIELDS: &[&str] = &["id", "create_time", "update_time"];

/// Implements `rtap.v1.UserService`.
#[derive(Debug, Clone)]
pub struct UserApi {
    database: Database,
    by_id: Lookup<user::Entity>,
}

impl UserApi {
    /// A service over `database`.
    pub fn new(database: Database) -> Self {
        let by_id = Lookup::start(database.clone(), user::Column::Id, |row: &user::Model| {
            row.id
        });
        Self { database, by_id }
    }

    /// The service, ready to add to a tonic router.
    pub fn into_server(self) -> UserServer {
        UserServiceServer::new(self)
    }

    async fn get(&self, request: GetUserRequest) -> Result<User, Error> {
        let id = rules::id("id", request.id).map_err(invalid)?;
        self.by_id
            .get(id)
            .await?
            .map(to_proto)
            .ok_or_else(|| not_found(id))
    }

    async fn list(&self, request: ListUsersRequest) -> Result<ListUsersResponse, Error> {
        let prefix = rules::filter("name_prefix", &request.name_prefix)
            .map_err(invalid)?
            .to_lowercase();
        let page = PageRequest::parse(
            request.page_size,
            &request.order_by,
            &request.page_token,
            SORT_FIELDS,
            &[&prefix],
        )?;
        let mut query = user::Entity::find();
        if !prefix.is_empty() {
            let starts = |column: user::Column| {
                Expr::expr(Func::lower(Expr::col(column)))
                    .like(LikeExpr::new(like_prefix(&prefix)).escape('\\'))
            };
            query = query.filter(
                Condition::any()
                    .add(starts(user::Column::FirstName))
                    .add(starts(user::Column::LastName)),
            );
        }
        let mut rows = page
            .apply(query, sort_column(page.sort_field()), user::Column::Id)
            .all(self.database.connection()?)
            .await?;
        let next_page_token = page.finish(&mut rows, |row| {
            (sort_value(row, page.sort_field()), row.id)
        });
        Ok(ListUsersResponse {
            users: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        })
    }

    async fn create(&self, request: CreateUserRequest) -> Result<User, Error> {
        let user = request.user.ok_or_else(|| invalid(missing("user")))?;
        let mut violations = Violations::default();
        let changes = violations.check_all(UserChanges::validate(&user, MUTABLE_FIELDS));
        let (first_name, last_name, email) = violations
            .finish(changes.and_then(|c| Some((c.first_name?, c.last_name?, c.email.flatten()))))?;
        let created = now();
        let model = user::ActiveModel {
            id: NotSet,
            first_name: Set(first_name.clone()),
            last_name: Set(last_name.clone()),
            email: Set(email),
            create_time: Set(created),
            update_time: Set(created),
        }
        .insert(self.database.connection()?)
        .await
        .map_err(|e| write_error(e, || conflict(&first_name, &last_name)))?;
        Ok(to_proto(model))
    }

    async fn update(&self, request: UpdateUserRequest) -> Result<User, Error> {
        let user = request.user.ok_or_else(|| invalid(missing("user")))?;
        let mut violations = Violations::default();
        let id = violations.check(rules::id("user.id", user.id));
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let fields = violations.check_all(rules::update_mask(
            &paths,
            MUTABLE_FIELDS,
            OUTPUT_ONLY_FIELDS,
        ));
        let changes =
            fields.and_then(|fields| violations.check_all(UserChanges::validate(&user, &fields)));
        let (id, changes) = violations.finish(id.zip(changes))?;

        let mut update = user::Entity::update_many().filter(user::Column::Id.eq(id));
        if let Some(first_name) = &changes.first_name {
            update = update.col_expr(user::Column::FirstName, Expr::value(first_name.clone()));
        }
        if let Some(last_name) = &changes.last_name {
            update = update.col_expr(user::Column::LastName, Expr::value(last_name.clone()));
        }
        if let Some(email) = changes.email {
            update = update.col_expr(user::Column::Email, Expr::value(email));
        }
        let rows = update
            .col_expr(
                user::Column::UpdateTime,
                Expr::cust_with_values(NEXT_UPDATE_TIME, [now()]),
            )
            .exec_with_returning(self.database.connection()?)
            .await
            .map_err(|e| {
                write_error(e, || {
                    conflict(
                        changes.first_name.as_deref().unwrap_or("(unchanged)"),
                        changes.last_name.as_deref().unwrap_or("(unchanged)"),
                    )
                })
            })?;
        rows.into_iter()
            .next()
            .map(to_proto)
            .ok_or_else(|| not_found(id))
    }

    async fn delete(&self, request: DeleteUserRequest) -> Result<(), Error> {
        let id = rules::id("id", request.id).map_err(invalid)?;
        let result = user::Entity::delete_by_id(id)
            .exec(self.database.connection()?)
            .await?;
        if result.rows_affected == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}

/// Validated new values of the fields a create or update sets.
#[derive(Debug, Default)]
struct UserChanges {
    first_name: Option<String>,
    last_name: Option<String>,
    /// `Some(None)` clears the address.
    email: Option<Option<String>>,
}

impl UserChanges {
    fn validate(user: &User, fields: &[&str]) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Violations::default();
        let mut changes = Self::default();
        for field in fields {
            match *field {
                "first_name" => {
                    changes.first_name =
                        violations.check(rules::name("user.first_name", &user.first_name));
                }
                "last_name" => {
                    changes.last_name =
                        violations.check(rules::name("user.last_name", &user.last_name));
                }
                "email" => {
                    changes.email =
                        violations.check(rules::email("user.email", user.email.as_deref()));
                }
                other => violations.add("update_mask", format!("unknown field {}", quote(other))),
            }
        }
        violations.into_result().map(|()| changes)
    }
}

fn sort_column(field: &str) -> user::Column {
    match field {
        "first_name" => user::Column::FirstName,
        "last_name" => user::Column::LastName,
        "create_time" => user::Column::CreateTime,
        "update_time" => user::Column::UpdateTime,
        _ => user::Column::Id,
    }
}

fn sort_value(row: &user::Model, field: &str) -> SortValue {
    match field {
        "first_name" => SortValue::Text(row.first_name.clone()),
        "last_name" => SortValue::Text(row.last_name.clone()),
        "create_time" => SortValue::time(row.create_time),
        "update_time" => SortValue::time(row.update_time),
        _ => SortValue::Int(row.id),
    }
}

fn to_proto(row: user::Model) -> User {
    User {
        id: row.id,
        first_name: row.first_name,
        last_name: row.last_name,
        email: row.email,
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
    }
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("user {id}"))
}

fn conflict(first_name: &str, last_name: &str) -> String {
    format!("a user named {first_name:?} {last_name:?} (names compare case-insensitively)")
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let user = self.get(request.into_inner()).await?;
        Ok(Response::new(GetUserResponse { user: Some(user) }))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let user = self.create(request.into_inner()).await?;
        Ok(Response::new(CreateUserResponse { user: Some(user) }))
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        let user = self.update(request.into_inner()).await?;
        Ok(Response::new(UpdateUserResponse { user: Some(user) }))
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        self.delete(request.into_inner()).await?;
        Ok(Response::new(DeleteUserResponse {}))
    }
}
