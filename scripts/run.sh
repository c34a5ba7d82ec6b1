#!/usr/bin/env bash
# Brings up PostgreSQL, Redis and the Kafka broker, builds the binaries, and
# runs rtap-server on 127.0.0.1:50051 until Ctrl-C. Flags go to rtap-server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh up
cargo build --release --locked --bins
echo "rtap-server: starting on ${RTAP_LISTEN_ADDR:-127.0.0.1:50051} (Ctrl-C stops it)" >&2
exec target/release/rtap-server "$@"
