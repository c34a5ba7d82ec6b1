//! `rtap.v1.UserService`: users, unique by (first name, last name).

use entity::user::{self, Column};
use rtap::v1::{
    CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
    GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, UpdateUserResponse,
    User,
    user_service_server::{UserService, UserServiceServer},
};
use sea_orm::Condition;

use super::service::resource_service;
use super::{
    invalid,
    resource::{
        Changes, Field, Filters, Resource, ResourceApi, Standard, message_from_row, starts_with,
    },
    rules,
};
use crate::error::Error;

impl Resource for user::Entity {
    type Message = User;
    fn to_proto(row: user::Model) -> User {
        message_from_row!(row => User { id, first_name, last_name, email })
    }

    const SORT_FIELDS: &'static [Column] = &[Column::FirstName, Column::LastName];
    const STANDARD: Standard<Column> =
        Standard::new(Column::Id, Column::CreateTime, Column::UpdateTime);
    type ListRequest = ListUsersRequest;
    /// `name_prefix` matches the start of either name, ignoring case.
    fn filters(request: &ListUsersRequest) -> Result<Filters, Error> {
        let prefix = rules::filter("name_prefix", &request.name_prefix).map_err(invalid)?;
        Ok(Filters::default().with(prefix.to_lowercase(), |prefix| {
            Condition::any()
                .add(starts_with(Column::FirstName, prefix))
                .add(starts_with(Column::LastName, prefix))
        }))
    }

    const MUTABLE_FIELDS: &'static [(Column, Field<User>)] = &[
        (Column::FirstName, Field::Name(|user| &user.first_name)),
        (Column::LastName, Field::Name(|user| &user.last_name)),
        (Column::Email, Field::Email(|user| user.email.as_deref())),
    ];
    const NAME: &'static str = "user";
    /// Users are unique by both names: an update that changes one names
    /// the other as unchanged.
    fn conflict(changes: &Changes<Self>) -> String {
        let name = |column| changes.text(column).unwrap_or("(unchanged)");
        format!(
            "a user named {:?} {:?} (names compare case-insensitively)",
            name(Column::FirstName),
            name(Column::LastName)
        )
    }
}

resource_service! {
    impl UserService for ResourceApi<user::Entity> as UserServiceServer {
        resource: user, list: users,
        get_user(GetUserRequest) -> GetUserResponse,
        list_users(ListUsersRequest) -> ListUsersResponse,
        create_user(CreateUserRequest) -> CreateUserResponse,
        update_user(UpdateUserRequest) -> UpdateUserResponse,
        delete_user(DeleteUserRequest) -> DeleteUserResponse,
    }
}
