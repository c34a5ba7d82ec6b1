//! The catalog: user and product CRUD over gRPC, stored in PostgreSQL through
//! SeaORM. The standard methods are written once, in `resource.rs`, for
//! every table that declares itself a resource (`users.rs`, `products.rs`);
//! validation rules live in `rules.rs`, keyset pagination in `pagination.rs`,
//! coalesced look-ups by id in `lookup.rs` (and the product names analytics
//! answers carry, cached, in `names.rs`), and the tonic services in
//! `service.rs`.

mod lookup;
mod names;
mod pagination;
mod products;
mod resource;
mod rules;
mod service;
mod users;

use chrono::{DateTime, SubsecRound, Utc};
use rtap::v1::{
    product_service_server::ProductServiceServer, user_service_server::UserServiceServer,
};

pub(crate) use self::names::ProductNames;
use self::resource::ResourceApi;
use crate::error::{Error, FieldViolation};

/// Implements `rtap.v1.UserService`.
pub(crate) type UserApi = ResourceApi<entity::user::Entity>;
/// The gRPC server type of the user service.
pub(crate) type UserServer = UserServiceServer<UserApi>;
/// Implements `rtap.v1.ProductService`.
pub(crate) type ProductApi = ResourceApi<entity::product::Entity>;
/// The gRPC server type of the product service.
pub(crate) type ProductServer = ProductServiceServer<ProductApi>;

/// Timestamps the catalog stores: now, at the microsecond precision of
/// `timestamptz`, so what the API returns round-trips exactly.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn invalid(violation: FieldViolation) -> Error {
    Error::InvalidArgument(vec![violation])
}

fn missing(field: &str) -> FieldViolation {
    FieldViolation::new(field, "is required")
}
