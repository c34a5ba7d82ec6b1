//! User and product CRUD against a real PostgreSQL.

mod common;

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use common::{
    TcpProxy, TestDatabase, TestServer, bad_request_fields, test_config, wait_for_health,
};
use prost_types::FieldMask;
use rtap::v1::{
    CreateProductRequest, CreateUserRequest, DeleteProductRequest, DeleteUserRequest,
    GetProductRequest, GetUserRequest, ListProductsRequest, ListUsersRequest, Product,
    UpdateProductRequest, UpdateUserRequest, User, product_service_client::ProductServiceClient,
    user_service_client::UserServiceClient,
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// A server with a migrated database of its own.
struct Catalog {
    database: TestDatabase,
    server: TestServer,
}

impl Catalog {
    async fn start() -> anyhow::Result<Self> {
        let database = TestDatabase::create().await?;
        Self::start_with(database, |_| {}).await
    }

    async fn start_with(
        database: TestDatabase,
        adjust: impl FnOnce(&mut rtap_server::Config),
    ) -> anyhow::Result<Self> {
        let mut config = test_config(&database);
        adjust(&mut config);
        let server = TestServer::start_with_catalog(config).await?;
        Ok(Self { database, server })
    }

    fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.server.channel())
    }

    fn products(&self) -> ProductServiceClient<Channel> {
        ProductServiceClient::new(self.server.channel())
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await?;
        self.database.drop().await
    }
}

fn user(first: &str, last: &str) -> User {
    User {
        first_name: first.into(),
        last_name: last.into(),
        ..User::default()
    }
}

fn product(name: &str, category: &str, price: f64) -> Product {
    Product {
        name: name.into(),
        category: category.into(),
        price,
        ..Product::default()
    }
}

async fn create_user(catalog: &Catalog, user: User) -> Result<User, tonic::Status> {
    let reply = catalog
        .users()
        .create_user(CreateUserRequest { user: Some(user) })
        .await?;
    Ok(reply.into_inner().user.expect("a created user"))
}

async fn get_user(catalog: &Catalog, id: i64) -> Result<Option<User>, tonic::Status> {
    let reply = catalog.users().get_user(GetUserRequest { id }).await?;
    Ok(reply.into_inner().user)
}

async fn create_product(catalog: &Catalog, product: Product) -> Result<Product, tonic::Status> {
    let reply = catalog
        .products()
        .create_product(CreateProductRequest {
            product: Some(product),
        })
        .await?;
    Ok(reply.into_inner().product.expect("a created product"))
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

#[tokio::test]
async fn created_users_read_back_exactly_with_trimmed_names() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let created = create_user(
        &catalog,
        User {
            email: Some(" ada@example.com ".into()),
            ..user("  Ada ", " Lovelace")
        },
    )
    .await?;
    assert!(created.id > 0);
    assert_eq!(created.first_name, "Ada");
    assert_eq!(created.last_name, "Lovelace");
    assert_eq!(created.email.as_deref(), Some("ada@example.com"));
    assert_eq!(created.create_time, created.update_time);

    let fetched = get_user(&catalog, created.id).await?;
    assert_eq!(
        fetched.as_ref(),
        Some(&created),
        "timestamps round-trip exactly"
    );
    catalog.stop().await
}

#[tokio::test]
async fn creating_a_duplicate_user_returns_already_exists_ignoring_case_and_spaces()
-> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    create_user(&catalog, user("Ada", "Lovelace")).await?;
    let error = create_user(&catalog, user(" ada", "LOVELACE "))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists, "{error:?}");
    // Same first name, other last name: a different user.
    create_user(&catalog, user("Ada", "Byron")).await?;
    catalog.stop().await
}

#[tokio::test]
async fn a_hundred_concurrent_identical_creates_make_exactly_one_row() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let users = (0..100).map(|_| {
        let mut client = catalog.users();
        async move {
            client
                .create_user(CreateUserRequest {
                    user: Some(user("Grace", "Hopper")),
                })
                .await
        }
    });
    let products = (0..100).map(|_| {
        let mut client = catalog.products();
        async move {
            client
                .create_product(CreateProductRequest {
                    product: Some(product("Compiler", "books", 10.0)),
                })
                .await
        }
    });
    let (users, products) = tokio::join!(
        futures_join_all(users.collect()),
        futures_join_all(products.collect())
    );
    for results in [
        users
            .iter()
            .map(|r| r.as_ref().map(|_| ()))
            .collect::<Vec<_>>(),
        products.iter().map(|r| r.as_ref().map(|_| ())).collect(),
    ] {
        let successes = results.iter().filter(|r| r.is_ok()).count();
        let duplicates = results
            .iter()
            .filter(|r| matches!(r, Err(e) if e.code() == Code::AlreadyExists))
            .count();
        assert_eq!((successes, duplicates), (1, 99), "{results:?}");
    }
    let listed = catalog
        .users()
        .list_users(ListUsersRequest::default())
        .await?
        .into_inner();
    assert_eq!(listed.users.len(), 1);
    catalog.stop().await
}

/// Runs futures concurrently on the test runtime and collects their outputs
/// in order.
async fn futures_join_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task finished"));
    }
    outputs
}

/// Gets are coalesced into shared queries under load (`catalog::lookup`):
/// each caller must still get its own row, or NOT_FOUND, and see the writes
/// that finished before its call.
#[tokio::test]
async fn concurrent_gets_each_return_their_own_row_and_see_earlier_writes() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let mut created = Vec::new();
    for i in 0..40 {
        created.push(create_user(&catalog, user(&format!("Ada{i}"), "Lovelace")).await?);
    }
    for deleted in created.iter().step_by(4) {
        catalog
            .users()
            .delete_user(DeleteUserRequest { id: deleted.id })
            .await?;
    }
    let expected = |id: i64| -> Option<User> {
        created
            .iter()
            .enumerate()
            .find(|(_, user)| user.id == id)
            .filter(|(index, _)| index % 4 != 0)
            .map(|(_, user)| user.clone())
    };
    let last_id = created.last().map_or(0, |user| user.id);
    // Every id several times, deleted ones and ids never created included.
    let ids: Vec<i64> = (0..400)
        .map(|i| created[0].id + (i * 7) % (last_id - created[0].id + 5))
        .collect();
    // Callers share one connection, as a client's stubs do.
    let shared = catalog.users();
    let calls = ids.iter().map(|&id| {
        let mut client = shared.clone();
        async move { (id, client.get_user(GetUserRequest { id }).await) }
    });
    for (id, result) in futures_join_all(calls.collect()).await {
        match (expected(id), result) {
            (Some(want), Ok(got)) => assert_eq!(got.into_inner().user, Some(want), "id {id}"),
            (None, Err(status)) => assert_eq!(status.code(), Code::NotFound, "id {id}"),
            (want, got) => panic!("id {id}: expected {want:?}, got {got:?}"),
        }
    }

    // Read your writes while other gets keep the lookup busy.
    let busy: Vec<_> = (0..200)
        .map(|i| {
            let mut client = shared.clone();
            let id = created[1 + i % 3].id;
            tokio::spawn(async move { client.get_user(GetUserRequest { id }).await })
        })
        .collect();
    let mut users = catalog.users();
    let mut target = created[5].clone();
    for round in 0..20 {
        target.email = Some(format!("ada{round}@example.com"));
        users
            .update_user(UpdateUserRequest {
                user: Some(target.clone()),
                update_mask: mask(&["email"]),
            })
            .await?;
        let read = users
            .get_user(GetUserRequest { id: target.id })
            .await?
            .into_inner()
            .user
            .and_then(|user| user.email);
        assert_eq!(read, target.email, "round {round}");
    }
    for call in busy {
        call.await??;
    }
    catalog.stop().await
}

#[tokio::test]
async fn invalid_fields_are_all_named_in_bad_request() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let error = create_user(
        &catalog,
        User {
            email: Some("not-an-address".into()),
            ..user("   ", &"x".repeat(257))
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        bad_request_fields(&error),
        ["user.first_name", "user.last_name", "user.email"]
    );

    for price in [-1.0, f64::NAN, f64::INFINITY] {
        let error = create_product(&catalog, product("", "", price))
            .await
            .unwrap_err();
        assert_eq!(
            bad_request_fields(&error),
            ["product.name", "product.category", "product.price"],
            "price {price}"
        );
    }

    let error = catalog
        .users()
        .create_user(CreateUserRequest { user: None })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&error), ["user"]);
    let error = catalog
        .users()
        .get_user(GetUserRequest { id: 0 })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&error), ["id"]);
    let error = create_user(&catalog, user("Nul\0", "Byte"))
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&error), ["user.first_name"]);
    catalog.stop().await
}

#[tokio::test]
async fn missing_ids_return_not_found_for_get_update_and_delete() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let created = create_user(&catalog, user("Alan", "Turing")).await?;
    catalog
        .users()
        .delete_user(DeleteUserRequest { id: created.id })
        .await?;

    let mut users = catalog.users();
    let codes = [
        users
            .get_user(GetUserRequest { id: created.id })
            .await
            .map(|_| ()),
        users
            .update_user(UpdateUserRequest {
                user: Some(created.clone()),
                update_mask: None,
            })
            .await
            .map(|_| ()),
        users
            .delete_user(DeleteUserRequest { id: created.id })
            .await
            .map(|_| ()),
    ]
    .map(|r| r.unwrap_err().code());
    assert_eq!(codes, [Code::NotFound; 3]);

    let mut products = catalog.products();
    let codes = [
        products
            .get_product(GetProductRequest { id: 999_999 })
            .await
            .map(|_| ()),
        products
            .delete_product(DeleteProductRequest { id: 999_999 })
            .await
            .map(|_| ()),
    ]
    .map(|r| r.unwrap_err().code());
    assert_eq!(codes, [Code::NotFound; 2]);
    catalog.stop().await
}

#[tokio::test]
async fn update_mask_changes_only_the_named_fields() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let created = create_product(&catalog, product("Kettle", "kitchen", 25.0)).await?;
    tokio::time::sleep(Duration::from_millis(2)).await;

    let updated = catalog
        .products()
        .update_product(UpdateProductRequest {
            product: Some(Product {
                id: created.id,
                price: 19.5,
                name: "ignored: not in the mask".into(),
                ..Product::default()
            }),
            update_mask: mask(&["price"]),
        })
        .await?
        .into_inner()
        .product
        .expect("updated product");
    assert_eq!(updated.price, 19.5);
    assert_eq!(updated.name, "Kettle");
    assert_eq!(updated.category, "kitchen");
    assert_eq!(updated.create_time, created.create_time);
    assert!(
        ts(&updated.update_time) > ts(&created.update_time),
        "update_time moves forward"
    );

    // An empty mask replaces every mutable field.
    let replaced = catalog
        .products()
        .update_product(UpdateProductRequest {
            product: Some(Product {
                id: created.id,
                ..product("Teapot", "tea", 12.0)
            }),
            update_mask: None,
        })
        .await?
        .into_inner()
        .product
        .expect("updated product");
    assert_eq!(
        (
            replaced.name.as_str(),
            replaced.category.as_str(),
            replaced.price
        ),
        ("Teapot", "tea", 12.0)
    );
    assert!(ts(&replaced.update_time) > ts(&updated.update_time));

    // Clearing the email through the mask.
    let ada = create_user(
        &catalog,
        User {
            email: Some("ada@example.com".into()),
            ..user("Ada", "Lovelace")
        },
    )
    .await?;
    let cleared = catalog
        .users()
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: ada.id,
                ..User::default()
            }),
            update_mask: mask(&["email"]),
        })
        .await?
        .into_inner()
        .user
        .expect("updated user");
    assert_eq!(cleared.email, None);
    assert_eq!(cleared.first_name, "Ada");
    catalog.stop().await
}

#[tokio::test]
async fn update_masks_with_output_only_or_unknown_paths_are_invalid() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let created = create_user(&catalog, user("Edsger", "Dijkstra")).await?;
    let error = catalog
        .users()
        .update_user(UpdateUserRequest {
            user: Some(created.clone()),
            update_mask: mask(&["first_name", "create_time", "nickname"]),
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad_request_fields(&error),
        ["update_mask.paths[1]", "update_mask.paths[2]"]
    );
    let unchanged = get_user(&catalog, created.id).await?;
    assert_eq!(unchanged, Some(created));
    catalog.stop().await
}

#[tokio::test]
async fn an_update_that_would_collide_returns_already_exists() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    create_product(&catalog, product("Lamp", "home", 30.0)).await?;
    let chair = create_product(&catalog, product("Chair", "home", 60.0)).await?;
    let error = catalog
        .products()
        .update_product(UpdateProductRequest {
            product: Some(Product {
                id: chair.id,
                name: "LAMP".into(),
                ..Product::default()
            }),
            update_mask: mask(&["name"]),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists, "{error:?}");

    create_user(&catalog, user("Ada", "Lovelace")).await?;
    let other = create_user(&catalog, user("Ada", "Byron")).await?;
    let error = catalog
        .users()
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: other.id,
                last_name: "lovelace".into(),
                ..User::default()
            }),
            update_mask: mask(&["last_name"]),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists, "{error:?}");
    catalog.stop().await
}

fn ts(time: &Option<prost_types::Timestamp>) -> (i64, i32) {
    let time = time.as_ref().expect("timestamp set");
    (time.seconds, time.nanos)
}

async fn list_all_product_names(
    catalog: &Catalog,
    request: ListProductsRequest,
    between_pages: impl AsyncFnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<String>> {
    let mut between_pages = between_pages;
    let mut names = Vec::new();
    let mut request = request;
    for page in 0.. {
        let reply = catalog
            .products()
            .list_products(request.clone())
            .await?
            .into_inner();
        names.extend(reply.products.into_iter().map(|p| p.name));
        if reply.next_page_token.is_empty() {
            break;
        }
        between_pages(page).await?;
        request.page_token = reply.next_page_token;
    }
    Ok(names)
}

#[tokio::test]
async fn pages_stay_correct_when_rows_are_inserted_and_deleted_between_them() -> anyhow::Result<()>
{
    let catalog = Catalog::start().await?;
    let mut originals = Vec::new();
    for i in 0..25 {
        let created =
            create_product(&catalog, product(&format!("p{i:02}"), "c", f64::from(i))).await?;
        originals.push(created);
    }
    // Between pages: delete a product already listed, add one before the
    // cursor and one after it.
    let listed = list_all_product_names(
        &catalog,
        ListProductsRequest {
            page_size: 10,
            order_by: "name".into(),
            ..ListProductsRequest::default()
        },
        async |page| {
            if page == 0 {
                catalog
                    .products()
                    .delete_product(DeleteProductRequest {
                        id: originals[0].id,
                    })
                    .await?;
                create_product(&catalog, product("a-before-cursor", "c", 1.0)).await?;
                create_product(&catalog, product("z-after-cursor", "c", 1.0)).await?;
            }
            Ok(())
        },
    )
    .await?;
    let mut expected: Vec<String> = originals.iter().map(|p| p.name.clone()).collect();
    expected.push("z-after-cursor".into());
    assert_eq!(listed, expected, "no row repeated or skipped");
    catalog.stop().await
}

#[tokio::test]
async fn lists_order_filter_and_cap_as_documented() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    for (name, category, price) in [
        ("Red mug", "kitchen", 8.0),
        ("red pen", "office", 2.0),
        ("Blue mug", "kitchen", 8.0),
        ("50% off_sign", "office", 1.0),
    ] {
        create_product(&catalog, product(name, category, price)).await?;
    }
    let names = |request: ListProductsRequest| {
        let catalog = &catalog;
        async move { list_all_product_names(catalog, request, async |_| Ok(())).await }
    };
    assert_eq!(
        names(ListProductsRequest {
            order_by: "price desc".into(),
            page_size: 1,
            ..ListProductsRequest::default()
        })
        .await?,
        ["Blue mug", "Red mug", "red pen", "50% off_sign"],
        "price desc, ties by id desc"
    );
    assert_eq!(
        names(ListProductsRequest {
            name_prefix: "RED".into(),
            ..ListProductsRequest::default()
        })
        .await?,
        ["Red mug", "red pen"]
    );
    assert_eq!(
        names(ListProductsRequest {
            category: "kitchen".into(),
            order_by: "name".into(),
            ..ListProductsRequest::default()
        })
        .await?,
        ["Blue mug", "Red mug"]
    );
    assert_eq!(
        names(ListProductsRequest {
            name_prefix: "50%".into(),
            ..ListProductsRequest::default()
        })
        .await?,
        ["50% off_sign"],
        "LIKE wildcards in a prefix are literal"
    );
    let capped = catalog
        .products()
        .list_products(ListProductsRequest {
            page_size: 1_000_000,
            ..ListProductsRequest::default()
        })
        .await?
        .into_inner();
    assert_eq!(capped.products.len(), 4);

    let users = catalog
        .users()
        .list_users(ListUsersRequest {
            order_by: "last_name desc".into(),
            ..ListUsersRequest::default()
        })
        .await?
        .into_inner();
    assert!(users.users.is_empty());
    catalog.stop().await
}

#[tokio::test]
async fn bad_list_arguments_are_invalid() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    for i in 0..3 {
        create_product(&catalog, product(&format!("item {i}"), "c", 1.0)).await?;
    }
    let first = catalog
        .products()
        .list_products(ListProductsRequest {
            page_size: 1,
            ..ListProductsRequest::default()
        })
        .await?
        .into_inner();
    let cases = [
        (
            ListProductsRequest {
                order_by: "colour".into(),
                ..ListProductsRequest::default()
            },
            vec!["order_by"],
        ),
        (
            ListProductsRequest {
                page_size: -1,
                page_token: "not a token".into(),
                ..ListProductsRequest::default()
            },
            vec!["page_size", "page_token"],
        ),
        (
            ListProductsRequest {
                page_token: first.next_page_token.clone(),
                order_by: "name".into(),
                ..ListProductsRequest::default()
            },
            vec!["page_token"],
        ),
        (
            ListProductsRequest {
                page_token: first.next_page_token.clone(),
                category: "other".into(),
                ..ListProductsRequest::default()
            },
            vec!["page_token"],
        ),
    ];
    for (request, fields) in cases {
        let error = catalog
            .products()
            .list_products(request.clone())
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&error), fields, "{request:?}");
    }
    catalog.stop().await
}

#[tokio::test]
async fn control_characters_in_filters_are_invalid_argument_not_internal() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let error = catalog
        .products()
        .list_products(ListProductsRequest {
            name_prefix: "a\0b".into(),
            category: "c\u{7}".into(),
            ..ListProductsRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert_eq!(bad_request_fields(&error), ["name_prefix", "category"]);
    let error = catalog
        .users()
        .list_users(ListUsersRequest {
            name_prefix: "\0".into(),
            ..ListUsersRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&error), ["name_prefix"]);
    catalog.stop().await
}

#[tokio::test]
async fn errors_quote_a_short_prefix_of_huge_values() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let huge = "z".repeat(1 << 20);
    let error = catalog
        .users()
        .list_users(ListUsersRequest {
            order_by: huge.clone(),
            ..ListUsersRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Code::InvalidArgument,
        "{}",
        error.message().len()
    );
    assert!(error.message().len() < 1024, "{}", error.message().len());
    assert!(
        error.message().contains("1048576 characters"),
        "{}",
        error.message()
    );

    let created = create_user(&catalog, user("Huge", "Mask")).await?;
    let error = catalog
        .users()
        .update_user(UpdateUserRequest {
            user: Some(created),
            update_mask: mask(&[&"p".repeat(640 * 1024)]),
        })
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Code::InvalidArgument,
        "{}",
        error.message().len()
    );
    assert!(error.message().len() < 1024, "{}", error.message().len());
    assert!(error.details().len() < 1024, "{}", error.details().len());
    catalog.stop().await
}

#[tokio::test]
async fn a_get_after_the_database_closed_every_connection_still_succeeds() -> anyhow::Result<()> {
    let catalog = Catalog::start().await?;
    let created = create_user(&catalog, user("Grace", "Hopper")).await?;
    assert_eq!(get_user(&catalog, created.id).await?, Some(created.clone()));

    // As a database restart does: the look-up's kept connection is now closed.
    let terminated = catalog.database.terminate_connections().await?;
    assert!(terminated > 0, "the server held no connection to close");

    assert_eq!(get_user(&catalog, created.id).await?, Some(created));
    catalog.stop().await
}

#[tokio::test]
async fn an_unreachable_database_gives_unavailable_and_the_server_recovers() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let postgres: SocketAddr = "127.0.0.1:5432".parse()?;
    let proxy = TcpProxy::start(postgres).await?;
    let proxied_url = database
        .url
        .replace("127.0.0.1:5432", &proxy.addr.to_string());
    let catalog = Catalog::start_with(database, |config| {
        config.database_url = proxied_url;
        config.dependency_timeout = Duration::from_millis(500);
    })
    .await?;
    let created = create_user(&catalog, user("Barbara", "Liskov")).await?;
    // The look-up now holds a connection of its own: the cut must break it.
    let fetched = get_user(&catalog, created.id).await?;
    assert_eq!(fetched.as_ref(), Some(&created));

    proxy.cut();
    let error = catalog
        .users()
        .get_user(GetUserRequest { id: created.id })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    wait_for_health(
        catalog.server.channel(),
        "rtap.v1.UserService",
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await?;

    proxy.restore();
    wait_for_health(
        catalog.server.channel(),
        "rtap.v1.UserService",
        ServingStatus::Serving,
        Duration::from_secs(10),
    )
    .await?;
    let fetched = get_user(&catalog, created.id).await?;
    assert_eq!(fetched, Some(created));
    let ids: HashSet<_> = catalog
        .users()
        .list_users(ListUsersRequest::default())
        .await?
        .into_inner()
        .users
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(ids.len(), 1);
    catalog.stop().await
}
