//! Where simulated users and products come from: the RTAP catalog when a
//! server is given and reachable (optionally seeded first), otherwise a
//! synthetic id range.

use std::time::Duration;

use rtap::client::{AuthChannel, ClientError, ClientSettings};
use rtap::v1::{
    CreateProductRequest, CreateUserRequest, ListProductsRequest, ListUsersRequest, Product, User,
    product_service_client::ProductServiceClient, user_service_client::UserServiceClient,
};
use tonic::Code;

use crate::model::{Population, ProductInfo};

/// Most ids read from the catalog; a larger catalog is sampled by its first
/// ids.
const MAX_CATALOG_IDS: usize = 1_000_000;
const PAGE_SIZE: i32 = 1000;
const FIRST_NAMES: &[&str] = &[
    "Ada",
    "Alan",
    "Barbara",
    "Grace",
    "Edsger",
    "Donald",
    "Margaret",
    "Dennis",
    "Frances",
    "Ken",
    "Radia",
    "Linus",
    "Hedy",
    "John",
    "Katherine",
    "Tim",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace",
    "Turing",
    "Liskov",
    "Hopper",
    "Dijkstra",
    "Knuth",
    "Hamilton",
    "Ritchie",
    "Allen",
    "Thompson",
    "Perlman",
    "Torvalds",
    "Lamarr",
    "Backus",
    "Johnson",
    "Berners-Lee",
];
const CATEGORIES: &[&str] = &[
    "books", "garden", "kitchen", "music", "outdoor", "shoes", "tech", "toys",
];

/// Catalog failures.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The server address or the TLS settings are unusable.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An RPC failed.
    #[error("{0}: {1}")]
    Rpc(&'static str, tonic::Status),
}

/// The population to simulate: from the server at `server` (seeding it with
/// `seed_users` users and `seed_products` products first) when it answers
/// and has both users and products, otherwise synthetic.
pub async fn population(
    server: Option<&str>,
    settings: &ClientSettings,
    seed_users: u32,
    seed_products: u32,
    synthetic_users: u32,
    synthetic_products: u32,
) -> Result<Population, CatalogError> {
    let synthetic = || Population::synthetic(synthetic_users, synthetic_products);
    let Some(address) = server else {
        return Ok(synthetic());
    };
    let channel = settings
        .endpoint(address)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let channel = match channel.connect().await {
        Ok(channel) => settings.authorize(channel)?,
        Err(error) => {
            tracing::warn!(server = address, error = %error, "catalog unreachable; using synthetic ids");
            return Ok(synthetic());
        }
    };
    seed(&channel, seed_users, seed_products).await?;
    let users = list_users(&channel).await?;
    let products = list_products(&channel).await?;
    if users.is_empty() || products.is_empty() {
        tracing::warn!(
            users = users.len(),
            products = products.len(),
            "catalog has no users or no products; using synthetic ids (try --seed-users/--seed-products)"
        );
        return Ok(synthetic());
    }
    tracing::info!(
        users = users.len(),
        products = products.len(),
        "using the catalog's ids"
    );
    Ok(Population { users, products })
}

/// Creates users and products with deterministic names; ones that already
/// exist are kept, so seeding twice is harmless.
async fn seed(channel: &AuthChannel, users: u32, products: u32) -> Result<(), CatalogError> {
    let mut user_client = UserServiceClient::new(channel.clone());
    for i in 0..users as usize {
        let first = FIRST_NAMES[i % FIRST_NAMES.len()];
        let last = LAST_NAMES[(i / FIRST_NAMES.len()) % LAST_NAMES.len()];
        let round = i / (FIRST_NAMES.len() * LAST_NAMES.len());
        let user = User {
            first_name: first.into(),
            last_name: if round == 0 {
                last.into()
            } else {
                format!("{last} {round}")
            },
            email: Some(format!(
                "{}.{}{}@example.com",
                first.to_lowercase(),
                last.to_lowercase(),
                round
            )),
            ..User::default()
        };
        match user_client
            .create_user(CreateUserRequest { user: Some(user) })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::AlreadyExists => {}
            Err(status) => return Err(CatalogError::Rpc("cannot seed users", status)),
        }
    }
    let mut product_client = ProductServiceClient::new(channel.clone());
    for i in 0..products as usize {
        let category = CATEGORIES[i % CATEGORIES.len()];
        let product = Product {
            name: format!("{category} item {i}"),
            category: category.into(),
            price: 5.0 + ((i * 7919) % 19_500) as f64 / 100.0,
            ..Product::default()
        };
        match product_client
            .create_product(CreateProductRequest {
                product: Some(product),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::AlreadyExists => {}
            Err(status) => return Err(CatalogError::Rpc("cannot seed products", status)),
        }
    }
    if users > 0 || products > 0 {
        tracing::info!(users, products, "seeded the catalog");
    }
    Ok(())
}

async fn list_users(channel: &AuthChannel) -> Result<Vec<i64>, CatalogError> {
    let mut client = UserServiceClient::new(channel.clone());
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_users(ListUsersRequest {
                page_size: PAGE_SIZE,
                page_token,
                ..ListUsersRequest::default()
            })
            .await
            .map_err(|s| CatalogError::Rpc("cannot list users", s))?
            .into_inner();
        ids.extend(page.users.iter().map(|u| u.id));
        if page.next_page_token.is_empty() || ids.len() >= MAX_CATALOG_IDS {
            return Ok(ids);
        }
        page_token = page.next_page_token;
    }
}

async fn list_products(channel: &AuthChannel) -> Result<Vec<ProductInfo>, CatalogError> {
    let mut client = ProductServiceClient::new(channel.clone());
    let mut products = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_products(ListProductsRequest {
                page_size: PAGE_SIZE,
                page_token,
                ..ListProductsRequest::default()
            })
            .await
            .map_err(|s| CatalogError::Rpc("cannot list products", s))?
            .into_inner();
        products.extend(page.products.iter().map(|p| ProductInfo {
            id: p.id,
            price_micros: (p.price * 1e6).round() as i64,
        }));
        if page.next_page_token.is_empty() || products.len() >= MAX_CATALOG_IDS {
            return Ok(products);
        }
        page_token = page.next_page_token;
    }
}
