//! Bounded helper processes. CPU-heavy work on hostile input (parsing an uploaded file, splitting its Markdown
//! into chunks) runs in a child process of the worker binary: killed at its deadline and capped in address space,
//! so a document that fails frees its core and its memory at once, where a thread under a timeout would go on
//! burning a core after its document was failed.
//!
//! The worker registers its own executable at start-up ([`register`]); its `main` hands `--parse-one` and
//! `--chunk-one` invocations to [`crate::providers::local::parse_helper_main`] and [`chunk_helper_main`] before
//! anything else starts. Without a registered executable (tests, tools) the work runs in-process under the same
//! deadline.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{Arc, OnceLock},
    time::Duration,
};

use crate::{
    chunking::{self, Chunk},
    parsing::Section,
};

static EXE: OnceLock<PathBuf> = OnceLock::new();

/// Makes parsing and chunking of this process run in helper processes of `exe` (the worker binary).
pub fn register(exe: PathBuf) {
    let _ = EXE.set(exe);
}

/// The registered helper executable, if any.
pub fn registered() -> Option<&'static Path> {
    EXE.get().map(PathBuf::as_path)
}

/// Why a helper process gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// It could not be started (retryable: the machine is short of processes or memory).
    #[error("cannot start the helper process: {0}")]
    Start(std::io::Error),
    /// Waiting for it failed.
    #[error("the helper process failed: {0}")]
    Wait(std::io::Error),
    /// It passed its deadline and was killed.
    #[error("the helper process passed its deadline and was killed")]
    TimedOut,
}

/// Runs `exe args…` with `input` on its stdin and a cleared environment; kills it at `timeout` (dropping the child
/// kills it). Returns its output, whatever its exit status.
pub async fn run(
    exe: &Path,
    args: &[String],
    input: Arc<Vec<u8>>,
    timeout: Duration,
) -> Result<Output, HelperError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(exe)
        .args(args)
        // A group of its own: a Ctrl-C or SIGTERM sent to the worker's process group stops the worker gracefully,
        // and does not kill the helper (which would fail its document for nothing).
        .process_group(0)
        .env_clear()
        // An instrumented build (`make coverage`) writes the helper's counters beside its parent's.
        .envs(std::env::var_os("LLVM_PROFILE_FILE").map(|v| ("LLVM_PROFILE_FILE", v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(HelperError::Start)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let feed = tokio::spawn(async move {
        // A helper that dies early closes the pipe; its exit status tells why.
        let _ = stdin.write_all(&input).await;
    });
    let output = tokio::time::timeout(timeout, child.wait_with_output()).await;
    feed.abort();
    match output {
        Err(_) => Err(HelperError::TimedOut),
        Ok(Err(e)) => Err(HelperError::Wait(e)),
        Ok(Ok(output)) => Ok(output),
    }
}

/// In a helper process: caps its address space at `memory_mb` MiB (0: none).
pub fn bound_memory(memory_mb: u64) -> Result<(), String> {
    if memory_mb == 0 {
        return Ok(());
    }
    let bytes = memory_mb.saturating_mul(1024 * 1024);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, bytes, bytes)
        .map_err(|e| format!("cannot bound the helper's memory: {e}"))
}

/// In a helper process: reads all of stdin.
pub fn read_input() -> Result<Vec<u8>, String> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| format!("cannot read the document: {e}"))?;
    Ok(input)
}

/// In a helper process: writes `answer` to stdout as JSON; returns the exit code.
pub fn write_answer(answer: &impl serde::Serialize) -> i32 {
    let mut out = std::io::stdout().lock();
    match serde_json::to_writer(&mut out, answer)
        .and_then(|()| out.flush().map_err(serde_json::Error::io))
    {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cannot write the result: {e}");
            2
        }
    }
}

/// What a chunk helper writes to stdout.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum ChunkAnswer {
    Chunks(Vec<Chunk>),
    Error(String),
}

/// The sizes a document is chunked with.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSizes {
    /// Most tokens per chunk.
    pub max_tokens: usize,
    /// Tokens shared by neighbouring chunks.
    pub overlap_tokens: usize,
    /// Most chunks per document.
    pub max_chunks: usize,
}

/// The chunk helper process: bounds its memory, reads the parsed sections (JSON) from stdin, chunks them and
/// writes the chunks (or why not) to stdout. Returns the exit code.
pub fn chunk_helper_main(sizes: ChunkSizes, memory_mb: u64) -> i32 {
    if let Err(e) = bound_memory(memory_mb) {
        eprintln!("{e}");
        return 2;
    }
    let input = match read_input() {
        Ok(input) => input,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let sections: Vec<Section> = match serde_json::from_slice(&input) {
        Ok(sections) => sections,
        Err(e) => {
            eprintln!("the sections do not decode: {e}");
            return 2;
        }
    };
    let answer = match chunking::chunk(
        &sections,
        sizes.max_tokens,
        sizes.overlap_tokens,
        sizes.max_chunks,
    ) {
        Ok(chunks) => ChunkAnswer::Chunks(chunks),
        Err(e) => ChunkAnswer::Error(e.to_string()),
    };
    write_answer(&answer)
}

/// Why chunking a document failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkFailure {
    /// The document cannot be chunked (too many chunks, past the deadline or the memory bound, a crash).
    #[error("{0}")]
    Document(String),
    /// The machine could not run the chunker now: worth another attempt.
    #[error("{0}")]
    Unavailable(String),
}

/// Chunks `sections` within `timeout` (and `memory_mb` in a helper process): in a helper process of the
/// registered executable, which is killed at the deadline, or in-process without one.
pub async fn chunk_bounded(
    sections: Vec<Section>,
    sizes: ChunkSizes,
    memory_mb: u64,
    timeout: Duration,
) -> Result<Vec<Chunk>, ChunkFailure> {
    let too_slow = || {
        ChunkFailure::Document(format!(
            "chunking took longer than {} s",
            timeout.as_secs_f64().round()
        ))
    };
    let Some(exe) = registered() else {
        let splitting = tokio::task::spawn_blocking(move || {
            chunking::chunk(
                &sections,
                sizes.max_tokens,
                sizes.overlap_tokens,
                sizes.max_chunks,
            )
        });
        return tokio::time::timeout(timeout, splitting)
            .await
            .map_err(|_| too_slow())?
            .map_err(|e| {
                ChunkFailure::Document(format!("the chunker crashed on this document: {e}"))
            })?
            .map_err(|e| ChunkFailure::Document(e.to_string()));
    };
    let input = serde_json::to_vec(&sections)
        .map_err(|e| ChunkFailure::Document(format!("the sections do not encode: {e}")))?;
    let args: Vec<String> = [
        "--chunk-one".to_owned(),
        "--chunk-max-tokens".to_owned(),
        sizes.max_tokens.to_string(),
        "--chunk-overlap-tokens".to_owned(),
        sizes.overlap_tokens.to_string(),
        "--chunk-max-chunks".to_owned(),
        sizes.max_chunks.to_string(),
        "--parse-memory-mb".to_owned(),
        memory_mb.to_string(),
    ]
    .into();
    let output = match run(exe, &args, Arc::new(input), timeout).await {
        Ok(output) => output,
        Err(HelperError::TimedOut) => return Err(too_slow()),
        Err(e) => return Err(ChunkFailure::Unavailable(e.to_string())),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("memory allocation") || stderr.contains("out of memory") {
            return Err(ChunkFailure::Document(format!(
                "chunking needs more than {memory_mb} MiB of memory"
            )));
        }
        // Exit code 2: the helper could not set itself up (bound its memory, read or write its pipes): the
        // machine's trouble, not the document's.
        if output.status.code() == Some(2) {
            return Err(ChunkFailure::Unavailable(format!(
                "the chunk helper could not run: {}",
                stderr.trim()
            )));
        }
        use std::os::unix::process::ExitStatusExt;
        let how = output
            .status
            .signal()
            .map_or_else(|| output.status.to_string(), |s| format!("signal {s}"));
        return Err(ChunkFailure::Document(format!(
            "the chunker crashed on this document ({how})"
        )));
    }
    match serde_json::from_slice::<ChunkAnswer>(&output.stdout) {
        Ok(ChunkAnswer::Chunks(chunks)) => Ok(chunks),
        Ok(ChunkAnswer::Error(e)) => Err(ChunkFailure::Document(e)),
        Err(e) => Err(ChunkFailure::Unavailable(format!(
            "unreadable answer of the chunk helper: {e}"
        ))),
    }
}
