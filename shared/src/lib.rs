//! # upload-pipeline
//!
//! A durable job-queue worker fleet that turns uploaded documents into vector-searchable chunks.
//!
//! ```text
//!  service ──upload──▶ producer ──push──▶ [parse] ──▶ worker(parse) ──push──▶ [chunk] ──▶ worker(chunk)
//!                                         Redis                               Redis
//!                                 ──push──▶ [embed] ──▶ worker(embed) ──▶ Postgres + pgvector ◀── agents
//! ```
//!
//! This crate is the library both binaries stand on; `producer/` and `workers/` only wire it together.
//!
//! ## The flow, and who owns each step
//!
//! 1. **Upload.** [`api`] takes the file from a caller that [`auth`] verified and [`ratelimit`] let through;
//!    [`documents`] stores it durably in Postgres ([`db`]), then the `parse` job is pushed on the [`queue`].
//! 2. **Parse.** [`jobs::parse`] turns the bytes into Markdown sections: [`parsing`] for local formats, run in a
//!    bounded child process ([`helper`]), or LlamaParse through [`providers`].
//! 3. **Chunk.** [`jobs::chunk`] splits the sections into token-bounded chunks ([`chunking`]) and pushes embed
//!    jobs in batches.
//! 4. **Embed.** [`jobs::embed`] turns each batch into vectors through an embedder ([`providers`]), within the
//!    fleet's shared provider budget ([`quota`]), and stores them in pgvector.
//! 5. **Queryable.** The last batch makes the document `ready`; `POST /v1/search` ([`api`]) hands the query to
//!    [`search`]: hybrid (vector and keyword, fused by rank), vector or keyword, over ready documents only,
//!    narrowed by filters, with citations, and optionally reranked by a cross-encoder ([`providers::rerank`]).
//!    Agents call the same SQL function directly.
//!
//! [`runtime`] runs the stage workers; [`retry`] and [`reconciler`] recover what failed or was lost between
//! Postgres and Redis. The transport ([`queue`]) knows nothing of documents: it moves typed jobs and guarantees
//! that each is run until it succeeds, fails permanently or runs out of attempts, even when workers are killed.
//!
//! ## Modules
//!
//! | module | owns |
//! |---|---|
//! | [`settings`] | one typed, validated `Settings`: defaults, then a TOML file, then the environment |
//! | [`telemetry`] | the tracing subscriber and the Prometheus recorder |
//! | [`shutdown`] | the SIGTERM / SIGINT future |
//! | [`metrics`] | the catalogue: every metric name, label set, help text and bucket, and `docs/metrics.md` |
//! | [`db`] | the Postgres pool, migrations, and transactions scoped to one user (row-level security) |
//! | [`auth`] | bearer-token (JWT) verification: HS256 secrets or RS256/ES256 JWKS keys |
//! | [`ratelimit`] | per-user request limits shared by the producer replicas through Redis |
//! | [`queue`] | the durable Redis Streams queue and its apalis backend: at-least-once delivery, retries, dead letters |
//! | [`quota`] | each provider's fleet-wide budget in Redis: reservations, cool-downs after 429, pauses |
//! | [`parsing`] | local parsers: uploaded bytes to Markdown sections with page numbers; pure |
//! | [`text`] | the normalised form of parsed text and search queries (NFKC, invisibles, hyphenated words); pure |
//! | [`chunking`] | Markdown sections to token-bounded chunks with their heading path; pure |
//! | [`helper`] | bounded child processes for parsing and chunking hostile input (deadline, memory cap) |
//! | [`providers`] | the parser, embedder and reranker clients (LlamaParse, OpenAI-compatible, local model, hashing; Cohere, Jina, TEI) and [`providers::ProviderError`] |
//! | [`documents`] | documents as the API sees them: the durable upload, its [`documents::DocumentStatus`], listing, deletion |
//! | [`search`] | hybrid, vector and keyword search of ready documents, its [`search::Filter`]s, and its hits with citations |
//! | [`jobs`] | the stages ([`jobs::Stage`], [`jobs::JobState`]), their queues, the jobs those carry, each stage's handler |
//! | [`runtime`] | the worker runtime: one apalis worker per stage, health, metrics, restarts, graceful drain |
//! | [`gauges`] | the gauges read at scrape time from Redis, Postgres and the quota, and the process metrics |
//! | [`retry`] | failed documents: re-running one from the stage that gave up, and the failures by stage and reason |
//! | [`reconciler`] | pushes again the stage jobs Postgres expects and Redis lost |
//! | [`api`] | the producer's HTTP API (axum): uploads, status, search, admin, health and `/metrics` |
//! | [`client`] | a typed Rust client of that API, for services and the `producer` CLI |
//!
//! The modules record into [`metrics`], which imports none of them; what is read from Redis or Postgres at
//! scrape time lives in [`gauges`], above [`queue`], [`quota`] and [`db`].

pub mod api;
pub mod auth;
pub mod chunking;
pub mod client;
pub mod db;
pub mod documents;
pub mod gauges;
pub mod helper;
pub mod jobs;
pub mod metrics;
pub mod parsing;
pub mod providers;
pub mod queue;
pub mod quota;
pub mod ratelimit;
pub mod reconciler;
pub mod retry;
pub mod runtime;
pub mod search;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod text;

pub use settings::Settings;
