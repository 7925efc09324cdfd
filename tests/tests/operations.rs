//! Operations: `fedq-node check` on real configurations, certificates and data files (a good
//! node passes; each seeded misconfiguration, an expired certificate, a certificate an
//! outbound node cannot present as a client, values outside the domain and an unwritable state
//! directory included, is named on its own line); a flooded node refusing as busy; a query whose
//! deadline passed; health, reflection and metrics on node and coordinator; a node process
//! killed mid-query, marked promptly while the other sites answer; the container alliance's
//! prepared files.

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
    // site-a's node is running on this state directory; one no node uses passes plainly.
    let state_dir = |findings: &[check::Finding]| {
        let finding = findings
            .iter()
            .find(|finding| finding.check == "state dir")
            .expect("a state dir finding");
        (finding.level, finding.detail.clone())
    };
    let (level, detail) = state_dir(&good);
    assert_eq!(level, Level::Warn, "{detail}");
    assert!(detail.contains("in use by a running fedq-node"), "{detail}");
    let (unused, _) = fedq_tests::node_config_with_own_state(&test)?;
    let (level, detail) = state_dir(&check::run(&unused));
    assert_eq!(level, Level::Pass, "{detail}");
    assert!(detail.ends_with("is writable"), "{detail}");

    let config = std::fs::read_to_string(config_path)?;
    let pki = &test.alliance.pki;
    let rogue =
        fedq_coordinator::certs::create_dev_pki(&test.dir.path().join("rogue"), "rogue CA", &[])?;
    let trusted_line = config
        .lines()
        .find(|line| line.starts_with("trusted_expert_keys"))
        .unwrap()
        .to_string();
    // site-a's configuration with certificates from another CA, issued as `issue` says.
    let reissued = |name: &str, issue: fedq_coordinator::certs::Issue| -> anyhow::Result<String> {
        let other = fedq_coordinator::certs::create_dev_pki_with(
            &test.dir.path().join(name),
            name,
            &[fedq_deploy::alliance::site_identity("site-a")],
            &issue,
        )?;
        Ok(config
            .replace(
                &pki.ca_cert.display().to_string(),
                &other.ca_cert.display().to_string(),
            )
            .replace(
                &pki.identities[1].cert.display().to_string(),
                &other.identities[0].cert.display().to_string(),
            )
            .replace(
                &pki.identities[1].key.display().to_string(),
                &other.identities[0].key.display().to_string(),
            ))
    };
    let with_expired = reissued(
        "expired",
        fedq_coordinator::certs::Issue {
            validity: Some(((2020, 1, 1), (2021, 1, 1))),
            client_auth: true,
        },
    )?;
    // Outbound mode presents the node's certificate as a client certificate.
    let server_only = reissued(
        "server-only",
        fedq_coordinator::certs::Issue {
            validity: None,
            client_auth: false,
        },
    )?
    .replace("listen = \"127.0.0.1:0\"\n", "")
    .replace(
        "\n[tls]",
        "\n[outbound]\ncoordinator = \"localhost:7701\"\ncoordinator_identity = \"coordinator.fedq.local\"\n\n[tls]",
    );
    // Tests run as root, so permission bits cannot make the state directory unwritable: put
    // it under a regular file instead.
    let blocker = test.dir.path().join("not-a-folder");
    std::fs::write(&blocker, "a file")?;
    let state_line = config
        .lines()
        .find(|line| line.starts_with("state_dir"))
        .unwrap()
        .to_string();
    let unwritable = config.replace(
        &state_line,
        &format!("state_dir = \"{}\"", blocker.join("state").display()),
    );
    let cases: [(String, &str, &str); 7] = [
        (with_expired, "certificate", "expired"),
        (
            server_only,
            "outbound",
            "needs extended key usage clientAuth",
        ),
        (unwritable, "state dir", "cannot write"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_node_answers_or_refuses_each_query_as_busy_and_stays_up() -> anyhow::Result<()> {
    use fedq_proto::wire::RefusalCode;
    let test = TestAlliance::start().await?;
    let node = fedq_tests::node_variant(&test, |config| {
        config.replacen("listen = ", "max_concurrent_queries = 1\nlisten = ", 1)
    })
    .await?;
    let client = fedq_tests::client_for(&test, &node).await?;
    let calls = (0..200).map(|index| {
        let mut client = client.clone();
        let request = fedq_tests::cohort_request(&test.alliance, &format!("flood-{index}"), 0);
        async move {
            let mut request = tonic::Request::new(request?);
            request.set_timeout(std::time::Duration::from_secs(20));
            Ok::<_, anyhow::Error>(client.run_query(request).await)
        }
    });
    let outcomes = futures::future::join_all(calls).await;
    let (mut answered, mut busy) = (0, 0);
    for outcome in outcomes {
        match outcome? {
            Ok(_) => answered += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert_eq!(fedq_tests::refusal_of(&status), RefusalCode::SiteBusy);
                busy += 1;
            }
        }
    }
    assert!(answered > 0 && busy > 0, "answered {answered}, busy {busy}");
    // Still up.
    let mut client = client.clone();
    client
        .run_query(fedq_tests::cohort_request(
            &test.alliance,
            "after-flood",
            0,
        )?)
        .await?;
    node.stop().await?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_the_coordinator_answer_health_checks_and_reflection() -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let test = TestAlliance::start().await?;
    let (site_id, node) = &test.alliance.nodes[0];
    let coordinator_cert = &test.alliance.pki.identities[0];
    let channel = fedq_deploy::tls_channel(
        &format!("https://localhost:{}", node.address.port()),
        &test.alliance.pki.ca_cert,
        Some((&coordinator_cert.cert, &coordinator_cert.key)),
        &fedq_deploy::alliance::site_identity(site_id),
    )
    .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "fedq.v1.Node"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let first = answers
        .message()
        .await?
        .and_then(|answer| answer.message_response);
    let Some(MessageResponse::ListServicesResponse(listed)) = first else {
        panic!("expected a list of services, got {first:?}");
    };
    let names: Vec<String> = listed
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert!(names.contains(&"fedq.v1.Node".to_string()), "{names:?}");

    // The coordinator, over TLS without a client certificate, as study-lead clients connect.
    let coordinator = fedq_deploy::tls_channel(
        &test.alliance.coordinator_url(),
        &test.alliance.pki.ca_cert,
        None,
        fedq_deploy::alliance::COORDINATOR_IDENTITY,
    )
    .await?;
    let status = tonic_health::pb::health_client::HealthClient::new(coordinator)
        .check(HealthCheckRequest {
            service: "fedq.v1.Coordinator".into(),
        })
        .await?
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_whose_deadline_passed_while_waiting_is_refused_without_computing()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (config, state) = fedq_tests::node_config_with_own_state(&test)?;
    let config = fedq_node::config::NodeConfig::load(&config)?;
    let (engine, _) = fedq_node::query::QueryEngine::load(&config)?;
    let request = fedq_tests::cohort_request(&test.alliance, "late", 0)?;
    let query = fedq_node::query::QueryRequest {
        request_id: request.request_id,
        template: request.template,
        parameters: request.parameters,
        requester: request.requester,
        study: request.study,
        coefficients: request.coefficients,
        iteration: request.iteration,
    };
    let caller = vec![fedq_deploy::alliance::COORDINATOR_IDENTITY.to_string()];
    let past = std::time::Instant::now() - std::time::Duration::from_millis(1);
    let err = engine
        .run(&caller, &query, engine.take_slot(), Some(past))
        .unwrap_err();
    assert!(matches!(err, fedq_node::NodeError::DeadlinePassed), "{err}");
    // The same request in time is answered; both are audited.
    let future = std::time::Instant::now() + std::time::Duration::from_secs(60);
    engine.run(&caller, &query, engine.take_slot(), Some(future))?;
    drop(engine);
    let queries = fedq_tests::audit_queries(&state)?;
    assert_eq!(queries.len(), 2);
    assert_eq!(
        queries[0]
            .refusal
            .as_ref()
            .map(|refusal| refusal.code.as_str()),
        Some("REFUSAL_CODE_DEADLINE_PASSED")
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_count_outcomes_and_reasons_without_any_request_content() -> anyhow::Result<()>
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let test = TestAlliance::start().await?;
    let (config, state) = fedq_tests::node_config_with_own_state(&test)?;
    let config = fedq_node::config::NodeConfig::load(&config)?;
    let (node, _) = fedq_node::server::PreparedNode::load(&config)?;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_address = metrics.local_addr()?;
    node.serve_metrics(metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(node.serve(Some(listener), async {
        let _ = stopped.await;
    }));
    let coordinator = &test.alliance.pki.identities[0];
    let mut client = fedq_deploy::node_client(
        &format!("https://localhost:{port}"),
        &test.alliance.pki.ca_cert,
        Some((&coordinator.cert, &coordinator.key)),
        &fedq_deploy::alliance::site_identity("site-a"),
    )
    .await?;
    client
        .run_query(fedq_tests::cohort_request(
            &test.alliance,
            "secret-request-id",
            33,
        )?)
        .await?;
    let mut unapproved = fedq_tests::cohort_request(&test.alliance, "other-id", 0)?;
    unapproved.study = None;
    assert!(client.run_query(unapproved).await.is_err());

    let mut http = tokio::net::TcpStream::connect(metrics_address).await?;
    http.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    http.read_to_string(&mut response).await?;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    for expected in [
        "fedq_node_queries_total{outcome=\"released\",reason=\"none\"} 1",
        "fedq_node_queries_total{outcome=\"refused\",reason=\"REFUSAL_CODE_STUDY_MISSING\"} 1",
        "fedq_node_query_seconds_count{outcome=\"released\"} 1",
        "fedq_node_audit_records 3",
        "# TYPE fedq_node_query_seconds histogram",
        "fedq_node_overlap_cut_releases 0",
    ] {
        assert!(
            response.contains(expected),
            "missing {expected:?} in:\n{response}"
        );
    }
    for secret in [
        "secret-request-id",
        "other-id",
        "min_iss",
        "trauma-outcomes",
    ] {
        assert!(!response.contains(secret), "metrics leak {secret:?}");
    }
    // Withheld cells are counted, never by reason (the audit log has the reasons).
    let audited = fedq_tests::audit_queries(&state)?;
    let reasons = &audited[0].cells_withheld;
    assert!(
        reasons.contains_key("threshold"),
        "the query withholds a small cell: {reasons:?}"
    );
    let withheld: u64 = reasons.values().sum();
    let line = format!("fedq_node_cells_withheld_total {withheld}");
    assert!(response.contains(&line), "missing {line:?} in:\n{response}");
    assert!(
        !response.contains("fedq_node_cells_withheld_total{"),
        "withheld cells by reason in:\n{response}"
    );
    let _ = stop.send(());
    server.await??;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_metrics_count_queries_and_each_sites_replies() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let test = TestAlliance::start().await?;
    let config_path = test.alliance.root.join("config").join("coordinator.toml");
    let mut config = fedq_coordinator::config::CoordinatorConfig::load(&config_path)?;
    config.state_dir = test.dir.path().join("metrics-coordinator-state");
    let coordinator = fedq_coordinator::server::PreparedCoordinator::new(&config)?;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_address = metrics.local_addr()?;
    coordinator.serve_metrics(metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.serve(listener, None, async {
        let _ = stopped.await;
    }));
    let mut lead = fedq_coordinator::client::connect(
        &format!("https://localhost:{port}"),
        &test.alliance.pki.ca_cert,
        &test.alliance.users.study_lead,
    )
    .await?;
    fedq_tests::query(&mut lead, "cohort-by-age-sex", vec![], 0).await?;

    let mut http = tokio::net::TcpStream::connect(metrics_address).await?;
    http.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    http.read_to_string(&mut response).await?;
    for expected in [
        "fedq_coordinator_queries_total{template=\"cohort-by-age-sex\"} 1",
        "fedq_coordinator_site_replies_total{site=\"site-a\",status=\"ok\"} 1",
        "fedq_coordinator_site_replies_total{site=\"site-c\",status=\"ok\"} 1",
        "fedq_coordinator_site_seconds_count{site=\"site-b\"} 1",
    ] {
        assert!(
            response.contains(expected),
            "missing {expected:?} in:\n{response}"
        );
    }
    let _ = stop.send(());
    server.await??;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_query_is_marked_within_the_deadline_while_the_others_answer()
-> anyhow::Result<()> {
    use fedq_proto::wire::SiteStatus;
    use std::time::{Duration, Instant};

    let test = TestAlliance::start().await?;
    let (config, _) = fedq_tests::node_config_with_own_state(&test)?;
    let process = fedq_tests::NodeProcess::start(env!("CARGO_BIN_EXE_test-node"), &config, None)?;
    let listings = vec![
        fedq_deploy::alliance::NodeListing::loopback("site-a", process.address),
        fedq_tests::listing(&test, 1),
        fedq_tests::listing(&test, 2),
    ];
    let coordinator = fedq_tests::coordinator_with(&test, &listings, 10_000).await?;
    let mut client = fedq_coordinator::client::connect(
        &format!("https://localhost:{}", coordinator.address.port()),
        &test.alliance.pki.ca_cert,
        &test.alliance.users.study_lead,
    )
    .await?;
    let parameters = vec![fedq_tests::integer("min_iss", 16)];
    let status = |result: &fedq_proto::wire::PooledResult, site_id: &str| {
        result
            .sites
            .iter()
            .find(|site| site.site_id == site_id)
            .map(|site| (site.status, site.message.clone()))
            .expect("every site has a status")
    };
    // The connection to the node process is open and used.
    let first =
        fedq_tests::query(&mut client, "cohort-by-age-sex", parameters.clone(), 8_000).await?;
    assert_eq!(status(&first, "site-a").0, SiteStatus::Ok as i32);

    // The node freezes with the next query in flight, then dies.
    process.freeze()?;
    let deadline = Duration::from_secs(8);
    let pending = tokio::spawn(async move {
        let started = Instant::now();
        let result = fedq_tests::query(
            &mut client,
            "cohort-by-age-sex",
            parameters,
            u32::try_from(deadline.as_millis()).expect("fits"),
        )
        .await;
        (result, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "the query must be waiting on the frozen node"
    );
    process.kill()?;
    let (result, elapsed) = pending.await?;
    let result = result?;
    assert!(elapsed < deadline, "took {elapsed:?}");
    let (site_a, message) = status(&result, "site-a");
    assert_eq!(site_a, SiteStatus::Failed as i32, "{message}");
    assert!(
        message.contains("the connection to the site broke before it answered"),
        "{message}"
    );
    for site_id in ["site-b", "site-c"] {
        assert_eq!(status(&result, site_id).0, SiteStatus::Ok as i32);
    }
    coordinator.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_alliance_is_prepared_once_with_configs_that_load_and_pass_check()
-> anyhow::Result<()> {
    use fedq_deploy::prepare::{self, COORDINATOR_SERVICE, OUTBOUND_SITE};
    use std::os::unix::fs::PermissionsExt;

    fedq_proto::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("alliance");
    let templates = fedq_deploy::alliance::bundled_templates();
    let mut output = Vec::new();
    prepare::prepare(&out, 0.01, &templates, &mut output).await?;
    let compose = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/container/compose.yaml"),
    )?;
    for site_id in ["site-a", "site-b", "site-c"] {
        let config = out.join("config").join(format!("{site_id}.toml"));
        let loaded = fedq_node::config::NodeConfig::load(&config)?;
        assert_eq!(loaded.outbound.is_some(), site_id == OUTBOUND_SITE);
        assert_eq!(loaded.listen.is_none(), site_id == OUTBOUND_SITE);
        let findings = check::run(&config);
        assert!(
            failures(&findings).is_empty(),
            "{}",
            check::render(&findings)
        );
        // The compose service of this name runs exactly this configuration.
        assert!(compose.contains(&format!("\n  {site_id}:\n")), "{site_id}");
        assert!(compose.contains(&format!("/alliance/config/{site_id}.toml")));
    }
    let coordinator = out.join("config").join("coordinator.toml");
    let config = fedq_coordinator::config::CoordinatorConfig::load(&coordinator)?;
    assert!(config.tunnel_listen.is_some() && config.quality.is_some());
    fedq_coordinator::server::PreparedCoordinator::new(&config)?;
    assert!(compose.contains(&format!("\n  {COORDINATOR_SERVICE}:\n")));
    assert!(compose.contains("/alliance/config/coordinator.toml"));
    let settings = out.join("study-lead.env");
    assert_eq!(
        std::fs::metadata(&settings)?.permissions().mode() & 0o777,
        0o600
    );

    // Preparing again keeps what is there (audit logs, keys and budgets live in it).
    let before = std::fs::read(&coordinator)?;
    let mut again = Vec::new();
    prepare::prepare(&out, 0.01, &templates, &mut again).await?;
    assert!(String::from_utf8(again)?.contains("prepared already"));
    assert_eq!(std::fs::read(&coordinator)?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_counts_out_of_domain_values_per_column_without_showing_them() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    // site-c's legacy CSV with three ages of 150 (the model allows 0 to 120).
    let data = std::fs::read_to_string(&test.alliance.data_files[2])?;
    let mut lines: Vec<String> = data.lines().map(str::to_string).collect();
    let age = lines[0]
        .split(',')
        .position(|column| column == "AGE_Y")
        .expect("an AGE_Y column");
    for line in lines.iter_mut().skip(1).take(3) {
        let mut fields: Vec<&str> = line.split(',').collect();
        fields[age] = "150";
        *line = fields.join(",");
    }
    let seeded = test.dir.path().join("site-c-seeded.csv");
    std::fs::write(&seeded, lines.join("\n") + "\n")?;
    let config = std::fs::read_to_string(&test.alliance.node_configs[2])?.replace(
        &test.alliance.data_files[2].display().to_string(),
        &seeded.display().to_string(),
    );
    let path = test.dir.path().join("site-c-seeded.toml");
    std::fs::write(&path, &config)?;
    let findings = check::run(&path);
    let failed = failures(&findings);
    assert!(
        failed.iter().any(|line| line.starts_with("data")
            && line.contains("column 'age'")
            && line.contains("3 outside the declared domain 0 to 120")),
        "{failed:?}"
    );
    let shown = check::render(&findings)
        .replace(&test.dir.path().display().to_string(), "")
        .replace(&test.alliance.root.display().to_string(), "");
    assert!(!shown.contains("150"), "no value is shown: {shown}");
    // Treated as missing, the node starts and the same line is a warning.
    let tolerant = config.replace(
        "[datasets.columns]",
        "on_domain_violation = \"treat_as_missing\"\n\n[datasets.columns]",
    );
    std::fs::write(&path, tolerant)?;
    let findings = check::run(&path);
    assert!(
        failures(&findings).is_empty(),
        "{}",
        check::render(&findings)
    );
    assert!(
        findings.iter().any(|finding| finding.level == Level::Warn
            && finding.detail.contains("3 outside the declared domain")),
        "{}",
        check::render(&findings)
    );
    test.alliance.stop().await
}
