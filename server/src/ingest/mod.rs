//! The ingest side: the `IngestService` RPCs for sources that cannot produce
//! to Kafka directly (and, later, the Kafka → Redis pipeline).
//!
//! Until the shared event validator and producer land, the RPCs answer
//! UNIMPLEMENTED rather than acknowledge events that were not stored.

pub mod validate;

use rtap::v1::{
    TrackRequest, TrackResponse, TrackStreamRequest, TrackStreamResponse,
    ingest_service_server::{IngestService, IngestServiceServer},
};
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;

/// The gRPC server type of the ingest service.
pub type IngestServer = IngestServiceServer<IngestApi>;

/// Implements `rtap.v1.IngestService`.
#[derive(Debug, Clone, Default)]
pub struct IngestApi;

impl IngestApi {
    /// The service, ready to add to a tonic router.
    pub fn into_server(self) -> IngestServer {
        IngestServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn track(
        &self,
        _request: Request<TrackRequest>,
    ) -> Result<Response<TrackResponse>, Status> {
        Err(Error::Unimplemented("rtap.v1.IngestService/Track").into())
    }

    async fn track_stream(
        &self,
        _request: Request<Streaming<TrackStreamRequest>>,
    ) -> Result<Response<TrackStreamResponse>, Status> {
        Err(Error::Unimplemented("rtap.v1.IngestService/TrackStream").into())
    }
}
