//! `[parsing]`: which parser turns uploads into Markdown, and the LlamaParse client.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Secret, SettingsError, ensure, is_http_url};

/// Which parser turns uploads into Markdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParserKind {
    /// The built-in parsers (text, Markdown, HTML, PDF text layer, DOCX), in-process.
    Local,
    /// LlamaParse (LlamaCloud) for PDF, DOCX and HTML; text and Markdown stay local, being Markdown already.
    Llamaparse,
}

/// Settings of the parse stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParsingSettings {
    /// `local` or `llamaparse`.
    pub parser: ParserKind,
    /// The LlamaParse client.
    pub llamaparse: LlamaParseSettings,
}

/// LlamaParse API generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlamaParseApi {
    /// `/api/v2/parse` (current).
    V2,
    /// `/api/v1/parsing` (older, still served).
    V1,
}

/// LlamaCloud region; keys work only in their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    /// `https://api.cloud.llamaindex.ai`.
    Na,
    /// `https://api.cloud.eu.llamaindex.ai`.
    Eu,
}

/// The LlamaParse client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaParseSettings {
    /// `v2` or `v1`.
    pub api_version: LlamaParseApi,
    /// `na` or `eu`: picks the base URL when `base_url` is empty.
    pub region: Region,
    /// Overrides the region's base URL (a proxy, or the fake server in tests).
    pub base_url: String,
    /// `llx-...` key (`LLAMA_CLOUD_API_KEY`).
    pub api_key: Secret,
    /// v2 tier: `fast`, `cost_effective`, `agentic` or `agentic_plus` (v1 maps it to a parse mode).
    pub tier: String,
    /// v2 `version`: `latest` or a date.
    pub version: String,
    /// Timeout of one HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First wait before polling a job; each further wait grows by this much.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest wait between two polls.
    #[serde(with = "humantime_serde")]
    pub poll_interval_max: Duration,
    /// Longest a parse job may take at LlamaParse before the attempt is given up (and retried).
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
}

const TIERS: [&str; 4] = ["fast", "cost_effective", "agentic", "agentic_plus"];

impl ParsingSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        self.llamaparse.validate()
    }
}

impl LlamaParseSettings {
    /// The base URL in use: `base_url`, or the region's.
    pub fn url(&self) -> &str {
        if !self.base_url.is_empty() {
            return self.base_url.trim_end_matches('/');
        }
        match self.region {
            Region::Na => "https://api.cloud.llamaindex.ai",
            Region::Eu => "https://api.cloud.eu.llamaindex.ai",
        }
    }

    fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            self.base_url.is_empty() || is_http_url(&self.base_url),
            "parsing.llamaparse.base_url",
            "must be an http(s) URL",
        )?;
        ensure(
            TIERS.contains(&self.tier.as_str()),
            "parsing.llamaparse.tier",
            "must be fast, cost_effective, agentic or agentic_plus",
        )?;
        ensure(
            !self.poll_interval.is_zero(),
            "parsing.llamaparse.poll_interval",
            "must be above zero",
        )?;
        ensure(
            self.poll_interval <= self.poll_interval_max,
            "parsing.llamaparse.poll_interval",
            "must be at most parsing.llamaparse.poll_interval_max",
        )?;
        ensure(
            self.poll_interval_max <= self.job_timeout,
            "parsing.llamaparse.poll_interval_max",
            "must be at most parsing.llamaparse.job_timeout",
        )?;
        ensure(
            !self.request_timeout.is_zero(),
            "parsing.llamaparse.request_timeout",
            "must be above zero",
        )
    }
}
