#!/usr/bin/env bash
# `make demo`: two worker processes on the embedded defaults process batches of synthetic jobs (with injected
# failures) while a progress line follows them; then the queue state, a dead letter, the workers' metrics, and a
# graceful SIGTERM drain. Uses its own key prefix, so it never touches other data in Redis.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BIN_DIR:-$root/target/debug}
export UPLOAD_PIPELINE__QUEUE__KEY_PREFIX=${UPLOAD_PIPELINE__QUEUE__KEY_PREFIX:-upload-pipeline-demo}
prefix=$UPLOAD_PIPELINE__QUEUE__KEY_PREFIX
logs=$root/target/demo
mkdir -p "$logs"

# Start from an empty demo namespace (an earlier demo may have been interrupted).
redis-cli -h 127.0.0.1 --scan --pattern "$prefix:*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null

pids=()
stop_workers() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap stop_workers EXIT
for i in 1 2; do
  "$bin/worker" --metrics-addr "127.0.0.1:$((9463 + i))" >"$logs/worker-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2; do
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$((9463 + i))/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$((9463 + i))/healthz" >/dev/null || { echo "worker $i did not start; see $logs/worker-$i.log"; exit 1; }
done
echo "== two workers up (logs in target/demo/), each running the parse, chunk and embed stages"
echo
echo "== 20,000 jobs on the parse queue: 2% fail once and are retried with backoff, 0.1% fail for good"
"$bin/producer" synthetic --stage parse --jobs 20000 --fail-percent 2 --dead-percent 0.1 --wait
echo
echo "== 640 jobs on the embed queue that each work 50 ms (16 slots per worker)"
"$bin/producer" synthetic --stage embed --jobs 640 --work-ms 50 --wait
echo
echo "== queue state"
"$bin/producer" queues
echo
echo "== the newest dead letter of parse"
"$bin/producer" dlq list --stage parse --limit 1
echo
echo "== what the workers counted (from their /metrics)"
for i in 1 2; do
  curl -fs "http://127.0.0.1:$((9463 + i))/metrics" | grep -E '^upload_pipeline_queue_jobs_total' | sed "s/^/worker $i: /"
done
echo
echo "== SIGTERM: the workers drain and exit"
trap - EXIT
stop_workers
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then echo "worker $((i + 1)) exited 0"; else echo "worker $((i + 1)) exited $?"; exit 1; fi
done
