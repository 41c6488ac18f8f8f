//! The server's bootstrap: migrations, connections, the reconciler, and serving the API until shutdown.

use std::{future::Future, sync::Arc};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::{ApiState, router, state};
use crate::{db::DbError, jobs::Pipeline, queue::Broker};

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `producer serve`: listens on `api.listen`, then runs [`run_server_on`].
pub async fn run_server(
    settings: Arc<crate::Settings>,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ServerResult<()> {
    let listener = TcpListener::bind(settings.api.listen).await.map_err(|e| {
        ServerError::Setup(format!("cannot listen on {}: {e}", settings.api.listen))
    })?;
    run_server_on(listener, settings, metrics, shutdown).await
}

/// Migrates, then serves the API on `listener` (bound by the caller, as with socket activation or a test's
/// port 0) and runs the reconciler until `shutdown`.
pub async fn run_server_on(
    listener: TcpListener,
    settings: Arc<crate::Settings>,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ServerResult<()> {
    // Migrations as the admin role; requests as the app role, under row-level security. With the app role's
    // credentials only, the migrations were run before (`producer migrate` as the owner).
    let mut maintenance = None;
    if crate::db::can_migrate(&settings)
        .await
        .map_err(ServerError::Db)?
    {
        let admin = crate::db::migrate_schema(&settings)
            .await
            .map_err(ServerError::Db)?;
        // The keywords of chunks written before their table (or in another text configuration) are computed in
        // batches while the API serves; keyword search skips those chunks until then. Then, as the owner, the
        // large tenants' own HNSW indexes are kept (db::maintain_tenant_indexes) until shutdown.
        let search = settings.search.clone();
        maintenance = Some(tokio::spawn(async move {
            if let Err(e) = crate::db::backfill_keywords_unless_busy(&admin).await {
                tracing::warn!(error = %e, "The keyword backfill stopped; the next start-up or `producer migrate` resumes it");
            }
            if !search.tenant_index_interval.is_zero() {
                crate::db::maintain_tenant_indexes_every(
                    admin.clone(),
                    search.tenant_index_interval,
                    search.tenant_index_memory_mb,
                )
                .await;
            }
            admin.close().await;
        }));
    } else {
        tracing::info!("database_url is the app role's: leaving migrations to `producer migrate`");
    }
    let pool = crate::db::connect(&settings, 16)
        .await
        .map_err(ServerError::Db)?;
    // Only `producer migrate` applies search.text_config: replicas of two settings in a rolling deploy would
    // otherwise take turns changing it, each change a pass over every chunk.
    crate::db::text_search_config_matches(&pool, &settings.search.text_config)
        .await
        .map_err(ServerError::Db)?;
    let broker = Broker::connect(settings.redis_url.expose(), settings.queue.clone())
        .await
        .map_err(ServerError::Queue)?;
    let quota = crate::quota::Quota::connect(&settings)
        .await
        .map_err(|e| ServerError::Setup(format!("cannot reach Redis for the quota state: {e}")))?;
    let embedder = crate::providers::embedder(&settings, Some(&quota))
        .map_err(|e| ServerError::Setup(e.to_string()))?;
    let reranker = crate::providers::reranker(&settings, Some(&quota))
        .map_err(|e| ServerError::Setup(e.to_string()))?;
    // The producer pushes and reconciles stages but never parses: it needs no LlamaParse client (nor its key).
    let parser: Arc<dyn crate::providers::Parser> = Arc::new(
        crate::providers::local::LocalParser::new(&settings.pipeline),
    );
    let pipeline = Pipeline::new(pool, &broker, embedder, parser, settings.clone())
        .map_err(ServerError::Queue)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let identity = format!(
        "producer-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    );
    let mut rx = stop_rx.clone();
    let reconciler = tokio::spawn(crate::reconciler::run(
        pipeline.clone(),
        identity,
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
    ));
    if settings.api.jwt_secret.expose() == crate::settings::DEV_JWT_SECRET {
        tracing::warn!(
            "Using the built-in development JWT secret: set JWT_SECRET before exposing the API"
        );
    }
    let local = listener
        .local_addr()
        .map_err(|e| ServerError::Setup(format!("listener has no address: {e}")))?;
    tracing::info!(listen = %local, "Producer API serving");
    let state = ApiState {
        reranker,
        ..state(pipeline, broker, metrics).map_err(|e| ServerError::Setup(e.to_string()))?
    };
    let served = serve(listener, state, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    let _ = reconciler.await;
    // A keyword backfill or an index build cut short is resumed by the next start-up (an index left invalid is
    // never searched, and the next pass drops and builds it again).
    if let Some(maintenance) = maintenance {
        maintenance.abort();
    }
    served.map_err(|e| ServerError::Setup(e.to_string()))
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database.
    #[error(transparent)]
    Db(DbError),
    /// Redis.
    #[error(transparent)]
    Queue(crate::queue::QueueError),
    /// Anything else at start-up.
    #[error("{0}")]
    Setup(String),
}

/// Result of [`run_server`].
pub type ServerResult<T> = Result<T, ServerError>;
