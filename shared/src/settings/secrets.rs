//! Values that are never printed: secrets, and the passwords inside connection URLs; and the redacted view of the
//! settings that an operator may print.

use serde::{Deserialize, Serialize};

use super::Settings;

/// A secret (key, token secret): never printed, never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// A connection URL (Redis or Postgres); its password is never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnectionUrl(pub String);

impl ConnectionUrl {
    /// The URL itself, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub(super) fn has_scheme(&self, schemes: &[&str]) -> bool {
        schemes.iter().any(|scheme| self.0.starts_with(scheme))
    }
}

impl std::fmt::Debug for ConnectionUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                write!(f, "{}://***{}", &self.0[..scheme], &self.0[at..])
            }
            _ => write!(f, "{}", self.0),
        }
    }
}

/// JSON pointers of the fields that hold a [`ConnectionUrl`].
const URL_FIELDS: &[&str] = &["/redis_url", "/database_url", "/database_admin_url"];

/// JSON pointers of the fields that hold a [`Secret`].
const SECRET_FIELDS: &[&str] = &[
    "/database_app_password",
    "/api/jwt_secret",
    "/embedding/openai/api_key",
    "/parsing/llamaparse/api_key",
    "/search/rerank/api_key",
];

impl Settings {
    /// The settings as JSON with every secret and every password in a URL replaced by `***`: what an operator
    /// may print to see what a process will run with (`producer settings`).
    pub fn redacted(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("settings serialize to JSON");
        for pointer in URL_FIELDS {
            if let Some(slot) = value.pointer_mut(pointer)
                && let Some(url) = slot.as_str().map(|u| ConnectionUrl(u.to_owned()))
            {
                *slot = format!("{url:?}").into();
            }
        }
        for pointer in SECRET_FIELDS {
            if let Some(slot) = value.pointer_mut(pointer)
                && slot.as_str().is_some_and(|s| !s.is_empty())
            {
                *slot = "***".into();
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redacted_settings_hide_every_secret_and_url_password_and_keep_the_rest() {
        let mut s = Settings {
            redis_url: ConnectionUrl("rediss://default:redis-pw@cache.example:6380/0".into()),
            database_url: ConnectionUrl("postgres://app:db-pw@db.example:5432/up".into()),
            database_admin_url: Some(ConnectionUrl(
                "postgres://owner:owner-pw@db.example/up".into(),
            )),
            database_app_password: Some(Secret("app-pw".into())),
            ..Settings::default()
        };
        s.api.jwt_secret = Secret("jwt-pw".into());
        s.embedding.openai.api_key = Secret("sk-pw".into());
        s.parsing.llamaparse.api_key = Secret("llx-pw".into());
        s.search.rerank.api_key = Secret("co-pw".into());
        let shown = s.redacted();
        let text = shown.to_string();
        for secret in [
            "redis-pw", "db-pw", "owner-pw", "app-pw", "jwt-pw", "sk-pw", "llx-pw", "co-pw",
        ] {
            assert!(!text.contains(secret), "{secret} shown in {text}");
        }
        assert_eq!(shown["redis_url"], "rediss://***@cache.example:6380/0");
        assert_eq!(shown["database_url"], "postgres://***@db.example:5432/up");
        assert_eq!(shown["api"]["jwt_secret"], "***");
        assert_eq!(shown["queue"]["max_deliveries"], 5);
        // Nothing set, nothing hidden: an empty key shows that it is missing.
        assert_eq!(
            Settings::default().redacted()["embedding"]["openai"]["api_key"],
            ""
        );
    }
}
