//! Commands that prepare and check a deployment: `migrate`, `tenant-indexes`, `settings`, `openapi` and `token`.

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

/// Builds and drops the large tenants' own HNSW indexes once (`db::maintain_tenant_indexes`), as the owner (it
/// does not migrate: `producer migrate` does); prints the pass as JSON.
pub async fn tenant_indexes(settings: &Settings) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    if !upload_pipeline::db::can_migrate(settings)
        .await
        .context("Failed to reach the database")?
    {
        anyhow::bail!(
            "building indexes needs the database owner's credentials: set DATABASE_ADMIN_URL (database_url is the \
             app role's)"
        );
    }
    let pool = upload_pipeline::db::connect_owner(settings).context("Invalid database URL")?;
    let pass =
        upload_pipeline::db::maintain_tenant_indexes(&pool, settings.search.tenant_index_memory_mb)
            .await
            .context("Failed to maintain the tenants' indexes")?;
    pool.close().await;
    let Some(pass) = pass else {
        anyhow::bail!(
            "another process is maintaining the tenants' indexes; try again when it is done"
        );
    };
    println!("{}", serde_json::to_string_pretty(&pass)?);
    let failed = pass.changes.iter().filter(|c| c.error.is_some()).count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} index changes failed (see above)",
            pass.changes.len()
        );
    }
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
