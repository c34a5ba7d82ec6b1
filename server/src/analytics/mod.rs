//! The analytics service: metric queries and live subscriptions over the
//! aggregates the ingest pipeline keeps in Redis.
//!
//! Every RPC is part of the published contract; until the metric store and
//! the pipeline land, each answers UNIMPLEMENTED rather than a fake result.

use std::pin::Pin;

use rtap::v1::{
    GetEngagementRequest, GetEngagementResponse, GetEventCountsRequest, GetEventCountsResponse,
    GetFunnelRequest, GetFunnelResponse, GetPipelineStatusRequest, GetPipelineStatusResponse,
    GetTopProductsRequest, GetTopProductsResponse, GetUniqueUsersRequest, GetUniqueUsersResponse,
    SubscribeRequest, SubscribeResponse,
    analytics_service_server::{AnalyticsService, AnalyticsServiceServer},
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;

/// The gRPC server type of the analytics service.
pub type AnalyticsServer = AnalyticsServiceServer<AnalyticsApi>;

/// Implements `rtap.v1.AnalyticsService`.
#[derive(Debug, Clone, Default)]
pub struct AnalyticsApi;

impl AnalyticsApi {
    /// The service, ready to add to a tonic router.
    pub fn into_server(self) -> AnalyticsServer {
        AnalyticsServiceServer::new(self)
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

fn not_yet<T>(rpc: &'static str) -> Result<Response<T>, Status> {
    Err(Error::Unimplemented(rpc).into())
}

#[tonic::async_trait]
impl AnalyticsService for AnalyticsApi {
    type SubscribeStream = SubscribeStream;

    async fn get_event_counts(
        &self,
        _request: Request<GetEventCountsRequest>,
    ) -> Result<Response<GetEventCountsResponse>, Status> {
        not_yet("rtap.v1.AnalyticsService/GetEventCounts")
    }

    async fn get_unique_users(
        &self,
        _request: Request<GetUniqueUsersRequest>,
    ) -> Result<Response<GetUniqueUsersResponse>, Status> {
        not_yet("rtap.v1.AnalyticsService/GetUniqueUsers")
    }

    async fn get_engagement(
        &self,
        _request: Request<GetEngagementRequest>,
    ) -> Result<Response<GetEngagementResponse>, Status> {
        not_yet("rtap.v1.AnalyticsService/GetEngagement")
    }

    async fn get_top_products(
        &self,
        _request: Request<GetTopProductsRequest>,
    ) -> Result<Response<GetTopProductsResponse>, Status> {
        not_yet("rtap.v1.AnalyticsService/GetTopProducts")
    }

    async fn get_funnel(
        &self,
        _request: Request<GetFunnelRequest>,
    ) -> Result<Response<GetFunnelResponse>, Status> {
        not_yet("rtap.v1.AnalyticsService/GetFunnel")
    }

    async fn subscribe(
        &self,
        _request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        not_yet("rtap.v1.AnalyticsService/Subscribe")
    }

    async fn get_pipeline_status(
        &self,
        _request: Request<GetPipelineStatusRequest>,
    ) -> Result<Response<GetPipelineStatusResponse>, Status> {
        not_yet("rtap.v1.AnalyticsService/GetPipelineStatus")
    }
}
