//! Keyword search's side of the database: the text-search configuration (`search.text_config`) and the backfill
//! that brings every chunk's row of `upload_pipeline.chunk_keywords` (its words, for the `(user_id, tsv)` GIN
//! index) to it.
//!
//! A trigger writes a chunk's row whenever its text is written, in the configuration in force. Chunks written
//! before the table existed, or before the configuration changed, are brought up to date by [`backfill_keywords`]
//! in batches. Only `producer migrate` changes the configuration ([`set_text_search_config`]); `producer serve`
//! says when its own setting differs ([`text_search_config_matches`]), so replicas of different settings in a
//! rolling deploy never take turns changing it.

use std::time::{Duration, Instant};

use sqlx::{Connection as _, PgPool};
use uuid::Uuid;

use super::{DbError, retry_transient};

/// Stores the text-search configuration of keyword search (`search.text_config`); returns whether it changed. It
/// recomputes nothing: [`backfill_keywords`] does, in batches. A change waits for the chunk writes under way (at
/// most 10 s; tried three times). Run by [`super::migrate`] only.
pub async fn set_text_search_config(pool: &PgPool, config: &str) -> Result<bool, DbError> {
    let changed = retry_transient(
        "Changing the text-search configuration waited too long for chunk writes",
        &["55P03"],
        3,
        Duration::ZERO,
        || {
            sqlx::query_scalar("SELECT upload_pipeline.set_text_search_config($1::regconfig)")
                .bind(config)
                .fetch_one(pool)
        },
    )
    .await?;
    if changed {
        tracing::info!(
            config,
            "The text-search configuration changed; the chunks' keywords will be recomputed"
        );
    }
    Ok(changed)
}

/// Whether the database's text-search configuration is `config` (the `search.text_config` of a server that does
/// not apply it); logs a warning when it is not, or when the database has no configuration of that name.
pub async fn text_search_config_matches(pool: &PgPool, config: &str) -> Result<bool, DbError> {
    let compared: Result<(String, bool), sqlx::Error> = sqlx::query_as(
        "SELECT t.config::text, t.config = $1::regconfig FROM upload_pipeline.text_search t",
    )
    .bind(config)
    .fetch_one(pool)
    .await;
    match compared {
        Ok((_, true)) => Ok(true),
        Ok((database, false)) => {
            tracing::warn!(
                setting = config,
                database,
                "search.text_config differs from the database's text-search configuration, which keyword search \
                 uses: `producer migrate` applies the setting"
            );
            Ok(false)
        }
        // undefined_object: no configuration of that name.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => {
            tracing::warn!(
                setting = config,
                error = %e,
                "search.text_config names no text-search configuration of the database; keyword search uses the \
                 database's own"
            );
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Chunks per transaction of [`backfill_keywords`].
pub const BACKFILL_BATCH: i32 = 2000;

/// The key of the session advisory lock that lets one process at a time run [`backfill_keywords`].
const BACKFILL_LOCK: i64 = 0x7570_5f6b_7762_6631; // "up_kwbf1"

/// Brings every chunk's keywords (its row of `chunk_keywords`) to the configured text-search configuration: after
/// the migration that made the table (the existing chunks start without rows, and keyword search skips them until
/// then) and after `search.text_config` changes. A pass walks the chunks in id order, [`BACKFILL_BATCH`] per
/// transaction (`upload_pipeline.backfill_chunk_keywords`), writing the rows missing or in another configuration,
/// and logs its progress; it never writes the chunks themselves. Passes are counted by the configuration's
/// generation, which every change bumps: a change during a pass starts another, and only a pass that ends in the
/// generation it began in is marked complete, so later calls return at once. One process at a time (an advisory
/// lock): when another holds it, this waits for it, then completes what it left. Returns the rows written.
pub async fn backfill_keywords(pool: &PgPool) -> Result<u64, DbError> {
    Ok(backfill(pool, true).await?.unwrap_or(0))
}

/// [`backfill_keywords`], unless another process is running it: then `None` at once.
pub async fn backfill_keywords_unless_busy(pool: &PgPool) -> Result<Option<u64>, DbError> {
    backfill(pool, false).await
}

async fn backfill(pool: &PgPool, wait: bool) -> Result<Option<u64>, DbError> {
    // Detached from the pool (which opens another in its place): should this future be dropped while it holds the
    // session lock, the connection closes and the lock goes with it, instead of staying with a pooled connection
    // that would make every later call wait or skip for ever.
    let mut conn = pool.acquire().await?.detach();
    let due: bool = sqlx::query_scalar(
        "SELECT indexed_generation IS DISTINCT FROM generation FROM upload_pipeline.text_search",
    )
    .fetch_one(&mut conn)
    .await?;
    if !due {
        let _ = conn.close().await;
        return Ok(Some(0));
    }
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(BACKFILL_LOCK)
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        if !wait {
            tracing::info!("Another process is bringing the chunks' keywords up to date");
            let _ = conn.close().await;
            return Ok(None);
        }
        tracing::warn!(
            "Another process is bringing the chunks' keywords up to date; waiting for it to finish"
        );
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(BACKFILL_LOCK)
            .execute(&mut conn)
            .await?;
    }
    // The batches run on the pool's other connections; this one only holds the lock.
    let walked = backfill_passes(pool).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(BACKFILL_LOCK)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    let recomputed = walked?;
    unlocked?;
    Ok(Some(recomputed))
}

/// The passes of [`backfill_keywords`], until one completes in the generation still in force.
async fn backfill_passes(pool: &PgPool) -> Result<u64, DbError> {
    let mut recomputed = 0u64;
    loop {
        let (generation, config, due, estimate): (i64, String, bool, f32) = sqlx::query_as(
            "SELECT t.generation, t.config::text, t.indexed_generation IS DISTINCT FROM t.generation, \
               (SELECT greatest(c.reltuples, 0) FROM pg_catalog.pg_class c \
                WHERE c.oid = 'upload_pipeline.document_chunks'::regclass) \
             FROM upload_pipeline.text_search t",
        )
        .fetch_one(pool)
        .await?;
        if !due {
            return Ok(recomputed);
        }
        tracing::info!(
            config,
            generation,
            chunks = estimate as u64,
            batch = BACKFILL_BATCH,
            "Computing the keywords of the chunks without them or in another configuration"
        );
        let started = Instant::now();
        let (written, walked_through) = backfill_pass(pool, generation, estimate as u64).await?;
        recomputed += written;
        // Complete unless the configuration changed since the last batch (then the next pass brings the rest).
        let complete = walked_through
            && sqlx::query(
                "UPDATE upload_pipeline.text_search SET indexed_generation = generation, indexed_config = config \
                 WHERE generation = $1",
            )
            .bind(generation)
            .execute(pool)
            .await?
            .rows_affected()
                == 1;
        tracing::info!(
            config,
            generation,
            recomputed = written,
            seconds = started.elapsed().as_secs(),
            complete,
            "Keyword backfill pass ended"
        );
    }
}

/// One pass of generation `generation`: the rows written, and whether it walked every chunk (false: the
/// configuration changed, and the pass stopped).
async fn backfill_pass(
    pool: &PgPool,
    generation: i64,
    estimate: u64,
) -> Result<(u64, bool), DbError> {
    let (mut after, mut walked, mut written) = (None::<Uuid>, 0u64, 0u64);
    let mut logged = Instant::now();
    loop {
        let (last, done, current): (Option<Uuid>, i32, i64) = retry_transient(
            // Deadlock, serialization failure, lock timeout, or a chunk deleted under the batch.
            "A keyword backfill batch failed",
            &["40P01", "40001", "55P03", "23503"],
            10,
            Duration::from_millis(200),
            || {
                sqlx::query_as(
                    "SELECT last_id, recomputed, current_generation \
                     FROM upload_pipeline.backfill_chunk_keywords($1, $2, $3)",
                )
                .bind(after)
                .bind(BACKFILL_BATCH)
                .bind(generation)
                .fetch_one(pool)
            },
        )
        .await?;
        written += done as u64;
        if current != generation {
            return Ok((written, false));
        }
        let Some(last) = last else {
            return Ok((written, true));
        };
        after = Some(last);
        walked += BACKFILL_BATCH as u64;
        if logged.elapsed() >= Duration::from_secs(10) {
            logged = Instant::now();
            tracing::info!(
                walked,
                of = estimate,
                written,
                "Keyword backfill in progress"
            );
        }
    }
}

/// Whether keyword search can use its index: `keyword_candidates` and `identifier_candidates` (the keyword list of
/// identifier-like queries) run as their owner and read `chunk_keywords`, whose row-level security is enabled but
/// not forced, so its owner (the role that ran the migrations) reads it whole and the `(user_id, tsv)` index serves
/// `tsv @@ query`. Owned by another role that does not bypass row-level security, a function reads the table under
/// its policy, where Postgres may not use `@@` as an index condition (it is not leakproof) and every keyword
/// search reads all of the caller's rows; or, without a grant on the table, keyword search fails. Logged as a
/// warning, naming the owner of the first such function.
pub async fn keyword_search_uses_its_index(pool: &PgPool) -> Result<bool, DbError> {
    let (owner, reads_whole): (String, bool) = sqlx::query_as(
        "SELECT r.rolname::text, r.rolsuper OR r.rolbypassrls \
           OR (r.oid = c.relowner AND NOT c.relforcerowsecurity) \
         FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_roles r ON r.oid = p.proowner \
         CROSS JOIN pg_catalog.pg_class c \
         WHERE p.oid IN ('upload_pipeline.keyword_candidates(tsquery, uuid[], integer)'::regprocedure, \
                         'upload_pipeline.identifier_candidates(tsquery, uuid[], integer)'::regprocedure) \
           AND c.oid = 'upload_pipeline.chunk_keywords'::regclass \
         ORDER BY 2, p.proname LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    if !reads_whole {
        tracing::warn!(
            owner,
            "upload_pipeline.keyword_candidates or identifier_candidates is owned by a role that neither owns \
             upload_pipeline.chunk_keywords nor bypasses row-level security: keyword search cannot use its index and \
             reads every keyword row of the caller's, or fails if the role may not read the table. Make the table's \
             owner the functions' owner (ALTER FUNCTION ... OWNER TO; docs/security.md)"
        );
    }
    Ok(reads_whole)
}
