//! Reranking against the fake rerankers: the fused hits come back in the reranker's order for each protocol (with
//! a server that takes fewer documents per request than sent); a failing reranker (429, then 500, then a timeout)
//! answers the fused order with `reranked: false` and is counted, its Retry-After honoured; a refused key pauses it;
//! the request decides for itself; the requests-per-minute budget is shared by the fleet.
//!
//! The fake scores a document by the share of the query's words it holds (`tests::fake::rerank::score`), exactly,
//! while keyword search stems: the query below matches one chunk by its stems (fused first) that holds almost none
//! of its exact words, so the reranked order must differ from the fused one at the top.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{
    Api, TestApp,
    fake::{FakeConfig, FakeProviders, RerankConfig, rerank},
    settings, sum_metric, unique_prefix, wait_for,
};
use upload_pipeline::{Settings, settings::RerankApi};
use uuid::Uuid;

use super::{Doc, seed};

const QUERY: &str = "pilots boarding ladders harbour";
/// Matches every word of the query by its stem (keyword rank 1, so fused first), but holds only "harbour" exactly.
const STEMS: &str = "The pilot boards by the ladder when the harbour is calm.";
/// Holds three of the query's words exactly, but not "harbour": below `STEMS` in the keyword list (a query of four
/// words lists the chunks holding some of its words after those holding all).
const EXACT: &str = "Pilots boarding ladders must be rigged by the crew.";
const ONE_WORD: &str = "Harbour dues rise in spring.";
const NONE: &str = "Sourdough needs a lively starter and a very hot oven.";

/// The fake rerankers: their key, and whatever the test scripts.
async fn start_fake(rerank: RerankConfig) -> FakeProviders {
    let rerank = RerankConfig {
        keys: vec!["rerank-test".into()],
        ..rerank
    };
    FakeProviders::start_with_rerank(FakeConfig::default(), rerank).await
}

/// A test's settings with the reranker `api` on the fake, its budget under the test's own prefix.
fn rerank_settings(test: &str, fake: &FakeProviders, api: RerankApi) -> Settings {
    let mut s = settings(&unique_prefix(test), &tests::redis_url());
    fake.rerank_with(&mut s, api);
    s
}

/// Seeds the four documents for `user`.
async fn seed_corpus(app: &TestApp, user: Uuid) {
    for (name, text) in [
        ("stems.txt", STEMS),
        ("exact.txt", EXACT),
        ("one-word.txt", ONE_WORD),
        ("none.txt", NONE),
    ] {
        seed(app, user, Doc::ready(name, &[text])).await;
    }
}

/// `POST {url}/v1/search` with `body` and `token`: the status and the JSON answer.
async fn search_at(url: &str, token: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/search"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("search");
    (resp.status().as_u16(), resp.json().await.expect("JSON"))
}

/// The search's hits as (file name, content, score, rerank_score).
fn hits(body: &Value) -> Vec<(String, String, f64, Option<f64>)> {
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {body}"))
        .iter()
        .map(|h| {
            (
                h["filename"].as_str().expect("filename").to_owned(),
                h["content"].as_str().expect("content").to_owned(),
                h["score"].as_f64().expect("score"),
                h["rerank_score"].as_f64(),
            )
        })
        .collect()
}

fn filenames(hits: &[(String, String, f64, Option<f64>)]) -> Vec<&str> {
    hits.iter().map(|h| h.0.as_str()).collect()
}

/// The fused order of every seeded chunk (no reranking).
async fn fused(url: &str, token: &str) -> Vec<(String, String, f64, Option<f64>)> {
    let (status, body) = search_at(
        url,
        token,
        json!({"query": QUERY, "k": 10, "rerank": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reranked"], false, "{body}");
    let fused = hits(&body);
    assert_eq!(fused.len(), 4, "every chunk is a vector candidate: {body}");
    assert!(fused.iter().all(|h| h.3.is_none()), "{body}");
    fused
}

/// A search reranked by the fake speaking `api` comes back in the fake's order, each hit with its rerank score and
/// its fused score, the best `k` of all the fused candidates, which were all sent.
async fn reorders(api: RerankApi, max_documents: usize) {
    let fake = start_fake(RerankConfig {
        max_documents,
        ..RerankConfig::default()
    })
    .await;
    let app = TestApp::spawn(rerank_settings("rerank-order", &fake, api)).await;
    let user = Uuid::new_v4();
    seed_corpus(&app, user).await;
    let token = app.token(user);
    let fused = fused(&app.api.url, &token).await;
    assert_eq!(fused[0].0, "stems.txt", "{fused:#?}");
    assert_eq!(
        fake.stats().await.rerank_requests,
        0,
        "rerank: false calls no reranker"
    );

    // What the fake must answer: the fused candidates in the order of its scores.
    let contents: Vec<&str> = fused.iter().map(|h| h.1.as_str()).collect();
    let expected: Vec<&str> = rerank::ranking(QUERY, &contents)
        .into_iter()
        .map(|i| fused[i].0.as_str())
        .collect();
    assert_eq!(expected[0], "exact.txt", "{expected:?}");
    assert_ne!(
        expected,
        filenames(&fused),
        "the fused order is already the reranker's"
    );

    // On by default (search.rerank.enabled), k = 2 of the 4 candidates.
    let (status, body) = search_at(&app.api.url, &token, json!({"query": QUERY, "k": 2})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reranked"], true, "{api:?}: {body}");
    let reranked = hits(&body);
    assert_eq!(filenames(&reranked), expected[..2], "{api:?}: {body}");
    for (name, content, score, rerank_score) in &reranked {
        assert_eq!(*rerank_score, Some(rerank::score(QUERY, content)), "{name}");
        let was = fused.iter().find(|h| &h.0 == name).expect("a fused hit");
        assert!(
            (score - was.2).abs() < 1e-12,
            "{name} keeps its fused score"
        );
    }
    let stats = fake.stats().await;
    assert_eq!(
        stats.reranked_documents, 4,
        "every candidate is sent: {stats:?}"
    );
    let expected_requests = if max_documents > 0 {
        // Refused as too large once, then the candidates in requests of at most max_documents.
        1 + 4u64.div_ceil(max_documents as u64)
    } else {
        1
    };
    assert_eq!(stats.rerank_requests, expected_requests, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reranking_puts_first_what_cohere_ranks_first_not_what_fusion_did() {
    reorders(RerankApi::Cohere, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reranking_puts_first_what_jina_ranks_first_not_what_fusion_did() {
    reorders(RerankApi::Jina, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reranking_with_text_embeddings_inference_sends_fewer_documents_per_request_when_told_to() {
    reorders(RerankApi::Tei, 3).await;
}

/// Runs `test` on a runtime of this thread with a metrics recorder of its own: the API serves in this test's
/// runtime, so what it counts is this test's alone (other tests share the process).
fn with_own_metrics<F: std::future::Future<Output = ()>>(
    test: impl FnOnce(metrics_exporter_prometheus::PrometheusHandle) -> F,
) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || runtime.block_on(test(handle)));
}

fn failures(handle: &metrics_exporter_prometheus::PrometheusHandle, reason: &str) -> f64 {
    sum_metric(
        &handle.render(),
        upload_pipeline::metrics::SEARCH_RERANK_FAILURES,
        &[&format!("reason=\"{reason}\"")],
    )
}

#[test]
fn a_failing_reranker_answers_the_fused_order_unreranked_honours_retry_after_and_is_counted() {
    with_own_metrics(|metrics| async move {
        let fake = start_fake(RerankConfig {
            fail_next: vec![429, 500],
            retry_after_s: 2,
            hang_next: 1,
            faults: tests::fake::Faults {
                hang_ms: 5_000,
                ..Default::default()
            },
            ..RerankConfig::default()
        })
        .await;
        let mut s = rerank_settings("rerank-failures", &fake, RerankApi::Cohere);
        s.search.rerank.timeout = Duration::from_millis(500);
        let app = TestApp::spawn(s).await;
        let user = Uuid::new_v4();
        seed_corpus(&app, user).await;
        let token = app.token(user);
        let fused = fused(&app.api.url, &token).await;
        let unreranked = |body: &Value| {
            assert_eq!(body["reranked"], false, "{body}");
            let got = hits(body);
            assert_eq!(
                filenames(&got),
                filenames(&fused),
                "the fused order: {body}"
            );
            assert!(got.iter().all(|h| h.3.is_none()), "{body}");
        };
        let ask = || search_at(&app.api.url, &token, json!({"query": QUERY, "k": 10}));

        // 429 with Retry-After: 2.
        let (status, body) = ask().await;
        assert_eq!(status, 200, "{body}");
        unreranked(&body);
        assert_eq!(failures(&metrics, "rate_limited"), 1.0);
        // The fleet waits the Retry-After out: the next search does not ask the reranker.
        let (_, body) = ask().await;
        unreranked(&body);
        assert_eq!(
            fake.stats().await.rerank_requests,
            1,
            "asked during the cool-down"
        );
        assert_eq!(failures(&metrics, "throttled"), 1.0);
        // Once it is over: a 500, then a request that hangs past search.rerank.timeout.
        wait_for(
            "the reranker to be asked again",
            Duration::from_secs(30),
            || {
                let (ask, unreranked, fake) = (&ask, &unreranked, &fake);
                async move {
                    let (_, body) = ask().await;
                    unreranked(&body);
                    (fake.stats().await.rerank_requests >= 3).then_some(())
                }
            },
        )
        .await;
        assert_eq!(failures(&metrics, "transient"), 2.0, "{}", metrics.render());
        assert_eq!(failures(&metrics, "rate_limited"), 1.0);
        // Then it works again.
        let (_, body) = ask().await;
        assert_eq!(body["reranked"], true, "{body}");
        assert_eq!(hits(&body)[0].0, "exact.txt", "{body}");
        let requests = sum_metric(
            &metrics.render(),
            upload_pipeline::metrics::PROVIDER_REQUESTS,
            &["provider=\"cohere\"", "operation=\"rerank\""],
        );
        assert_eq!(requests, 4.0, "{}", metrics.render());
    });
}

#[test]
fn a_refused_key_pauses_the_reranker_instead_of_asking_on_every_search() {
    with_own_metrics(|metrics| async move {
        let fake = start_fake(RerankConfig {
            key_revoked: true,
            ..RerankConfig::default()
        })
        .await;
        let app = TestApp::spawn(rerank_settings("rerank-refused", &fake, RerankApi::Jina)).await;
        let user = Uuid::new_v4();
        seed_corpus(&app, user).await;
        let token = app.token(user);
        for _ in 0..3 {
            let (status, body) = search_at(&app.api.url, &token, json!({"query": QUERY})).await;
            assert_eq!((status, &body["reranked"]), (200, &json!(false)), "{body}");
        }
        assert_eq!(
            fake.stats().await.rerank_requests,
            1,
            "a paused reranker is not asked"
        );
        assert_eq!(
            failures(&metrics, "unauthorized"),
            3.0,
            "{}",
            metrics.render()
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_reranks_or_not_whatever_the_setting_and_is_refused_a_reranker_there_is_none_of()
{
    let fake = start_fake(RerankConfig::default()).await;
    let mut s = rerank_settings("rerank-override", &fake, RerankApi::Cohere);
    s.search.rerank.enabled = false;
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    seed_corpus(&app, user).await;
    let token = app.token(user);
    let reranked = |body: &Value| body["reranked"].as_bool().expect("reranked");

    // Configured but off: asked for.
    let (_, body) = search_at(&app.api.url, &token, json!({"query": QUERY})).await;
    assert!(!reranked(&body), "{body}");
    assert_eq!(fake.stats().await.rerank_requests, 0);
    let (_, body) = search_at(
        &app.api.url,
        &token,
        json!({"query": QUERY, "rerank": true}),
    )
    .await;
    assert!(reranked(&body), "{body}");
    assert_eq!(hits(&body)[0].0, "exact.txt", "{body}");
    assert_eq!(fake.stats().await.rerank_requests, 1);

    // On: refused by the request (and `null` is the setting).
    let mut on = app.settings.clone();
    on.search.rerank.enabled = true;
    let api = Api::start(&on).await;
    let (_, body) = search_at(&api.url, &token, json!({"query": QUERY, "rerank": false})).await;
    assert!(!reranked(&body), "{body}");
    assert_eq!(fake.stats().await.rerank_requests, 1);
    let (_, body) = search_at(&api.url, &token, json!({"query": QUERY, "rerank": null})).await;
    assert!(reranked(&body), "{body}");
    api.stop().await;

    // None configured: asking is a 422 with the API's error body; not asking is fine.
    let mut none = app.settings.clone();
    none.search.rerank.enabled = false;
    none.search.rerank.model = String::new();
    let api = Api::start(&none).await;
    let (status, body) = search_at(&api.url, &token, json!({"query": QUERY, "rerank": true})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "rerank_not_configured", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("search.rerank.model")),
        "{body}"
    );
    let (status, body) =
        search_at(&api.url, &token, json!({"query": QUERY, "rerank": false})).await;
    assert_eq!((status, reranked(&body)), (200, false), "{body}");
    let (status, body) =
        search_at(&api.url, &token, json!({"query": QUERY, "rerank": "yes"})).await;
    assert_eq!(status, 422, "{body}");
    api.stop().await;
    assert_eq!(fake.stats().await.rerank_requests, 2);

    // The typed client says the same.
    let client = app.client(user);
    let typed = client
        .search_with(
            &upload_pipeline::client::SearchRequest::new(QUERY)
                .k(1)
                .rerank(true),
        )
        .await
        .unwrap();
    assert!(typed.reranked);
    assert_eq!(typed.results[0].filename, "exact.txt");
    assert_eq!(
        typed.results[0].rerank_score,
        Some(rerank::score(QUERY, EXACT))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rerankers_requests_per_minute_are_shared_by_every_replica() {
    let fake = start_fake(RerankConfig::default()).await;
    let mut s = rerank_settings("rerank-quota", &fake, RerankApi::Cohere);
    // Two a minute: a burst of one, the next in about 31 s, far beyond max_wait.
    s.search.rerank.requests_per_minute = 2;
    let app = TestApp::spawn(s).await;
    let other = Api::start(&app.settings).await;
    let user = Uuid::new_v4();
    seed_corpus(&app, user).await;
    let token = app.token(user);
    let (_, body) = search_at(&app.api.url, &token, json!({"query": QUERY})).await;
    assert_eq!(body["reranked"], true, "{body}");
    // The other replica's own budget would be full; the fleet's is spent.
    let (status, body) = search_at(&other.url, &token, json!({"query": QUERY})).await;
    assert_eq!((status, &body["reranked"]), (200, &json!(false)), "{body}");
    assert_eq!(hits(&body)[0].0, "stems.txt", "the fused order: {body}");
    assert_eq!(fake.stats().await.rerank_requests, 1);
    other.stop().await;
}
