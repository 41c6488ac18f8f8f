//! Commands that prepare and check a deployment: `migrate`, `settings`, `openapi` and `token`.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use upload_pipeline::{Settings, auth::Auth};
use uuid::Uuid;

/// Migrates the database, registers the embedding model's index and applies the text-search configuration, with
/// every chunk's keywords brought up to date in it.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    upload_pipeline::db::migrate(settings)
        .await
        .context("Failed to migrate")?;
    println!(
        "database migrated; embedding model {} ({} dimensions) registered; every chunk's keywords in text-search \
         configuration {}",
        settings.embedding.model, settings.embedding.dimensions, settings.search.text_config
    );
    Ok(())
}

/// Prints the settings as JSON with secrets hidden, checked again with `listen` when given.
pub fn show_settings(mut settings: Settings, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(listen) = listen {
        settings.api.listen = listen;
        settings.validate().context("Invalid settings")?;
    }
    println!("{}", serde_json::to_string_pretty(&settings.redacted())?);
    Ok(())
}

/// Prints the API's OpenAPI document.
pub fn openapi() -> anyhow::Result<()> {
    print!("{}", upload_pipeline::api::openapi_json());
    Ok(())
}

/// Prints a bearer token for `user`, valid for `ttl`, with operator rights when `admin`.
pub fn token(settings: &Settings, user: Uuid, ttl: Duration, admin: bool) -> anyhow::Result<()> {
    println!(
        "{}",
        Auth::hs256(settings.api.jwt_secret.expose()).issue(user, ttl, admin)
    );
    Ok(())
}
