//! How interaction events are laid out on Kafka, shared by every producer
//! (the simulator, the ingest RPC) so all of them agree.
//!
//! The record key is the decimal user id, and the partition is chosen from it
//! with Kafka's default partitioner (murmur2 of the key), so the same user
//! lands on the same partition whichever client produced the event, Java
//! clients included. One user's events therefore stay in order on one
//! partition.

/// The record key of an event by `user_id`.
pub fn record_key(user_id: i64) -> Vec<u8> {
    RecordKey::new(user_id).as_bytes().to_vec()
}

/// [`record_key`] without allocating, for producers that copy the key into
/// a buffer of their own.
pub struct RecordKey {
    /// The longest i64, `-9223372036854775808`, has 20 characters.
    digits: [u8; 20],
    len: usize,
}

impl RecordKey {
    /// The key of an event by `user_id`.
    pub fn new(user_id: i64) -> Self {
        let mut buffer = itoa::Buffer::new();
        let formatted = buffer.format(user_id).as_bytes();
        let mut digits = [0; 20];
        digits[..formatted.len()].copy_from_slice(formatted);
        Self {
            digits,
            len: formatted.len(),
        }
    }

    /// The key: the decimal user id.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[..self.len]
    }
}

/// The partition of a record with `key` in a topic of `partitions`
/// partitions, as Kafka's default partitioner picks it.
///
/// Returns 0 when `partitions` is not positive, so callers never divide by
/// zero; a topic always has at least one partition.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    let positive = murmur2(key) & 0x7fff_ffff;
    // Both operands are non-negative, so the remainder fits an i32.
    i32::try_from(positive % partitions.unsigned_abs()).unwrap_or(0)
}

/// A bootstrap broker address, `host:port` as rskafka expects it: the one
/// parser of `--kafka-brokers` for every binary, so a typo is refused at
/// start-up, not retried forever.
pub fn parse_broker(text: &str) -> Result<String, String> {
    let valid = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if valid {
        Ok(text.to_owned())
    } else {
        let shown: String = text.chars().take(64).collect();
        Err(format!(
            "`{shown}` is not a broker address of the form host:port"
        ))
    }
}

/// Kafka's own rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`, not `.`
/// or `..`.
pub fn parse_topic(text: &str) -> Result<String, String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if text.is_empty()
        || text.len() > 249
        || !text.chars().all(legal)
        || text == "."
        || text == ".."
    {
        return Err(
            "a Kafka topic name is 1 to 249 characters of a-z, A-Z, 0-9, '.', '_', '-'".into(),
        );
    }
    Ok(text.to_owned())
}

/// Topic administration for RTAP's own producers.
#[cfg(feature = "kafka-admin")]
pub mod admin {
    use std::time::Duration;

    use rskafka::client::{
        Client,
        error::{Error as KafkaError, ProtocolError},
    };

    /// A topic that could not be found or created.
    #[derive(Debug, thiserror::Error)]
    pub enum TopicError {
        /// A Kafka call failed.
        #[error("{context}: {source}")]
        Kafka {
            /// What was being done.
            context: String,
            /// The rskafka error.
            source: KafkaError,
        },
        /// The topic did not show up after it was created.
        #[error("topic {0} does not appear in the broker's metadata")]
        Missing(String),
    }

    /// The partitions of `topic`, creating it with `partitions` partitions
    /// (replication factor 1) when it does not exist.
    pub async fn ensure_topic(
        client: &Client,
        topic: &str,
        partitions: i32,
    ) -> Result<Vec<i32>, TopicError> {
        let existing = find_topic(client, topic).await?;
        if !existing.is_empty() {
            return Ok(existing);
        }
        let kafka = |context: String| move |source| TopicError::Kafka { context, source };
        let created = client
            .controller_client()
            .map_err(kafka("cannot reach the Kafka controller".into()))?
            .create_topic(topic, partitions, 1, 5_000)
            .await;
        match created {
            Ok(())
            | Err(KafkaError::ServerError {
                protocol_error: ProtocolError::TopicAlreadyExists,
                ..
            }) => {}
            Err(error) => return Err(kafka(format!("cannot create topic {topic}"))(error)),
        }
        // Metadata can lag behind creation for a moment.
        for _ in 0..50 {
            let found = find_topic(client, topic).await?;
            if !found.is_empty() {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TopicError::Missing(topic.to_owned()))
    }

    async fn find_topic(client: &Client, topic: &str) -> Result<Vec<i32>, TopicError> {
        let topics = client
            .list_topics()
            .await
            .map_err(|source| TopicError::Kafka {
                context: "cannot list topics".into(),
                source,
            })?;
        Ok(topics
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions.into_iter().collect())
            .unwrap_or_default())
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    // Kafka hashes the length as a Java int; keys here are tiny.
    let mut h = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_need_a_host_and_a_port() {
        assert!(parse_broker("127.0.0.1:9092").is_ok());
        assert!(parse_broker("kafka-0.kafka:19092").is_ok());
        for bad in ["nohostport", ":9092", "host:", "host:0", "host:99999", ""] {
            assert!(parse_broker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's UtilsTest.testMurmur2 (as signed Java ints).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input) as i32,
                expected,
                "{:?}",
                std::str::from_utf8(input)
            );
        }
    }

    #[test]
    fn a_user_always_maps_to_the_same_partition_in_range() {
        for user in 1..1000 {
            let key = record_key(user);
            let partition = partition_for_key(&key, 7);
            assert!((0..7).contains(&partition));
            assert_eq!(partition, partition_for_key(&key, 7));
        }
        assert_eq!(partition_for_key(b"1", 0), 0);
    }

    #[test]
    fn the_record_key_is_the_decimal_user_id() {
        for user in [0, 7, 1_000_000, -42, i64::MAX, i64::MIN] {
            assert_eq!(record_key(user), user.to_string().into_bytes());
            assert_eq!(RecordKey::new(user).as_bytes(), user.to_string().as_bytes());
        }
    }
}
