#!/usr/bin/env bash
# `make bench`: builds the workspace in release mode (the workers measured and the bench binary), makes sure a font for
# the plots is there, and runs every scenario (tests/src/bin/bench.rs). BENCH_ARGS passes options, e.g.
#   make bench BENCH_ARGS="--scenarios search,pipeline-realistic --realistic-documents 120"
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ -z "${BENCH_FONT:-}" ] && ! ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1; then
  echo "installing fonts-dejavu-core for the plots" >&2
  # One apt-get at a time with the set-up scripts (deploy/local/services.sh).
  flock /var/lock/upload-pipeline-apt.lock sh -c 'apt-get -o DPkg::Lock::Timeout=600 install -y -q fonts-dejavu-core >/dev/null 2>&1 \
    || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null \
         && apt-get -o DPkg::Lock::Timeout=600 install -y -q fonts-dejavu-core >/dev/null; }'
fi
# The `perf` profile is release without line tables (Cargo.toml): the same code, built faster on 2 cores. The
# `bench` feature of the tests package adds the bench binary and its plots (test builds leave plotters out).
cargo build --profile perf --quiet --workspace --bins --features tests/bench
exec "$root/target/perf/bench" "$@"
