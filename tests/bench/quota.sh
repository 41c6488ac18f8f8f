#!/usr/bin/env bash
# `make bench-quota`: the quota load runs (tests/tests/measured/quota.rs) as a benchmark. Four worker processes against the
# fake providers' enforced limits for two minutes each (OpenAI: 600 requests and 200,000 tokens a minute, embed
# concurrency 16 per worker; LlamaParse: 10 uploads per 10 s), one worker killed at one minute. Reports the share
# of the binding limit used (whole run, and the 30 s after the kill) and the share of requests answered 429.
# Targets: utilisation >= 95 %, 429s <= 0.1 %. Results: tests/bench-results/quota.{json,md}.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/tests/bench-results
mkdir -p "$out"
rm -f "$out/quota.json"
cd "$root"
cargo build --quiet --workspace --bins
QUOTA_BENCH_OUT=$out/quota.json cargo test --quiet -p tests --test measured -- --test-threads=1 --nocapture quota::four_ \
  | grep -E '^(openai|llamaparse):' || true
python3 - "$out/quota.json" "$out/quota.md" <<'PY'
import json, sys, datetime
data = json.load(open(sys.argv[1]))
rows = ["| provider | limit | workers x concurrency | utilisation | after the kill | 429 ratio | target met |", "|---|---|---|---|---|---|---|"]
for name, r in data.items():
    limit = f"{r['rpm']} req/min, {r['tpm']:,} tok/min" if name == "openai" else f"{r['uploads_per_10s']} uploads/10 s"
    met = r["utilisation"] >= 0.95 and r["ratio_429"] <= 0.001
    rows.append(f"| {name} | {limit} | {r['workers']} x {r['concurrency']} | {r['utilisation']*100:.1f} % | "
                f"{r['utilisation_after_kill']*100:.1f} % | {r['ratio_429']*100:.2f} % | {'yes' if met else 'no'} |")
text = f"Quota benchmark, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC (`make bench-quota`)\n\n" + "\n".join(rows) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
PY
