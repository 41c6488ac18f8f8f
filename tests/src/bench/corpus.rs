//! The synthetic corpus of the `search` scenario: tenants of very different sizes whose documents are drawn from
//! the same topics, with text for keyword search and vectors with the structure of a real embedding model's.
//!
//! Sizes: [`tenant_sizes`] runs from a few very large tenants down to many of 10 chunks. Topics: each tenant
//! writes mostly about a few home topics of its own, picked from the same 200 as everyone's, so a small tenant's
//! neighbourhood in vector space is crowded with other tenants' chunks, which is what defeats an index walked for
//! everyone and filtered per tenant afterwards.

use std::fmt::Write as _;

use rand::{Rng, rngs::SmallRng};

/// Topics (subjects) shared by every tenant.
pub const TOPICS: usize = 200;
/// Home topics per tenant: where 80 % of its documents come from (the rest from any topic).
const HOME_TOPICS: usize = 8;
/// Chunks per document (the last one of a tenant may be shorter).
pub const PER_DOC: usize = 50;
/// Words of a topic a chunk draws from: a window that slides `DRIFT` words a chunk.
const WINDOW: usize = 80;
const DRIFT: usize = 2;
const TOPIC_WORDS: usize = 600;

/// Chunk counts of `tenants` tenants adding up to `total`, largest first: from `min(300,000, 30 % of total)` down
/// to 10, the logarithm of the size falling as a power of the rank (`ln s = ln max - (ln max - ln 10) x^p` at rank
/// share x), with p found so that they add up. At 1,000,000 chunks and 1,000 tenants: one of 300,000, 14 of
/// 10,000-100,000, 91 of 1,000-10,000, 278 of 100-1,000 and 616 of 10-100.
pub fn tenant_sizes(total: usize, tenants: usize) -> Vec<usize> {
    const MIN: f64 = 10.0;
    assert!(
        tenants >= 2 && total >= tenants * 20,
        "{tenants} tenants need at least 20 chunks each on average, {total} chunks given"
    );
    let max = (total as f64 * 0.3).min(300_000.0);
    let sizes = |p: f64| -> Vec<usize> {
        (0..tenants)
            .map(|i| {
                let x = i as f64 / (tenants - 1) as f64;
                (max.ln() - (max.ln() - MIN.ln()) * x.powf(p))
                    .exp()
                    .round()
                    .max(MIN) as usize
            })
            .collect()
    };
    // The sum grows with p: near 0 it is max + 10 a tenant, at 1 (log-uniform sizes) far above any total asked.
    let (mut lo, mut hi) = (1e-6, 1.0);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if sizes(mid).iter().sum::<usize>() > total {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let mut out = sizes(lo);
    // Rounding leaves a few chunks over: one more to each of the middle tenants.
    let short = total.saturating_sub(out.iter().sum());
    for s in out.iter_mut().skip(1).take(short) {
        *s += 1;
    }
    out
}

/// Synthetic text with the shape of real documents: a document follows a topic's vocabulary and drifts through it,
/// so neighbouring chunks share more words than distant ones. Function words come from a common Zipf-weighted
/// vocabulary.
pub struct Corpus {
    topics: Vec<Vec<String>>,
    common: Vec<String>,
}

impl Corpus {
    /// A vocabulary of 2,000 function words and 600 words for each of the [`TOPICS`].
    pub fn new(rng: &mut SmallRng) -> Self {
        const SYLLABLES: &[&str] = &[
            "ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "bra", "cho", "dre", "fli",
            "gro", "hu", "jin", "kel", "mar", "nor", "pel", "qua", "ros", "sul", "tor", "ulm",
            "vex", "wen", "yar",
        ];
        let word = |rng: &mut SmallRng| {
            let n = rng.random_range(2..=4);
            (0..n)
                .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
                .collect::<String>()
        };
        let common = (0..2000).map(|_| word(rng)).collect();
        let topics = (0..TOPICS)
            .map(|_| (0..TOPIC_WORDS).map(|_| word(rng)).collect())
            .collect();
        Self { topics, common }
    }

    /// `words` words at position `at` of `topic`'s drift, `common` of them (a share) function words, appended to
    /// `out`.
    fn text_into(
        &self,
        out: &mut String,
        topic: usize,
        at: usize,
        words: usize,
        common: f64,
        rng: &mut SmallRng,
    ) {
        for i in 0..words {
            let w = if rng.random::<f64>() < common {
                // Zipf-like: index n * u^3 favours the first words.
                let u: f64 = rng.random();
                &self.common[((self.common.len() as f64) * u * u * u) as usize]
            } else {
                &self.topics[topic][(at + rng.random_range(0..WINDOW)) % TOPIC_WORDS]
            };
            if i > 0 {
                out.push(' ');
            }
            out.push_str(w);
        }
    }
}

/// Vectors with the structure of a real embedding model's: topics (centres), documents scattered around their
/// topic, passages drifting along a path within their document, and every direction's variance falling off as a
/// power law (as the principal components of real sentence embeddings do), so the data has a low intrinsic
/// dimension. A query is a fresh paraphrase of one passage: the passage's point plus new noise.
///
/// Why not the hashing embedder's own vectors: they hash words into signed buckets, which spreads every text over
/// all directions alike; nearest neighbours in such data are near-ties, and no index finds them reliably (HNSW
/// recall@10 0.47 at ef_search 40, 0.87 at 400, measured on 2026-11-24). It is for tests and offline demos.
pub struct Latent {
    topics: Vec<Vec<f32>>,
    scale: Vec<f32>,
}

/// A document: its tenant, topic, where its text starts in the topic's drift, and its place in vector space (a
/// centre and the two directions its passages drift along).
pub struct Doc {
    /// Index of its tenant.
    pub tenant: usize,
    /// Its chunks.
    pub chunks: usize,
    topic: usize,
    start: usize,
    centre: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

fn gaussian(rng: &mut SmallRng) -> f32 {
    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl Latent {
    /// [`TOPICS`] centres in `dims` dimensions.
    pub fn new(dims: usize, rng: &mut SmallRng) -> Self {
        let scale: Vec<f32> = (0..dims).map(|j| (1.0 + j as f32).powf(-0.5)).collect();
        let mut l = Self {
            topics: Vec::new(),
            scale,
        };
        l.topics = (0..TOPICS).map(|_| l.noise(rng)).collect();
        l
    }

    fn noise(&self, rng: &mut SmallRng) -> Vec<f32> {
        self.scale.iter().map(|s| s * gaussian(rng)).collect()
    }

    /// The documents of tenants of `sizes` chunks, in the order they arrive: tenants' documents interleaved at
    /// random, as uploads from many users are. Each tenant draws 80 % of its documents from home topics of its own.
    pub fn documents(&self, sizes: &[usize], rng: &mut SmallRng) -> Vec<Doc> {
        let mut docs = Vec::new();
        for (tenant, &size) in sizes.iter().enumerate() {
            let home: Vec<usize> = (0..HOME_TOPICS)
                .map(|_| rng.random_range(0..TOPICS))
                .collect();
            let mut left = size;
            while left > 0 {
                let chunks = left.min(PER_DOC);
                left -= chunks;
                let topic = if rng.random::<f64>() < 0.8 {
                    home[rng.random_range(0..HOME_TOPICS)]
                } else {
                    rng.random_range(0..TOPICS)
                };
                let n = self.noise(rng);
                docs.push(Doc {
                    tenant,
                    chunks,
                    topic,
                    start: rng.random_range(0..TOPIC_WORDS),
                    centre: self.topics[topic]
                        .iter()
                        .zip(n)
                        .map(|(t, n)| t + 0.7 * n)
                        .collect(),
                    a: self.noise(rng),
                    b: self.noise(rng),
                });
            }
        }
        // Fisher-Yates: the arrival order.
        for i in (1..docs.len()).rev() {
            docs.swap(i, rng.random_range(0..=i));
        }
        docs
    }

    /// Passage `i` of `doc`, with fresh noise, unit length.
    pub fn passage(&self, doc: &Doc, i: usize, rng: &mut SmallRng) -> Vec<f32> {
        let phase = i as f32 / 8.0;
        let mut v: Vec<f32> = self
            .noise(rng)
            .into_iter()
            .enumerate()
            .map(|(j, n)| {
                doc.centre[j] + 0.6 * (doc.a[j] * phase.cos() + doc.b[j] * phase.sin()) + 0.5 * n
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }
}

/// The text of chunk `i` of `doc` (150-250 words, 30 % function words), appended to `out`; returns its words.
pub fn chunk_text(
    corpus: &Corpus,
    doc: &Doc,
    i: usize,
    out: &mut String,
    rng: &mut SmallRng,
) -> usize {
    let words = rng.random_range(150..250);
    corpus.text_into(out, doc.topic, doc.start + i * DRIFT, words, 0.3, rng);
    words
}

/// A question about passage `i` of `doc` in words of its own (8-15, drawn afresh from the passage's vocabulary,
/// few function words).
pub fn question(corpus: &Corpus, doc: &Doc, i: usize, rng: &mut SmallRng) -> String {
    let mut out = String::new();
    let words = rng.random_range(8..16);
    corpus.text_into(&mut out, doc.topic, doc.start + i * DRIFT, words, 0.15, rng);
    out
}

/// pgvector's text form of `v`, appended to `out`.
pub fn write_vector(out: &mut String, v: &[f32]) {
    out.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if *x == 0.0 {
            out.push('0');
        } else {
            let _ = write!(out, "{x:.6}");
        }
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_sizes_add_up_and_run_from_the_largest_to_ten() {
        let sizes = tenant_sizes(1_000_000, 1000);
        assert_eq!(sizes.iter().sum::<usize>(), 1_000_000);
        assert_eq!((sizes[0], sizes[999]), (300_000, 10));
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "largest first");
        let small = tenant_sizes(100_000, 100);
        assert_eq!(small.iter().sum::<usize>(), 100_000);
        assert_eq!((small[0], small[99]), (30_000, 10));
    }
}
