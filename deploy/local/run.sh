#!/usr/bin/env bash
# `make run`: the fleet in the foreground for real use: migrations, the producer API (api.listen) and a worker
# for every stage, with their logs interleaved. Ctrl-C drains both.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BIN_DIR:-$root/target/debug}
"$bin/producer" migrate
"$bin/producer" serve &
producer=$!
"$bin/worker" &
worker=$!
trap 'kill -TERM $producer $worker 2>/dev/null || true' INT TERM
wait $producer $worker
