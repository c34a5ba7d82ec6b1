//! `rtap-simulator`: stands in for RTAP's websites and mobile apps, producing
//! protobuf-encoded interaction events to Kafka with rskafka.
//!
//! - [`model`]: who does what, when (pure and deterministic under a seed);
//! - [`truth`]: what was produced, as a ground-truth summary for tests;
//! - [`catalog`]: the users and products to simulate, from the RTAP catalog
//!   or a synthetic id range;
//! - [`producer`]: batched, per-partition produce with retries;
//! - [`run`]: pacing, progress and shutdown around them;
//! - [`telemetry`]: what Prometheus scrapes on `--metrics-addr`.

pub mod catalog;
pub mod config;
pub mod model;
pub mod producer;
pub mod run;
pub mod telemetry;
pub mod truth;
