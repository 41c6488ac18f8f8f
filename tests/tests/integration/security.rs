//! Security: who may call what. Tokens are verified by algorithm (HS256 secret, RS256/ES256 from a JWKS file),
//! issuer, audience, expiry and not-before; operator endpoints need the admin claim (403 otherwise); another
//! user's document answers exactly like a missing one; uploads are rate-limited per user across the fleet.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::TestApp;
use tests::{Api, TestDb, settings, unique_prefix};
use upload_pipeline::{Settings, auth::Auth};
use uuid::Uuid;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/jwt")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs `claims` with a test key of the JWKS fixture.
fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::RS256 | Algorithm::PS256 => {
            EncodingKey::from_rsa_der(&std::fs::read(fixture("rs256-private.der")).unwrap())
        }
        Algorithm::ES256 => {
            EncodingKey::from_ec_der(&std::fs::read(fixture("es256-private.der")).unwrap())
        }
        other => panic!("no test key for {other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn jwks_settings(prefix: &str) -> Settings {
    let mut s = settings(&unique_prefix(prefix), &tests::redis_url());
    s.api.jwks_file = Some(fixture("jwks.json"));
    s.api.jwt_issuer = Some("https://issuer.example/".into());
    s.api.jwt_audience = Some("authenticated".into());
    s.api.admin_claim = "app_metadata.admin".into();
    s
}

#[test]
fn tokens_are_checked_for_algorithm_key_issuer_audience_and_time() {
    let s = jwks_settings("auth-unit");
    let auth = Auth::from_settings(&s.api).expect("the JWKS fixture loads");
    let user = Uuid::new_v4();
    let good = json!({
        "sub": user.to_string(), "exp": now() + 600, "iat": now(),
        "iss": "https://issuer.example/", "aud": "authenticated",
    });
    // RS256 and ES256 from the JWKS file, found by kid; a single key of the algorithm also without kid.
    for (alg, kid) in [
        (Algorithm::RS256, Some("test-rsa-1")),
        (Algorithm::ES256, Some("test-ec-1")),
        (Algorithm::RS256, None),
    ] {
        let id = auth.verify(&sign(alg, kid, &good)).expect("a valid token");
        assert_eq!(id.user, user);
        assert!(!id.admin);
    }
    // The admin claim, at its configured dotted path.
    let mut admin = good.clone();
    admin["app_metadata"] = json!({"admin": true});
    assert!(
        auth.verify(&sign(Algorithm::RS256, Some("test-rsa-1"), &admin))
            .unwrap()
            .admin
    );
    admin["app_metadata"] = json!({"admin": "true"});
    assert!(
        !auth
            .verify(&sign(Algorithm::RS256, Some("test-rsa-1"), &admin))
            .unwrap()
            .admin
    );
    // An Auth0-style subject becomes a stable UUID of issuer and subject.
    let mut auth0 = good.clone();
    auth0["sub"] = json!("auth0|65f1c2d3e4");
    let a = auth
        .verify(&sign(Algorithm::RS256, Some("test-rsa-1"), &auth0))
        .unwrap()
        .user;
    let b = auth
        .verify(&sign(Algorithm::ES256, Some("test-ec-1"), &auth0))
        .unwrap()
        .user;
    assert_eq!(a, b);
    assert_ne!(a, user);

    let refused = |claims: &Value, alg: Algorithm, kid: Option<&str>| {
        if let Ok(id) = auth.verify(&sign(alg, kid, claims)) {
            panic!("accepted {claims} signed {alg:?} with kid {kid:?}: {id:?}");
        }
    };
    let with = |key: &str, value: Value| {
        let mut c = good.clone();
        c[key] = value;
        c
    };
    let without = |key: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let rs = Algorithm::RS256;
    let kid = Some("test-rsa-1");
    refused(&with("iss", json!("https://evil.example/")), rs, kid);
    refused(&without("iss"), rs, kid);
    refused(&with("aud", json!("service_role")), rs, kid);
    refused(&without("aud"), rs, kid);
    refused(&with("exp", json!(now() - 120)), rs, kid);
    refused(&without("exp"), rs, kid);
    refused(&with("nbf", json!(now() + 600)), rs, kid);
    refused(&without("sub"), rs, kid);
    refused(&with("sub", json!("")), rs, kid);
    // A kid the file does not have, and a key of the wrong type for the algorithm.
    refused(&good, rs, Some("test-rsa-2"));
    refused(&good, Algorithm::ES256, Some("test-rsa-1"));
    // PS256 has no key in the file.
    refused(&good, Algorithm::PS256, None);
    // HS256 with the secret still works; HS256 signed with something else does not.
    let hs = Auth::hs256(s.api.jwt_secret.expose()).sign(&good);
    assert_eq!(auth.verify(&hs).unwrap().user, user);
    let forged = Auth::hs256("a-different-secret-of-32-characters").sign(&good);
    assert!(auth.verify(&forged).is_err());
    // "none" and garbage.
    let none = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        base64_url(good.to_string().as_bytes())
    );
    assert!(auth.verify(&none).is_err());
    assert!(auth.verify("a.b.c").is_err());
    assert!(auth.verify("").is_err());

    // A missing or broken JWKS file is a clear start-up error.
    let mut bad = s.clone();
    bad.api.jwks_file = Some(fixture("missing.json"));
    let err = Auth::from_settings(&bad.api).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
    bad.api.jwks_file = Some(fixture("README.md"));
    let err = Auth::from_settings(&bad.api).unwrap_err().to_string();
    assert!(err.contains("not a JWKS document"), "{err}");
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("the API answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_need_the_admin_claim_and_other_users_documents_do_not_exist() {
    let s = jwks_settings("auth-api");
    let app = TestApp::spawn(s).await;
    let user = Uuid::new_v4();
    let other = Uuid::new_v4();
    let claims = |sub: Uuid, admin: bool| {
        json!({
            "sub": sub.to_string(), "exp": now() + 600, "iss": "https://issuer.example/",
            "aud": "authenticated", "app_metadata": {"admin": admin},
        })
    };
    let plain = sign(Algorithm::RS256, Some("test-rsa-1"), &claims(user, false));
    let admin = sign(
        Algorithm::ES256,
        Some("test-ec-1"),
        &claims(Uuid::new_v4(), true),
    );
    let url = |path: &str| format!("{}{path}", app.api.url);
    use reqwest::Method;
    let admin_calls = [
        (Method::GET, "/v1/admin/queues"),
        (Method::GET, "/v1/admin/dead-letters/parse"),
        (Method::POST, "/v1/admin/dead-letters/embed/replay"),
        (Method::POST, "/v1/admin/dead-letters/chunk/purge"),
        (Method::GET, "/v1/admin/quota"),
        (Method::POST, "/v1/admin/quota/openai/resume"),
    ];
    for (method, path) in &admin_calls {
        let (status, body, _) = call(method.clone(), &url(path), None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} without a token");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, body, _) = call(method.clone(), &url(path), Some(&plain), None).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{path} without the admin claim"
        );
        assert_eq!(body["error"]["code"], "forbidden");
        let (status, _, _) = call(method.clone(), &url(path), Some(&admin), None).await;
        assert_eq!(status, StatusCode::OK, "{path} as an admin");
    }
    let (status, body, _) = call(Method::GET, &url("/v1/admin/queues"), Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 3);
    let (status, _, _) = call(
        Method::GET,
        &url("/v1/admin/dead-letters/nope"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        Method::POST,
        &url("/v1/admin/dead-letters/parse/explode"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        Method::POST,
        &url("/v1/admin/quota/azure/resume"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body, _) = call(
        Method::POST,
        &url("/v1/admin/dead-letters/parse/purge"),
        Some(&admin),
        Some(json!({"ids": ["1-1; FLUSHALL"]})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // An array is not the object the schema names, though serde would read `[]` as `{}`: all of the stage's.
    let (status, body, _) = call(
        Method::POST,
        &url("/v1/admin/dead-letters/parse/purge"),
        Some(&admin),
        Some(json!([])),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_json", "{body}");
    // A token from the wrong issuer is a 401 whatever it claims.
    let mut foreign = claims(user, true);
    foreign["iss"] = json!("https://evil.example/");
    let foreign = sign(Algorithm::RS256, Some("test-rsa-1"), &foreign);
    let (status, _, _) = call(Method::GET, &url("/v1/admin/queues"), Some(&foreign), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Another user's document answers like one that never existed: same status, same body.
    // HS256 tokens, too, must name the configured issuer and audience.
    let hs256 = Auth::hs256(app.settings.api.jwt_secret.expose());
    let (status, _, _) = call(
        Method::GET,
        &url("/v1/documents"),
        Some(&hs256.issue(other, Duration::from_secs(600), false)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let owner =
        upload_pipeline::client::Client::new(&app.api.url, &hs256.sign(&claims(other, false)))
            .unwrap();
    let doc = owner
        .upload_bytes(
            "private.txt",
            b"the other user's secret plans".to_vec(),
            None,
        )
        .await
        .unwrap()
        .document_id;
    let hs = hs256.sign(&claims(user, false));
    for token in [&plain, &hs] {
        let theirs = call(
            Method::GET,
            &url(&format!("/v1/documents/{doc}")),
            Some(token),
            None,
        )
        .await;
        let missing = call(
            Method::GET,
            &url(&format!("/v1/documents/{}", Uuid::new_v4())),
            Some(token),
            None,
        )
        .await;
        assert_eq!(theirs.0, StatusCode::NOT_FOUND);
        assert_eq!((theirs.0, &theirs.1), (missing.0, &missing.1));
        let del = call(
            Method::DELETE,
            &url(&format!("/v1/documents/{doc}")),
            Some(token),
            None,
        )
        .await;
        assert_eq!((del.0, &del.1), (missing.0, &missing.1));
    }
    assert_eq!(
        owner.status(doc).await.unwrap().id,
        doc,
        "the owner's document is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_rate_limited_per_user_across_replicas_with_retry_after() {
    let mut s = settings(&unique_prefix("ratelimit"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    s.api.uploads_per_minute = 30;
    s.api.upload_burst = 3;
    let db = TestDb::create(&mut s).await;
    // Two producer replicas share the limit through Redis.
    let a = Api::start(&s).await;
    let b = Api::start(&s).await;
    let user = Uuid::new_v4();
    let token = a.token(&s, user);
    let upload = |base: String, token: String, n: usize| async move {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(format!("note {n}").into_bytes())
                .file_name(format!("n{n}.txt")),
        );
        reqwest::Client::new()
            .post(format!("{base}/v1/documents"))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap()
    };
    let mut statuses = Vec::new();
    for n in 0..3 {
        let base = if n % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        };
        statuses.push(upload(base, token.clone(), n).await.status());
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::ACCEPTED),
        "{statuses:?}"
    );
    let limited = upload(b.url.clone(), token.clone(), 3).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another user is not affected.
    let other = a.token(&s, Uuid::new_v4());
    assert_eq!(
        upload(a.url.clone(), other, 10).await.status(),
        StatusCode::ACCEPTED
    );
    // After Retry-After, the user may upload again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(
        upload(a.url.clone(), token.clone(), 4).await.status(),
        StatusCode::ACCEPTED
    );
    // Nothing refused was stored: four documents for the user.
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.documents WHERE user_id = $1")
            .bind(user)
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert_eq!(stored, 4);
    a.stop().await;
    b.stop().await;
}

/// A connection as the app role (no superuser, no BYPASSRLS) to the test's database, acting for `user` (or for
/// nobody), the way every request and stage transaction runs.
async fn app_connection(s: &Settings, user: Option<Uuid>) -> sqlx::PgConnection {
    use sqlx::{ConnectOptions, Connection};
    let opts: sqlx::postgres::PgConnectOptions = s.database_url.expose().parse().unwrap();
    let mut conn = opts.username(&s.database_app_role).connect().await.unwrap();
    if let Some(user) = user {
        sqlx::query("SELECT set_config('upload_pipeline.user_id', $1, false)")
            .bind(user.to_string())
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let _ = Connection::ping(&mut conn).await;
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_itself_keeps_each_users_rows_from_every_other_user() {
    let s = settings(&unique_prefix("rls"), &tests::redis_url());
    let app = TestApp::spawn(s).await;
    let mut worker = tests::WorkerProcess::start(&app.settings, "parse,chunk,embed");
    worker.wait_healthy().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut docs = Vec::new();
    for (user, text) in [
        (a, "Alice's notes on tide tables and harbour pilots."),
        (
            b,
            "Bob's confidential merger plans for the lighthouse company.",
        ),
    ] {
        let client = app.client(user);
        let id = client
            .upload_bytes("notes.txt", text.as_bytes().to_vec(), None)
            .await
            .unwrap()
            .document_id;
        tests::wait_ready(&client, &[id], Duration::from_secs(60)).await;
        docs.push(id);
    }
    let (doc_a, doc_b) = (docs[0], docs[1]);

    // The pools the API and workers open never bypass row-level security, even given a superuser's URL.
    let pool = upload_pipeline::db::connect(&app.settings, 1)
        .await
        .unwrap();
    let (who, bypass): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(who, "upload_pipeline_app");
    assert!(!bypass);
    pool.close().await;

    let tables = [
        "documents",
        "document_bytes",
        "document_parsed",
        "upload_jobs",
        "document_chunks",
    ];
    // As A: A's rows in every table, none of B's, whatever the query asks for.
    let mut as_a = app_connection(&app.settings, Some(a)).await;
    for table in tables {
        assert!(
            count_rows(&mut as_a, table, doc_a).await > 0,
            "A sees own {table}"
        );
        assert_eq!(
            count_rows(&mut as_a, table, doc_b).await,
            0,
            "A sees B's {table}"
        );
    }
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.document_chunks")
        .fetch_one(&mut as_a)
        .await
        .unwrap();
    let own: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM upload_pipeline.document_chunks WHERE user_id = $1",
    )
    .bind(a)
    .fetch_one(&mut as_a)
    .await
    .unwrap();
    assert_eq!(all, own, "an unfiltered scan shows only A's chunks");
    // match_chunks with B's own vector finds only A's passages.
    let b_vector: String = sqlx::query_scalar(
        "SELECT embedding::text FROM upload_pipeline.document_chunks WHERE document_id = $1 LIMIT 1",
    )
    .bind(doc_b)
    .fetch_one(app.admin())
    .await
    .unwrap();
    let hits: Vec<(Uuid,)> =
        sqlx::query_as("SELECT document_id FROM upload_pipeline.match_chunks($1::vector, 10)")
            .bind(&b_vector)
            .fetch_all(&mut as_a)
            .await
            .unwrap();
    assert!(
        !hits.is_empty() && hits.iter().all(|(d,)| *d == doc_a),
        "{hits:?}"
    );
    // Writes to B's rows change nothing; a row claiming B's id is refused.
    for table in tables {
        let column = if table == "documents" {
            "id"
        } else {
            "document_id"
        };
        let updated = sqlx::query(&format!(
            "UPDATE upload_pipeline.{table} SET user_id = user_id WHERE {column} = $1"
        ))
        .bind(doc_b)
        .execute(&mut as_a)
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(updated, 0, "A updated B's {table}");
        let deleted = sqlx::query(&format!(
            "DELETE FROM upload_pipeline.{table} WHERE {column} = $1"
        ))
        .bind(doc_b)
        .execute(&mut as_a)
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(deleted, 0, "A deleted B's {table}");
    }
    let stolen = sqlx::query("UPDATE upload_pipeline.documents SET user_id = $2 WHERE id = $1")
        .bind(doc_a)
        .bind(b)
        .execute(&mut as_a)
        .await;
    assert!(stolen.is_err(), "A moved a document to B");
    let planted = sqlx::query(
        "INSERT INTO upload_pipeline.documents (id, user_id, filename, content_type, size_bytes, sha256)
         VALUES ($1, $2, 'x.txt', 'text/plain', 1, repeat('0', 64))",
    )
    .bind(Uuid::new_v4())
    .bind(b)
    .execute(&mut as_a)
    .await;
    let err = planted.expect_err("A planted a row for B").to_string();
    assert!(err.contains("row-level security"), "{err}");
    // Nobody set: nothing visible. The role cannot switch row-level security off or become another role.
    let mut anonymous = app_connection(&app.settings, None).await;
    for table in tables {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM upload_pipeline.{table}"))
            .fetch_one(&mut anonymous)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} without a user");
    }
    for escape in [
        "SET row_security = off",
        "ALTER TABLE upload_pipeline.documents DISABLE ROW LEVEL SECURITY",
        "SET ROLE postgres",
        "DROP POLICY owner ON upload_pipeline.documents",
    ] {
        let r = sqlx::query(escape).execute(&mut anonymous).await;
        if escape.starts_with("SET row_security") {
            // Allowed to set, but with policies in force Postgres then refuses the query instead of skipping them.
            let q = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM upload_pipeline.documents")
                .fetch_one(&mut anonymous)
                .await;
            assert!(
                r.is_err() || q.is_err(),
                "row_security = off let a query through"
            );
            let _ = sqlx::query("SET row_security = on")
                .execute(&mut anonymous)
                .await;
        } else {
            assert!(r.is_err(), "the app role could run {escape}");
        }
    }
    // Through the API, B still sees exactly its document.
    let b_docs = app.client(b).status(doc_b).await.unwrap();
    assert_eq!(b_docs.id, doc_b);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_metrics_or_error_bodies() {
    use tests::fake::{FakeConfig, FakeProviders, LlamaParseConfig, OpenAiConfig};
    use upload_pipeline::settings::{ParserKind, Secret};
    // The providers know other keys: every call is refused, the refusals pause both providers and are logged at
    // error level.
    let fake = FakeProviders::start(FakeConfig {
        openai: OpenAiConfig {
            keys: vec!["sk-the-right-key".into()],
            ..Default::default()
        },
        llamaparse: LlamaParseConfig {
            keys: vec!["llx-the-right-key".into()],
            ..Default::default()
        },
    })
    .await;
    let secrets = [
        "sk-SECRET-openai-5f0c1e9a7b3d",
        "llx-SECRET-llamaparse-8e2d4c6a",
        "jwt-SECRET-signing-key-2b9f7c1d3e5a",
        "db-SECRET-app-password-4a6c",
    ];
    let mut s = settings(&unique_prefix("secrets"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    fake.embed_with(&mut s);
    s.embedding.openai.api_key = Secret(secrets[0].into());
    s.parsing.parser = ParserKind::Llamaparse;
    s.parsing.llamaparse.base_url = fake.url.clone();
    s.parsing.llamaparse.api_key = Secret(secrets[1].into());
    s.api.jwt_secret = Secret(secrets[2].into());
    s.database_app_password = Some(Secret(secrets[3].into()));
    s.log.filter = "debug".into();
    let _db = TestDb::create(&mut s).await;

    // The producer as a process of its own, logging at debug level to a file.
    let dir = std::env::temp_dir().join(unique_prefix("secrets-producer"));
    std::fs::create_dir_all(&dir).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.api.listen = listener.local_addr().unwrap();
    drop(listener);
    let config = dir.join("producer.toml");
    std::fs::write(&config, toml::to_string(&s).unwrap()).unwrap();
    let producer_log = dir.join("producer.log");
    let mut producer = std::process::Command::new(tests::worker_bin().with_file_name("producer"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&producer_log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://{}", s.api.listen);
    tests::wait_for(
        "the producer to answer",
        Duration::from_secs(60),
        || async {
            reqwest::get(format!("{base}/healthz"))
                .await
                .ok()
                .filter(|r| r.status().is_success())
        },
    )
    .await;
    let mut worker = tests::WorkerProcess::start(&s, "parse,chunk,embed");
    worker.wait_healthy().await;

    let user = Uuid::new_v4();
    let token = Auth::hs256(secrets[2]).issue(user, Duration::from_secs(600), false);
    let client = upload_pipeline::client::Client::new(&base, &token).unwrap();
    let pdf = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus/honeybees.pdf"),
    )
    .unwrap();
    let ids = [
        client
            .upload_bytes("bees.pdf", pdf, None)
            .await
            .unwrap()
            .document_id,
        client
            .upload_bytes("plain.txt", b"Plain words for the embedder.".to_vec(), None)
            .await
            .unwrap()
            .document_id,
    ];
    let mut bodies = Vec::new();
    // A refused key fails no document: both providers are paused and the documents wait for a working key.
    let quota = upload_pipeline::quota::Quota::connect(&s).await.unwrap();
    tests::wait_for(
        "both providers to be paused on the refused keys",
        Duration::from_secs(90),
        || async {
            for provider in ["llamaparse", "openai"] {
                let why = quota.pause_reason(provider).await.ok()?;
                (why == Some(upload_pipeline::quota::PauseReason::Auth)).then_some(())?;
            }
            Some(())
        },
    )
    .await;
    for id in ids {
        let d = client.status(id).await.unwrap();
        assert_ne!(d.status, "failed", "{d:?}");
        bodies.push(serde_json::to_string(&d).unwrap());
    }
    // Error bodies of the API: bad tokens, a token signed with a guessed secret, bad input.
    use reqwest::Method;
    for token in [
        "",
        "Bearer",
        secrets[2],
        &Auth::hs256("jwt-SECRET-signing-key-2b9f7c1d3e5b").issue(
            user,
            Duration::from_secs(60),
            true,
        ),
    ] {
        let (_, body, _) = call(
            Method::GET,
            &format!("{base}/v1/documents"),
            Some(token),
            None,
        )
        .await;
        bodies.push(body.to_string());
    }
    let (_, body, _) = call(
        Method::POST,
        &format!("{base}/v1/search"),
        Some(&token),
        Some(json!({"query": ""})),
    )
    .await;
    bodies.push(body.to_string());
    bodies.push(
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    bodies.push(worker.http_get("/metrics").await.unwrap().1);

    let _ = nix_term(&mut producer);
    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(30)).await;
    let logs = [
        std::fs::read_to_string(&producer_log).unwrap(),
        std::fs::read_to_string(&worker.log_path).unwrap(),
    ];
    drop(worker);
    let everything: Vec<&String> = logs.iter().chain(bodies.iter()).collect();
    let text = everything
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    // The refusals happened and were logged (the test saw the paths that could leak).
    assert!(
        text.contains("401") || text.to_lowercase().contains("unauthorized"),
        "no refusal logged"
    );
    assert!(
        text.len() > 10_000,
        "debug logs are missing ({} bytes)",
        text.len()
    );
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{secret} appears in logs, metrics or an error body"
        );
        // Nor a long enough piece of it to be useful.
        assert!(
            !text.contains(&secret[..secret.len() - 4]),
            "part of {secret} appears"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM, then wait for the exit.
fn nix_term(child: &mut std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait()
}

/// Rows of `table` belonging to document `doc` that the connection can see.
async fn count_rows(conn: &mut sqlx::PgConnection, table: &str, doc: Uuid) -> i64 {
    let column = if table == "documents" {
        "id"
    } else {
        "document_id"
    };
    let sql = format!("SELECT count(*) FROM upload_pipeline.{table} WHERE {column} = $1");
    sqlx::query_scalar::<_, i64>(&sql)
        .bind(doc)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// HMAC-SHA-256 (RFC 2104), for checking a SCRAM verifier below.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Whether `verifier` (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as in pg_authid) was made
/// from `password` (RFC 5802: PBKDF2-HMAC-SHA-256, then the client and server keys).
fn scram_matches(verifier: &str, password: &str) -> bool {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use sha2::{Digest, Sha256};
    let (head, keys) = verifier.rsplit_once('$').unwrap();
    let (iterations, salt) = head
        .strip_prefix("SCRAM-SHA-256$")
        .unwrap()
        .split_once(':')
        .unwrap();
    let (stored, server) = keys.split_once(':').unwrap();
    let salt = STANDARD.decode(salt).unwrap();
    let mut u = hmac_sha256(
        password.as_bytes(),
        &[salt.as_slice(), &[0, 0, 0, 1]].concat(),
    );
    let mut salted = u;
    for _ in 1..iterations.parse::<u32>().unwrap() {
        u = hmac_sha256(password.as_bytes(), &u);
        salted.iter_mut().zip(u).for_each(|(s, x)| *s ^= x);
    }
    let client_key = hmac_sha256(&salted, b"Client Key");
    STANDARD.encode(Sha256::digest(client_key)) == stored
        && STANDARD.encode(hmac_sha256(&salted, b"Server Key")) == server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_give_the_app_role_the_fleets_password_quoted_by_the_server() {
    let mut s = settings(&unique_prefix("app-password"), &tests::redis_url());
    // Quotes, a backslash and SQL: the server quotes it (format %L), nothing is spliced.
    let password = format!("it's a \\ secret'; DROP ROLE x; -- {}", Uuid::new_v4());
    s.database_app_password = Some(upload_pipeline::settings::Secret(password.clone()));
    let db = TestDb::create(&mut s).await;
    let verifier: String = sqlx::query_scalar(
        "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = 'upload_pipeline_app'",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    assert!(scram_matches(&verifier, &password));
    assert!(!scram_matches(&verifier, "another password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_holding_only_the_app_roles_credentials_serves_without_migrating_or_a_parser_key() {
    let mut s = settings(&unique_prefix("app-only"), &tests::redis_url());
    let _keys = tests::RedisKeys::of(&s);
    let db = TestDb::create(&mut s).await;
    assert!(upload_pipeline::db::can_migrate(&s).await.unwrap());
    // As in the Kubernetes overlays: the app role's URL, no admin URL, LlamaParse chosen but its key only with
    // the parse workers.
    let mut app = s.clone();
    app.database_url = upload_pipeline::settings::RedisUrl(format!(
        "{}/{}",
        tests::pg_server().replace("postgres@", &format!("{}@", s.database_app_role)),
        db.name
    ));
    app.parsing.parser = upload_pipeline::settings::ParserKind::Llamaparse;
    assert!(!upload_pipeline::db::can_migrate(&app).await.unwrap());
    let api = Api::start(&app).await;
    let user = Uuid::new_v4();
    let client = api.client(&app, user);
    let uploaded = client
        .upload_bytes("notes.txt", "Tide tables for the harbour.", None)
        .await
        .unwrap();
    let doc = client.status(uploaded.document_id).await.unwrap();
    assert_eq!(doc.filename, "notes.txt");
    let owner: Uuid =
        sqlx::query_scalar("SELECT user_id FROM upload_pipeline.documents WHERE id = $1")
            .bind(uploaded.document_id)
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert_eq!(owner, user);
    api.stop().await;
}
