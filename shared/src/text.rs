//! Text normalisation: the one form parsed text is chunked in and search queries are matched in, so that a word
//! matches however the document's producer encoded it (ligatures, full-width forms, invisible characters, words
//! hyphenated across lines). Pure.

use unicode_normalization::UnicodeNormalization;

/// Invisible characters that only steer line breaking: zero-width space, word joiner and the byte-order mark (a
/// zero-width no-break space inside text). The zero-width non-joiner and joiner stay: they are spelling in Persian
/// and Indic scripts and hold emoji sequences together, so removing them would change the text a citation quotes.
const ZERO_WIDTH: [char; 3] = ['\u{200B}', '\u{2060}', '\u{FEFF}'];
/// A hyphen shown only where a word breaks at a line end.
const SOFT_HYPHEN: char = '\u{00AD}';
/// The hyphens that may end a line in the middle of a word: hyphen-minus, the Unicode hyphen (NFKC's form of the
/// non-breaking hyphen as well) and the soft hyphen.
const LINE_END_HYPHENS: [char; 3] = ['-', '\u{2010}', SOFT_HYPHEN];

/// `text` in the form chunks are stored and queries are searched in. Idempotent, and ASCII text without a hyphen at
/// a line end comes back as it is.
///
/// - Unicode compatibility composition (NFKC): typographic ligatures (`ﬁ` → `fi`), full-width forms (`Ｅ０５０２` →
///   `E0502`), non-breaking and other compatibility spaces to a plain space. Superscripts, subscripts and vulgar
///   fractions keep their form: NFKC would make plain digits of them that run into their neighbours (`10³` would
///   read `103`, `1½` `11⁄2`, a footnote mark `results²` `results2`).
/// - Zero-width spaces, word joiners, byte-order marks and soft hyphens removed (zero-width joiners and
///   non-joiners kept).
/// - A word hyphenated across a line break joined (`speci-\nfication` → `specification`): when a hyphen (`-`,
///   U+2010 or a soft hyphen) ends a line right after a letter and the next line, after its indentation, starts
///   with a lowercase letter. Inside fenced code, on headings, fence lines and table rows (lines with a `|`) nothing
///   is joined.
///
/// Line breaks and Markdown syntax (all ASCII, which NFKC leaves alone) stay as they are.
pub fn normalize(text: &str) -> String {
    if text.is_ascii() {
        return if text.contains("-\n") {
            join_hyphenated(text)
        } else {
            text.to_owned()
        };
    }
    let composed = compatibility_form(&without_invisibles(text));
    if ["-\n", "\u{2010}\n", "\u{00AD}\n"]
        .iter()
        .any(|end| composed.contains(end))
    {
        join_hyphenated(&composed)
    } else {
        composed
    }
}

/// `text` without zero-width characters and soft hyphens, except a soft hyphen between a letter and a line break,
/// which marks a word broken across lines for [`join_hyphenated`]. They go before NFKC: one left between a letter
/// and its combining accent keeps the two apart, and they would only compose on a second pass.
fn without_invisibles(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let dropped = ZERO_WIDTH.contains(&c)
            || (c == SOFT_HYPHEN
                && !(out.chars().next_back().is_some_and(char::is_alphabetic)
                    && chars.peek() == Some(&'\n')));
        if !dropped {
            out.push(c);
        }
    }
    out
}

/// `text` in NFKC, except for the characters that [`keeps_its_form`]. They compose with nothing on either side, so
/// normalising the runs between them one by one stays idempotent.
fn compatibility_form(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((at, kept)) = rest.char_indices().find(|&(_, c)| keeps_its_form(c)) {
        out.extend(rest[..at].nfkc());
        out.push(kept);
        rest = &rest[at + kept.len_utf8()..];
    }
    out.extend(rest.nfkc());
    out
}

/// Superscripts, subscripts and vulgar fractions: NFKC turns them into digits and letters that read as part of the
/// number or word next to them.
fn keeps_its_form(c: char) -> bool {
    matches!(c,
        '\u{00B2}' | '\u{00B3}' | '\u{00B9}' // ² ³ ¹
        | '\u{00BC}'..='\u{00BE}' // ¼ ½ ¾
        | '\u{2070}'..='\u{209F}' // superscripts and subscripts
        | '\u{2150}'..='\u{215F}' | '\u{2189}' // number forms: fractions
    )
}

/// `text` with the words hyphenated across a line break joined (see [`normalize`]), and the soft hyphens left at
/// line ends removed.
fn join_hyphenated(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_fence = false;
    // What is known of the line being written to `out` (joined lines continue it): whether its first line opens a
    // block that must not grow (a heading or a fence) and whether any of its lines is a table row.
    let mut line_start = 0;
    let mut line_is_block = false;
    let mut line_has_pipe = false;
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            if !in_fence
                && !line_is_block
                && !line_has_pipe
                && breaks_word(&out[line_start..], line)
            {
                out.pop();
                out.push_str(line.trim_start_matches([' ', '\t']));
                continue;
            }
            if out.ends_with(SOFT_HYPHEN) {
                out.pop();
            }
            out.push('\n');
            line_start = out.len();
        }
        let opening = line.trim_start();
        let fence = opening.starts_with("```") || opening.starts_with("~~~");
        in_fence ^= fence;
        line_is_block = fence || opening.starts_with('#');
        line_has_pipe = line.contains('|');
        out.push_str(line);
    }
    out
}

/// Whether `line` ends with a word broken by a hyphen that `next` continues: a hyphen right after a letter, and
/// `next` (after its indentation) opening with a lowercase letter, which no list marker, heading, number or
/// capitalised word does. A table row on either side is left alone.
fn breaks_word(line: &str, next: &str) -> bool {
    let mut tail = line.chars().rev();
    let (Some(hyphen), Some(before)) = (tail.next(), tail.next()) else {
        return false;
    };
    LINE_END_HYPHENS.contains(&hyphen)
        && before.is_alphabetic()
        && next
            .trim_start_matches([' ', '\t'])
            .chars()
            .next()
            .is_some_and(char::is_lowercase)
        && !next.contains('|')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ligatures_become_their_letters() {
        assert_eq!(normalize("speci\u{FB01}cation"), "specification");
        assert_eq!(normalize("\u{FB01}le"), "file");
        assert_eq!(
            normalize("\u{FB02}ow \u{FB00} o\u{FB03}ce ba\u{FB04} \u{FB05} \u{FB06}"),
            "flow ff office baffl st st"
        );
    }

    #[test]
    fn full_width_forms_become_ascii() {
        assert_eq!(normalize("Ｅ０５０２"), "E0502");
        assert_eq!(normalize("ＡＢＣ１２３"), "ABC123");
    }

    #[test]
    fn compatibility_spaces_become_plain_spaces() {
        assert_eq!(
            normalize("a\u{00A0}b\u{2002}c\u{2009}d\u{202F}e\u{3000}f"),
            "a b c d e f"
        );
    }

    #[test]
    fn invisible_characters_are_removed() {
        assert_eq!(normalize("hyphen\u{00AD}ation"), "hyphenation");
        assert_eq!(
            normalize("\u{FEFF}zero\u{200B}width\u{2060}s"),
            "zerowidths"
        );
        // Joiners are spelling (Persian, Indic scripts) and emoji glue: kept.
        for kept in [
            "\u{0645}\u{06CC}\u{200C}\u{062E}\u{0648}\u{0627}\u{0647}\u{0645}",
            "\u{1F468}\u{200D}\u{1F469}",
        ] {
            assert_eq!(normalize(kept), kept);
        }
        // Removed before composition: the accent still composes with its letter.
        assert_eq!(normalize("e\u{200B}\u{0301}"), "\u{00E9}");
    }

    #[test]
    fn superscripts_subscripts_and_fractions_keep_their_form() {
        for kept in ["10³ m²", "H₂O", "results¹ show", "1½ cups", "x⁻¹"] {
            assert_eq!(normalize(kept), kept);
        }
        // Around them the rest is still normalised.
        assert_eq!(normalize("ﬁ²ﬁ"), "fi²fi");
    }

    #[test]
    fn words_hyphenated_across_lines_are_joined() {
        assert_eq!(normalize("data-\nbase"), "database");
        assert_eq!(
            normalize("the speci-\n  fication says"),
            "the specification says"
        );
        assert_eq!(normalize("speci\u{2010}\nfication"), "specification");
        assert_eq!(normalize("speci\u{2011}\nfication"), "specification");
        assert_eq!(normalize("speci\u{00AD}\nfication"), "specification");
        assert_eq!(normalize("speci\u{FB01}-\ncation"), "specification");
        // A word broken twice is joined twice.
        assert_eq!(normalize("a-\nb-\nc"), "abc");
    }

    #[test]
    fn hyphens_that_do_not_break_a_word_stay() {
        for kept in [
            "well-\nKnown",
            "2020-\n2021",
            "word-\n- a list item",
            "word-\n* a list item",
            "word-\n1. a list item",
            "word-\n# A heading",
            "word-\n\nnext paragraph",
            "a rule\n---\nbelow",
            "text-\n---\nbelow",
            "trailing-",
            "x -\ny",
        ] {
            assert_eq!(normalize(kept), kept, "{kept:?}");
        }
        // A soft hyphen left at a line end is still removed.
        assert_eq!(normalize("speci\u{00AD}\nFication"), "speci\nFication");
    }

    #[test]
    fn markdown_tables_code_and_headings_are_left_alone() {
        let table = "| name | kind-\n|------|-----|\n| data-\nbase | x |\n";
        assert_eq!(normalize(table), table);
        let fenced = "```sh\nls --color=auto -\nl /tmp\necho ok-\ndone\n```\nprose\n";
        assert_eq!(normalize(fenced), fenced);
        let heading = "# Speci-\nfication\n";
        assert_eq!(normalize(heading), heading);
        // Non-ASCII text takes the slow path; the structure still survives it.
        let markdown = "# Titre\n\n* **gras** et `code`\n\n| a | b |\n|---|---|\n| ﬁ | é |\n\n```\nx = 1\n```\n";
        assert_eq!(
            normalize(markdown),
            markdown.replace('\u{FB01}', "fi"),
            "line breaks and Markdown syntax are untouched"
        );
    }

    #[test]
    fn ascii_without_line_end_hyphens_comes_back_as_it_is() {
        let text = "# Title\n\nPlain text - with a dash, and a rule:\n\n---\n";
        assert_eq!(normalize(text), text);
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        let tricky = [
            "speci\u{FB01}cation",
            "a-\nb-\nc",
            "a-\nb-\nC",
            "speci-\u{00AD}\nfication",
            "speci\u{00AD}\u{00AD}\nfication",
            "e\u{200D}\u{0301}",
            "e\u{00AD}\u{0301}",
            "ﬁ-\nle",
            "x²-\nfoo",
            "10³\u{0301}",
            "Ⅻ-\nthing",
            "ＡＢＣ-\nｄｅｆ",
            "speci\u{2011}\nfication",
            "word\u{FF0D}\nnext",
            "| a-\nb |\nc-\nd",
            "```\nx-\ny\n```\nz-\nw",
            "```c-\nnot joined\n```",
            "# H-\neading\nbody-\ntext",
            "\u{00A0}\u{00A0}-\n\u{3000}x",
            "\u{1100}\u{1161}-\n\u{11A8}",
            "\u{0B47}-\n\u{0B3E}",
            "",
            "-\n",
            "\u{00AD}\n",
        ];
        for text in tricky {
            let once = normalize(text);
            assert_eq!(normalize(&once), once, "{text:?}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing_on_random_mixes_of_the_tricky_characters() {
        let alphabet = [
            'a', 'e', 'B', '1', '-', '\n', ' ', '\t', '|', '#', '`', '>', '\u{00AD}', '\u{2010}',
            '\u{2011}', '\u{FF0D}', '\u{200B}', '\u{200D}', '\u{FEFF}', '\u{0301}', '\u{0323}',
            '\u{FB01}', '²', '½', 'Ｅ', 'ｄ', '\u{00A0}', '\u{3000}', '\u{1100}', '\u{1161}',
            '\u{11A8}', 'Ⅻ', 'é',
        ];
        // A fixed linear congruential sequence: the same strings on every run.
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % n
        };
        for _ in 0..20_000 {
            let len = next(14);
            let text: String = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
            let once = normalize(&text);
            assert_eq!(normalize(&once), once, "{text:?}");
        }
    }
}
