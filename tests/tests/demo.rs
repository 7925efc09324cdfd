//! The main job, scaled down: the demo starts a local alliance, prints pooled tables with
//! per-site columns and suppression marks, shows a refusal, the contribution ledger and each
//! node's audit log verified against the heads the coordinator kept, and stops cleanly.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_pooled_tables_suppression_marks_refusals_ledger_and_verified_audit_logs()
-> anyhow::Result<()> {
    fedq_proto::tls::install_crypto_provider();
    // A relative output folder, as `--out demo-output` gives: configuration files must still
    // find their certificates and data.
    let dir = tempfile::tempdir_in(".")?;
    let relative = dir.path().strip_prefix(std::env::current_dir()?)?;
    assert!(relative.is_relative());
    let mut output = Vec::new();
    fedq_deploy::demo::run(&relative.join("demo"), 0.02, &mut output).await?;
    let text = String::from_utf8(output)?;
    for expected in [
        "Trauma admissions by age band and sex",
        "In-hospital deaths among severely injured patients, by injury mechanism",
        "site-a  site-b  site-c  pooled",
        "site-c     ok",
        "* withheld by the site",
        "parameter 'min_age': 30 is outside its limits 50 to 100",
        "only its study lead (Dr. Lea Study) may",
        "Mean length of hospital stay by injury severity",
        "Distribution of systolic blood pressure at admission",
        "In-hospital death with and without ICU admission (2x2, odds ratios)",
        "Mantel-Haenszel",
        "In-hospital survival after admission, with and without ICU admission",
        "Greenwood's 95% pointwise band",
        "Risk of in-hospital death adjusted for age, severity and ICU admission",
        "odds ratio (95% CI)",
        "Data-quality report: template data-quality v1",
        "site-b: systolic_bp:",
        "its node dials the coordinator",
        "Contribution ledger",
        "trauma-outcomes          site-a",
        "site-a: ",
        "chain intact, agrees with",
        "the alliance has stopped",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // site-c (40 admissions at this scale) must have withheld something.
    assert!(
        text.lines()
            .any(|line| line.starts_with("  site-c") && line.contains("small_cell_suppression")),
        "{text}"
    );
    Ok(())
}
