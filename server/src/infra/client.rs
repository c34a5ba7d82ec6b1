//! The client side of this server's own API, for `rtap-server watch` and
//! `rtap-server health`.

use std::time::Duration;

use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::{config::Config, error::Error};

/// A channel to this server that presents `--api-key` with every call.
pub(crate) type ServerChannel = InterceptedService<Channel, BearerKey>;

/// Adds `authorization: Bearer <key>` to every call, when there is a key.
#[derive(Debug, Clone)]
pub(crate) struct BearerKey(Option<MetadataValue<Ascii>>);

impl BearerKey {
    /// The interceptor presenting `key`.
    pub(crate) fn new(key: Option<&str>) -> Result<Self, Error> {
        key.map(|key| {
            MetadataValue::try_from(format!("Bearer {}", key.trim())).map_err(|_| {
                Error::Config(
                    "--api-key (RTAP_API_KEY) holds characters gRPC metadata cannot carry".into(),
                )
            })
        })
        .transpose()
        .map(Self)
    }
}

impl Interceptor for BearerKey {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to the server at `--listen-addr` (loopback when it listens on
/// every address), each call bounded by `call_timeout` when given and
/// carrying `--api-key`.
pub(crate) async fn server_channel(
    config: &Config,
    call_timeout: Option<Duration>,
) -> Result<(ServerChannel, std::net::SocketAddr), Error> {
    let key = BearerKey::new(config.api_key.as_deref())?;
    let mut addr = config.listen_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if config.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Error::Config(format!("invalid listen address {addr}: {e}")))?
        .connect_timeout(config.dependency_timeout);
    if let Some(tls) = client_tls(config)? {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    }
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let channel = endpoint.connect().await.map_err(|e| Error::Unavailable {
        dependency: "rtap-server",
        reason: format!(
            "cannot connect to {addr} (is rtap-server running? set --listen-addr): {e}"
        ),
    })?;
    Ok((InterceptedService::new(channel, key), addr))
}

/// The TLS settings of `--tls-ca` and friends; none without `--tls-ca`.
fn client_tls(config: &Config) -> Result<Option<ClientTlsConfig>, Error> {
    let Some(ca) = &config.tls_ca else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let Some(name) = &config.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_client_cert, &config.tls_client_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

/// `rtap-server health`: asks the server at `config.listen_addr` (an
/// unspecified address means this machine) for its overall health and fails
/// unless it is SERVING.
pub async fn probe_server(config: &Config) -> Result<(), Error> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let (channel, addr) = server_channel(config, Some(config.dependency_timeout)).await?;
    let unavailable = |reason: String| Error::Unavailable {
        dependency: "rtap-server",
        reason,
    };
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|e| unavailable(format!("health check at {addr} failed: {e}")))?
        .into_inner()
        .status();
    if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
        tracing::info!(%addr, "SERVING");
        Ok(())
    } else {
        Err(unavailable(format!(
            "{addr} reports {}",
            status.as_str_name()
        )))
    }
}
