#!/usr/bin/env bash
# The whole platform on this machine, in one command:
#   1. PostgreSQL, Redis and the Kafka broker (scripts/services.sh up);
#   2. a release build of rtap-server and rtap-simulator;
#   3. rtap-server on RTAP_LISTEN_ADDR (default 127.0.0.1:50051), API keys
#      required (RTAP_AUTH=keys), waiting until its health is SERVING; then
#      a fresh admin key named `run.sh`, written to .run/api-key (the
#      previous one is revoked);
#   4. rtap-simulator in the background, seeding the catalog (10000 users,
#      300 products) and producing RTAP_SIM_RATE events/s (default 25; a user
#      has one session at a time, so higher rates need more users: about 400
#      per event/s with the 5-minute gap below; simulator/tests/produce.rs
#      checks that these defaults run without a capacity warning);
#   5. `rtap-server watch`: a live summary of the last 5 minutes, one line a
#      second, until Ctrl-C; meanwhile the live dashboard is in the browser
#      at http://RTAP_LISTEN_ADDR/dashboard/ (it asks for the key).
# Ctrl-C stops the simulator (after a flush; its totals are printed) and then
# the server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export RTAP_LISTEN_ADDR=${RTAP_LISTEN_ADDR:-127.0.0.1:50051}
export RTAP_AUTH=${RTAP_AUTH:-keys}
RATE=${RTAP_SIM_RATE:-25}
LOG_DIR=.run
mkdir -p "$LOG_DIR"

die() { printf 'run: error: %s\n' "$*" >&2; exit 1; }

free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [[ -n $free_kib && $free_kib -lt 3000000 ]]; then
  die "only $((free_kib / 1024)) MiB free on $(df -P . | awk 'NR == 2 { print $6 }'); the build needs about 3 GiB: free some disk space"
fi

scripts/services.sh up || die "the services did not start (see the lines above); fix that, then run again"
cargo build --release --locked --workspace --bins

port=${RTAP_LISTEN_ADDR##*:}
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  die "port $port is already in use; stop what uses it or set RTAP_LISTEN_ADDR=127.0.0.1:OTHER_PORT"
fi

target/release/rtap-server >"$LOG_DIR/rtap-server.log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" && wait "$server" || true
    echo "run: rtap-server stopped" >&2
  fi
}
trap stop_server EXIT

for _ in $(seq 120); do
  if target/release/rtap-server health >/dev/null 2>&1; then break; fi
  kill -0 "$server" 2>/dev/null || die "rtap-server exited; see $LOG_DIR/rtap-server.log"
  sleep 0.5
done
target/release/rtap-server health >/dev/null 2>&1 \
  || die "rtap-server is not SERVING after 60 s; see $LOG_DIR/rtap-server.log"
echo "run: rtap-server is SERVING on $RTAP_LISTEN_ADDR (log: $LOG_DIR/rtap-server.log)" >&2
if [[ $RTAP_AUTH == keys ]]; then
  target/release/rtap-server keys revoke run.sh >/dev/null 2>&1 || true
  (umask 077 && target/release/rtap-server keys create --name run.sh --role admin >"$LOG_DIR/api-key" 2>/dev/null) \
    || die "cannot create an API key; see target/release/rtap-server keys create --help"
  RTAP_API_KEY=$(cat "$LOG_DIR/api-key")
  export RTAP_API_KEY
  echo "run: an admin API key is in $LOG_DIR/api-key; call with -H \"authorization: Bearer \$(cat $LOG_DIR/api-key)\"" >&2
  # Every server loads new keys within --auth-refresh-interval (2 s).
  sleep 2.5
fi
target/release/rtap-simulator --server-addr "http://$RTAP_LISTEN_ADDR" \
  --seed-users 10000 --seed-products 300 --session-gap 5m --rate "$RATE" --progress none \
  >"$LOG_DIR/rtap-simulator.log" 2>&1 &
simulator=$!
stop_all() {
  if kill -0 "$simulator" 2>/dev/null; then
    kill -INT "$simulator" 2>/dev/null
    wait "$simulator" 2>/dev/null || true
  fi
  grep "simulation finished" "$LOG_DIR/rtap-simulator.log" >&2 || true
  stop_server
}
trap stop_all EXIT
echo "run: rtap-simulator is producing $RATE events/s (log: $LOG_DIR/rtap-simulator.log)" >&2
key_hint=""
[[ $RTAP_AUTH == keys ]] && key_hint=" (give it the key in $LOG_DIR/api-key)"
echo "run: the live dashboard: http://$RTAP_LISTEN_ADDR/dashboard/$key_hint" >&2
echo "run: live metrics of the last 5 minutes follow (rtap-server watch); Ctrl-C stops everything" >&2
target/release/rtap-server watch || true
