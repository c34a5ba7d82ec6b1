//! Part 4 of the subscribe bench: many distinct subscriptions. Each
//! subscription follows the trailing-day minute series of a product of its
//! own, so none share a feed, while events of those products arrive at
//! 5,000 a second. Per level of subscriptions: freshness (produce to the
//! delta counting the event, per product), GetUser p99 next to the same load
//! with no subscriptions, Redis CPU per second above that baseline (summed over every node), and
//! server RSS per feed. Levels rise until a target fails.
//!
//! `RTAP_BENCH_DISTINCT` sets the levels (default `1000,3000,10000`).
//! Targets: freshness p99 ≤ 100 ms, GetUser p99 ≤ 2 × the baseline.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use rtap::v1::{
    CreateUserRequest, GetEventCountsRequest, GetPipelineStatusRequest, GetUserRequest,
    Granularity, SubscribeRequest, User, analytics_service_client::AnalyticsServiceClient,
    subscribe_request, user_service_client::UserServiceClient,
};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::{
    common::pipeline::EventWriter, endpoint, event, percentile, rss_kib, total_of, trailing,
};

const RATE: usize = 5000;
const TICK: Duration = Duration::from_millis(10);
const SECONDS: u64 = 10;
const CONNECTIONS: usize = 10;

/// What one load phase measured.
struct Load {
    get_user_p99_ms: f64,
    redis_cpu_per_second: f64,
    /// Per product: when each produce batch counting it was sent, and the
    /// product's total after it.
    sent: HashMap<i64, Vec<(Instant, i64)>>,
}

/// Runs the part on the server at `addr` (process `pid`).
pub(crate) async fn distinct_feeds(
    addr: &str,
    channel: &Channel,
    writer: &Arc<EventWriter>,
    pid: u32,
    redis_nodes: &[redis::Client],
) -> anyhow::Result<()> {
    let levels: Vec<usize> = std::env::var("RTAP_BENCH_DISTINCT")
        .unwrap_or_else(|_| "1000,3000,10000".into())
        .split(',')
        .map(|level| level.trim().parse())
        .collect::<Result<_, _>>()?;
    let user = UserServiceClient::new(channel.clone())
        .create_user(CreateUserRequest {
            user: Some(User {
                first_name: "Bench".into(),
                last_name: format!("Reader {}", uuid::Uuid::new_v4().simple()),
                ..User::default()
            }),
        })
        .await?
        .into_inner()
        .user
        .map_or(0, |u| u.id);
    // Products of their own for every phase: a subscriber's total counts
    // only the phase it measures.
    let base = load(channel, writer, redis_nodes, user, (1_000_000, 1000)).await?;
    println!(
        "distinct feeds baseline, no subscriptions, {RATE} events/s: GetUser p99 {:.2} ms, Redis CPU {:.0} ms/s",
        base.get_user_p99_ms,
        base.redis_cpu_per_second * 1000.0,
    );
    let mut first = 1;
    for level in levels {
        let products = (first, i64::try_from(level)?);
        let holds = level_run(
            addr,
            channel,
            writer,
            pid,
            redis_nodes,
            user,
            products,
            &base,
        )
        .await?;
        if !holds {
            break;
        }
        first += products.1;
    }
    Ok(())
}

/// One level: `level` distinct subscriptions under load. Returns whether the
/// targets held.
#[allow(clippy::too_many_arguments)]
async fn level_run(
    addr: &str,
    channel: &Channel,
    writer: &Arc<EventWriter>,
    pid: u32,
    redis_nodes: &[redis::Client],
    user: i64,
    (first, level): (i64, i64),
    base: &Load,
) -> anyhow::Result<bool> {
    let before = rss_kib(pid)?;
    let opened = Instant::now();
    let (readers, arrivals) = subscribe_all(addr, first, level).await?;
    let opening = opened.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let phase = load(channel, writer, redis_nodes, user, (first, level)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies = Vec::new();
    let mut missing = 0;
    for (product, sent) in &phase.sent {
        let Some(seen) = arrivals.get(product) else {
            continue;
        };
        let seen = seen.lock().await;
        for (at, cumulative) in sent {
            match seen.iter().find(|(_, total)| total >= cumulative) {
                Some((arrived, _)) => {
                    latencies.push(arrived.saturating_duration_since(*at).as_secs_f64() * 1000.0);
                }
                None => missing += 1,
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let p99 = percentile(&latencies, 0.99);
    let ratio = phase.get_user_p99_ms / base.get_user_p99_ms;
    let holds = p99 <= 100.0 && ratio <= 2.0 && missing == 0;
    let activity = AnalyticsServiceClient::new(channel.clone())
        .get_pipeline_status(GetPipelineStatusRequest {})
        .await?
        .into_inner()
        .feed_activity
        .unwrap_or_default();
    println!(
        "distinct feeds {level}: opened in {:.1} s; freshness p50 {:.1} ms, p99 {p99:.1} ms ({} measured, {missing} never seen); \
         GetUser p99 {:.2} ms = {ratio:.2} x baseline; Redis CPU {:.0} ms/s above baseline; \
         server RSS {before} KiB -> {after} KiB = {:.0} KiB per feed; {} deltas applied in memory, {} partial and {} full refreshes, {} deltas skipped; \
         targets (p99 <= 100 ms, GetUser <= 2 x) {}",
        opening.as_secs_f64(),
        percentile(&latencies, 0.5),
        latencies.len(),
        phase.get_user_p99_ms,
        (phase.redis_cpu_per_second - base.redis_cpu_per_second) * 1000.0,
        after.saturating_sub(before) as f64 / level as f64,
        activity.applied_deltas,
        activity.partial_refreshes,
        activity.full_refreshes,
        activity.skipped_deltas,
        if holds { "hold" } else { "fail" },
    );
    for reader in readers {
        reader.abort();
    }
    // Let the feeds notice they have no subscriber left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(holds)
}

/// Per product, the totals its subscriber saw and when.
type Arrivals = HashMap<i64, Arc<Mutex<Vec<(Instant, i64)>>>>;

/// Opens a trailing-day minute series of `level` products from `first`,
/// each read by a task of its own; returns once every snapshot came.
async fn subscribe_all(
    addr: &str,
    first: i64,
    level: i64,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<()>>, Arrivals)> {
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(
            endpoint(addr)?
                .initial_connection_window_size(Some(16 << 20))
                .initial_stream_window_size(Some(1 << 20))
                .connect()
                .await?,
        );
    }
    let (ready, mut readied) = mpsc::channel(usize::try_from(level)?.max(1));
    let mut readers = Vec::new();
    let mut arrivals = Arrivals::new();
    for (index, product) in (first..first + level).enumerate() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        arrivals.insert(product, seen.clone());
        let mut client = AnalyticsServiceClient::new(channels[index % CONNECTIONS].clone());
        let ready = ready.clone();
        readers.push(tokio::spawn(async move {
            let request = SubscribeRequest {
                query: Some(subscribe_request::Query::EventCounts(
                    GetEventCountsRequest {
                        window: Some(trailing(24 * 3600)),
                        granularity: Granularity::Minute as i32,
                        product_id: product,
                        ..Default::default()
                    },
                )),
                heartbeat_interval: None,
                resume_token: Vec::new(),
            };
            let mut stream = match client.subscribe(request).await {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    let _ = ready.send(Err(status)).await;
                    return;
                }
            };
            let mut total = 0;
            let mut first = true;
            while let Some(Ok(message)) = stream.next().await {
                let (snapshot, change) = total_of(&message);
                total = if snapshot { change } else { total + change };
                seen.lock().await.push((Instant::now(), total));
                if std::mem::take(&mut first) {
                    let _ = ready.send(Ok(())).await;
                }
            }
        }));
    }
    drop(ready);
    for _ in 0..level {
        tokio::time::timeout(Duration::from_secs(120), readied.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no snapshot within 120 s"))?
            .ok_or_else(|| anyhow::anyhow!("a subscription ended before its snapshot"))??;
    }
    Ok((readers, arrivals))
}

/// Produces views of `count` products from `first` at [`RATE`] for
/// [`SECONDS`] while calling GetUser every 10 ms.
async fn load(
    channel: &Channel,
    writer: &Arc<EventWriter>,
    redis_nodes: &[redis::Client],
    user: i64,
    (first, count): (i64, i64),
) -> anyhow::Result<Load> {
    let stop = tokio_util::sync::CancellationToken::new();
    let mut users = UserServiceClient::new(channel.clone());
    let caller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            while !stop.is_cancelled() {
                ticker.tick().await;
                let started = Instant::now();
                if users.get_user(GetUserRequest { id: user }).await.is_ok() {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        })
    };
    let cpu_before = super::common::redis_cpu_seconds_on(redis_nodes).await?;
    let per_tick = RATE * TICK.as_millis() as usize / 1000;
    let mut sent: HashMap<i64, Vec<(Instant, i64)>> = HashMap::new();
    let mut totals: HashMap<i64, i64> = HashMap::new();
    let mut next_product = 0;
    let mut ticker = tokio::time::interval(TICK);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(SECONDS) {
        ticker.tick().await;
        let now = Utc::now();
        let events: Vec<_> = (0..per_tick)
            .map(|i| {
                let mut view = event(i64::try_from(i).unwrap_or(0) + 1, now);
                view.product_id = first + next_product % count;
                next_product += 1;
                view
            })
            .collect();
        let at = Instant::now();
        writer.send(&events).await?;
        for view in &events {
            *totals.entry(view.product_id).or_default() += 1;
        }
        for view in &events {
            let total = totals[&view.product_id];
            let list = sent.entry(view.product_id).or_default();
            if list.last().is_none_or(|(_, last)| *last != total) {
                list.push((at, total));
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = super::common::redis_cpu_seconds_on(redis_nodes).await? - cpu_before;
    stop.cancel();
    let mut latencies = caller.await?;
    latencies.sort_by(f64::total_cmp);
    Ok(Load {
        get_user_p99_ms: percentile(&latencies, 0.99),
        redis_cpu_per_second: cpu / elapsed,
        sent,
    })
}
