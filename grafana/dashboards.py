#!/usr/bin/env python3
"""Generates the Grafana dashboards of the fleet (grafana/dashboards/*.json) and their guide (docs/dashboards.md).

One definition per panel: its title, what it means, its PromQL and thresholds. `python3 grafana/dashboards.py`
writes the files; `--check` fails when the committed files differ (run by the observability tests, which also
evaluate every expression below against a real Prometheus scraping a running fleet).

Variables: $datasource (a Prometheus data source), $stage and $instance (multi-value, "All" = .*).
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RI = "$__rate_interval"
STAGE = 'stage=~"$stage"'
INST = 'instance=~"$instance"'


def target(expr, legend=""):
    return {"expr": expr, "legend": legend}


def panel(title, kind, description, targets, unit="short", thresholds=None, width=12, height=8, decimals=None,
          min_value=None, max_value=None):
    return {
        "title": title, "kind": kind, "description": description, "targets": targets, "unit": unit,
        "thresholds": thresholds or [], "width": width, "height": height, "decimals": decimals,
        "min": min_value, "max": max_value,
    }


def row(title):
    return {"row": title}


def hq(q, metric, by="le", extra=""):
    """histogram_quantile over a rate of `metric`'s buckets."""
    sel = "{" + extra + "}" if extra else ""
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{sel}[{RI}])))"


UTQ = "upload_pipeline_documents_upload_to_queryable_seconds"
SEARCH = "upload_pipeline_search_duration_seconds"

OVERVIEW = {
    "uid": "upload-pipeline-overview",
    "title": "upload-pipeline / Pipeline overview",
    "description": "Throughput, backlog and the three targets of the document pipeline (parse -> chunk -> embed).",
    "panels": [
        row("Targets"),
        panel("Upload to queryable, p95", "stat",
              "95th percentile of the time from upload to a document being searchable over the dashboard's range. "
              "Green under our 10 s target, red from the spec's 90 s.",
              [target(f"histogram_quantile(0.95, sum by (le) (rate({UTQ}_bucket[$__range])))")],
              unit="s", thresholds=[("green", None), ("yellow", 10), ("red", 90)], width=4, height=5, decimals=2),
        panel("Queryable within 90 s", "stat",
              "Share of documents that became searchable within 90 s of their upload, over the range "
              "(the SLO is 99 %; the burn-rate alerts watch it).",
              [target(f'sum(increase({UTQ}_bucket{{le="90"}}[$__range])) / sum(increase({UTQ}_count[$__range]))')],
              unit="percentunit", thresholds=[("red", None), ("yellow", 0.99), ("green", 0.999)], width=4, height=5,
              decimals=2),
        panel("Search, p95", "stat",
              "95th percentile of search latency through the API, query embedding included. Green under our 20 ms "
              "target, red from the spec's 3 s.",
              [target(f"histogram_quantile(0.95, sum by (le) (rate({SEARCH}_bucket[$__range])))")],
              unit="s", thresholds=[("green", None), ("yellow", 0.02), ("red", 3)], width=4, height=5, decimals=3),
        panel("Searches within 3 s", "stat",
              "Share of searches answered within the spec's 3 s over the range.",
              [target(f'sum(increase({SEARCH}_bucket{{le="3"}}[$__range])) / sum(increase({SEARCH}_count[$__range]))')],
              unit="percentunit", thresholds=[("red", None), ("yellow", 0.99), ("green", 0.999)], width=4, height=5,
              decimals=2),
        panel("Failures recovered", "stat",
              "Of the jobs that failed at least once (an error or a crashed worker) over the range, the share a "
              "later attempt recovered. The spec asks for more than 95 %. No value: nothing failed.",
              [target('sum(increase(upload_pipeline_recovery_failed_jobs_total{resolution="recovered"}[$__range])) '
                      '/ sum(increase(upload_pipeline_recovery_failed_jobs_total[$__range]))')],
              unit="percentunit", thresholds=[("red", None), ("green", 0.95)], width=4, height=5, decimals=1),
        panel("Dead letters", "stat",
              "Jobs in the dead-letter streams now, all stages. Anything above 0 needs a look: "
              "`producer dlq list --stage <stage>`.",
              [target("sum(max by (stage) (upload_pipeline_queue_dead_jobs))")],
              thresholds=[("green", None), ("red", 1)], width=4, height=5),
        row("Throughput"),
        panel("Jobs finished per second, by stage", "timeseries",
              "Jobs that ended successfully per second in each stage: the pipeline's throughput.",
              [target(f'sum by (stage) (rate(upload_pipeline_queue_jobs_total{{{STAGE}, outcome="success"}}[{RI}]))',
                      "{{stage}}")], unit="ops"),
        panel("Job outcomes per second", "timeseries",
              "Every end of an attempt by stage and outcome: success, failed (recorded as a failed document), "
              "retried, deferred (provider budget), dead, released (shutdown).",
              [target(f"sum by (stage, outcome) (rate(upload_pipeline_queue_jobs_total{{{STAGE}}}[{RI}]))",
                      "{{stage}} {{outcome}}")], unit="ops"),
        panel("Documents ready and failed per minute", "timeseries",
              "Documents that became searchable, and documents that failed (by stage), per minute.",
              [target(f"sum(rate(upload_pipeline_documents_ready_total[{RI}])) * 60", "ready"),
               target(f"sum by (stage) (rate(upload_pipeline_documents_failed_total{{{STAGE}}}[{RI}])) * 60",
                      "failed at {{stage}}")], unit="short"),
        panel("Uploads per minute", "timeseries",
              "Uploads the API accepted per minute: created, duplicate (same bytes, same user) and replayed "
              "(same Idempotency-Key).",
              [target(f"sum by (outcome) (rate(upload_pipeline_documents_uploaded_total[{RI}])) * 60",
                      "{{outcome}}")]),
        row("Backlog"),
        panel("Backlog by stage", "timeseries",
              "Jobs waiting for a worker (pending), delivered and running (in flight), and waiting for a retry "
              "(delayed), read from Redis at each scrape.",
              [target(f"max by (stage) (upload_pipeline_queue_pending_jobs{{{STAGE}}})", "{{stage}} pending"),
               target(f"max by (stage) (upload_pipeline_queue_in_flight_jobs{{{STAGE}}})", "{{stage}} in flight"),
               target(f"max by (stage) (upload_pipeline_queue_delayed_jobs{{{STAGE}}})", "{{stage}} delayed")]),
        panel("Oldest waiting job", "timeseries",
              "Age of the oldest pending job per stage. Above 90 s one wait alone breaks the upload-to-queryable "
              "target (alert UploadPipelineOldestJobTooOld).",
              [target(f"max by (stage) (upload_pipeline_queue_oldest_pending_age_seconds{{{STAGE}}})", "{{stage}}")],
              unit="s", thresholds=[("green", None), ("red", 90)]),
        panel("Dead letters by stage", "timeseries",
              "Dead letters per stage over time.",
              [target(f"max by (stage) (upload_pipeline_queue_dead_jobs{{{STAGE}}})", "{{stage}}")],
              thresholds=[("green", None), ("red", 1)]),
        panel("Documents by status", "timeseries",
              "Documents stored per status (queued, parsing, chunking, embedding, ready, failed), counted in "
              "Postgres at each scrape of the producer.",
              [target("max by (status) (upload_pipeline_documents_stored_documents)", "{{status}}")]),
        row("Latency"),
        panel("Upload to queryable", "timeseries",
              "p50, p95 and p99 of the time from upload to searchable, against the 90 s target.",
              [target(hq(0.5, UTQ), "p50"), target(hq(0.95, UTQ), "p95"), target(hq(0.99, UTQ), "p99")],
              unit="s", thresholds=[("green", None), ("red", 90)]),
        panel("Search latency", "timeseries",
              "p50, p95 and p99 of search latency through the API, against the 3 s target.",
              [target(hq(0.5, SEARCH), "p50"), target(hq(0.95, SEARCH), "p95"), target(hq(0.99, SEARCH), "p99")],
              unit="s", thresholds=[("green", None), ("red", 3)]),
        panel("Job run time p95, by stage", "timeseries",
              "95th percentile of handler run time per stage (provider calls included).",
              [target(hq(0.95, "upload_pipeline_queue_job_duration_seconds", "stage, le", STAGE), "{{stage}}")],
              unit="s"),
        panel("Queue wait p95, by stage", "timeseries",
              "95th percentile of the time a runnable job waited for a worker, per stage: high means too few "
              "replicas (or a quota-bound stage).",
              [target(hq(0.95, "upload_pipeline_queue_wait_seconds", "stage, le", STAGE), "{{stage}}")], unit="s"),
        row("Errors and recovery"),
        panel("Attempt error ratio, by stage", "timeseries",
              "Failed attempts (retried, failed, dead) among attempts that ended, per stage, over 5 minutes "
              "(recording rule; alert UploadPipelineErrorRatioHigh above 5 %).",
              [target(f"stage:upload_pipeline_queue_errors:ratio_rate5m{{{STAGE}}}", "{{stage}}")],
              unit="percentunit", thresholds=[("green", None), ("red", 0.05)]),
        panel("Failed jobs by resolution", "timeseries",
              "Jobs that failed at least once, by how they ended: recovered by a later attempt, dead-lettered, or "
              "failed for good (an unparseable file). The recovery ratio over an hour is a recording rule.",
              [target(f"sum by (resolution) (increase(upload_pipeline_recovery_failed_jobs_total{{{STAGE}}}[{RI}]))",
                      "{{resolution}}"),
               target("upload_pipeline:recovery:ratio_rate1h", "recovered share (1 h)")]),
        panel("API responses per second", "timeseries",
              "API responses by route and status class.",
              [target(f"sum by (route, status) (rate(upload_pipeline_api_responses_total[{RI}]))",
                      "{{route}} {{status}}")], unit="reqps"),
        panel("Reconciler requeues", "timeseries",
              "Stage jobs the reconciler pushed again because their document stood still (lost pushes, "
              "Redis data loss).",
              [target(f"sum by (stage) (increase(upload_pipeline_reconciler_requeued_jobs_total{{{STAGE}}}[{RI}]))",
                      "{{stage}}")]),
    ],
}

PROVIDERS = {
    "uid": "upload-pipeline-providers",
    "title": "upload-pipeline / Providers and quota",
    "description": "Calls to LlamaParse and OpenAI-compatible embeddings against the fleet-wide limits.",
    "panels": [
        row("Limits"),
        panel("Quota in use", "gauge",
              "Budget reserved per window against each provider limit, over 5 minutes (recording rule). The limiter "
              "aims at 97.5 %; alert UploadPipelineQuotaNearLimit above 90 % means the limit is the ceiling.",
              [target("provider_resource:upload_pipeline_quota_utilisation:ratio_rate5m", "{{provider}} {{resource}}")],
              unit="percentunit", thresholds=[("green", None), ("yellow", 0.9), ("red", 1)], width=8, height=6,
              min_value=0, max_value=1.1),
        panel("Paused providers", "stat",
              "1 while a provider is paused fleet-wide, by reason: quota (out of quota or credit) or auth (it "
              "refused our key). A probe call that succeeds or `producer quota resume <provider>` ends it.",
              [target("max by (provider, reason) (upload_pipeline_quota_paused_providers)",
                      "{{provider}} {{reason}}")],
              thresholds=[("green", None), ("red", 1)], width=8, height=6),
        panel("Estimated spend", "stat",
              "Estimated provider spend in US dollars since the processes started (tokens times the configured "
              "price), summed over replicas.",
              [target("sum by (provider) (upload_pipeline_quota_cost_dollars)", "{{provider}}")],
              unit="currencyUSD", width=8, height=6, decimals=4),
        panel("Requests per minute against the limit", "timeseries",
              "Requests reserved per minute by the fleet, and the configured limit per minute.",
              [target(f'sum by (provider) (rate(upload_pipeline_quota_reserved_units_total{{resource="requests"}}[{RI}])) * 60',
                      "{{provider}} reserved"),
               target('max by (provider) (upload_pipeline_quota_limit_units{resource="requests"} * 60 '
                      '/ upload_pipeline_quota_window_seconds{resource="requests"})', "{{provider}} limit")]),
        panel("Tokens per minute against the limit", "timeseries",
              "Tokens reserved per minute (counted with the tokenizer before each call), tokens the provider "
              "counted, and the configured limit per minute.",
              [target(f'sum by (provider) (rate(upload_pipeline_quota_reserved_units_total{{resource="tokens"}}[{RI}])) * 60',
                      "{{provider}} reserved"),
               target(f'sum by (provider) (rate(upload_pipeline_quota_used_units_total{{provider="openai"}}[{RI}])) * 60',
                      "{{provider}} counted"),
               target('max by (provider) (upload_pipeline_quota_limit_units{resource="tokens"} * 60 '
                      '/ upload_pipeline_quota_window_seconds{resource="tokens"})', "{{provider}} limit")]),
        panel("LlamaParse uploads against the limit", "timeseries",
              "LlamaParse uploads reserved per minute and the configured uploads per minute, with pages parsed.",
              [target(f'sum(rate(upload_pipeline_quota_reserved_units_total{{provider="llamaparse", resource="uploads"}}[{RI}])) * 60',
                      "uploads reserved"),
               target('max(upload_pipeline_quota_limit_units{provider="llamaparse", resource="uploads"} * 60 '
                      '/ upload_pipeline_quota_window_seconds{provider="llamaparse", resource="uploads"})', "limit"),
               target(f'sum(rate(upload_pipeline_quota_used_units_total{{provider="llamaparse"}}[{RI}])) * 60',
                      "pages")]),
        panel("Remaining, as the provider reports it", "timeseries",
              "x-ratelimit-remaining-requests and -tokens from the provider's last answer to each replica.",
              [target("min by (provider, resource) (upload_pipeline_quota_remaining_units)",
                      "{{provider}} {{resource}}")]),
        row("Requests"),
        panel("Requests per minute by outcome", "timeseries",
              "Provider requests per minute by provider and outcome: ok, rate_limited (429), quota, throttled, "
              "transient, permanent, too_large.",
              [target(f"sum by (provider, outcome) (rate(upload_pipeline_provider_requests_total[{RI}])) * 60",
                      "{{provider}} {{outcome}}")]),
        panel("429 ratio", "timeseries",
              "Share of provider requests answered 429, over 5 minutes (recording rule). Our target is under 0.1 %; "
              "alert UploadPipelineRateLimitedRising above 1 %.",
              [target("provider:upload_pipeline_provider_rate_limited:ratio_rate5m", "{{provider}}")],
              unit="percentunit", thresholds=[("green", None), ("yellow", 0.001), ("red", 0.01)]),
        panel("Provider latency", "timeseries",
              "p50 and p95 of each provider operation (a LlamaParse job: upload to result).",
              [target(hq(0.5, "upload_pipeline_provider_request_duration_seconds", "provider, operation, le"),
                      "{{provider}} {{operation}} p50"),
               target(hq(0.95, "upload_pipeline_provider_request_duration_seconds", "provider, operation, le"),
                      "{{provider}} {{operation}} p95")], unit="s"),
        panel("Embedded texts per second", "timeseries",
              "Texts sent for embedding, and texts cut to the provider's token limit first.",
              [target(f"sum by (provider) (rate(upload_pipeline_provider_embedded_inputs_total[{RI}]))",
                      "{{provider}} embedded"),
               target(f"sum by (provider) (rate(upload_pipeline_provider_truncated_inputs_total[{RI}]))",
                      "{{provider}} truncated")], unit="ops"),
        row("Waits"),
        panel("Quota wait", "timeseries",
              "p50 and p95 of the time calls waited for their share of the fleet's budget.",
              [target(hq(0.5, "upload_pipeline_quota_wait_seconds", "provider, le"), "{{provider}} p50"),
               target(hq(0.95, "upload_pipeline_quota_wait_seconds", "provider, le"), "{{provider}} p95")], unit="s"),
        panel("Deferrals, cool-downs and pauses", "timeseries",
              "Calls sent back to the queue because their wait would pass quota.max_wait, fleet-wide cool-downs "
              "after a 429, and pauses after running out of quota, per provider.",
              [target(f"sum by (provider) (increase(upload_pipeline_quota_deferred_calls_total[{RI}]))",
                      "{{provider}} deferred"),
               target(f"sum by (provider) (increase(upload_pipeline_quota_cooldowns_total[{RI}]))",
                      "{{provider}} cool-downs"),
               target(f"sum by (provider) (increase(upload_pipeline_quota_pauses_total[{RI}]))",
                      "{{provider}} pauses")]),
        panel("Cache hit ratio", "timeseries",
              "Share of parse and embedding lookups served from the Postgres caches (no provider call).",
              [target(f"sum by (cache) (rate(upload_pipeline_cache_hits_total[{RI}])) / "
                      f"(sum by (cache) (rate(upload_pipeline_cache_hits_total[{RI}])) + "
                      f"sum by (cache) (rate(upload_pipeline_cache_misses_total[{RI}])))", "{{cache}}")],
              unit="percentunit"),
    ],
}

FLEET = {
    "uid": "upload-pipeline-fleet",
    "title": "upload-pipeline / Fleet",
    "description": "Worker replicas, their slots, restarts and resources.",
    "panels": [
        row("Replicas"),
        panel("Worker replicas by stage", "timeseries",
              "Worker processes serving each stage (those Prometheus scrapes).",
              [target(f"count by (stage) (upload_pipeline_worker_slots{{{STAGE}}})", "{{stage}}")]),
        panel("Busy slots against slots, by stage", "timeseries",
              "Job slots in use and job slots in total, summed over the replicas of each stage. Busy = slots with "
              "work pending means the stage needs more replicas (or is quota-bound).",
              [target(f"sum by (stage) (upload_pipeline_worker_busy_slots{{{STAGE}}})", "{{stage}} busy"),
               target(f"sum by (stage) (upload_pipeline_worker_slots{{{STAGE}}})", "{{stage}} slots")]),
        panel("Busy slots by instance", "timeseries",
              "Job slots in use in each worker process.",
              [target(f"upload_pipeline_worker_busy_slots{{{STAGE}, {INST}}}", "{{instance}} {{stage}}")]),
        panel("Worker loop heartbeat age", "timeseries",
              "Seconds since each stage loop went round; /healthz (the liveness probe) fails above queue.reclaim_after "
              "and alert UploadPipelineWorkerStalled fires above 60 s.",
              [target(f"max by (instance, stage) (upload_pipeline_worker_heartbeat_age_seconds{{{STAGE}, {INST}}})",
                      "{{instance}} {{stage}}")], unit="s", thresholds=[("green", None), ("red", 60)]),
        row("Restarts"),
        panel("Restarts", "timeseries",
              "Stage workers restarted inside a process after their backend failed, and process restarts "
              "(a new start time).",
              [target(f"sum by (instance, stage) (increase(upload_pipeline_worker_restarts_total{{{STAGE}, {INST}}}[{RI}]))",
                      "{{instance}} {{stage}} stage restarts"),
               target(f"changes(upload_pipeline_process_start_time_seconds{{{INST}}}[$__range])",
                      "{{instance}} process restarts")]),
        panel("Jobs reclaimed and claims lost", "timeseries",
              "Jobs taken over from workers that stopped answering (crashes, kills), and claims a slow live "
              "worker lost.",
              [target(f"sum by (stage) (increase(upload_pipeline_queue_reclaimed_jobs_total{{{STAGE}}}[{RI}]))",
                      "{{stage}} reclaimed"),
               target(f"sum by (stage) (increase(upload_pipeline_queue_claims_lost_total{{{STAGE}}}[{RI}]))",
                      "{{stage}} claims lost")]),
        panel("Queue Redis errors", "timeseries",
              "Failed Redis calls of the queue per operation (each retried).",
              [target(f"sum by (stage, op) (increase(upload_pipeline_queue_redis_errors_total{{{STAGE}}}[{RI}]))",
                      "{{stage}} {{op}}")]),
        panel("Targets up", "timeseries",
              "Producer and worker processes answering /metrics, and their versions.",
              [target('sum by (job) (up{job=~"upload-pipeline.*"})', "{{job}}"),
               target("count by (role, version) (upload_pipeline_build_info)", "{{role}} {{version}}")]),
        row("Resources"),
        panel("Resident memory", "timeseries",
              "Resident memory of each process (the worker's memory limit should sit well above its peak).",
              [target(f"upload_pipeline_process_resident_memory_bytes{{{INST}}}", "{{instance}}")], unit="bytes"),
        panel("CPU", "timeseries",
              "CPU cores in use by each process.",
              [target(f"rate(upload_pipeline_process_cpu_seconds_total{{{INST}}}[{RI}])", "{{instance}}")],
              unit="short"),
        panel("Open file descriptors and threads", "timeseries",
              "Open file descriptors (against the limit) and threads of each process.",
              [target(f"upload_pipeline_process_open_fds{{{INST}}}", "{{instance}} fds"),
               target(f"upload_pipeline_process_threads{{{INST}}}", "{{instance}} threads")]),
    ],
}

DASHBOARDS = {"pipeline-overview": OVERVIEW, "providers-and-quota": PROVIDERS, "fleet": FLEET}

VARIABLES = [
    {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
    {"name": "stage", "label": "Stage", "type": "query",
     "query": "label_values(upload_pipeline_queue_pending_jobs, stage)"},
    {"name": "instance", "label": "Instance", "type": "query",
     "query": "label_values(upload_pipeline_build_info, instance)"},
]


def grafana_variable(v):
    if v["type"] == "datasource":
        return {"name": v["name"], "label": v["label"], "type": "datasource", "query": v["query"],
                "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}
    return {
        "name": v["name"], "label": v["label"], "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "definition": v["query"], "query": {"query": v["query"], "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "options": [], "regex": "",
    }


def grafana_panel(p, pid, x, y):
    steps = [{"color": c, "value": v} for c, v in p["thresholds"]] or [{"color": "green", "value": None}]
    defaults = {"unit": p["unit"], "thresholds": {"mode": "absolute", "steps": steps}}
    if p["decimals"] is not None:
        defaults["decimals"] = p["decimals"]
    if p["min"] is not None:
        defaults["min"] = p["min"]
    if p["max"] is not None:
        defaults["max"] = p["max"]
    if p["kind"] == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": True,
                              "thresholdsStyle": {"mode": "line" if p["thresholds"] else "off"}}
        defaults["color"] = {"mode": "palette-classic"}
    else:
        defaults["color"] = {"mode": "thresholds"}
    out = {
        "id": pid, "type": p["kind"], "title": p["title"], "description": p["description"],
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": p["width"], "h": p["height"]},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "expr": t["expr"], "legendFormat": t["legend"] or "__auto",
                     "range": p["kind"] == "timeseries", "instant": p["kind"] != "timeseries",
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, t in enumerate(p["targets"])],
    }
    if p["kind"] == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "orientation": "auto", "textMode": "auto", "colorMode": "value"}
    return out


def render(key, d):
    panels, pid, x, y, row_h = [], 1, 0, 0, 0
    for p in d["panels"]:
        if "row" in p:
            if x:
                y, x = y + row_h, 0
            panels.append({"id": pid, "type": "row", "title": p["row"], "collapsed": False,
                           "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
            pid, y, row_h = pid + 1, y + 1, 0
            continue
        if x + p["width"] > 24:
            y, x, row_h = y + row_h, 0, 0
        panels.append(grafana_panel(p, pid, x, y))
        pid, x, row_h = pid + 1, x + p["width"], max(row_h, p["height"])
    return {
        "uid": d["uid"], "title": d["title"], "description": d["description"],
        "tags": ["upload-pipeline"], "timezone": "utc", "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [grafana_variable(v) for v in VARIABLES]},
        "annotations": {"list": []},
        "links": [{"title": "upload-pipeline", "type": "dashboards", "tags": ["upload-pipeline"], "asDropdown": True}],
        "panels": panels,
    }


def guide():
    out = ["# Dashboards", "",
           "Generated by `grafana/dashboards.py` with the JSON in `grafana/dashboards/` (Grafana provisions them "
           "from `grafana/provisioning/`). Every expression below is evaluated against a real Prometheus scraping "
           "a running fleet by `cargo test -p tests --test observability`, with `$__rate_interval`, `$__range`, "
           "`$stage` and `$instance` substituted.", "",
           "Variables: `$datasource` (any Prometheus data source), `$stage` (from `" + VARIABLES[1]["query"]
           + "`), `$instance` (from `" + VARIABLES[2]["query"] + "`); both multi-value with All.", ""]
    for key, d in DASHBOARDS.items():
        out += [f"## {d['title']} (`{key}.json`, uid `{d['uid']}`)", "", d["description"], ""]
        for p in d["panels"]:
            if "row" in p:
                out += [f"### {p['row']}", ""]
                continue
            out.append(f"- **{p['title']}**: {p['description']}")
            for t in p["targets"]:
                out.append(f"  - `{t['expr']}`")
        out.append("")
    return "\n".join(out)


def files():
    out = {ROOT / "grafana" / "dashboards" / f"{k}.json": json.dumps(render(k, d), indent=2) + "\n"
           for k, d in DASHBOARDS.items()}
    out[ROOT / "docs" / "dashboards.md"] = guide()
    return out


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for path, text in files().items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
    if stale:
        sys.exit("out of step with grafana/dashboards.py (run `make dashboards`): " + ", ".join(stale))


if __name__ == "__main__":
    main()
