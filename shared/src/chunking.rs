//! Chunking: parsed Markdown sections, in their normalised form ([`text::normalize`]), to token-bounded chunks that
//! follow the document's structure (text-splitter's Markdown splitter, sized with the cl100k_base tokenizer), each
//! with its page, the path of headings above it and its place in the text. Pure: no I/O.

use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use text_splitter::{ChunkConfig, MarkdownSplitter};
use tiktoken_rs::CoreBPE;

use crate::{parsing::Section, text};

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
    /// `{"page": n, "headings": ["Title", "Section"], "span": [start, end]}` (page only when the format has pages).
    ///
    /// `span` is where the content lies in the document's normalised text: the sections' texts, each through
    /// [`text::normalize`], joined with `"\n\n"` in order. It counts Unicode characters (not bytes) from 0, end
    /// exclusive, so slicing that text by it gives the content exactly; in the rare document whose nesting was
    /// flattened for the splitter (more than twelve list levels or eight quote levels) the slice holds the same
    /// words with the original indentation and quote markers.
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

/// Cuts `sections`, normalised, into chunks of at most `max_tokens`, repeating `overlap_tokens` between neighbours.
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
    // Where the section starts in the document's normalised text, in characters.
    let mut section_start = 0;
    for section in sections {
        let normalized = text::normalize(&section.markdown);
        let markdown = flatten_nesting(&normalized);
        let to_normalized = OffsetMap::new(&normalized, &markdown);
        let mut chars = CharOffsets::new(&normalized);
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
            let start = offset + text.len() - text.trim_start().len();
            let (start, end) = (
                to_normalized.start(start),
                to_normalized.end(start + content.len()),
            );
            let span = [
                section_start + chars.at(start),
                section_start + chars.at(end.max(start)),
            ];
            let mut metadata = serde_json::json!({
                "headings": outline.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
                "span": span,
            });
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
        section_start += chars.at(normalized.len()) + "\n\n".len();
    }
    Ok(chunks)
}

/// Byte offsets in one text to character offsets, each counted on from the last one asked for: chunks come in
/// order, a little back for the overlap, so a document is counted about once.
struct CharOffsets<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl<'a> CharOffsets<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            byte: 0,
            chars: 0,
        }
    }

    /// The character offset of `byte` (a character boundary).
    fn at(&mut self, byte: usize) -> usize {
        if byte >= self.byte {
            self.chars += self.text[self.byte..byte].chars().count();
        } else {
            self.chars -= self.text[byte..self.byte].chars().count();
        }
        self.byte = byte;
        self.chars
    }
}

/// Byte offsets in the text the splitter saw (after [`flatten_nesting`]) back to the text it was made from. Lines
/// correspond one to one and differ only in their indentation and quote markers.
struct OffsetMap {
    /// One per line; none when nothing was flattened.
    lines: Vec<LineShift>,
}

/// Where one line lies in the flattened and the original text.
struct LineShift {
    /// Its start in the flattened text.
    flat_start: usize,
    /// Where its unchanged end (all but the rewritten indentation and quote markers) starts in the flattened text.
    flat_tail: usize,
    /// Where that unchanged end starts in the original.
    original_tail: usize,
    /// Its first non-blank character in the original.
    original_first: usize,
}

impl OffsetMap {
    fn new(original: &str, flat: &str) -> Self {
        if original == flat {
            return Self { lines: Vec::new() };
        }
        let (mut flat_start, mut original_start) = (0, 0);
        let mut lines = Vec::new();
        for (o, f) in original
            .split_inclusive('\n')
            .zip(flat.split_inclusive('\n'))
        {
            let same: usize = o
                .chars()
                .rev()
                .zip(f.chars().rev())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a.len_utf8())
                .sum();
            lines.push(LineShift {
                flat_start,
                flat_tail: flat_start + f.len() - same,
                original_tail: original_start + o.len() - same,
                original_first: original_start + o.len() - o.trim_start_matches([' ', '\t']).len(),
            });
            flat_start += f.len();
            original_start += o.len();
        }
        Self { lines }
    }

    /// Where a chunk starting at `flat` starts in the original: a start among rewritten quote markers moves to the
    /// first marker of the original line.
    fn start(&self, flat: usize) -> usize {
        self.map(flat, |line| line.original_first)
    }

    /// Where a chunk ending at `flat` ends in the original: an end among rewritten quote markers moves to the end of
    /// the original ones.
    fn end(&self, flat: usize) -> usize {
        self.map(flat, |line| line.original_tail)
    }

    fn map(&self, flat: usize, in_prefix: impl Fn(&LineShift) -> usize) -> usize {
        let Some(line) = self
            .lines
            .partition_point(|l| l.flat_start <= flat)
            .checked_sub(1)
            .map(|i| &self.lines[i])
        else {
            return flat;
        };
        if flat >= line.flat_tail {
            line.original_tail + (flat - line.flat_tail)
        } else {
            in_prefix(line)
        }
    }
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
            markdown: doc.clone(),
        }];
        let chunks = chunk(&sections, 512, 64, 100_000).unwrap();
        let all: String = chunks.iter().map(|c| c.content.as_str()).collect();
        assert!(all.contains("item 0") && all.contains("item 1499") && all.contains("deep quote"));
        // The spans point into the unflattened text: the same words, with the original indentation and quotes.
        let words = |s: &str| {
            s.split(|c: char| c.is_whitespace() || c == '>')
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        for c in &chunks {
            assert_eq!(
                words(&span_of(&doc, c)),
                words(&c.content),
                "chunk {}",
                c.index
            );
        }
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
            serde_json::json!({"page": 1, "headings": ["Report"], "span": [0, 21]})
        );
        assert_eq!(
            chunks[1].metadata,
            serde_json::json!({"page": 2, "headings": ["Report"], "span": [23, 45]})
        );
    }

    /// The characters of `text` in `chunk`'s span.
    fn span_of(text: &str, chunk: &Chunk) -> String {
        let span = &chunk.metadata["span"];
        let (start, end) = (span[0].as_u64().unwrap(), span[1].as_u64().unwrap());
        text.chars()
            .skip(start as usize)
            .take((end - start) as usize)
            .collect()
    }

    #[test]
    fn sections_are_chunked_in_their_normalised_form() {
        let sections = [section(
            Some(1),
            "# Speci\u{FB01}cation\n\nThe \u{FB01}le is a data-\nbase of Ｅ０５０２ er\u{00AD}rors.",
        )];
        let chunks = chunk(&sections, 512, 0, 10).unwrap();
        assert_eq!(
            chunks[0].content,
            "# Specification\n\nThe file is a database of E0502 errors."
        );
        assert_eq!(
            chunks[0].metadata["headings"],
            serde_json::json!(["Specification"])
        );
    }

    #[test]
    fn every_chunk_span_slices_the_normalised_document_to_its_content() {
        let para = "Die Gezeiten \u{FB02}ießen zweimal täglich – der Mond zieht am Meer 🌊. 潮汐は一日二回。 ";
        let sections = [
            section(Some(1), &format!("  # Gezeiten\n\n{}\n", para.repeat(12))),
            section(Some(2), ""),
            section(
                Some(3),
                &format!(
                    "## Spring-\ntides\n\n{}\n\n- a list-\n  item\n",
                    para.repeat(9)
                ),
            ),
            section(Some(4), &format!("\n\n> ｑｕｏｔｅｄ {}", para.repeat(5))),
        ];
        let chunks = chunk(&sections, 48, 12, 1000).unwrap();
        assert!(chunks.len() > 10, "{}", chunks.len());
        let document = sections
            .iter()
            .map(|s| text::normalize(&s.markdown))
            .collect::<Vec<_>>()
            .join("\n\n");
        for c in &chunks {
            assert_eq!(span_of(&document, c), c.content, "chunk {}", c.index);
        }
        let starts: Vec<u64> = chunks
            .iter()
            .map(|c| c.metadata["span"][0].as_u64().unwrap())
            .collect();
        assert!(starts.is_sorted(), "{starts:?}");
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
