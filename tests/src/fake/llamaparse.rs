//! Fake LlamaParse, v1 and v2: keys, credits, the upload window, injected faults, and jobs whose results come
//! from the project's local parsers, page by page.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use axum::{
    Json,
    extract::{Multipart, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use upload_pipeline::parsing::{self, DocKind, Limits};

use super::{Fault, Faults, Latency, Shared, Window, cut_connection, malformed, request_key, roll};

/// The LlamaParse side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaParseConfig {
    /// Keys accepted as `Authorization: Bearer`; empty accepts any request.
    pub keys: Vec<String>,
    /// Latency of every answer.
    pub latency: Latency,
    /// How long a job takes from upload to done.
    pub job_duration: Latency,
    /// Uploads per window (the real service: 50 per 10 s per organisation).
    pub uploads: Option<Window>,
    /// Injected faults.
    pub faults: Faults,
    /// Every upload gets 402 while set (credits exhausted).
    pub credits_exhausted: bool,
    /// Every request gets 401 while set, as if its key had been revoked.
    pub key_revoked: bool,
}

/// A parse job, done at `done_at`.
pub(super) struct Job {
    done_at: Instant,
    v2: bool,
    tier: String,
    name: String,
    outcome: Result<Vec<parsing::Section>, (String, String)>,
    created: chrono::DateTime<chrono::Utc>,
}

fn detail(status: StatusCode, detail: impl Into<Value>) -> Response {
    (status, Json(json!({ "detail": detail.into() }))).into_response()
}

/// Auth, credits, the upload window and injected faults, common to every LlamaParse call; `Some` answers at once.
async fn llama_gate(s: &Shared, headers: &HeaderMap, upload: bool) -> Option<Response> {
    let config = s.lock().config.llamaparse.clone();
    tokio::time::sleep(config.latency.sample()).await;
    let key = request_key(headers, false);
    if key.is_none() && (config.key_revoked || !config.keys.is_empty()) {
        return Some(detail(StatusCode::UNAUTHORIZED, "Not authenticated"));
    }
    if config.key_revoked
        || (!config.keys.is_empty() && !key.as_ref().is_some_and(|k| config.keys.contains(k)))
    {
        return Some(detail(
            StatusCode::UNAUTHORIZED,
            "Invalid authentication token",
        ));
    }
    if upload && config.credits_exhausted {
        return Some(detail(
            StatusCode::PAYMENT_REQUIRED,
            "You have exhausted your free credits. Please upgrade your plan.",
        ));
    }
    if let Some(fault) = roll(&config.faults) {
        s.lock().stats.faults += 1;
        return Some(match fault {
            Fault::ServerError => {
                detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
            }
            Fault::Timeout(d) => {
                tokio::time::sleep(d).await;
                StatusCode::GATEWAY_TIMEOUT.into_response()
            }
            Fault::Malformed => malformed(),
            Fault::Reset => cut_connection(),
            Fault::Quota => detail(
                StatusCode::PAYMENT_REQUIRED,
                "You have exhausted your free credits. Please upgrade your plan.",
            ),
        });
    }
    if let (true, Some(w)) = (upload, config.uploads) {
        let now = Instant::now();
        let mut inner = s.lock();
        let span = Duration::from_millis(w.window_ms);
        while inner
            .uploads
            .front()
            .is_some_and(|t| now.duration_since(*t) >= span)
        {
            inner.uploads.pop_front();
        }
        if inner.uploads.len() as u64 >= w.limit {
            inner.stats.rate_limited += 1;
            return Some(detail(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit exceeded. Please try again later.",
            ));
        }
        inner.uploads.push_back(now);
        inner.stats.parse_uploads_admitted += 1;
    }
    None
}

struct Upload {
    name: String,
    bytes: Vec<u8>,
    fields: HashMap<String, String>,
}

async fn read_upload(mut form: Multipart) -> Result<Upload, Response> {
    let mut file = None;
    let mut fields = HashMap::new();
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                if name == "file" || name == "upload_file" {
                    let filename = field.file_name().unwrap_or("upload").to_owned();
                    let bytes = field.bytes().await.map_err(|e| {
                        detail(StatusCode::BAD_REQUEST, format!("unreadable file: {e}"))
                    })?;
                    file = Some((filename, bytes.to_vec()));
                } else {
                    let text = field.text().await.map_err(|e| {
                        detail(StatusCode::BAD_REQUEST, format!("unreadable field: {e}"))
                    })?;
                    fields.insert(name, text);
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(detail(
                    StatusCode::BAD_REQUEST,
                    format!("malformed multipart body: {e}"),
                ));
            }
        }
    }
    let Some((name, bytes)) = file else {
        return Err(detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "missing", "loc": ["body", "file"], "msg": "Field required" }]),
        ));
    };
    Ok(Upload {
        name,
        bytes,
        fields,
    })
}

/// Starts a job: parses with the project's local parsers (the result waits until the job's time is up).
fn start_job(
    s: &Shared,
    upload: Upload,
    v2: bool,
    tier: String,
    max_pages: Option<usize>,
) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let config = s.lock().config.llamaparse.clone();
    let outcome = if rand::random::<f64>() < config.faults.job_error {
        s.lock().stats.faults += 1;
        Err((
            "PDF_IS_BROKEN".to_owned(),
            "Injected failure: the document could not be parsed".to_owned(),
        ))
    } else {
        match DocKind::detect(&upload.name, &upload.bytes) {
            Err(e) => Err(("UNSUPPORTED_FILE_TYPE".to_owned(), e.to_string())),
            Ok(kind) => {
                let limits = Limits {
                    max_pages: max_pages.unwrap_or(10_000),
                    max_chars: 50_000_000,
                };
                parsing::parse(kind, &upload.bytes, limits)
                    .map_err(|e| ("PARSE_ERROR".to_owned(), e.to_string()))
            }
        }
    };
    s.lock().jobs.insert(
        id.clone(),
        Job {
            done_at: Instant::now() + config.job_duration.sample(),
            v2,
            tier,
            name: upload.name,
            outcome,
            created: chrono::Utc::now(),
        },
    );
    id
}

/// Counts an upload, passes it through the gate and reads its form; `Err` is the answer to give instead.
async fn accept_upload(
    s: &Shared,
    headers: &HeaderMap,
    form: Multipart,
) -> Result<Upload, Response> {
    s.lock().stats.parse_uploads += 1;
    if let Some(r) = llama_gate(s, headers, true).await {
        return Err(r);
    }
    read_upload(form).await
}

pub(super) async fn v2_upload(
    State(s): State<Shared>,
    headers: HeaderMap,
    form: Multipart,
) -> Response {
    let upload = match accept_upload(&s, &headers, form).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(raw) = upload.fields.get("configuration") else {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "missing", "loc": ["body", "configuration"], "msg": "Field required" }]),
        );
    };
    let config: Value = match serde_json::from_str(raw) {
        Ok(Value::Object(c)) => Value::Object(c),
        _ => {
            return detail(
                StatusCode::BAD_REQUEST,
                "configuration must be a JSON object",
            );
        }
    };
    const KNOWN: &[&str] = &[
        "tier",
        "version",
        "page_ranges",
        "processing_options",
        "output_options",
        "processing_control",
        "disable_cache",
        "agentic_options",
        "input_options",
        "webhook_configurations",
        "crop_box",
        "client_name",
    ];
    if let Some(unknown) = config
        .as_object()
        .and_then(|c| c.keys().find(|k| !KNOWN.contains(&k.as_str())))
    {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "extra_forbidden", "loc": ["body", "configuration", unknown], "msg": "Extra inputs are not permitted" }]),
        );
    }
    let tier = config
        .get("tier")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !["fast", "cost_effective", "agentic", "agentic_plus"].contains(&tier) {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "enum", "loc": ["body", "configuration", "tier"], "msg": "Input should be 'fast', 'cost_effective', 'agentic' or 'agentic_plus'" }]),
        );
    }
    if config.get("version").and_then(Value::as_str).is_none() {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{ "type": "missing", "loc": ["body", "configuration", "version"], "msg": "Field required" }]),
        );
    }
    let max_pages = config
        .pointer("/page_ranges/max_pages")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    let tier = tier.to_owned();
    let id = start_job(&s, upload, true, tier, max_pages);
    let inner = s.lock();
    Json(v2_job(&id, &inner.jobs[&id])).into_response()
}

fn v2_status(job: &Job) -> (&'static str, Option<String>) {
    if Instant::now() < job.done_at {
        return ("PENDING", None);
    }
    match &job.outcome {
        Ok(_) => ("COMPLETED", None),
        Err((code, message)) => ("FAILED", Some(format!("{code}: {message}"))),
    }
}

fn v2_job(id: &str, job: &Job) -> Value {
    let (status, error) = v2_status(job);
    let created = job
        .created
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    json!({
        "id": id,
        "project_id": "00000000-0000-4000-8000-000000000001",
        "status": status,
        "tier": job.tier,
        "created_at": created,
        "updated_at": created,
        "error_message": error,
        "name": job.name,
    })
}

pub(super) async fn v2_get(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: axum::extract::RawQuery,
) -> Response {
    let expand: Vec<String> = query
        .0
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("expand="))
        .flat_map(|v| v.split(',').map(|x| x.replace("%2C", ",")))
        .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    {
        let mut inner = s.lock();
        if expand.is_empty() {
            inner.stats.parse_polls += 1;
        } else {
            inner.stats.parse_results += 1;
        }
    }
    if let Some(r) = llama_gate(&s, &headers, false).await {
        return r;
    }
    let inner = s.lock();
    let Some(job) = inner.jobs.get(&id).filter(|j| j.v2) else {
        return detail(StatusCode::NOT_FOUND, "Job not found");
    };
    let mut body = json!({ "job": v2_job(&id, job) });
    if let (Ok(sections), "COMPLETED") = (&job.outcome, v2_status(job).0) {
        let pages = page_list(sections);
        if expand.iter().any(|e| e == "markdown") {
            body["markdown"] = json!({ "pages": pages.iter().map(|(n, md)| json!({ "page_number": n, "markdown": md, "success": true })).collect::<Vec<_>>() });
        }
        if expand.iter().any(|e| e == "markdown_full") {
            body["markdown_full"] = Value::String(
                pages
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("\n\n"),
            );
        }
        if expand.iter().any(|e| e == "text") {
            body["text"] = json!({ "pages": pages.iter().map(|(n, md)| json!({ "page_number": n, "text": md })).collect::<Vec<_>>() });
        }
        if expand.iter().any(|e| e == "text_full") {
            body["text_full"] = Value::String(
                pages
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("\n\n"),
            );
        }
    }
    Json(body).into_response()
}

/// Sections as (page number from 1, Markdown).
fn page_list(sections: &[parsing::Section]) -> Vec<(u32, String)> {
    sections
        .iter()
        .enumerate()
        .map(|(i, s)| (s.page.unwrap_or(i as u32 + 1), s.markdown.clone()))
        .collect()
}

pub(super) async fn v1_upload(
    State(s): State<Shared>,
    headers: HeaderMap,
    form: Multipart,
) -> Response {
    let upload = match accept_upload(&s, &headers, form).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let max_pages = match upload
        .fields
        .get("max_pages")
        .map(|m| m.trim().parse::<usize>())
    {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return detail(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{ "type": "int_parsing", "loc": ["body", "max_pages"], "msg": "Input should be a valid integer" }]),
            );
        }
    };
    let id = start_job(&s, upload, false, String::new(), max_pages);
    Json(json!({ "id": id, "status": "PENDING" })).into_response()
}

fn v1_status(job: &Job) -> Value {
    if Instant::now() < job.done_at {
        return json!({ "status": "PENDING" });
    }
    match &job.outcome {
        Ok(_) => json!({ "status": "SUCCESS" }),
        Err((code, message)) => {
            json!({ "status": "ERROR", "error_code": code, "error_message": message })
        }
    }
}

pub(super) async fn v1_job(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    s.lock().stats.parse_polls += 1;
    if let Some(r) = llama_gate(&s, &headers, false).await {
        return r;
    }
    let inner = s.lock();
    let Some(job) = inner.jobs.get(&id).filter(|j| !j.v2) else {
        return detail(StatusCode::NOT_FOUND, "Job not found");
    };
    let mut body = v1_status(job);
    body["id"] = Value::String(id);
    Json(body).into_response()
}

pub(super) async fn v1_result(
    State(s): State<Shared>,
    Path((id, format)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    s.lock().stats.parse_results += 1;
    if let Some(r) = llama_gate(&s, &headers, false).await {
        return r;
    }
    let inner = s.lock();
    let Some(job) = inner.jobs.get(&id).filter(|j| !j.v2) else {
        return detail(StatusCode::NOT_FOUND, "Job not found");
    };
    let not_ready = || {
        detail(
            StatusCode::NOT_FOUND,
            "Result not found. Check job status to see if it has completed.",
        )
    };
    if Instant::now() < job.done_at {
        return not_ready();
    }
    let Ok(sections) = &job.outcome else {
        return not_ready();
    };
    let pages = page_list(sections);
    let metadata =
        json!({ "job_pages": pages.len(), "job_is_cache_hit": false, "credits_used": pages.len() });
    let joined = pages
        .iter()
        .map(|(_, m)| m.as_str())
        .collect::<Vec<_>>()
        .join("\n---\n");
    match format.as_str() {
        "markdown" => Json(json!({ "markdown": joined, "job_metadata": metadata })).into_response(),
        "text" => Json(json!({ "text": joined, "job_metadata": metadata })).into_response(),
        "json" => Json(json!({
            "pages": pages.iter().map(|(n, md)| json!({ "page": n, "text": md, "md": md, "items": [] })).collect::<Vec<_>>(),
            "job_metadata": metadata,
        }))
        .into_response(),
        _ => detail(StatusCode::NOT_FOUND, "Not Found"),
    }
}
