//! `rtap-simulator` against a real Kafka-protocol broker: exact counts,
//! keyed partitioning, determinism, and surviving a broker restart.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::{collections::HashSet, path::Path, process::Stdio, time::Duration};

use common::{PrivateBroker, read_topic};
use prost::Message;
use rtap::v1::InteractionEvent;
use tokio::process::{Child, Command};

const START: &str = "2026-03-01T12:00:00Z";
const START_SECONDS: i64 = 1_772_366_400;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn unique_topic(name: &str) -> String {
    format!("rtap-test-sim-{name}-{}", uuid::Uuid::new_v4().simple())
}

fn simulator(brokers: &str, topic: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rtap-simulator"));
    command
        .args([
            "--kafka-brokers",
            brokers,
            "--topic",
            topic,
            "--progress",
            "none",
            "--metrics-addr",
            "off",
        ])
        .args(args)
        .env_remove("RTAP_SERVER_ADDR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn exit_ok(child: &mut Child, within: Duration) -> anyhow::Result<()> {
    let status = tokio::time::timeout(within, child.wait()).await??;
    anyhow::ensure!(status.success(), "rtap-simulator exited with {status}");
    Ok(())
}

#[tokio::test]
async fn count_produces_exactly_n_records_keyed_by_user_and_the_truth_agrees() -> anyhow::Result<()>
{
    let topic = unique_topic("count");
    let truth_dir = tempfile::tempdir()?;
    let truth_path = truth_dir.path().join("truth.json");
    let mut child = simulator(
        &brokers(),
        &topic,
        &[
            "--count",
            "5000",
            "--partitions",
            "3",
            "--seed",
            "9",
            "--start-time",
            START,
            "--duplicate-share",
            "0.02",
            "--malformed-share",
            "0.02",
            "--users",
            "20000",
            "--truth-file",
            path_str(&truth_path),
        ],
    )
    .spawn()?;
    exit_ok(&mut child, Duration::from_secs(60)).await?;

    let partitions = read_topic(&brokers(), &topic).await?;
    assert_eq!(partitions.len(), 3);
    let total: usize = partitions.values().map(Vec::len).sum();
    assert_eq!(total, 5000, "exactly --count records");

    let mut event_ids = HashSet::new();
    let mut valid = 0_u64;
    for (partition, records) in &partitions {
        for (key, value) in records {
            assert_eq!(
                rtap::kafka::partition_for_key(key, 3),
                *partition,
                "records are partitioned by their user key"
            );
            if let Ok(event) = InteractionEvent::decode(value.as_slice())
                && event.r#type != 0
                && !event.event_id.is_empty()
                && event.dwell_time.is_none_or(|d| d.seconds >= 0)
                && event
                    .occurred_at
                    .is_some_and(|t| t.seconds < START_SECONDS + 86_400)
            {
                assert_eq!(key, &event.user_id.to_string().into_bytes());
                if event_ids.insert(event.event_id) {
                    valid += 1;
                }
            }
        }
    }
    let truth: serde_json::Value = serde_json::from_slice(&std::fs::read(&truth_path)?)?;
    assert_eq!(truth["records"], 5000);
    assert_eq!(truth["events"], valid, "distinct valid events on the topic");
    let duplicates = truth["duplicates"].as_u64().unwrap_or_default();
    let malformed: u64 = truth["malformed"]
        .as_object()
        .map(|kinds| kinds.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or_default();
    assert_eq!(valid + duplicates + malformed, 5000);
    assert!(duplicates > 0 && malformed > 0);
    Ok(())
}

#[tokio::test]
async fn the_same_seed_and_start_time_produce_the_same_topic() -> anyhow::Result<()> {
    let args = [
        "--count",
        "2000",
        "--partitions",
        "2",
        "--seed",
        "77",
        "--start-time",
        START,
        "--malformed-share",
        "0.01",
        "--users",
        "20000",
    ];
    let mut topics = Vec::new();
    for run in ["a", "b"] {
        let topic = unique_topic(&format!("seed-{run}"));
        let mut child = simulator(&brokers(), &topic, &args).spawn()?;
        exit_ok(&mut child, Duration::from_secs(60)).await?;
        topics.push(read_topic(&brokers(), &topic).await?);
    }
    assert_eq!(topics[0], topics[1]);
    assert_eq!(topics[0].values().map(Vec::len).sum::<usize>(), 2000);
    Ok(())
}

#[tokio::test]
async fn production_resumes_after_a_broker_restart_without_losing_records() -> anyhow::Result<()> {
    let mut broker = PrivateBroker::start().await?;
    let topic = unique_topic("restart");
    let mut child = simulator(
        &broker.address(),
        &topic,
        &[
            "--count",
            "3000",
            "--rate",
            "400",
            "--partitions",
            "2",
            "--seed",
            "5",
            "--start-time",
            START,
        ],
    )
    .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.kill().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart().await?;
    exit_ok(&mut child, Duration::from_secs(120)).await?;

    let partitions = read_topic(&broker.address(), &topic).await?;
    let distinct: HashSet<&Vec<u8>> = partitions.values().flatten().map(|(_, v)| v).collect();
    // At least once: a batch whose acknowledgement was lost in the crash is
    // sent again, so records may repeat, but none may be missing.
    assert_eq!(distinct.len(), 3000, "every record arrived");
    broker.kill().await
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

#[tokio::test]
async fn a_broker_address_without_a_port_is_refused_at_start_up() -> anyhow::Result<()> {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        simulator("nohostport", &unique_topic("bad-broker"), &["--count", "1"])
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("rtap-simulator kept retrying a broker address with no port"))??;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`nohostport` is not a broker address of the form host:port"),
        "{stderr}"
    );
    Ok(())
}

/// The value after `flag` in `text`.
fn flag_value<'a>(text: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = text.split_whitespace();
    words.find(|word| *word == flag)?;
    words.next()
}

#[tokio::test]
async fn the_demo_of_scripts_run_sh_sustains_its_rate_without_warnings() -> anyhow::Result<()> {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run.sh"))?;
    let invocation = script
        .lines()
        .find(|line| line.contains("--seed-users"))
        .ok_or_else(|| anyhow::anyhow!("run.sh starts no simulator with --seed-users"))?;
    let rate = script
        .lines()
        .find_map(|line| line.strip_prefix("RATE=${RTAP_SIM_RATE:-"))
        .and_then(|rest| rest.strip_suffix('}'))
        .ok_or_else(|| anyhow::anyhow!("run.sh has no default RATE"))?;
    let value = |flag| {
        flag_value(invocation, flag).ok_or_else(|| anyhow::anyhow!("run.sh passes no {flag}"))
    };
    // The same population, without a server: ids instead of seeded rows.
    let output = simulator(&brokers(), &unique_topic("demo"), &[])
        .args(["--users", value("--seed-users")?])
        .args(["--products", value("--seed-products")?])
        .args(["--session-gap", value("--session-gap")?])
        .args(["--rate", rate, "--count", "1"])
        .stderr(Stdio::piped())
        .output()
        .await?;
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("WARN"), "{stderr}");
    Ok(())
}
