//! The in-process all-MiniLM-L6-v2 embedder (candle) against vectors computed once with the Python
//! sentence-transformers package (`tests/fixtures/minilm-reference.json`), and its semantic reach beyond shared
//! words. Needs the model folder (`make model`, which `make test` runs).

use std::path::PathBuf;

use upload_pipeline::{
    providers::{Embedder, ProviderError, local::LocalEmbedder},
    settings::EmbeddingSettings,
};

fn settings() -> EmbeddingSettings {
    let mut s = EmbeddingSettings {
        model: "all-MiniLM-L6-v2".into(),
        dimensions: 384,
        ..Default::default()
    };
    s.local.model_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2");
    s
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[tokio::test]
async fn vectors_match_sentence_transformers() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../fixtures/minilm-reference.json")).unwrap();
    let embedder =
        LocalEmbedder::load(&settings()).expect("the model loads (run `make model` to fetch it)");
    let cases = fixture["sentences"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_owned())
        .collect();
    let vectors = embedder.embed(&texts).await.unwrap();
    for (case, got) in cases.iter().zip(&vectors) {
        let want: Vec<f32> = case["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), 384);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
        let c = cosine(got, &want);
        assert!(c >= 0.999, "{:?}: cosine {c}", case["text"]);
    }
    // Batching (padding) does not change a vector.
    let alone = embedder.embed(&texts[5..6]).await.unwrap();
    assert!(cosine(&alone[0], &vectors[5]) > 0.9999);
}

#[tokio::test]
async fn it_finds_meaning_without_shared_words() {
    // Built as a worker builds it, from the whole settings.
    let mut whole = upload_pipeline::Settings {
        embedding: settings(),
        ..Default::default()
    };
    whole.embedding.embedder = upload_pipeline::settings::EmbedderKind::Local;
    let embedder = upload_pipeline::providers::embedder(&whole, None).unwrap();
    assert_eq!(
        (
            embedder.model(),
            embedder.dimensions(),
            embedder.cacheable()
        ),
        ("all-MiniLM-L6-v2", 384, true)
    );
    let passages: Vec<String> = [
        "Honeybees communicate the location of flowers with a waggle dance.",
        "Tides are caused by the gravitational pull of the moon and the sun.",
        "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.",
    ]
    .map(String::from)
    .to_vec();
    let query = vec!["How do insects tell each other where nectar is?".to_owned()];
    let p = embedder.embed(&passages).await.unwrap();
    let q = &embedder.embed(&query).await.unwrap()[0];
    let scores: Vec<f32> = p.iter().map(|v| cosine(q, v)).collect();
    assert!(
        scores[0] > scores[1] + 0.1 && scores[0] > scores[2] + 0.1,
        "{scores:?}"
    );
}

#[test]
fn a_missing_model_or_a_width_mismatch_is_a_clear_error() {
    let mut s = settings();
    s.local.model_dir = "/nonexistent/model".into();
    let err = LocalEmbedder::load(&s).unwrap_err();
    assert!(
        matches!(&err, ProviderError::Permanent { message, .. } if message.contains("make model")),
        "{err:?}"
    );
    let loaded = LocalEmbedder::load(&settings()).unwrap();
    assert_eq!(
        format!("{loaded:?}"),
        r#"LocalEmbedder { model: "all-MiniLM-L6-v2", dimensions: 384, .. }"#
    );
    let mut s = settings();
    s.dimensions = 768;
    let err = LocalEmbedder::load(&s).unwrap_err().to_string();
    assert!(err.contains("384-dimensional"), "{err}");
}
