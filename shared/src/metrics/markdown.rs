//! `docs/metrics.md`, written from the catalogue (`make metrics-doc`; a test fails when the file is out of step).

use super::{
    CATALOGUE, DOCUMENT_STATUSES, DOCUMENTS_STORED, JOB_OUTCOMES, Kind, PAUSE_REASONS,
    PROVIDER_OUTCOMES, PROVIDER_REQUESTS, QUEUE_JOBS, QUEUE_REDIS_ERRORS, QUOTA_PAUSED,
    QUOTA_PAUSES, RECOVERY_FAILED_JOBS, RECOVERY_RESOLUTIONS, REDIS_OPS,
};

/// `docs/metrics.md`, generated from the catalogue.
pub fn catalogue_markdown() -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "# Metrics catalogue\n\n\
         Generated from `shared/src/metrics.rs` (`CATALOGUE`); `cargo test -p tests --test observability` fails when this\n\
         file is out of step, and `UPDATE_DOCS=1` rewrites it. Names follow `upload_pipeline_<subsystem>_<name>_<unit>`;\n\
         every histogram has explicit buckets. Gauges marked \"read at scrape time\" come from Redis or Postgres and are\n\
         exported by several processes at once: aggregate them with `max by (...)`, never `sum`.\n\n\
         | name | type | labels | exported by | help |\n|---|---|---|---|---|\n",
    );
    for m in CATALOGUE {
        let labels = if m.labels.is_empty() {
            "-".to_owned()
        } else {
            m.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            m.name,
            m.kind.as_str(),
            labels,
            m.exporter.as_str(),
            m.help.replace('|', "\\|")
        );
    }
    out.push_str("\n## Histogram buckets (seconds)\n\n");
    for m in CATALOGUE.iter().filter(|m| m.kind == Kind::Histogram) {
        let b: Vec<String> = m.buckets.iter().map(|b| b.to_string()).collect();
        let _ = writeln!(out, "- `{}`: {}", m.name, b.join(", "));
    }
    out.push_str(
        "\n## Label values\n\n\
         - `stage`: parse, chunk, embed (and synthetic, the benchmark queue).\n",
    );
    for (label, metric, values) in [
        ("outcome", QUEUE_JOBS, JOB_OUTCOMES),
        ("resolution", RECOVERY_FAILED_JOBS, RECOVERY_RESOLUTIONS),
        ("outcome", PROVIDER_REQUESTS, PROVIDER_OUTCOMES),
        ("status", DOCUMENTS_STORED, DOCUMENT_STATUSES),
        ("op", QUEUE_REDIS_ERRORS, REDIS_OPS),
        ("reason", QUOTA_PAUSES, PAUSE_REASONS),
        ("reason", QUOTA_PAUSED, PAUSE_REASONS),
    ] {
        let _ = writeln!(out, "- `{label}` of `{metric}`: {}.", values.join(", "));
    }
    out.push_str(
        "- `provider`: openai, llamaparse, local, hashing; `resource`: requests, tokens (openai), uploads (llamaparse).\n\
         - `cache`: parse, embedding. `role` of the build info: producer, worker.\n",
    );
    out
}
