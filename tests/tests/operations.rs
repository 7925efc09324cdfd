//! Operations: `fedq-node check` on real configurations, certificates and data files — it
//! passes a good node and names each seeded misconfiguration on its own line.

use fedq_node::check::{self, Level};
use fedq_tests::TestAlliance;

fn failures(findings: &[check::Finding]) -> Vec<String> {
    findings
        .iter()
        .filter(|finding| finding.level == Level::Fail)
        .map(|finding| format!("{}: {}", finding.check, finding.detail))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_node_and_names_each_seeded_misconfiguration() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let config_path = &test.alliance.node_configs[0];
    let good = check::run(config_path);
    assert!(failures(&good).is_empty(), "{}", check::render(&good));
    for expected in ["config", "certificate", "expert keys", "data", "state dir"] {
        assert!(
            good.iter().any(|finding| finding.check == expected),
            "no {expected} finding"
        );
    }

    let config = std::fs::read_to_string(config_path)?;
    let pki = &test.alliance.pki;
    let rogue =
        fedq_coordinator::certs::create_dev_pki(&test.dir.path().join("rogue"), "rogue CA", &[])?;
    let trusted_line = config
        .lines()
        .find(|line| line.starts_with("trusted_expert_keys"))
        .unwrap()
        .to_string();
    let cases: [(String, &str, &str); 4] = [
        (
            config.replace(
                &pki.identities[1].key.display().to_string(),
                &pki.identities[2].key.display().to_string(),
            ),
            "certificate",
            "do not form a usable pair",
        ),
        (
            config.replace(
                &pki.ca_cert.display().to_string(),
                &rogue.ca_cert.display().to_string(),
            ),
            "certificate",
            "does not verify against CA",
        ),
        (
            config.replace("source = \"iss\"", "source = \"ISS_SCORE\""),
            "data",
            "column 'iss' (local 'ISS_SCORE'): not in the file",
        ),
        (
            config.replace(&trusted_line, "trusted_expert_keys = []"),
            "expert keys",
            "no trusted expert keys",
        ),
    ];
    for (index, (text, check_name, words)) in cases.iter().enumerate() {
        assert_ne!(text, &config, "case {index} must change the configuration");
        let path = test
            .alliance
            .root
            .join("config")
            .join(format!("check-{index}.toml"));
        std::fs::write(&path, text)?;
        let findings = check::run(&path);
        let failed = failures(&findings);
        assert!(
            failed
                .iter()
                .any(|line| line.starts_with(check_name) && line.contains(words)),
            "case {index}: expected a {check_name} failure with {words:?}, got {failed:?}"
        );
    }
    test.alliance.stop().await
}
