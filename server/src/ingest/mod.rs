//! The ingest side: the Kafka → Redis pipeline ([`consumer`], which folds
//! each fetched batch with [`aggregate`] and commits it through
//! [`crate::store`]), and the `IngestService` RPCs for sources that cannot
//! produce to Kafka directly. Both validate with [`validate`], the one set of
//! rules for events.

pub mod consumer;
pub mod dead_letter;
pub mod dedupe;
pub(crate) mod partition;
pub(crate) mod producer;
mod publisher;
pub mod rebuild;
mod status_log;
pub mod validate;

use std::sync::Arc;

use chrono::Utc;
use rtap::v1::{
    FieldViolation as ProtoFieldViolation, InteractionEvent, RejectedEvent, TrackRequest,
    TrackResponse, TrackStreamRequest, TrackStreamResponse,
    ingest_service_server::{IngestService, IngestServiceServer},
};
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth::{Caller, Limits},
    config::Config,
    error::{Error, FieldViolation},
    infra::kafka::Brokers,
};
use producer::EventProducer;
use validate::TimeBounds;

/// The gRPC server type of the ingest service.
pub(crate) type IngestServer = IngestServiceServer<IngestApi>;

/// Produce calls of one TrackStream in flight at once; the stream is read no
/// faster than the broker acknowledges.
const MAX_IN_FLIGHT_PER_STREAM: usize = 1024;

/// Implements `rtap.v1.IngestService`.
#[derive(Clone)]
pub(crate) struct IngestApi {
    producer: Arc<EventProducer>,
    /// The events limit holds a `TrackStream` back to its caller's rate.
    limits: Arc<Limits>,
    bounds: TimeBounds,
    max_stream_events: u64,
}

impl IngestApi {
    /// The service for `config`; connects to Kafka on first use.
    pub(crate) fn new(config: &Config, brokers: Brokers, limits: Arc<Limits>) -> Self {
        Self {
            producer: Arc::new(EventProducer::new(config, brokers)),
            limits,
            bounds: TimeBounds::from_config(config),
            max_stream_events: u64::from(config.max_stream_events),
        }
    }

    /// The service, ready to add to a tonic router.
    pub(crate) fn into_server(self) -> IngestServer {
        IngestServiceServer::new(self)
    }

    /// Fills in a missing `event_id` and validates; the violations name
    /// fields under `event`.
    fn accept(
        &self,
        event: Option<InteractionEvent>,
    ) -> Result<InteractionEvent, Vec<FieldViolation>> {
        let mut event = event.ok_or_else(|| vec![FieldViolation::new("event", "is required")])?;
        if event.event_id.is_empty() {
            event.event_id = uuid::Uuid::new_v4().to_string();
        }
        validate::validate(&event, "event", Utc::now(), self.bounds)
            .map_err(|rejection| rejection.violations)?;
        Ok(event)
    }

    async fn track_stream_inner(
        &self,
        caller: &Caller,
        mut stream: Streaming<TrackStreamRequest>,
    ) -> Result<TrackStreamResponse, Error> {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_STREAM));
        let mut produced = JoinSet::new();
        let mut rejected = Vec::new();
        let mut index: u64 = 0;
        while let Some(message) = stream.message().await.map_err(|status| {
            // tonic's decoder says OUT_OF_RANGE of a message over the limit.
            if status.code() == tonic::Code::OutOfRange {
                Error::ResourceExhausted(format!(
                    "a message of the stream is over --max-message-bytes: {}",
                    status.message()
                ))
            } else {
                Error::InvalidArgument(vec![FieldViolation::new(
                    "stream",
                    format!("cannot read the request stream: {}", status.message()),
                )])
            }
        })? {
            if let Some(events) = &self.limits.events {
                events.wait(&caller.id, 1).await;
            }
            if index >= self.max_stream_events {
                return Err(Error::ResourceExhausted(format!(
                    "a TrackStream call takes at most {} events; events before the limit may \
                     have been stored, and resending them with the same event_id counts them once",
                    self.max_stream_events
                )));
            }
            match self.accept(message.event) {
                Ok(event) => {
                    let permit = slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Error::Internal("in-flight limiter closed".into()))?;
                    let producer = self.producer.clone();
                    produced.spawn(async move {
                        let result = producer.produce(&event).await;
                        drop(permit);
                        (index, event.event_id, result)
                    });
                }
                Err(violations) => rejected.push(RejectedEvent {
                    index: i64::try_from(index).unwrap_or(i64::MAX),
                    violations: violations
                        .into_iter()
                        .map(|v| ProtoFieldViolation {
                            field: v.field,
                            description: v.description,
                        })
                        .collect(),
                }),
            }
            index += 1;
        }
        let mut accepted = Vec::new();
        let mut failure = None;
        while let Some(joined) = produced.join_next().await {
            let (index, event_id, result) =
                joined.map_err(|e| Error::Internal(format!("produce task failed: {e}")))?;
            match result {
                Ok(()) => accepted.push((index, event_id)),
                Err(error) => failure = Some(error),
            }
        }
        // Never acknowledge a stream part of which was not stored: the client
        // resends it, and events with their own event_id are counted once.
        if let Some(error) = failure {
            return Err(error);
        }
        accepted.sort_unstable();
        Ok(TrackStreamResponse {
            accepted_count: i64::try_from(accepted.len()).unwrap_or(i64::MAX),
            rejected,
            accepted_event_ids: accepted.into_iter().map(|(_, id)| id).collect(),
        })
    }
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn track(
        &self,
        request: Request<TrackRequest>,
    ) -> Result<Response<TrackResponse>, Status> {
        let event = self
            .accept(request.into_inner().event)
            .map_err(Error::InvalidArgument)?;
        self.producer.produce(&event).await?;
        Ok(Response::new(TrackResponse {
            event_id: event.event_id,
        }))
    }

    async fn track_stream(
        &self,
        request: Request<Streaming<TrackStreamRequest>>,
    ) -> Result<Response<TrackStreamResponse>, Status> {
        let caller = Caller::of(&request);
        Ok(Response::new(
            self.track_stream_inner(&caller, request.into_inner())
                .await?,
        ))
    }
}
