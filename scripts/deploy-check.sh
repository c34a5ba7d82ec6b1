#!/usr/bin/env bash
# The observability kit (deploy/) against a live platform. promtool checks
# the Prometheus configuration and alert rules and runs the rules' unit
# tests; a live rtap-server and rtap-simulator serve /metrics, which
# promtool lints for Prometheus's naming conventions; every metric the
# alert rules and the Grafana dashboard name must be among those served,
# and the dashboard must have the structure Grafana provisions
# (scripts/deploy_check.py). Installs promtool (Debian's prometheus
# package) when missing. Needs the services (scripts/services.sh up).
# Used by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v promtool >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

step() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
step "promtool: configuration, rules and the rules' unit tests"
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts-test.yml

source scripts/live-server.sh
step "traffic, with a few malformed records, and a subscription"
start_traffic 200 --malformed-share 0.01
target/debug/rtap-server watch >/dev/null 2>&1 &
watcher=$!
sleep 8
kill -INT "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null || true

scraped=$(mktemp -d)
trap 'rm -rf "$scraped"; stop_live_and_keys' EXIT
fetch() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "$1"; }
fetch "http://$RTAP_METRICS_ADDR/metrics" >"$scraped/server.prom" || die "cannot scrape rtap-server"
fetch "http://$RTAP_SIM_METRICS_ADDR/metrics" >"$scraped/simulator.prom" || die "cannot scrape rtap-simulator"

step "promtool: the served metrics follow Prometheus's conventions"
for file in server simulator; do
  promtool check metrics <"$scraped/$file.prom" || die "promtool check metrics: $file"
done

step "every metric of the alerts and the dashboard is served; the dashboard's structure"
python3 scripts/deploy_check.py deploy "$scraped/server.prom" "$scraped/simulator.prom"
step "OK"
