//! What each mode puts first: the exact identifier in hybrid, a quoted phrase in keyword mode (without embedding
//! the query), the corpus passages in hybrid as in vector mode; and the citation a hit carries.

use std::collections::BTreeSet;

use serde_json::json;
use tests::{
    TestApp,
    fake::{FakeConfig, FakeProviders},
    settings, unique_prefix,
};
use upload_pipeline::{
    chunking,
    client::{SearchMode, SearchRequest},
    parsing::{self, DocKind, Limits},
};
use uuid::Uuid;

use super::{Doc, names, post_search, seed};

const IDENTIFIER_CHUNK: &str = "Deploying the payments service behind the new load balancer, Node refused every \
     upstream call with ERR_TLS_CERT_ALTNAME_INVALID until the certificate listed the internal host names; the fix \
     was a new certificate with the right subject alternative names and a restart of the workers.";
const LOOKALIKE_CHUNK: &str = "TLS cert errors: an invalid TLS cert is the most common TLS err; check the cert \
     chain and the cert expiry before anything else.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_search_puts_first_the_chunk_with_the_exact_identifier_that_vector_search_ranks_lower()
 {
    let app = TestApp::spawn(settings(&unique_prefix("hybrid"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    let mut incident = Doc::ready("incident.md", &[]);
    incident.content_type = "text/markdown";
    incident.metadata = json!({"team": "payments"});
    incident.chunks = vec![(
        IDENTIFIER_CHUNK.to_owned(),
        json!({"page": 3, "headings": ["Incidents", "TLS"], "span": [120, 410]}),
    )];
    let incident = seed(&app, user, incident).await;
    seed(&app, user, Doc::ready("tls-faq.txt", &[LOOKALIKE_CHUNK])).await;
    let other = [
        "Sourdough needs a lively starter, a long cold proof and a very hot oven.",
        "Tides follow the moon; spring tides come at new and full moon.",
    ];
    seed(&app, user, Doc::ready("notes.txt", &other)).await;
    let client = app.client(user);
    let query = "ERR_TLS_CERT_ALTNAME_INVALID";

    let vector = client
        .search_with(&SearchRequest::new(query).mode(SearchMode::Vector))
        .await
        .unwrap();
    assert_eq!(vector.mode, SearchMode::Vector);
    assert_eq!(vector.results[0].filename, "tls-faq.txt", "{vector:#?}");
    assert_eq!(vector.results[1].document_id, incident);
    assert!(vector.results.iter().all(|h| h.keyword_rank.is_none()));

    let hybrid = client.search(query, 5).await.unwrap();
    assert_eq!(hybrid.mode, SearchMode::Hybrid);
    let best = &hybrid.results[0];
    assert_eq!(best.document_id, incident, "{hybrid:#?}");
    assert_eq!((best.keyword_rank, best.vector_rank), (Some(1), Some(2)));
    assert_eq!(hybrid.results[1].filename, "tls-faq.txt");
    assert_eq!(hybrid.results[1].keyword_rank, None);
    assert!(best.score > hybrid.results[1].score);
    // An identifier: the keyword list weighs search.identifier_boost (3) times keyword_weight.
    assert_eq!(app.settings.search.identifier_boost, 3.0);
    assert!(
        (best.score - (3.0 / 61.0 + 1.0 / 62.0)).abs() < 1e-9,
        "{}",
        best.score
    );

    // The citation: where the passage is, in which document.
    assert_eq!(best.content, IDENTIFIER_CHUNK);
    assert_eq!(best.content_type, "text/markdown");
    assert_eq!(best.page, Some(3));
    assert_eq!(best.headings, ["Incidents", "TLS"]);
    assert_eq!(best.span, Some([120, 410]));
    assert_eq!(best.document_metadata, json!({"team": "payments"}));
    assert_eq!(best.chunk_index, 0);
    let chunk: Uuid = sqlx::query_scalar(
        "SELECT id FROM upload_pipeline.document_chunks WHERE document_id = $1 AND chunk_index = 0",
    )
    .bind(incident)
    .fetch_one(app.admin())
    .await
    .unwrap();
    assert_eq!(best.chunk_id, chunk);
    assert_eq!(hybrid.results[1].page, None);
    assert_eq!(hybrid.results[1].span, None);
    assert!(hybrid.results[1].headings.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyword_search_finds_a_quoted_phrase_and_never_calls_the_embedder() {
    let fake = FakeProviders::start(FakeConfig::default()).await;
    let mut s = settings(&unique_prefix("keyword"), &tests::redis_url());
    fake.embed_with(&mut s);
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    let phrase = "The quick brown fox jumps over the lazy dog in every font specimen.";
    let scattered = "A brown dog chased the fox; the fox was quick, the dog was not.";
    seed(&app, user, Doc::ready("specimen.txt", &[phrase])).await;
    seed(&app, user, Doc::ready("chase.txt", &[scattered])).await;
    let client = app.client(user);
    let keyword = |q: &str| SearchRequest::new(q).mode(SearchMode::Keyword).k(10);

    let found = client
        .search_with(&keyword("\"quick brown fox\""))
        .await
        .unwrap();
    assert_eq!(names(&found.results), BTreeSet::from(["specimen.txt"]));
    let hit = &found.results[0];
    assert_eq!((hit.keyword_rank, hit.vector_rank), (Some(1), None));
    assert!(hit.score > 0.0 && hit.score < 1.0, "{}", hit.score);
    let words = client
        .search_with(&keyword("quick brown fox"))
        .await
        .unwrap();
    assert_eq!(
        names(&words.results),
        BTreeSet::from(["chase.txt", "specimen.txt"])
    );
    let excluded = client.search_with(&keyword("fox -dog")).await.unwrap();
    assert!(excluded.results.is_empty(), "{excluded:#?}");
    assert_eq!(
        fake.stats().await.embedding_requests,
        0,
        "keyword search must not embed the query"
    );

    // Postgres takes no NUL in text: the keyword list reads the query without it.
    let (status, body) = post_search(
        &app,
        user,
        json!({"query": "quick\u{0}brown fox", "mode": "keyword"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["filename"], "specimen.txt", "{body}");
    client.search("quick brown fox", 5).await.unwrap();
    assert_eq!(
        fake.stats().await.embedding_requests,
        1,
        "hybrid embeds it once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_asks_again_for_its_query_vector_when_the_provider_fails_and_answers_503_when_it_keeps_failing()
 {
    let fake = FakeProviders::start(FakeConfig::default()).await;
    let mut s = settings(&unique_prefix("query-retry"), &tests::redis_url());
    fake.embed_with(&mut s);
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    seed(&app, user, Doc::ready("fox.txt", &["The quick brown fox."])).await;
    let body = json!({"query": "quick brown fox", "mode": "vector"});
    let mut config = FakeConfig::default();

    // Two 5xx in a row (the fake's 503 "overloaded", OpenAI's words): the third request answers.
    config.openai.fail_next = 2;
    fake.configure(&config).await;
    let (status, answer) = post_search(&app, user, body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["filename"], "fox.txt", "{answer}");
    assert_eq!(fake.stats().await.embedding_requests, 3);

    // Three in a row: the search gives up after three requests and says the provider is unavailable.
    config.openai.fail_next = 3;
    fake.configure(&config).await;
    let (status, answer) = post_search(&app, user, body.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    assert_eq!(fake.stats().await.embedding_requests, 6);

    // A refused key is not asked again.
    config.openai.fail_next = 0;
    config.openai.key_revoked = true;
    fake.configure(&config).await;
    let (status, answer) = post_search(&app, user, body).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(fake.stats().await.embedding_requests, 7);
}

/// Parses and chunks a file of the test corpus as the parse and chunk stages do, and seeds it as ready.
async fn seed_corpus_file(app: &TestApp, user: Uuid, name: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/corpus")
        .join(name);
    let bytes = std::fs::read(&path).expect("a corpus file");
    let kind = DocKind::detect(name, &bytes).expect("a known kind");
    let limits = Limits {
        max_pages: app.settings.pipeline.max_pages,
        max_chars: app.settings.pipeline.max_chars,
    };
    let sections = parsing::parse(kind, &bytes, limits).expect("parses");
    let sizes = &app.settings.chunking;
    let chunks = chunking::chunk(
        &sections,
        sizes.max_tokens,
        sizes.overlap_tokens,
        sizes.max_chunks,
    )
    .expect("chunks");
    let doc = Doc {
        content_type: kind.content_type(),
        chunks: chunks
            .into_iter()
            .map(|c| (c.content, c.metadata))
            .collect(),
        ..Doc::ready(name, &[])
    };
    seed(app, user, doc).await;
}

/// The queries of the pipeline's own test: (query, file of the best hit, text it holds, its page).
const CORPUS_QUERIES: &[(&str, &str, &str, Option<i32>)] = &[
    (
        "spring tides and neap tides with the moon",
        "tides.txt",
        "neap tides",
        None,
    ),
    (
        "feeding a sourdough starter flour and water",
        "sourdough.md",
        "starter",
        None,
    ),
    (
        "pyroclastic flow from Vesuvius buried Pompeii",
        "volcanoes.html",
        "Pompeii",
        None,
    ),
    (
        "forager waggle dance direction of flowers",
        "honeybees.pdf",
        "waggle",
        Some(1),
    ),
    (
        "bees shiver flight muscles to keep the cluster warm in winter",
        "honeybees.pdf",
        "shiver",
        Some(2),
    ),
    (
        "Fresnel lens glass prisms beam",
        "lighthouses.docx",
        "Fresnel",
        Some(1),
    ),
    (
        "lighthouse keepers trimmed the wicks",
        "lighthouses.docx",
        "keepers",
        Some(2),
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_search_finds_the_corpus_passages_that_vector_search_finds() {
    let app = TestApp::spawn(settings(&unique_prefix("corpus"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    let files = [
        "tides.txt",
        "sourdough.md",
        "volcanoes.html",
        "honeybees.pdf",
        "lighthouses.docx",
    ];
    for name in files {
        seed_corpus_file(&app, user, name).await;
    }
    let client = app.client(user);
    for &(query, file, text, page) in CORPUS_QUERIES {
        for mode in [SearchMode::Hybrid, SearchMode::Vector] {
            let found = client
                .search_with(&SearchRequest::new(query).k(3).mode(mode))
                .await
                .unwrap();
            let best = &found.results[0];
            assert_eq!(best.filename, file, "{mode} {query:?}: {found:#?}");
            assert!(
                best.content.contains(text),
                "{mode} {query:?}: {}",
                best.content
            );
            assert_eq!(best.page, page, "{mode} {query:?}");
            let [start, end] = best.span.expect("chunks record their span");
            assert!(start < end, "{start}..{end}");
            assert!(found.results.windows(2).all(|w| w[0].score >= w[1].score));
        }
    }
    let fresnel = client.search("Fresnel lens", 1).await.unwrap();
    assert_eq!(
        fresnel.results[0].headings,
        ["Lighthouses", "The Fresnel lens"]
    );
}
