//! `[api]`: the producer's HTTP API, its tokens and its limits.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{Secret, SettingsError, ensure};

/// The JWT secret used when none is configured: accepted only while the API listens on a loopback address.
pub const DEV_JWT_SECRET: &str = "upload-pipeline-development-secret-do-not-use-in-production";

/// Settings of the producer's HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Where `producer serve` listens.
    pub listen: SocketAddr,
    /// HS256 secret of the bearer tokens (`JWT_SECRET`); the built-in development secret only works on loopback.
    pub jwt_secret: Secret,
    /// Largest upload, in bytes; larger ones get 413 while they stream in.
    pub max_upload_bytes: u64,
    /// Largest `k` of a search.
    pub max_search_k: u32,
    /// A JWKS file (JSON Web Key Set) whose public keys verify RS256/PS256/ES256 tokens (Auth0, Supabase
    /// asymmetric keys), beside HS256 with `jwt_secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<std::path::PathBuf>,
    /// Required `iss` of tokens, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of tokens, when set (Supabase: `authenticated`; Auth0: the API identifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// Dotted path of the boolean claim that grants operator rights (dead letters, quota).
    pub admin_claim: String,
    /// Uploads a user may make per minute, fleet-wide (0: no limit); past it, 429 with Retry-After.
    pub uploads_per_minute: u32,
    /// Uploads a user may make at once above that rate.
    pub upload_burst: u32,
}

impl ApiSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        ensure(
            !self.admin_claim.is_empty(),
            "api.admin_claim",
            "must name a claim",
        )?;
        ensure(
            self.uploads_per_minute == 0 || self.upload_burst > 0,
            "api.upload_burst",
            "must be at least 1 when api.uploads_per_minute is set",
        )?;
        let secret = self.jwt_secret.expose();
        ensure(
            secret.len() >= 16,
            "api.jwt_secret",
            "must be at least 16 characters",
        )?;
        ensure(
            secret != DEV_JWT_SECRET || self.listen.ip().is_loopback(),
            "api.jwt_secret",
            "set a secret of your own (JWT_SECRET) before listening beyond loopback (api.listen)",
        )?;
        ensure(
            self.max_upload_bytes > 0,
            "api.max_upload_bytes",
            "must be above 0",
        )?;
        ensure(
            (1..=100).contains(&self.max_search_k),
            "api.max_search_k",
            "must be between 1 and 100",
        )
    }
}
