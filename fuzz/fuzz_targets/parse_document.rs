//! Every local parser on arbitrary bytes: the first byte picks the kind (text, Markdown, HTML, PDF, DOCX). A
//! parser may refuse the input, never panic, hang or blow up memory (the limits are the production defaults).
#![no_main]

use libfuzzer_sys::fuzz_target;
use upload_pipeline::parsing::{self, DocKind, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let kind = match selector % 5 {
        0 => DocKind::Text,
        1 => DocKind::Markdown,
        2 => DocKind::Html,
        3 => DocKind::Pdf,
        _ => DocKind::Docx,
    };
    let limits = Limits {
        max_pages: 500,
        max_chars: 2_000_000,
    };
    let _ = parsing::parse(kind, bytes, limits);
});
