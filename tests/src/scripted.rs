//! A provider that answers from a script, for the answers the full fakes ([`crate::fake`]) never give: a wrong
//! number of vectors, broken base64, jobs cancelled or expired at the provider, pages that failed. Each route (a
//! request path with its query string) answers the next of its answers, repeating the last; a request to a route
//! without a script gets a 404 with a FastAPI body, as the real services answer unknown paths.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    response::Response,
};

/// One answer: status, extra headers and a JSON (or deliberately broken) body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body, sent as `application/json`.
    pub body: String,
}

impl Answer {
    /// A 200 with this JSON.
    pub fn ok(body: serde_json::Value) -> Self {
        Self::status(200, body.to_string())
    }

    /// Any status with this body.
    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

#[derive(Default)]
struct Script {
    answers: HashMap<String, Vec<Answer>>,
    hits: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Script>>;

/// A running scripted server; stops when dropped.
pub struct Scripted {
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    script: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    /// Serves `routes`: (path with query, answers in order; the last one repeats).
    pub async fn start(routes: Vec<(&str, Vec<Answer>)>) -> Self {
        let script: Shared = Arc::default();
        {
            let mut s = script.lock().expect("script lock");
            for (route, answers) in routes {
                assert!(!answers.is_empty(), "route {route} needs an answer");
                s.answers.insert(route.to_owned(), answers);
            }
        }
        let app = Router::new().fallback(answer).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, script, task }
    }

    /// How many requests `route` has had.
    pub fn hits(&self, route: &str) -> usize {
        let s = self.script.lock().expect("script lock");
        s.hits.get(route).copied().unwrap_or(0)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(script): State<Shared>, req: Request) -> Response {
    let route = match req.uri().query() {
        Some(q) => format!("{}?{q}", req.uri().path()),
        None => req.uri().path().to_owned(),
    };
    let next = {
        let mut s = script.lock().expect("script lock");
        let n = *s
            .hits
            .entry(route.clone())
            .and_modify(|n| *n += 1)
            .or_insert(1);
        s.answers
            .get(&route)
            .map(|answers| answers[(n - 1).min(answers.len() - 1)].clone())
    };
    let a = next.unwrap_or_else(|| Answer::status(404, r#"{"detail":"Not Found"}"#));
    let mut resp = Response::builder()
        .status(StatusCode::from_u16(a.status).expect("a valid status"))
        .header("content-type", "application/json");
    for (k, v) in a.headers {
        resp = resp.header(k, v);
    }
    resp.body(Body::from(a.body)).expect("response")
}
