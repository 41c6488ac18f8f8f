#!/usr/bin/env bash
# `make fuzz`: builds the cargo-fuzz targets (nightly, AddressSanitizer) and runs each for FUZZ_SECONDS (default
# 60), seeded with the sample corpus. Not part of `make test`. A crash stops the run with the input saved under
# fuzz/artifacts/<target>/; fix it and keep the input as a regression test in the main suites.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"parse_document chunk_markdown jwt_verify multipart_upload"}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Seeds: each sample document behind the byte that selects its parser, and its Markdown for the chunker.
mkdir -p corpus/parse_document corpus/chunk_markdown corpus/jwt_verify corpus/multipart_upload
for f in "$root"/tests/fixtures/corpus/*; do
  case "$f" in
    *.txt) sel='\x00' ;; *.md) sel='\x01' ;; *.html) sel='\x02' ;; *.pdf) sel='\x03' ;; *.docx) sel='\x04' ;; *) continue ;;
  esac
  { printf "$sel"; cat "$f"; } > "corpus/parse_document/$(basename "$f")"
  case "$f" in *.md|*.txt) cp "$f" "corpus/chunk_markdown/" ;; esac
done
printf 'eyJhbGciOiJIUzI1NiJ9' > corpus/jwt_verify/header
printf 'XyZ\n--XyZ\r\nContent-Disposition: form-data; name="file"; filename="../a.txt"\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{"a":1}\r\n--XyZ--\r\n' \
  > corpus/multipart_upload/upload

cargo +nightly fuzz build
for t in $targets; do
  echo "== $t: ${seconds} s"
  cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 2>&1 | tail -n 4
done
