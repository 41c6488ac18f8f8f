//! TLS to managed services: Postgres (`sslmode=verify-full` with `sslrootcert`) and Redis (`rediss://`, trusting
//! the system's roots or `SSL_CERT_FILE`). Each test proves the connection is encrypted and that a
//! server certificate from an untrusted issuer is refused.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use tests::{free_port, settings, unique_prefix, wait_for, worker_bin};
use upload_pipeline::settings::RedisUrl;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The arguments of `openssl req` that make a new P-256 key without a passphrase.
const NEW_P256_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// A CA (`<name>-ca.pem`) and, when `server`, a certificate it signed for localhost and 127.0.0.1.
fn certificates(dir: &Path, name: &str, server: bool) -> PathBuf {
    let (key, pem, subject) = (
        format!("{name}-ca.key"),
        format!("{name}-ca.pem"),
        format!("/CN={name} test CA"),
    );
    let ca_args = [
        "-keyout", &key, "-out", &pem, "-days", "1", "-subj", &subject,
    ];
    openssl(dir, &[&["req", "-x509"], NEW_P256_KEY, &ca_args].concat());
    if server {
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let csr_args = [
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ];
        openssl(dir, &[&["req"], NEW_P256_KEY, &csr_args].concat());
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                &pem,
                "-CAkey",
                &key,
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        );
    }
    dir.join(pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_verify_the_servers_certificate() {
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", tests::pg_server()))
        .await
        .unwrap();
    let (ssl, cert): (String, String) =
        sqlx::query_as("SELECT current_setting('ssl'), current_setting('ssl_cert_file')")
            .fetch_one(&admin)
            .await
            .unwrap();
    admin.close().await;
    assert_eq!(
        ssl, "on",
        "the test server must serve TLS (Debian's PostgreSQL does, with its snakeoil certificate)"
    );
    let mut s = settings(&unique_prefix("tls-pg"), &tests::redis_url());
    // The server's self-signed certificate (issued to localhost) is its own root: verify-full checks the chain
    // and the host name.
    let server = tests::pg_server().replace("127.0.0.1", "localhost");
    s.database_url = RedisUrl(format!(
        "{server}/postgres?sslmode=verify-full&sslrootcert={cert}"
    ));
    let pool = upload_pipeline::db::connect(&s, 1).await.unwrap();
    let (encrypted, role): (bool, String) = sqlx::query_as(
        "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(encrypted);
    // Over TLS too, the fleet connects as the role that cannot bypass row-level security.
    assert_eq!(role, s.database_app_role);
    pool.close().await;

    let dir = tempdir("tls-pg");
    let other = certificates(&dir, "other", false);
    s.database_url = RedisUrl(format!(
        "{server}/postgres?sslmode=verify-full&sslrootcert={}",
        other.display()
    ));
    let err = upload_pipeline::db::connect(&s, 1)
        .await
        .expect_err("a server certificate from another issuer is refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate")
            || format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{:08x}", name, rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `producer <args>` against `redis_url`, trusting `ca` (through `SSL_CERT_FILE`) when given.
fn producer(
    redis_url: &str,
    prefix: &str,
    ca: Option<&Path>,
    args: &[&str],
) -> std::process::Output {
    let bin = worker_bin().with_file_name("producer");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .envs(tests::coverage_env())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", redis_url)
        .env("UPLOAD_PIPELINE__QUEUE__KEY_PREFIX", prefix);
    if let Some(ca) = ca {
        cmd.env("SSL_CERT_FILE", ca);
    }
    cmd.output().expect("run producer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_runs_over_tls_to_a_redis_whose_certificate_is_trusted() {
    let dir = tempdir("tls-redis");
    let ca = certificates(&dir, "redis", true);
    let port = free_port();
    let mut server = Command::new("redis-server");
    server
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
        ])
        .args([
            "--tls-ca-cert-file",
            ca.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(&dir);
    let _server = Killed::spawn(&mut server);
    wait_for(
        "the TLS Redis to listen",
        Duration::from_secs(20),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let url = format!("rediss://127.0.0.1:{port}");
    let prefix = unique_prefix("tls-redis");

    // An issuer nobody trusts: refused.
    let refused = producer(&url, &prefix, None, &["queues", "--json"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        why.contains("certificate") || why.contains("issuer"),
        "{why}"
    );

    // Trusted through SSL_CERT_FILE: jobs go in, a worker runs them, all over TLS.
    let pushed = producer(
        &url,
        &prefix,
        Some(&ca),
        &["synthetic", "--stage", "synthetic", "--jobs", "50"],
    );
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let before = producer(&url, &prefix, Some(&ca), &["queues", "--json"]);
    let before: serde_json::Value = serde_json::from_slice(&before.stdout).unwrap();
    assert_eq!(before["synthetic"]["pending"], 50);
    let mut worker = Command::new(worker_bin());
    worker
        .args(["--stages", "synthetic", "--metrics-addr", "127.0.0.1:0"])
        .env_clear()
        .envs(tests::coverage_env())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", &url)
        .env("UPLOAD_PIPELINE__QUEUE__KEY_PREFIX", &prefix)
        .env("SSL_CERT_FILE", &ca);
    let _worker = Killed::spawn(&mut worker);
    wait_for(
        "the worker to run every job",
        Duration::from_secs(60),
        || async {
            let out = producer(&url, &prefix, Some(&ca), &["queues", "--json"]);
            let stats: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let q = &stats["synthetic"];
            let done =
                q["pending"] == 0 && q["in_flight"] == 0 && q["delayed"] == 0 && q["dead"] == 0;
            done.then_some(())
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A child process killed when the test ends, passed or not.
struct Killed(std::process::Child);

impl Killed {
    /// Starts `cmd` with its output discarded.
    fn spawn(cmd: &mut Command) -> Self {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", cmd.get_program()));
        Self(child)
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
