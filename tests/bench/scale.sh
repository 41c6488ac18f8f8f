#!/usr/bin/env bash
# `make bench-scale`: the scale-out benchmark (tests/tests/scale.rs) and the per-stage capacity run behind
# docs/capacity.md. 1, 2 and 4 embed worker processes against a fake OpenAI answering after a fixed 400 ms with
# no limit (three runs each; targets 1.8x and 3.2x the one-process throughput), then 4 processes under a quota
# of 120 requests a minute (target: 95-100 % of it); then one replica of each stage alone, with the Redis
# commands, Postgres writes and bytes per document. Release-built workers. Results:
# tests/bench-results/{scale,capacity}.{json,md}.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/tests/bench-results
mkdir -p "$out"
cd "$root"
# The workers measured are release builds, as deployed; the test harness (uploads, polling) stays a debug build.
cargo build --quiet --release --workspace --bins
cargo build --quiet --workspace --bins
rm -f "$out/scale.json" "$out/capacity.json"
UPLOAD_PIPELINE_WORKER_BIN=$root/target/release/worker \
SCALE_BENCH_OUT=$out/scale.json CAPACITY_BENCH_OUT=$out/capacity.json \
  cargo test --quiet -p tests --test scale -- --ignored --test-threads=1 --nocapture 2>&1 \
  | grep -E '^(scale|capacity):|panicked|test result' || true
python3 - "$out" <<'PY'
import datetime, json, os, sys
out = sys.argv[1]
when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
if os.path.exists(f"{out}/scale.json"):
    d = json.load(open(f"{out}/scale.json"))
    rows = ["| embed processes | jobs/s (median of 3) | min - max | speedup | target |", "|---|---|---|---|---|"]
    targets = {1: "", 2: ">= 1.8x", 4: ">= 3.2x"}
    for r in d["unlimited"]:
        rows.append(f"| {r['processes']} | {r['jobs_per_second_median']:.1f} | {r['min']:.1f} - {r['max']:.1f} | "
                    f"{r['speedup']:.2f}x | {targets[r['processes']]} |")
    q = d["quota"]
    text = (f"Scale benchmark, {when} (`make bench-scale`): {d['docs_per_run']} documents of one chunk per run, "
            f"fake OpenAI at a fixed {d['latency_ms']:.0f} ms, {d['slots_per_process']} embed slots per process.\n\n"
            + "\n".join(rows) +
            f"\n\nUnder a quota of {q['requests_per_minute']} requests a minute ({q['quota_requests_per_second']:.2f}/s), "
            f"{q['processes']} processes: {q['steady_requests_per_second']:.2f} requests/s steady "
            f"({q['utilisation']*100:.1f} % of the quota), {q['ratio_429']*100:.2f} % answered 429.\n")
    open(f"{out}/scale.md", "w").write(text)
    print(text)
if os.path.exists(f"{out}/capacity.json"):
    c = json.load(open(f"{out}/capacity.json"))
    p = c["per_document"]
    text = (f"Capacity run, {when} (`make bench-scale`): one worker process per stage, alone, on "
            f"Markdown documents of {p['chunks']:.1f} chunks; embeddings from a fake OpenAI answering at once.\n\n"
            "| stage | documents/s per replica | worker CPU ms per document |\n|---|---|---|\n"
            + "".join(f"| {s} | {c[s]['documents_per_second']:.1f} | {c[s]['cpu_ms_per_document']:.2f} |\n"
                      for s in ("parse", "chunk", "embed"))
            + f"\nPer document: {p['redis_commands']:.1f} Redis commands, {p['postgres_transactions']:.1f} Postgres "
              f"transactions, {p['postgres_rows_inserted']:.1f} rows inserted, {p['postgres_rows_updated']:.1f} "
              f"updated, {p['postgres_rows_deleted']:.1f} deleted; {p['chunk_bytes']:,.0f} bytes of `document_chunks` "
              f"(indexes and TOAST included) per chunk of {p['dimensions']} dimensions, {p['postgres_bytes']:,.0f} bytes "
              f"of the schema per document.\n")
    open(f"{out}/capacity.md", "w").write(text)
    print(text)
PY
test -s "$out/scale.json" && test -s "$out/capacity.json"
