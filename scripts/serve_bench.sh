#!/usr/bin/env bash
# Issue 22: `specdec bench --server` against `specdec serve`, speculation on and off, one server at a time.
# Usage: scripts/serve_bench.sh OUT CONFIG [BENCH OPTIONS...]
#   starts `specdec serve CONFIG --max-batch 16` on a free port, waits for /health, runs
#   `specdec bench --server URL --concurrency 1,4,8,16 BENCH OPTIONS --out OUT`, then stops it with SIGTERM.
set -euo pipefail
out=$1 config=$2
shift 2
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
specdec serve "$config" --port "$port" --max-batch 16 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  kill -0 $server  # stop waiting if the server died
  sleep 1
done
specdec bench --server "http://127.0.0.1:$port" --concurrency 1,4,8,16 "$@" --out "$out"
