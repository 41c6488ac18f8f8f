//! Filters: every operator and compound over metadata and the documents' own fields, applied before the top hits
//! are taken, in every mode; malformed ones answered 422 with the part at fault.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tests::{TestApp, settings, unique_prefix};
use upload_pipeline::client::{
    ClientError, ComparisonOp, ErrorCode, Filter, SearchMode, SearchRequest,
};
use uuid::Uuid;

use super::{Doc, names, post_search, seed};

/// The filenames a hybrid search for "harbour" returns under `filter`.
async fn filtered(app: &TestApp, user: Uuid, filter: Value) -> BTreeSet<String> {
    let (status, body) = post_search(
        app,
        user,
        json!({"query": "harbour", "k": 20, "filters": filter}),
    )
    .await;
    assert_eq!(status, 200, "{filter}: {body}");
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["filename"].as_str().unwrap().to_owned())
        .collect()
}

/// `names` as the set [`filtered`] returns.
fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Four documents with metadata, each with one chunk about the harbour; their ids in this order.
async fn seed_four(app: &TestApp, user: Uuid) -> Vec<Uuid> {
    let docs = [
        (
            "alpha.md",
            "text/markdown",
            r#"{"team": "ops", "year": 2023, "tags": ["red", "blue"], "public": true}"#,
        ),
        (
            "beta.txt",
            "text/plain",
            r#"{"team": "dev", "year": 2024, "public": false}"#,
        ),
        (
            "gamma.txt",
            "text/plain",
            r#"{"team": "ops", "year": 2025}"#,
        ),
        ("delta.html", "text/html", "{}"),
    ];
    let created = [
        "2026-01-01T00:00:00Z",
        "2026-02-01T00:00:00Z",
        "2026-03-01T00:00:00Z",
        "2026-04-01T00:00:00Z",
    ];
    let mut ids = Vec::new();
    for ((filename, content_type, metadata), created_at) in docs.into_iter().zip(created) {
        let doc = Doc {
            content_type,
            metadata: serde_json::from_str(metadata).unwrap(),
            created_at,
            ..Doc::ready(
                filename,
                &["The harbour lights guide the ships home at night."],
            )
        };
        ids.push(seed(app, user, doc).await);
    }
    ids
}

/// (filter, the files it lets through) over [`seed_four`]'s documents, by their metadata.
const METADATA_CASES: &[(&str, &[&str])] = &[
    (
        r#"{"type": "eq", "key": "team", "value": "ops"}"#,
        &["alpha.md", "gamma.txt"],
    ),
    (
        r#"{"type": "ne", "key": "team", "value": "ops"}"#,
        &["beta.txt", "delta.html"],
    ),
    (
        r#"{"type": "gt", "key": "year", "value": 2024}"#,
        &["gamma.txt"],
    ),
    (
        r#"{"type": "gte", "key": "year", "value": 2024}"#,
        &["beta.txt", "gamma.txt"],
    ),
    (
        r#"{"type": "lt", "key": "year", "value": 2024}"#,
        &["alpha.md"],
    ),
    (
        r#"{"type": "lte", "key": "year", "value": 2024.0}"#,
        &["alpha.md", "beta.txt"],
    ),
    (
        r#"{"type": "in", "key": "team", "value": ["dev", "qa"]}"#,
        &["beta.txt"],
    ),
    (
        r#"{"type": "nin", "key": "team", "value": ["ops"]}"#,
        &["beta.txt", "delta.html"],
    ),
    (
        r#"{"type": "eq", "key": "tags", "value": "blue"}"#,
        &["alpha.md"],
    ),
    (
        r#"{"type": "eq", "key": "public", "value": true}"#,
        &["alpha.md"],
    ),
    (r#"{"type": "eq", "key": "year", "value": "2023"}"#, &[]),
    (
        r#"{"type": "and", "filters": [{"type": "eq", "key": "team", "value": "ops"}, {"type": "gte", "key": "year", "value": 2024}]}"#,
        &["gamma.txt"],
    ),
    (
        r#"{"type": "and", "filters": [{"type": "or", "filters": [{"type": "eq", "key": "team", "value": "dev"},
           {"type": "eq", "key": "team", "value": "ops"}]}, {"type": "ne", "key": "public", "value": true}]}"#,
        &["beta.txt", "gamma.txt"],
    ),
];

/// (filter, the files it lets through) over [`seed_four`]'s documents, by their own fields.
const FIELD_CASES: &[(&str, &[&str])] = &[
    (
        r#"{"type": "or", "filters": [{"type": "eq", "key": "content_type", "value": "text/html"},
           {"type": "eq", "key": "filename", "value": "alpha.md"}]}"#,
        &["alpha.md", "delta.html"],
    ),
    (
        r#"{"type": "in", "key": "content_type", "value": ["text/plain"]}"#,
        &["beta.txt", "gamma.txt"],
    ),
    (
        r#"{"type": "gt", "key": "filename", "value": "c"}"#,
        &["delta.html", "gamma.txt"],
    ),
    (
        r#"{"type": "gte", "key": "created_at", "value": "2026-02-15T01:00:00+01:00"}"#,
        &["delta.html", "gamma.txt"],
    ),
    // 2026-02-15T00:00:00Z in Unix seconds.
    (
        r#"{"type": "lt", "key": "created_at", "value": 1771113600}"#,
        &["alpha.md", "beta.txt"],
    ),
    (
        r#"{"type": "eq", "key": "created_at", "value": "2026-03-01T00:00:00Z"}"#,
        &["gamma.txt"],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_operator_and_compound_narrows_the_documents_searched() {
    let app = TestApp::spawn(settings(&unique_prefix("filters"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    let ids = seed_four(&app, user).await;
    for (filter, want) in METADATA_CASES.iter().chain(FIELD_CASES) {
        let filter: Value = serde_json::from_str(filter).unwrap();
        assert_eq!(
            filtered(&app, user, filter.clone()).await,
            set(want),
            "{filter}"
        );
    }
    let by_id =
        json!({"type": "eq", "key": "document_id", "value": ids[1].to_string().to_uppercase()});
    assert_eq!(filtered(&app, user, by_id).await, set(&["beta.txt"]));
    let not_ids = json!({"type": "nin", "key": "document_id", "value": [ids[0], ids[1]]});
    assert_eq!(
        filtered(&app, user, not_ids).await,
        set(&["delta.html", "gamma.txt"])
    );

    // The same filters in keyword and vector modes, through the typed client.
    let client = app.client(user);
    for mode in [SearchMode::Keyword, SearchMode::Vector] {
        let request = SearchRequest::new("harbour")
            .k(20)
            .mode(mode)
            .filters(Filter::compare(ComparisonOp::In, "year", vec![2023, 2025]));
        let hits = client.search_with(&request).await.unwrap().results;
        assert_eq!(
            names(&hits),
            BTreeSet::from(["alpha.md", "gamma.txt"]),
            "{mode}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_applied_before_the_top_k_are_taken() {
    let app = TestApp::spawn(settings(&unique_prefix("filter-k"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    // Sixty chunks nearer to the query than the one the filter lets through: more than the candidates of each list.
    let near: Vec<String> = (0..60)
        .map(|i| format!("harbour lights number {i} guide ships home"))
        .collect();
    let near: Vec<&str> = near.iter().map(String::as_str).collect();
    let many = Doc {
        metadata: json!({"team": "dev"}),
        ..Doc::ready("many.txt", &near)
    };
    seed(&app, user, many).await;
    let far = Doc {
        metadata: json!({"team": "ops"}),
        ..Doc::ready(
            "far.txt",
            &["Ships come home to the harbour when the fog lifts over the breakwater."],
        )
    };
    seed(&app, user, far).await;
    let client = app.client(user);
    for mode in [SearchMode::Hybrid, SearchMode::Vector, SearchMode::Keyword] {
        let request = SearchRequest::new("harbour lights guide ships home")
            .k(1)
            .mode(mode)
            .filters(Filter::compare(ComparisonOp::Eq, "team", "ops"));
        let query = if mode == SearchMode::Keyword {
            SearchRequest {
                query: "harbour".into(),
                ..request
            }
        } else {
            request
        };
        let hits = client.search_with(&query).await.unwrap().results;
        assert_eq!(names(&hits), BTreeSet::from(["far.txt"]), "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_filters_modes_and_queries_are_refused_with_422_naming_the_part() {
    let app = TestApp::spawn(settings(&unique_prefix("bad-filter"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    let mut too_deep = json!({"type": "eq", "key": "a", "value": 1});
    for _ in 0..5 {
        too_deep = json!({"type": "and", "filters": [too_deep]});
    }
    let cases = [
        (
            json!({"type": "and", "filters": [{"type": "eq", "key": "a", "value": 1}, {"type": "like", "key": "a", "value": "x%"}]}),
            "filters.filters[1].type: unknown filter type 'like'",
        ),
        (
            json!({"type": "eq", "value": "ops"}),
            "filters.key: must be a string",
        ),
        (
            json!({"type": "gt", "key": "year", "value": true}),
            "filters.value: gt compares numbers",
        ),
        (
            json!({"type": "in", "key": "team", "value": "ops"}),
            "filters.value: in takes an array of 1 to 100 values",
        ),
        (
            json!({"type": "eq", "key": "document_id", "value": "42"}),
            "filters.value: document_id is compared with UUID strings",
        ),
        (
            too_deep,
            "filters.filters[0].filters[0].filters[0].filters[0].filters[0]: filters nest at most 5 deep",
        ),
        (
            json!(["team", "ops"]),
            "filters: must be an object, not an array",
        ),
        // What Postgres could not take, refused before it gets there.
        (
            json!({"type": "eq", "key": "te\u{0}am", "value": "ops"}),
            "filters.key: must not contain NUL characters",
        ),
        (
            json!({"type": "in", "key": "team", "value": ["ops", "o\u{0}ps"]}),
            "filters.value[1]: strings must not contain NUL characters",
        ),
        (
            json!({"type": "gte", "key": "created_at", "value": "0000-01-01T00:00:00Z"}),
            "filters.value: created_at is compared with an RFC 3339 time",
        ),
        (
            json!({"type": "gte", "key": "created_at", "value": "2026-01-01T00:00:00+16:00"}),
            "filters.value: created_at is compared with an RFC 3339 time",
        ),
        (
            json!({"type": "eq", "key": "document_id", "value": "{6f1c2a9e-0000-4000-8000-000000000001}"}),
            "filters.value: document_id is compared with UUID strings",
        ),
        (
            json!({"type": "nin", "key": "document_id", "value": ["urn:uuid:6f1c2a9e-0000-4000-8000-000000000001"]}),
            "filters.value[0]: document_id is compared with UUID strings",
        ),
    ];
    for (filter, message) in cases {
        let (status, body) =
            post_search(&app, user, json!({"query": "tides", "filters": filter})).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "invalid_filter", "{body}");
        let got = body["error"]["message"].as_str().unwrap();
        assert!(got.starts_with(message), "{got} / {message}");
    }
    // 4,000 characters as sent, 72,000 once in Unicode compatibility form (U+FDFA is 18 characters in NFKC).
    let (status, body) = post_search(&app, user, json!({"query": "\u{FDFA}".repeat(4000)})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_query")),
        "{body}"
    );
    let (status, body) = post_search(&app, user, json!({"query": "tides", "mode": "fuzzy"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_mode")),
        "{body}"
    );
    let (status, body) = post_search(&app, user, json!({"query": "tides", "filter": {}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_request")),
        "{body}"
    );

    let bad = SearchRequest::new("tides").filters(Filter::compare(
        ComparisonOp::Gte,
        "created_at",
        "soon",
    ));
    match app.client(user).search_with(&bad).await {
        Err(ClientError::Api {
            status: 422,
            code: ErrorCode::InvalidFilter,
            message,
        }) => {
            assert!(message.contains("created_at"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
