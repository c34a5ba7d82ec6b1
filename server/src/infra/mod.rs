//! Plumbing that every room uses and no room owns:
//! - [`kafka`]: the one way to build an rskafka client, and a partition's
//!   high watermark;
//! - [`reconnect`]: a connection made on first use and replaced after a
//!   failure (every shared Redis and Kafka client of the server);
//! - [`time`]: protobuf timestamps and durations;
//! - [`client`]: the client side of this server's own API, for
//!   `rtap-server watch` and `rtap-server health`;
//! - [`tls`]: TLS on the gRPC port, reloaded when its files change.
//!
//! It imports no room of the server (only the configuration and the error
//! type), so that every room can import it without a cycle.

pub mod client;
pub mod kafka;
pub(crate) mod reconnect;
pub(crate) mod time;
pub mod tls;

/// Idle time after which a connection gets TCP keepalive probes.
pub(crate) const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);
