//! Compiles `proto/` with the pure-Rust `protox` compiler (no `protoc` needed)
//! and generates prost messages and tonic stubs from the resulting descriptors.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "proto/rtap/v1/events.proto",
    "proto/rtap/v1/catalog.proto",
    "proto/rtap/v1/analytics.proto",
    "proto/rtap/v1/ingest.proto",
    "proto/rtap/v1/delta.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    fs::write(
        out_dir.join("rtap_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
