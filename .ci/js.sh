#!/usr/bin/env bash
# The JavaScript client's tests (clients/js): node's test runner against the release binary and a
# private redis-server, plus the console in headless Chromium. Installs what they need on a fresh
# Debian machine (apt chromium, nodejs/npm and redis-server when missing; npm ci), builds the
# binary when absent. About a minute once the binary is built.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages for the JS client tests"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
node --version
chromium --version || true

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "node $node_major is too old: pubgate-client needs Node 20+" >&2
  exit 1
fi

export PUBGATE_BIN="${PUBGATE_BIN:-$PWD/target/release/pubgate}"
if [ ! -x "$PUBGATE_BIN" ]; then
  step "release build"
  cargo build --release --quiet
fi

step "npm ci (clients/js: ws and playwright-core, no browser download)"
cd clients/js
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund

step "npm test (clients/js)"
CHROMIUM_BIN="${CHROMIUM_BIN:-$(command -v chromium)}" timeout 240 npm test
