//! A typed Rust client of the producer's HTTP API, for services that push uploads and for the `producer` CLI.
//!
//! ```no_run
//! # async fn example() -> Result<(), upload_pipeline::client::ClientError> {
//! use std::time::Duration;
//! use upload_pipeline::client::Client;
//!
//! let client = Client::new("http://127.0.0.1:8080", "<bearer token>")?;
//! let uploaded = client.upload_file("report.pdf".as_ref(), None).await?;
//! let doc = client.wait_until_ready(uploaded.document_id, Duration::from_secs(120)).await?;
//! let hits = client.search("incident timeline", 5).await?;
//!
//! use upload_pipeline::client::{ComparisonOp, Filter, SearchMode, SearchRequest};
//! let cited = client
//!     .search_with(
//!         &SearchRequest::new("ERR_TLS_CERT_ALTNAME_INVALID")
//!             .mode(SearchMode::Keyword)
//!             .filters(Filter::compare(ComparisonOp::Eq, "team", "ops")),
//!     )
//!     .await?;
//! let reranked = client.search_with(&SearchRequest::new("incident timeline").rerank(true)).await?;
//! let best = reranked.results.first().and_then(|h| h.rerank_score);
//! # Ok(()) }
//! ```
//!
//! Calls answered 429 or 503 are retried (three times, honouring `Retry-After`), except streamed uploads, whose
//! body cannot be sent twice.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use futures::Stream;
use uuid::Uuid;

use crate::api::ErrorBody;
pub use crate::api::{
    ComparisonOp, CompoundOp, Document, DocumentPage, DocumentStatus, ErrorCode, Filter,
    FilterValue, Hit, RetryResponse as Retried, Scalar, SearchMode, SearchRequest,
    SearchResponse as SearchResults, StageStatus, UploadResponse as Uploaded,
};

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("{status} {code:?}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's error code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The API answered something that is not its documented error shape.
    #[error("unexpected answer {status}: {body}")]
    Unexpected {
        /// HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The API could not be reached, or its answer could not be read.
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// A local file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The document failed while being processed.
    #[error("document {id} failed: {error}")]
    DocumentFailed {
        /// The document.
        id: Uuid,
        /// Its error.
        error: String,
    },
    /// The document was not ready in time.
    #[error("document {id} is still {status} after {waited:?}")]
    Timeout {
        /// The document.
        id: Uuid,
        /// Its last status.
        status: String,
        /// How long we waited.
        waited: Duration,
    },
}

impl ClientError {
    /// The API's error code, when the API answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Filters of [`Client::list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only documents in this status.
    pub status: Option<DocumentStatus>,
    /// Page size, 1 to 100.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A client bound to one API and one token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    retries: u32,
}

/// How long to wait before retrying an answer: its `Retry-After` (seconds, at most a minute), else backoff.
fn retry_delay(resp: &reqwest::Response, attempt: u32) -> Duration {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s >= 0.0 && *s <= 60.0)
        .map(Duration::from_secs_f64)
        .unwrap_or_else(|| Duration::from_millis(500 << attempt.min(4)))
}

impl Client {
    /// A client of `base_url` (e.g. `http://127.0.0.1:8080`) sending `token`.
    pub fn new(base_url: &str, token: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            retries: 3,
        })
    }

    /// Sets how often 429 and 503 answers are retried (default 3).
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends the request `build` makes, retrying 429 and 503; returns a successful answer or the API's error.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        retry: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let mut attempt = 0;
        loop {
            let resp = build().bearer_auth(&self.token).send().await?;
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                return Ok(resp);
            }
            if retry && (status == 429 || status == 503) && attempt < self.retries {
                tokio::time::sleep(retry_delay(&resp, attempt)).await;
                attempt += 1;
                continue;
            }
            let text = resp.text().await.unwrap_or_default();
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(b) => ClientError::Api {
                    status,
                    code: b.error.code,
                    message: b.error.message,
                },
                Err(_) => ClientError::Unexpected {
                    status,
                    body: text.chars().take(500).collect(),
                },
            });
        }
    }

    fn form(
        filename: &str,
        part: reqwest::multipart::Part,
        metadata: Option<&serde_json::Value>,
    ) -> reqwest::multipart::Form {
        let mut form =
            reqwest::multipart::Form::new().part("file", part.file_name(filename.to_owned()));
        if let Some(m) = metadata {
            form = form.text("metadata", m.to_string());
        }
        form
    }

    /// Uploads a file; its name decides how it is read.
    pub async fn upload_file(
        &self,
        path: &Path,
        metadata: Option<&serde_json::Value>,
    ) -> Result<Uploaded, ClientError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| ClientError::Io {
                path: path.display().to_string(),
                source,
            })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "upload".into());
        self.upload_bytes(&name, bytes, metadata).await
    }

    /// Uploads bytes under a file name.
    pub async fn upload_bytes(
        &self,
        filename: &str,
        bytes: impl Into<Bytes>,
        metadata: Option<&serde_json::Value>,
    ) -> Result<Uploaded, ClientError> {
        let bytes: Bytes = bytes.into();
        let resp = self
            .send(
                || {
                    self.http
                        .post(self.url("/v1/documents"))
                        .multipart(Self::form(
                            filename,
                            reqwest::multipart::Part::stream(bytes.clone()),
                            metadata,
                        ))
                },
                true,
            )
            .await?;
        Ok(resp.json().await?)
    }

    /// Uploads a stream of bytes (not retried: a stream cannot be sent twice).
    pub async fn upload_stream<S>(
        &self,
        filename: &str,
        stream: S,
        metadata: Option<&serde_json::Value>,
    ) -> Result<Uploaded, ClientError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let body = std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(stream)));
        let resp = self
            .send(
                || {
                    let part = reqwest::multipart::Part::stream(
                        body.lock()
                            .expect("body")
                            .take()
                            .unwrap_or_else(|| reqwest::Body::from(Vec::new())),
                    );
                    self.http
                        .post(self.url("/v1/documents"))
                        .multipart(Self::form(filename, part, metadata))
                },
                false,
            )
            .await?;
        Ok(resp.json().await?)
    }

    /// A document's status.
    pub async fn status(&self, id: Uuid) -> Result<Document, ClientError> {
        Ok(self
            .send(
                || self.http.get(self.url(&format!("/v1/documents/{id}"))),
                true,
            )
            .await?
            .json()
            .await?)
    }

    /// Waits until the document is ready, polling its status; fails when it failed or `timeout` passed.
    pub async fn wait_until_ready(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> Result<Document, ClientError> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let doc = self.status(id).await?;
            match doc.status.as_str() {
                "ready" => return Ok(doc),
                "failed" => {
                    return Err(ClientError::DocumentFailed {
                        id,
                        error: doc.error.unwrap_or_default(),
                    });
                }
                _ if started.elapsed() >= timeout => {
                    return Err(ClientError::Timeout {
                        id,
                        status: doc.status,
                        waited: started.elapsed(),
                    });
                }
                _ => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Queues a failed document again from the stage that gave up, keeping what the earlier stages produced.
    /// A document that is not failed answers [`ErrorCode::NotFailed`] (409), another user's
    /// [`ErrorCode::NotFound`].
    pub async fn retry(&self, id: Uuid) -> Result<Retried, ClientError> {
        Ok(self
            .send(
                || {
                    self.http
                        .post(self.url(&format!("/v1/documents/{id}/retry")))
                },
                true,
            )
            .await?
            .json()
            .await?)
    }

    /// A page of the caller's documents, newest first.
    pub async fn list(&self, query: &ListQuery) -> Result<DocumentPage, ClientError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(s) = query.status {
            params.push((
                "status",
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            ));
        }
        if let Some(l) = query.limit {
            params.push(("limit", l.to_string()));
        }
        if let Some(c) = &query.cursor {
            params.push(("cursor", c.clone()));
        }
        Ok(self
            .send(
                || self.http.get(self.url("/v1/documents")).query(&params),
                true,
            )
            .await?
            .json()
            .await?)
    }

    /// Deletes a document with its chunks.
    pub async fn delete(&self, id: Uuid) -> Result<(), ClientError> {
        self.send(
            || self.http.delete(self.url(&format!("/v1/documents/{id}"))),
            true,
        )
        .await?;
        Ok(())
    }

    /// Searches the caller's ready documents: `k` hits of a hybrid search, no filter.
    pub async fn search(&self, query: &str, k: u32) -> Result<SearchResults, ClientError> {
        self.search_with(&SearchRequest::new(query).k(k)).await
    }

    /// Searches the caller's ready documents with a mode, filters and reranking. A filter the API refuses answers
    /// [`ErrorCode::InvalidFilter`] (422), its message naming the part at fault; `rerank(true)` where the server
    /// has no reranker answers [`ErrorCode::RerankNotConfigured`] (422). A reranked answer has `reranked` true
    /// and each hit's `rerank_score`; when the server's reranker fails, `reranked` is false and the hits are in the
    /// mode's order.
    pub async fn search_with(&self, request: &SearchRequest) -> Result<SearchResults, ClientError> {
        Ok(self
            .send(
                || self.http.post(self.url("/v1/search")).json(request),
                true,
            )
            .await?
            .json()
            .await?)
    }
}
