//! Start-up validation of the settings against the OpenAI token budget.

use std::time::Duration;

use super::{Limit, openai_limits};
use crate::settings::{EmbedderKind, Settings};

/// Checks that the smallest embeddings request the settings can make, one chunk, fits the OpenAI token budget:
/// first in line, it must be granted within `quota.max_wait`, or its document would be deferred for ever. `None`
/// when it fits; else the field to name and a reason that says what to change (start-up validation refuses the
/// settings with it).
pub(crate) fn oversized_request(settings: &Settings) -> Option<(&'static str, String)> {
    if settings.embedding.embedder != EmbedderKind::Openai {
        return None;
    }
    let tokens = openai_limits(&settings.quota.openai)
        .into_iter()
        .find(|l| l.name == "tokens")?;
    let max_wait = settings.quota.max_wait;
    // Longer chunks are cut to the model's input limit before they are sent.
    let (chunk, per_input) = (
        settings.chunking.max_tokens,
        settings.embedding.openai.max_input_tokens,
    );
    let (field, cost) = if chunk <= per_input {
        ("chunking.max_tokens", chunk as f64)
    } else {
        ("embedding.openai.max_input_tokens", per_input as f64)
    };
    let largest = tokens.largest_request(max_wait);
    if cost <= largest {
        return None;
    }
    let fits_with =
        |limit: f64, wait: Duration| Limit { limit, ..tokens }.largest_request(wait) >= cost;
    let fitting = largest.floor();
    let mut changes = vec![format!("lower {field} to {fitting} or less")];
    if let Some(w) = (1..=600u64)
        .map(Duration::from_secs)
        .find(|w| fits_with(tokens.limit, *w))
    {
        changes.push(format!("raise quota.max_wait to {w:?}"));
    }
    // The smallest whole limit that fits: double until it does, then halve the gap.
    let (mut low, mut high) = (tokens.limit, tokens.limit.max(1.0) * 2.0);
    while !fits_with(high, max_wait) {
        low = high;
        high *= 2.0;
    }
    while high - low > 1.0 {
        let mid = ((low + high) / 2.0).floor();
        if fits_with(mid, max_wait) {
            high = mid;
        } else {
            low = mid;
        }
    }
    changes.push(format!(
        "raise quota.openai.tokens_per_minute to {high} if the key's limit is that high"
    ));
    Some((
        field,
        format!(
            "one chunk of {cost} tokens is one embeddings request, and at quota.openai.tokens_per_minute = {} a \
             request granted within quota.max_wait ({max_wait:?}) may cost at most {fitting} tokens: its documents \
             would be deferred for ever. Change one: {}",
            tokens.limit,
            changes.join("; or "),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_whose_single_chunk_never_fits_the_token_budget_name_the_fields_to_change() {
        let mut s = Settings::default();
        s.embedding.embedder = EmbedderKind::Openai;
        s.quota.openai.tokens_per_minute = 40_000;
        s.chunking.max_tokens = 512;
        assert_eq!(oversized_request(&s), None);
        // A 5 s wait at 40,000 a minute grants 800 + 975 tokens at most.
        s.quota.max_wait = Duration::from_secs(5);
        s.chunking.max_tokens = 4_096;
        let (field, reason) = oversized_request(&s).expect("refused");
        assert_eq!(field, "chunking.max_tokens");
        for named in ["quota.max_wait", "quota.openai.tokens_per_minute", "1775"] {
            assert!(reason.contains(named), "{named}: {reason}");
        }
        // The advice holds: each change alone makes it fit.
        let mut fixed = s.clone();
        fixed.chunking.max_tokens = 1_775;
        assert_eq!(oversized_request(&fixed), None);
        let mut fixed = s.clone();
        fixed.quota.max_wait = Duration::from_secs(13);
        assert_eq!(oversized_request(&fixed), None, "{reason}");
        assert!(reason.contains("raise quota.max_wait to 13s"), "{reason}");
        let mut fixed = s.clone();
        fixed.quota.openai.tokens_per_minute = 92_305;
        assert_eq!(oversized_request(&fixed), None, "{reason}");
        assert!(reason.contains("tokens_per_minute to 92305 "), "{reason}");
        // Inputs are cut to the model's limit first: then that limit is the one to lower.
        s.embedding.openai.max_input_tokens = 2_048;
        assert_eq!(
            oversized_request(&s).map(|(f, _)| f),
            Some("embedding.openai.max_input_tokens")
        );
        // Another embedder, or no token limit: nothing to check.
        s.quota.openai.tokens_per_minute = 0;
        assert_eq!(oversized_request(&s), None);
        s.quota.openai.tokens_per_minute = 40_000;
        s.embedding.embedder = EmbedderKind::Hashing;
        assert_eq!(oversized_request(&s), None);
    }
}
