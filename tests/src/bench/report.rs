//! What `make bench` writes: per scenario `<scenario>.json`, a Markdown section `<scenario>.md` and PNG plots;
//! then `summary.md`, every section present under one heading with the targets table on top, read back from the
//! JSON files (a scenario run alone refreshes its part and keeps the others).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{
    backlog::Backlog,
    pipeline::{Instant, Realistic},
    plot::{self, Bars, Level, LineChart, Series},
    quality::{self, Quality},
    search::Search,
    stats::{Distribution, fmt},
};

/// The scenarios, in the order they run and appear.
pub const SCENARIOS: [&str; 7] = [
    "queue",
    "pipeline-instant",
    "pipeline-realistic",
    "search",
    "scale",
    "backlog",
    "quality",
];

fn write(out: &Path, name: &str, text: &str) -> Result<()> {
    let path = out.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes `<scenario>.json`.
pub fn json(out: &Path, scenario: &str, value: &impl serde::Serialize) -> Result<()> {
    write(
        out,
        &format!("{scenario}.json"),
        &serde_json::to_string_pretty(value)?,
    )
}

fn dist_row(label: &str, d: &Distribution, unit: &str) -> String {
    format!(
        "| {label} | {} | {}{unit} | {}{unit} | {}{unit} | {}{unit} |\n",
        d.n,
        d.p50,
        d.p95,
        d.p99,
        fmt(d.max)
    )
}

/// A queued and a running row per stage.
fn stage_rows(md: &mut String, stages: &[super::fleet::StageTimes]) {
    for s in stages {
        md.push_str(&dist_row(
            &format!("{} queued", s.stage),
            &s.queued_seconds,
            "",
        ));
        md.push_str(&dist_row(
            &format!("{} running", s.stage),
            &s.running_seconds,
            "",
        ));
    }
}

/// A latency distribution plot: one cumulative-share line per series, the p95 level dashed.
fn cdf(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: Vec<Series>,
    log_x: bool,
) -> Result<()> {
    plot::lines(
        path,
        &LineChart {
            title,
            x_label,
            y_label,
            series,
            levels: vec![Level {
                name: "p95".into(),
                y: 0.95,
            }],
            log_x,
        },
    )
}

const DIST_HEADER: &str =
    "| | n | p50 [95 % CI] | p95 [95 % CI] | p99 [95 % CI] | max |\n|---|---|---|---|---|---|\n";

fn mib(bytes: u64) -> String {
    format!("{} MiB", fmt(bytes as f64 / (1024.0 * 1024.0)))
}

/// The queue scenario's section and plots, from `queue.json` (written by tests/bench/queue.sh).
pub fn queue(out: &Path) -> Result<()> {
    let q: Value = serde_json::from_str(&std::fs::read_to_string(out.join("queue.json"))?)?;
    let rows = q["rows"].as_array().context("queue.json rows")?;
    let mut concurrencies: Vec<i64> = rows
        .iter()
        .filter_map(|r| r["concurrency"].as_i64())
        .collect();
    concurrencies.dedup();
    let series = |peer: &str, field: &str| -> Vec<(f64, f64, f64)> {
        concurrencies
            .iter()
            .map(|c| {
                rows.iter()
                    .find(|r| r["peer"] == peer && r["concurrency"].as_i64() == Some(*c))
                    .map(|r| {
                        let s = &r[field];
                        (
                            s["median"].as_f64().unwrap_or(f64::NAN),
                            s["min"].as_f64().unwrap_or(f64::NAN),
                            s["max"].as_f64().unwrap_or(f64::NAN),
                        )
                    })
                    .unwrap_or((f64::NAN, f64::NAN, f64::NAN))
            })
            .collect()
    };
    let groups: Vec<String> = concurrencies
        .iter()
        .map(|c| format!("concurrency {c}"))
        .collect();
    plot::bars(
        &out.join("queue-throughput.png"),
        &Bars {
            title: "No-op jobs processed per second (median, whiskers: runs' range)",
            y_label: "jobs/s (log)",
            groups: groups.clone(),
            series: vec![
                (
                    "upload-pipeline".into(),
                    series("ours", "process_jobs_per_s"),
                ),
                ("BullMQ".into(), series("bullmq", "process_jobs_per_s")),
            ],
        },
    )?;
    plot::bars(
        &out.join("queue-pickup.png"),
        &Bars {
            title: "Pickup latency p99 at a fixed offered rate, ms (lower is better)",
            y_label: "ms (log)",
            groups,
            series: vec![
                ("upload-pipeline".into(), series("ours", "latency_p99_ms")),
                ("BullMQ".into(), series("bullmq", "latency_p99_ms")),
            ],
        },
    )?;
    let table = std::fs::read_to_string(out.join("queue.md")).unwrap_or_default();
    let body = table
        .lines()
        .skip_while(|l| l.starts_with('#') || l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    write(
        out,
        "queue.section.md",
        &format!(
            "## queue: ours vs BullMQ on the same Redis, same run\n\n{body}\n\n\
             ![throughput](queue-throughput.png) ![pickup](queue-pickup.png)\n"
        ),
    )
}

/// The pipeline-instant section and plot.
pub fn instant(out: &Path, r: &Instant) -> Result<()> {
    json(out, "pipeline-instant", r)?;
    plot::lines(
        &out.join("pipeline-instant-throughput.png"),
        &LineChart {
            title: "pipeline-instant: documents ready per second",
            x_label: "seconds from the first upload",
            y_label: "documents/s",
            series: vec![Series {
                name: format!("{} documents uploaded at once", r.documents),
                points: r.ready_per_second.clone(),
            }],
            levels: vec![Level {
                name: "mean".into(),
                y: r.documents_per_second,
            }],
            log_x: false,
        },
    )?;
    let mut md = format!(
        "## pipeline-instant: what the fleet itself costs\n\n\
         {} HTML documents ({} chunks) uploaded {} at a time through the API; LlamaParse and OpenAI fakes answer at \
         once (LlamaParse polled every 20 ms); one release worker process per stage.\n\n\
         - **{} documents/s, {} chunks/s** end to end ({} s from the first upload to the last document ready).\n\
         - Worker CPU: **{} ms per document** in all ({}).\n\
         - Worker memory, idle before the run: {}; after the run: {} (peak {}).\n\
         - Per document: **{} Redis commands**, **{} Postgres statements** (API and workers, counted on the wire).\n\n",
        r.documents,
        r.chunks,
        r.upload_concurrency,
        fmt(r.documents_per_second),
        fmt(r.chunks_per_second),
        fmt(r.seconds),
        fmt(r.cpu_seconds_per_document * 1000.0),
        r.workers
            .iter()
            .map(|w| format!("{} {}", w.stage, fmt(w.cpu_ms_per_document)))
            .collect::<Vec<_>>()
            .join(", "),
        r.workers
            .iter()
            .map(|w| format!("{} {}", w.stage, mib(w.idle.rss_bytes)))
            .collect::<Vec<_>>()
            .join(", "),
        r.workers
            .iter()
            .map(|w| format!("{} {}", w.stage, mib(w.after.rss_bytes)))
            .collect::<Vec<_>>()
            .join(", "),
        r.workers
            .iter()
            .map(|w| mib(w.after.peak_rss_bytes))
            .collect::<Vec<_>>()
            .join(", "),
        fmt(r.redis_commands_per_document),
        fmt(r.postgres_statements_per_document),
    );
    md.push_str("Where the time goes, seconds per document and stage:\n\n");
    md.push_str(DIST_HEADER);
    md.push_str(&dist_row("upload request (ms)", &r.upload_ms, ""));
    stage_rows(&mut md, &r.stages);
    md.push_str(&dist_row(
        "upload to queryable",
        &r.upload_to_queryable_seconds,
        "",
    ));
    md.push_str("\n![throughput](pipeline-instant-throughput.png)\n");
    write(out, "pipeline-instant.section.md", &md)
}

/// The pipeline-realistic section and plots.
pub fn realistic(out: &Path, r: &Realistic) -> Result<()> {
    json(out, "pipeline-realistic", r)?;
    cdf(
        &out.join("pipeline-realistic-latency.png"),
        "pipeline-realistic: upload to queryable (cumulative share)",
        "seconds",
        "share of documents",
        r.rates
            .iter()
            .map(|x| Series {
                name: format!("{} documents/s offered", x.offered_per_second),
                points: plot::ecdf(&x.latencies),
            })
            .collect(),
        false,
    )?;
    plot::lines(
        &out.join("pipeline-realistic-throughput.png"),
        &LineChart {
            title: "pipeline-realistic: offered and ready, documents/s in 10 s buckets",
            x_label: "seconds from the rate's start",
            y_label: "documents/s",
            series: r
                .rates
                .iter()
                .flat_map(|x| {
                    [
                        Series {
                            name: format!("offered {}/s", x.offered_per_second),
                            points: x.offered_rate_10s.clone(),
                        },
                        Series {
                            name: format!("ready at {}/s", x.offered_per_second),
                            points: x.ready_rate_10s.clone(),
                        },
                    ]
                })
                .collect(),
            levels: vec![],
            log_x: false,
        },
    )?;
    let mut md = format!(
        "## pipeline-realistic: what a user waits\n\nProviders: {}.\nFleet: {}.\nUploads arrive as a Poisson \
         process at each rate in turn.\n\n| offered/s | documents | ready/s | p50 [95 % CI] | p95 [95 % CI] | \
         p99 [95 % CI] | max | OpenAI requests | OpenAI tokens | LlamaParse uploads | 429s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        r.providers, r.fleet
    );
    for x in &r.rates {
        let d = &x.upload_to_queryable_seconds;
        md.push_str(&format!(
            "| {} | {} | {} | {} s | {} s | {} s | {} s | {} % | {} % | {} % | {} of {} |\n",
            x.offered_per_second,
            x.documents,
            fmt(x.completed_per_second),
            d.p50,
            d.p95,
            d.p99,
            fmt(d.max),
            fmt(x.openai_request_utilisation * 100.0),
            fmt(x.openai_token_utilisation * 100.0),
            fmt(x.llamaparse_upload_utilisation * 100.0),
            x.rate_limited,
            x.provider_requests,
        ));
    }
    md.push_str(
        "\nThe OpenAI, LlamaParse columns: share of each tier-1 limit used over the rate's window (these rates do \
         not bind the quota; the `scale` scenario saturates one).\n\nWhere the time goes at each rate, seconds:\n\n",
    );
    for x in &r.rates {
        md.push_str(&format!(
            "{} documents/s:\n\n{DIST_HEADER}",
            x.offered_per_second
        ));
        stage_rows(&mut md, &x.stages);
        md.push('\n');
    }
    md.push_str("![latency](pipeline-realistic-latency.png) ![throughput](pipeline-realistic-throughput.png)\n");
    write(out, "pipeline-realistic.section.md", &md)
}

/// The search section and plot: per tenant-size bucket, recall@10 (mean and worst query) and the latency of vector
/// and hybrid search.
pub fn search(out: &Path, r: &Search) -> Result<()> {
    json(out, "search", r)?;
    cdf(
        &out.join("search-latency.png"),
        &format!(
            "vector search in SQL at {} chunks, {} tenants: latency by tenant size (cumulative share)",
            fmt(r.chunks as f64),
            fmt(r.tenants as f64)
        ),
        "milliseconds (log)",
        "share of queries",
        r.buckets
            .iter()
            .map(|b| Series {
                name: format!("{}-{} chunks", fmt(b.from as f64), fmt(b.to as f64)),
                points: plot::ecdf(&b.vector_latencies),
            })
            .collect(),
        true,
    )?;
    let mut md = format!(
        "## search: {} chunks of {} dimensions across {} tenants of 10 to {} chunks\n\n\
         {} documents of up to 50 chunks, tenants' documents interleaved as they would arrive; each tenant writes \
         mostly about 8 home topics of the same 200 as everyone's, so other tenants' chunks crowd its neighbourhood. \
         Loaded by COPY in {} s with the secondary indexes dropped, then the HNSW index (m 16, ef_construction 64) \
         built once in {} s ({} of index, {} of table) and the other indexes with `VACUUM ANALYZE` in {} s. A \
         search among at most {} chunks scans them exactly (`upload_pipeline.exact_search_chunks()`); a tenant above \
         that walks an HNSW index of its own chunks: {} such indexes, built by one maintenance pass \
         (`db::maintain_tenant_indexes`, what `producer serve` runs every `search.tenant_index_interval`) in {} s, \
         {} together (`search_chunks`: {}).\n\n\
         Each query is a fresh paraphrase of a passage (its vector, and 8-15 words of its vocabulary for hybrid \
         search, a sentence whose keyword list is BM25's over its terms; and, as a short query read as \
         identifiers, its first two words with the same vector, whose list is boosted), asked by \
         a random tenant of the bucket: half about a passage of the tenant's own, half about \
         anyone's (the tenant's best answers then lie far down the list for everyone). Searches run through \
         `search_chunks` as the app role under the tenant's row-level security, at concurrency 1, timed around the \
         statement (the API adds the query's embedding and HTTP). recall@10: the vector search's top 10 against an \
         exact scan of the tenant's own chunks.\n\n\
         | tenant size | tenants | chunks | queries (exact path) | recall@10 mean | worst query | under 0.9 | \
         vector p50 / p95 / p99 ms | hybrid p50 / p95 / p99 ms | hybrid, two words: p50 / p95 / p99 ms |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        fmt(r.chunks as f64),
        r.dimensions,
        fmt(r.tenants as f64),
        fmt(r
            .buckets
            .iter()
            .map(|b| b.to.min(r.chunks))
            .max()
            .unwrap_or(0) as f64),
        fmt(r.documents as f64),
        fmt(r.load_seconds),
        fmt(r.hnsw_build_seconds),
        mib(r.hnsw_bytes as u64),
        mib(r.table_bytes as u64),
        fmt(r.other_indexes_seconds),
        fmt(r.exact_search_chunks as f64),
        r.tenant_indexes,
        fmt(r.tenant_index_seconds),
        mib(r.tenant_index_bytes as u64),
        r.search_settings.join(", "),
    );
    for b in &r.buckets {
        let ms = |d: &Distribution| {
            format!(
                "{} / {} / {}",
                fmt(d.p50.value),
                fmt(d.p95.value),
                fmt(d.p99.value)
            )
        };
        md.push_str(&format!(
            "| {}-{} | {} | {} | {} ({}) | **{}** | **{}** | {} | {} | {} | {} |\n",
            fmt(b.from as f64),
            fmt(b.to as f64),
            b.tenants,
            fmt(b.chunks as f64),
            b.queries,
            b.exact_queries,
            fmt(b.recall_at_10_mean),
            fmt(b.recall_at_10_min),
            b.queries_under_0_9,
            ms(&b.vector_ms),
            ms(&b.hybrid_ms),
            ms(&b.hybrid_short_ms),
        ));
    }
    md.push_str(&format!(
        "\nBoth paths forced on each bucket's first {} queries (vector search; the limit set very high, then to 0): \
         the exact scan, and the graph: the tenant's own HNSW index where it has one (above the limit), else the model's index shared by every tenant, walked until enough of the tenant's chunks turn up.\n\n\
         | tenant size | queries | exact scan p50 / p95 ms | graph p50 / p95 ms | graph recall@10 mean | worst |\n\
         |---|---|---|---|---|---|\n",
        super::search::COMPARED
    ));
    for b in &r.buckets {
        let p = &b.paths;
        md.push_str(&format!(
            "| {}-{} | {} | {} / {} | {} / {} | {} | {} |\n",
            fmt(b.from as f64),
            fmt(b.to as f64),
            p.queries,
            fmt(p.exact_ms.p50.value),
            fmt(p.exact_ms.p95.value),
            fmt(p.graph_ms.p50.value),
            fmt(p.graph_ms.p95.value),
            fmt(p.graph_recall_mean),
            fmt(p.graph_recall_min),
        ));
    }
    md.push_str("\n![latency](search-latency.png)\n");
    write(out, "search.section.md", &md)
}

/// The scale section and plots, from the figures of `scale::scale_out` and `scale::capacity`.
pub fn scale(out: &Path, scale: &Value, capacity: &Value) -> Result<()> {
    json(
        out,
        "scale",
        &serde_json::json!({ "scale_out": scale, "capacity": capacity }),
    )?;
    let rows = scale["unlimited"].as_array().context("scale rows")?;
    let point = |r: &Value, k: &str| {
        (
            r["processes"].as_f64().unwrap_or(0.0),
            r[k].as_f64().unwrap_or(f64::NAN),
        )
    };
    let one = rows
        .first()
        .and_then(|r| r["jobs_per_second_median"].as_f64())
        .unwrap_or(f64::NAN);
    plot::lines(
        &out.join("scale-throughput.png"),
        &LineChart {
            title: "scale: embed jobs/s by worker processes (fake OpenAI, 400 ms)",
            x_label: "processes",
            y_label: "jobs/s",
            series: vec![
                Series {
                    name: "measured (median)".into(),
                    points: rows
                        .iter()
                        .map(|r| point(r, "jobs_per_second_median"))
                        .collect(),
                },
                Series {
                    name: "linear".into(),
                    points: rows
                        .iter()
                        .map(|r| {
                            let p = r["processes"].as_f64().unwrap_or(0.0);
                            (p, p * one)
                        })
                        .collect(),
                },
            ],
            levels: vec![],
            log_x: false,
        },
    )?;
    let q = &scale["quota"];
    let quota = q["quota_requests_per_second"].as_f64().unwrap_or(f64::NAN);
    let timeline: Vec<(f64, f64)> = q["admitted_timeline"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    // Admitted requests a second over the trailing 10 s.
    let rate: Vec<(f64, f64)> = timeline
        .iter()
        .enumerate()
        .filter(|(i, _)| *i >= 20)
        .map(|(i, &(t, n))| (t, (n - timeline[i - 20].1) / 10.0))
        .collect();
    plot::lines(
        &out.join("scale-quota.png"),
        &LineChart {
            title: "Quota use against the limit: 4 embed processes, 120 requests a minute",
            x_label: "seconds from the first request",
            y_label: "requests/s admitted (trailing 10 s)",
            series: vec![Series {
                name: "admitted".into(),
                points: rate,
            }],
            levels: vec![Level {
                name: "quota".into(),
                y: quota,
            }],
            log_x: false,
        },
    )?;
    let mut md = format!(
        "## scale: 1, 2 and 4 embed processes\n\n{} one-chunk documents per run, fake OpenAI at a fixed {} ms with \
         no limit, {} embed slots per process, {} runs each (median [range]).\n\n\
         | processes | jobs/s | speed-up |\n|---|---|---|\n",
        scale["docs_per_run"], scale["latency_ms"], scale["slots_per_process"], scale["repeats"]
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} [{}-{}] | {}x |\n",
            r["processes"],
            fmt(r["jobs_per_second_median"].as_f64().unwrap_or(f64::NAN)),
            fmt(r["min"].as_f64().unwrap_or(f64::NAN)),
            fmt(r["max"].as_f64().unwrap_or(f64::NAN)),
            fmt(r["speedup"].as_f64().unwrap_or(f64::NAN)),
        ));
    }
    md.push_str(&format!(
        "\nUnder a quota of {} requests a minute, 4 processes, 15 s to 45 s after the first request: {} requests/s \
         admitted, **{} % of the quota**, {} % of requests answered 429.\n\n",
        q["requests_per_minute"],
        fmt(q["steady_requests_per_second"].as_f64().unwrap_or(f64::NAN)),
        fmt(q["utilisation"].as_f64().unwrap_or(f64::NAN) * 100.0),
        fmt(q["ratio_429"].as_f64().unwrap_or(f64::NAN) * 100.0),
    ));
    if let Some(p) = capacity.get("per_document") {
        md.push_str("One worker process per stage, alone (150 Markdown documents of six chunks):\n\n| stage | documents/s | CPU ms per document |\n|---|---|---|\n");
        for stage in ["parse", "chunk", "embed"] {
            md.push_str(&format!(
                "| {stage} | {} | {} |\n",
                fmt(capacity[stage]["documents_per_second"]
                    .as_f64()
                    .unwrap_or(f64::NAN)),
                fmt(capacity[stage]["cpu_ms_per_document"]
                    .as_f64()
                    .unwrap_or(f64::NAN)),
            ));
        }
        md.push_str(&format!(
            "\nPer document: {} Redis commands, {} Postgres transactions; {} bytes per chunk stored.\n\n",
            fmt(p["redis_commands"].as_f64().unwrap_or(f64::NAN)),
            fmt(p["postgres_transactions"].as_f64().unwrap_or(f64::NAN)),
            fmt(p["chunk_bytes"].as_f64().unwrap_or(f64::NAN)),
        ));
    }
    md.push_str("![throughput](scale-throughput.png) ![quota](scale-quota.png)\n");
    write(out, "scale.section.md", &md)
}

/// A ratio of provider calls to units of work, to three decimals: one duplicate in a thousand shows.
fn per_unit(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "-".into()
    }
}

/// The backlog section and plot.
pub fn backlog(out: &Path, r: &Backlog) -> Result<()> {
    json(out, "backlog", r)?;
    plot::lines(
        &out.join("backlog-quota.png"),
        &LineChart {
            title: "backlog: quota use against the limits (trailing 10 s)",
            x_label: "seconds from the first upload",
            y_label: "% of the limit",
            series: vec![
                Series {
                    name: "LlamaParse uploads".into(),
                    points: r.uploads_over_time(),
                },
                Series {
                    name: "OpenAI tokens".into(),
                    points: r.tokens_over_time(),
                },
            ],
            levels: vec![Level {
                name: "limit".into(),
                y: 100.0,
            }],
            log_x: false,
        },
    )?;
    let (u, t) = (&r.uploads, &r.tokens);
    let deadline = if r.drained {
        String::new()
    } else {
        format!(
            " **The deadline of {} s passed before every document was ready or failed.**",
            r.config.deadline_seconds
        )
    };
    let mut md = format!(
        "## backlog: {} documents queued behind the quotas\n\n\
         Providers: {}.\nFleet: {}.\n{} distinct HTML pages of about {} words uploaded at once through the API ({} \
         at a time, in {} s), so no parse or embedding cache can hit and both ratios below must be exactly 1.00. \
         The counters were watched for two `reconcile_after` periods after the last document \
         settled.{deadline}\n\n\
         | | measured | target |\n|---|---|---|\n\
         | LlamaParse uploads per document | **{}** ({} paid for {} documents; {} requests with the 429s) | 1.00 |\n\
         | embedded inputs per chunk | **{}** ({} inputs for {} chunks; `chunks_total` {}, {} with a vector) | 1.00 |\n\
         | embedding requests | {} ({} per document, {} tokens) | - |\n\
         | LlamaParse upload limit used | **{} %** over {} s ({} uploads at {} per {} s: {} s at exactly the limit) | - |\n\
         | OpenAI token limit used | **{} %** over {} s ({} tokens at {} a minute: {} s at exactly the limit) | - |\n\
         | 429 answers | {} | - |\n\
         | time to drain, first upload to last document ready | **{} s**: {} `reconcile_after` periods ({} s), {} \
         reconciler passes | - |\n\
         | documents failed | **{}** ({} of {} ready) | 0 |\n\n",
        r.config.documents,
        r.providers,
        r.fleet,
        r.documents,
        r.config.words,
        super::backlog::UPLOAD_CONCURRENCY,
        r.upload_seconds.map_or_else(|| "-".into(), fmt),
        per_unit(r.uploads_per_document),
        r.parse_uploads_admitted,
        r.documents,
        r.parse_uploads,
        per_unit(r.inputs_per_chunk),
        r.embedded_inputs,
        r.chunks,
        r.chunks_total,
        r.chunks_embedded,
        r.embedding_requests,
        fmt(r.embedding_requests as f64 / r.documents as f64),
        fmt(r.embedded_tokens as f64),
        fmt(u.utilisation * 100.0),
        fmt(u.busy_seconds),
        u.used,
        u.limit,
        u.window_seconds,
        fmt(u.bound_seconds),
        fmt(t.utilisation * 100.0),
        fmt(t.busy_seconds),
        fmt(t.used as f64),
        fmt(t.limit as f64),
        fmt(t.bound_seconds),
        r.rate_limited,
        fmt(r.drain_seconds),
        fmt(r.drain_reconcile_periods),
        fmt(r.reconcile_after_seconds),
        fmt(r.drain_seconds / r.reconcile_interval_seconds),
        r.failed,
        r.ready,
        r.documents,
    );
    md.push_str(
        "Limits used: units admitted per window over the span from the first to the last one, against the \
         limit (the fleet refills its buckets at 97.5 % of it). Where the time goes, seconds per document and \
         stage (queued includes the waits behind the quotas):\n\n",
    );
    md.push_str(DIST_HEADER);
    stage_rows(&mut md, &r.stages);
    md.push_str("\n![quota use](backlog-quota.png)\n");
    write(out, "backlog.section.md", &md)
}

fn read(out: &Path, scenario: &str) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(out.join(format!("{scenario}.json"))).ok()?).ok()
}

/// One target: what, the figure, and whether it is met (`None`: not measured).
struct Target {
    what: &'static str,
    figure: String,
    met: Option<bool>,
}

fn targets(out: &Path) -> Vec<Target> {
    let mut t = Vec::new();
    let queue = read(out, "queue");
    for (i, c) in [1, 32, 100].iter().enumerate() {
        let ratio = queue.as_ref().and_then(|q| {
            q["ratios"]
                .as_array()?
                .iter()
                .find(|r| r["concurrency"] == *c)
                .cloned()
        });
        let (figure, met) = match ratio.as_ref().map(|r| &r["process_jobs_per_s"]) {
            Some(r) if r["ratio"].is_number() => (
                format!(
                    "{}x [{}-{}]",
                    fmt(r["ratio"].as_f64().unwrap_or(f64::NAN)),
                    fmt(r["interval"][0].as_f64().unwrap_or(f64::NAN)),
                    fmt(r["interval"][1].as_f64().unwrap_or(f64::NAN))
                ),
                Some(r["ratio"].as_f64().unwrap_or(0.0) >= 1.0),
            ),
            _ => ("not measured".into(), None),
        };
        t.push(Target {
            what: [
                "queue: processing rate at concurrency 1 >= BullMQ's",
                "queue: processing rate at concurrency 32 >= BullMQ's",
                "queue: processing rate at concurrency 100 >= BullMQ's",
            ][i],
            figure,
            met,
        });
    }
    let realistic = read(out, "pipeline-realistic");
    let at1 = realistic.as_ref().and_then(|r| {
        r["rates"]
            .as_array()?
            .iter()
            .find(|x| x["offered_per_second"].as_f64() == Some(1.0))
            .cloned()
    });
    t.push(match at1 {
        Some(x) => {
            let p95 = &x["upload_to_queryable_seconds"]["p95"];
            let v = p95["value"].as_f64().unwrap_or(f64::NAN);
            Target {
                what: "pipeline-realistic: upload-to-queryable p95 <= 10 s at 1 document/s",
                figure: format!(
                    "{} s [{}-{}]",
                    fmt(v),
                    fmt(p95["low"].as_f64().unwrap_or(f64::NAN)),
                    fmt(p95["high"].as_f64().unwrap_or(f64::NAN))
                ),
                met: Some(v <= 10.0),
            }
        }
        None => Target {
            what: "pipeline-realistic: upload-to-queryable p95 <= 10 s at 1 document/s",
            figure: "not measured".into(),
            met: None,
        },
    });
    let search = read(out, "search");
    t.push(match search.as_ref().and_then(|s| s["buckets"].as_array()) {
        Some(buckets) if !buckets.is_empty() => {
            let f = |b: &Value, k: &str| b[k].as_f64().unwrap_or(f64::NAN);
            let p95 = |b: &Value, k: &str| b[k]["p95"]["value"].as_f64().unwrap_or(f64::NAN);
            let lowest_mean = buckets.iter().map(|b| f(b, "recall_at_10_mean")).fold(f64::NAN, f64::min);
            let worst = buckets.iter().map(|b| f(b, "recall_at_10_min")).fold(f64::NAN, f64::min);
            let vector = buckets.iter().map(|b| p95(b, "vector_ms")).fold(f64::NAN, f64::max);
            let hybrid = buckets.iter().map(|b| p95(b, "hybrid_ms")).fold(f64::NAN, f64::max);
            // Short queries take the identifier-like keyword list: hybrid's target holds for both.
            let short = buckets.iter().map(|b| p95(b, "hybrid_short_ms")).fold(f64::NAN, f64::max);
            let s = search.as_ref().map_or(&Value::Null, |s| s);
            Target {
                what: "search: in every tenant-size bucket recall@10 >= 0.95 and no query under 0.7; p95 <= 20 ms \
                       vector, <= 30 ms hybrid at concurrency 1 (1,000,000 chunks, 1,000 tenants)",
                figure: format!(
                    "{} chunks, {} tenants: lowest bucket mean {}, worst query {}; highest bucket p95 {} ms vector, \
                     {} ms hybrid ({} ms hybrid, two-word queries)",
                    fmt(s["chunks"].as_f64().unwrap_or(f64::NAN)),
                    fmt(s["tenants"].as_f64().unwrap_or(f64::NAN)),
                    fmt(lowest_mean),
                    fmt(worst),
                    fmt(vector),
                    fmt(hybrid),
                    fmt(short)
                ),
                met: Some(
                    lowest_mean >= 0.95
                        && worst >= 0.7
                        && vector <= 20.0
                        && hybrid <= 30.0
                        && short <= 30.0,
                ),
            }
        }
        _ => Target {
            what: "search: in every tenant-size bucket recall@10 >= 0.95 and no query under 0.7; p95 <= 20 ms \
                   vector, <= 30 ms hybrid at concurrency 1 (1,000,000 chunks, 1,000 tenants)",
            figure: "not measured".into(),
            met: None,
        },
    });
    let scale = read(out, "scale");
    let (figure, met) = match scale.as_ref().map(|s| &s["scale_out"]["quota"]) {
        Some(q) if q["utilisation"].is_number() => {
            let (u, r) = (
                q["utilisation"].as_f64().unwrap_or(0.0),
                q["ratio_429"].as_f64().unwrap_or(1.0),
            );
            (
                format!(
                    "{} % of the quota, {} % 429s",
                    fmt(u * 100.0),
                    fmt(r * 100.0)
                ),
                Some(u >= 0.95 && r <= 0.001),
            )
        }
        _ => ("not measured".into(), None),
    };
    t.push(Target {
        what: "quota: utilisation >= 95 % with <= 0.1 % 429s",
        figure,
        met,
    });
    let instant = read(out, "pipeline-instant");
    let idle: Option<Vec<f64>> = instant.as_ref().and_then(|i| {
        Some(
            i["workers"]
                .as_array()?
                .iter()
                .filter_map(|w| w["idle"]["rss_bytes"].as_f64())
                .collect(),
        )
    });
    t.push(match idle {
        Some(v) if !v.is_empty() => {
            let max = v.iter().copied().fold(0.0, f64::max) / (1024.0 * 1024.0);
            Target {
                what: "an idle worker under 64 MB resident",
                figure: format!("largest {} MiB", fmt(max)),
                met: Some(max < 64.0),
            }
        }
        _ => Target {
            what: "an idle worker under 64 MB resident",
            figure: "not measured".into(),
            met: None,
        },
    });
    t.extend(backlog_targets(read(out, "backlog")));
    t.extend(quality_targets(read(out, "quality")));
    t
}

/// The backlog's targets: one paid LlamaParse upload per document and one embedded input per chunk, exactly (a
/// duplicate is a target missed, however small a share), and every document ready.
fn backlog_targets(backlog: Option<Value>) -> Vec<Target> {
    const WHAT: [&str; 3] = [
        "backlog: LlamaParse uploads per document = 1.00",
        "backlog: embedded inputs per chunk = 1.00",
        "backlog: every document ready behind the quotas, none failed",
    ];
    let Some(b) = backlog else {
        return WHAT
            .into_iter()
            .map(|what| Target {
                what,
                figure: "not measured".into(),
                met: None,
            })
            .collect();
    };
    let n = |k: &str| b[k].as_u64().unwrap_or(0);
    let f = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
    let (documents, chunks) = (n("documents"), n("chunks"));
    vec![
        Target {
            what: WHAT[0],
            figure: format!(
                "{} ({} paid uploads for {} documents)",
                per_unit(f("uploads_per_document")),
                n("parse_uploads_admitted"),
                documents
            ),
            met: Some(documents > 0 && n("parse_uploads_admitted") == documents),
        },
        Target {
            what: WHAT[1],
            figure: format!(
                "{} ({} inputs for {} chunks)",
                per_unit(f("inputs_per_chunk")),
                n("embedded_inputs"),
                chunks
            ),
            met: Some(chunks > 0 && n("embedded_inputs") == chunks),
        },
        Target {
            what: WHAT[2],
            figure: format!(
                "{} of {} ready, {} failed, in {} s ({} reconcile_after periods); limits used: uploads {} %, \
                 tokens {} %; {} 429s",
                n("ready"),
                documents,
                n("failed"),
                fmt(f("drain_seconds")),
                fmt(f("drain_reconcile_periods")),
                fmt(b["uploads"]["utilisation"].as_f64().unwrap_or(f64::NAN) * 100.0),
                fmt(b["tokens"]["utilisation"].as_f64().unwrap_or(f64::NAN) * 100.0),
                n("rate_limited"),
            ),
            met: Some(documents > 0 && n("failed") == 0 && n("ready") == documents),
        },
    ]
}

/// The quality section: hit@5 and MRR@10 per mode and kind with the targets beside them, the questions each mode
/// misses, and the `[search]` variants.
pub fn quality(out: &Path, r: &Quality) -> Result<()> {
    json(out, "quality", r)?;
    let s = &r.search;
    let mut md = format!(
        "## quality: hit@5 and MRR@10 of {} questions over {} pages of the PostgreSQL 15 manual\n\n\
         The evaluation set of `tests/fixtures/eval/` ([README](../fixtures/eval/README.md)) uploaded through the \
         API, {} bytes of HTML; {} chunks (at most {} tokens, {} overlapping), every page ready {} s after the first \
         upload, one `worker` for every stage embedding with {}. Each question asked through `POST /v1/search` with \
         k = {} in every mode; `[search]`: text_config {}, candidates {}, rrf_k {}, weights vector {} / keyword {} \
         (x {} for identifier-like queries). \
         `{}`: hybrid with `rerank: true`, the best {} fused hits reranked by the fake reranker (the share of the \
         query's words a chunk holds: the path end to end, not a cross-encoder's judgement). A hit is relevant when \
         it comes from the question's page; *chunk*: when its text also holds the evidence phrase.\n\n\
         | mode | questions | hit@5 | MRR@10 | hit@5 chunk | MRR@10 chunk | p50 ms |\n|---|---|---|---|---|---|---|\n",
        r.questions.len(),
        r.pages,
        r.bytes,
        r.chunks,
        r.chunking.max_tokens,
        r.chunking.overlap_tokens,
        fmt(r.ingest_seconds),
        r.embedder,
        quality::K,
        s.text_config,
        s.candidates,
        s.rrf_k,
        s.vector_weight,
        s.keyword_weight,
        s.identifier_boost,
        quality::RERANK_LABEL,
        s.rerank.candidates,
    );
    for m in &r.modes {
        for (i, x) in m.scores.iter().enumerate() {
            md.push_str(&format!(
                "| {} | {} | {:.3} | **{:.3}** | {:.3} | {:.3} | {} |\n",
                if i == 0 {
                    format!("**{}**: {}", m.label, x.kind)
                } else {
                    x.kind.clone()
                },
                x.questions,
                x.hit_at_5,
                x.mrr_at_10,
                x.chunk_hit_at_5,
                x.chunk_mrr_at_10,
                if i == 0 {
                    fmt(m.latency_ms.p50.value)
                } else {
                    String::new()
                },
            ));
        }
    }
    md.push_str("\n| target (MRR@10, page) | measured | met |\n|---|---|---|\n");
    for t in quality_targets(Some(serde_json::to_value(r)?)) {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            t.what.trim_start_matches("quality: "),
            t.figure,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            }
        ));
    }
    quality_misses(&mut md, r);
    if !r.sweep.is_empty() {
        md.push_str(
            "\n`[search]` variants on the same chunks (MRR@10, page; each through an API of its own):\n\n\
             | variant | keyword mode: all | hybrid: keyword | paraphrase | mixed | all | hybrid hit@5: all |\n\
             |---|---|---|---|---|---|---|\n",
        );
        let main = |label: &str| r.modes.iter().find(|m| m.label == label).map(|m| &m.scores);
        let rows = main("keyword")
            .zip(main("hybrid"))
            .map(|(k, h)| ("(as above)", k, h));
        for (name, keyword, hybrid) in rows.into_iter().chain(
            r.sweep
                .iter()
                .map(|v| (v.name.as_str(), &v.keyword, &v.hybrid)),
        ) {
            md.push_str(&format!(
                "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                keyword[3].mrr_at_10,
                hybrid[0].mrr_at_10,
                hybrid[1].mrr_at_10,
                hybrid[2].mrr_at_10,
                hybrid[3].mrr_at_10,
                hybrid[3].hit_at_5
            ));
        }
    }
    write(out, "quality.section.md", &md)
}

/// Per mode, the questions whose page is not among the first 10 (with the page that came first instead), and
/// those found below first place.
fn quality_misses(md: &mut String, r: &Quality) {
    md.push_str(
        "\nMissed (the page not in the first 10; → the question's page, ⇐ the first hit's):\n\n",
    );
    for m in &r.modes {
        let missed: Vec<String> = m
            .ranked
            .iter()
            .zip(&r.questions)
            .filter(|(x, _)| x.page_rank.is_none())
            .map(|(x, q)| {
                format!(
                    "`{}` {:?} → {} ⇐ {}",
                    q.id,
                    q.question,
                    q.file,
                    x.first.as_deref().unwrap_or("no hit")
                )
            })
            .collect();
        let late: Vec<String> = m
            .ranked
            .iter()
            .filter_map(|x| Some(format!("`{}` {}", x.id, x.page_rank.filter(|r| *r > 1)?)))
            .collect();
        md.push_str(&format!(
            "- **{}**, {} missed: {}.\n  Found below first place (rank): {}.\n",
            m.label,
            missed.len(),
            if missed.is_empty() {
                "none".into()
            } else {
                missed.join("; ")
            },
            if late.is_empty() {
                "none".into()
            } else {
                late.join(", ")
            }
        ));
    }
}

/// The quality targets (issue 20): on the keyword questions hybrid's MRR@10 at least 0.95 and above vector's; on
/// the paraphrases hybrid no worse than vector; and vector alone under 0.95 on the keyword questions, or the set
/// would be too easy to show what keyword search adds.
fn quality_targets(quality: Option<Value>) -> Vec<Target> {
    const WHAT: [&str; 3] = [
        "quality: hybrid MRR@10 on keyword questions >= 0.95 and above vector's",
        "quality: hybrid MRR@10 on paraphrases >= vector's",
        "quality: vector MRR@10 on keyword questions < 0.95 (a set hard enough)",
    ];
    let mrr = |label: &str, kind: &str| -> Option<f64> {
        let modes = quality.as_ref()?["modes"].as_array()?;
        let m = modes.iter().find(|m| m["label"] == label)?;
        let scores = m["scores"].as_array()?;
        scores.iter().find(|x| x["kind"] == kind)?["mrr_at_10"].as_f64()
    };
    let pair = |kind: &str| mrr("hybrid", kind).zip(mrr("vector", kind));
    let figure = |(h, v): (f64, f64)| format!("hybrid {h:.3}, vector {v:.3}");
    let checks = [
        pair("keyword").map(|p| (figure(p), p.0 >= 0.95 && p.0 > p.1)),
        pair("paraphrase").map(|p| (figure(p), p.0 >= p.1)),
        mrr("vector", "keyword").map(|v| (format!("vector {v:.3}"), v < 0.95)),
    ];
    WHAT.into_iter()
        .zip(checks)
        .map(|(what, check)| match check {
            Some((figure, met)) => Target {
                what,
                figure,
                met: Some(met),
            },
            None => Target {
                what,
                figure: "not measured".into(),
                met: None,
            },
        })
        .collect()
}

/// Writes `summary.md`: the targets and every scenario's section present.
pub fn summary(out: &Path, header: &str) -> Result<bool> {
    let mut md = format!(
        "# Benchmarks (`make bench`)\n\n{header}\n\n## Targets\n\n| target | measured | met |\n|---|---|---|\n"
    );
    let mut all = true;
    for t in targets(out) {
        all &= t.met != Some(false);
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            t.what,
            t.figure,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            }
        ));
    }
    md.push('\n');
    for s in SCENARIOS {
        if let Ok(section) = std::fs::read_to_string(out.join(format!("{s}.section.md"))) {
            md.push_str(&section);
            md.push('\n');
        }
    }
    write(out, "summary.md", &md)?;
    Ok(all)
}
