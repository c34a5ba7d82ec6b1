//! IngestService against a real broker: events are validated by the shared
//! rules, stored keyed by user, and acknowledged only once stored.

mod common;

use std::time::{Duration, Instant};

use common::{
    PrivateBroker, TestDatabase, TestServer, bad_request_fields, read_topic, test_config,
};
use prost::Message;
use rtap::v1::{
    EventType, InteractionEvent, Source, TrackRequest, TrackStreamRequest,
    ingest_service_client::IngestServiceClient,
};
use tonic::Code;

fn event(user_id: i64) -> InteractionEvent {
    let now = chrono::Utc::now();
    InteractionEvent {
        event_id: String::new(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: 0,
        }),
        user_id,
        product_id: 5,
        source: Source::MobileApp as i32,
        r#type: EventType::ProductView as i32,
        session_id: "session-1".into(),
        dwell_time: Some(prost_types::Duration {
            seconds: 12,
            nanos: 0,
        }),
        ..InteractionEvent::default()
    }
}

/// Every event stored on the events topic: (partition, key, event).
async fn stored(
    config: &rtap_server::Config,
) -> anyhow::Result<Vec<(i32, Vec<u8>, InteractionEvent)>> {
    let topic = read_topic(&config.kafka_brokers[0], &config.events_topic).await?;
    let mut all = Vec::new();
    for (partition, records) in topic {
        for (key, value) in records {
            all.push((partition, key, InteractionEvent::decode(value.as_slice())?));
        }
    }
    Ok(all)
}

#[tokio::test]
async fn track_stores_the_event_on_its_users_partition_and_fills_in_the_id() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = test_config(&database);
    let server = TestServer::start(config.clone()).await?;
    let mut client = IngestServiceClient::new(server.channel());

    let reply = client
        .track(TrackRequest {
            event: Some(event(42)),
        })
        .await?
        .into_inner();
    assert!(
        uuid::Uuid::try_parse(&reply.event_id).is_ok(),
        "{}",
        reply.event_id
    );
    let mine = InteractionEvent {
        event_id: "0f4b8f7e-2c1d-4b8e-9a55-0d3a8c7e6b21".into(),
        ..event(43)
    };
    let reply = client
        .track(TrackRequest {
            event: Some(mine.clone()),
        })
        .await?
        .into_inner();
    assert_eq!(reply.event_id, mine.event_id, "a caller's own id is kept");

    let records = stored(&config).await?;
    assert_eq!(records.len(), 2);
    for (partition, key, stored) in &records {
        assert_eq!(key, &stored.user_id.to_string().into_bytes());
        assert_eq!(
            *partition,
            rtap::kafka::partition_for_key(key, config.events_partitions)
        );
    }
    assert!(records.iter().any(|(_, _, e)| *e == mine));

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn invalid_events_are_rejected_with_every_field_and_nothing_is_stored() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let config = test_config(&database);
    let server = TestServer::start(config.clone()).await?;
    let mut client = IngestServiceClient::new(server.channel());

    let bad = InteractionEvent {
        user_id: 0,
        r#type: 0,
        dwell_time: Some(prost_types::Duration {
            seconds: -3,
            nanos: 0,
        }),
        ..event(1)
    };
    let error = client
        .track(TrackRequest { event: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(
        bad_request_fields(&error),
        ["event.user_id", "event.type", "event.dwell_time"]
    );
    let error = client
        .track(TrackRequest { event: None })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&error), ["event"]);

    // One good event, so the topic exists, then check nothing else is there.
    client
        .track(TrackRequest {
            event: Some(event(7)),
        })
        .await?;
    assert_eq!(stored(&config).await?.len(), 1);

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn a_stream_keeps_its_good_events_and_reports_the_bad_ones_by_index() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let config = test_config(&database);
    let server = TestServer::start(config.clone()).await?;
    let mut client = IngestServiceClient::new(server.channel());

    let events: Vec<_> = (0..200)
        .map(|i| {
            let mut e = event(1000 + i);
            if i % 50 == 7 {
                e.session_id.clear();
            }
            TrackStreamRequest { event: Some(e) }
        })
        .collect();
    let reply = client
        .track_stream(tokio_stream::iter(events))
        .await?
        .into_inner();
    assert_eq!(reply.accepted_count, 196);
    assert_eq!(reply.accepted_event_ids.len(), 196);
    let indices: Vec<_> = reply.rejected.iter().map(|r| r.index).collect();
    assert_eq!(indices, [7, 57, 107, 157]);
    assert_eq!(reply.rejected[0].violations[0].field, "event.session_id");

    let records = stored(&config).await?;
    assert_eq!(records.len(), 196);
    let stored_ids: std::collections::HashSet<_> =
        records.into_iter().map(|(_, _, e)| e.event_id).collect();
    assert!(
        reply
            .accepted_event_ids
            .iter()
            .all(|id| stored_ids.contains(id))
    );

    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn a_stream_past_its_bound_is_resource_exhausted() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database);
    config.max_stream_events = 10;
    let server = TestServer::start(config).await?;
    let events: Vec<_> = (0..11)
        .map(|i| TrackStreamRequest {
            event: Some(event(i + 1)),
        })
        .collect();
    let error = IngestServiceClient::new(server.channel())
        .track_stream(tokio_stream::iter(events))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn an_unreachable_broker_gives_unavailable_within_the_ack_timeout() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    config.kafka_brokers = vec![closed.to_string()];
    config.ingest_ack_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await?;
    let started = Instant::now();
    let error = IngestServiceClient::new(server.channel())
        .track(TrackRequest {
            event: Some(event(1)),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    // Bounded, not hanging (generous: this checks for a hang, not speed).
    assert!(started.elapsed() < Duration::from_secs(10));
    server.stop().await?;
    database.drop().await
}

#[tokio::test]
async fn track_fails_fast_while_the_broker_is_known_to_be_down_and_recovers() -> anyhow::Result<()>
{
    let mut broker = PrivateBroker::start().await?;
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database);
    config.kafka_brokers = vec![broker.address()];
    config.ingest_ack_timeout = Duration::from_secs(5);
    let server = TestServer::start(config).await?;
    let mut client = IngestServiceClient::new(server.channel());
    let track = || TrackRequest {
        event: Some(event(7)),
    };
    client.track(track()).await?;

    broker.kill().await?;
    // The first call after the outage learns of it (within the ack timeout).
    let error = client.track(track()).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    // Later calls know: UNAVAILABLE long before the ack timeout, so a client
    // with a 5 s deadline sees UNAVAILABLE rather than DEADLINE_EXCEEDED.
    for _ in 0..5 {
        let started = Instant::now();
        let error = client.track(track()).await.unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{error:?}");
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "waited {:?} for a broker known to be down",
            started.elapsed()
        );
    }

    broker.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.track(track()).await {
            Ok(_) => break,
            Err(error) if error.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => anyhow::bail!("Track did not recover: {error:?}"),
        }
    }
    server.stop().await?;
    database.drop().await
}

/// One gRPC message framed for the wire: a flag byte, the length, the bytes.
fn grpc_frame(message: &impl Message) -> bytes::Bytes {
    let encoded = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + encoded.len());
    frame.push(0);
    frame.extend_from_slice(
        &u32::try_from(encoded.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&encoded);
    frame.into()
}

/// Sends `messages` on `path` over `client`, each message in a DATA frame of
/// its own; returns the grpc-status and the reply's bytes.
async fn call_frame_by_frame(
    client: h2::client::SendRequest<bytes::Bytes>,
    addr: std::net::SocketAddr,
    path: &str,
    messages: Vec<bytes::Bytes>,
) -> anyhow::Result<(String, Vec<u8>)> {
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let mut client = client.ready().await?;
    let (response, mut send) = client.send_request(request, false)?;
    let count = messages.len();
    for (index, message) in messages.into_iter().enumerate() {
        send.send_data(message, index + 1 == count)?;
    }
    let mut body = response.await?.into_body();
    let mut reply = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        reply.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .and_then(|s| s.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    Ok((status, reply))
}

#[tokio::test]
async fn a_stream_of_many_small_frames_is_acknowledged_and_keeps_the_connection()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let server = TestServer::start(test_config(&database)).await?;
    IngestServiceClient::new(server.channel())
        .track(TrackRequest {
            event: Some(event(1)),
        })
        .await?;

    let tcp = tokio::net::TcpStream::connect(server.addr).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(connection);
    // As grpc-python sends a stream: a DATA frame per message, as fast as
    // the window allows, whatever the handler's pace.
    const EVENTS: i64 = 9_000;
    let messages = (0..EVENTS)
        .map(|user| {
            grpc_frame(&TrackStreamRequest {
                event: Some(event(user + 1)),
            })
        })
        .collect();
    let path = "/rtap.v1.IngestService/TrackStream";
    let (status, reply) = call_frame_by_frame(client.clone(), server.addr, path, messages).await?;
    assert_eq!(status, "0", "TrackStream ended with grpc-status {status}");
    let reply = rtap::v1::TrackStreamResponse::decode(reply.get(5..).unwrap_or_default())?;
    assert_eq!(reply.accepted_count, EVENTS);

    // The connection survived: another call on it is answered.
    let health = "/grpc.health.v1.Health/Check";
    let check = grpc_frame(&tonic_health::pb::HealthCheckRequest::default());
    let (status, _) = call_frame_by_frame(client, server.addr, health, vec![check]).await?;
    assert_eq!(status, "0");
    driver.abort();
    server.stop().await?;
    database.drop().await
}
