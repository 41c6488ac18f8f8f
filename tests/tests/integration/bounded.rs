//! Chunking runs where its deadline can stop it: in a helper process of the worker binary, killed when the
//! deadline passes, so a hostile document that fails frees its core at once.

use std::time::Duration;

use tests::wait_for;
use upload_pipeline::{
    chunking,
    helper::{self, ChunkFailure, ChunkSizes},
    parsing::Section,
};

const SIZES: ChunkSizes = ChunkSizes {
    max_tokens: 64,
    overlap_tokens: 8,
    max_chunks: 100_000,
};

fn section(text: String) -> Section {
    Section {
        page: None,
        markdown: text,
    }
}

/// Chunk helpers of this process still alive (not yet dead or reaped as zombies).
fn live_chunk_helpers() -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let path = e.path();
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the fields after the command's closing parenthesis.
            let rest: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
            rest.get(1) == Some(&me.as_str())
                && rest.first() != Some(&"Z")
                && String::from_utf8_lossy(&cmdline).contains("--chunk-one")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunking_in_a_helper_process_matches_in_process_chunking_and_is_killed_at_its_deadline() {
    helper::register(tests::worker_bin());
    let sections = vec![
        section("A first paragraph about tides and the moon.\n\n".repeat(40)),
        section("- a list\n  - nested once\n    - nested twice\n".repeat(30)),
    ];
    let expected = chunking::chunk(
        &sections,
        SIZES.max_tokens,
        SIZES.overlap_tokens,
        SIZES.max_chunks,
    )
    .unwrap();
    let chunks = helper::chunk_bounded(sections, SIZES, 512, Duration::from_secs(60))
        .await
        .expect("chunked in the helper");
    assert_eq!(chunks, expected);

    // Two megabytes of text cannot be tokenised in 50 ms (the helper's start alone takes longer): the deadline
    // passes, the document fails with the reason, and no helper is left running.
    let big = vec![section("lighthouse keeper logbook entry ".repeat(65_000))];
    let err = helper::chunk_bounded(big, SIZES, 512, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ChunkFailure::Document(m) if m.contains("chunking took longer than")),
        "{err:?}"
    );
    wait_for(
        "the timed-out chunk helper to be gone",
        Duration::from_secs(10),
        || async { (live_chunk_helpers() == 0).then_some(()) },
    )
    .await;
}
