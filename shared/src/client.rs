//! A typed client of the producer's HTTP API, used by the `producer` CLI.

use std::{path::Path, time::Duration};

use serde::Deserialize;
use uuid::Uuid;

use crate::documents::{Document, Hit};

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's error code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The API could not be reached or answered nonsense.
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
}

/// The answer to an upload.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Uploaded {
    /// The document.
    pub document_id: Uuid,
    /// Its status.
    pub status: String,
    /// The same bytes were uploaded before.
    #[serde(default)]
    pub duplicate: bool,
}

/// The answer to a search.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SearchResults {
    /// Best first.
    pub results: Vec<Hit>,
    /// Server-side time.
    pub took_ms: f64,
    /// The model the query was embedded with.
    pub embedding_model: String,
}

/// A client bound to one API and one token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
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
        })
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => ClientError::Api {
                status,
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: "unknown".into(),
                message: text,
            },
        })
    }

    /// Uploads a file.
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
        bytes: Vec<u8>,
        metadata: Option<&serde_json::Value>,
    ) -> Result<Uploaded, ClientError> {
        let mut form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(filename.to_owned()),
        );
        if let Some(m) = metadata {
            form = form.text("metadata", m.to_string());
        }
        let resp = self
            .http
            .post(format!("{}/v1/documents", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// A document's status.
    pub async fn status(&self, id: Uuid) -> Result<Document, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/documents/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// Searches the caller's documents.
    pub async fn search(&self, query: &str, k: u32) -> Result<SearchResults, ClientError> {
        let resp = self
            .http
            .post(format!("{}/v1/search", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "query": query, "k": k }))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }
}
