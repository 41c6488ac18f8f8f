//! A deterministic lexical embedder with no model: words and word pairs (and character trigrams, for
//! inflections) hashed into a fixed number of signed buckets, then L2-normalised. Texts that share words are
//! close in cosine distance; nothing semantic beyond that. For tests, offline demos and smoke runs.

use super::{EmbedFuture, Embedder};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct HashingEmbedder {
    model: String,
    dimensions: usize,
}

const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have", "in", "is",
    "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "what", "when",
    "which", "who", "with", "how", "why", "does", "do", "did",
];

/// FNV-1a, 64-bit: stable across platforms and releases, unlike `std`'s hasher.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl HashingEmbedder {
    /// An embedder of `dimensions` buckets, recorded under `model`.
    pub fn new(model: &str, dimensions: usize) -> Self {
        Self {
            model: model.to_owned(),
            dimensions: dimensions.max(1),
        }
    }

    fn add(&self, v: &mut [f32], feature: &[u8], seed: u64, weight: f32) {
        let h = fnv1a(feature, seed);
        let idx = (h % self.dimensions as u64) as usize;
        let sign = if (h >> 63) == 0 { 1.0 } else { -1.0 };
        v[idx] += sign * weight;
    }

    /// The vector of one text.
    pub fn vector(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dimensions];
        let words: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .filter(|w| !STOPWORDS.contains(&w.as_str()))
            .collect();
        for w in &words {
            self.add(&mut v, w.as_bytes(), 1, 1.0);
            let chars: Vec<char> = format!("^{w}$").chars().collect();
            for tri in chars.windows(3) {
                self.add(&mut v, tri.iter().collect::<String>().as_bytes(), 2, 0.25);
            }
        }
        for pair in words.windows(2) {
            self.add(
                &mut v,
                format!("{} {}", pair[0], pair[1]).as_bytes(),
                3,
                0.5,
            );
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        } else {
            // A text with no words still needs a valid direction (a zero vector has no cosine distance).
            v[0] = 1.0;
        }
        v
    }
}

impl Embedder for HashingEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// A hash is cheaper to compute again than to look up.
    fn cacheable(&self) -> bool {
        false
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        Box::pin(async move { Ok(texts.iter().map(|t| self.vector(t)).collect()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_are_deterministic_normalised_and_lexically_close() {
        let e = HashingEmbedder::new("hashing-v1", 384);
        let a = e.vector("The moon pulls the oceans and makes tides.");
        assert_eq!(a, e.vector("The moon pulls the oceans and makes tides."));
        assert!((cos(&a, &a) - 1.0).abs() < 1e-5);
        let q = e.vector("what makes ocean tides");
        let other = e.vector("Sourdough bread needs a lively starter and a long proof.");
        assert!(
            cos(&q, &a) > cos(&q, &other) + 0.1,
            "{} vs {}",
            cos(&q, &a),
            cos(&q, &other)
        );
        assert_eq!(e.vector("").iter().filter(|x| **x != 0.0).count(), 1);
    }
}
