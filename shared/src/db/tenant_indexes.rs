//! Large tenants' own HNSW indexes (migration `20261205000000_tenant_indexes.sql` says why): a tenant with more
//! chunks of a model than `upload_pipeline.exact_search_chunks()` gets a partial HNSW index of its own chunks, which
//! its searches walk instead of the model's graph of every tenant's. [`maintain_tenant_indexes`] builds and drops
//! them; `producer serve` runs it every `search.tenant_index_interval` when it holds the owner's credentials, and
//! `producer tenant-indexes` once.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{Connection as _, Executor as _, PgPool, postgres::PgConnection};
use uuid::Uuid;

use super::DbError;
use crate::metrics as m;

/// The key of the session advisory lock that lets one process at a time maintain the tenants' indexes.
pub const TENANT_INDEX_LOCK: i64 = 0x7570_5f74_6e69_6478; // "up_tnidx"

/// One index built or dropped by a pass.
#[derive(Debug, Clone, Serialize)]
pub struct TenantIndexChange {
    /// `build` or `drop`.
    pub action: String,
    /// The index (`upload_pipeline.tenant_index_name(user, model)`).
    pub index_name: String,
    /// Its tenant.
    pub user_id: Uuid,
    /// Its model (`None`: no longer registered).
    pub embedding_model: Option<String>,
    /// The tenant's chunks of the model when the pass counted them.
    pub chunks: i64,
    /// Seconds the statement took.
    pub seconds: f64,
    /// Why it failed, if it did (a build that failed leaves an invalid index, which the next pass drops first).
    pub error: Option<String>,
}

/// What a pass of [`maintain_tenant_indexes`] did.
#[derive(Debug, Clone, Serialize)]
pub struct TenantIndexPass {
    /// The limit in force (`upload_pipeline.exact_search_chunks()` as the maintaining role sees it): tenants above
    /// it get their own index; 0 builds none and drops every one.
    pub limit: i32,
    /// The indexes built and dropped, in order.
    pub changes: Vec<TenantIndexChange>,
    /// The tenants' indexes valid after the pass.
    pub indexes: i64,
}

type PlanRow = (String, String, Uuid, Option<String>, i64, String);

/// The session settings of a pass. A build waits for every transaction older than it (twice), holding a
/// `SHARE UPDATE EXCLUSIVE` lock on the chunks meanwhile (which stops autovacuum and a migration's `ALTER TABLE`
/// there): past `lock_timeout` of waiting it fails instead, and the next pass tries again. A client gone (a
/// producer stopped mid-build) is noticed within `client_connection_check_interval`, and the build cancelled.
const SESSION: &str = "SET lock_timeout = '5min'; SET statement_timeout = '2h'; \
                       SET client_connection_check_interval = '5s'";

/// Drops the own indexes of tenants under half the limit (and invalid ones), then builds the own index of every
/// tenant above it that lacks a valid one (largest first, at most 64 in all; `CREATE INDEX CONCURRENTLY`, so chunk
/// writes go on), as
/// `upload_pipeline.tenant_index_plan` says. `memory_mb` is the builds' `maintenance_work_mem` (an HNSW graph that
/// does not fit is built far more slowly). Each pass opens a session of its own with `pool`'s options (so it reads
/// the limit as a new session sees it: `ALTER DATABASE ... SET` applies at once) and closes it. One process at a
/// time: when another holds the lock, `None` at once. A failed statement is logged, counted and reported, and the
/// pass goes on with the next, unless it timed out (the pass ends there); a connection lost ends it with the
/// error. Dropping the future
/// (shutdown) closes the connection; Postgres notices within 5 s and cancels the build under way, whose invalid
/// index is never searched and which the next pass drops and builds again.
pub async fn maintain_tenant_indexes(
    pool: &PgPool,
    memory_mb: u32,
) -> Result<Option<TenantIndexPass>, DbError> {
    // A session of the pass's own: the lock leaves with it whatever happens to this future.
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(TENANT_INDEX_LOCK)
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        tracing::debug!("Another process is maintaining the tenants' indexes");
        let _ = conn.close().await;
        return Ok(None);
    }
    let pass = pass(&mut conn, memory_mb).await;
    // Closing the session releases the lock (and the memory setting) whatever happened.
    let _ = conn.close().await;
    pass.map(Some)
}

/// The pass proper, on the locked session.
async fn pass(conn: &mut PgConnection, memory_mb: u32) -> Result<TenantIndexPass, DbError> {
    conn.execute(SESSION).await?;
    sqlx::query("SELECT set_config('maintenance_work_mem', $1, false)")
        .bind(format!("{memory_mb}MB"))
        .execute(&mut *conn)
        .await?;
    let limit: i32 = sqlx::query_scalar("SELECT upload_pipeline.exact_search_chunks()")
        .fetch_one(&mut *conn)
        .await?;
    let plan: Vec<PlanRow> = sqlx::query_as(
        "SELECT action, index_name, user_id, embedding_model, chunks, statement \
         FROM upload_pipeline.tenant_index_plan($1)",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut changes = Vec::with_capacity(plan.len());
    for (action, index_name, user_id, embedding_model, chunks, statement) in plan {
        let started = Instant::now();
        if action == "build" {
            tracing::info!(index = %index_name, %user_id, model = embedding_model.as_deref(), chunks,
                "Building a tenant's own HNSW index");
        }
        // A failed build's invalid index was dropped by the plan's drops, which come first.
        let result = run(conn, &statement).await;
        let seconds = started.elapsed().as_secs_f64();
        let error = match result {
            Ok(()) => {
                tracing::info!(action = %action, index = %index_name, %user_id, chunks, seconds, "Tenant index changed");
                metrics::counter!(m::SEARCH_TENANT_INDEX_CHANGES, "outcome" => if action == "build" { "built" } else { "dropped" })
                    .increment(1);
                None
            }
            Err(e) if matches!(&e, DbError::Sqlx(sqlx::Error::Database(_))) => {
                tracing::warn!(action = %action, index = %index_name, %user_id, error = %e,
                    "A tenant index could not be changed; the next pass tries again");
                metrics::counter!(m::SEARCH_TENANT_INDEX_CHANGES, "outcome" => "failed")
                    .increment(1);
                Some(e)
            }
            Err(e) => return Err(e),
        };
        // A lock or statement timeout means an old transaction holds every build back: the next ones would wait as
        // long, so the pass ends here and the next pass tries again.
        let timed_out = matches!(&error, Some(DbError::Sqlx(sqlx::Error::Database(d)))
            if matches!(d.code().as_deref(), Some("55P03" | "57014")));
        changes.push(TenantIndexChange {
            action,
            index_name,
            user_id,
            embedding_model,
            chunks,
            seconds,
            error: error.map(|e| e.to_string()),
        });
        if timed_out {
            tracing::warn!("Tenant index pass ended early: a statement timed out");
            break;
        }
    }
    let indexes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = 'upload_pipeline.document_chunks'::regclass AND i.indisvalid \
           AND c.relname ~ '^chunks_tenant_[0-9a-f]{32}_[0-9a-f]{8}$'",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(TenantIndexPass {
        limit,
        changes,
        indexes,
    })
}

/// Runs one statement by the simple query protocol (a statement without parameters: `CREATE INDEX
/// CONCURRENTLY` must not be in a transaction block).
async fn run(conn: &mut PgConnection, statement: &str) -> Result<(), DbError> {
    conn.execute(statement).await?;
    Ok(())
}

/// Runs [`maintain_tenant_indexes`] every `interval` until the future is dropped (the server's shutdown), logging
/// what each pass did; a pass that fails is logged and the next one tries again.
pub async fn maintain_tenant_indexes_every(pool: PgPool, interval: Duration, memory_mb: u32) {
    loop {
        match maintain_tenant_indexes(&pool, memory_mb).await {
            Ok(Some(pass)) if !pass.changes.is_empty() => tracing::info!(
                changes = pass.changes.len(),
                indexes = pass.indexes,
                limit = pass.limit,
                "Tenant index maintenance pass done"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Tenant index maintenance failed; trying again next interval")
            }
        }
        tokio::time::sleep(interval).await;
    }
}
