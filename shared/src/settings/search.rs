//! `[search]`: keyword search and how its results are fused with the vector search's.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{SettingsError, ensure};

/// Keyword search and the fusion of hybrid search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// The Postgres text-search configuration chunks and queries are read with (`english`, `simple`, `german`, ...):
    /// its stemming and stop words. Applied by `producer migrate` and at start-up; after a change the chunks' keyword
    /// index is recomputed in batches (see `db::backfill_keywords`).
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
            self.vector_weight + self.keyword_weight > 0.0,
            "search.keyword_weight",
            "search.vector_weight and search.keyword_weight must not both be 0",
        )
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
