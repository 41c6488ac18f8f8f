//! Identifier-like queries (`upload_pipeline.identifier_query`: at most 4 words, or 8 with an identifier) get a
//! keyword list of their own (migration `20261203000000_keyword_ranking.sql`): BM25 puts the chunk that defines the
//! identifier before a longer one that mentions it more often in passing; the chunks holding every word come first,
//! then those holding some (`-word` still excludes); the list weighs `search.identifier_boost` times more in hybrid
//! search; its statistics are the caller's own, read from the caller's part of the `(user_id, tsv)` index. A
//! sentence of at most 16 terms gets the same list, not boosted (`20261204000000_sentence_keywords.sql`); a longer
//! one the list before.

use sqlx::Connection as _;
use tests::{TestApp, settings, unique_prefix};
use upload_pipeline::{
    Settings,
    client::{Hit, SearchMode, SearchRequest},
};
use uuid::Uuid;

use super::{Doc, seed};

/// Defines the setting, once, in a short chunk.
const DEFINES: &str =
    "`max_wal_senders` (`integer`): the most concurrent connections from standby servers.";
/// Mentions the setting twice in passing, in a long chunk about something else.
const PASSING: &str = "Streaming replication needs a few settings on the primary before the first standby \
     connects. Raise max_wal_senders above the number of standbys you plan to run, keep wal_keep_size large enough \
     for a standby that falls behind, and give each standby its own replication slot so that the primary keeps the \
     write-ahead log it still needs. A base backup taken with pg_basebackup over the replication protocol also \
     counts against max_wal_senders while it runs, and so does pg_receivewal when it archives the log on another \
     machine.";
/// The appendix's table row: the code, without the word SQLSTATE.
const ROW: &str = "| `40P01` | `deadlock_detected` |";
/// Both words of `SQLSTATE 40P01`.
const BOTH: &str = "A deadlock aborts one of the transactions with SQLSTATE 40P01; retry it.";
/// The word SQLSTATE alone, three times over: a commoner word than 40P01.
const CODES: [&str; 3] = [
    "Every error carries a five-character SQLSTATE code.",
    "Applications should test the SQLSTATE, not the message text.",
    "psql shows the SQLSTATE of an error in verbose mode.",
];
const TIDES: &str = "Tides follow the moon; spring tides come at new and full moon.";

/// Seeds every chunk above for `user`, one document each, named after it.
async fn seed_all(app: &TestApp, user: Uuid) {
    let mut docs = vec![
        ("defines.md", DEFINES),
        ("passing.md", PASSING),
        ("row.md", ROW),
        ("both.md", BOTH),
        ("tides.md", TIDES),
    ];
    docs.extend(
        [
            ("codes1.md", CODES[0]),
            ("codes2.md", CODES[1]),
            ("codes3.md", CODES[2]),
        ]
        .iter(),
    );
    for (name, text) in docs {
        seed(app, user, Doc::ready(name, &[text])).await;
    }
}

/// Keyword mode's hits for `query`, at most 20.
async fn keyword(app: &TestApp, user: Uuid, query: &str) -> Vec<Hit> {
    let request = SearchRequest::new(query).k(20).mode(SearchMode::Keyword);
    app.client(user)
        .search_with(&request)
        .await
        .unwrap()
        .results
}

/// A hybrid search of `k` hits as `user`.
async fn hybrid_search(app: &TestApp, user: Uuid, query: &str, k: u32) -> Vec<Hit> {
    app.client(user)
        .search_with(&SearchRequest::new(query).k(k))
        .await
        .unwrap()
        .results
}

fn files(hits: &[Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.filename.as_str()).collect()
}

/// The list of the queries before, `keyword_candidates` (`ts_rank_cd`, every word required), as `user`: file names.
async fn list_before(app: &TestApp, user: Uuid, query: &str) -> Vec<String> {
    let mut tx = upload_pipeline::db::begin_as(app.admin(), user)
        .await
        .unwrap();
    let names = sqlx::query_scalar(
        "SELECT d.filename FROM upload_pipeline.keyword_candidates(websearch_to_tsquery('english', $1), NULL, 20) k \
         JOIN upload_pipeline.document_chunks c ON c.id = k.id \
         JOIN upload_pipeline.documents d ON d.id = c.document_id ORDER BY k.rank DESC, k.id",
    )
    .bind(query)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identifier_ranks_first_the_chunk_that_defines_it_not_a_longer_one_that_mentions_it_in_passing()
 {
    let app = TestApp::spawn(settings(&unique_prefix("ident-bm25"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    seed_all(&app, user).await;

    // ts_rank_cd counts occurrences: two in passing beat one definition.
    assert_eq!(
        list_before(&app, user, "max_wal_senders").await,
        ["passing.md", "defines.md"]
    );
    // BM25: each occurrence counts less, and less still in a long chunk.
    let hits = keyword(&app, user, "max_wal_senders").await;
    assert_eq!(files(&hits), ["defines.md", "passing.md"], "{hits:#?}");
    assert!(
        hits.iter().all(|h| h.score > 0.5 && h.score < 1.0),
        "both hold every word: {hits:#?}"
    );

    // In hybrid search, the keyword list's rank 1, weighing identifier_boost (3) times more: each hit's score is
    // the fusion's of its two ranks, whatever the vector list (the hashing embedder's) says.
    let hybrid = hybrid_search(&app, user, "max_wal_senders", 8).await;
    let defines = hybrid.iter().find(|h| h.filename == "defines.md");
    assert_eq!(defines.and_then(|h| h.keyword_rank), Some(1), "{hybrid:#?}");
    let passing = hybrid.iter().find(|h| h.filename == "passing.md");
    assert_eq!(passing.and_then(|h| h.keyword_rank), Some(2), "{hybrid:#?}");
    let part =
        |rank: Option<u32>, weight: f64| rank.map_or(0.0, |r| weight / (60.0 + f64::from(r)));
    for hit in &hybrid {
        let expected = part(hit.vector_rank, 1.0) + part(hit.keyword_rank, 3.0);
        assert!((hit.score - expected).abs() < 1e-9, "{hybrid:#?}");
    }
    assert!(hybrid.windows(2).all(|w| w[0].score >= w[1].score));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identifier_query_whose_words_are_not_all_in_one_chunk_still_finds_the_chunk_with_the_rare_one()
 {
    let app = TestApp::spawn(settings(&unique_prefix("ident-or"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    seed_all(&app, user).await;

    // Every word required: only the chunk that holds both.
    assert_eq!(list_before(&app, user, "SQLSTATE 40P01").await, ["both.md"]);
    // The chunks holding both words first, then those holding some: the rare 40P01 before the common SQLSTATE.
    let hits = keyword(&app, user, "SQLSTATE 40P01").await;
    assert_eq!(files(&hits)[..2], ["both.md", "row.md"], "{hits:#?}");
    assert_eq!(hits.len(), 5, "{hits:#?}");
    assert!(hits[0].score > 0.5, "{hits:#?}");
    assert!(hits[1..].iter().all(|h| h.score < 0.5), "{hits:#?}");
    let mut rest = files(&hits[2..]);
    rest.sort_unstable();
    assert_eq!(rest, ["codes1.md", "codes2.md", "codes3.md"]);

    // `-word` still excludes, in both tiers.
    let mut excluded = files(&keyword(&app, user, "SQLSTATE 40P01 -deadlock").await)
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    excluded.sort_unstable();
    assert_eq!(excluded, ["codes1.md", "codes2.md", "codes3.md"]);

    // Hybrid search fuses that list: the table row is in it.
    let hybrid = hybrid_search(&app, user, "SQLSTATE 40P01", 10).await;
    let row = hybrid.iter().find(|h| h.filename == "row.md");
    assert_eq!(row.and_then(|h| h.keyword_rank), Some(2), "{hybrid:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentence_lists_the_chunks_holding_every_word_then_some_by_bm25_and_is_not_boosted() {
    let mut s = settings(&unique_prefix("ident-sentence"), &tests::redis_url());
    s.search.identifier_boost = 20.0;
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    let every = [
        "The keeper trimmed the lamp wick every evening before the storm came in from the west.",
        "Every evening before the storm the keeper trimmed the lamp wick, and in the storm the keeper trimmed the \
         lamp wick again, every hour, until the morning.",
        "Lamp oil, wicks and glass were shipped to the keeper every month; in winter the storm kept the boat away, \
         and the keeper trimmed what wick was left each evening before dark.",
    ];
    let some = "The storm broke the lamp glass.";
    let mut chunks = every.to_vec();
    chunks.extend([some, TIDES]);
    seed(&app, user, Doc::ready("keeper.txt", &chunks)).await;
    let sentence = "how the keeper trimmed the lamp wick every evening before the storm";
    let mut tx = upload_pipeline::db::begin_as(app.admin(), user)
        .await
        .unwrap();
    let is_identifier: bool = sqlx::query_scalar("SELECT upload_pipeline.identifier_query($1)")
        .bind(sentence)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(!is_identifier);
    tx.rollback().await.unwrap();

    // Keyword mode: the chunks holding every word first (above 0.5), then the one holding some (below).
    let hits = keyword(&app, user, sentence).await;
    let contents: Vec<&str> = hits.iter().map(|h| h.content.as_str()).collect();
    assert_eq!(hits.len(), 4, "{hits:#?}");
    assert!(every.iter().all(|c| contents[..3].contains(c)), "{hits:#?}");
    assert_eq!(contents[3], some, "{hits:#?}");
    assert!(
        hits[..3].iter().all(|h| h.score > 0.5) && hits[3].score < 0.5,
        "{hits:#?}"
    );
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    // Alternatives that each start with an exclusion: no BM25 term, but the all-words list still finds them (the
    // chunks holding `lamp`, all four with it: none holds `draft`).
    let hits = keyword(&app, user, "-draft lamp or -memo storm").await;
    assert_eq!(hits.len(), 4, "{hits:#?}");
    assert!(
        hits.iter()
            .all(|h| h.content.to_lowercase().contains("lamp")),
        "{hits:#?}"
    );

    // Hybrid: that list at keyword_weight 1, not boosted (identifier_boost is 20 here).
    let hybrid = hybrid_search(&app, user, sentence, 5).await;
    for hit in &hybrid {
        let part = |rank: Option<u32>| rank.map_or(0.0, |r| 1.0 / (60.0 + f64::from(r)));
        let expected = part(hit.vector_rank) + part(hit.keyword_rank);
        assert!((hit.score - expected).abs() < 1e-9, "{hybrid:#?}");
    }
    assert_eq!(
        hybrid.iter().filter(|h| h.keyword_rank.is_some()).count(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentence_of_more_than_fifteen_words_keeps_the_list_before() {
    let app = TestApp::spawn(settings(&unique_prefix("ident-long"), &tests::redis_url())).await;
    let user = Uuid::new_v4();
    let journal = "Lighthouse keepers logged weather, tides, ships, storms, fog, wind speed, lamp oil, wick \
                   trimming, glass cleaning, bell ringing, rocket signals, visitors and repairs in a daily journal.";
    let some = "The keepers logged the weather and the tides.";
    seed(
        &app,
        user,
        Doc::ready("journal.txt", &[journal, some, TIDES]),
    )
    .await;
    // 17 words, 18 terms with their side-by-side phrase: over the 16 a sentence's BM25 list takes.
    let sentence = "keepers logged weather tides ships storms fog wind speed lamp oil wick trimming glass \
                    cleaning bell ringing";
    let mut tx = upload_pipeline::db::begin_as(app.admin(), user)
        .await
        .unwrap();
    let terms: i32 = sqlx::query_scalar(
        "SELECT cardinality((upload_pipeline.query_terms(websearch_to_tsquery('english', $1))).terms)",
    )
    .bind(sentence)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(terms, 18);
    // The bound is a setting (`upload_pipeline.sentence_terms`), 16 unless set to a whole number.
    for (set, expected) in [
        (None, 16),
        (Some("0"), 0),
        (Some("20"), 20),
        (Some("many"), 16),
    ] {
        if let Some(value) = set {
            sqlx::query("SELECT set_config('upload_pipeline.sentence_terms', $1, true)")
                .bind(value)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        let bound: i32 = sqlx::query_scalar("SELECT upload_pipeline.sentence_terms()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(bound, expected, "{set:?}");
    }

    // Keyword mode: every word required, scored by ts_rank_cd (normalisation 32), as before.
    let hits = keyword(&app, user, sentence).await;
    assert_eq!(hits.len(), 1, "{hits:#?}");
    assert_eq!(hits[0].content, journal);
    let before: f64 = sqlx::query_scalar(
        "SELECT ts_rank_cd(to_tsvector('english', $1), websearch_to_tsquery('english', $2), 32)::float8",
    )
    .bind(journal)
    .bind(sentence)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert!(
        (hits[0].score - before).abs() < 1e-6,
        "{} against {before}",
        hits[0].score
    );
    tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identifier_boost_is_the_settings_in_the_api_and_its_default_in_sql() {
    let mut s = settings(&unique_prefix("ident-boost"), &tests::redis_url());
    s.search.identifier_boost = 5.0;
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    seed(&app, user, Doc::ready("defines.md", &[DEFINES])).await;
    seed(&app, user, Doc::ready("tides.md", &[TIDES])).await;
    let hybrid = hybrid_search(&app, user, "max_wal_senders", 2).await;
    let best = &hybrid[0];
    assert_eq!(best.filename, "defines.md");
    assert_eq!(best.keyword_rank, Some(1));
    let vector = 1.0 / (60.0 + f64::from(best.vector_rank.expect("in the vector list")));
    assert!(
        (best.score - (5.0 / 61.0 + vector)).abs() < 1e-9,
        "{hybrid:#?}"
    );

    // In SQL: `upload_pipeline.identifier_boost` when set to a number from 1 to 20, else the settings' default.
    let mut conn = sqlx::PgConnection::connect(app.settings.database_url.expose())
        .await
        .unwrap();
    let default = Settings::default().search.identifier_boost;
    let unset: f64 = sqlx::query_scalar("SELECT upload_pipeline.identifier_boost()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(unset, default);
    for (set, expected) in [
        ("7", 7.0),
        (" 1.5 ", 1.5),
        ("1.0000000001", 1.000_000_000_1),
        ("50", default),
        ("0.5", default),
        ("three", default),
        ("", default),
    ] {
        sqlx::query("SELECT set_config('upload_pipeline.identifier_boost', $1, false)")
            .bind(set)
            .execute(&mut conn)
            .await
            .unwrap();
        let found: f64 = sqlx::query_scalar("SELECT upload_pipeline.identifier_boost()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(found, expected, "{set:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_read_as_identifiers_when_short_or_holding_one_and_split_into_terms() {
    let app = TestApp::spawn(settings(&unique_prefix("ident-class"), &tests::redis_url())).await;
    let pool = app.admin();
    for (query, identifier) in [
        ("max_wal_senders", true),
        ("SQLSTATE 40P01", true),
        ("spring tides", true),
        ("pg_dump --no-owner", true),
        (
            "\"could not serialize access due to concurrent update\"",
            true,
        ),
        ("CREATE INDEX ... INCLUDE (non-key columns)", true),
        ("ALTER TABLE DETACH PARTITION CONCURRENTLY", true),
        ("date_bin(stride, source, origin)", true),
        ("lighthouse keepers trimmed the wicks", false),
        ("pyroclastic flow from Vesuvius buried Pompeii", false),
        (
            "How do I speed up dumping a large database by dumping several tables at the same time with --jobs?",
            false,
        ),
        ("", false),
    ] {
        let found: bool = sqlx::query_scalar("SELECT upload_pipeline.identifier_query($1)")
            .bind(query)
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(found, identifier, "{query:?}");
    }
    // Terms: the top level's operands in order, a phrase as one, then all of them side by side; exclusions are
    // not terms; a double negation (websearch's reading of `--flag`) is dropped, so the flag is a term the index
    // can start from. The top level is `|` when there is one (`&` binds tighter): the second operand of
    // `lighthouse or harbour -storm` is 'harbour' & !'storm', and -storm excludes nothing from `lighthouse`.
    // Gates: what a term is counted by (its words, all present); pools: a term's chunks without the exclusions.
    for (query, terms, gates, pools, gate) in [
        (
            "pg_terminate_backend(pid, timeout)",
            "{\"'pg' <-> 'termin' <-> 'backend'\",'pid','timeout',\
             \"'pg' <-> 'termin' <-> 'backend' <-> 'pid' <-> 'timeout'\"}",
            "{\"'pg' & 'termin' & 'backend'\",'pid','timeout',\"'pg' & 'termin' & 'backend' & 'pid' & 'timeout'\"}",
            "{\"'pg' <-> 'termin' <-> 'backend'\",'pid','timeout'}",
            "'pg' & 'termin' & 'backend' & 'pid' & 'timeout'",
        ),
        (
            "fox -dog",
            "{'fox'}",
            "{'fox'}",
            "{\"'fox' & !'dog'\"}",
            "'fox'",
        ),
        (
            "--no-owner",
            "{\"'no-own' <2> 'owner'\"}",
            "{\"'no-own' & 'owner'\"}",
            "{\"'no-own' <2> 'owner'\"}",
            "'no-own' & 'owner'",
        ),
        (
            "lighthouse or harbour -storm",
            "{'lighthous',\"'harbour' & !'storm'\",\"'lighthous' <-> ( 'harbour' & !'storm' )\"}",
            "{'lighthous','harbour',\"'lighthous' & 'harbour'\"}",
            "{'lighthous',\"'harbour' & !'storm'\"}",
            "'lighthous' | 'harbour'",
        ),
        ("-dog", "{}", "{}", "{}", ""),
    ] {
        let found: (String, String, String, Option<String>) = sqlx::query_as(
            "SELECT t.terms::text, t.gates::text, t.pools::text, t.gate::text \
             FROM upload_pipeline.query_terms(upload_pipeline.strip_double_negation(\
             websearch_to_tsquery('english', $1))) t",
        )
        .bind(query)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(
            (found.0.as_str(), found.1.as_str(), found.2.as_str()),
            (terms, gates, pools),
            "{query:?}"
        );
        assert_eq!(found.3.unwrap_or_default(), gate, "{query:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identifier_list_reads_the_callers_part_of_the_index_and_counts_only_the_callers_chunks()
 {
    let app = TestApp::spawn(settings(
        &unique_prefix("ident-tenant"),
        &tests::redis_url(),
    ))
    .await;
    let pool = app.admin();
    let alice = Uuid::new_v4();
    seed_all(&app, alice).await;
    let before = keyword(&app, alice, "SQLSTATE 40P01").await;

    // Forty other users, 200 chunks each, with both words, or 40P01 alone: were their chunks counted, 40P01 would
    // be the commoner word and the statistics others'.
    sqlx::raw_sql(
        "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, status, \
         ready_at, chunks_total) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'other.txt', 'text/plain', 1, md5(u::text), 'ready', now(), \
         200 FROM generate_series(1, 40) u; \
         INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
         content_sha256, metadata) \
         SELECT d.id, d.user_id, i, CASE WHEN i % 2 = 0 THEN 'SQLSTATE 40P01 in log ' ELSE '40P01 ' END || i, 6, \
         md5(d.id::text || i), '{}' \
         FROM upload_pipeline.documents d CROSS JOIN generate_series(1, 200) i WHERE d.filename = 'other.txt'",
    )
    .execute(pool)
    .await
    .unwrap();
    // Statistics, and the index's pending entries merged into it, as autovacuum leaves them.
    super::refresh_keyword_statistics(pool).await;
    let after = keyword(&app, alice, "SQLSTATE 40P01").await;
    let ranked =
        |hits: &[Hit]| -> Vec<(Uuid, f64)> { hits.iter().map(|h| (h.chunk_id, h.score)).collect() };
    assert_eq!(ranked(&after), ranked(&before));

    // identifier_candidates runs as its owner, asking for the caller's rows itself: its own query, explained as
    // it runs for alice under the app role.
    let plan = explain(&app, alice, "SQLSTATE 40P01", "TEXT").await;
    let plan = plan.as_str().unwrap();
    assert!(
        plan.contains("Bitmap Index Scan on chunk_keywords_user_tsv"),
        "{plan}"
    );
    assert!(
        plan.lines()
            .any(|l| l.contains("Index Cond: ((user_id = ") && l.contains("AND (tsv @@ ")),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan on chunk_keywords"), "{plan}");
}

/// `EXPLAIN (ANALYZE, FORMAT <format>)` of identifier_candidates' query for `query` (at most 40 candidates), run
/// as identifier_candidates runs it. JSON: the plan; TEXT: a string of its lines.
async fn explain(app: &TestApp, user: Uuid, query: &str, format: &str) -> serde_json::Value {
    explain_as_owner(
        app,
        user,
        "explain_identifier_candidates",
        "DECLARE v_query tsquery := upload_pipeline.strip_double_negation(p_query); v record; r record; \
         BEGIN \
           SELECT * INTO v FROM upload_pipeline.query_terms(v_query); \
           FOR r IN EXECUTE p_explain || upload_pipeline.identifier_candidates_sql() \
             USING v_query, v.terms, upload_pipeline.uncounted_gates(v.gates, NULL), NULL::uuid[], 40, v.pools, \
               v.gate, v.recheck, v.operands \
           LOOP RETURN NEXT r.\"QUERY PLAN\"::text; END LOOP; \
         END",
        query,
        format,
    )
    .await
}

/// `EXPLAIN (ANALYZE, FORMAT JSON)` of keyword_candidates' query (a sentence's keyword list) for `query`, at most
/// 40 candidates, run as keyword_candidates runs it (its settings checked).
async fn explain_sentence(app: &TestApp, user: Uuid, query: &str) -> serde_json::Value {
    let settings: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(proconfig, '{}') FROM pg_proc WHERE oid = \
         'upload_pipeline.keyword_candidates(tsquery, uuid[], integer)'::regprocedure",
    )
    .fetch_one(app.admin())
    .await
    .unwrap();
    assert!(
        settings.iter().any(|s| s == "enable_seqscan=off"),
        "keyword_candidates plans without sequential scans, as explained here: {settings:?}"
    );
    explain_as_owner(
        app,
        user,
        "explain_keyword_candidates",
        "DECLARE r record; \
         BEGIN \
           FOR r IN EXECUTE p_explain || upload_pipeline.keyword_candidates_sql() USING p_query, NULL::uuid[], 40 \
           LOOP RETURN NEXT r.\"QUERY PLAN\"::text; END LOOP; \
         END",
        query,
        "JSON",
    )
    .await
}

/// Runs `body`, a PL/pgSQL block given `p_query` (the query, `websearch_to_tsquery`) and `p_explain` (`EXPLAIN
/// (ANALYZE, ...) ` in `format`), as a function `name` of the candidate functions' owner, search_path and settings
/// (made here), called by `user` under the app role; the plan it returns, as JSON or (TEXT) a string of its lines.
async fn explain_as_owner(
    app: &TestApp,
    user: Uuid,
    name: &str,
    body: &str,
    query: &str,
    format: &str,
) -> serde_json::Value {
    sqlx::raw_sql(&format!(
        "CREATE OR REPLACE FUNCTION upload_pipeline.{name}(p_query tsquery, p_explain text) \
         RETURNS SETOF text LANGUAGE plpgsql VOLATILE SECURITY DEFINER \
         SET search_path = pg_catalog, upload_pipeline SET enable_seqscan = off AS $$ {body} $$; \
         GRANT EXECUTE ON FUNCTION upload_pipeline.{name}(tsquery, text) TO upload_pipeline_app"
    ))
    .execute(app.admin())
    .await
    .unwrap();
    let explain = if format == "JSON" {
        "EXPLAIN (ANALYZE, FORMAT JSON) "
    } else {
        "EXPLAIN (ANALYZE, COSTS OFF) "
    };
    let mut tx = upload_pipeline::db::begin_as(app.admin(), user)
        .await
        .unwrap();
    let lines: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT upload_pipeline.{name}(websearch_to_tsquery('english', $1), $2)"
    ))
    .bind(query)
    .bind(explain)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let text = lines.join("\n");
    if format == "JSON" {
        serde_json::from_str(&text).unwrap()
    } else {
        serde_json::Value::String(text)
    }
}

/// Rows of chunk_keywords each node of `plan` read (returned, or removed by its recheck or filter), over all its
/// loops: (node type, rows per loop, loops).
fn keyword_rows(plan: &serde_json::Value, out: &mut Vec<(String, f64, f64)>) {
    if plan.get("Relation Name").and_then(|r| r.as_str()) == Some("chunk_keywords") {
        let n = |key: &str| {
            plan.get(key)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0)
        };
        out.push((
            plan["Node Type"].as_str().unwrap_or_default().to_owned(),
            n("Actual Rows") + n("Rows Removed by Index Recheck") + n("Rows Removed by Filter"),
            n("Actual Loops"),
        ));
    }
    for child in plan
        .get("Plans")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        keyword_rows(child, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_common_word_reads_at_most_the_caps_worth_of_rows_whatever_the_tenants_size() {
    let app = TestApp::spawn(settings(&unique_prefix("ident-bound"), &tests::redis_url())).await;
    let pool = app.admin();
    let user = Uuid::new_v4();
    // 12,000 chunks, every one holding `database`; 40 of them `max_wal_senders` too. Written directly (no vectors:
    // the vector list does not list them).
    sqlx::raw_sql(&format!(
        "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256, status, \
         ready_at, chunks_total) \
         SELECT gen_random_uuid(), '{user}', 'bulk-' || d || '.txt', 'text/plain', 1, md5(d::text), 'ready', now(), \
         100 FROM generate_series(1, 120) d; \
         INSERT INTO upload_pipeline.document_chunks (document_id, user_id, chunk_index, content, token_count, \
         content_sha256, metadata) \
         SELECT d.id, d.user_id, i, 'The database keeps page ' || i || ' of ' || d.filename \
         || CASE WHEN i = 7 AND d.filename < 'bulk-5' THEN ', raise max_wal_senders' ELSE '' END, 8, \
         md5(d.id::text || i), '{{}}' \
         FROM upload_pipeline.documents d CROSS JOIN generate_series(0, 99) i WHERE d.user_id = '{user}'"
    ))
    .execute(pool)
    .await
    .unwrap();
    super::refresh_keyword_statistics(pool).await;
    let (all, rare): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE tsv @@ 'max <-> wal <-> sender'::tsquery) \
         FROM upload_pipeline.chunk_keywords WHERE user_id = $1 AND tsv @@ 'databas'::tsquery",
    )
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(all, 12_000);
    assert!((20..=100).contains(&rare), "{rare}");

    // The cap C = 1,000: a count reads at most C + 1 rows; a tier at most P = 8 x 40 = 320, and the pool as many
    // again by primary key.
    for query in ["database", "database max_wal_senders"] {
        let plan = explain(&app, user, query, "JSON").await;
        let mut reads = Vec::new();
        keyword_rows(&plan[0]["Plan"], &mut reads);
        assert!(!reads.is_empty(), "{plan:#}");
        for (node, rows, _) in &reads {
            assert_ne!(node, "Seq Scan", "{query}: {reads:?}");
            assert!(*rows <= 1001.0, "{query}: {reads:?}");
        }
        let total: f64 = reads.iter().map(|(_, rows, loops)| rows * loops).sum();
        let terms = if query == "database" { 1.0 } else { 3.0 };
        assert!(
            total <= terms * 1001.0 + 3.0 * 320.0,
            "{query}: {total} rows of 12,000: {reads:?}"
        );
        // With statistics, `database` (in every chunk of a tenant of 12,000, among the table's commonest words
        // and users) is known common without a count: no count's 1,001 rows (20261205000001_common_terms.sql).
        if query == "database" {
            assert!(total <= 2.0 * 320.0 + 2.0, "{query}: {total}: {reads:?}");
        }
    }

    // keyword_candidates' list (every word required; sentences of more than 16 terms take it) for a sentence whose
    // words are all in every chunk: at most P = 320 matching rows read, then ranked. Through the API the sentence
    // takes identifier_candidates' list, whose words all being common make it that same list: its hits are some
    // of those rows.
    let sentence = "The database keeps the page of it";
    let plan = explain_sentence(&app, user, sentence).await;
    let mut reads = Vec::new();
    keyword_rows(&plan[0]["Plan"], &mut reads);
    assert!(!reads.is_empty(), "{plan:#}");
    for (node, _, _) in &reads {
        assert_ne!(node, "Seq Scan", "{sentence}: {reads:?}");
    }
    let total: f64 = reads.iter().map(|(_, rows, loops)| rows * loops).sum();
    assert!(
        total <= 320.0,
        "{sentence}: {total} rows of 12,000: {reads:?}"
    );
    let hits = keyword(&app, user, sentence).await;
    assert_eq!(hits.len(), 20);
    assert!(
        hits.iter()
            .all(|h| h.content.starts_with("The database keeps page")),
        "{hits:#?}"
    );

    // Every word common: the list before (ts_rank_cd), capped, and not boosted in hybrid search.
    let hits = keyword(&app, user, "database").await;
    assert_eq!(hits.len(), 20);
    let hybrid = hybrid_search(&app, user, "database", 10).await;
    assert_eq!(hybrid.len(), 10);
    for hit in &hybrid {
        let rank = hit.keyword_rank.expect("in the keyword list");
        assert!(
            (hit.score - 1.0 / (60.0 + f64::from(rank))).abs() < 1e-9,
            "{hybrid:#?}"
        );
    }
    // A rare word among them: BM25, the chunks holding both first, boosted.
    let hits = keyword(&app, user, "database max_wal_senders").await;
    assert_eq!(hits.len(), 20);
    assert!(
        hits.iter()
            .all(|h| h.score > 0.5 && h.content.contains("max_wal_senders")),
        "{hits:#?}"
    );
    let hybrid = hybrid_search(&app, user, "database max_wal_senders", 5).await;
    for hit in &hybrid {
        let rank = hit.keyword_rank.expect("in the keyword list");
        assert!(
            (hit.score - 3.0 / (60.0 + f64::from(rank))).abs() < 1e-9,
            "{hybrid:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alternative_keeps_what_the_query_matches_and_a_query_without_a_positive_word_lists_nothing()
 {
    let app = TestApp::spawn(settings(
        &unique_prefix("ident-or-not"),
        &tests::redis_url(),
    ))
    .await;
    let user = Uuid::new_v4();
    for (name, text) in [
        ("storm-light.md", "The lighthouse stood through the storm."),
        ("calm-harbour.md", "The harbour is calm at dawn."),
        ("storm-harbour.md", "The harbour closed for the storm."),
        ("tides.md", TIDES),
    ] {
        seed(&app, user, Doc::ready(name, &[text])).await;
    }
    // 'lighthous' | 'harbour' & !'storm': the lighthouse in the storm matches it, the harbour in the storm does
    // not.
    let hits = keyword(&app, user, "lighthouse or harbour -storm").await;
    let mut found = files(&hits);
    found.sort_unstable();
    assert_eq!(found, ["calm-harbour.md", "storm-light.md"], "{hits:#?}");
    assert!(hits.iter().all(|h| h.score > 0.5), "{hits:#?}");

    // Exclusions only: no keyword list (not a walk of every chunk), not boosted; hybrid is the vector list's.
    assert!(keyword(&app, user, "-storm").await.is_empty());
    let hybrid = hybrid_search(&app, user, "-storm", 4).await;
    assert_eq!(hybrid.len(), 4);
    for hit in &hybrid {
        assert_eq!(hit.keyword_rank, None, "{hybrid:#?}");
        let vector = 1.0 / (60.0 + f64::from(hit.vector_rank.unwrap()));
        assert!((hit.score - vector).abs() < 1e-9, "{hybrid:#?}");
    }
}
