//! Kafka clients, built one way for every part of the server.

use std::{path::Path, sync::Arc, time::Duration};

use rskafka::{
    BackoffConfig,
    client::{Client, ClientBuilder, error::Error as KafkaError, partition::PartitionClient},
};

use tokio_rustls::rustls::ClientConfig;

/// Where the brokers are and how to talk to them.
#[derive(Debug, Clone)]
pub struct Brokers {
    /// Bootstrap `host:port`s.
    pub addrs: Vec<String>,
    /// TLS towards every broker; `None`: plaintext.
    tls: Option<Arc<ClientConfig>>,
}

impl Brokers {
    /// Plaintext connections to `addrs`.
    pub fn plaintext(addrs: Vec<String>) -> Self {
        Self { addrs, tls: None }
    }

    /// TLS connections to `addrs`, trusting the PEM CA certificates in
    /// `ca`; fails naming the file if it is unusable.
    pub fn tls(addrs: Vec<String>, ca: &Path) -> Result<Self, String> {
        let roots = super::tls::read_roots(ca)?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            addrs,
            tls: Some(Arc::new(config)),
        })
    }
}

/// An rskafka client whose retries give up after `deadline`: rskafka retries
/// forever without one, which would turn a broker outage into a silent hang.
pub(crate) async fn client(brokers: &Brokers, deadline: Duration) -> Result<Client, KafkaError> {
    let mut builder = ClientBuilder::new(brokers.addrs.clone());
    if let Some(tls) = &brokers.tls {
        builder = builder.tls_config(tls.clone());
    }
    builder
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
