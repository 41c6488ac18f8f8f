#!/usr/bin/env bash
# `make bench-queue`: no-op jobs through our queue and through BullMQ on the same Redis, in the same run,
# round-robin (run 1 of every configuration, then run 2, ...), so drifts in machine load hit both alike.
# Writes tests/bench-results/queue-<stamp>.jsonl (raw lines), queue.json and queue.md (medians and ratios),
# and prints the summary JSON.
#
#   RUNS=5 N=20000 LATENCY_SECONDS=10 CONCURRENCIES="1 32 100" make bench-queue
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${RUNS:-3}
N=${N:-20000}
LATENCY_SECONDS=${LATENCY_SECONDS:-10}
CONCURRENCIES=${CONCURRENCIES:-"1 32 100"}
# The peers' harness is material beside the repository (../shared/bench/peers), not part of it; a clone elsewhere
# on this machine finds it at /work/shared.
if [ -z "${PEERS_SRC:-}" ]; then
  for dir in "$root/../shared/bench/peers" /work/shared/bench/peers; do
    if [ -f "$dir/bullmq_bench.js" ]; then PEERS_SRC=$dir; break; fi
  done
fi
PEERS_SRC=${PEERS_SRC:-$root/../shared/bench/peers}
out=${OUT:-$root/tests/bench-results}
mkdir -p "$out"

# The whole workspace, as `make bench` builds it: `-p tests` alone would unify features differently and rebuild.
cargo build --profile perf --quiet --workspace --bins
ours=$root/target/perf/queue-bench

# The BullMQ harness, installed into target/ (never into the shared folder).
peers=$root/target/bench-peers
if [ -f "$PEERS_SRC/bullmq_bench.js" ]; then
  mkdir -p "$peers"
  cp "$PEERS_SRC"/{bullmq_bench.js,package.json,package-lock.json,sysload.py} "$peers/"
  if [ ! -f "$peers/node_modules/bullmq/package.json" ]; then
    (cd "$peers" && npm install --no-save --no-audit --no-fund --silent >&2)
  fi
  have_bullmq=1
else
  echo "no BullMQ harness at $PEERS_SRC: measuring ours alone" >&2
  have_bullmq=0
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
raw=$out/queue-$stamp.jsonl
: > "$raw"
run_one() { # run_one <label> <run> <command...>
  local label=$1 run=$2; shift 2
  local bg line
  bg=$(python3 "$peers/sysload.py" 1 2>/dev/null || echo null)
  echo "[run $run/$RUNS] $label: $*  (background load ${bg}%)" >&2
  if line=$(timeout 900 "$@" | tail -n 1) && [ "${line:0:1}" = "{" ]; then
    printf '%s\n' "$line" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d.update(run=int(sys.argv[1]), bg_cpu_pct=sys.argv[2]); print(json.dumps(d))' "$run" "$bg" >> "$raw"
  else
    echo "{\"peer\": \"$label\", \"error\": \"run failed\", \"run\": $run}" >> "$raw"
  fi
}
for run in $(seq "$RUNS"); do
  for c in $CONCURRENCIES; do
    run_one ours "$run" "$ours" --n "$N" --concurrency "$c" --duration "$LATENCY_SECONDS"
    if [ "$have_bullmq" = 1 ]; then
      run_one bullmq "$run" node "$peers/bullmq_bench.js" --n "$N" --concurrency "$c" --duration "$LATENCY_SECONDS"
    fi
  done
done
python3 "$root/tests/bench/summarize_queue.py" "$raw" "$out/queue.json" "$out/queue.md"
