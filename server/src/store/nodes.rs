//! Where each partition's keys live: on the one Redis, or on the primary
//! that owns the partition's hash slot in a Redis Cluster. Every key of a
//! partition carries the hash tag `{<namespace>:<partition>}`, so one slot,
//! one primary and one connection serve everything a partition does.
//!
//! Standalone and cluster share this one path: a single Redis is a topology
//! whose one node owns every slot. The slot map is read with `CLUSTER
//! SLOTS` from any reachable seed, and read again when a node answers
//! `MOVED`/`ASK` or fails ([`Nodes::refresh`]).

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

use redis::{
    Client, ConnectionInfo, IntoConnectionInfo, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
};
use tokio::sync::Mutex;

use super::{StoreError, keys::PartitionKeys};

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between
/// the first `{` and the next `}`, if not empty) or of the whole key, modulo
/// 16384, as Redis Cluster computes it.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

/// Gives the connection that reaches a key (and every key of its slot):
/// reads run one pipeline per partition through it.
pub trait Route: Sync {
    /// The connection.
    type Connection: ConnectionLike + Send;

    /// A connection to the node holding `key`.
    fn connection(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Self::Connection, StoreError>> + Send;

    /// A node answered that it no longer holds a slot, or failed: look the
    /// owners up again before the next call.
    fn moved(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// One Redis: every partition on one (shared, multiplexed) connection.
impl Route for ConnectionManager {
    type Connection = Self;

    async fn connection(&self, _key: &str) -> Result<Self, StoreError> {
        Ok(self.clone())
    }
}

impl Route for MultiplexedConnection {
    type Connection = Self;

    async fn connection(&self, _key: &str) -> Result<Self, StoreError> {
        Ok(self.clone())
    }
}

/// The Redis deployment RTAP talks to, and shared read connections to its
/// nodes.
#[derive(Clone)]
pub struct Nodes {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Arc<Topology>,
    /// A shared (reconnecting) connection per node address, for reads.
    shared: Mutex<HashMap<String, ConnectionManager>>,
    /// Bounds the shared connections' connects and replies.
    timeout: Option<Duration>,
}

enum Topology {
    Single(Client),
    Cluster {
        seeds: Vec<ConnectionInfo>,
        /// Slot ranges and the address of their primary; empty until read.
        slots: RwLock<Vec<(u16, u16, ConnectionInfo)>>,
        /// Serializes look-ups of the slot map.
        refreshing: Mutex<()>,
    },
}

impl Nodes {
    /// One Redis at `client`.
    pub fn single(client: Client) -> Self {
        Self::with(Topology::Single(client))
    }

    /// A Redis Cluster reached through any of `seeds` (URLs).
    pub fn cluster(seeds: &[String]) -> Result<Self, StoreError> {
        let seeds = seeds
            .iter()
            .map(|seed| seed.as_str().into_connection_info())
            .collect::<Result<Vec<_>, _>>()?;
        if seeds.is_empty() {
            return Err(StoreError::Cluster {
                detail: "no seed node given".into(),
            });
        }
        Ok(Self::with(Topology::Cluster {
            seeds,
            slots: RwLock::new(Vec::new()),
            refreshing: Mutex::new(()),
        }))
    }

    fn with(topology: Topology) -> Self {
        Self {
            inner: Arc::new(Inner {
                topology: Arc::new(topology),
                shared: Mutex::new(HashMap::new()),
                timeout: None,
            }),
        }
    }

    /// The same nodes through shared connections of its own, whose calls
    /// give up after `timeout`.
    #[must_use]
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                topology: self.inner.topology.clone(),
                shared: Mutex::new(HashMap::new()),
                timeout: Some(timeout),
            }),
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.inner.topology, Topology::Cluster { .. })
    }

    /// The seed nodes, on a cluster.
    pub(crate) fn cluster_seeds(&self) -> Option<Vec<ConnectionInfo>> {
        match &*self.inner.topology {
            Topology::Single(_) => None,
            Topology::Cluster { seeds, .. } => Some(seeds.clone()),
        }
    }

    /// A client of the node that holds `key` (its slot's primary).
    pub async fn client_for_key(&self, key: &str) -> Result<Client, StoreError> {
        match &*self.inner.topology {
            Topology::Single(client) => Ok(client.clone()),
            Topology::Cluster { slots, .. } => {
                let slot = slot(key.as_bytes());
                if let Some(info) = owner(&slots.read().unwrap_or_else(|e| e.into_inner()), slot) {
                    return Ok(Client::open(info)?);
                }
                self.refresh().await?;
                let slots = slots.read().unwrap_or_else(|e| e.into_inner());
                let info = owner(&slots, slot).ok_or_else(|| StoreError::Cluster {
                    detail: format!("no primary serves slot {slot}"),
                })?;
                Ok(Client::open(info)?)
            }
        }
    }

    /// A client of the node that holds the partition's keys.
    pub async fn client_for(&self, keys: &PartitionKeys) -> Result<Client, StoreError> {
        self.client_for_key(&keys.state()).await
    }

    /// A client of every primary (the one Redis when standalone): for what
    /// must visit every node, like a `SCAN` of a namespace.
    pub async fn primaries(&self) -> Result<Vec<Client>, StoreError> {
        match &*self.inner.topology {
            Topology::Single(client) => Ok(vec![client.clone()]),
            Topology::Cluster { slots, .. } => {
                self.refresh().await?;
                let slots = slots.read().unwrap_or_else(|e| e.into_inner());
                let mut addresses: Vec<ConnectionInfo> = Vec::new();
                for (_, _, info) in slots.iter() {
                    if !addresses.iter().any(|a| a.addr() == info.addr()) {
                        addresses.push(info.clone());
                    }
                }
                Ok(addresses
                    .into_iter()
                    .map(Client::open)
                    .collect::<Result<_, _>>()?)
            }
        }
    }

    /// Reads the slot map again from the first seed (or known node) that
    /// answers. A no-op on a single Redis.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let Topology::Cluster {
            seeds,
            slots,
            refreshing,
        } = &*self.inner.topology
        else {
            return Ok(());
        };
        let _one_at_a_time = refreshing.lock().await;
        let known: Vec<ConnectionInfo> = slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, _, info)| info.clone())
            .collect();
        let mut last = None;
        for candidate in known.iter().chain(seeds) {
            match read_slots(candidate, seeds).await {
                Ok(map) => {
                    *slots.write().unwrap_or_else(|e| e.into_inner()) = map;
                    return Ok(());
                }
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Cluster {
            detail: "no seed node given".into(),
        }))
    }

    /// Pings the one Redis, or every primary of the cluster after reading
    /// its slot map (which must cover every slot).
    pub async fn ping(&self) -> Result<(), StoreError> {
        for client in self.primaries().await? {
            let mut connection = self.shared(client).await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await?;
        }
        if let Topology::Cluster { slots, .. } = &*self.inner.topology {
            let covered: u32 = slots
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(first, last, _)| u32::from(*last) - u32::from(*first) + 1)
                .sum();
            if covered < u32::from(SLOTS) {
                return Err(StoreError::Cluster {
                    detail: format!("only {covered} of {SLOTS} slots have a primary"),
                });
            }
        }
        Ok(())
    }

    /// The shared read connection to the node at `client`.
    async fn shared(&self, client: Client) -> Result<ConnectionManager, StoreError> {
        let address = client.get_connection_info().addr().to_string();
        let mut shared = self.inner.shared.lock().await;
        if let Some(connection) = shared.get(&address) {
            return Ok(connection.clone());
        }
        // Replies wait unbounded unless a timeout was asked for: the redis
        // crate's default of 500 ms fails reads that wait behind a large
        // commit. Connecting keeps the crate's bound by default.
        let mut config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_response_timeout(self.inner.timeout);
        if let Some(timeout) = self.inner.timeout {
            config = config.set_connection_timeout(Some(timeout));
        }
        let connection = ConnectionManager::new_with_config(client, config).await?;
        shared.insert(address, connection.clone());
        Ok(connection)
    }
}

impl Route for Nodes {
    type Connection = ConnectionManager;

    async fn connection(&self, key: &str) -> Result<ConnectionManager, StoreError> {
        let client = self.client_for_key(key).await?;
        self.shared(client).await
    }

    async fn moved(&self) {
        if let Err(error) = self.refresh().await {
            tracing::warn!(error = %error, "cannot read the Redis Cluster's slots");
        }
    }
}

/// Whether `error` means the node no longer serves the slot, or cannot be
/// reached: the slot map must be read again (`EXECABORT` included: a
/// transaction sent to a node that lost the slot aborts).
pub(crate) fn is_moved_or_down(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::MasterDown
        )
    ) || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

/// The primary serving `slot`.
fn owner(slots: &[(u16, u16, ConnectionInfo)], slot: u16) -> Option<ConnectionInfo> {
    slots
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(_, _, info)| info.clone())
}

/// `CLUSTER SLOTS` as asked of `node`: slot ranges and their primary, with
/// the credentials and TLS settings of the seeds.
async fn read_slots(
    node: &ConnectionInfo,
    seeds: &[ConnectionInfo],
) -> Result<Vec<(u16, u16, ConnectionInfo)>, StoreError> {
    let mut connection = Client::open(node.clone())?
        .get_multiplexed_async_connection()
        .await?;
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut connection)
        .await?;
    let template = seeds.first().unwrap_or(node);
    let malformed = || StoreError::Cluster {
        detail: "CLUSTER SLOTS answered in an unknown form".into(),
    };
    let Value::Array(ranges) = reply else {
        return Err(malformed());
    };
    let mut map = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(items) = range else {
            return Err(malformed());
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(primary))) =
            (items.first(), items.get(1), items.get(2))
        else {
            return Err(malformed());
        };
        let host = match primary.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            _ => return Err(malformed()),
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            return Err(malformed());
        };
        let (Ok(first), Ok(last), Ok(port)) = (
            u16::try_from(*first),
            u16::try_from(*last),
            u16::try_from(*port),
        ) else {
            return Err(malformed());
        };
        map.push((first, last, at_address(template, host, port)));
    }
    Ok(map)
}

/// `template`'s settings (credentials, TLS, database) at `host:port`.
fn at_address(template: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match template.addr() {
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => redis::ConnectionAddr::Tcp(host, port),
    };
    template.clone().set_addr(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_cluster_computes() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"{}foo"), crc16(b"{}foo") % SLOTS);
    }

    #[test]
    fn every_key_of_a_partition_is_in_one_slot() {
        let keys = PartitionKeys::new("rtap", 3);
        let slot_of = |key: String| slot(key.as_bytes());
        assert_eq!(slot_of(keys.state()), slot_of(keys.lease()));
        assert_eq!(slot_of(keys.state()), slot_of(keys.settled_version()));
        assert_eq!(slot_of(keys.state()), slot(b"rtap:3"));
    }
}
