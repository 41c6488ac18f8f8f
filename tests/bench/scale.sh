#!/usr/bin/env bash
# `make bench-scale`: the `scale` scenario of `make bench` at full size (docs/capacity.md): 1, 2 and 4 embed worker
# processes against a fake OpenAI answering after a fixed 400 ms with no limit, 240 documents, three runs each
# (targets 1.8x and 3.2x the one-process throughput), then 4 processes under a quota of 120 requests a minute
# (target: 95-100 % of it); then one replica of each stage alone, with the Redis commands, Postgres writes and
# bytes per document. Release-built workers. Results: tests/bench-results/scale.json, scale.section.md, plots, and
# the summary.md refreshed.
set -euo pipefail
exec bash "$(dirname "$0")/bench.sh" --scenarios scale --scale-documents 240 --scale-runs 3 "$@"
