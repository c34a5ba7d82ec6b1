//! Plumbing that every room uses and no room owns:
//! - [`kafka`]: the one way to build an rskafka client, and a partition's
//!   high watermark;
//! - [`reconnect`]: a connection made on first use and replaced after a
//!   failure (every shared Redis and Kafka client of the server);
//! - [`status`]: a partition's vital signs and their sum;
//! - [`time`]: protobuf timestamps and durations;
//! - [`client`]: the client side of this server's own API, for
//!   `rtap-server watch` and `rtap-server health`.
//!
//! It imports no room of the server but the store's partition state.

pub mod client;
pub mod kafka;
pub mod reconnect;
pub mod status;
pub mod time;
