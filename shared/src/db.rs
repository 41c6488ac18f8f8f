//! PostgreSQL: the pool, migrations, and transactions scoped to one user.
//!
//! Every read and write of user data goes through [`begin_as`]: the transaction takes the role
//! `upload_pipeline_app` (no BYPASSRLS) and sets `upload_pipeline.user_id`, so row-level security shows it only
//! that user's rows, whatever the query says.

use std::time::{Duration, Instant};

use sqlx::{
    ConnectOptions, PgPool, Postgres, Transaction,
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

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
/// index), stores the keyword search's text configuration (`search.text_config`) and brings every chunk's keyword
/// index up to date ([`backfill_keywords`]). Idempotent; run by `producer migrate` and by the tests. `producer
/// serve`, when its credentials may migrate ([`can_migrate`]), runs [`migrate_schema`] and the backfill in the
/// background instead, so that it starts serving meanwhile.
pub async fn migrate(settings: &Settings) -> Result<PgPool, DbError> {
    let pool = migrate_schema(settings).await?;
    backfill_keywords(&pool).await?;
    Ok(pool)
}

/// [`migrate`] but the keyword backfill: the pool it returns (as the migrating role) is for [`backfill_keywords`].
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
    for attempt in 1.. {
        match sqlx::raw_sql(ensure_role).execute(&pool).await {
            Ok(_) => break,
            // "tuple concurrently updated": another migration changed the role at the same moment.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("XX000") && attempt < 5 =>
            {
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
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
    set_text_search_config(&pool, &settings.search.text_config).await?;
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
    for attempt in 1.. {
        match sqlx::raw_sql(&statement).execute(&pool).await {
            Ok(_) => break,
            // Another migration set it at the same moment.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("XX000") && attempt < 5 =>
            {
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => {
                pool.close().await;
                return Err(e.into());
            }
        }
    }
    pool.close().await;
    Ok(())
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

/// Stores the text-search configuration of keyword search (`search.text_config`); returns whether it changed. It
/// recomputes nothing: [`backfill_keywords`] does, in batches. A change waits for the chunk writes under way (at
/// most 10 s; tried three times).
pub async fn set_text_search_config(pool: &PgPool, config: &str) -> Result<bool, DbError> {
    for attempt in 1.. {
        let changed =
            sqlx::query_scalar("SELECT upload_pipeline.set_text_search_config($1::regconfig)")
                .bind(config)
                .fetch_one(pool)
                .await;
        match changed {
            Ok(changed) => {
                if changed {
                    tracing::info!(
                        config,
                        "The text-search configuration changed; the chunks' keyword index will be recomputed"
                    );
                }
                return Ok(changed);
            }
            // lock_not_available: chunk writes held the table past the lock timeout.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55P03") && attempt < 3 =>
            {
                tracing::warn!(error = %e, "Waiting for chunk writes to change the text-search configuration");
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// Chunks per transaction of [`backfill_keywords`]: a chunk write waits for at most one batch.
pub const BACKFILL_BATCH: i32 = 2000;

/// The key of the session advisory lock that lets one process at a time run [`backfill_keywords`].
const BACKFILL_LOCK: i64 = 0x7570_5f6b_7762_6631; // "up_kwbf1"

/// Brings every chunk's keyword index (`content_tsv`) to the configured text-search configuration: after the
/// migration that added it (existing chunks start without one, and keyword search skips them until then) and after
/// `search.text_config` changes. Walks the chunks in id order, [`BACKFILL_BATCH`] per transaction
/// (`upload_pipeline.backfill_content_tsv`), recomputing those in another configuration or none, and logs its
/// progress; when the walk completes in the configuration it started with, marks the index up to date, so later
/// calls return at once. One process at a time (an advisory lock): another that finds it taken returns at once.
/// Returns the chunks recomputed.
pub async fn backfill_keywords(pool: &PgPool) -> Result<u64, DbError> {
    let mut conn = pool.acquire().await?;
    let due: bool = sqlx::query_scalar(
        "SELECT indexed_config IS DISTINCT FROM config FROM upload_pipeline.text_search",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !due {
        return Ok(0);
    }
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(BACKFILL_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        tracing::info!("Another process is bringing the keyword index up to date");
        return Ok(0);
    }
    let walked = backfill_passes(&mut conn).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(BACKFILL_LOCK)
        .execute(&mut *conn)
        .await;
    let recomputed = walked?;
    unlocked?;
    Ok(recomputed)
}

/// The walks of [`backfill_keywords`], until one completes in the configuration still in force.
async fn backfill_passes(conn: &mut sqlx::PgConnection) -> Result<u64, DbError> {
    let mut recomputed = 0u64;
    loop {
        let (config, due, estimate): (String, bool, f32) = sqlx::query_as(
            "SELECT t.config::text, t.indexed_config IS DISTINCT FROM t.config, \
               (SELECT greatest(c.reltuples, 0) FROM pg_catalog.pg_class c \
                WHERE c.oid = 'upload_pipeline.document_chunks'::regclass) \
             FROM upload_pipeline.text_search t",
        )
        .fetch_one(&mut *conn)
        .await?;
        if !due {
            return Ok(recomputed);
        }
        tracing::info!(
            config,
            chunks = estimate as u64,
            batch = BACKFILL_BATCH,
            "Computing the keyword index of the chunks written before it existed or in another configuration"
        );
        let started = Instant::now();
        let mut logged = Instant::now();
        let (mut after, mut walked) = (None::<Uuid>, 0u64);
        loop {
            let (last, done): (Option<Uuid>, i32) = backfill_batch(conn, after).await?;
            recomputed += done as u64;
            let Some(last) = last else { break };
            after = Some(last);
            walked += BACKFILL_BATCH as u64;
            if logged.elapsed() >= Duration::from_secs(10) {
                logged = Instant::now();
                tracing::info!(
                    walked,
                    of = estimate as u64,
                    recomputed,
                    "Keyword index backfill in progress"
                );
            }
        }
        // Complete unless the configuration changed meanwhile (then the next walk brings the rest to it).
        let marked = sqlx::query(
            "UPDATE upload_pipeline.text_search SET indexed_config = config WHERE config = $1::regconfig",
        )
        .bind(&config)
        .execute(&mut *conn)
        .await?;
        tracing::info!(
            config,
            recomputed,
            seconds = started.elapsed().as_secs(),
            complete = marked.rows_affected() == 1,
            "Keyword index backfill walked every chunk"
        );
    }
}

/// One batch of [`backfill_keywords`], tried again when it lost a deadlock or waited too long for a lock.
async fn backfill_batch(
    conn: &mut sqlx::PgConnection,
    after: Option<Uuid>,
) -> Result<(Option<Uuid>, i32), DbError> {
    for attempt in 1u64.. {
        let batch = sqlx::query_as(
            "SELECT last_id, recomputed FROM upload_pipeline.backfill_content_tsv($1, $2)",
        )
        .bind(after)
        .bind(BACKFILL_BATCH)
        .fetch_one(&mut *conn)
        .await;
        match batch {
            Ok(batch) => return Ok(batch),
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("40P01" | "40001" | "55P03"))
                    && attempt < 10 =>
            {
                tracing::warn!(error = %e, attempt, "Keyword index backfill: trying the batch again");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// Whether keyword search can use its full-text index: `keyword_candidates` runs as its owner, who must bypass
/// row-level security (a superuser or BYPASSRLS; the migrating role normally is). Otherwise it still returns only
/// the caller's chunks, but Postgres may not use the index under the policy, and every keyword search reads all of
/// the caller's chunks: logged as a warning.
pub async fn keyword_search_uses_its_index(pool: &PgPool) -> Result<bool, DbError> {
    let (owner, bypass): (String, bool) = sqlx::query_as(
        "SELECT r.rolname::text, r.rolsuper OR r.rolbypassrls FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_roles r ON r.oid = p.proowner \
         WHERE p.oid = 'upload_pipeline.keyword_candidates(tsquery, uuid[], integer)'::regprocedure",
    )
    .fetch_one(pool)
    .await?;
    if !bypass {
        tracing::warn!(
            owner,
            "upload_pipeline.keyword_candidates is owned by a role that does not bypass row-level security: \
             keyword search cannot use its full-text index and reads every chunk of the caller's. Give the owner \
             BYPASSRLS (ALTER ROLE ... BYPASSRLS) or make a role that has it the owner (docs/security.md)"
        );
    }
    Ok(bypass)
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
