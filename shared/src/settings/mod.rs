//! Typed, validated settings: the built-in defaults (`deploy/config.example.toml`), then an optional TOML file,
//! then the environment. Read once at start-up and passed down.

mod api;
mod chunking;
mod defaults;
mod embedding;
mod log;
// Only the test that keeps docs/configuration.md in step renders the table.
#[cfg(test)]
mod markdown;
mod parsing;
mod pipeline;
mod queue;
mod quota;
mod search;
mod secrets;
mod worker;

use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

pub use api::{ApiSettings, DEV_JWT_SECRET};
pub use chunking::ChunkingSettings;
pub use embedding::{
    ApiStyle, EmbedderKind, EmbeddingSettings, EncodingFormat, LocalModelSettings, OpenAiSettings,
};
pub use log::{LogFormat, LogSettings};
pub use parsing::{LlamaParseApi, LlamaParseSettings, ParserKind, ParsingSettings, Region};
pub use pipeline::PipelineSettings;
pub use queue::QueueSettings;
pub use quota::{LlamaParseQuota, OpenAiQuota, QuotaSettings};
pub use search::{RerankApi, RerankSettings, SearchSettings};
/// The name callers used before Redis and Postgres URLs shared one type.
pub use secrets::ConnectionUrl as RedisUrl;
pub use secrets::{ConnectionUrl, Secret};
pub use worker::{StageConcurrency, WorkerSettings};

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value has the wrong type or an unknown field was given.
    #[error("invalid settings: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value is out of its allowed range.
    #[error("invalid setting `{field}`: {reason}")]
    Invalid {
        /// The dotted field name, e.g. `queue.max_deliveries`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// All settings of a producer or worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Redis that carries the queues and the fleet-wide state (`REDIS_URL`).
    pub redis_url: ConnectionUrl,
    /// PostgreSQL with pgvector, the source of truth (`DATABASE_URL`). The API and the workers never connect as a
    /// role that bypasses row-level security: when this URL names one (a superuser, or a role with BYPASSRLS),
    /// their pools connect as `database_app_role` instead, on the same server and database.
    pub database_url: ConnectionUrl,
    /// Where migrations run (`DATABASE_ADMIN_URL`): a role that may create the schema, the roles and indexes.
    /// Unset: `database_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_admin_url: Option<ConnectionUrl>,
    /// The role the API and the workers use: LOGIN, no superuser, no BYPASSRLS (the migrations create it).
    pub database_app_role: String,
    /// Its password, when the server asks for one (`DATABASE_APP_PASSWORD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_app_password: Option<Secret>,
    /// The job queues.
    pub queue: QueueSettings,
    /// The producer's HTTP API.
    pub api: ApiSettings,
    /// How uploads become Markdown: the local parsers or LlamaParse.
    pub parsing: ParsingSettings,
    /// How chunks and queries become vectors: the local model, an OpenAI-compatible API, or hashing.
    pub embedding: EmbeddingSettings,
    /// How parsed documents are cut into chunks.
    pub chunking: ChunkingSettings,
    /// Keyword search, the fusion of hybrid search, and the reranker.
    pub search: SearchSettings,
    /// The fleet-wide provider budgets.
    pub quota: QuotaSettings,
    /// Limits and recovery of the document pipeline.
    pub pipeline: PipelineSettings,
    /// Worker processes.
    pub worker: WorkerSettings,
    /// Logging.
    pub log: LogSettings,
}

/// Environment variables that set one field each, applied after `UPLOAD_PIPELINE__<SECTION>__<FIELD>` (which
/// reaches any field) so that they win over it. Of two set for the same field, either may win: set one.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("REDIS_URL", "redis_url"),
    ("DATABASE_URL", "database_url"),
    ("DATABASE_ADMIN_URL", "database_admin_url"),
    ("DATABASE_APP_PASSWORD", "database_app_password"),
    ("JWT_SECRET", "api.jwt_secret"),
    ("OPENAI_API_KEY", "embedding.openai.api_key"),
    ("AZURE_OPENAI_API_KEY", "embedding.openai.api_key"),
    ("LLAMA_CLOUD_API_KEY", "parsing.llamaparse.api_key"),
    ("CO_API_KEY", "search.rerank.api_key"),
    ("COHERE_API_KEY", "search.rerank.api_key"),
    ("JINA_API_KEY", "search.rerank.api_key"),
    ("LOG_FORMAT", "log.format"),
    ("RUST_LOG", "log.filter"),
];

const REDIS_SCHEMES: &[&str] = &["redis://", "rediss://", "redis+unix://", "unix://"];
const POSTGRES_SCHEMES: &[&str] = &["postgres://", "postgresql://"];

impl Settings {
    /// Loads defaults, then `file` (TOML) if given, then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(SettingsError::Invalid {
                    field: "config file",
                    reason: format!("{} does not exist", file.display()),
                });
            }
            fig = fig.merge(Toml::file(file));
        }
        // The reranker's key variables are the chosen provider's only (CO_API_KEY is not sent to Jina).
        let style: RerankApi = fig
            .clone()
            .merge(
                Env::prefixed("UPLOAD_PIPELINE__")
                    .split("__")
                    .lowercase(true),
            )
            .extract_inner("search.rerank.api_style")
            .unwrap_or(RerankApi::Cohere);
        let aliases = Env::raw().filter_map(move |var| {
            ENV_ALIASES
                .iter()
                .find(|(name, path)| {
                    *name == var
                        && (*path != "search.rerank.api_key"
                            || style.key_variables().contains(name))
                })
                .map(|(_, path)| (*path).into())
        });
        let settings: Settings = fig
            .merge(
                Env::prefixed("UPLOAD_PIPELINE__")
                    .split("__")
                    .lowercase(true),
            )
            .merge(aliases)
            .extract()
            .map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            self.redis_url.has_scheme(REDIS_SCHEMES),
            "redis_url",
            "must start with redis://, rediss://, redis+unix:// or unix://",
        )?;
        ensure(
            self.database_url.has_scheme(POSTGRES_SCHEMES),
            "database_url",
            "must start with postgres:// or postgresql://",
        )?;
        ensure(
            self.database_admin_url
                .as_ref()
                .is_none_or(|url| url.has_scheme(POSTGRES_SCHEMES)),
            "database_admin_url",
            "must start with postgres:// or postgresql://",
        )?;
        let role = &self.database_app_role;
        ensure(
            !role.is_empty()
                && role
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database_app_role",
            "must be a role name of lowercase letters, digits and '_'",
        )?;
        self.api.validate()?;
        self.embedding.validate()?;
        self.parsing.validate()?;
        self.quota.validate()?;
        self.pipeline.validate()?;
        self.chunking.validate()?;
        self.search.validate()?;
        // A chunk the token budget can never grant within quota.max_wait would keep its document waiting for ever.
        if let Some((field, reason)) = crate::quota::oversized_request(self) {
            return Err(SettingsError::Invalid { field, reason });
        }
        self.queue.validate()?;
        self.worker.validate()
    }
}

/// `Ok` when `ok`, else the error that names `field`.
fn ensure(ok: bool, field: &'static str, reason: &str) -> Result<(), SettingsError> {
    if ok {
        return Ok(());
    }
    Err(SettingsError::Invalid {
        field,
        reason: reason.to_owned(),
    })
}

fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

#[cfg(test)]
// figment's Jail returns its own large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_file_then_the_environment_override_the_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "up.toml",
                "[queue]\nreclaim_after = \"10s\"\nmax_deliveries = 3\n[worker.concurrency]\nembed = 2\n",
            )?;
            jail.set_env("UPLOAD_PIPELINE__QUEUE__MAX_DELIVERIES", "7");
            jail.set_env("REDIS_URL", "redis://:hunter2@example:6380/2");
            jail.set_env("LOG_FORMAT", "json");
            let s = Settings::load(Some(Path::new("up.toml"))).expect("valid");
            assert_eq!(s.queue.reclaim_after, Duration::from_secs(10));
            assert_eq!(s.queue.max_deliveries, 7);
            assert_eq!(s.worker.concurrency.embed, 2);
            assert_eq!(s.worker.concurrency.parse, 4);
            assert_eq!(s.log.format, LogFormat::Json);
            assert_eq!(s.redis_url.expose(), "redis://:hunter2@example:6380/2");
            assert!(
                !format!("{s:?}").contains("hunter2"),
                "the password must not be printed"
            );
            Ok(())
        });
    }

    #[test]
    fn every_environment_alias_sets_its_field() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("DATABASE_URL", "postgres://app@db.example/up");
            jail.set_env("DATABASE_ADMIN_URL", "postgres://owner@db.example/up");
            jail.set_env("DATABASE_APP_PASSWORD", "app-pw");
            jail.set_env("JWT_SECRET", "a-secret-of-our-own");
            jail.set_env("AZURE_OPENAI_API_KEY", "azure-key");
            jail.set_env("RUST_LOG", "debug");
            jail.set_env("REDIS_URL", "redis://cache.example");
            jail.set_env("LOG_FORMAT", "text");
            let s = Settings::load(None).expect("valid");
            assert_eq!(s.database_url.expose(), "postgres://app@db.example/up");
            assert_eq!(
                s.database_admin_url.map(|u| u.expose().to_owned()),
                Some("postgres://owner@db.example/up".to_owned())
            );
            assert_eq!(s.database_app_password.unwrap().expose(), "app-pw");
            assert_eq!(s.api.jwt_secret.expose(), "a-secret-of-our-own");
            assert_eq!(s.embedding.openai.api_key.expose(), "azure-key");
            assert_eq!(s.log.filter, "debug");
            assert_eq!(s.redis_url.expose(), "redis://cache.example");
            Ok(())
        });
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("UPLOAD_PIPELINE__QUEUE__MAX_DELIVERIES", "0");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("queue.max_deliveries"), "{err}");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__MAX_DELIVERIES", "5");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__RECLAIM_AFTER", "soon");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("queue.reclaim_after"), "{err}");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__RECLAIM_AFTER", "30s");
            jail.set_env("UPLOAD_PIPELINE__QUEUE__NO_SUCH_FIELD", "1");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("no_such_field"), "{err}");
            Ok(())
        });
    }

    /// The field named by the error of the default settings changed by `break_it`.
    fn field_named(break_it: impl FnOnce(&mut Settings)) -> &'static str {
        let mut s = Settings::default();
        break_it(&mut s);
        match s.validate() {
            Err(SettingsError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_rule_names_the_one_field_to_change() {
        assert_eq!(
            field_named(|s| s.api.max_upload_bytes = 0),
            "api.max_upload_bytes"
        );
        assert_eq!(
            field_named(|s| s.api.max_search_k = 101),
            "api.max_search_k"
        );
        assert_eq!(
            field_named(|s| s.embedding.model.clear()),
            "embedding.model"
        );
        assert_eq!(
            field_named(|s| s.embedding.dimensions = 4001),
            "embedding.dimensions"
        );
        assert_eq!(
            field_named(|s| s.search.text_config = "english; drop".into()),
            "search.text_config"
        );
        assert_eq!(
            field_named(|s| s.search.timeout = Duration::ZERO),
            "search.timeout"
        );
        assert_eq!(
            field_named(|s| s.search.candidates = 0),
            "search.candidates"
        );
        assert_eq!(field_named(|s| s.search.rrf_k = 0), "search.rrf_k");
        assert_eq!(
            field_named(|s| s.search.vector_weight = f64::NAN),
            "search.vector_weight"
        );
        assert_eq!(
            field_named(|s| s.search.keyword_weight = -1.0),
            "search.keyword_weight"
        );
        assert_eq!(
            field_named(|s| s.search.identifier_boost = 0.5),
            "search.identifier_boost"
        );
        assert_eq!(
            field_named(|s| s.search.tenant_index_interval = Duration::from_millis(500)),
            "search.tenant_index_interval"
        );
        assert_eq!(
            field_named(|s| s.search.tenant_index_memory_mb = 32),
            "search.tenant_index_memory_mb"
        );
        assert_eq!(
            field_named(|s| {
                s.search.vector_weight = 0.0;
                s.search.keyword_weight = 0.0;
            }),
            "search.keyword_weight"
        );
        assert_eq!(
            field_named(|s| s.search.rerank.enabled = true),
            "search.rerank.model"
        );
        assert_eq!(
            field_named(|s| s.search.rerank.base_url = "api.cohere.com".into()),
            "search.rerank.base_url"
        );
        assert_eq!(
            field_named(|s| s.search.rerank.candidates = 101),
            "search.rerank.candidates"
        );
        assert_eq!(
            field_named(|s| s.search.rerank.candidates = 0),
            "search.rerank.candidates"
        );
        assert_eq!(
            field_named(|s| s.search.rerank.timeout = Duration::ZERO),
            "search.rerank.timeout"
        );
        assert_eq!(
            field_named(|s| s.search.rerank.max_wait = Duration::from_secs(11)),
            "search.rerank.max_wait"
        );
        assert_eq!(
            field_named(|s| s.embedding.openai.max_inputs = 0),
            "embedding.openai.max_inputs"
        );
        assert_eq!(
            field_named(|s| s.embedding.openai.max_request_tokens = 100),
            "embedding.openai.max_request_tokens"
        );
        assert_eq!(
            field_named(|s| s.embedding.local.batch_size = 0),
            "embedding.local.batch_size"
        );
        assert_eq!(
            field_named(|s| s.parsing.llamaparse.poll_interval = Duration::from_secs(2)),
            "parsing.llamaparse.poll_interval"
        );
        assert_eq!(
            field_named(|s| s.parsing.llamaparse.job_timeout = Duration::from_secs(1)),
            "parsing.llamaparse.poll_interval_max"
        );
        assert_eq!(
            field_named(|s| s.quota.llamaparse.window = Duration::ZERO),
            "quota.llamaparse.window"
        );
        assert_eq!(
            field_named(|s| s.quota.openai.usd_per_million_tokens = f64::NAN),
            "quota.openai.usd_per_million_tokens"
        );
        assert_eq!(
            field_named(|s| s.chunking.overlap_tokens = 512),
            "chunking.overlap_tokens"
        );
        assert_eq!(
            field_named(|s| s.chunking.max_chunks = 0),
            "chunking.max_chunks"
        );
        assert_eq!(
            field_named(|s| s.worker.concurrency.embed = 0),
            "worker.concurrency.embed"
        );
    }

    #[test]
    fn provider_keys_come_from_their_variables_and_are_never_printed() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OPENAI_API_KEY", "sk-very-secret-openai");
            jail.set_env("LLAMA_CLOUD_API_KEY", "llx-very-secret-llama");
            jail.set_env("UPLOAD_PIPELINE__PARSING__PARSER", "llamaparse");
            let s = Settings::load(None).expect("valid");
            assert_eq!(s.embedding.openai.api_key.expose(), "sk-very-secret-openai");
            assert_eq!(
                s.parsing.llamaparse.api_key.expose(),
                "llx-very-secret-llama"
            );
            let printed = format!("{s:?} {s:#?}");
            assert!(!printed.contains("very-secret"), "{printed}");
            jail.set_env("LLAMA_CLOUD_API_KEY", "");
            // Only a process that parses needs the key: the producer and the other stages load these settings,
            // and the parser refuses to start without it.
            let s = Settings::load(None).expect("valid without the key");
            let Err(err) = crate::providers::parser(&s, None) else {
                panic!("a LlamaParse parser without a key");
            };
            assert!(err.to_string().contains("LLAMA_CLOUD_API_KEY"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_reranker_is_off_by_default_and_its_key_comes_from_cohere_or_jina_variables() {
        let r = Settings::default().search.rerank;
        assert!(!r.enabled && !r.configured(), "{r:?}");
        assert_eq!((r.api_style, r.candidates), (RerankApi::Cohere, 50));
        for var in ["CO_API_KEY", "COHERE_API_KEY", "JINA_API_KEY"] {
            figment::Jail::expect_with(|jail| {
                jail.clear_env();
                jail.set_env(var, "very-secret-rerank-key");
                jail.set_env("UPLOAD_PIPELINE__SEARCH__RERANK__ENABLED", "true");
                jail.set_env("UPLOAD_PIPELINE__SEARCH__RERANK__MODEL", "rerank-v3.5");
                let style = if var == "JINA_API_KEY" {
                    RerankApi::Jina
                } else {
                    RerankApi::Cohere
                };
                let other = if style == RerankApi::Jina {
                    "cohere"
                } else {
                    "jina"
                };
                // Another provider's variable is not this one's key, and that provider needs one.
                jail.set_env("UPLOAD_PIPELINE__SEARCH__RERANK__API_STYLE", other);
                let err = Settings::load(None).unwrap_err().to_string();
                assert!(err.contains("search.rerank.api_key"), "{err}");
                jail.set_env("UPLOAD_PIPELINE__SEARCH__RERANK__API_STYLE", "tei");
                assert_eq!(
                    Settings::load(None)
                        .expect("valid")
                        .search
                        .rerank
                        .api_key
                        .expose(),
                    ""
                );
                jail.set_env("UPLOAD_PIPELINE__SEARCH__RERANK__API_STYLE", style.as_str());
                let s = Settings::load(None).expect("valid");
                assert_eq!(s.search.rerank.api_key.expose(), "very-secret-rerank-key");
                assert_eq!(s.search.rerank.api_style, style);
                assert!(s.search.rerank.enabled && s.search.rerank.configured());
                let printed = format!("{s:?} {}", s.redacted());
                assert!(!printed.contains("very-secret"), "{printed}");
                jail.set_env("UPLOAD_PIPELINE__SEARCH__RERANK__API_STYLE", "voyage");
                let err = Settings::load(None).unwrap_err().to_string();
                assert!(
                    err.to_lowercase().contains("search.rerank.api_style"),
                    "{err}"
                );
                Ok(())
            });
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/up.toml"))).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }
}
