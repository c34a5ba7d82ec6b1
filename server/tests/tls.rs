//! TLS on the gRPC port, with certificates made here: plaintext is refused
//! cleanly, mutual TLS refuses unknown clients, and a certificate replaced
//! on disk is served to new connections while open streams go on.

mod common;

use std::{path::Path, time::Duration};

use anyhow::{Context, ensure};
use common::{TestDatabase, TestServer, test_config};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rtap::v1::{GetEventCountsRequest, analytics_service_client::AnalyticsServiceClient};
use rtap_server::Config;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A certificate authority of the test.
struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ok(Self {
            cert: params.self_signed(&key)?,
            key,
        })
    }

    /// A leaf certificate and its key, PEM, for `usage`.
    fn issue(&self, usage: ExtendedKeyUsagePurpose) -> anyhow::Result<(String, String)> {
        self.issue_for("localhost", usage)
    }

    /// A leaf certificate for `name` (a host name or an IP address).
    fn issue_for(
        &self,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// Writes the server's certificate and key into `dir` (atomically, as a
/// deployment tool renames them in place).
fn install(dir: &Path, (cert, key): &(String, String)) -> anyhow::Result<()> {
    for (name, text) in [("server.pem", cert), ("server.key", key)] {
        let staged = dir.join(format!("{name}.new"));
        std::fs::write(&staged, text)?;
        std::fs::rename(&staged, dir.join(name))?;
    }
    Ok(())
}

fn tls_config(database: &TestDatabase, dir: &Path) -> Config {
    let mut config = test_config(database);
    config.tls_cert = Some(dir.join("server.pem"));
    config.tls_key = Some(dir.join("server.key"));
    config.tls_reload_interval = Duration::from_millis(100);
    config
}

/// A TLS channel to `server` trusting `ca`, presenting `identity`.
async fn connect(
    server: &TestServer,
    ca: &str,
    identity: Option<&(String, String)>,
) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(Endpoint::from_shared(format!("https://{}", server.addr))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Whether a health check over `channel` (or its connection) succeeds.
async fn healthy(channel: anyhow::Result<Channel>) -> bool {
    let Ok(channel) = channel else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok()
}

#[tokio::test]
async fn plaintext_to_a_tls_port_fails_cleanly_and_tls_with_the_ca_works() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let ca = Authority::new("RTAP test CA")?;
    install(dir.path(), &ca.issue(ExtendedKeyUsagePurpose::ServerAuth)?)?;
    let server = TestServer::start(tls_config(&database, dir.path())).await?;

    ensure!(
        healthy(connect(&server, &ca.pem(), None).await).await,
        "TLS with the CA"
    );
    let plaintext = tokio::time::timeout(
        Duration::from_secs(10),
        HealthClient::new(server.channel()).check(HealthCheckRequest::default()),
    )
    .await
    .context("a plaintext call must fail, not hang")?;
    ensure!(plaintext.is_err(), "plaintext was answered: {plaintext:?}");
    let stranger = Authority::new("someone else")?;
    ensure!(
        !healthy(connect(&server, &stranger.pem(), None).await).await,
        "a client that does not trust the server's CA must not connect"
    );
    // The failures above cost the server nothing.
    ensure!(
        healthy(connect(&server, &ca.pem(), None).await).await,
        "still serving"
    );

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_of_its_ca() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let ca = Authority::new("RTAP test CA")?;
    install(dir.path(), &ca.issue(ExtendedKeyUsagePurpose::ServerAuth)?)?;
    let clients = Authority::new("RTAP clients")?;
    std::fs::write(dir.path().join("clients.pem"), clients.pem())?;
    let mut config = tls_config(&database, dir.path());
    config.tls_client_ca = Some(dir.path().join("clients.pem"));
    let server = TestServer::start(config).await?;

    let known = clients.issue(ExtendedKeyUsagePurpose::ClientAuth)?;
    ensure!(
        healthy(connect(&server, &ca.pem(), Some(&known)).await).await,
        "a client certificate of the client CA"
    );
    ensure!(
        !healthy(connect(&server, &ca.pem(), None).await).await,
        "no client certificate"
    );
    let unknown = Authority::new("rogue")?.issue(ExtendedKeyUsagePurpose::ClientAuth)?;
    ensure!(
        !healthy(connect(&server, &ca.pem(), Some(&unknown)).await).await,
        "a client certificate of another CA"
    );

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_new_connections_while_open_streams_go_on()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let old_ca = Authority::new("old CA")?;
    install(
        dir.path(),
        &old_ca.issue(ExtendedKeyUsagePurpose::ServerAuth)?,
    )?;
    let mut config = tls_config(&database, dir.path());
    config.role = rtap_server::config::Role::Api;
    let server = TestServer::start(config.clone()).await?;

    // A subscription with a heartbeat every second, over the old certificate.
    let mut analytics = AnalyticsServiceClient::new(connect(&server, &old_ca.pem(), None).await?);
    let mut stream = analytics
        .subscribe(common::counts_subscription(600, 1))
        .await?
        .into_inner();
    stream.message().await?.context("snapshot")?;

    let new_ca = Authority::new("new CA")?;
    install(
        dir.path(),
        &new_ca.issue(ExtendedKeyUsagePurpose::ServerAuth)?,
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !healthy(connect(&server, &new_ca.pem(), None).await).await {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        !healthy(connect(&server, &old_ca.pem(), None).await).await,
        "new connections get the new certificate only"
    );
    // The stream opened before goes on: two more messages.
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .context("the open stream stalled")??
            .context("the open stream ended")?;
        // A heartbeat, or the window rolling at a minute boundary.
        ensure!(message.update.is_some(), "{message:?}");
    }

    drop(stream);
    server.stop().await?;
    common::delete_redis_namespace(&config.redis_url, &config.redis_namespace, 4).await?;
    database.drop().await
}

/// A port nobody listens on now.
#[tokio::test]
async fn the_metric_store_over_rediss_is_verified_against_a_trusted_ca() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let ca = Authority::new("Redis CA")?;
    let (cert, key) = ca.issue_for("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth)?;
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("redis.pem"), cert)?;
    std::fs::write(path("redis.key"), key)?;
    std::fs::write(path("ca.pem"), ca.pem())?;
    std::fs::write(path("other.pem"), Authority::new("another CA")?.pem())?;
    let redis_port = common::free_port()?;
    let mut redis = tokio::process::Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
        .args([
            "--tls-port",
            &redis_port.to_string(),
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(path("redis.pem"))
        .arg("--tls-key-file")
        .arg(path("redis.key"))
        .arg("--tls-ca-cert-file")
        .arg(path("ca.pem"))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let config = test_config(&database);
    let server = |trusted: bool| -> anyhow::Result<(tokio::process::Child, String)> {
        let addr = format!("127.0.0.1:{}", common::free_port()?);
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rtap-server"));
        command
            .args(["--role", "api", "--listen-addr", &addr])
            .args(["--metrics-addr", "off"])
            .args(["--database-url", &database.url])
            .args(["--redis-url", &format!("rediss://127.0.0.1:{redis_port}/")])
            .args(["--redis-namespace", &config.redis_namespace])
            .args(["--health-check-interval", "200ms"])
            // rustls-native-certs trusts what SSL_CERT_FILE names.
            .env(
                "SSL_CERT_FILE",
                if trusted {
                    path("ca.pem")
                } else {
                    path("none.pem")
                },
            )
            .env("SSL_CERT_DIR", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        Ok((command.spawn()?, addr))
    };
    let channel = |addr: &str| -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    let analytics = "rtap.v1.AnalyticsService";

    let (_trusting, addr) = server(true)?;
    common::wait_for_health(
        channel(&addr)?,
        analytics,
        ServingStatus::Serving,
        Duration::from_secs(30),
    )
    .await
    .context("analytics over rediss with the CA trusted")?;
    AnalyticsServiceClient::new(channel(&addr)?)
        .get_event_counts(GetEventCountsRequest {
            window: Some(rtap::v1::TimeWindow {
                window: Some(rtap::v1::time_window::Window::Trailing(
                    prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .context("a query over rediss")?;

    let (_doubting, addr) = server(false)?;
    // Several health checks later, Redis still counts as down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        common::health_status(channel(&addr)?, analytics).await? == ServingStatus::NotServing,
        "analytics must not serve over an unverified rediss connection"
    );
    let refused = AnalyticsServiceClient::new(channel(&addr)?)
        .get_event_counts(GetEventCountsRequest::default())
        .await;
    ensure!(
        refused.is_err(),
        "a server that does not trust the CA read Redis"
    );

    redis.kill().await?;
    database.drop().await
}

/// Terminates TLS on a port of its own and forwards each connection to
/// `upstream` in plaintext: a Kafka broker behind a TLS listener, as the
/// test broker serves no TLS itself.
async fn tls_proxy(
    cert: &(String, String),
    upstream: std::net::SocketAddr,
) -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    use tokio_rustls::rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let certs = CertificateDer::pem_slice_iter(cert.0.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes())?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut client), Ok(mut broker)) = (
                    acceptor.accept(client).await,
                    tokio::net::TcpStream::connect(upstream).await,
                ) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
            });
        }
    });
    Ok((port, task))
}

#[tokio::test]
async fn kafka_over_tls_carries_tracked_events_into_the_metrics() -> anyhow::Result<()> {
    use rtap::v1::{
        GetPipelineStatusRequest, TrackRequest, ingest_service_client::IngestServiceClient,
    };
    let database = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let ca = Authority::new("Kafka CA")?;
    let broker_cert = ca.issue_for("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth)?;
    std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
    std::fs::write(
        dir.path().join("other.pem"),
        Authority::new("another CA")?.pem(),
    )?;

    // A broker of its own, advertising the TLS proxy's port as its address.
    let plain = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (tls_port, _proxy) = tls_proxy(&broker_cert, plain).await?;
    let nisshi = std::env::var("HOME")
        .map(|home| std::path::Path::new(&home).join(".cargo/bin/nisshi"))
        .ok()
        .filter(|path| path.exists())
        .unwrap_or_else(|| "nisshi".into());
    let _broker = tokio::process::Command::new(nisshi)
        .arg("broker")
        .args(["--listener-url", &format!("tcp://{plain}")])
        .args([
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{tls_port}"),
        ])
        .args([
            "--storage-engine",
            &format!("memory://tls-{}/", common::unique_suffix()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start nisshi (scripts/services.sh up installs it)")?;

    let mut config = test_config(&database);
    config.kafka_brokers = vec![format!("127.0.0.1:{tls_port}")];
    config.events_partitions = 1;
    config.kafka_tls_ca = Some(dir.path().join("ca.pem"));
    let server = TestServer::start(config.clone()).await?;
    let track = TrackRequest {
        event: Some(common::pipeline::event(1, chrono::Utc::now())),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut ingest = IngestServiceClient::new(server.channel());
    while let Err(status) = ingest.track(track.clone()).await {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "Track over TLS: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut analytics = AnalyticsServiceClient::new(server.channel());
    loop {
        let status = analytics
            .get_pipeline_status(GetPipelineStatusRequest {})
            .await?
            .into_inner();
        if status.total.as_ref().is_some_and(|t| t.events_applied == 1) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the event never reached the metrics: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await?;

    // A server that trusts another CA cannot produce.
    let mut doubting = config.clone();
    doubting.kafka_tls_ca = Some(dir.path().join("other.pem"));
    doubting.ingest_ack_timeout = Duration::from_secs(2);
    doubting.role = rtap_server::config::Role::Api;
    let server = TestServer::start(doubting).await?;
    let refused = IngestServiceClient::new(server.channel())
        .track(track)
        .await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::Unavailable),
        "{refused:?}"
    );
    server.stop().await?;
    common::delete_redis_namespace(&config.redis_url, &config.redis_namespace, 1).await?;
    database.drop().await
}
