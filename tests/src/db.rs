//! A database of each test's own, copied from a template migrated once per set of migrations (crates.io's
//! `crates_io_test_db`): `CREATE DATABASE … TEMPLATE` takes milliseconds where migrating takes seconds, and the
//! copy is dropped when the test's [`TestDb`] is, whether the test passed or panicked.

use sha2::{Digest, Sha256};
use sqlx::{Connection, Executor};
use upload_pipeline::{Settings, db::MIGRATOR, settings::ConnectionUrl};

use crate::block_on_thread;

/// The PostgreSQL server the tests use (`TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432`).
pub fn pg_server() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The key of the advisory lock that serialises building templates across test processes.
const TEMPLATE_LOCK: i64 = 0x7570_5f74_706c; // "up_tpl"

/// The template's name: a hash of every migration's checksum, so a changed migration gets a template of its own.
fn template_name() -> String {
    let mut hash = Sha256::new();
    for migration in MIGRATOR.iter() {
        hash.update(migration.version.to_le_bytes());
        hash.update(&migration.checksum);
    }
    format!("up_tpl_{}", &hex::encode(hash.finalize())[..16])
}

/// Connects to the server's maintenance database, for `CREATE DATABASE` and `DROP DATABASE`.
async fn maintenance() -> sqlx::PgConnection {
    let connect = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server()));
    tokio::time::timeout(std::time::Duration::from_secs(30), connect)
        .await
        .expect("the test Postgres answered within 30 s")
        .expect("connect to the test Postgres (is it running? `make services` starts it)")
}

async fn database_exists(conn: &mut sqlx::PgConnection, name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut *conn)
        .await
        .expect("look the database up")
}

/// The migrated template, built under the advisory lock by whichever test process asks first. It is built under
/// another name and renamed when complete, so a template that exists is a finished one. Templates of other
/// migrations are left alone: another checkout testing against the same server may be copying one right now.
async fn template(conn: &mut sqlx::PgConnection) -> String {
    let name = template_name();
    if database_exists(conn, &name).await {
        return name;
    }
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut *conn)
        .await
        .expect("take the template lock");
    if !database_exists(conn, &name).await {
        build_template(conn, &name).await;
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut *conn)
        .await
        .expect("release the template lock");
    name
}

async fn build_template(conn: &mut sqlx::PgConnection, name: &str) {
    let building = format!("{name}_building");
    let settings = Settings {
        database_url: ConnectionUrl(format!("{}/{building}", pg_server())),
        ..Default::default()
    };
    let pool = upload_pipeline::db::migrate(&settings)
        .await
        .expect("create and migrate the template database");
    pool.close().await;
    // A closed connection's server process ends a moment after the client lets go (the pool's, and the keyword
    // backfill's detached one): the rename waits until no session is left on the database.
    let rename = format!("ALTER DATABASE {building} RENAME TO {name}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match conn.execute(rename.as_str()).await {
            Ok(_) => return,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55006") && std::time::Instant::now() < deadline =>
            {
                let sessions: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE datname = $1",
                )
                .bind(&building)
                .fetch_one(&mut *conn)
                .await
                .expect("count the template's sessions");
                if sessions > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            Err(e) => panic!("rename the finished template: {e}"),
        }
    }
}

async fn drop_database(conn: &mut sqlx::PgConnection, name: &str) {
    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let _ = conn.execute(drop.as_str()).await;
}

/// A database of the test's own, copied from the migrated template; dropped with this value.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// A superuser pool (bypasses row-level security), for checks behind the API's back.
    pub admin: sqlx::PgPool,
}

impl TestDb {
    /// Copies the template into a fresh database and points `settings` at it. The copy is then migrated with
    /// `settings` as the fleet would be (a no-op for the schema), which gives the app role its password when
    /// `settings` set one and registers `settings`' embedding model.
    pub async fn create(settings: &mut Settings) -> Self {
        let name = format!("up_test_{:016x}", rand::random::<u64>());
        let mut conn = maintenance().await;
        let template = template(&mut conn).await;
        let copy = format!("CREATE DATABASE {name} TEMPLATE {template}");
        conn.execute(copy.as_str())
            .await
            .expect("copy the template database");
        let _ = conn.close().await;
        settings.database_url = ConnectionUrl(format!("{}/{name}", pg_server()));
        let admin = upload_pipeline::db::migrate(settings)
            .await
            .expect("migrate the test database");
        Self { name, admin }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // FORCE ends the pool's connections and those of an API or worker still running.
        block_on_thread(
            move || async move { drop_database(&mut maintenance().await, &name).await },
        );
    }
}
