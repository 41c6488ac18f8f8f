#!/usr/bin/env bash
# The API contract, fuzzed: schemathesis (PyPI) generates requests for every operation of the producer's
# /openapi.json, sends them to a running producer with a valid token, and runs every check it has: no answer is a
# server error; every status code, content type, header and body conforms to the document; requests the schema
# allows are accepted and those it forbids are refused. Run by `make test`.
#
# Uses a database and a Redis key prefix of its own; MAX_EXAMPLES (default 30) bounds the examples per operation.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BIN_DIR:-$root/target/debug}
venv=$root/target/schemathesis-venv
version=4.32.5
if [ "$("$venv/bin/st" --version 2>/dev/null | awk '{print $3}')" != "$version" ]; then
  echo "installing schemathesis $version into $venv" >&2
  python3 -m venv --clear "$venv"
  "$venv/bin/pip" install -q "schemathesis==$version"
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
db=up_contract_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
export DATABASE_URL=${TEST_PG_URL:-postgres://postgres@127.0.0.1:5432}/$db
export UPLOAD_PIPELINE__QUEUE__KEY_PREFIX=contract-$db
# The hashing embedder, chosen explicitly: the contract is the API's shapes, and queries embed instantly.
export UPLOAD_PIPELINE__EMBEDDING__EMBEDDER=hashing UPLOAD_PIPELINE__EMBEDDING__MODEL=hashing-v1
# A reranker configured but unreachable (TEI style, no key, a closed port): "rerank": true is a valid request, and
# is answered 200 in fused order with reranked false (the fail-open path), not 422 rerank_not_configured.
export UPLOAD_PIPELINE__SEARCH__RERANK__MODEL=contract-reranker UPLOAD_PIPELINE__SEARCH__RERANK__API_STYLE=tei
export UPLOAD_PIPELINE__SEARCH__RERANK__BASE_URL=http://127.0.0.1:9 UPLOAD_PIPELINE__SEARCH__RERANK__TIMEOUT=200ms
export RUST_LOG=${RUST_LOG:-warn}
export PGOPTIONS="-c client_min_messages=warning"
log=$root/target/contract-producer.log
pid=
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -f "${config:-}"
  redis-cli -h 127.0.0.1 --scan --pattern "$UPLOAD_PIPELINE__QUEUE__KEY_PREFIX:*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null || true
}
trap cleanup EXIT

"$bin/producer" serve --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$port/healthz" >/dev/null || { echo "the producer did not start; see $log" >&2; exit 1; }
# An operator token, so the admin operations are exercised past 403 as well.
token=$("$bin/producer" token --user 5c4a1c1e-0000-4000-8000-00000000c0de --admin)

config=$(mktemp)
# No fixed document id: the stateful phase reaches the {id} operations with the documents its own uploads and
# listings return. A fixed id also went to the operations of scenarios whose links had deleted that document, so
# a later step found "the resource it created" gone.
# What JSON Schema cannot say about an upload: whether the file's bytes are a readable document of the kind its
# name gives (not empty, UTF-8 for a text kind, a PDF's signature; 400), whether the name's extension is a kind it
# reads (415), and multipart part names that are not valid header text (400). For this one operation those
# answers to schema-valid data are what the server should give.
cat >>"$config" <<'TOML'
[[operations]]
include-path = "/v1/documents"
include-method = "POST"
[operations.checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "429", "5xx"]
TOML

SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$root/tests/contract${PYTHONPATH:+:$PYTHONPATH}" \
  "$venv/bin/st" --config-file "$config" run "http://127.0.0.1:$port/openapi.json" \
  --checks all \
  --max-examples "${MAX_EXAMPLES:-30}" \
  --header "Authorization: Bearer $token" \
  --no-color
