//! TLS on the gRPC port: rustls with the ring provider (pure Rust and
//! assembly, so building needs no cmake or C toolchain beyond the one
//! cargo already has; handshakes of long-lived gRPC connections are too
//! rare for aws-lc's speed to matter). The certificate, key and client CA
//! are re-read when their files change (checked every
//! `--tls-reload-interval`) or on SIGHUP: new connections get the new ones,
//! open connections and their streams go on untouched.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted but not yet handed to the server.
const ACCEPTED_QUEUE: usize = 256;

/// Where the server's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; none:
    /// clients present no certificate.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// A rustls configuration from the files as they are now.
    fn load(&self) -> Result<Arc<ServerConfig>, String> {
        let certs = read_pem::<CertificateDer<'static>>(&self.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| format!("{}: no usable private key: {e}", self.key.display()))?;
        let provider = Arc::new(ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?;
        let builder = match &self.client_ca {
            Some(path) => {
                let roots = read_roots(path)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("{} and {}: {e}", self.cert.display(), self.key.display()))?;
        // HTTP/1.1 too: the dashboard's page, and grpc-web from browsers that
        // do not negotiate HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// When each file last changed, to notice a replacement.
    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| {
                std::fs::metadata(path)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The CA certificates in the PEM file at `path`, as trust roots.
pub(crate) fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for ca in read_pem::<CertificateDer<'static>>(path, "CA certificate")? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn read_pem<T: PemObject>(path: &Path, what: &str) -> Result<Vec<T>, String> {
    let items = T::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
    if items.is_empty() {
        return Err(format!("{}: no {what} in the file", path.display()));
    }
    Ok(items)
}

/// The TLS configuration new connections get, replaced when the files
/// change.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadingTls {
    /// Loads `files`; fails (naming the file) if they are unusable.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let current = RwLock::new(files.load()?);
        Ok(Arc::new(Self { files, current }))
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reload(&self, why: &str) {
        match self.files.load() {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(why, "TLS certificate reloaded");
            }
            Err(error) => {
                tracing::error!(why, error = %error, "cannot reload the TLS certificate; serving the previous one");
            }
        }
    }

    /// Reloads when the files change (checked every `interval`) or on
    /// SIGHUP, until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => Some(hangups),
            Err(error) => {
                tracing::warn!(error = %error, "no SIGHUP handler; TLS files are still watched");
                None
            }
        };
        let mut stamps = self.files.stamps();
        let mut ticks = tokio::time::interval(interval);
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(hangups) => hangups.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hangup => self.reload("SIGHUP"),
                _ = ticks.tick() => {
                    let now = self.files.stamps();
                    if now != stamps {
                        stamps = now;
                        self.reload("files changed");
                    }
                }
            }
        }
    }

    /// The TLS connections made on `listener`, handshakes done (each on a
    /// task of its own, so a slow client holds up no other), until
    /// `shutdown`.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (accepted, incoming) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    connection = listener.accept() => match connection {
                        Ok(connection) => connection,
                        Err(error) => {
                            // Out of file descriptors, say: wait, do not spin.
                            tracing::warn!(error = %error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                if let Err(error) = tune(&tcp) {
                    tracing::debug!(%peer, error = %error, "cannot set socket options");
                }
                let acceptor = TlsAcceptor::from(self.current());
                let accepted = accepted.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = accepted.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, error = %error, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(incoming)
    }
}

/// The socket options of the plaintext listener: no Nagle delay on small
/// replies, and keepalive probes on idle connections.
fn tune(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(super::TCP_KEEPALIVE);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}
