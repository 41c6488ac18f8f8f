//! `producer search` with a mode, a filter and --rerank, against a running API: the flags reach the API, and bad ones are
//! refused by the command line with a message naming the part and a non-zero exit, before any request.

use serde_json::{Value, json};
use tests::{TestApp, settings, unique_prefix};
use uuid::Uuid;

use super::{Doc, seed};

/// Runs `producer search <args>` against `app` as `user`, with nothing of this process's environment.
fn producer_search(app: &TestApp, user: Uuid, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tests::worker_bin().with_file_name("producer"))
        .arg("search")
        .args(args)
        .args(["--api", &app.api.url, "--token", &app.token(user)])
        .env_clear()
        .envs(tests::coverage_env())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run producer search")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_search_sends_the_mode_and_filter_and_refuses_bad_ones_naming_the_part() {
    let app = TestApp::spawn(settings(&unique_prefix("search-cli"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    for (name, team) in [("ops.txt", "ops"), ("dev.txt", "dev")] {
        let doc = Doc {
            metadata: json!({ "team": team }),
            ..Doc::ready(name, &["The tide tables list spring tides and neap tides."])
        };
        seed(&app, user, doc).await;
    }

    let out = producer_search(
        &app,
        user,
        &[
            "\"neap tides\"",
            "--mode",
            "keyword",
            "--filter",
            r#"{"type":"eq","key":"team","value":"ops"}"#,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let hits = answer["results"].as_array().expect("results");
    let files: Vec<&str> = hits
        .iter()
        .map(|h| h["filename"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["ops.txt"], "{answer}");
    assert_eq!(hits[0]["vector_rank"], Value::Null, "keyword mode only");
    assert!(hits[0]["keyword_rank"].is_number(), "{answer}");

    // Without the filter and in the default (hybrid) mode, both documents; the list names the mode.
    let out = producer_search(&app, user, &["neap tides", "-k", "5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("2 results in ") && text.contains("(hybrid, "),
        "{text}"
    );

    // --rerank reaches the API, which has no reranker here: its 422 is the CLI's error; --no-rerank is allowed.
    let out = producer_search(&app, user, &["tides", "--rerank"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("search.rerank.model"), "{err}");
    let out = producer_search(&app, user, &["tides", "--no-rerank"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (args, names) in [
        (
            &["tides", "--rerank", "--no-rerank"][..],
            "cannot be used with",
        ),
        (&["tides", "--mode", "fuzzy"][..], "unknown mode \"fuzzy\""),
        (&["tides", "--filter", "{"][..], "the filter is not JSON"),
        (
            &["tides", "--filter", r#"{"type":"eq","key":"team"}"#][..],
            "filters.value",
        ),
        (
            &[
                "tides",
                "--filter",
                r#"{"type":"like","key":"team","value":"o"}"#,
            ][..],
            "filters.type",
        ),
    ] {
        let out = producer_search(&app, user, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?} should name {names:?}: {err}");
    }
}
