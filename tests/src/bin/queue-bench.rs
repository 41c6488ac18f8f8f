//! `queue-bench`: no-op jobs through our queue, measured the way `../shared/bench/peers/` measures BullMQ, so
//! both can run in the same harness and the same run. One invocation prints one JSON line:
//!
//! 1. **enqueue**: `n` jobs `{i, t}` pushed in awaited batches of 1,000 (`push_many`, one pipeline each);
//! 2. **process**: a fresh worker process (apalis `WorkerBuilder` on our backend, concurrency C) drains them;
//!    rate = n / (first handler start -> n-th completion), a completion counted when its acknowledgement is
//!    written to Redis (apalis emits `Success` only after our backend's ack layer returned);
//! 3. **latency**: a fresh idle worker, 1,000 single pushes a second for 10 s; latency = completion - push time
//!    on `CLOCK_MONOTONIC`, nearest-rank p50/p99.
//!
//! Everything lives in its own Redis DB (default 12), flushed before each phase and at the end; DB 0 is refused.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, bail};
use apalis::layers::WorkerBuilderExt;
use apalis_core::{
    task::Task,
    worker::{builder::WorkerBuilder, event::Event, ext::event_listener::EventListenerExt},
};
use clap::Parser;
use serde::{Deserialize, Serialize};
use upload_pipeline::{
    queue::{Broker, JobError, Queue},
    settings::QueueSettings,
};

const QUEUE: &str = "bench";

#[derive(Debug, Clone, Parser)]
struct Args {
    /// Jobs in the enqueue and process phases.
    #[arg(long, default_value_t = 20_000)]
    n: u64,
    /// Worker concurrency.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Jobs per awaited push in the enqueue phase.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Jobs per second offered in the latency phase.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// A Redis DB of the benchmark's own: it is flushed.
    #[arg(long, default_value = "redis://127.0.0.1:6379/12")]
    redis: String,
    /// Skip the latency phase.
    #[arg(long)]
    skip_latency: bool,
    /// Internal: `worker` when re-run as the worker process.
    #[arg(long, hide = true, default_value = "main")]
    role: String,
    /// Internal: jobs the worker waits for.
    #[arg(long, hide = true, default_value_t = 0)]
    expect: u64,
    /// Internal: `throughput` or `latency`.
    #[arg(long, hide = true, default_value = "throughput")]
    mode: String,
    /// Internal: redis-server's pid, to read its CPU time.
    #[arg(long, hide = true, default_value_t = 0)]
    redis_pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    i: u64,
    t: f64,
}

/// CLOCK_MONOTONIC in ms: system-wide on Linux, so the producer and the worker process read the same clock.
fn now_ms() -> f64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as f64 * 1000.0 + ts.tv_nsec() as f64 / 1e6
}

/// utime + stime of a process, in seconds (from /proc; no Redis command).
fn cpu_secs(pid: u32) -> f64 {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = stat[stat.rfind(')').map_or(0, |i| i + 2)..]
        .split(' ')
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Idle and total jiffies of the machine.
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    (
        f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0),
        f.iter().sum(),
    )
}

#[derive(Debug, Clone, Copy)]
struct Snap {
    t: f64,
    redis: f64,
    worker: f64,
    idle: f64,
    total: f64,
}

fn snap(redis_pid: u32) -> Snap {
    let (idle, total) = machine_ticks();
    Snap {
        t: now_ms(),
        redis: cpu_secs(redis_pid),
        worker: cpu_secs(0),
        idle,
        total,
    }
}

fn window(a: Snap, b: Snap) -> serde_json::Value {
    let secs = (b.t - a.t) / 1000.0;
    let pct = |v: f64| (v * 1000.0).round() / 10.0;
    serde_json::json!({
        "redis_cpu_pct": pct((b.redis - a.redis) / secs),
        "worker_cpu_pct": pct((b.worker - a.worker) / secs),
        "machine_cpu_busy_pct": pct(1.0 - (b.idle - a.idle) / (b.total - a.total).max(1.0)),
    })
}

async fn redis_info(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<(f64, f64, f64)> {
    let info: String = redis::cmd("INFO").query_async(conn).await?;
    let get = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((
        get("total_commands_processed"),
        get("used_cpu_user") + get("used_cpu_sys"),
        now_ms(),
    ))
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[idx.clamp(1, sorted.len()) - 1])
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The no-op handler; it notes when the first job started and returns the job's push time, so the completion
/// event can compute the latency.
#[derive(Clone)]
struct Noop {
    first: Arc<Mutex<Option<(f64, Snap)>>>,
    redis_pid: u32,
}

impl tower::Service<Task<Job>> for Noop {
    type Response = f64;
    type Error = JobError;
    type Future = std::future::Ready<Result<f64, JobError>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), JobError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, task: Task<Job>) -> Self::Future {
        let mut first = self.first.lock().expect("first");
        if first.is_none() {
            *first = Some((now_ms(), snap(self.redis_pid)));
        }
        std::future::ready(Ok(task.args.t))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    done: u64,
    first_start: f64,
    last_done: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    window: serde_json::Value,
    worker_cpu_pct: f64,
}

fn queue_settings() -> QueueSettings {
    QueueSettings {
        key_prefix: "queue-bench".into(),
        ..Default::default()
    }
}

async fn worker_main(args: Args) -> anyhow::Result<()> {
    let broker = Broker::connect(&args.redis, queue_settings()).await?;
    let queue: Queue<Job> = broker.queue(QUEUE)?;
    queue.ensure_group().await?;
    let consumer = queue.consumer(format!("bench-{}", std::process::id()), args.concurrency);
    let expect = args.expect;
    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(expect as usize)));
    let first: Arc<Mutex<Option<(f64, Snap)>>> = Arc::default();
    let last: Arc<Mutex<Option<(f64, Snap)>>> = Arc::default();
    let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
    let finished_tx = Mutex::new(Some(finished_tx));
    let latency_mode = args.mode == "latency";
    let redis_pid = args.redis_pid;
    let cpu0 = cpu_secs(0);
    let t0 = now_ms();
    let worker = {
        let (done, latencies, last) = (done.clone(), latencies.clone(), last.clone());
        WorkerBuilder::new(consumer.handle().name().to_owned())
            .backend(consumer.backend())
            .concurrency(args.concurrency)
            .on_event(move |_, ev| {
                if let Event::Success(res) = ev {
                    let t = now_ms();
                    let n = done.fetch_add(1, Ordering::AcqRel) + 1;
                    if latency_mode && let Some(pushed) = res.downcast_ref::<f64>() {
                        latencies.lock().expect("latencies").push(t - pushed);
                    }
                    if n == expect {
                        *last.lock().expect("last") = Some((t, snap(redis_pid)));
                        if let Some(tx) = finished_tx.lock().expect("tx").take() {
                            let _ = tx.send(());
                        }
                    }
                }
            })
            .build(Noop {
                first: first.clone(),
                redis_pid,
            })
    };
    let handle = consumer.handle();
    let run = tokio::spawn(async move {
        worker
            .run_until(async move {
                let _ = finished_rx.await;
                Ok::<(), std::io::Error>(())
            })
            .await
    });
    // The worker is in its blocking read once the backend was polled; give it that moment before READY.
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("READY");
    std::io::stdout().flush()?;
    run.await??;
    handle.finish().await?;

    let (first_start, s0) = first
        .lock()
        .expect("first")
        .take()
        .unwrap_or((t0, snap(redis_pid)));
    let (last_done, s1) = last
        .lock()
        .expect("last")
        .take()
        .unwrap_or((now_ms(), snap(redis_pid)));
    let mut lat = std::mem::take(&mut *latencies.lock().expect("latencies"));
    lat.sort_by(f64::total_cmp);
    let result = WorkerResult {
        done: done.load(Ordering::Acquire),
        first_start,
        last_done,
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied(),
        window: window(s0, s1),
        worker_cpu_pct: ((cpu_secs(0) - cpu0) / ((now_ms() - t0) / 1000.0) * 1000.0).round() / 10.0,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

struct WorkerProc {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

fn start_worker(
    args: &Args,
    mode: &str,
    expect: u64,
    redis_pid: u32,
) -> anyhow::Result<WorkerProc> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--role",
            "worker",
            "--mode",
            mode,
            "--expect",
            &expect.to_string(),
        ])
        .args([
            "--concurrency",
            &args.concurrency.to_string(),
            "--redis",
            &args.redis,
            "--redis-pid",
            &redis_pid.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("Failed to start the worker process")?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    match lines.next() {
        Some(Ok(l)) if l == "READY" => Ok(WorkerProc { child, lines }),
        other => bail!("the worker process did not get ready: {other:?}"),
    }
}

impl WorkerProc {
    fn result(mut self) -> anyhow::Result<WorkerResult> {
        let line = self
            .lines
            .next()
            .context("the worker printed no result")??;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the worker exited with {status}");
        }
        Ok(serde_json::from_str(&line)?)
    }
}

async fn main_role(args: Args) -> anyhow::Result<()> {
    let client = redis::Client::open(args.redis.as_str())?;
    if client.get_connection_info().redis_settings().db() == 0 {
        bail!("refusing to FLUSHDB Redis DB 0: pass --redis with a dedicated DB index");
    }
    let mut admin = client.get_multiplexed_async_connection().await?;
    let server: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut admin)
        .await?;
    let redis_pid: u32 = server
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let flush = |mut c: redis::aio::MultiplexedConnection| async move {
        redis::cmd("FLUSHDB").query_async::<()>(&mut c).await
    };
    let mut out =
        serde_json::json!({ "peer": "ours", "n": args.n, "concurrency": args.concurrency });

    // -- enqueue
    flush(admin.clone()).await?;
    let broker = Broker::connect(&args.redis, queue_settings()).await?;
    let queue: Queue<Job> = broker.queue(QUEUE)?;
    queue.stats().await?; // warm the connection and load the scripts before timing
    let t = now_ms();
    let jobs: Vec<Job> = (0..args.n).map(|i| Job { i, t }).collect();
    let (s0, r0, cpu0) = (snap(redis_pid), redis_info(&mut admin).await?, cpu_secs(0));
    let ta0 = now_ms();
    for chunk in jobs.chunks(args.batch) {
        queue.push_many(chunk).await?;
    }
    let ta1 = now_ms();
    let (cpu1, r1, s1) = (cpu_secs(0), redis_info(&mut admin).await?, snap(redis_pid));
    let secs = (ta1 - ta0) / 1000.0;
    out["enqueue_jobs_per_s"] = serde_json::json!((args.n as f64 / secs).round());
    out["enqueue_diag"] = serde_json::json!({
        "redis_cpu_pct": ((r1.1 - r0.1) / secs * 1000.0).round() / 10.0,
        "redis_ops_per_s": ((r1.0 - r0.0) / secs).round(),
        "redis_cmds_per_job": round3((r1.0 - r0.0) / args.n as f64),
        "machine_cpu_busy_pct": window(s0, s1)["machine_cpu_busy_pct"],
        "producer_cpu_pct": ((cpu1 - cpu0) / secs * 1000.0).round() / 10.0,
    });
    let waiting = queue.stats().await?.pending;
    if waiting != args.n {
        bail!("expected {} waiting jobs, found {waiting}", args.n);
    }

    // -- process
    let r0 = redis_info(&mut admin).await?;
    let w = start_worker(&args, "throughput", args.n, redis_pid)?;
    let res = tokio::task::spawn_blocking(move || w.result()).await??;
    let r1 = redis_info(&mut admin).await?;
    if res.done != args.n {
        bail!("the worker completed {}/{}", res.done, args.n);
    }
    let secs = (res.last_done - res.first_start) / 1000.0;
    out["process_jobs_per_s"] = serde_json::json!((args.n as f64 / secs).round());
    let mut diag = res.window.clone();
    diag["redis_ops_per_s"] = serde_json::json!(((r1.0 - r0.0) / secs).round());
    diag["redis_cmds_per_job"] = serde_json::json!(round3((r1.0 - r0.0) / args.n as f64));
    out["process_diag"] = diag;

    // -- latency
    out["latency_p50_ms"] = serde_json::Value::Null;
    out["latency_p99_ms"] = serde_json::Value::Null;
    if !args.skip_latency {
        flush(admin.clone()).await?;
        let queue: Queue<Job> = broker.queue(QUEUE)?;
        queue.ensure_group().await?;
        let m = (args.rate * args.duration).round() as u64;
        let w = start_worker(&args, "latency", m, redis_pid)?;
        let (r0, s0) = (redis_info(&mut admin).await?, snap(redis_pid));
        let interval = 1000.0 / args.rate;
        let tc0 = now_ms();
        let mut pending = tokio::task::JoinSet::new();
        let mut max_lag: f64 = 0.0;
        let mut i = 0;
        while i < m {
            let due = tc0 + i as f64 * interval;
            let now = now_ms();
            if now < due {
                tokio::time::sleep(Duration::from_secs_f64((due - now) / 1000.0)).await;
                continue;
            }
            max_lag = max_lag.max(now - due);
            let q = queue.clone();
            pending.spawn(async move { q.push(&Job { i, t: now_ms() }).await });
            i += 1;
            if pending.len() >= 1000 {
                while let Some(r) = pending.join_next().await {
                    r??;
                }
            }
        }
        while let Some(r) = pending.join_next().await {
            r??;
        }
        let tc1 = now_ms();
        let res = tokio::task::spawn_blocking(move || w.result()).await??;
        let (r1, s1) = (redis_info(&mut admin).await?, snap(redis_pid));
        out["latency_p50_ms"] = serde_json::json!(res.p50.map(round3));
        out["latency_p99_ms"] = serde_json::json!(res.p99.map(round3));
        let completion_rate = (res.last_done > tc0)
            .then(|| (res.done as f64 / ((res.last_done - tc0) / 1000.0)).round());
        let secs = (s1.t - s0.t) / 1000.0;
        out["latency_diag"] = serde_json::json!({
            "jobs": m, "completed": res.done, "rate_target": args.rate,
            "rate_achieved": (m as f64 / ((tc1 - tc0) / 1000.0)).round(),
            "completion_rate": completion_rate,
            "saturated": res.done < m || completion_rate.is_none_or(|r| r < 0.9 * args.rate),
            "producer_max_lag_ms": round3(max_lag), "latency_max_ms": res.max.map(round3),
            "redis_cpu_pct": ((r1.1 - r0.1) / secs * 1000.0).round() / 10.0,
            "redis_cmds_per_job": round3((r1.0 - r0.0) / m as f64),
            "machine_cpu_busy_pct": window(s0, s1)["machine_cpu_busy_pct"],
            "worker_cpu_pct": res.worker_cpu_pct,
        });
    }
    flush(admin.clone()).await?;
    out["config"] = serde_json::json!({ "fetch": "XREADGROUP BLOCK, COUNT = free slots", "ack": "batched XACK+XDEL after the handler", "build": if cfg!(debug_assertions) { "debug" } else { "release" } });
    out["versions"] =
        serde_json::json!({ "upload-pipeline": env!("CARGO_PKG_VERSION"), "apalis-core": "1.0.0" });
    println!("{out}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.role == "worker" {
        worker_main(args).await
    } else {
        main_role(args).await
    }
}
