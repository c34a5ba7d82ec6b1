//! Part 5 of the subscribe bench: resuming. A thousand subscribers of one
//! query each hold a resume token; their streams are dropped, commits go on,
//! and all resume at once (fifty at a time). Printed: the time from a
//! resumed Subscribe call to its first replayed delta (p50/p99), next to
//! the time from a fresh Subscribe call to its snapshot, in the same run;
//! and how many resumes were resyncs instead (none expected).

use std::{sync::Arc, time::Instant};

use chrono::Utc;
use futures_util::{StreamExt as _, stream};
use rtap::v1::{
    SubscribeRequest, SubscribeResponse, analytics_service_client::AnalyticsServiceClient,
    subscribe_response,
};
use tonic::transport::Channel;

use super::{common::pipeline::EventWriter, counts_query, percentile};

/// Subscribers.
const CLIENTS: usize = 1_000;
/// Subscribe calls in flight at once.
const AT_ONCE: usize = 50;

/// Runs the part against the server behind `channel`.
pub(crate) async fn resume(channel: &Channel, writer: &Arc<EventWriter>) -> anyhow::Result<()> {
    let request = counts_query(60);
    // Fresh subscriptions: time to the snapshot, and each one's token.
    let opened: Vec<(f64, SubscribeResponse)> = stream::iter(0..CLIENTS)
        .map(|_| first_message(channel, request.clone()))
        .buffer_unordered(AT_ONCE)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let mut fresh: Vec<f64> = opened.iter().map(|(ms, _)| *ms).collect();
    // Commits the dropped streams miss.
    for user in 1..=5 {
        writer.send(&[super::event(user, Utc::now())]).await?;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let resumed: Vec<(f64, bool)> = stream::iter(opened)
        .map(|(_, first)| {
            let mut request = request.clone();
            request.resume_token = first.resume_token;
            async move {
                let (ms, message) = first_message(channel, request).await?;
                let resync = matches!(
                    message.update,
                    Some(subscribe_response::Update::Snapshot(_))
                );
                Ok::<_, anyhow::Error>((ms, resync))
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let resyncs = resumed.iter().filter(|(_, resync)| *resync).count();
    let mut resumed: Vec<f64> = resumed.into_iter().map(|(ms, _)| ms).collect();
    fresh.sort_by(f64::total_cmp);
    resumed.sort_by(f64::total_cmp);
    println!(
        "resume, {CLIENTS} subscribers of one query, {AT_ONCE} calls at once: \
         reconnect to first replayed message p50 {:.2} ms, p99 {:.2} ms; \
         a fresh Subscribe to its snapshot p50 {:.2} ms, p99 {:.2} ms; {resyncs} resyncs",
        percentile(&resumed, 0.50),
        percentile(&resumed, 0.99),
        percentile(&fresh, 0.50),
        percentile(&fresh, 0.99),
    );
    anyhow::ensure!(resyncs == 0, "{resyncs} resumes were resyncs");
    Ok(())
}

/// Milliseconds from the call to the first message, and that message.
async fn first_message(
    channel: &Channel,
    request: SubscribeRequest,
) -> anyhow::Result<(f64, SubscribeResponse)> {
    let started = Instant::now();
    let mut stream = AnalyticsServiceClient::new(channel.clone())
        .subscribe(request)
        .await?
        .into_inner();
    let first = stream
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("no message"))??;
    Ok((started.elapsed().as_secs_f64() * 1000.0, first))
}
