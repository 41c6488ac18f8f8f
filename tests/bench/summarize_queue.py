#!/usr/bin/env python3
"""Medians, spreads and ours/BullMQ ratios from a queue-bench results file (stdlib only).

usage: summarize_queue.py RAW.jsonl OUT.json OUT.md  -- prints the summary JSON on stdout.
A ratio's interval is min(ours)/max(bullmq) .. max(ours)/min(bullmq); a difference is called real only when the
interval excludes 1 (the peers' README rule)."""
import json
import statistics
import sys
from collections import defaultdict

raw, out_json, out_md = sys.argv[1:4]
rows = [json.loads(l) for l in open(raw) if l.strip()]
failed = [r for r in rows if "error" in r]
groups = defaultdict(list)
for r in rows:
    if "error" not in r:
        groups[(r["peer"], r["concurrency"])].append(r)

METRICS = {
    "enqueue_jobs_per_s": lambda r: r.get("enqueue_jobs_per_s"),
    "process_jobs_per_s": lambda r: r.get("process_jobs_per_s"),
    "latency_p50_ms": lambda r: r.get("latency_p50_ms"),
    "latency_p99_ms": lambda r: r.get("latency_p99_ms"),
    "process_worker_cpu_pct": lambda r: r.get("process_diag", {}).get("worker_cpu_pct"),
    "process_redis_cpu_pct": lambda r: r.get("process_diag", {}).get("redis_cpu_pct"),
    "process_redis_cmds_per_job": lambda r: r.get("process_diag", {}).get("redis_cmds_per_job"),
}


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


summary = {"runs_file": raw, "failed_runs": len(failed), "rows": [], "ratios": []}
for (peer, c), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    row = {"peer": peer, "concurrency": c, "runs": len(rs), "n": rs[0]["n"]}
    for name, get in METRICS.items():
        row[name] = stats([get(r) for r in rs])
    row["latency_saturated_runs"] = sum(1 for r in rs if r.get("latency_diag", {}).get("saturated"))
    p = row["process_jobs_per_s"]
    w = row["process_worker_cpu_pct"]
    if p and w and w["median"]:
        row["process_jobs_per_worker_cpu_s"] = round(p["median"] / (w["median"] / 100))
    summary["rows"].append(row)

by = {(r["peer"], r["concurrency"]): r for r in summary["rows"]}
for (peer, c), row in sorted(by.items(), key=lambda kv: kv[0][1]):
    other = by.get(("bullmq", c))
    if peer != "ours" or not other:
        continue
    entry = {"concurrency": c}
    for name in ("enqueue_jobs_per_s", "process_jobs_per_s", "latency_p50_ms", "latency_p99_ms"):
        a, b = row[name], other[name]
        if not a or not b or not b["median"] or not b["min"] or not b["max"]:
            continue
        entry[name] = {
            "ratio": round(a["median"] / b["median"], 3),
            "interval": [round(a["min"] / b["max"], 3), round(a["max"] / b["min"], 3)],
        }
    summary["ratios"].append(entry)

json.dump(summary, open(out_json, "w"), indent=2)


def fmt(s, digits=0):
    if not s:
        return "-"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


lines = [
    "# Queue benchmark: ours vs BullMQ, same Redis, same run",
    "",
    f"Raw runs: `{raw.split('/')[-1]}`. Cells: median (min-max) over the runs. CPU: % of one core during the",
    "processing window. Ratios: ours/BullMQ medians, with the interval min(ours)/max(bullmq) .. max(ours)/min(bullmq).",
    "",
    "| peer | c | runs | enqueue jobs/s | process jobs/s | latency p50 ms | latency p99 ms | worker CPU % | Redis CPU % | Redis cmds/job | jobs per worker CPU-s | saturated |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in summary["rows"]:
    lines.append(
        f"| {r['peer']} | {r['concurrency']} | {r['runs']} | {fmt(r['enqueue_jobs_per_s'])} | {fmt(r['process_jobs_per_s'])} | "
        f"{fmt(r['latency_p50_ms'], 2)} | {fmt(r['latency_p99_ms'], 2)} | {fmt(r['process_worker_cpu_pct'], 1)} | "
        f"{fmt(r['process_redis_cpu_pct'], 1)} | {fmt(r['process_redis_cmds_per_job'], 2)} | "
        f"{r.get('process_jobs_per_worker_cpu_s', '-'):,} | {r['latency_saturated_runs']}/{r['runs']} |"
    )
lines += ["", "| c | enqueue ours/BullMQ | process ours/BullMQ | p50 ours/BullMQ | p99 ours/BullMQ |", "|---|---|---|---|---|"]
for e in summary["ratios"]:
    cell = lambda k: f"{e[k]['ratio']} [{e[k]['interval'][0]}-{e[k]['interval'][1]}]" if k in e else "-"
    lines.append(f"| {e['concurrency']} | {cell('enqueue_jobs_per_s')} | {cell('process_jobs_per_s')} | {cell('latency_p50_ms')} | {cell('latency_p99_ms')} |")
if failed:
    lines += ["", f"{len(failed)} run(s) failed: see the raw file."]
open(out_md, "w").write("\n".join(lines) + "\n")
print(json.dumps(summary))
