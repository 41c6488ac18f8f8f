#!/usr/bin/env bash
# `make coverage`: line coverage of the workspace with cargo-tarpaulin (LLVM engine), running the same tests as
# `make test` against the real Postgres, Redis and fake providers. Writes target/coverage/tarpaulin-report.html
# and .json, and target/coverage/recovery.json (the provider fault test's recovery ratio), then prints a summary
# per module and checks the bar on the provider clients, error classification, quota and queue backend.
#
#   COVERAGE_BAR=95 make coverage        # the bar, in % of lines, for those modules (0 to only report)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
TARPAULIN_VERSION=0.37.5
out=$root/target/coverage
# Instrumented artifacts live apart, so `make test` and `make coverage` never rebuild each other's.
build=$root/target/coverage-build
mkdir -p "$out"

if ! cargo tarpaulin --version 2>/dev/null | grep -q "$TARPAULIN_VERSION"; then
  echo "installing cargo-tarpaulin $TARPAULIN_VERSION (a few minutes, once)" >&2
  cargo install --locked --quiet cargo-tarpaulin --version "$TARPAULIN_VERSION"
fi

# The tests start `worker` and `producer` processes. Built here with tarpaulin's own flags, those processes write
# their counters beside the tests' (they inherit LLVM_PROFILE_FILE), and --objects lets tarpaulin read them: the
# queue backend and the provider clients run in workers as much as in the tests' own process.
flags=$(cargo tarpaulin --engine llvm --print-rust-flags 2>/dev/null | sed -n 's/^RUSTFLAGS="\(.*\)"$/\1/p')
[ -n "$flags" ] || { echo "could not read cargo-tarpaulin's RUSTFLAGS" >&2; exit 1; }
RUSTFLAGS="$flags" cargo build --quiet --workspace --bins --target-dir "$build"
export UPLOAD_PIPELINE_WORKER_BIN=$build/debug/worker
export RECOVERY_REPORT=$out/recovery.json
rm -f "$RECOVERY_REPORT"

status=0
cargo tarpaulin --engine llvm --workspace --skip-clean --target-dir "$build" \
  --objects "$build/debug/worker" "$build/debug/producer" \
  --exclude-files 'tests/*' 'fuzz/*' 'target/*' \
  --no-fail-fast --timeout 900 --out Html Json --output-dir "$out" --color never || status=$?

python3 tests/coverage/summary.py "$out/tarpaulin-report.json" "$RECOVERY_REPORT" --bar "${COVERAGE_BAR:-95}" \
  || status=$((status == 0 ? 1 : status))
echo "HTML report: $out/tarpaulin-report.html"
exit "$status"
