//! Kafka clients, built one way for every part of the server.

use std::time::Duration;

use rskafka::{
    BackoffConfig,
    client::{Client, ClientBuilder, error::Error as KafkaError, partition::PartitionClient},
};

/// An rskafka client whose retries give up after `deadline`: rskafka retries
/// forever without one, which would turn a broker outage into a silent hang.
pub(crate) async fn client(brokers: &[String], deadline: Duration) -> Result<Client, KafkaError> {
    ClientBuilder::new(brokers.to_vec())
        .client_id("rtap-server")
        .backoff_config(BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
            deadline: Some(deadline),
        })
        .build()
        .await
}

/// The partition's high watermark (the offset after its last record), read
/// with a small fetch from `offset`: some brokers (Nisshi) answer
/// `ListOffsets(latest)` wrongly, and answer a fetch with no wait with no
/// partition at all, hence the short wait.
pub(crate) async fn high_watermark(
    source: &PartitionClient,
    offset: i64,
) -> Result<i64, KafkaError> {
    let (_, high_watermark) = source.fetch_records(offset, 1..1024, 10).await?;
    Ok(high_watermark)
}
