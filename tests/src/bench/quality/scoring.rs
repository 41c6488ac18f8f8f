//! How the answers are judged: a hit is relevant when it comes from the question's page (and, stricter, when its
//! text also holds the evidence phrase); hit@5 and MRR@10 per kind of question.

use serde::Serialize;

/// A question is a hit@5 when a relevant hit ranks 5th or better.
pub const HIT_AT: u32 = 5;
/// The kinds of question, in the order they are reported; `all` follows them.
pub const KINDS: [&str; 3] = ["keyword", "paraphrase", "mixed"];

/// One question asked in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Ranked {
    /// The question's id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Rank, from 1, of the first hit from the answer's page among the first [`super::K`] (`None`: none of them).
    pub page_rank: Option<u32>,
    /// Rank of the first hit from that page whose text holds the evidence (the stricter, chunk-level relevance).
    pub chunk_rank: Option<u32>,
    /// Hits returned (keyword search returns none when not every word of a sentence is in one chunk; an
    /// identifier-like query's also lists chunks holding some of its words).
    pub hits: usize,
    /// The file of the first hit.
    pub first: Option<String>,
    /// The first relevant hit's place in the vector list (hybrid and vector modes).
    pub vector_rank: Option<u32>,
    /// The first relevant hit's place in the keyword list (hybrid and keyword modes).
    pub keyword_rank: Option<u32>,
}

/// The figures of one mode over one kind of question (or `all`).
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    /// The kind, or `all`.
    pub kind: String,
    /// Questions of that kind.
    pub questions: usize,
    /// Share of questions with a hit from the answer's page among the first 5.
    pub hit_at_5: f64,
    /// Mean over questions of 1 / rank of the first hit from the answer's page among the first 10 (0: none).
    pub mrr_at_10: f64,
    /// `hit_at_5` with a relevant hit's text also holding the evidence.
    pub chunk_hit_at_5: f64,
    /// `mrr_at_10` with a relevant hit's text also holding the evidence.
    pub chunk_mrr_at_10: f64,
}

/// What the evaluation set's `check.py` calls `relevance_normalize`, for a hit's text and the evidence alike: the
/// pipeline's normal form (NFKC), Markdown links and images reduced to their text, backslash escapes removed, the
/// marks `` ` ``, `*` and `|` deleted, whitespace collapsed to one space, lower case. A chunk is Markdown, where
/// `--source-server=connstr` reads `` `--source-server=`*`connstr`* `` and a table row `` | `40P01` | ``.
pub fn relevance_normalize(text: &str) -> String {
    let text = strip_links(&upload_pipeline::text::normalize(text));
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    let mut space = false;
    while let Some(c) = chars.next() {
        let c = match c {
            '\\' => match chars.clone().next() {
                Some(n) if n.is_ascii_punctuation() => {
                    chars.next();
                    n
                }
                _ => c,
            },
            _ => c,
        };
        if matches!(c, '`' | '*' | '|') {
            continue;
        }
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// `text` with every Markdown link `[text](href)` and image `![text](href "title")` replaced by its text.
fn strip_links(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let (before, from) = rest.split_at(open);
        match link_at(from) {
            Some((label, len)) => {
                out.push_str(before.strip_suffix('!').unwrap_or(before));
                out.push_str(label);
                rest = &from[len..];
            }
            None => {
                out.push_str(before);
                out.push('[');
                rest = &from[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The link that `s` starts with (`[text](target)`, the target without spaces but for a quoted title): its text
/// and its length in bytes.
fn link_at(s: &str) -> Option<(&str, usize)> {
    let close = s.find(']')?;
    let tail = s[close + 1..].strip_prefix('(')?;
    let end = tail.find(')')?;
    let target = &tail[..end];
    let plain = match target.find(char::is_whitespace) {
        None => true,
        Some(at) => {
            let title = target[at..].trim_start();
            title.len() >= 2
                && title.starts_with('"')
                && title.ends_with('"')
                && !title[1..title.len() - 1].contains('"')
        }
    };
    plain.then_some((&s[1..close], close + 2 + end + 1))
}

/// hit@5 and MRR@10 per kind, then over all questions.
pub fn scores(ranked: &[Ranked]) -> Vec<Scores> {
    let of = |kind: &str, items: Vec<&Ranked>| {
        let n = items.len().max(1) as f64;
        let hit = |rank: fn(&Ranked) -> Option<u32>| {
            items
                .iter()
                .filter(|r| rank(r).is_some_and(|x| x <= HIT_AT))
                .count() as f64
                / n
        };
        let mrr = |rank: fn(&Ranked) -> Option<u32>| {
            items
                .iter()
                .filter_map(|r| rank(r))
                // A fold from +0.0: an empty sum of floats is -0.0, which would print as such.
                .fold(0.0, |sum, x| sum + 1.0 / f64::from(x))
                / n
        };
        Scores {
            kind: kind.to_owned(),
            questions: items.len(),
            hit_at_5: hit(|r| r.page_rank),
            mrr_at_10: mrr(|r| r.page_rank),
            chunk_hit_at_5: hit(|r| r.chunk_rank),
            chunk_mrr_at_10: mrr(|r| r.chunk_rank),
        }
    };
    let mut out: Vec<Scores> = KINDS
        .iter()
        .map(|k| of(k, ranked.iter().filter(|r| r.kind == *k).collect()))
        .collect();
    out.push(of("all", ranked.iter().collect()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_is_found_through_the_markdown_of_a_chunk() {
        let chunk = "Use `--source-server=`*`connstr`* and see [the **docs**](app-pgrewind.html \"pg_rewind\").\n\
                     | `40P01` | `deadlock\\_detected` |\n![a  figure](fig.png)";
        let text = relevance_normalize(chunk);
        assert_eq!(
            text,
            "use --source-server=connstr and see the docs. 40p01 deadlock_detected a figure"
        );
        assert!(text.contains(&relevance_normalize("--source-server=connstr")));
        assert!(text.contains(&relevance_normalize("40P01 deadlock_detected")));
        assert_eq!(
            relevance_normalize("[not a link] (x) [a](b c)"),
            "[not a link] (x) [a](b c)"
        );
        assert_eq!(relevance_normalize("\u{FB01}le \\\\ x"), "file \\ x");
    }

    #[test]
    fn hit_at_5_and_mrr_at_10_count_the_first_relevant_rank() {
        let ranked = |kind: &str, rank: Option<u32>| Ranked {
            id: String::new(),
            kind: kind.into(),
            page_rank: rank,
            chunk_rank: rank.map(|r| r + 5),
            hits: 10,
            first: None,
            vector_rank: None,
            keyword_rank: None,
        };
        let all = scores(&[
            ranked("keyword", Some(1)),
            ranked("keyword", Some(4)),
            ranked("paraphrase", None),
            ranked("mixed", Some(6)),
        ]);
        let kinds: Vec<&str> = all.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["keyword", "paraphrase", "mixed", "all"]);
        assert_eq!(
            (all[0].questions, all[0].hit_at_5, all[0].mrr_at_10),
            (2, 1.0, 0.625)
        );
        assert_eq!((all[1].hit_at_5, all[1].mrr_at_10), (0.0, 0.0));
        assert_eq!(all[3].hit_at_5, 0.5);
        assert!((all[3].mrr_at_10 - (1.0 + 0.25 + 1.0 / 6.0) / 4.0).abs() < 1e-12);
        assert_eq!(all[0].chunk_hit_at_5, 0.0);
    }
}
