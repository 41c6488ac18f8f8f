#!/usr/bin/env bash
# `make demo`: the fleet on the embedded defaults turns a small corpus (text, Markdown, HTML, PDF, DOCX) into
# searchable chunks, then answers two searches. Uses its own database and Redis key prefix, so it never touches
# other data; starts from scratch each time.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BIN_DIR:-$root/target/debug}
export UPLOAD_PIPELINE__QUEUE__KEY_PREFIX=${UPLOAD_PIPELINE__QUEUE__KEY_PREFIX:-upload-pipeline-demo}
export DATABASE_URL=${DEMO_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/upload_pipeline_demo}
export PGOPTIONS="-c client_min_messages=warning"
# Real semantic search, offline: all-MiniLM-L6-v2 in-process (fetched by `make model`).
export UPLOAD_PIPELINE__EMBEDDING__EMBEDDER=${UPLOAD_PIPELINE__EMBEDDING__EMBEDDER:-local}
export UPLOAD_PIPELINE__EMBEDDING__MODEL=${UPLOAD_PIPELINE__EMBEDDING__MODEL:-all-MiniLM-L6-v2}
export UPLOAD_PIPELINE__EMBEDDING__DIMENSIONS=${UPLOAD_PIPELINE__EMBEDDING__DIMENSIONS:-384}
export UPLOAD_PIPELINE__EMBEDDING__LOCAL__MODEL_DIR=${UPLOAD_PIPELINE__EMBEDDING__LOCAL__MODEL_DIR:-$root/models/all-MiniLM-L6-v2}
api=${DEMO_API:-127.0.0.1:8080}
metrics=${DEMO_METRICS:-127.0.0.1:9464}
user=00000000-0000-4000-8000-000000000001
logs=$root/target/demo
mkdir -p "$logs"

echo "== fresh demo database and queues"
psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS upload_pipeline_demo WITH (FORCE)"
redis-cli -h 127.0.0.1 --scan --pattern "$UPLOAD_PIPELINE__QUEUE__KEY_PREFIX:*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null
"$bin/producer" migrate

pids=()
stop_fleet() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap stop_fleet EXIT
"$bin/producer" serve --listen "$api" >"$logs/producer.log" 2>&1 &
pids+=($!)
"$bin/worker" --stages parse,chunk,embed --metrics-addr "$metrics" >"$logs/worker.log" 2>&1 &
pids+=($!)
for url in "http://$api/healthz" "http://$metrics/healthz"; do
  for _ in $(seq 150); do curl -fs "$url" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fs "$url" >/dev/null || { echo "the fleet did not start; see $logs/"; exit 1; }
done
echo "== producer on $api and a worker running parse, chunk and embed (logs in target/demo/)"
echo
echo "== upload the sample corpus (tests/fixtures/corpus) and wait until it is searchable"
"$bin/producer" upload "$root/tests/fixtures/corpus" --user "$user" --api "http://$api" --wait
echo
echo '== search: "what causes spring tides?"'
"$bin/producer" search "what causes spring tides and neap tides" -k 3 --user "$user" --api "http://$api"
echo
echo '== search: "how do bees keep the hive warm in winter?"'
"$bin/producer" search "how do worker bees keep the cluster warm in winter" -k 3 --user "$user" --api "http://$api"
echo
echo '== search with a paraphrase: "insects generating heat through the frosty season"'
"$bin/producer" search "insects generating heat through the frosty season" -k 1 --user "$user" --api "http://$api"
echo
echo "== stop the fleet (SIGTERM: drain and exit)"
trap - EXIT
stop_fleet
for p in "${pids[@]}"; do wait "$p"; done
echo "fleet stopped"
