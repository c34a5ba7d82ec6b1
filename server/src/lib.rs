//! `rtap-server`: RTAP's gRPC server.
//!
//! The rooms, and the one way data flows between them:
//! - [`catalog`]: user and product CRUD on PostgreSQL ([`database`]);
//! - [`ingest`]: events in (Kafka and the ingest RPCs) → aggregates in Redis;
//!   a partition's pipeline is [`ingest::partition`];
//! - [`store`]: the metric store in Redis, written by ingest, read by
//!   analytics; [`store::writer::PartitionWriter`] is the only code that
//!   writes a partition's keys (lease, offset fence, mirrors);
//! - [`analytics`]: queries and subscriptions over those aggregates; a
//!   metric kind is one module of [`analytics::metrics`];
//! - [`auth`]: API keys and roles, checked before any call is routed;
//! - [`dashboard`]: the live dashboard's page, served on the gRPC port
//!   (its source is `dashboard/`, a grpc-web client of [`analytics`]);
//! - [`telemetry`]: what Prometheus scrapes on `--metrics-addr`: every
//!   metric's name and help in one list, the gRPC call counter, a
//!   partition's handles;
//! - [`health`], [`shutdown`], [`app`]: keeping the process honest and alive;
//! - [`infra`]: plumbing every room uses and none owns (Kafka clients,
//!   reconnecting connections, protobuf times, the client side of this API
//!   for `watch` and `health`).
//!
//! No two top-level modules import each other.
//!
//! Items are `pub(crate)` unless the binaries, the integration tests or the
//! benches need them: what is `pub` here is what those use.

pub mod analytics;
pub mod app;
pub mod auth;
mod catalog;
pub mod config;
mod dashboard;
pub mod database;
pub mod error;
mod health;
pub mod infra;
pub mod ingest;
mod retry;
pub mod shutdown;
pub mod store;
mod telemetry;
pub mod watch;

pub use app::{bind, serve};
pub use config::{Cli, Command, Config, LogFormat};
pub use error::Error;
