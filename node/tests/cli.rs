//! The `fedq-node` binary: bad configuration exits non-zero with a clear message and no
//! start-up, before any data is read or any port is bound.

use std::process::Command;

fn run_node(config: &std::path::Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fedq-node"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "error")
        .output()
        .expect("fedq-node runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn missing_config_file_exits_with_status_1_and_names_the_file() {
    let (status, stderr) = run_node(std::path::Path::new("/nonexistent/node.toml"));
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with("fedq-node: cannot read /nonexistent/node.toml"),
        "{stderr}"
    );
}

#[test]
fn config_problems_are_listed_one_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        r#"
site_id = "Site A"
listen = "nowhere"
state_dir = "state"
[tls]
ca_cert = "ca.pem"
cert = "node.pem"
key = "node.key"
[policy]
accepted_coordinators = []
min_cell_count = 1
"#,
    )
    .unwrap();
    let (status, stderr) = run_node(&path);
    assert_eq!(status, 1);
    for expected in [
        "site_id 'Site A' must be lowercase",
        "listen 'nowhere' is not an address with port",
        "tls.ca_cert: file",
        "policy.min_cell_count is 1; it must be at least 3",
        "policy.accepted_coordinators is empty",
        "no [[datasets]] configured",
    ] {
        assert!(
            stderr.lines().any(|line| line.contains(expected)),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_reports_configuration_failures_and_exits_1() {
    let output = Command::new(env!("CARGO_BIN_EXE_fedq-node"))
        .args(["check", "--config", "/nonexistent/node.toml"])
        .output()
        .expect("fedq-node runs");
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("FAIL  config       cannot read /nonexistent/node.toml"),
        "{stdout}"
    );
    let json = Command::new(env!("CARGO_BIN_EXE_fedq-node"))
        .args(["check", "--json", "--config", "/nonexistent/node.toml"])
        .output()
        .expect("fedq-node runs");
    let findings: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON findings");
    assert_eq!(findings[0]["level"], "fail");
    assert_eq!(findings[0]["check"], "config");
}
