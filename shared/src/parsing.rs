//! Local parsers: uploaded bytes to Markdown sections, each with its page number where the format has pages.
//! Pure functions (no I/O); the parse stage runs them on a blocking thread with a time limit.
//!
//! | kind | detected by | becomes |
//! |---|---|---|
//! | plain text | `.txt`, `.text`, `.log`, `.csv`, or no extension and UTF-8 content | the text |
//! | Markdown | `.md`, `.markdown` | the text |
//! | HTML | `.html`, `.htm` | Markdown (scripts, styles and head dropped) |
//! | PDF | `%PDF-` magic | the text layer, one section per page |
//! | DOCX | `.docx` and a zip with `word/document.xml` | Markdown with headings, one section per page break |

use std::io::Read;

use serde::{Deserialize, Serialize};

/// A part of a parsed document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The page, from 1, when the format has pages.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub page: Option<u32>,
    /// Markdown text.
    pub markdown: String,
}

/// The kinds of document the local parsers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocKind {
    /// Plain UTF-8 text.
    Text,
    /// Markdown.
    Markdown,
    /// HTML.
    Html,
    /// PDF with a text layer.
    Pdf,
    /// Word (Office Open XML).
    Docx,
}

impl DocKind {
    /// The MIME type recorded for the kind.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain",
            Self::Markdown => "text/markdown",
            Self::Html => "text/html",
            Self::Pdf => "application/pdf",
            Self::Docx => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        }
    }

    /// Decides the kind from the file name and the first bytes, and rejects what cannot be right before it is
    /// stored: empty files, binary data or invalid UTF-8 in a text kind, a PDF or DOCX without its signature.
    pub fn detect(filename: &str, bytes: &[u8]) -> Result<Self, ParseError> {
        if bytes.is_empty() {
            return Err(ParseError::Empty);
        }
        let ext = filename
            .rsplit_once('.')
            .map(|(_, e)| e.to_ascii_lowercase())
            .unwrap_or_default();
        let kind = match ext.as_str() {
            "txt" | "text" | "log" | "csv" => Self::Text,
            "md" | "markdown" => Self::Markdown,
            "html" | "htm" => Self::Html,
            "pdf" => Self::Pdf,
            "docx" => Self::Docx,
            // No extension (README, notes): the content decides.
            "" if bytes.starts_with(b"%PDF-") => Self::Pdf,
            "" if bytes.starts_with(b"PK\x03\x04") => Self::Docx,
            "" if std::str::from_utf8(bytes).is_ok_and(|t| !t.contains('\0')) => Self::Text,
            _ => {
                return Err(ParseError::Unsupported(format!(
                    "cannot read {filename:?}: supported are .txt, .md, .html, .pdf and .docx"
                )));
            }
        };
        match kind {
            Self::Text | Self::Markdown | Self::Html => {
                let text = std::str::from_utf8(bytes).map_err(|e| {
                    ParseError::InvalidText(format!(
                        "{filename:?} is not valid UTF-8 (first bad byte at offset {})",
                        e.valid_up_to()
                    ))
                })?;
                if text.contains('\0') {
                    return Err(ParseError::InvalidText(format!(
                        "{filename:?} contains binary data (NUL bytes)"
                    )));
                }
            }
            Self::Pdf if !bytes.starts_with(b"%PDF-") => {
                return Err(ParseError::Corrupt(format!(
                    "{filename:?} is not a PDF (no %PDF- header)"
                )));
            }
            Self::Docx if !bytes.starts_with(b"PK\x03\x04") => {
                return Err(ParseError::Corrupt(format!(
                    "{filename:?} is not a DOCX (not a zip archive)"
                )));
            }
            Self::Pdf | Self::Docx => {}
        }
        Ok(kind)
    }

    /// The kind recorded under a MIME type.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        [
            Self::Text,
            Self::Markdown,
            Self::Html,
            Self::Pdf,
            Self::Docx,
        ]
        .into_iter()
        .find(|k| k.content_type() == content_type)
    }
}

/// Why a document could not be parsed. Every variant is permanent: parsing the same bytes again fails again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Zero bytes.
    #[error("the file is empty")]
    Empty,
    /// A type the local parsers do not read.
    #[error("{0}")]
    Unsupported(String),
    /// Binary data or invalid UTF-8 where text was expected.
    #[error("{0}")]
    InvalidText(String),
    /// The file is damaged or not what its name says.
    #[error("{0}")]
    Corrupt(String),
    /// Over a configured limit (pages, characters, decompressed size).
    #[error("{0}")]
    TooLarge(String),
    /// The document holds no text (a scanned PDF without a text layer, an empty page).
    #[error(
        "no text found in the document (a scanned PDF needs OCR, which the local parser does not do)"
    )]
    NoText,
}

/// Limits a parse must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most pages.
    pub max_pages: usize,
    /// Most characters of text.
    pub max_chars: usize,
}

/// Parses `bytes` of `kind` into sections.
pub fn parse(kind: DocKind, bytes: &[u8], limits: Limits) -> Result<Vec<Section>, ParseError> {
    let sections = match kind {
        DocKind::Text | DocKind::Markdown => {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| ParseError::InvalidText("the file is not valid UTF-8".into()))?;
            vec![Section {
                page: None,
                markdown: normalize(text),
            }]
        }
        DocKind::Html => vec![Section {
            page: None,
            markdown: normalize(&html_to_markdown(bytes)?),
        }],
        DocKind::Pdf => pdf(bytes, limits)?,
        DocKind::Docx => docx(bytes, limits)?,
    };
    let chars: usize = sections.iter().map(|s| s.markdown.len()).sum();
    if chars > limits.max_chars {
        return Err(ParseError::TooLarge(format!(
            "the document yields {chars} characters, above the limit of {}",
            limits.max_chars
        )));
    }
    let sections: Vec<Section> = sections
        .into_iter()
        .filter(|s| !s.markdown.trim().is_empty())
        .collect();
    if sections.is_empty() {
        return Err(ParseError::NoText);
    }
    Ok(sections)
}

/// Unix line ends, and no NUL characters (PostgreSQL text cannot hold them; some PDF text layers yield them).
fn normalize(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\0', "")
}

fn html_to_markdown(bytes: &[u8]) -> Result<String, ParseError> {
    let html = std::str::from_utf8(bytes)
        .map_err(|_| ParseError::InvalidText("the HTML is not valid UTF-8".into()))?;
    // The HTML-to-Markdown conversion recurses per element: a file of 100,000 nested <div>s overflowed the stack and
    // aborted the worker. Refuse such nesting before parsing.
    let depth = html_nesting_depth(html);
    if depth > MAX_HTML_DEPTH {
        return Err(ParseError::TooLarge(format!(
            "the HTML nests elements {depth} deep, above the limit of {MAX_HTML_DEPTH}"
        )));
    }
    let converter = htmd::HtmlToMarkdown::builder()
        .skip_tags(vec![
            "script", "style", "head", "noscript", "template", "iframe", "object", "svg",
        ])
        .build();
    converter
        .convert(html)
        .map_err(|e| ParseError::Corrupt(format!("the HTML could not be read: {e}")))
}

/// Deepest element nesting the HTML parser accepts (real pages stay far below 100).
const MAX_HTML_DEPTH: usize = 512;

/// An upper estimate of how deep elements nest: open tags minus close tags, ignoring void elements,
/// self-closing tags, comments, doctypes and the raw text of scripts and styles.
fn html_nesting_depth(html: &str) -> usize {
    const VOID: &[&str] = &[
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
        "source", "track", "wbr",
    ];
    let bytes = html.as_bytes();
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0usize);
    while let Some(off) = html[i..].find('<') {
        i += off + 1;
        let rest = &html[i..];
        if rest.starts_with("!--") {
            i += rest.find("-->").map_or(rest.len(), |e| e + 3);
            continue;
        }
        let closing = rest.starts_with('/');
        let name: String = rest
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        let end = rest.find('>').map_or(rest.len(), |e| e);
        let self_closing = end > 0 && bytes.get(i + end - 1) == Some(&b'/');
        if name.is_empty() || VOID.contains(&name.as_str()) || self_closing {
            i += end;
            continue;
        }
        if closing {
            depth = depth.saturating_sub(1);
        } else {
            depth += 1;
            max = max.max(depth);
            if name == "script" || name == "style" {
                let close = format!("</{name}");
                i += rest.to_ascii_lowercase().find(&close).unwrap_or(rest.len());
                continue;
            }
        }
        i += end;
    }
    max
}

fn pdf(bytes: &[u8], limits: Limits) -> Result<Vec<Section>, ParseError> {
    let doc = lopdf::Document::load_mem(bytes)
        .map_err(|e| ParseError::Corrupt(format!("the PDF could not be read: {e}")))?;
    let pages = doc.get_pages();
    if pages.len() > limits.max_pages {
        return Err(ParseError::TooLarge(format!(
            "the PDF has {} pages, above the limit of {}",
            pages.len(),
            limits.max_pages
        )));
    }
    let mut sections = Vec::with_capacity(pages.len());
    let mut chars = 0;
    for &number in pages.keys() {
        let text = doc.extract_text(&[number]).map_err(|e| {
            ParseError::Corrupt(format!("page {number} of the PDF could not be read: {e}"))
        })?;
        chars += text.len();
        if chars > limits.max_chars {
            return Err(ParseError::TooLarge(format!(
                "the PDF yields more than {} characters",
                limits.max_chars
            )));
        }
        sections.push(Section {
            page: Some(number),
            markdown: normalize(text.trim()),
        });
    }
    Ok(sections)
}

/// Largest `word/document.xml` read from a DOCX (a zip bomb stops here).
const MAX_DOCX_XML: u64 = 64 * 1024 * 1024;

fn docx(bytes: &[u8], limits: Limits) -> Result<Vec<Section>, ParseError> {
    use quick_xml::events::Event;

    let xml = docx_body(bytes)?;
    let mut reader = quick_xml::Reader::from_str(&xml);
    let mut doc = DocxText::new(limits);
    loop {
        let event = reader
            .read_event()
            .map_err(|e| ParseError::Corrupt(format!("the DOCX body is not valid XML: {e}")))?;
        match event {
            Event::Start(e) | Event::Empty(e) => doc.start(&e)?,
            Event::Text(t) if doc.in_text => doc.paragraph.push_str(&t),
            Event::GeneralRef(r) if doc.in_text => doc.paragraph.extend(entity(&r.into_inner())),
            Event::End(e) => doc.end(e.local_name().into_inner()),
            Event::Eof => break,
            _ => {}
        }
    }
    doc.flush();
    Ok(doc.sections)
}

/// `word/document.xml` of a DOCX, refused above [`MAX_DOCX_XML`] however it is compressed.
fn docx_body(bytes: &[u8]) -> Result<String, ParseError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| ParseError::Corrupt(format!("the DOCX is not a readable zip archive: {e}")))?;
    let entry = zip
        .by_name("word/document.xml")
        .map_err(|_| ParseError::Corrupt("the DOCX has no word/document.xml".into()))?;
    if entry.size() > MAX_DOCX_XML {
        return Err(ParseError::TooLarge(format!(
            "the DOCX body decompresses to {} bytes, above {MAX_DOCX_XML}",
            entry.size()
        )));
    }
    let mut xml = String::new();
    entry
        .take(MAX_DOCX_XML + 1)
        .read_to_string(&mut xml)
        .map_err(|e| ParseError::Corrupt(format!("the DOCX body could not be read: {e}")))?;
    if xml.len() as u64 > MAX_DOCX_XML {
        return Err(ParseError::TooLarge(
            "the DOCX body decompresses beyond the limit".into(),
        ));
    }
    Ok(xml)
}

/// The character an XML entity reference (`amp`, `#x41`, `#65`) stands for.
fn entity(name: &str) -> Option<char> {
    match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        n => n
            .strip_prefix("#x")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .or_else(|| n.strip_prefix('#').and_then(|d| d.parse().ok()))
            .and_then(char::from_u32),
    }
}

/// The Markdown of a DOCX body as its elements are read: paragraphs, headings, list items, table cells, pages.
struct DocxText {
    limits: Limits,
    sections: Vec<Section>,
    paragraph: String,
    heading: Option<usize>,
    list_item: bool,
    in_text: bool,
}

impl DocxText {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            sections: vec![Section {
                page: Some(1),
                markdown: String::new(),
            }],
            paragraph: String::new(),
            heading: None,
            list_item: false,
            in_text: false,
        }
    }

    fn start(&mut self, e: &quick_xml::events::BytesStart<'_>) -> Result<(), ParseError> {
        match e.local_name().into_inner() {
            "t" => self.in_text = true,
            "tab" => self.paragraph.push('\t'),
            "br" | "lastRenderedPageBreak" => {
                let page_break = e.local_name().into_inner() == "lastRenderedPageBreak"
                    || e.attributes().flatten().any(|a| {
                        a.key.local_name().into_inner() == "type" && a.value.as_ref() == "page"
                    });
                if page_break {
                    self.page_break()?;
                } else {
                    self.paragraph.push('\n');
                }
            }
            "pStyle" => {
                for a in e.attributes().flatten() {
                    if a.key.local_name().into_inner() == "val" {
                        let style = a.value.to_ascii_lowercase();
                        self.heading = style
                            .strip_prefix("heading")
                            .and_then(|n| n.trim().parse::<usize>().ok())
                            .map(|n| n.clamp(1, 6))
                            .or(if style == "title" { Some(1) } else { None });
                        self.list_item |= style.contains("list");
                    }
                }
            }
            "numPr" => self.list_item = true,
            _ => {}
        }
        Ok(())
    }

    fn page_break(&mut self) -> Result<(), ParseError> {
        let next = self.sections.last().and_then(|s| s.page).unwrap_or(1) + 1;
        if next as usize > self.limits.max_pages {
            return Err(ParseError::TooLarge(format!(
                "the DOCX has more than {} pages",
                self.limits.max_pages
            )));
        }
        self.flush();
        self.sections.push(Section {
            page: Some(next),
            markdown: String::new(),
        });
        Ok(())
    }

    fn end(&mut self, name: &str) {
        match name {
            "t" => self.in_text = false,
            "p" => {
                self.flush();
                self.heading = None;
                self.list_item = false;
            }
            "tc" => self.paragraph.push_str(" | "),
            _ => {}
        }
    }

    /// Ends the paragraph read so far: a heading, a list item or plain text in the current page's section.
    fn flush(&mut self) {
        let text = self.paragraph.trim();
        if !text.is_empty() {
            let out = &mut self
                .sections
                .last_mut()
                .expect("at least one section")
                .markdown;
            match self.heading {
                Some(level) => out.push_str(&format!("{} {text}\n\n", "#".repeat(level))),
                None if self.list_item => out.push_str(&format!("- {text}\n")),
                None => out.push_str(&format!("{text}\n\n")),
            }
        }
        self.paragraph.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_pages: 100,
        max_chars: 1_000_000,
    };

    #[test]
    fn kinds_are_detected_and_bad_input_is_refused_before_storage() {
        assert_eq!(DocKind::detect("a.TXT", b"hello").unwrap(), DocKind::Text);
        assert_eq!(
            DocKind::detect("notes.md", b"# hi").unwrap(),
            DocKind::Markdown
        );
        assert_eq!(
            DocKind::detect("page.htm", b"<p>x</p>").unwrap(),
            DocKind::Html
        );
        assert_eq!(
            DocKind::detect("noext", b"%PDF-1.4 ...").unwrap(),
            DocKind::Pdf
        );
        assert_eq!(DocKind::detect("empty.txt", b""), Err(ParseError::Empty));
        assert!(matches!(
            DocKind::detect("image.png", b"\x89PNG"),
            Err(ParseError::Unsupported(_))
        ));
        assert_eq!(
            DocKind::detect("README", b"plain words").unwrap(),
            DocKind::Text
        );
        assert_eq!(DocKind::detect("scan", b"%PDF-1.7").unwrap(), DocKind::Pdf);
        assert!(matches!(
            DocKind::detect("blob", b"\xff\xfe\x00"),
            Err(ParseError::Unsupported(_))
        ));
        assert!(matches!(
            DocKind::detect("bin.txt", b"ab\0cd"),
            Err(ParseError::InvalidText(_))
        ));
        assert!(matches!(
            DocKind::detect("latin1.txt", b"caf\xe9"),
            Err(ParseError::InvalidText(_))
        ));
        assert!(matches!(
            DocKind::detect("fake.pdf", b"hello"),
            Err(ParseError::Corrupt(_))
        ));
        assert!(matches!(
            DocKind::detect("fake.docx", b"hello"),
            Err(ParseError::Corrupt(_))
        ));
    }

    #[test]
    fn html_becomes_markdown_without_scripts() {
        let html = b"<html><head><title>T</title><script>alert(1)</script></head><body><h1>Tides</h1><p>The <b>moon</b> pulls.</p><style>p{}</style></body></html>";
        let sections = parse(DocKind::Html, html, LIMITS).unwrap();
        let md = &sections[0].markdown;
        assert!(md.contains("# Tides") && md.contains("**moon**"), "{md}");
        assert!(!md.contains("alert") && !md.contains("p{}"), "{md}");
    }

    #[test]
    fn deeply_nested_html_is_refused_instead_of_overflowing_the_stack() {
        // Regression: 100,000 nested <div>s (1 MB) aborted the worker with a stack overflow.
        let html = format!("{}x{}", "<div>".repeat(100_000), "</div>".repeat(100_000));
        let err = parse(DocKind::Html, html.as_bytes(), LIMITS).unwrap_err();
        assert!(
            matches!(err, ParseError::TooLarge(ref m) if m.contains("100000 deep")),
            "{err:?}"
        );
        let fine = "<html><body><div><p>a<br>b<img src=x /></p><script>if (a < b) {}</script></div></body></html>";
        assert_eq!(html_nesting_depth(fine), 4);
        assert!(parse(DocKind::Html, fine.as_bytes(), LIMITS).is_ok());
    }

    #[test]
    fn a_corrupt_pdf_is_a_clear_permanent_error() {
        let err = parse(DocKind::Pdf, b"%PDF-1.7\nthis is not a pdf body", LIMITS).unwrap_err();
        assert!(matches!(err, ParseError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn whitespace_only_documents_have_no_text() {
        assert_eq!(
            parse(DocKind::Text, b"  \n\t ", LIMITS),
            Err(ParseError::NoText)
        );
    }

    #[test]
    fn limits_are_enforced() {
        let err = parse(
            DocKind::Text,
            "x".repeat(100).as_bytes(),
            Limits {
                max_pages: 1,
                max_chars: 10,
            },
        )
        .unwrap_err();
        assert!(matches!(err, ParseError::TooLarge(_)));
    }
}
