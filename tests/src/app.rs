//! The producer API of a test and [`TestApp`], the one harness object a test holds: its settings (with its own
//! Redis key prefix), its database and its API, all cleaned up when it is dropped, so a failing assertion leaves
//! nothing behind.

use std::time::Duration;

use upload_pipeline::Settings;

use crate::{TestDb, block_on_thread, cleanup, wait_for};

/// A test's settings, database and API. Dropping it stops the API, deletes every Redis key under the settings'
/// prefix and drops the database (see [`TestDb`]).
pub struct TestApp {
    /// The settings the API runs with; workers of the test start with them too.
    pub settings: Settings,
    /// The test's database.
    pub db: TestDb,
    /// The API, serving the database.
    pub api: Api,
}

impl TestApp {
    /// A fresh database copied from the migrated template (which `settings` then points at) and the API serving
    /// it, with its reconciler.
    pub async fn spawn(settings: Settings) -> Self {
        Self::spawn_with_metrics(settings, None).await
    }

    /// Like [`TestApp::spawn`], the API serving `/metrics` from `metrics` (the process's installed recorder).
    pub async fn spawn_with_metrics(
        mut settings: Settings,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Self {
        let db = TestDb::create(&mut settings).await;
        let api = Api::start_with_metrics(&settings, metrics).await;
        Self { settings, db, api }
    }

    /// A typed client acting as `user`.
    pub fn client(&self, user: uuid::Uuid) -> upload_pipeline::client::Client {
        self.api.client(&self.settings, user)
    }

    /// A token for `user`.
    pub fn token(&self, user: uuid::Uuid) -> String {
        self.api.token(&self.settings, user)
    }

    /// The superuser pool of the test's database (bypasses row-level security).
    pub fn admin(&self) -> &sqlx::PgPool {
        &self.db.admin
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.api.shut_down();
        // The database goes when the `db` field is dropped, right after this.
        let settings = self.settings.clone();
        block_on_thread(move || async move { cleanup(&settings).await });
    }
}

/// The producer API of a test, served in-process with its reconciler.
pub struct Api {
    /// Its base URL.
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Api {
    /// Serves the API with `settings` on a free port and waits until it answers.
    pub async fn start(settings: &Settings) -> Self {
        Self::start_with_metrics(settings, None).await
    }

    /// Like [`Api::start`], serving `/metrics` from `metrics` (the process's installed recorder).
    pub async fn start_with_metrics(
        settings: &Settings,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Self {
        let mut s = settings.clone();
        // Bound here and handed over, so no other test's server can take the port in between.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        s.api.listen = listener.local_addr().expect("addr");
        let url = format!("http://{}", s.api.listen);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            upload_pipeline::api::run_server_on(
                listener,
                std::sync::Arc::new(s),
                metrics,
                shutdown,
            )
            .await
            .expect("the API runs");
        });
        let http = reqwest::Client::new();
        wait_for("the API to answer", Duration::from_secs(30), || {
            let (http, url) = (&http, &url);
            async move {
                http.get(format!("{url}/healthz"))
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await;
        Self {
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A typed client acting as `user`.
    pub fn client(&self, settings: &Settings, user: uuid::Uuid) -> upload_pipeline::client::Client {
        let token = self.token(settings, user);
        upload_pipeline::client::Client::new(&self.url, &token).expect("client")
    }

    /// A token for `user`.
    pub fn token(&self, settings: &Settings, user: uuid::Uuid) -> String {
        upload_pipeline::auth::Auth::hs256(settings.api.jwt_secret.expose()).issue(
            user,
            Duration::from_secs(3600),
            false,
        )
    }

    /// Stops the server and its reconciler, and waits until they have ended.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops the server and its reconciler without waiting: what dropping it does.
    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Waits until every document is `ready` (or any is `failed`, which panics); returns them.
pub async fn wait_ready(
    client: &upload_pipeline::client::Client,
    ids: &[uuid::Uuid],
    timeout: Duration,
) -> Vec<upload_pipeline::client::Document> {
    wait_for("documents to become ready", timeout, || async {
        let mut docs = Vec::new();
        for id in ids {
            let doc = client.status(*id).await.ok()?;
            assert_ne!(
                doc.status, "failed",
                "document {id} failed: {:?}",
                doc.error
            );
            docs.push(doc);
        }
        docs.iter().all(|d| d.status == "ready").then_some(docs)
    })
    .await
}
