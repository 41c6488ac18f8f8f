//! Chunking: parsed Markdown sections to token-bounded chunks that follow the document's structure
//! (text-splitter's Markdown splitter, sized with the cl100k_base tokenizer), each with its page and the path of
//! headings above it. Pure: no I/O.

use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use text_splitter::{ChunkConfig, MarkdownSplitter};
use tiktoken_rs::CoreBPE;

use crate::parsing::Section;

/// The tokenizer chunks are measured with (OpenAI's embedding models use it).
pub fn tokenizer() -> Arc<CoreBPE> {
    static BPE: LazyLock<Arc<CoreBPE>> = LazyLock::new(|| {
        Arc::new(tiktoken_rs::cl100k_base().expect("the cl100k_base tables are compiled in"))
    });
    BPE.clone()
}

/// Tokens of `text` with [`tokenizer`].
pub fn count_tokens(text: &str) -> usize {
    tokenizer().encode_ordinary(text).len()
}

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Position in the document, from 0.
    pub index: usize,
    /// The text.
    pub content: String,
    /// Its size in tokens.
    pub token_count: usize,
    /// SHA-256 of the content, hex: an unchanged chunk keeps its embedding when a document is chunked again.
    pub content_sha256: String,
    /// `{"page": n, "headings": ["Title", "Section"]}` (page only when the format has pages).
    pub metadata: serde_json::Value,
}

/// Why chunking failed (permanent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// Invalid sizes.
    #[error("invalid chunk sizes: {0}")]
    Config(String),
    /// More chunks than allowed.
    #[error("the document makes {0} chunks, above the limit of {1}")]
    TooMany(usize, usize),
}

/// Cuts `sections` into chunks of at most `max_tokens`, repeating `overlap_tokens` between neighbours.
pub fn chunk(
    sections: &[Section],
    max_tokens: usize,
    overlap_tokens: usize,
    max_chunks: usize,
) -> Result<Vec<Chunk>, ChunkError> {
    let bpe = tokenizer();
    let config = ChunkConfig::new(max_tokens)
        .with_overlap(overlap_tokens)
        .map_err(|e| ChunkError::Config(e.to_string()))?
        .with_sizer(bpe.clone());
    let splitter = MarkdownSplitter::new(config);
    let mut chunks = Vec::new();
    // Headings carry over from one section (page) to the next.
    let mut outline: Vec<(usize, String)> = Vec::new();
    for section in sections {
        let markdown = flatten_nesting(&section.markdown);
        let headings = headings_with_offsets(&markdown);
        let mut next_heading = 0;
        for (offset, text) in splitter.chunk_indices(&markdown) {
            // Headings before the chunk's first line of body text apply to it (a chunk may open with several).
            let body_start = offset + first_body_line(text);
            while next_heading < headings.len() && headings[next_heading].0 <= body_start {
                let (_, level, title) = &headings[next_heading];
                outline.retain(|(l, _)| l < level);
                outline.push((*level, title.clone()));
                next_heading += 1;
            }
            let content = text.trim().to_owned();
            if content.is_empty() {
                continue;
            }
            let mut metadata = serde_json::json!({ "headings": outline.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>() });
            if let Some(page) = section.page {
                metadata["page"] = page.into();
            }
            chunks.push(Chunk {
                index: chunks.len(),
                token_count: bpe.encode_ordinary(&content).len(),
                content_sha256: hex::encode(Sha256::digest(content.as_bytes())),
                content,
                metadata,
            });
            if chunks.len() > max_chunks {
                return Err(ChunkError::TooMany(chunks.len(), max_chunks));
            }
        }
        // Headings after the last chunk start still open the outline for the next section.
        for (_, level, title) in &headings[next_heading..] {
            outline.retain(|(l, _)| l < level);
            outline.push((*level, title.clone()));
        }
    }
    Ok(chunks)
}

/// Deepest indentation kept, in columns: about twelve levels of nested lists.
const MAX_INDENT: usize = 24;
/// Most block-quote markers kept at the start of a line.
const MAX_QUOTES: usize = 8;

/// `markdown` with list indentation capped at [`MAX_INDENT`] columns and block quotes at [`MAX_QUOTES`] levels.
/// The Markdown splitter's time grows steeply with nesting depth (200 nested list levels, 42 KB, took 22 s; 400
/// levels 209 s), so a hostile or machine-made document could hold a chunk worker for hours; no real document
/// nests deeper, and every word stays.
fn flatten_nesting(markdown: &str) -> std::borrow::Cow<'_, str> {
    let too_deep = |line: &str| {
        let indent: usize = line
            .chars()
            .take_while(|c| *c == ' ' || *c == '\t')
            .map(|c| if c == '\t' { 4 } else { 1 })
            .sum();
        let quotes = line
            .chars()
            .take_while(|c| *c == '>' || *c == ' ')
            .filter(|c| *c == '>')
            .count();
        indent > MAX_INDENT || quotes > MAX_QUOTES
    };
    if !markdown.lines().any(too_deep) {
        return std::borrow::Cow::Borrowed(markdown);
    }
    let mut out = String::with_capacity(markdown.len());
    for line in markdown.split_inclusive('\n') {
        let body = line.trim_start_matches([' ', '\t']);
        let indent = line.len() - body.len();
        let width: usize = line[..indent]
            .chars()
            .map(|c| if c == '\t' { 4 } else { 1 })
            .sum();
        out.push_str(&" ".repeat(width.min(MAX_INDENT)));
        let quoted = body.trim_start_matches(['>', ' ']);
        let quotes = body[..body.len() - quoted.len()].matches('>').count();
        if quotes > MAX_QUOTES {
            out.push_str(&"> ".repeat(MAX_QUOTES));
            out.push_str(quoted);
        } else {
            out.push_str(body);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Byte offset of the first line of `text` that is neither blank nor a heading (`text.len()` if none).
fn first_body_line(text: &str) -> usize {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        let level = t.bytes().take_while(|&b| b == b'#').count();
        let heading = (1..=6).contains(&level) && t[level..].starts_with([' ', '\t']);
        if !t.trim().is_empty() && !heading {
            return offset;
        }
        offset += line.len();
    }
    text.len()
}

/// ATX headings (`# Title`) outside code fences, with their byte offsets and levels.
fn headings_with_offsets(markdown: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    let mut in_fence = false;
    for line in markdown.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
        } else if !in_fence {
            let level = trimmed.bytes().take_while(|&b| b == b'#').count();
            if (1..=6).contains(&level) && trimmed[level..].starts_with([' ', '\t']) {
                let title = trimmed[level..]
                    .trim()
                    .trim_end_matches('#')
                    .trim()
                    .to_owned();
                if !title.is_empty() {
                    out.push((offset, level, title));
                }
            }
        }
        offset += line.len();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_flattened_and_every_word_kept() {
        // 1,500 nested list levels and 40 nested quotes: hours in the Markdown splitter before the cap.
        let lists: String = (0..1500)
            .map(|i| format!("{}- item {i}\n", "  ".repeat(i)))
            .collect();
        let quotes = format!("{} deep quote\n", ">".repeat(40));
        let doc = format!("# Deep\n\n{lists}\n{quotes}");
        let flat = flatten_nesting(&doc);
        assert!(
            flat.lines()
                .all(|l| l.len() - l.trim_start().len() <= MAX_INDENT)
        );
        assert!(flat.contains(&format!("{}- item 1499", " ".repeat(MAX_INDENT))));
        assert!(flat.contains("> > > > > > > > deep quote"));
        let sections = [Section {
            page: None,
            markdown: doc,
        }];
        let chunks = chunk(&sections, 512, 64, 100_000).unwrap();
        let all: String = chunks.iter().map(|c| c.content.as_str()).collect();
        assert!(all.contains("item 0") && all.contains("item 1499") && all.contains("deep quote"));
        // Ordinary documents pass through untouched.
        let plain = "# A\n\n- one\n  - two\n    - three\n\n> quoted\n";
        assert!(matches!(
            flatten_nesting(plain),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    fn section(page: Option<u32>, md: &str) -> Section {
        Section {
            page,
            markdown: md.to_owned(),
        }
    }

    #[test]
    fn chunks_stay_within_the_token_limit_and_overlap() {
        let para = "The tide rises and falls twice a day because the moon pulls on the oceans. "
            .repeat(40);
        let md = format!("# Tides\n\n{para}\n\n## Spring tides\n\n{para}");
        let chunks = chunk(&[section(None, &md)], 64, 16, 1000).unwrap();
        assert!(chunks.len() > 4, "{}", chunks.len());
        for c in &chunks {
            assert!(
                c.token_count <= 64,
                "chunk {} has {} tokens",
                c.index,
                c.token_count
            );
            assert_eq!(c.content_sha256.len(), 64);
        }
        assert_eq!(
            chunks.iter().map(|c| c.index).collect::<Vec<_>>(),
            (0..chunks.len()).collect::<Vec<_>>()
        );
        let last = chunks.last().unwrap();
        assert_eq!(
            last.metadata["headings"],
            serde_json::json!(["Tides", "Spring tides"])
        );
        assert_eq!(chunks[0].metadata["headings"], serde_json::json!(["Tides"]));
    }

    #[test]
    fn pages_and_headings_carry_into_metadata() {
        let sections = [
            section(Some(1), "# Report\n\nIntro text."),
            section(Some(2), "More text on page two."),
        ];
        let chunks = chunk(&sections, 512, 64, 1000).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[0].metadata,
            serde_json::json!({"page": 1, "headings": ["Report"]})
        );
        assert_eq!(
            chunks[1].metadata,
            serde_json::json!({"page": 2, "headings": ["Report"]})
        );
    }

    #[test]
    fn a_chunk_opening_with_several_headings_gets_all_of_them() {
        let chunks = chunk(
            &[section(
                None,
                "# A\n\n## B\n\nText under B.\n\n### C\n\nText under C.",
            )],
            512,
            0,
            10,
        )
        .unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            chunks[0].metadata["headings"],
            serde_json::json!(["A", "B"])
        );
    }

    #[test]
    fn headings_in_code_fences_are_not_headings() {
        let h = headings_with_offsets("# A\n```\n# not a heading\n```\n## B\n");
        assert_eq!(
            h.iter()
                .map(|(_, l, t)| (*l, t.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "A"), (2, "B")]
        );
    }

    #[test]
    fn too_many_chunks_is_an_error() {
        let md = "word ".repeat(2000);
        assert!(matches!(
            chunk(&[section(None, &md)], 16, 0, 10),
            Err(ChunkError::TooMany(_, 10))
        ));
        assert!(matches!(
            chunk(&[section(None, "x")], 16, 16, 10),
            Err(ChunkError::Config(_))
        ));
    }
}
