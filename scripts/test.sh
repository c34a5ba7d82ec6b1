#!/usr/bin/env bash
# Runs every test against real services: brings PostgreSQL, Redis and the
# Kafka broker up (scripts/services.sh), then `cargo test` on the workspace.
# Extra arguments go to cargo test (for example a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh up
cargo test --workspace --locked "$@"
