#!/usr/bin/env bash
# The official Python clients (openai, llama-cloud, cohere), installed unchanged into a throwaway virtualenv, run against
# fake-providers: the proof that the fake speaks the real protocols. Run by `make test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BIN_DIR:-$root/target/debug}
# Pinned for repeatable runs; bump them to check newer clients.
OPENAI_VERSION=${OPENAI_VERSION:-3.54.0}
LLAMA_CLOUD_VERSION=${LLAMA_CLOUD_VERSION:-2.19.0}
COHERE_VERSION=${COHERE_VERSION:-7.3.1}

work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check --cache-dir "$root/target/pip-cache" \
  "openai==$OPENAI_VERSION" "llama-cloud==$LLAMA_CLOUD_VERSION" "cohere==$COHERE_VERSION"

"$bin/fake-providers" --listen 127.0.0.1:0 2>"$work/fake.log" &
pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/fake.log" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$work/fake.log")
[ -n "$url" ] || { echo "fake-providers did not start:" >&2; cat "$work/fake.log" >&2; exit 1; }

echo "official clients (openai $OPENAI_VERSION, llama-cloud $LLAMA_CLOUD_VERSION, cohere $COHERE_VERSION) against fake-providers at $url"
FAKE_URL=$url CORPUS=$root/tests/fixtures/corpus "$work/venv/bin/python" "$root/tests/contract/python_clients.py"
