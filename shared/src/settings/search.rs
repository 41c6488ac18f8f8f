//! `[search]`: keyword search, how its results are fused with the vector search's, and the optional reranker.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Secret, SettingsError, ensure, is_http_url};

/// Keyword search and the fusion of hybrid search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// The Postgres text-search configuration chunks and queries are read with (`english`, `simple`, `german`, ...):
    /// its stemming and stop words. Applied by `producer migrate` only (`producer serve` warns when it differs from
    /// the database's); after a change the chunks' keywords are recomputed in batches (see `db::backfill_keywords`).
    pub text_config: String,
    /// Longest time one search may spend in Postgres (its transaction's `statement_timeout`); past it the API
    /// answers 504 `search_timeout`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Hits each list (vector, keyword) contributes to a hybrid search before fusion, and at least `k`.
    pub candidates: u32,
    /// The `k` of reciprocal rank fusion: a hit at rank `r` of a list scores `weight / (rrf_k + r)`.
    pub rrf_k: u32,
    /// The weight of the vector list in the fusion.
    pub vector_weight: f64,
    /// The weight of the keyword list in the fusion.
    pub keyword_weight: f64,
    /// How many times `keyword_weight` the keyword list weighs for an identifier-like query (every query of at most
    /// 4 words, and one of 5 to 8 words with an identifier among them: `_`, `--`, quotes, `40P01`, `pg_dump()`,
    /// camelCase, upper case), whose keyword list is ranked by BM25 with estimated statistics (word counts capped at
    /// 1,000 chunks), the chunks holding every word first, then those holding some; not when every word of the query
    /// is in more than 1,000 of the user's chunks (the list is then `ts_rank_cd`'s, at `keyword_weight`); 1 to 20
    /// (1: the same weight). Sentences and questions of at most 16 terms get the same list at `keyword_weight`;
    /// longer ones the list ranked by `ts_rank_cd`, every word required.
    pub identifier_boost: f64,
    /// How often `producer serve` (when it holds the owner's credentials) gives each tenant with more chunks of a
    /// model than `upload_pipeline.exact_search_chunks()` (5,000; up to 64, largest first) an HNSW index of its own, which
    /// its searches walk instead of the model's graph of every tenant's, and drops those of tenants under half
    /// that; 0s: never (then `producer tenant-indexes`, run as the owner, does it once). 0s or 1s to 1d.
    #[serde(with = "humantime_serde")]
    pub tenant_index_interval: Duration,
    /// `maintenance_work_mem` of those builds, in MiB, 64 to 65536: an HNSW graph that does not fit is built far
    /// more slowly (about 2 kB a chunk at 384 dimensions).
    pub tenant_index_memory_mb: u32,
    /// The reranker the fused hits may go through.
    pub rerank: RerankSettings,
}

/// Which `/rerank` protocol the reranker speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RerankApi {
    /// Cohere: `POST {base_url}/v2/rerank` `{model, query, documents, top_n}`.
    Cohere,
    /// Jina AI: `POST {base_url}/v1/rerank` `{model, query, documents, top_n}`.
    Jina,
    /// Hugging Face text-embeddings-inference: `POST {base_url}/rerank` `{query, texts}` (it serves one model).
    Tei,
}

impl RerankApi {
    /// Its name in settings, metrics (the `provider` label) and the fleet's quota keys.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cohere => "cohere",
            Self::Jina => "jina",
            Self::Tei => "tei",
        }
    }

    /// The environment variables that may hold this provider's key (`ENV_ALIASES` of `search.rerank.api_key`):
    /// a Cohere key is never sent to Jina, nor either to a text-embeddings-inference server.
    pub const fn key_variables(self) -> &'static [&'static str] {
        match self {
            Self::Cohere => &["CO_API_KEY", "COHERE_API_KEY"],
            Self::Jina => &["JINA_API_KEY"],
            Self::Tei => &[],
        }
    }
}

/// The reranker: a cross-encoder that reorders a search's best fused hits by their relevance to the query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankSettings {
    /// Whether searches are reranked when the request does not say (its `rerank` field); needs `model`.
    pub enabled: bool,
    /// `cohere`, `jina` or `tei`.
    pub api_style: RerankApi,
    /// The server, without the protocol's path (`https://api.cohere.com`, `https://api.jina.ai`, a TEI server).
    pub base_url: String,
    /// The bearer key (`CO_API_KEY`, `COHERE_API_KEY` or `JINA_API_KEY`); empty for servers without auth.
    pub api_key: Secret,
    /// The model; empty: no reranker (a request asking for one is refused). TEI serves one model and is not sent
    /// it: there it names the budget and the logs only.
    pub model: String,
    /// How many of the best fused hits (and at least `k`) are sent to be reranked, 1 to 100.
    pub candidates: u32,
    /// Timeout of one request to the reranker.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Requests per minute the reranker allows this key, shared by the fleet through Redis; 0: no limit.
    pub requests_per_minute: u64,
    /// Longest a search waits for its share of that budget (or a cool-down after a 429) before it answers in
    /// fused order, unreranked.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl RerankSettings {
    /// Whether a reranker is configured (a model named), so that a search may ask for it.
    pub fn configured(&self) -> bool {
        !self.model.is_empty()
    }

    fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            !self.enabled || self.configured(),
            "search.rerank.model",
            "name the reranker's model when search.rerank.enabled is true",
        )?;
        ensure(
            is_http_url(&self.base_url) && reqwest::Url::parse(&self.base_url).is_ok(),
            "search.rerank.base_url",
            "must be an http(s) URL",
        )?;
        if self.configured()
            && self.api_key.expose().is_empty()
            && let [first, rest @ ..] = self.api_style.key_variables()
        {
            let others: String = rest.iter().map(|v| format!(" or {v}")).collect();
            return Err(SettingsError::Invalid {
                field: "search.rerank.api_key",
                reason: format!(
                    "{} needs a key: set {first}{others} (or search.rerank.api_style = \"tei\" for a server \
                     without auth)",
                    self.api_style.as_str()
                ),
            });
        }
        ensure(
            (1..=100).contains(&self.candidates),
            "search.rerank.candidates",
            "must be between 1 and 100 (the most hits one search returns)",
        )?;
        ensure(
            (Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.timeout),
            "search.rerank.timeout",
            "must be between 10ms and 1m",
        )?;
        ensure(
            self.max_wait <= Duration::from_secs(10),
            "search.rerank.max_wait",
            "must be at most 10s (a search waits for it)",
        )
    }
}

impl SearchSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            is_text_config_name(&self.text_config),
            "search.text_config",
            "must name a text-search configuration: letters, digits and '_', optionally schema-qualified, at most 63 \
             characters each",
        )?;
        ensure(
            (Duration::from_millis(10)..=Duration::from_secs(600)).contains(&self.timeout),
            "search.timeout",
            "must be between 10ms and 10m",
        )?;
        ensure(
            (1..=1000).contains(&self.candidates),
            "search.candidates",
            "must be between 1 and 1000",
        )?;
        ensure(
            (1..=1000).contains(&self.rrf_k),
            "search.rrf_k",
            "must be between 1 and 1000",
        )?;
        ensure(
            (0.0..=100.0).contains(&self.vector_weight),
            "search.vector_weight",
            "must be between 0 and 100",
        )?;
        ensure(
            (0.0..=100.0).contains(&self.keyword_weight),
            "search.keyword_weight",
            "must be between 0 and 100",
        )?;
        ensure(
            (1.0..=20.0).contains(&self.identifier_boost),
            "search.identifier_boost",
            "must be between 1 and 20",
        )?;
        ensure(
            self.tenant_index_interval.is_zero()
                || (Duration::from_secs(1)..=Duration::from_secs(86_400))
                    .contains(&self.tenant_index_interval),
            "search.tenant_index_interval",
            "must be 0s (never) or between 1s and 1d",
        )?;
        ensure(
            (64..=65_536).contains(&self.tenant_index_memory_mb),
            "search.tenant_index_memory_mb",
            "must be between 64 and 65536",
        )?;
        ensure(
            self.vector_weight + self.keyword_weight > 0.0,
            "search.keyword_weight",
            "search.vector_weight and search.keyword_weight must not both be 0",
        )?;
        self.rerank.validate()
    }
}

/// `english` or `pg_catalog.english`: what a `regconfig` names, without quoting.
fn is_text_config_name(name: &str) -> bool {
    let mut parts = name.split('.');
    let ok = |part: &str| {
        (1..=63).contains(&part.len())
            && part.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let first = parts.next().is_some_and(ok);
    let second = parts.next().is_none_or(ok);
    first && second && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_config_names_are_plain_or_schema_qualified_identifiers() {
        for good in ["english", "simple", "pg_catalog.german", "my_config2"] {
            assert!(is_text_config_name(good), "{good}");
        }
        for bad in [
            "",
            "English",
            "a.b.c",
            "english;drop",
            "2english",
            ".english",
        ] {
            assert!(!is_text_config_name(bad), "{bad}");
        }
    }
}
