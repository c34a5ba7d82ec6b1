//! The client side of this server's own API, for `rtap-server watch` and
//! `rtap-server health`.

use std::time::Duration;

use crate::{config::Config, error::Error};

pub(crate) use rtap::client::AuthChannel as ServerChannel;

/// A channel to the server at `--listen-addr` (loopback when it listens on
/// every address), each call bounded by `call_timeout` when given, over TLS
/// with `--tls-ca`, and carrying `--api-key`.
pub(crate) async fn server_channel(
    config: &Config,
    call_timeout: Option<Duration>,
) -> Result<(ServerChannel, std::net::SocketAddr), Error> {
    let mut addr = config.listen_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let settings = config.client_settings();
    let mut endpoint = settings
        .endpoint(&addr.to_string())
        .map_err(|e| Error::Config(e.to_string()))?
        .connect_timeout(config.dependency_timeout);
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let channel = endpoint.connect().await.map_err(|e| Error::Unavailable {
        dependency: "rtap-server",
        reason: format!(
            "cannot connect to {addr} (is rtap-server running? set --listen-addr): {e}"
        ),
    })?;
    let channel = settings
        .authorize(channel)
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok((channel, addr))
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
