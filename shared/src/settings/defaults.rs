//! The built-in defaults: `deploy/config.example.toml`, compiled in, is the one place they are written, so the
//! documented example and the binaries cannot disagree.

use std::sync::LazyLock;

use figment::{
    Figment,
    providers::{Format, Toml},
};

use super::*;

/// The commented example config; its values are the defaults. The Dockerfile's build stage copies it for this.
pub(super) const DEFAULT_TOML: &str = include_str!("../../../deploy/config.example.toml");

// No settings struct has `#[serde(default)]`: the file must name every field, and parsing it cannot ask for the
// defaults it is building.
static DEFAULTS: LazyLock<Settings> = LazyLock::new(|| {
    Figment::from(Toml::string(DEFAULT_TOML))
        .extract()
        .expect("deploy/config.example.toml holds every setting")
});

macro_rules! defaults_from_the_file {
    ($($ty:ty => $($field:ident).*;)*) => {
        $(impl Default for $ty {
            fn default() -> Self {
                (*DEFAULTS)$(.$field)*.clone()
            }
        })*
    };
}

defaults_from_the_file! {
    Settings => ;
    QueueSettings => queue;
    ApiSettings => api;
    ParsingSettings => parsing;
    LlamaParseSettings => parsing.llamaparse;
    EmbeddingSettings => embedding;
    OpenAiSettings => embedding.openai;
    LocalModelSettings => embedding.local;
    ChunkingSettings => chunking;
    SearchSettings => search;
    RerankSettings => search.rerank;
    QuotaSettings => quota;
    OpenAiQuota => quota.openai;
    LlamaParseQuota => quota.llamaparse;
    PipelineSettings => pipeline;
    WorkerSettings => worker;
    StageConcurrency => worker.concurrency;
    LogSettings => log;
}

#[cfg(test)]
// figment's Jail returns its own large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn the_example_config_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config.example.toml");
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            assert_eq!(
                Settings::load(Some(&path)).expect("the example parses"),
                Settings::default()
            );
            Ok(())
        });
    }

    #[test]
    fn the_defaults_are_the_example_file_itself_and_it_names_every_field() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config.example.toml");
        assert_eq!(DEFAULT_TOML, std::fs::read_to_string(path).unwrap());
        let without = DEFAULT_TOML.replace("max_deliveries = 5\n", "");
        assert_ne!(without, DEFAULT_TOML);
        let err = Figment::from(Toml::string(&without))
            .extract::<Settings>()
            .unwrap_err();
        assert!(err.to_string().contains("max_deliveries"), "{err}");
    }

    #[test]
    fn the_configuration_page_shows_the_defaults_file_and_every_environment_alias() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let page = std::fs::read_to_string(path).unwrap();
        assert!(
            page.contains(&format!("```toml\n{DEFAULT_TOML}```")),
            "docs/configuration.md's Defaults block differs from deploy/config.example.toml: copy the file in"
        );
        for (var, field) in super::super::ENV_ALIASES {
            let row = page
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&format!("`{var}`")));
            assert!(
                row.is_some_and(|r| r.contains(&format!("`{field}`"))),
                "docs/configuration.md has no row saying {var} sets {field}"
            );
        }
    }
}
