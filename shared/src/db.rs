//! PostgreSQL: the pool, migrations, and transactions scoped to one user.
//!
//! Every read and write of user data goes through [`begin_as`]: the transaction takes the role
//! `upload_pipeline_app` (no BYPASSRLS) and sets `upload_pipeline.user_id`, so row-level security shows it only
//! that user's rows, whatever the query says. Keyword search's text configuration and the backfill of the chunks'
//! keywords are in `db/keywords.rs`, large tenants' own HNSW indexes in `db/tenant_indexes.rs` (both re-exported
//! here).

mod keywords;
mod tenant_indexes;

use std::{future::Future, time::Duration};

use sqlx::{
    ConnectOptions, PgPool, Postgres, Transaction,
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

pub use self::keywords::{
    BACKFILL_BATCH, backfill_keywords, backfill_keywords_unless_busy,
    keyword_search_uses_its_index, set_text_search_config, text_search_config_matches,
};
pub use self::tenant_indexes::{
    TENANT_INDEX_LOCK, TenantIndexChange, TenantIndexPass, maintain_tenant_indexes,
    maintain_tenant_indexes_every,
};
use crate::settings::Settings;

/// The migrations in `migrations/`, compiled in.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The query or connection failed.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl DbError {
    /// Whether trying again later can help (connection lost, serialization failure, deadlock, too many clients).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Sqlx(sqlx::Error::Database(e)) => {
                matches!(
                    e.code().as_deref(),
                    Some("40001" | "40P01" | "53300" | "57P01" | "57P03" | "08006" | "08001")
                )
            }
            Self::Sqlx(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_),
            ) => true,
            Self::Sqlx(_) | Self::Migrate(_) => false,
        }
    }
}

fn options(url: &str) -> Result<PgConnectOptions, DbError> {
    let opts: PgConnectOptions = url.parse()?;
    Ok(opts.log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2)))
}

/// Whether the role `opts` logs in as bypasses row-level security (a superuser, or BYPASSRLS).
async fn bypasses_rls(opts: &PgConnectOptions) -> Result<bool, DbError> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(opts).await?;
    let bypass: bool = sqlx::query_scalar(
        "SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(bypass)
}

/// A pool of the owner's (`database_admin_url`, else `database_url`), connecting when first used: for the
/// maintenance that must run as the owner without migrating (`producer tenant-indexes`).
pub fn connect_owner(settings: &Settings) -> Result<PgPool, DbError> {
    let url = settings
        .database_admin_url
        .as_ref()
        .unwrap_or(&settings.database_url)
        .expose();
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options(url)?))
}

/// Connects the pool of the API and the workers: `database_url`, as `database_app_role` when that URL names a
/// role that bypasses row-level security, so no request or stage ever runs with it.
pub async fn connect(settings: &Settings, max_connections: u32) -> Result<PgPool, DbError> {
    let mut opts = options(settings.database_url.expose())?;
    if bypasses_rls(&opts).await? {
        tracing::info!(
            role = %settings.database_app_role,
            "database_url names a role that bypasses row-level security; connecting as the app role instead"
        );
        opts = opts.username(&settings.database_app_role);
        if let Some(password) = &settings.database_app_password {
            opts = opts.password(password.expose());
        }
    }
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await?)
}

/// Whether these settings hold credentials that may migrate: `database_admin_url`, or a `database_url` that names
/// the owner (a role that bypasses row-level security). A fleet given only the app role's URL (the Kubernetes
/// overlays) leaves migrations to `producer migrate`, run before it with the owner's credentials.
pub async fn can_migrate(settings: &Settings) -> Result<bool, DbError> {
    if settings.database_admin_url.is_some() {
        return Ok(true);
    }
    let url = settings.database_url.expose();
    // A database that does not exist yet can only come from migrating (which creates it, or says why not).
    if !Postgres::database_exists(url).await? {
        return Ok(true);
    }
    bypasses_rls(&options(url)?).await
}

/// Creates the database if missing, applies the migrations, registers the configured embedding model (its HNSW
/// index), stores the keyword search's text configuration (`search.text_config`) and brings every chunk's keywords
/// up to date ([`backfill_keywords`], waiting for another process that is at it). Idempotent; run by `producer
/// migrate` and by the tests, and the only place the text configuration is applied. `producer serve`, when its
/// credentials may migrate ([`can_migrate`]), runs [`migrate_schema`] and the backfill in the background instead,
/// so that it starts serving meanwhile.
pub async fn migrate(settings: &Settings) -> Result<PgPool, DbError> {
    let pool = migrate_schema(settings).await?;
    set_text_search_config(&pool, &settings.search.text_config).await?;
    backfill_keywords(&pool).await?;
    Ok(pool)
}

/// [`migrate`] but the text configuration and the keyword backfill: the pool it returns (as the migrating role) is
/// for [`backfill_keywords`].
pub async fn migrate_schema(settings: &Settings) -> Result<PgPool, DbError> {
    let url = settings
        .database_admin_url
        .as_ref()
        .unwrap_or(&settings.database_url)
        .expose();
    if !Postgres::database_exists(url).await? {
        tracing::info!("Creating the database");
        if let Err(e) = Postgres::create_database(url).await {
            // Another process may have created it meanwhile.
            if !Postgres::database_exists(url).await? {
                return Err(e.into());
            }
        }
    }
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options(url)?)
        .await?;
    // The role belongs to the whole cluster, while the migrator's advisory lock only serialises migrations of one
    // database: two databases migrating at once (a fresh machine, parallel tests) would both try to create it.
    // The app role logs in (no superuser, no BYPASSRLS); older installations created it NOLOGIN. Changing it only
    // when needed keeps concurrent migrations from updating the same catalogue row; a rare collision is retried.
    let ensure_role = "DO $$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'upload_pipeline_app') THEN \
             CREATE ROLE upload_pipeline_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE; \
           ELSIF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'upload_pipeline_app' \
                         AND (NOT rolcanlogin OR rolsuper OR rolbypassrls)) THEN \
             ALTER ROLE upload_pipeline_app LOGIN NOSUPERUSER NOBYPASSRLS; \
           END IF; \
         EXCEPTION WHEN duplicate_object OR unique_violation OR insufficient_privilege THEN NULL; \
         END $$";
    // XX000, "tuple concurrently updated": another migration changed the role at the same moment.
    retry_transient(
        "Creating the app role met another migration",
        &["XX000"],
        5,
        Duration::from_millis(50),
        || sqlx::raw_sql(ensure_role).execute(&pool),
    )
    .await?;
    if let Some(password) = &settings.database_app_password {
        set_app_password(url, &settings.database_app_role, password.expose()).await?;
    }
    // One migrator at a time across the fleet: the advisory lock serialises concurrent start-ups.
    MIGRATOR.run(&pool).await?;
    register_model(
        &pool,
        &settings.embedding.model,
        settings.embedding.dimensions,
    )
    .await?;
    keyword_search_uses_its_index(&pool).await?;
    Ok(pool)
}

/// Gives the app role the password the fleet logs in with (`DATABASE_APP_PASSWORD`), so a server that asks for
/// passwords over the network (any managed Postgres, the pgvector image) lets the API and the workers in. The
/// statement is built by the server (`format` with `%I` and `%L`), so neither value is ever spliced into SQL here,
/// and runs on a connection of its own that never logs its statements (the password is in this one).
async fn set_app_password(url: &str, role: &str, password: &str) -> Result<(), DbError> {
    use sqlx::ConnectOptions;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options(url)?.disable_statement_logging())
        .await?;
    let statement: Option<String> = sqlx::query_scalar(
        "SELECT format('ALTER ROLE %I PASSWORD %L', rolname, $2::text) \
         FROM pg_catalog.pg_roles WHERE rolname = $1",
    )
    .bind(role)
    .bind(password)
    .fetch_optional(&pool)
    .await?;
    let Some(statement) = statement else {
        // A role of the operator's own that does not exist yet: connecting will say so.
        pool.close().await;
        return Ok(());
    };
    // Another migration may set it at the same moment.
    let set = retry_transient(
        "Setting the app role's password met another migration",
        &["XX000"],
        5,
        Duration::from_millis(50),
        || sqlx::raw_sql(&statement).execute(&pool),
    )
    .await;
    pool.close().await;
    set?;
    Ok(())
}

/// Runs `attempt` until it succeeds or fails for good. A database error whose SQLSTATE is in `transient` (a lost
/// deadlock, a lock not granted in time, a catalogue row updated concurrently) is tried again, `tries` times in
/// all, waiting `pause` times the failures so far, with a warning that starts with `what`.
async fn retry_transient<T, Fut>(
    what: &str,
    transient: &[&str],
    tries: u32,
    pause: Duration,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, sqlx::Error>
where
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut failures = 0;
    loop {
        match attempt().await {
            Err(sqlx::Error::Database(e))
                if failures + 1 < tries
                    && e.code()
                        .is_some_and(|code| transient.contains(&code.as_ref())) =>
            {
                failures += 1;
                tracing::warn!(error = %e, failures, "{what}; trying again");
                tokio::time::sleep(pause * failures).await;
            }
            outcome => return outcome,
        }
    }
}

/// Registers an embedding model and creates its HNSW index; returns the index name.
pub async fn register_model(
    pool: &PgPool,
    model: &str,
    dimensions: u32,
) -> Result<String, DbError> {
    Ok(
        sqlx::query_scalar("SELECT upload_pipeline.register_embedding_model($1, $2)")
            .bind(model)
            .bind(dimensions as i32)
            .fetch_one(pool)
            .await?,
    )
}

/// Begins a transaction that sees and changes only `user_id`'s rows.
pub async fn begin_as(
    pool: &PgPool,
    user_id: Uuid,
) -> Result<Transaction<'static, Postgres>, DbError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL ROLE upload_pipeline_app")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('upload_pipeline.user_id', $1, true)")
        .bind(user_id.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
