//! Connecting to an RTAP server as a client, the one way RTAP's own tools
//! (`rtap-server watch`/`health`, `rtap-simulator`) do it: plaintext or TLS,
//! and an API key presented with every call.

use std::path::{Path, PathBuf};

use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// How to reach a server besides its address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSettings {
    /// Presented as `authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// PEM CA the server's certificate must chain to; set, the connection
    /// uses TLS.
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host of
    /// the address).
    pub tls_server_name: Option<String>,
    /// This client's PEM certificate and key, for mutual TLS.
    pub tls_identity: Option<(PathBuf, PathBuf)>,
}

/// What keeps a client from being set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a valid URI.
    #[error("invalid server address `{0}`: {1}")]
    Address(String, String),
    /// A TLS file cannot be read.
    #[error("cannot read {0}: {1}")]
    File(String, std::io::Error),
    /// The TLS settings are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The key cannot travel as gRPC metadata.
    #[error("the API key holds characters gRPC metadata cannot carry")]
    Key,
}

/// A channel that presents the API key with every call.
pub type AuthChannel = InterceptedService<Channel, BearerKey>;

/// Adds `authorization: Bearer <key>` to every call, when there is a key.
#[derive(Debug, Clone)]
pub struct BearerKey(Option<MetadataValue<Ascii>>);

impl BearerKey {
    /// The interceptor presenting `key`; an empty key (`RTAP_API_KEY=`) is
    /// no key.
    pub fn new(key: Option<&str>) -> Result<Self, ClientError> {
        key.map(str::trim)
            .filter(|key| !key.is_empty())
            .map(|key| {
                MetadataValue::try_from(format!("Bearer {}", key.trim()))
                    .map_err(|_| ClientError::Key)
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

impl ClientSettings {
    /// The endpoint of `address` (`host:port`, or a URL whose scheme is
    /// replaced by what `tls_ca` says).
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, ClientError> {
        let authority = address
            .split_once("://")
            .map_or(address, |(_, rest)| rest)
            .trim_end_matches('/');
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
            .map_err(|e| ClientError::Address(address.to_owned(), e.to_string()))?;
        let Some(ca) = &self.tls_ca else {
            return Ok(endpoint);
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        if let Some((cert, key)) = &self.tls_identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| ClientError::Tls(e.to_string()))
    }

    /// `channel` presenting the API key.
    pub fn authorize(&self, channel: Channel) -> Result<AuthChannel, ClientError> {
        Ok(InterceptedService::new(
            channel,
            BearerKey::new(self.api_key.as_deref())?,
        ))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_or_without_a_scheme_get_the_settings_scheme() {
        let plain = ClientSettings::default();
        for address in [
            "127.0.0.1:50051",
            "http://127.0.0.1:50051",
            "https://127.0.0.1:50051/",
        ] {
            let endpoint = plain.endpoint(address).expect("valid");
            assert_eq!(endpoint.uri().to_string(), "http://127.0.0.1:50051/");
        }
        assert!(plain.endpoint("not an address").is_err());
    }

    #[test]
    fn a_key_that_cannot_be_metadata_is_refused() {
        assert!(BearerKey::new(Some("rtap_abc")).is_ok_and(|k| k.0.is_some()));
        assert!(BearerKey::new(Some("  ")).is_ok_and(|k| k.0.is_none()));
        assert!(matches!(
            BearerKey::new(Some("bad\nkey")),
            Err(ClientError::Key)
        ));
    }
}
