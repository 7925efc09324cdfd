//! The benchmark still runs end to end (a smoke run on a small dataset; its figures are
//! printed by `cargo run --release -- bench`, never asserted).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchmark_runs_end_to_end_and_prints_both_timings() -> anyhow::Result<()> {
    fedq_proto::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let mut output = Vec::new();
    fedq_deploy::bench::run(&dir.path().join("bench"), 2_000, 2, &mut output).await?;
    let text = String::from_utf8(output)?;
    for expected in [
        "polars plan, direct",
        "node end to end (gRPC + mTLS)",
        "ratio",
        "same, with overlap control",
        "audited throughput",
        "threshold + complementary",
        "record sets per cell",
        "overlap + chain check, 10,000 sets",
        "same, cells nested in an answer",
        "overlap control in all",
        "rounding",
        "differential-privacy noise",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    Ok(())
}
