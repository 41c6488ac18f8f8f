//! Test support for the integration tests in `tests/tests/`: unique key prefixes on the shared Redis, private
//! Redis servers for tests that restart Redis or measure its memory, worker processes to kill, and waits on
//! conditions with deadlines (never fixed sleeps).

mod app;
pub mod bench;
mod db;
pub mod fake;
pub mod scripted;

pub use app::{Api, TestApp, wait_ready};
pub use db::{TestDb, pg_server};

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use upload_pipeline::{
    Settings,
    jobs::synthetic::{LogLine, SyntheticContext},
    queue::{Broker, QueueHandle, QueueStats},
    settings::RedisUrl,
};

/// The Redis the tests share (`REDIS_URL`, default `redis://127.0.0.1:6379`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "test-{test}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Settings for a test: its own key prefix and timings short enough for a test, on `redis_url`.
pub fn settings(prefix: &str, redis_url: &str) -> Settings {
    let mut s = Settings {
        redis_url: RedisUrl(redis_url.to_owned()),
        ..Default::default()
    };
    // The hashing embedder, chosen explicitly: instant, and the vectors tests predict (the fake OpenAI server
    // answers with the same); tests of the local model choose it themselves.
    s.embedding.embedder = upload_pipeline::settings::EmbedderKind::Hashing;
    s.embedding.model = "hashing-v1".into();
    s.queue.key_prefix = prefix.to_owned();
    s.queue.reclaim_after = Duration::from_secs(4);
    s.queue.block_timeout = Duration::from_millis(200);
    s.queue.retry_base = Duration::from_millis(200);
    s.queue.retry_max = Duration::from_secs(2);
    s.queue.max_deliveries = 3;
    s.worker.shutdown_grace = Duration::from_secs(5);
    // Tests upload in bursts; the per-user rate limit has a test of its own.
    s.api.uploads_per_minute = 0;
    // No tenant index built behind a test's back (a test of 12,000 chunks would get one); the tests of tenant
    // indexes run the passes themselves, or turn the server's on.
    s.search.tenant_index_interval = Duration::ZERO;
    s
}

/// Connects a broker with `settings`.
pub async fn broker(settings: &Settings) -> Broker {
    Broker::connect(settings.redis_url.expose(), settings.queue.clone())
        .await
        .expect("connect to Redis")
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the queue's stats satisfy `pred`; returns them.
pub async fn wait_for_stats(
    queue: &QueueHandle,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&QueueStats) -> bool,
) -> QueueStats {
    wait_for(what, timeout, || async {
        let s = queue.stats().await.expect("queue stats");
        pred(&s).then_some(s)
    })
    .await
}

/// The log lines synthetic jobs with `record: true` wrote for `queue`.
pub async fn synthetic_log(settings: &Settings, queue: &str) -> Vec<LogLine> {
    let client = redis::Client::open(settings.redis_url.expose()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let lines: Vec<String> = redis::cmd("LRANGE")
        .arg(SyntheticContext::log_key(&settings.queue.key_prefix, queue))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("LRANGE");
    lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("log line"))
        .collect()
}

/// Deletes every Redis key under the test's prefix when dropped, so a test that fails on an assertion leaves no
/// keys behind either. Tests with a [`TestApp`] have this already.
pub struct RedisKeys(Settings);

impl RedisKeys {
    /// Keys under `settings`' prefix, on its Redis.
    pub fn of(settings: &Settings) -> Self {
        Self(settings.clone())
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let settings = self.0.clone();
        block_on_thread(move || async move { cleanup(&settings).await });
    }
}

/// Deletes every key under the settings' prefix on their Redis (what dropping a [`TestApp`] or [`RedisKeys`] does).
pub async fn cleanup(settings: &Settings) {
    let client = redis::Client::open(settings.redis_url.expose()).expect("redis url");
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", settings.queue.key_prefix))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

/// Runs `cleanup` to completion on a thread of its own with a small runtime of its own: what a `Drop` that must
/// do I/O calls, since it cannot await and may run inside the test's runtime (where blocking on another future
/// panics), even while the test unwinds from a failed assertion.
pub fn block_on_thread<F, Fut>(cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the cleanup")
            .block_on(cleanup())
    });
    if thread.join().is_err() {
        eprintln!("a test's cleanup panicked; its database or Redis keys may be left behind");
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A Redis server of the test's own, for tests that restart Redis or measure its memory.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` without persistence on a free port and waits until it answers. A port taken by
    /// another test between picking and binding makes our server exit; then another port is tried.
    pub async fn start() -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
            };
            if server.try_start().await {
                return server;
            }
        }
        panic!("could not start a private redis-server on any of 5 free ports");
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (after [`RedisServer::stop`]); the data is gone, as after a crash.
    pub async fn restart(&mut self) {
        assert!(
            self.try_start().await,
            "redis-server could not listen on port {} again",
            self.port
        );
    }

    /// Starts redis-server on `self.port`; true once this very process answers, false if it exits first.
    async fn try_start(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? `make services` installs it)");
        let pid = child.id();
        let url = self.url();
        let ours = wait_for(
            "the private redis-server to answer or exit",
            Duration::from_secs(10),
            || {
                let exited = child.try_wait().expect("try_wait").is_some();
                let url = url.clone();
                async move {
                    if exited {
                        return Some(false);
                    }
                    let client = redis::Client::open(url.as_str()).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    let info: String = redis::cmd("INFO")
                        .arg("server")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    // Whoever answers must be the process started here, not another test's server.
                    let answered = info
                        .lines()
                        .find_map(|l| l.strip_prefix("process_id:"))
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    answered.map(|p| p == pid)
                }
            },
        )
        .await;
        if ours {
            self.child = Some(child);
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
        ours
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `INFO memory` `used_memory`, in bytes.
    pub async fn used_memory(&self) -> u64 {
        let client = redis::Client::open(self.url()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory in INFO")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `worker` binary, built once per test run (it lives in another package, so cargo does not build it for us).
/// Built as `make build` builds it (`--workspace --bins`): `-p workers` alone would unify dependency features
/// differently and rebuild the library and its optimised model crates from scratch, minutes on two cores.
pub fn worker_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("UPLOAD_PIPELINE_WORKER_BIN") {
            return PathBuf::from(bin);
        }
        // A binary of this package (the bench), not a test: the worker built beside it, same profile.
        let exe = std::env::current_exe().expect("executable path");
        if exe.parent().and_then(|d| d.file_name()) != Some(std::ffi::OsStr::new("deps")) {
            return exe.with_file_name("worker");
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Cargo gives a test the variables of its own package (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...). Passed on,
        // they make build scripts that watch them (ring's watches CARGO_MANIFEST_DIR) rerun, and everything above
        // them rebuild, here and again in the next outer build: minutes per test binary.
        let package_vars = std::env::vars().map(|(k, _)| k).filter(|k| {
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_MANIFEST_LINKS",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&k.as_str())
        });
        let mut build = Command::new(cargo);
        for var in package_vars {
            build.env_remove(var);
        }
        let status = build
            .args(["build", "--quiet", "--workspace", "--bins"])
            .status()
            .expect("run cargo build for the worker binary");
        assert!(status.success(), "building the worker binary failed");
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>/worker
        exe.parent()
            .and_then(|deps| deps.parent())
            .map(|dir| dir.join("worker"))
            .expect("target dir")
    })
    .clone()
}

/// `LLVM_PROFILE_FILE` when the tests run instrumented (`make coverage`): a process started with a cleared
/// environment gets it back, so its counters land where cargo-tarpaulin collects them.
pub fn coverage_env() -> Option<(&'static str, String)> {
    std::env::var("LLVM_PROFILE_FILE")
        .ok()
        .map(|v| ("LLVM_PROFILE_FILE", v))
}

/// A `worker` process of the test's.
pub struct WorkerProcess {
    child: Child,
    /// Where /healthz and /metrics are served, once the worker has logged it.
    metrics_addr: std::sync::OnceLock<String>,
    /// The file its logs go to.
    pub log_path: PathBuf,
}

impl WorkerProcess {
    /// Starts `worker --stages <stages>` with `settings` passed through the environment.
    pub fn start(settings: &Settings, stages: &str) -> Self {
        let log_path = std::env::temp_dir().join(format!(
            "{}-{}.log",
            settings.queue.key_prefix,
            rand::random::<u32>()
        ));
        let log = std::fs::File::create(&log_path).expect("worker log file");
        // Every setting travels in a TOML file, so a worker runs exactly what the test configured.
        let config_path = log_path.with_extension("toml");
        std::fs::write(
            &config_path,
            toml::to_string(settings).expect("settings serialise to TOML"),
        )
        .expect("worker config file");
        let mut env: Vec<(&str, String)> = vec![
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("RUST_LOG", "info".to_owned()),
            (
                "UPLOAD_PIPELINE_CONFIG",
                config_path.to_string_lossy().into_owned(),
            ),
        ];
        env.extend(coverage_env());
        let child = Command::new(worker_bin())
            // Port 0: the worker binds a port of its own and logs it. A port picked here and bound later could
            // be taken by another test's worker in between, and /healthz would then be answered by the wrong one.
            .args(["--stages", stages, "--metrics-addr", "127.0.0.1:0"])
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the worker binary");
        Self {
            child,
            metrics_addr: std::sync::OnceLock::new(),
            log_path,
        }
    }

    /// The address its /healthz and /metrics listen on, read from its start-up log line; `None` before that line.
    pub fn metrics_addr(&self) -> Option<String> {
        if let Some(addr) = self.metrics_addr.get() {
            return Some(addr.clone());
        }
        let logs = self.logs();
        let line = logs.lines().find(|l| l.contains("Worker started"))?;
        let addr = line
            .split("local=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .trim_matches('"')
            .to_owned();
        Some(self.metrics_addr.get_or_init(|| addr).clone())
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`"KILL"`, `"TERM"`, `"INT"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_for("the worker to exit", timeout, || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Its logs so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Fetches `path` from its health/metrics server; `None` while it does not answer.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr()?;
        let mut stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = String::new();
        stream.read_to_string(&mut buf).await.ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((code, body))
    }

    /// Waits until its /healthz answers 200; fails at once, with its logs, if the process ends first.
    pub async fn wait_healthy(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "the worker exited ({status}) before it was healthy:\n{}",
                    self.logs()
                );
            }
            if let Some((200, _)) = self.http_get("/healthz").await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker's /healthz did not answer 200 within 30 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sum of a metric's samples whose labels contain every `label="value"` in `filters`.
    pub async fn metric(&self, name: &str, filters: &[&str]) -> f64 {
        let Some((_, body)) = self.http_get("/metrics").await else {
            panic!(
                "/metrics of worker {} does not answer:\n{}",
                self.pid(),
                self.logs()
            );
        };
        sum_metric(&body, name, filters)
    }
}

/// Sums the samples of `name` in a Prometheus text exposition whose labels contain all of `filters`.
pub fn sum_metric(body: &str, name: &str, filters: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // Instrumented (`make coverage`), a worker writes its counters when it exits on its own: a SIGTERM drains
        // it (bounded by its shutdown grace), where a SIGKILL would lose everything it ran.
        if coverage_env().is_some() && self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log_path);
        } else {
            eprintln!(
                "worker {} logs kept at {}",
                self.child.id(),
                self.log_path.display()
            );
        }
    }
}
