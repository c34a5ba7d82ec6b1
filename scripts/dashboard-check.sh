#!/usr/bin/env bash
# The live dashboard (dashboard/, served by rtap-server at /dashboard/):
# 1. the committed build, dashboard/dist/, is what its sources and lockfile
#    build (`npm ci`, `npm run build`), byte for byte;
# 2. headless Chromium (Debian's, installed if missing) against a live
#    platform fed by rtap-simulator: dashboard/test/e2e.test.mjs.
# `scripts/dashboard-check.sh bench` prints the page's figures instead of
# running the test (RTAP_DASHBOARD_SERVER=target/release/rtap-server: the
# page's server from a release build). Needs the services (scripts/services.sh up). Used by CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:-test}

die() { printf '%s: FAILED: %s\n' "${0##*/}" "$*" >&2; exit 1; }
step() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

step "front end: npm ci, npm run build"
(cd dashboard && npm ci --no-audit --no-fund --silent && npm run build --silent >/dev/null)
if [[ -n $(git status --porcelain -- dashboard/dist) ]]; then
  git status --short -- dashboard/dist >&2
  die "dashboard/dist differs from a fresh build of dashboard/: run 'npm run build' there and commit dist/"
fi

if ! command -v chromium >/dev/null; then
  step "installing Debian's chromium"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

source scripts/live-server.sh

step "traffic: seed the catalog, then 3000 events of the last 20 minutes"
target/debug/rtap-simulator --server-addr "https://$RTAP_ADDR" --seed-users 200 --seed-products 30 \
  --count 3000 --users 20000 --session-gap 5m \
  --start-time "$(date -u -d '-20 minutes' +%Y-%m-%dT%H:%M:%SZ)" --progress none \
  --metrics-addr off >/dev/null 2>&1 || die "rtap-simulator failed"

export NODE_EXTRA_CA_CERTS=$RTAP_TLS_CA
mkdir -p .run
if [[ $mode == bench ]]; then
  step "bench"
  (cd dashboard && npm run bench --silent)
else
  step "headless Chromium against $RTAP_ADDR (screenshot: .run/dashboard.png)"
  (cd dashboard && npm test --silent)
fi
