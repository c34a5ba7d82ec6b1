#!/usr/bin/env bash
# Runs every test against real services: brings PostgreSQL, Redis (and a
# local Redis Cluster) and the Kafka broker up (scripts/services.sh), then
# `cargo test` on the workspace, and closes with one line adding up every
# test binary's results.
# Extra arguments go to cargo test (for example a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh cluster
mkdir -p .run
log=.run/test.log
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
