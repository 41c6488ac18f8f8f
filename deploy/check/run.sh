#!/usr/bin/env bash
# `make deploy-check` (part of `make test`): installs what the checks need when missing (docker-compose from
# Debian, kubernetes-validate from PyPI into target/deploy-check/venv, the CRD schemas from npm), then runs
# validate.py on every Kubernetes overlay, the Compose file and the Dockerfile, with its self-test.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/deploy/check
work=$root/target/deploy-check
mkdir -p "$work"
if ! command -v kubectl >/dev/null; then
  echo "deploy-check: kubectl (with kustomize) is required; install it from https://kubernetes.io/docs/tasks/tools/" >&2
  exit 1
fi
if ! command -v docker-compose >/dev/null; then
  echo "[deploy-check] installing docker-compose (Debian package)"
  # One apt-get at a time with the set-up scripts (deploy/local/services.sh): two `make test` at once raced here.
  flock /var/lock/upload-pipeline-apt.lock sh -c 'apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null \
    && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq docker-compose >/dev/null'
fi
if [ ! -x "$work/venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$work/venv/requirements.txt"; then
  echo "[deploy-check] installing kubernetes-validate"
  rm -rf "$work/venv"
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$work/venv/requirements.txt"
fi
if [ ! -d "$here/node_modules" ] || [ "$here/package-lock.json" -nt "$here/node_modules" ]; then
  echo "[deploy-check] installing the CRD schemas (npm ci)"
  (cd "$here" && npm ci --silent --no-audit --no-fund >/dev/null 2>&1 || npm ci --no-audit --no-fund)
  touch "$here/node_modules"
fi
exec "$work/venv/bin/python" "$here/validate.py" --producer "${PRODUCER_BIN:-$root/target/debug/producer}" --self-test
