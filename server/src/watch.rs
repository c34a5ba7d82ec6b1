//! `rtap-server watch`: a live one-line summary of the last five minutes,
//! from the server at `--listen-addr`, refreshed whenever its subscription
//! reports a change (or a heartbeat) and at most once a second; a stream
//! cut by the network is resumed with its last token. What
//! `scripts/run.sh` shows a newcomer; a client of the public API like any
//! other.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rtap::v1::{
    GetEventCountsRequest, GetFunnelRequest, GetPipelineStatusRequest, GetTopProductsRequest,
    GetUniqueUsersRequest, ProductRanking, SubscribeRequest, TimeWindow,
    analytics_service_client::AnalyticsServiceClient, subscribe_request, time_window::Window,
};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    error::Error,
    infra::client::{ServerChannel, server_channel},
    retry::{Backoff, RECONNECT_MAX},
};

/// The window summarised.
const WINDOW: Duration = Duration::from_secs(5 * 60);
/// Least time between two lines.
const REFRESH: Duration = Duration::from_secs(1);

fn window() -> Option<TimeWindow> {
    Some(TimeWindow {
        window: Some(Window::Trailing(prost_types::Duration {
            seconds: i64::try_from(WINDOW.as_secs()).unwrap_or(300),
            nanos: 0,
        })),
    })
}

/// Prints summary lines to standard output until `shutdown`. A stream cut
/// once it ran is resumed with its last token, after a backoff, for as long
/// as it takes.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), Error> {
    let (channel, addr) = server_channel(config, None).await?;
    let mut client = AnalyticsServiceClient::new(channel);
    let mut token = Vec::new();
    let mut updates = subscribe(&mut client, &token)
        .await
        .map_err(|status| unavailable(addr, &status))?;
    let mut backoff = Backoff::new(Duration::from_millis(200), RECONNECT_MAX);
    let mut last_line = tokio::time::Instant::now() - REFRESH;
    loop {
        let update = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            update = updates.next() => update,
        };
        let mut reason = match update {
            Some(Ok(message)) => {
                backoff.reset();
                token = message.resume_token;
                if last_line.elapsed() >= REFRESH {
                    last_line = tokio::time::Instant::now();
                    match summary(&mut client).await {
                        Ok(line) => println!("{line}"),
                        Err(status) => eprintln!("watch: {}", status.message()),
                    }
                }
                continue;
            }
            Some(Err(status)) => status.message().to_owned(),
            None => "the stream ended".to_owned(),
        };
        updates = loop {
            let delay = backoff.next_delay();
            eprintln!("watch: {addr}: {reason}; resuming in {delay:?}");
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            match subscribe(&mut client, &token).await {
                Ok(updates) => break updates,
                // A token the server refuses: start afresh.
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    token.clear();
                    reason = status.message().to_owned();
                }
                Err(status) => reason = status.message().to_owned(),
            }
        };
    }
}

/// The summarised subscription, resumed from `token` (empty: a new one).
async fn subscribe(
    client: &mut AnalyticsServiceClient<ServerChannel>,
    token: &[u8],
) -> Result<tonic::Streaming<rtap::v1::SubscribeResponse>, tonic::Status> {
    let request = SubscribeRequest {
        query: Some(subscribe_request::Query::EventCounts(
            GetEventCountsRequest {
                window: window(),
                ..Default::default()
            },
        )),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        resume_token: token.to_vec(),
    };
    Ok(client.subscribe(request).await?.into_inner())
}

fn unavailable(addr: std::net::SocketAddr, status: &tonic::Status) -> Error {
    Error::Unavailable {
        dependency: "rtap-server",
        reason: format!("{addr}: {}", status.message()),
    }
}

async fn summary(
    client: &mut AnalyticsServiceClient<ServerChannel>,
) -> Result<String, tonic::Status> {
    let counts = client
        .get_event_counts(GetEventCountsRequest {
            window: window(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let events: i64 = counts.buckets.iter().map(|b| b.total).sum();
    let users = client
        .get_unique_users(GetUniqueUsersRequest {
            window: window(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .unique_users;
    let funnel = client
        .get_funnel(GetFunnelRequest {
            window: window(),
            sources: Vec::new(),
        })
        .await?
        .into_inner()
        .total
        .unwrap_or_default();
    let top = client
        .get_top_products(GetTopProductsRequest {
            window: window(),
            ranking: ProductRanking::Views as i32,
            limit: 3,
            include_product_names: true,
        })
        .await?
        .into_inner();
    let status = client
        .get_pipeline_status(GetPipelineStatusRequest {})
        .await?
        .into_inner();
    let total = status.total.unwrap_or_default();
    let top: Vec<String> = top
        .products
        .iter()
        .map(|p| {
            if p.product_name.is_empty() {
                format!("#{} ({})", p.product_id, p.value)
            } else {
                format!("{} ({})", p.product_name, p.value)
            }
        })
        .collect();
    let now = Utc::now().format("%H:%M:%S");
    let watermark = status
        .partitions
        .iter()
        .filter_map(|p| p.last_commit_time)
        .map(|t| t.seconds)
        .max()
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .map_or_else(|| "-".to_owned(), |t| t.format("%H:%M:%S").to_string());
    Ok(format!(
        "{now}  last 5 min: {events} events, {users} users, {} sessions, {:.1}% converted; most viewed: {} | ingest: {} applied, lag {}, last commit {watermark}",
        funnel.sessions,
        funnel.conversion_rate * 100.0,
        if top.is_empty() {
            "-".to_owned()
        } else {
            top.join(" ")
        },
        total.events_applied,
        total.lag,
    ))
}
