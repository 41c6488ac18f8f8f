//! A LlamaParse (LlamaCloud) client, v2 (`/api/v2/parse`) or v1 (`/api/v1/parsing`), for PDF, DOCX and HTML.
//! Text and Markdown are Markdown already and go to the local parser.
//!
//! One parse is an upload, polls with a growing wait (`poll_interval`, `+poll_interval` each time, at most
//! `poll_interval_max`) until the job ends or `job_timeout` passes, then one read of the per-page Markdown, so page
//! numbers reach the chunks. Failures are classified: 401/403 a refused key (the provider is paused fleet-wide
//! until a probe upload succeeds, whichever call met it), 402 quota, 429 rate limit, 5xx and network trouble
//! transient, a job that ends in error permanent with the provider's reason.

use std::time::{Duration, Instant};

use reqwest::{StatusCode, multipart};
use serde_json::Value;

use super::{ParseFuture, ParseInput, Parser, ProviderError, http, local::LocalParser};
use crate::{
    parsing::{DocKind, Section},
    quota::{Budget, Limit, PauseReason, Quota},
    settings::{LlamaParseApi, LlamaParseSettings, Settings},
};

const PROVIDER: &str = "LlamaParse";

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct LlamaParse {
    http: reqwest::Client,
    base: String,
    api_key: String,
    api: LlamaParseApi,
    tier: String,
    version: String,
    max_pages: usize,
    poll_interval: Duration,
    poll_interval_max: Duration,
    job_timeout: Duration,
    local: LocalParser,
    budget: Option<Budget>,
}

enum JobState {
    Running,
    Done,
    Failed(ProviderError),
}

impl LlamaParse {
    /// A client for the configured region or base URL; `local` handles text and Markdown.
    pub fn new(
        settings: &LlamaParseSettings,
        max_pages: usize,
        local: LocalParser,
    ) -> Result<Self, ProviderError> {
        // Only the processes that parse need the key (the producer and the other stages never call LlamaParse),
        // so it is checked here rather than with the settings every process loads.
        if settings.api_key.expose().is_empty() {
            return Err(ProviderError::permanent(
                PROVIDER,
                "set LLAMA_CLOUD_API_KEY (parsing.llamaparse.api_key) to parse with LlamaParse",
            ));
        }
        Ok(Self {
            http: http::client(PROVIDER, settings.request_timeout)?,
            base: settings.url().to_owned(),
            api_key: settings.api_key.expose().to_owned(),
            api: settings.api_version,
            tier: settings.tier.clone(),
            version: settings.version.clone(),
            max_pages,
            poll_interval: settings.poll_interval,
            poll_interval_max: settings.poll_interval_max,
            job_timeout: settings.job_timeout,
            local,
            budget: None,
        })
    }

    /// A client whose uploads take their share of the fleet's upload window first, and whose pages count against
    /// the daily page budget.
    pub fn with_quota(settings: &Settings, quota: &Quota) -> Result<Self, ProviderError> {
        let mut me = Self::new(
            &settings.parsing.llamaparse,
            settings.pipeline.max_pages,
            LocalParser::new(&settings.pipeline),
        )?;
        let q = &settings.quota.llamaparse;
        let limits = (q.uploads > 0)
            .then_some(Limit {
                name: "uploads",
                limit: q.uploads as f64,
                window: q.window,
            })
            .into_iter()
            .collect();
        me.budget = Some(
            quota
                .budget(
                    "llamaparse",
                    &settings.parsing.llamaparse.tier,
                    &me.api_key,
                    limits,
                    settings.worker.concurrency.parse,
                )
                .with_request_timeout(settings.parsing.llamaparse.request_timeout),
        );
        Ok(me)
    }

    /// Uploads within the fleet's budget, settling it by the answer.
    async fn upload_within_budget(&self, input: &ParseInput) -> Result<String, ProviderError> {
        let Some(budget) = &self.budget else {
            return self.upload(input).await;
        };
        let permit = budget.acquire(&[("uploads", 1.0)]).await?;
        // The wait for the budget may have outlived the job's claim: the upload is paid, so a job another
        // consumer took over stops here.
        if crate::queue::current_claim_lost() {
            permit.release().await;
            return Err(ProviderError::transient(
                PROVIDER,
                "the job's claim was taken over by another consumer; stopping before the upload",
            ));
        }
        let uploaded = self.upload(input).await;
        match &uploaded {
            Ok(_) => budget.settle(permit, &[], &[], 0).await,
            Err(e) => budget.settle_error(permit, e).await,
        }
        uploaded
    }

    /// A refused key met by a poll or a result read pauses the provider as a refused upload does (its settling
    /// does that).
    async fn pause_if_refused<T>(
        &self,
        result: Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        if let (Err(ProviderError::Unauthorized { message, .. }), Some(budget)) =
            (&result, &self.budget)
        {
            budget.pause(PauseReason::Auth, message).await;
        }
        result
    }

    fn remote(kind: DocKind) -> bool {
        !matches!(kind, DocKind::Text | DocKind::Markdown)
    }

    /// Sends one request and reads its JSON answer, classifying every failure.
    async fn call(
        &self,
        operation: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<Value, ProviderError> {
        let started = Instant::now();
        let url = format!("{} {operation}", self.base);
        let result = async {
            let resp = req
                .bearer_auth(&self.api_key)
                .send()
                .await
                .map_err(|e| http::send_error(PROVIDER, &url, &e))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp
                .text()
                .await
                .map_err(|e| http::send_error(PROVIDER, &url, &e))?;
            if !status.is_success() {
                return Err(classify(status, &headers, &body));
            }
            serde_json::from_str::<Value>(&body).map_err(|e| {
                ProviderError::transient(PROVIDER, format!("unreadable answer to {operation}: {e}"))
            })
        }
        .await;
        super::observe("llamaparse", operation, started, &result);
        result
    }

    async fn upload(&self, input: &ParseInput) -> Result<String, ProviderError> {
        let file = multipart::Part::bytes(input.bytes.as_ref().clone())
            .file_name(input.filename.clone())
            .mime_str(input.kind.content_type())
            .map_err(|e| ProviderError::permanent(PROVIDER, e.to_string()))?;
        let form = multipart::Form::new().part("file", file);
        let (url, form) = match self.api {
            LlamaParseApi::V2 => {
                let configuration = serde_json::json!({
                    "tier": self.tier,
                    "version": self.version,
                    "page_ranges": { "max_pages": self.max_pages },
                });
                (
                    format!("{}/api/v2/parse/upload", self.base),
                    form.text("configuration", configuration.to_string()),
                )
            }
            LlamaParseApi::V1 => (
                format!("{}/api/v1/parsing/upload", self.base),
                form.text("max_pages", self.max_pages.to_string()),
            ),
        };
        let answer = self
            .call("upload", self.http.post(url).multipart(form))
            .await?;
        answer
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::transient(PROVIDER, "the upload answer has no job id"))
    }

    async fn state(&self, id: &str) -> Result<JobState, ProviderError> {
        let url = match self.api {
            LlamaParseApi::V2 => format!("{}/api/v2/parse/{id}", self.base),
            LlamaParseApi::V1 => format!("{}/api/v1/parsing/job/{id}", self.base),
        };
        let answer = self.call("poll", self.http.get(url)).await?;
        // v2 nests the job (`job.status`); v1 is flat.
        let job = answer
            .get("job")
            .filter(|j| j.is_object())
            .unwrap_or(&answer);
        let text = |k: &str| {
            job.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let status = text("status").to_ascii_uppercase();
        Ok(match status.as_str() {
            "COMPLETED" | "SUCCESS" => JobState::Done,
            "PENDING" | "RUNNING" | "QUEUED" | "" => JobState::Running,
            "CANCELLED" | "CANCELED" => JobState::Failed(ProviderError::permanent(
                PROVIDER,
                "LlamaParse cancelled the parse job",
            )),
            _ => {
                let (code, message) = (text("error_code"), text("error_message"));
                let reason = match (code.is_empty(), message.is_empty()) {
                    (false, false) => format!("{code}: {message}"),
                    (false, true) => code.clone(),
                    (true, false) => message,
                    (true, true) => format!("the job ended as {status}"),
                };
                let reason = format!("LlamaParse could not parse the file: {reason}");
                // A job that ran out of time at the provider may well pass on another try.
                JobState::Failed(if code.contains("EXPIRED") || code.contains("TIMEOUT") {
                    ProviderError::transient(PROVIDER, reason)
                } else {
                    ProviderError::permanent(PROVIDER, reason)
                })
            }
        })
    }

    async fn result(&self, id: &str) -> Result<Vec<Section>, ProviderError> {
        let (url, pages_at, page_key, text_key) = match self.api {
            LlamaParseApi::V2 => (
                format!("{}/api/v2/parse/{id}?expand=markdown", self.base),
                "/markdown/pages",
                "page_number",
                "markdown",
            ),
            LlamaParseApi::V1 => (
                format!("{}/api/v1/parsing/job/{id}/result/json", self.base),
                "/pages",
                "page",
                "md",
            ),
        };
        let answer = self.call("result", self.http.get(url)).await?;
        let mut sections = Vec::new();
        let mut failed = Vec::new();
        for page in answer
            .pointer(pages_at)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let number = page.get(page_key).and_then(Value::as_u64).map(|n| n as u32);
            if page.get("success").and_then(Value::as_bool) == Some(false) {
                let error = page
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                failed.push(format!("page {}: {error}", number.unwrap_or(0)));
                continue;
            }
            let markdown = page
                .get(text_key)
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !markdown.trim().is_empty() {
                sections.push(Section {
                    page: number,
                    markdown: markdown.trim().to_owned(),
                });
            }
        }
        let full = answer
            .get("markdown_full")
            .and_then(Value::as_str)
            .filter(|m| !m.trim().is_empty());
        if let (true, Some(full)) = (sections.is_empty(), full) {
            sections.push(Section {
                page: None,
                markdown: full.trim().to_owned(),
            });
        }
        if !failed.is_empty() {
            tracing::warn!(job = id, pages = ?failed, "LlamaParse could not parse some pages; they are left out");
        }
        if sections.is_empty() {
            return Err(ProviderError::permanent(
                PROVIDER,
                match failed.first() {
                    Some(first) => format!("LlamaParse could not parse any page ({first})"),
                    None => "LlamaParse found no text in the document".into(),
                },
            ));
        }
        Ok(sections)
    }

    async fn parse_remote(&self, input: &ParseInput) -> Result<Vec<Section>, ProviderError> {
        let started = Instant::now();
        let result = async {
            let id = self.upload_within_budget(input).await?;
            let deadline = started + self.job_timeout;
            let mut wait = self.poll_interval;
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait + self.poll_interval).min(self.poll_interval_max);
                let state = self.state(&id).await;
                match self.pause_if_refused(state).await? {
                    JobState::Done => break,
                    JobState::Failed(e) => return Err(e),
                    JobState::Running if Instant::now() >= deadline => {
                        return Err(ProviderError::transient(
                            PROVIDER,
                            format!(
                                "the parse job {id} did not finish within {} s",
                                self.job_timeout.as_secs()
                            ),
                        ));
                    }
                    JobState::Running => {}
                }
            }
            let read = self.result(&id).await;
            let sections = self.pause_if_refused(read).await?;
            if let Some(budget) = &self.budget {
                budget.add_spent(sections.len() as u64).await;
            }
            Ok(sections)
        }
        .await;
        super::observe("llamaparse", "job", started, &result);
        result
    }
}

/// The `detail` of a FastAPI error body (a string, or a list of validation errors), else the body itself.
fn detail(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v.get("detail") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => body.chars().take(300).collect(),
        },
        Err(_) => body.chars().take(300).collect(),
    }
}

fn classify(status: StatusCode, headers: &reqwest::header::HeaderMap, body: &str) -> ProviderError {
    let message = detail(body);
    match status.as_u16() {
        401 | 403 => {
            tracing::warn!(status = status.as_u16(), %message, "LlamaParse refused our key: check parsing.llamaparse.api_key and its region");
            ProviderError::Unauthorized {
                provider: PROVIDER,
                message: format!("HTTP {status}: {message}"),
            }
        }
        402 => ProviderError::QuotaExhausted {
            provider: PROVIDER,
            message,
        },
        429 => http::rate_limited(PROVIDER, headers, message),
        // 404 on a job we created: the provider lost it; the next attempt uploads again.
        404 | 408 | 409 | 425 | 500..=599 => {
            ProviderError::transient(PROVIDER, format!("HTTP {status}: {message}"))
        }
        _ => ProviderError::permanent(
            PROVIDER,
            format!("LlamaParse refused the file (HTTP {status}): {message}"),
        ),
    }
}

impl Parser for LlamaParse {
    fn key(&self, kind: DocKind) -> String {
        if !Self::remote(kind) {
            return self.local.key(kind);
        }
        let api = match self.api {
            LlamaParseApi::V2 => "v2",
            LlamaParseApi::V1 => "v1",
        };
        format!(
            "llamaparse:{api}:tier={}:version={}:max_pages={}",
            self.tier, self.version, self.max_pages
        )
    }

    fn cacheable(&self, kind: DocKind) -> bool {
        Self::remote(kind)
    }

    fn parse<'a>(&'a self, input: &'a ParseInput) -> ParseFuture<'a> {
        if Self::remote(input.kind) {
            Box::pin(self.parse_remote(input))
        } else {
            self.local.parse(input)
        }
    }
}
