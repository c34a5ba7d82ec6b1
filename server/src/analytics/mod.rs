//! The analytics service: metric queries and live subscriptions over the
//! aggregates the ingest pipeline keeps in Redis.
//!
//! - [`metric`]: what a metric is (the [`metric::Metric`] trait), and a
//!   validated [`metric::Query`] of one;
//! - [`metrics`]: the metric kinds, one module each: where to add one;
//! - [`window`]: time windows resolved to buckets;
//! - [`subscribe`]: subscriptions, fanned out from the commits ingest
//!   publishes;
//! - [`feed`]: one subscribed query kept current, shared by its subscribers;
//! - [`store_client`]: this service's access to the metric store.

pub(crate) mod feed;
pub(crate) mod metric;
pub(crate) mod metrics;
pub(crate) mod resume;
pub(crate) mod store_client;
pub(crate) mod subscribe;
pub mod window;

use std::{collections::BTreeMap, pin::Pin, sync::Arc, sync::atomic::Ordering, time::Duration};

use chrono::Utc;
use futures_util::StreamExt as _;
use rtap::v1::{
    DeadLetterCount, Delta, GetEngagementRequest, GetEngagementResponse, GetEventCountsRequest,
    GetEventCountsResponse, GetFunnelRequest, GetFunnelResponse, GetPipelineStatusRequest,
    GetPipelineStatusResponse, GetTopProductsRequest, GetTopProductsResponse,
    GetUniqueUsersRequest, GetUniqueUsersResponse, PartitionStatus, Snapshot, SubscribeRequest,
    SubscribeResponse,
    analytics_service_server::{AnalyticsService, AnalyticsServiceServer},
    delta, snapshot, subscribe_request, subscribe_response,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use rskafka::client::{error::Error as KafkaError, partition::UnknownTopicHandling};

use crate::{
    auth::{Caller, KeyCache, Principal, StreamSlots},
    catalog::ProductNames,
    error::{Error, FieldViolation},
    infra::{
        kafka::{self, Brokers},
        reconnect::Reconnecting,
        time::timestamp_from_millis,
    },
    store::status::{PartitionVitals, Totals},
};
use metric::{Metric, Query};
use metrics::{Engagement, EventCounts, Funnel, TopProducts, UniqueUsers};
use subscribe::Hub;

/// The gRPC server type of the analytics service.
pub(crate) type AnalyticsServer = AnalyticsServiceServer<AnalyticsApi>;

/// Heartbeat interval when the subscriber does not ask for one.
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Shortest heartbeat interval a subscriber may ask for.
pub(crate) const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest heartbeat interval a subscriber may ask for.
pub(crate) const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// Implements `rtap.v1.AnalyticsService`.
#[derive(Clone)]
pub(crate) struct AnalyticsApi {
    hub: Arc<Hub>,
    topic: String,
    timeout: Duration,
    /// Kept between status calls (`rtap-server watch` asks every second);
    /// dropped after a failure so the next call reconnects.
    kafka: Arc<Reconnecting<Arc<rskafka::client::Client>, KafkaError>>,
    /// Open subscriptions, per caller and in all.
    subscriptions: Arc<StreamSlots>,
    /// The API keys, to end a subscription whose key is revoked; `None`
    /// without authentication.
    keys: Option<Arc<KeyCache>>,
    /// For rankings asked with `include_product_names`.
    names: Arc<ProductNames>,
}

impl AnalyticsApi {
    /// The service over `hub`'s store, reporting on the configured topic.
    pub(crate) fn new(
        hub: Arc<Hub>,
        config: &crate::config::Config,
        brokers: Brokers,
        (subscriptions, keys): (Arc<StreamSlots>, Option<Arc<KeyCache>>),
        names: Arc<ProductNames>,
    ) -> Self {
        Self {
            hub,
            subscriptions,
            keys,
            names,
            topic: config.events_topic.clone(),
            timeout: config.dependency_timeout,
            kafka: Arc::new(Reconnecting::new({
                let timeout = config.dependency_timeout;
                move || {
                    let brokers = brokers.clone();
                    async move { kafka::client(&brokers, timeout).await.map(Arc::new) }
                }
            })),
        }
    }

    /// Every partition's high watermark; empty if Kafka cannot be asked
    /// within the dependency timeout.
    async fn high_watermarks(&self, partitions: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        let read = async {
            let client = self.kafka.get().await?;
            let mut marks = BTreeMap::new();
            for (partition, offset) in partitions {
                let source = client
                    .partition_client(&self.topic, *partition, UnknownTopicHandling::Error)
                    .await?;
                marks.insert(*partition, kafka::high_watermark(&source, *offset).await?);
            }
            Ok::<_, KafkaError>(marks)
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(marks)) => return marks,
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "no high watermarks for the pipeline status");
            }
            Err(_) => {}
        }
        self.kafka.drop_connection().await;
        BTreeMap::new()
    }

    /// The service, ready to add to a tonic router.
    pub(crate) fn into_server(self) -> AnalyticsServer {
        AnalyticsServiceServer::new(self)
    }

    /// Answers a unary query of metric `M`.
    async fn unary<M: Metric>(
        &self,
        request: Request<M::Request>,
    ) -> Result<Response<M::Response>, Status> {
        let query = Query::<M>::new(request.into_inner(), "")?;
        let store = self.hub.store();
        let window = query.window(Utc::now(), &store.retention, "")?;
        Ok(Response::new(store.run(&query, window).await?))
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AnalyticsService for AnalyticsApi {
    type SubscribeStream = SubscribeStream;

    async fn get_event_counts(
        &self,
        request: Request<GetEventCountsRequest>,
    ) -> Result<Response<GetEventCountsResponse>, Status> {
        self.unary::<EventCounts>(request).await
    }

    async fn get_unique_users(
        &self,
        request: Request<GetUniqueUsersRequest>,
    ) -> Result<Response<GetUniqueUsersResponse>, Status> {
        self.unary::<UniqueUsers>(request).await
    }

    async fn get_engagement(
        &self,
        request: Request<GetEngagementRequest>,
    ) -> Result<Response<GetEngagementResponse>, Status> {
        self.unary::<Engagement>(request).await
    }

    async fn get_top_products(
        &self,
        request: Request<GetTopProductsRequest>,
    ) -> Result<Response<GetTopProductsResponse>, Status> {
        let named = request.get_ref().include_product_names;
        let mut response = self.unary::<TopProducts>(request).await?;
        if named {
            self.names.fill(&mut response.get_mut().products).await;
        }
        Ok(response)
    }

    async fn get_funnel(
        &self,
        request: Request<GetFunnelRequest>,
    ) -> Result<Response<GetFunnelResponse>, Status> {
        self.unary::<Funnel>(request).await
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let slot = self.subscriptions.claim(&Caller::of(&request).id)?;
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        let Some(requested) = request.query else {
            return Err(Error::InvalidArgument(vec![FieldViolation::new(
                "query",
                "is required: one of event_counts, unique_users, engagement, top_products, funnel",
            )])
            .into());
        };
        let heartbeat = match request.heartbeat_interval {
            None => DEFAULT_HEARTBEAT,
            Some(d) if d.seconds == 0 && d.nanos == 0 => DEFAULT_HEARTBEAT,
            Some(d) => {
                crate::infra::time::check_duration(&d).map_err(|error| {
                    Error::InvalidArgument(vec![FieldViolation::new("heartbeat_interval", error)])
                })?;
                let interval = u64::try_from(d.seconds)
                    .ok()
                    .zip(u32::try_from(d.nanos).ok())
                    .map(|(s, n)| Duration::new(s, n))
                    .filter(|i| (MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(i));
                interval.ok_or_else(|| {
                    Error::InvalidArgument(vec![FieldViolation::new(
                        "heartbeat_interval",
                        format!(
                            "must be 0 (default {DEFAULT_HEARTBEAT:?}) or between {MIN_HEARTBEAT:?} and {MAX_HEARTBEAT:?}"
                        ),
                    )])
                })?
            }
        };
        let named = matches!(&requested, subscribe_request::Query::TopProducts(top) if top.include_product_names);
        let stream = metrics::open(&self.hub, requested, heartbeat, &request.resume_token).await?;
        let stream: SubscribeStream = if named {
            let names = self.names.clone();
            Box::pin(stream.then(move |message| {
                let names = names.clone();
                async move { name_products(&names, message?).await }
            }))
        } else {
            Box::pin(stream)
        };
        // The slot is the stream's: released when the subscriber goes.
        let stream = stream.map(move |message| {
            let _open = &slot;
            message
        });
        Ok(Response::new(match (&self.keys, principal) {
            (Some(keys), Some(principal)) => Box::pin(keys.end_on_revocation(&principal, stream)),
            _ => Box::pin(stream),
        }))
    }

    async fn get_pipeline_status(
        &self,
        _request: Request<GetPipelineStatusRequest>,
    ) -> Result<Response<GetPipelineStatusResponse>, Status> {
        let states = self.hub.store().partition_states().await?;
        let offsets: Vec<(i32, i64)> = states
            .iter()
            .map(|(p, s)| (*p, s.offset.unwrap_or(0)))
            .collect();
        let marks = self.high_watermarks(&offsets).await;
        let vitals: Vec<PartitionVitals> = states
            .into_iter()
            .map(|(partition, state)| PartitionVitals {
                partition,
                state,
                high_watermark: marks.get(&partition).copied(),
            })
            .collect();
        let totals = Totals::of(&vitals);
        let partitions = vitals.into_iter().map(partition_status).collect();
        let total = PartitionStatus {
            partition: -1,
            events_applied: totals.applied,
            duplicates_skipped: totals.duplicates,
            late_events: totals.late,
            lag: totals.lag,
            dead_lettered: dead_counts(totals.dead_lettered),
            ..PartitionStatus::default()
        };
        let gauges = self.hub.gauges();
        Ok(Response::new(GetPipelineStatusResponse {
            topic: self.topic.clone(),
            partitions,
            total: Some(total),
            active_subscriptions: gauges.streams.load(Ordering::Relaxed),
            active_feeds: gauges.feeds.load(Ordering::Relaxed),
            feed_activity: Some(self.hub.feed_activity()),
        }))
    }
}

/// `message` with its products' names filled, for a top-products stream
/// that asked for them. The feed is shared with subscribers that did not,
/// so names are added here, per stream, from the cache.
async fn name_products(
    names: &ProductNames,
    mut message: SubscribeResponse,
) -> Result<SubscribeResponse, Status> {
    match &mut message.update {
        Some(subscribe_response::Update::Snapshot(Snapshot {
            result: Some(snapshot::Result::TopProducts(top)),
            ..
        })) => names.fill(&mut top.products).await,
        Some(subscribe_response::Update::Delta(Delta {
            change: Some(delta::Change::TopProducts(change)),
        })) => names.fill(&mut change.upserted).await,
        _ => {}
    }
    Ok(message)
}

/// A partition's vital signs as the API reports them (-1 for an unknown
/// high watermark and lag).
fn partition_status(vitals: PartitionVitals) -> PartitionStatus {
    let (stored_offset, lag) = (vitals.stored_offset(), vitals.lag().unwrap_or(-1));
    let state = vitals.state;
    PartitionStatus {
        partition: vitals.partition,
        stored_offset,
        high_watermark: vitals.high_watermark.unwrap_or(-1),
        lag,
        events_applied: state.applied,
        duplicates_skipped: state.duplicates,
        dead_lettered: dead_counts(state.dead_lettered.into_iter().collect()),
        late_events: state.late,
        last_commit_time: state.last_commit_ms.map(timestamp_from_millis),
    }
}

fn dead_counts(counts: BTreeMap<String, i64>) -> Vec<DeadLetterCount> {
    counts
        .into_iter()
        .map(|(reason, count)| DeadLetterCount { reason, count })
        .collect()
}
