//! The "Settings" table of `docs/configuration.md`, from `deploy/config.example.toml` (`make settings-doc`). figment
//! sorts a table's keys, so order and comments come from the lines; the tests check them against figment's reading.

use std::fmt::Write;

use figment::{
    Figment,
    providers::{Format, Toml},
    value::Value,
};

use super::ENV_ALIASES;

/// One field of the defaults file.
pub(crate) struct Field {
    /// Dotted path, e.g. `queue.reclaim_after`.
    pub(crate) path: String,
    /// The value as written after `=`.
    pub(crate) raw: String,
    /// Shown commented out (`# key = value`): an optional field, unset by default.
    pub(crate) optional: bool,
    /// The comment above it, joined into one line.
    pub(crate) meaning: String,
}

/// The fields of `toml` in file order. A comment describes the fields under it up to the next comment, blank line
/// or table header (`retry_base` and `retry_max` share one); a comment line that is itself `key = value` is an
/// optional field.
pub(crate) fn fields(toml: &str) -> Vec<Field> {
    let (mut out, mut table, mut comment) = (Vec::new(), String::new(), Vec::<&str>::new());
    let mut after_field = false;
    for line in toml.lines().map(str::trim) {
        if line.is_empty() {
            (comment, after_field) = (Vec::new(), false);
        } else if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            (table, comment, after_field) = (format!("{}.", header.trim()), Vec::new(), false);
        } else {
            let (text, optional) = match line.strip_prefix('#') {
                Some(text) => (text.trim(), true),
                None => (line, false),
            };
            if let Some((key, raw)) = key_value(text) {
                out.push(Field {
                    path: format!("{table}{key}"),
                    raw: raw.to_owned(),
                    optional,
                    meaning: comment.join(" "),
                });
                after_field = true;
            } else if optional {
                if after_field {
                    (comment, after_field) = (Vec::new(), false);
                }
                comment.push(text);
            }
        }
    }
    out
}

/// `(key, value)` when `text` is one TOML `key = value` with a bare key.
fn key_value(text: &str) -> Option<(&str, &str)> {
    let (key, raw) = text.split_once('=')?;
    let (key, raw) = (key.trim(), raw.trim());
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (bare && parsed(text, key).is_some()).then_some((key, raw))
}

/// The value of `key` in the TOML `text`, when it parses.
fn parsed(text: &str, key: &str) -> Option<Value> {
    Figment::from(Toml::string(text)).find_value(key).ok()
}

/// The table (header, separator, a row per field), from the TOML text of the defaults file.
pub(crate) fn settings_table(toml: &str) -> String {
    let mut out =
        String::from("| setting | environment | default | meaning |\n|---|---|---|---|\n");
    for field in fields(toml) {
        let mut env: Vec<String> = ENV_ALIASES
            .iter()
            .filter(|(_, path)| *path == field.path)
            .map(|(var, _)| format!("`{var}`"))
            .collect();
        env.push(format!("`UPLOAD_PIPELINE__{}`", field.path.replace('.', "__")).to_uppercase());
        let default = match parsed(&format!("v = {}", field.raw), "v") {
            _ if field.optional => "unset".to_owned(),
            Some(Value::String(_, s)) if s.is_empty() => "empty".to_owned(),
            Some(Value::String(_, s)) => format!("`{s}`"),
            _ => format!("`{}`", field.raw),
        };
        let cells = [
            format!("`{}`", field.path),
            env.join(", "),
            default,
            field.meaning,
        ];
        let _ = writeln!(
            out,
            "| {} |",
            cells.map(|c| c.replace('|', "\\|")).join(" | ")
        );
    }
    out
}

/// `page` with the text between the markers replaced by `table`; `None` when a marker is missing.
pub(crate) fn with_table(page: &str, table: &str) -> Option<String> {
    const BEGIN: &str = "<!-- settings-table:begin -->\n";
    let start = page.find(BEGIN)? + BEGIN.len();
    let end = start + page[start..].find("<!-- settings-table:end -->")?;
    Some(format!("{}{table}{}", &page[..start], &page[end..]))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::*;
    use crate::settings::{Settings, defaults::DEFAULT_TOML};

    #[test]
    fn the_settings_table_of_the_configuration_page_is_generated_from_the_defaults_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let page = std::fs::read_to_string(&path).unwrap();
        let want = with_table(&page, &settings_table(DEFAULT_TOML))
            .expect("docs/configuration.md lacks the settings-table:begin/end markers");
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).expect("write docs/configuration.md");
        }
        let have = std::fs::read_to_string(&path).unwrap();
        assert!(
            have == want,
            "docs/configuration.md's settings table is out of step with deploy/config.example.toml: run `make settings-doc`"
        );
    }

    #[test]
    fn every_field_has_a_meaning_and_every_alias_a_row() {
        for field in fields(DEFAULT_TOML) {
            assert!(
                !field.meaning.is_empty(),
                "{} has no comment in deploy/config.example.toml",
                field.path
            );
        }
        let table = settings_table(DEFAULT_TOML);
        for (var, field) in ENV_ALIASES {
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| `{field}` |")));
            assert!(
                row.is_some_and(|r| r.contains(&format!("`{var}`"))),
                "the settings table has no row saying {var} sets {field}: is {field} in deploy/config.example.toml?"
            );
        }
        let row = "| `parsing.llamaparse.base_url` | `UPLOAD_PIPELINE__PARSING__LLAMAPARSE__BASE_URL` | empty | Overrides";
        assert!(table.contains(row), "{table}");
    }

    /// Every path of a value in `dict`, dotted.
    fn leaves(prefix: &str, dict: &figment::value::Dict, out: &mut BTreeSet<String>) {
        for (key, value) in dict {
            match value {
                Value::Dict(_, inner) => leaves(&format!("{prefix}{key}."), inner, out),
                _ => _ = out.insert(format!("{prefix}{key}")),
            }
        }
    }

    /// The lines are read as figment reads the file: the same fields and values, and the fields shown commented
    /// out are settings (every settings struct denies unknown fields).
    #[test]
    fn the_fields_and_values_are_those_figment_reads() {
        let fields = fields(DEFAULT_TOML);
        let mut uncommented = DEFAULT_TOML.to_owned();
        let mut optional = Vec::new();
        for field in fields.iter().filter(|f| f.optional) {
            let line = format!("{} = {}", field.path.rsplit('.').next().unwrap(), field.raw);
            uncommented = uncommented.replace(&format!("# {line}"), &line);
            optional.push(field.path.as_str());
        }
        let names = "database_app_password database_admin_url api.jwks_file api.jwt_issuer api.jwt_audience";
        assert_eq!(optional.join(" "), names);
        let file = Figment::from(Toml::string(&uncommented));
        file.extract::<Settings>().unwrap();
        let mut want = BTreeSet::new();
        leaves("", &file.extract().unwrap(), &mut want);
        let paths: BTreeSet<String> = fields.iter().map(|f| f.path.clone()).collect();
        assert_eq!(paths, want);
        for field in &fields {
            let value = parsed(&format!("v = {}", field.raw), "v");
            assert_eq!(value, file.find_value(&field.path).ok(), "{}", field.path);
        }
    }
}
