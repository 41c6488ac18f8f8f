//! A user's commands on their own documents, through the API: `upload`, `status` and `search`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use upload_pipeline::{
    Settings,
    auth::Auth,
    client::{Client, SearchRequest},
};
use uuid::Uuid;

use super::{
    args::ApiArgs,
    output::{plural, settling_bar, squeeze},
};

impl ApiArgs {
    /// A client of the API with the given token, or one minted for `--user`.
    fn client(&self, settings: &Settings) -> anyhow::Result<Client> {
        let token = match (&self.token, self.user) {
            (Some(t), _) => t.clone(),
            (None, Some(user)) => Auth::hs256(settings.api.jwt_secret.expose()).issue(
                user,
                Duration::from_secs(3600),
                false,
            ),
            (None, None) => bail!("give --token (or UPLOAD_PIPELINE_TOKEN) or --user"),
        };
        Ok(Client::new(&self.api, &token)?)
    }
}

/// Uploads the files under `paths`, printing each one's document id, and with `wait` follows them until settled.
pub async fn upload(
    settings: &Settings,
    api: &ApiArgs,
    paths: &[PathBuf],
    wait: bool,
) -> anyhow::Result<()> {
    super::start_logging(settings, super::QUIET)?;
    let client = api.client(settings)?;
    let files = collect_files(paths)?;
    let mut uploaded = Vec::new();
    let mut refused = 0;
    for file in &files {
        match client.upload_file(file, None).await {
            Ok(up) => {
                println!(
                    "{}  {}{}",
                    up.document_id,
                    file.display(),
                    if up.duplicate {
                        "  (duplicate of an earlier upload)"
                    } else {
                        ""
                    }
                );
                uploaded.push((up.document_id, file.display().to_string()));
            }
            Err(e) => {
                refused += 1;
                eprintln!("refused {}: {e}", file.display());
            }
        }
    }
    if wait && !uploaded.is_empty() {
        wait_settled(&client, &uploaded).await?;
    }
    if refused > 0 {
        bail!("{refused} of {} files were refused", files.len());
    }
    Ok(())
}

/// The files given, and the files under the folders given, each folder's in name order.
fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("Failed to read folder {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            out.extend(collect_files(&entries)?);
        } else if path.is_file() {
            out.push(path.clone());
        } else {
            bail!("{} is neither a file nor a folder", path.display());
        }
    }
    Ok(out)
}

/// Polls the uploaded documents (id, file name) until each is ready or failed, then prints the outcome.
async fn wait_settled(client: &Client, uploaded: &[(Uuid, String)]) -> anyhow::Result<()> {
    let bar = settling_bar(uploaded.len() as u64, "documents");
    let started = Instant::now();
    loop {
        let mut settled = 0;
        let mut failed = Vec::new();
        for (id, name) in uploaded {
            let doc = client.status(*id).await.context("Failed to get a status")?;
            match doc.status.as_str() {
                "ready" => settled += 1,
                "failed" => {
                    settled += 1;
                    failed.push(format!("{name}: {}", doc.error.unwrap_or_default()));
                }
                _ => {}
            }
        }
        bar.set_position(settled);
        if settled == uploaded.len() as u64 {
            bar.finish_and_clear();
            println!(
                "{} documents settled in {:.1} s: {} ready, {} failed",
                uploaded.len(),
                started.elapsed().as_secs_f64(),
                uploaded.len() - failed.len(),
                failed.len()
            );
            for f in &failed {
                println!("  failed: {f}");
            }
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("documents still not settled after 10 minutes: are workers running?");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints a document's status as JSON.
pub async fn status(settings: &Settings, api: &ApiArgs, id: Uuid) -> anyhow::Result<()> {
    let doc = api
        .client(settings)?
        .status(id)
        .await
        .context("Failed to get the status")?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Prints the best matches for `request`, each with the start of its text (or, with `json`, the API's answer).
pub async fn search(
    settings: &Settings,
    api: &ApiArgs,
    request: &SearchRequest,
    json: bool,
) -> anyhow::Result<()> {
    let found = api
        .client(settings)?
        .search_with(request)
        .await
        .context("Search failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    let n = found.results.len();
    println!(
        "{n} result{} in {:.1} ms ({}, {}{})",
        plural(n as u64),
        found.took_ms,
        request.mode,
        found.embedding_model,
        if found.reranked { ", reranked" } else { "" }
    );
    for (i, hit) in found.results.iter().enumerate() {
        let page = hit
            .metadata
            .get("page")
            .map(|p| format!(" p.{p}"))
            .unwrap_or_default();
        let text: String = squeeze(&hit.content).chars().take(220).collect();
        let score = hit.rerank_score.unwrap_or(hit.score);
        println!(
            "{:>2}. {score:.3}  {}{page} #{}\n    {text}",
            i + 1,
            hit.filename,
            hit.chunk_index
        );
    }
    Ok(())
}
