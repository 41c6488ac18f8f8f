//! Observability, proven: the metrics catalogue and its document agree; the dashboards and the rules name only
//! catalogued metrics (or recorded series); promtool accepts the configuration, the rules and their unit tests
//! and lints every process's `/metrics`; and a real Prometheus, scraping a fleet that processes documents
//! against fake providers with injected faults, evaluates every dashboard expression, variable and recording
//! rule to a non-empty result, and every alert expression without an error.
//!
//! Prometheus and promtool come from Debian's `prometheus` package (`make services` installs it).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use serde_json::Value;
use tests::{
    TestApp, WorkerProcess,
    fake::{FakeConfig, FakeProviders, Faults, LlamaParseConfig, OpenAiConfig, Window},
    settings, unique_prefix, wait_for,
};
use upload_pipeline::metrics as m;
use uuid::Uuid;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Runs a command from the workspace root; panics with its output unless it succeeds.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): `make services` installs Prometheus and promtool")
        });
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

const DASHBOARDS: &[&str] = &[
    "grafana/dashboards/pipeline-overview.json",
    "grafana/dashboards/providers-and-quota.json",
    "grafana/dashboards/fleet.json",
];
const RULE_FILES: &[&str] = &[
    "deploy/prometheus/rules/recording.yml",
    "deploy/prometheus/rules/alerts.yml",
];

/// Every (dashboard, panel title, expression) of the committed dashboards.
fn panel_expressions() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for path in DASHBOARDS {
        let d: Value = serde_json::from_str(&read(path)).expect("dashboard JSON");
        let title = d["title"].as_str().expect("title").to_owned();
        for p in d["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    title.clone(),
                    p["title"].as_str().unwrap_or_default().to_owned(),
                    t["expr"].as_str().expect("expr").to_owned(),
                ));
            }
        }
    }
    out
}

/// The dashboards' query variables, as (name, `label_values(metric, label)`).
fn variable_queries() -> Vec<(String, String)> {
    let mut out = BTreeSet::new();
    for path in DASHBOARDS {
        let d: Value = serde_json::from_str(&read(path)).expect("dashboard JSON");
        for v in d["templating"]["list"].as_array().expect("variables") {
            if v["type"] == "query" {
                out.insert((
                    v["name"].as_str().expect("name").to_owned(),
                    v["definition"].as_str().expect("definition").to_owned(),
                ));
            }
        }
    }
    out.into_iter().collect()
}

/// Names of the series the recording rules write.
fn recorded_names() -> BTreeSet<String> {
    read(RULE_FILES[0])
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Every `upload_pipeline…` name in `text`: metric names and recorded series (those have colons).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(pos) = text[i..].find("upload_pipeline") {
        let mut start = i + pos;
        while start > 0 && is_name(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = i + pos;
        while end < bytes.len() && is_name(bytes[end]) {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}

/// Grafana's macros and variables as the test's Prometheus sees them (scraped every second).
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "10m")
        .replace("$__interval", "5s")
        .replace("$stage", ".*")
        .replace("$instance", ".*")
}

#[test]
fn the_metrics_document_is_generated_from_the_catalogue() {
    let want = m::catalogue_markdown();
    let path = root().join("docs/metrics.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).expect("write docs/metrics.md");
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/metrics.md is out of step with shared/src/metrics.rs: run `UPDATE_DOCS=1 cargo test -p tests --test observability`"
    );
    // The catalogue itself: names by the convention, counters end in _total, histograms have buckets.
    let mut seen = BTreeSet::new();
    for metric in m::CATALOGUE {
        assert!(seen.insert(metric.name), "{} listed twice", metric.name);
        assert!(
            metric.name.starts_with("upload_pipeline_"),
            "{} lacks the prefix",
            metric.name
        );
        assert_eq!(
            metric.kind == m::Kind::Counter,
            metric.name.ends_with("_total"),
            "{}: counters, and only counters, end in _total",
            metric.name
        );
        assert_eq!(
            metric.kind == m::Kind::Histogram,
            !metric.buckets.is_empty(),
            "{}: histograms, and only histograms, have buckets",
            metric.name
        );
        assert!(
            metric.buckets.windows(2).all(|w| w[0] < w[1]),
            "{}: buckets must increase",
            metric.name
        );
    }
    let bounds = |name: &str| m::lookup(name).expect("catalogued").buckets;
    assert!(bounds(m::DOCUMENT_UPLOAD_TO_QUERYABLE).contains(&90.0));
    assert!(bounds(m::DOCUMENT_UPLOAD_TO_QUERYABLE).contains(&10.0));
    assert!(bounds(m::SEARCH_DURATION).contains(&3.0));
    assert!(bounds(m::SEARCH_DURATION).contains(&0.02));
}

#[test]
fn dashboards_are_generated_and_name_only_catalogued_metrics_and_recorded_series() {
    run("python3", &["grafana/dashboards.py", "--check"], None);
    let recorded = recorded_names();
    assert!(recorded.len() >= 20, "recording rules: {recorded:?}");
    let mut unknown = Vec::new();
    let mut check = |source: &str, text: &str| {
        // A bare "upload_pipeline" is a rule group's name, not a series.
        for name in names_in(text)
            .into_iter()
            .filter(|n| n != "upload_pipeline")
        {
            let known = if name.contains(':') {
                recorded.contains(&name)
            } else {
                m::lookup(&name).is_some()
            };
            if !known {
                unknown.push(format!("{source}: {name}"));
            }
        }
    };
    for (dashboard, panel, expr) in panel_expressions() {
        check(&format!("{dashboard} / {panel}"), &expr);
    }
    for (name, query) in variable_queries() {
        check(&format!("variable ${name}"), &query);
    }
    for file in RULE_FILES {
        check(file, &read(file));
    }
    assert!(
        unknown.is_empty(),
        "names missing from the catalogue (shared/src/metrics.rs) or the recording rules:\n{}",
        unknown.join("\n")
    );

    // Fixed uids, the three variables, and every panel on $datasource.
    let mut uids = BTreeSet::new();
    for path in DASHBOARDS {
        let d: Value = serde_json::from_str(&read(path)).expect("dashboard JSON");
        let uid = d["uid"].as_str().expect("uid");
        assert!(uid.starts_with("upload-pipeline-"), "{path}: uid {uid}");
        assert!(uids.insert(uid.to_owned()), "{path}: uid {uid} used twice");
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .expect("variables")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(vars, ["datasource", "stage", "instance"], "{path}");
        for p in d["panels"].as_array().expect("panels") {
            if p["type"] != "row" {
                assert_eq!(
                    p["datasource"]["uid"], "${datasource}",
                    "{path}: {}",
                    p["title"]
                );
                assert!(
                    !p["description"].as_str().unwrap_or_default().is_empty(),
                    "{path}: {} has no description",
                    p["title"]
                );
            }
        }
    }
    // Every alert has a runbook entry.
    let runbook = read("docs/runbook.md").to_lowercase();
    for line in read(RULE_FILES[1]).lines() {
        if let Some(alert) = line.trim().strip_prefix("- alert:") {
            let alert = alert.trim();
            assert!(
                runbook.contains(&format!("## {}", alert.to_lowercase()))
                    || runbook.contains(&format!("<a id=\"{}\"", alert.to_lowercase())),
                "docs/runbook.md has no entry for {alert}"
            );
        }
    }
}

#[test]
fn promtool_accepts_the_configuration_the_rules_and_their_unit_tests() {
    run(
        "promtool",
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        None,
    );
    run(
        "promtool",
        &["check", "rules", RULE_FILES[0], RULE_FILES[1]],
        None,
    );
    let out = run(
        "promtool",
        &["test", "rules", "deploy/prometheus/tests/alerts.test.yml"],
        None,
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// A Prometheus server of the test's own, scraping `targets` every second with the repository's rules.
struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    async fn start(producer: &str, workers: &[String]) -> Self {
        let dir = std::env::temp_dir().join(format!("up-prometheus-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let rules: Vec<String> = RULE_FILES
            .iter()
            .map(|f| format!("  - {}", root().join(f).display()))
            .collect();
        let worker_targets: Vec<String> = workers.iter().map(|w| format!("\"{w}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  \
             - job_name: upload-pipeline-producer\n    static_configs:\n      - targets: [\"{producer}\"]\n  \
             - job_name: upload-pipeline-worker\n    static_configs:\n      - targets: [{}]\n",
            rules.join("\n"),
            worker_targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus config");
        run(
            "promtool",
            &["check", "config", config_path.to_str().expect("path")],
            None,
        );
        // Prometheus cannot report a port of its own choosing: take a free one, and start again on another if
        // something else bound it first. The storage path it reports proves the server is this one.
        for _ in 0..5 {
            let url = format!("http://127.0.0.1:{}", tests::free_port());
            let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!(
                    "--web.listen-address={}",
                    url.trim_start_matches("http://")
                ))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start prometheus (`make services` installs it)");
            let http = reqwest::Client::new();
            let data = dir.join("data").display().to_string();
            let ours = async {
                for _ in 0..300 {
                    if child.try_wait().ok().flatten().is_some() {
                        return false;
                    }
                    if let Ok(r) = http.get(format!("{url}/api/v1/status/flags")).send().await
                        && let Ok(v) = r.json::<Value>().await
                    {
                        return v["data"]["storage.tsdb.path"] == data.as_str();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                false
            }
            .await;
            if ours {
                return Self { child, url, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "Prometheus did not start:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
    }

    /// Evaluates `expr` now: its result, or the error Prometheus gave.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let resp = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        let data = &body["data"];
        Ok(match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => {
                data["result"].as_array().cloned().unwrap_or_default()
            }
            _ => vec![data["result"].clone()],
        })
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("JSON")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A search of `query`, asked again after a 503: a search asks for its query's vector up to three times, and with
/// 15 % of provider requests failing all three fail for one search in 300, which a caller would ask again.
async fn search_answered(client: &upload_pipeline::client::Client, query: &str) {
    wait_for("a search answered", Duration::from_secs(60), || async {
        match client.search(query, 5).await {
            Ok(_) => Some(()),
            Err(upload_pipeline::client::ClientError::Api { status: 503, .. }) => None,
            Err(e) => panic!("search: {e}"),
        }
    })
    .await;
}

/// Evaluates each expression until all give a non-empty result (recording rules need an evaluation or two),
/// returning those still failing at the deadline with why.
async fn evaluate_all(
    prom: &Prometheus,
    exprs: &[(String, String)],
    allow_empty: bool,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut failing = Vec::new();
        for (what, expr) in exprs {
            match prom.query(expr).await {
                Ok(r) if r.is_empty() && !allow_empty => {
                    failing.push(format!("{what}: empty result for {expr}"))
                }
                Ok(_) => {}
                Err(e) => failing.push(format!("{what}: {e} in {expr}")),
            }
        }
        if failing.is_empty() || tokio::time::Instant::now() > deadline {
            return failing;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

static RECORDER: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_evaluates_every_panel_variable_and_rule_against_a_running_fleet() {
    // Providers with limits (so the quota series and x-ratelimit headers exist) and injected faults (so jobs
    // retry and recover).
    let fake = FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            keys: vec!["sk-test".into()],
            requests: Some(Window {
                limit: 3_000,
                window_ms: 60_000,
            }),
            tokens: Some(Window {
                limit: 1_000_000,
                window_ms: 60_000,
            }),
            faults: Faults {
                server_error: 0.15,
                ..Default::default()
            },
            // Besides the random faults, which a run may dodge: the first two embedding requests fail, so at
            // least one job fails an attempt and recovers.
            fail_next: 2,
            ..Default::default()
        },
        llamaparse: LlamaParseConfig {
            keys: vec!["llx-test".into()],
            faults: Faults {
                server_error: 0.1,
                ..Default::default()
            },
            ..Default::default()
        },
    })
    .await;
    let mut s = settings(&unique_prefix("observability"), &tests::redis_url());
    fake.parse_with(&mut s);
    fake.embed_with(&mut s);
    s.embedding.batch_size = 8;
    s.chunking.max_tokens = 96;
    s.chunking.overlap_tokens = 8;
    s.queue.retry_base = Duration::from_millis(100);
    s.queue.retry_max = Duration::from_secs(1);
    s.queue.reclaim_after = Duration::from_secs(5);
    // With a tenth of all provider requests failing, three failed attempts in a row (the harness's
    // max_deliveries) end about one embed job in a thousand, one run in twenty here: the default five makes it
    // one in a hundred thousand, so the documents this test counts all become ready.
    s.queue.max_deliveries = 5;
    let operations = upload_pipeline::providers::operations(&s, false, true);
    let handle = RECORDER
        .get_or_init(|| {
            upload_pipeline::telemetry::init_metrics(
                "producer",
                &["parse", "chunk", "embed"],
                &operations,
            )
            .expect("recorder")
        })
        .clone();
    let app = TestApp::spawn_with_metrics(s, Some(handle)).await;
    let mut workers = vec![
        WorkerProcess::start(&app.settings, "parse,chunk"),
        WorkerProcess::start(&app.settings, "embed"),
    ];
    for w in &mut workers {
        w.wait_healthy().await;
    }
    let worker_addrs: Vec<String> = workers
        .iter()
        .map(|w| w.metrics_addr().expect("metrics address"))
        .collect();
    let prom = Prometheus::start(app.api.url.trim_start_matches("http://"), &worker_addrs).await;

    // Work for the fleet: the sample corpus (PDF, DOCX and HTML through LlamaParse; text and Markdown locally)
    // for three users, in waves, a file no parser reads, and searches.
    let corpus = root().join("tests/fixtures/corpus");
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&corpus)
        .expect("corpus")
        .map(|e| {
            let p = e.expect("entry").path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut ids = Vec::new();
    for wave in 0..3 {
        for (u, user) in users.iter().enumerate() {
            let client = app.client(*user);
            for (name, bytes) in &files {
                // Distinct bytes per wave and user, so every upload is real work (no duplicate shortcut).
                let mut body = bytes.clone();
                if name.ends_with(".txt") || name.ends_with(".md") {
                    body.extend(format!("\n\nWave {wave}, reader {u}.\n").as_bytes());
                }
                let up = client
                    .upload_bytes(&format!("w{wave}-{name}"), body, None)
                    .await
                    .expect("upload");
                ids.push((client.clone(), up.document_id));
            }
        }
        if wave == 0 {
            // The workers draw the two scripted failures, not the searches (which would retry them away).
            wait_for(
                "the workers' first embedding requests",
                Duration::from_secs(60),
                || async { (fake.stats().await.embedding_requests >= 2).then_some(()) },
            )
            .await;
        }
        let client = app.client(users[0]);
        for q in [
            "how do bees make honey",
            "lighthouse keepers",
            "tides and the moon",
        ] {
            search_answered(&client, q).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let broken = app.client(users[1]);
    let up = broken
        .upload_bytes(
            "broken.pdf",
            b"%PDF-1.7 this is no PDF at all".to_vec(),
            None,
        )
        .await
        .expect("upload");
    ids.push((broken, up.document_id));
    wait_for(
        "every document to settle",
        Duration::from_secs(180),
        || async {
            for (client, id) in &ids {
                let doc = client.status(*id).await.ok()?;
                if doc.status != "ready" && doc.status != "failed" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let client = app.client(users[2]);
    for _ in 0..10 {
        search_answered(&client, "volcanoes and lava").await;
    }
    let ready: i64 =
        sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.documents WHERE status = 'ready'")
            .fetch_one(app.admin())
            .await
            .unwrap();
    // Per user: each binary file once (the same bytes again are a duplicate), each text file once per wave.
    let texts = files
        .iter()
        .filter(|(n, _)| n.ends_with(".txt") || n.ends_with(".md"))
        .count();
    let unique = users.len() * ((files.len() - texts) + 3 * texts);
    assert!(
        ready >= unique as i64,
        "{ready} of {unique} documents ready"
    );

    // Prometheus has scraped the activity and the rules have run on it.
    wait_for(
        "Prometheus to hold the fleet's work",
        Duration::from_secs(60),
        || async {
            let r = prom
                .query("sum(upload_pipeline_documents_ready_total)")
                .await
                .ok()?;
            let v: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
            (v >= ready as f64).then_some(())
        },
    )
    .await;
    let faults = fake.stats().await.faults;
    assert!(faults > 0, "the fakes injected no fault");

    // promtool's lint on every process's exposition.
    let mut bodies = vec![(
        "producer".to_owned(),
        reqwest::get(format!("{}/metrics", app.api.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )];
    for w in &workers {
        let (_, body) = w.http_get("/metrics").await.expect("worker /metrics");
        bodies.push((format!("worker {}", w.metrics_addr().unwrap()), body));
    }
    for (who, body) in &bodies {
        let out = run("promtool", &["check", "metrics"], Some(body));
        assert!(
            out.trim().is_empty(),
            "promtool on the {who}'s /metrics:\n{out}"
        );
        // Every exported upload_pipeline series is catalogued.
        for name in names_in(body) {
            assert!(
                m::lookup(&name).is_some(),
                "{who} exports {name}, not in the catalogue"
            );
        }
    }

    // Every panel expression, every variable, every recording rule (its name and its expression): non-empty.
    let mut exprs: Vec<(String, String)> = panel_expressions()
        .into_iter()
        .map(|(d, p, e)| (format!("{d} / {p}"), substitute(&e)))
        .collect();
    for (name, query) in variable_queries() {
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .expect("label_values(metric, label)");
        let (metric, label) = inner.split_once(',').expect("metric, label");
        exprs.push((
            format!("variable ${name}"),
            format!("group by ({}) ({})", label.trim(), metric.trim()),
        ));
    }
    let rules = prom.get("/api/v1/rules").await;
    let groups = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .clone();
    let mut alert_exprs = Vec::new();
    let mut unhealthy = Vec::new();
    for g in &groups {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["name"].as_str().expect("name").to_owned();
            let query = r["query"].as_str().expect("query").to_owned();
            if r["health"] != "ok" {
                unhealthy.push(format!("{name}: {} {}", r["health"], r["lastError"]));
            }
            if r["type"] == "recording" {
                exprs.push((format!("recording rule {name}"), name.clone()));
                exprs.push((format!("recording rule {name} (expression)"), query));
            } else {
                alert_exprs.push((format!("alert {name}"), query));
            }
        }
    }
    assert_eq!(alert_exprs.len(), 15, "alerts loaded: {alert_exprs:?}");
    assert!(unhealthy.is_empty(), "rules in error: {unhealthy:?}");
    let failing = evaluate_all(&prom, &exprs, false).await;
    assert!(
        failing.is_empty(),
        "{} of {} expressions failed:\n{}",
        failing.len(),
        exprs.len(),
        failing.join("\n")
    );
    let failing = evaluate_all(&prom, &alert_exprs, true).await;
    assert!(
        failing.is_empty(),
        "alert expressions in error:\n{}",
        failing.join("\n")
    );
    println!(
        "{} panel, variable and recording-rule expressions and {} alert expressions evaluated",
        exprs.len(),
        alert_exprs.len()
    );

    // The recovery metric saw the injected faults: failed attempts that later succeeded.
    // The workers count it, and each is scraped on its own schedule (a scrape can time out on a busy machine):
    // wait for a scrape that holds it.
    wait_for(
        &format!("a recovered job to be counted after {faults} injected faults"),
        Duration::from_secs(60),
        || async {
            let r = prom
                .query("sum(upload_pipeline_recovery_failed_jobs_total{resolution=\"recovered\"})")
                .await
                .ok()?;
            let v: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
            (v > 0.0).then_some(())
        },
    )
    .await;

    drop(prom);
    drop(workers);
}
