#!/usr/bin/env python3
"""Summarises cargo-tarpaulin's JSON report per module and checks the coverage bar (`make coverage`).

Usage: summary.py tarpaulin-report.json recovery.json [--bar 95]

Prints every source file's covered/coverable lines grouped by module, then the modules the bar applies to (the
provider clients, the error classification, the quota limiter and the queue backend) with their figures, the
workspace total and the recovery ratio of the provider fault test. Exits 1 when a barred module is below the bar
or a report is missing.
"""

import argparse
import json
import os
import sys

# The code that talks to paid APIs and keeps the fleet's promises: what the bar is about.
BARRED = {
    "provider clients": [
        "shared/src/providers/llamaparse.rs",
        "shared/src/providers/openai.rs",
        "shared/src/providers/openai/answer.rs",
        "shared/src/providers/local.rs",
        "shared/src/providers/hashing.rs",
    ],
    "error classification": [
        "shared/src/providers/mod.rs",
        "shared/src/providers/http.rs",
        "shared/src/queue/error.rs",
    ],
    "quota limiter": [
        "shared/src/quota/mod.rs",
        "shared/src/quota/budget/mod.rs",
        "shared/src/quota/budget/flight.rs",
        "shared/src/quota/budget/line.rs",
        "shared/src/quota/report.rs",
        "shared/src/quota/sizing.rs",
        "shared/src/quota/aimd.rs",
    ],
    "queue backend": [
        "shared/src/queue/backend.rs",
        "shared/src/queue/ack.rs",
        "shared/src/queue/mod.rs",
        "shared/src/queue/scripts.rs",
        "shared/src/queue/broker.rs",
        "shared/src/queue/consumer.rs",
        "shared/src/queue/dead_letters.rs",
        "shared/src/queue/delivery.rs",
        "shared/src/queue/envelope.rs",
        "shared/src/queue/fetch.rs",
        "shared/src/queue/handle.rs",
        "shared/src/queue/outcome.rs",
        "shared/src/queue/stats.rs",
        "shared/src/queue/tasks.rs",
        "shared/src/queue/typed.rs",
    ],
}


def relative(path, root):
    if isinstance(path, list):
        path = os.path.join(*path)
    return os.path.relpath(path, root)


def module_of(path):
    parts = path.split("/")
    # shared/src/queue/backend.rs -> shared/src/queue; shared/src/lib.rs -> shared/src
    return "/".join(parts[:-1])


def pct(covered, coverable):
    return 100.0 * covered / coverable if coverable else 100.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("recovery")
    ap.add_argument("--bar", type=float, default=95.0)
    ap.add_argument("--root", default=os.getcwd())
    args = ap.parse_args()

    try:
        with open(args.report) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"no coverage report: {e}", file=sys.stderr)
        return 1

    files = {}
    for entry in report["files"]:
        path = relative(entry["path"], args.root)
        files[path] = (entry["covered"], entry["coverable"])

    modules = {}
    for path, (cov, total) in files.items():
        m = modules.setdefault(module_of(path), [0, 0, []])
        m[0] += cov
        m[1] += total
        m[2].append(path)

    print("\n== coverage per module (lines covered / coverable)")
    for name in sorted(modules):
        cov, total, paths = modules[name]
        print(f"{name + '/':<32} {cov:>6} / {total:<6} {pct(cov, total):6.2f} %")
        for path in sorted(paths):
            c, t = files[path]
            print(f"    {os.path.basename(path):<28} {c:>6} / {t:<6} {pct(c, t):6.2f} %")

    covered = sum(c for c, _ in files.values())
    coverable = sum(t for _, t in files.values())
    print(f"\nworkspace (test support in tests/ excluded): {covered} / {coverable} lines, "
          f"{pct(covered, coverable):.2f} %")

    failed = False
    print(f"\n== the bar: {args.bar:g} % of lines")
    for group, paths in BARRED.items():
        missing = [p for p in paths if p not in files]
        cov = sum(files[p][0] for p in paths if p in files)
        total = sum(files[p][1] for p in paths if p in files)
        ok = not missing and pct(cov, total) >= args.bar
        failed |= not ok
        note = f" (no figures for {', '.join(missing)})" if missing else ""
        print(f"{group:<22} {cov:>5} / {total:<5} {pct(cov, total):6.2f} %  {'met' if ok else 'BELOW'}{note}")
        for p in paths:
            if p in files:
                c, t = files[p]
                print(f"    {p:<40} {pct(c, t):6.2f} %")

    print("\n== recovery (provider fault test: 10 % of LlamaParse and OpenAI calls fail)")
    try:
        with open(args.recovery) as f:
            r = json.load(f)
        print(f"{r['faults_injected']} faults injected over {r['provider_calls']} provider calls; "
              f"{r['failed_attempts']} stage attempts failed, {r['failed_attempts_in_ready_documents']} of them in "
              f"documents that ended ready: recovery ratio {100 * r['recovery_ratio']:.1f} %; "
              f"{r['documents_ready']} of {r['documents']} documents ready")
    except (OSError, ValueError, KeyError) as e:
        print(f"no recovery figures ({e}): did the provider fault test run?")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
