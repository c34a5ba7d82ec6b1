//! RTAP's public contract, generated from `proto/rtap/v1`: the gRPC services
//! (catalog, analytics, ingest) and the interaction event carried on Kafka.

#[cfg(feature = "client")]
pub mod client;
pub mod kafka;
#[cfg(feature = "telemetry")]
pub mod telemetry;

/// Version 1 of the RTAP API (`rtap.v1`).
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("rtap.v1");
}

/// Encoded `FileDescriptorSet` of every RTAP proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rtap_descriptor");
