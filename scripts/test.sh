#!/usr/bin/env bash
# Runs every test against real services: brings PostgreSQL, Redis (and a
# local Redis Cluster) and the Kafka broker up (scripts/services.sh), then
# `cargo test` on the workspace, then the pipeline and analytics suites again
# on the cluster, and closes with one line adding up every test binary's
# results.
# Extra arguments go to cargo test (for example a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh cluster
mkdir -p .run
log=.run/test.log
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# The pipeline and analytics suites a second time, on the local Redis
# Cluster (a full run only; extra arguments pick tests of the first pass).
# Skipped there: tests that put a proxy or a black hole in front of one
# Redis, and the store primitives' tests, which drive one connection by
# hand (cluster.rs kills and migrates the cluster's nodes instead).
if [[ $# -eq 0 ]]; then
  RTAP_TEST_REDIS=cluster cargo test -p rtap-server --locked --no-fail-fast \
    --test pipeline --test analytics -- \
    --skip a_redis_outage_mid_run \
    --skip ingest_resumes_within_about_two_seconds_of_a_long_redis_outage \
    --skip sigterm_with_redis_unreachable \
    --skip session_states_are_read_from_the_current_and_the_previous_epoch \
    --skip a_commit_is_fenced_when_the_offset_moves \
    --skip committed_counters_stay_exact_integers \
    --skip a_user_set_written_whole_equals_the_one_pfadd_builds \
    2>&1 | tee -a "$log" || status=$?
fi
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
