# Sourced by the checks that need a live platform (grpcurl-check.sh,
# examples-check.sh): builds the binaries, starts rtap-server on a free port
# with a Redis namespace and topics of its own, over TLS (a throwaway CA
# from scripts/dev-certs.sh) with API keys required, waits until it is
# SERVING, creates an admin and a reader key, and stops it (and any
# traffic) on exit. Sets RTAP_ADDR, RTAP_TLS_CA, RTAP_API_KEY (admin),
# RTAP_READER_KEY, and RTAP_METRICS_ADDR and RTAP_SIM_METRICS_ADDR (free
# ports: the server's /metrics, and the traffic simulator's). Needs the
# services up (scripts/services.sh up).

die() { printf '%s: FAILED: %s\n' "${0##*/}" "$*" >&2; exit 1; }
step() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

cargo build --locked --workspace --bins
live_run_id="live-$$-$(date +%s)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export RTAP_LISTEN_ADDR="127.0.0.1:$(free_port)"
export RTAP_METRICS_ADDR="127.0.0.1:$(free_port)"
export RTAP_SIM_METRICS_ADDR="127.0.0.1:$(free_port)"
export RTAP_REDIS_NAMESPACE="rtap-$live_run_id"
export RTAP_EVENTS_TOPIC="rtap-$live_run_id.interactions"
export RTAP_DEAD_LETTER_TOPIC="rtap-$live_run_id.dead-letter"
export RTAP_ADDR=$RTAP_LISTEN_ADDR
live_log=$(mktemp)
live_tls=$(mktemp -d)
live_traffic=""
scripts/dev-certs.sh "$live_tls"
export RTAP_TLS_CERT=$live_tls/server.pem RTAP_TLS_KEY=$live_tls/server.key
export RTAP_TLS_CA=$live_tls/ca.pem
export RTAP_AUTH=keys

target/debug/rtap-server >"$live_log" 2>&1 &
live_server=$!
stop_live() {
  [[ -n $live_traffic ]] && kill -INT "$live_traffic" 2>/dev/null && wait "$live_traffic" 2>/dev/null
  kill -TERM "$live_server" 2>/dev/null; wait "$live_server" 2>/dev/null || true
  rm -rf "$live_log" "$live_tls"
}
trap stop_live EXIT
for _ in $(seq 120); do
  target/debug/rtap-server health >/dev/null 2>&1 && break
  kill -0 "$live_server" 2>/dev/null || { cat "$live_log" >&2; die "rtap-server exited"; }
  sleep 0.5
done
target/debug/rtap-server health >/dev/null 2>&1 || { cat "$live_log" >&2; die "rtap-server is not SERVING"; }
RTAP_API_KEY=$(target/debug/rtap-server keys create --name "$live_run_id admin" --role admin 2>/dev/null) \
  || die "cannot create an admin key"
RTAP_READER_KEY=$(target/debug/rtap-server keys create --name "$live_run_id reader" --role reader 2>/dev/null) \
  || die "cannot create a reader key"
export RTAP_API_KEY RTAP_READER_KEY
revoke_live_keys() {
  for role in admin reader; do
    target/debug/rtap-server keys revoke "$live_run_id $role" >/dev/null 2>&1 || true
  done
}
stop_live_and_keys() { revoke_live_keys; stop_live; }
trap stop_live_and_keys EXIT
# A key works once every server has reloaded the keys (--auth-refresh-interval).
sleep 3

# Produces `count` simulated events of the last 20 minutes, then returns.
produce_history() {
  target/debug/rtap-simulator --count "$1" --users 20000 --products 50 --session-gap 5m \
    --start-time "$(date -u -d '-20 minutes' +%Y-%m-%dT%H:%M:%SZ)" --progress none \
    --metrics-addr off >/dev/null 2>&1 \
    || die "rtap-simulator failed"
}

# Keeps live traffic flowing (events/s; more simulator flags may follow)
# until the script exits; its /metrics on RTAP_SIM_METRICS_ADDR.
start_traffic() {
  target/debug/rtap-simulator --rate "$@" --users 20000 --products 50 --session-gap 5m \
    --progress none >/dev/null 2>&1 &
  live_traffic=$!
}
