//! Scale-out benchmark (`make bench-scale`, and the `scale` scenario of `make bench`; ignored by `make test`,
//! whose timing on a busy machine proves nothing). The runs live in `tests::bench::scale`; these check their
//! targets: 1.8x the one-process embed throughput at 2 processes and 3.2x at 4, and under the quota the steady
//! request rate at the quota (95 % or more, never above).

use tests::bench::scale;

/// Writes the figures where `make bench-scale` asked for them (`var` names the file).
fn report(label: &str, var: &str, figures: &serde_json::Value) {
    println!("{label}: {figures}");
    if let Ok(path) = std::env::var(var) {
        std::fs::write(&path, serde_json::to_string_pretty(figures).unwrap()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: make bench-scale"]
async fn embed_throughput_scales_with_processes_and_stays_at_the_quota() {
    let _turn = super::alone().await;
    let figures = scale::scale_out(scale::DOCS, scale::REPEATS).await;
    report("scale", "SCALE_BENCH_OUT", &figures);
    let speedup = |i: usize| figures["unlimited"][i]["speedup"].as_f64().unwrap();
    assert!(speedup(1) >= 1.8, "2 processes: {:.2}x", speedup(1));
    assert!(speedup(2) >= 3.2, "4 processes: {:.2}x", speedup(2));
    let used = figures["quota"]["utilisation"].as_f64().unwrap();
    assert!(used >= 0.95, "used {:.1} % of the quota", used * 100.0);
    assert!(
        used <= 1.02,
        "went {:.1} % over the quota",
        (used - 1.0) * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: make bench-scale"]
async fn one_replica_per_stage_throughput_and_the_cost_of_a_document() {
    let _turn = super::alone().await;
    let figures = scale::capacity().await;
    report("capacity", "CAPACITY_BENCH_OUT", &figures);
    for stage in ["parse", "chunk", "embed"] {
        assert!(figures[stage]["documents_per_second"].as_f64().unwrap() > 0.0);
    }
}
