#!/usr/bin/env bash
# `make run`: the fleet in the foreground for real use: migrations, the producer API (api.listen) and a worker
# for every stage, with their logs interleaved. Ctrl-C drains both.
#
# `make run-mock` (PROFILE=mock): the same fleet with LlamaParse parsing and OpenAI embeddings, both served by
# fake-providers on 127.0.0.1:9100 with the latency, rate limits and fault rates of deploy/mock/fake-providers.json:
# the real provider code paths, without keys or network.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BIN_DIR:-$root/target/debug}
pids=()
if [ "${PROFILE:-}" = mock ]; then
  fake=${FAKE_PROVIDERS_LISTEN:-127.0.0.1:9100}
  "$bin/fake-providers" --listen "$fake" --config "$root/deploy/mock/fake-providers.json" &
  pids+=($!)
  export UPLOAD_PIPELINE__PARSING__PARSER=llamaparse
  export UPLOAD_PIPELINE__PARSING__LLAMAPARSE__BASE_URL=http://$fake
  export LLAMA_CLOUD_API_KEY=llx-mock
  export UPLOAD_PIPELINE__EMBEDDING__EMBEDDER=openai
  export UPLOAD_PIPELINE__EMBEDDING__MODEL=text-embedding-3-small
  export UPLOAD_PIPELINE__EMBEDDING__DIMENSIONS=${UPLOAD_PIPELINE__EMBEDDING__DIMENSIONS:-384}
  export UPLOAD_PIPELINE__EMBEDDING__OPENAI__BASE_URL=http://$fake/v1
  export OPENAI_API_KEY=sk-mock
  export UPLOAD_PIPELINE__QUEUE__KEY_PREFIX=${UPLOAD_PIPELINE__QUEUE__KEY_PREFIX:-upload-pipeline-mock}
  export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/upload_pipeline_mock}
fi
# The embedded defaults embed with all-MiniLM-L6-v2 from models/ (`make model`), wherever this is started from.
export UPLOAD_PIPELINE__EMBEDDING__LOCAL__MODEL_DIR=${UPLOAD_PIPELINE__EMBEDDING__LOCAL__MODEL_DIR:-$root/models/all-MiniLM-L6-v2}
"$bin/producer" migrate
"$bin/producer" serve &
pids+=($!)
"$bin/worker" &
pids+=($!)
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
wait "${pids[@]}"
