//! `producer`: pushes work onto the pipeline's queues and operates them (state, failures and retries, dead
//! letters).

mod cli;

use anyhow::Context;
use clap::Parser;
use cli::{Args, Command, documents, failures, queue, quota, serve, setup, synthetic};
use upload_pipeline::{Settings, client::SearchRequest};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(args.config.as_deref()).context("Failed to load settings")?;
    // Logging starts in each command: the server logs at info, the commands that talk to people on stdout at
    // warnings, and those that only print (settings, openapi, token, status, search) not at all.
    match args.command {
        Command::Serve { listen, check } => serve::run(settings, listen, check).await,
        Command::Migrate => setup::migrate(&settings).await,
        Command::TenantIndexes => setup::tenant_indexes(&settings).await,
        Command::Settings { listen } => setup::show_settings(settings, listen),
        Command::Openapi => setup::openapi(),
        Command::Token { user, ttl, admin } => setup::token(&settings, user, ttl, admin),
        Command::Upload { paths, wait, api } => {
            documents::upload(&settings, &api, &paths, wait).await
        }
        Command::Status { id, api } => documents::status(&settings, &api, id).await,
        Command::Search {
            query,
            k,
            mode,
            filter,
            rerank,
            no_rerank,
            json,
            api,
        } => {
            let mut request = SearchRequest::new(query).k(k).mode(mode);
            if let Some(filter) = filter {
                request = request.filters(filter);
            }
            if rerank || no_rerank {
                request = request.rerank(rerank);
            }
            documents::search(&settings, &api, &request, json).await
        }
        Command::Queues { json } => queue::show(&settings, json).await,
        Command::Failures {
            filter,
            limit,
            json,
        } => failures::list(&settings, &filter.filter(), limit, json).await,
        Command::Retry { status, filter } => {
            failures::retry(settings, &status, &filter.filter()).await
        }
        Command::Dlq { action } => queue::dlq(&settings, action).await,
        Command::Quota { action } => quota::run(&settings, action).await,
        Command::Synthetic { batch } => synthetic::run(&settings, &batch).await,
    }
}
