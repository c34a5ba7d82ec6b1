//! The simulator takes its users and products from a live RTAP catalog.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::{collections::HashSet, process::Stdio};

use common::{TestDatabase, TestServer, read_topic, test_config};
use prost::Message;
use rtap::v1::{
    InteractionEvent, ListProductsRequest, ListUsersRequest,
    product_service_client::ProductServiceClient, user_service_client::UserServiceClient,
};

#[tokio::test]
async fn seeded_catalog_ids_are_the_only_ids_simulated() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let server = TestServer::start_with_catalog(test_config(&database)).await?;
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = format!("rtap-test-sim-catalog-{}", common::unique_suffix());

    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_rtap-simulator"))
        .args([
            "--kafka-brokers",
            &brokers,
            "--topic",
            &topic,
            "--partitions",
            "1",
            "--metrics-addr",
            "off",
        ])
        .args(["--server-addr", &format!("http://{}", server.addr)])
        .args([
            "--seed-users",
            "30",
            "--seed-products",
            "20",
            "--count",
            "800",
            "--seed",
            "3",
        ])
        .args(["--progress", "none"])
        .stderr(Stdio::null())
        .status()
        .await?;
    assert!(status.success(), "rtap-simulator exited with {status}");

    let users: HashSet<i64> = UserServiceClient::new(server.channel())
        .list_users(ListUsersRequest {
            page_size: 100,
            ..ListUsersRequest::default()
        })
        .await?
        .into_inner()
        .users
        .into_iter()
        .map(|u| u.id)
        .collect();
    let products: HashSet<i64> = ProductServiceClient::new(server.channel())
        .list_products(ListProductsRequest {
            page_size: 100,
            ..ListProductsRequest::default()
        })
        .await?
        .into_inner()
        .products
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(
        (users.len(), products.len()),
        (30, 20),
        "the catalog was seeded"
    );

    let mut seen = 0;
    for (_, value) in read_topic(&brokers, &topic).await?.into_values().flatten() {
        let event = InteractionEvent::decode(value.as_slice())?;
        assert!(
            users.contains(&event.user_id),
            "user {} is not in the catalog",
            event.user_id
        );
        assert!(
            event.product_id == 0 || products.contains(&event.product_id),
            "product {} is not in the catalog",
            event.product_id
        );
        seen += 1;
    }
    assert_eq!(seen, 800);

    server.stop().await?;
    database.drop().await
}
