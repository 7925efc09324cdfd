//! Transport and availability: mutual TLS and certificate identities, deadlines with dead or
//! silent nodes, message limits, start-up failures — real servers on 127.0.0.1.

use std::time::{Duration, Instant};

use fedq_deploy::alliance::{self, NodeListing};
use fedq_proto::wire::{self, RefusalCode, SiteStatus};
use fedq_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_a_certificate_is_refused_by_the_node() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let request = node_request(&test.alliance, "low-minimum", vec![])?;
    if let Ok(mut node) = test.node_with(0, None).await {
        let status = node
            .run_query(request)
            .await
            .expect_err("a node answered a client without a certificate");
        // Refused by the TLS handshake, before any gRPC handler (and its typed refusals) ran.
        assert!(
            status.details().is_empty(),
            "the request reached the service: {status:?}"
        );
        assert_ne!(status.code(), Code::PermissionDenied);
    }
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused_by_the_node() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let rogue = fedq_coordinator::certs::create_dev_pki(
        &test.dir.path().join("rogue"),
        "rogue CA",
        &[alliance::COORDINATOR_IDENTITY.to_string()],
    )?;
    let rogue_identity = &rogue.identities[0];
    let request = node_request(&test.alliance, "low-minimum", vec![])?;
    match test
        .node_with(0, Some((&rogue_identity.cert, &rogue_identity.key)))
        .await
    {
        Err(_) => {}
        Ok(mut node) => {
            let status = node
                .run_query(request)
                .await
                .expect_err("a node answered a certificate from another CA");
            assert_ne!(status.code(), Code::Ok);
        }
    }
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_of_an_unlisted_identity_is_refused_with_a_reason() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    // site-b's own certificate is from the alliance CA but is not an accepted coordinator.
    let site_b = &test.alliance.pki.identities[2];
    let mut node = test.node_with(0, Some((&site_b.cert, &site_b.key))).await?;
    let request = node_request(&test.alliance, "low-minimum", vec![])?;
    let status = node.run_query(request).await.expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::CallerNotAccepted,
        "site-b.fedq.local",
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_presenting_the_wrong_identity_is_detected_by_the_coordinator() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut impostor = listing(&test, 1);
    impostor.site_id = "site-a".into();
    impostor.identity = alliance::site_identity("site-a");
    let running = coordinator_with(&test, &[impostor], 5_000).await?;
    let mut client = fedq_coordinator::client::connect(
        &format!("https://localhost:{}", running.address.port()),
        &test.alliance.pki.ca_cert,
        &test.alliance.users.study_lead,
    )
    .await?;
    let result = query(&mut client, "low-minimum", vec![], 0).await?;
    let site = &result.sites[0];
    assert_eq!(
        site.status,
        SiteStatus::Unreachable as i32,
        "{}",
        site.message
    );
    assert!(
        site.message.to_lowercase().contains("certificate"),
        "{}",
        site.message
    );
    assert!(site.result.is_none());
    running.stop().await?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_node_and_a_silent_node_do_not_hold_up_the_answer_past_the_deadline()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    // A port where nothing listens any more...
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let closed_address = closed.local_addr()?;
    drop(closed);
    // ...and a peer that accepts connections but never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_address = silent.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let listings = [
        listing(&test, 0),
        NodeListing {
            site_id: "site-down".into(),
            address: Some(format!("https://localhost:{}", closed_address.port())),
            identity: "site-down.fedq.local".into(),
        },
        NodeListing {
            site_id: "site-silent".into(),
            address: Some(format!("https://localhost:{}", silent_address.port())),
            identity: "site-silent.fedq.local".into(),
        },
    ];
    let running = coordinator_with(&test, &listings, 1_500).await?;
    let mut client = fedq_coordinator::client::connect(
        &format!("https://localhost:{}", running.address.port()),
        &test.alliance.pki.ca_cert,
        &test.alliance.users.study_lead,
    )
    .await?;
    let started = Instant::now();
    let result = query(
        &mut client,
        "mechanism-by-icu",
        vec![integer("min_iss", 0)],
        0,
    )
    .await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1_500 + 2_000),
        "answer took {elapsed:?}"
    );
    let status = |id: &str| {
        result
            .sites
            .iter()
            .find(|site| site.site_id == id)
            .unwrap()
            .status
    };
    assert_eq!(status("site-a"), SiteStatus::Ok as i32);
    assert_eq!(status("site-down"), SiteStatus::Unreachable as i32);
    assert!(
        [SiteStatus::TimedOut as i32, SiteStatus::Unreachable as i32]
            .contains(&status("site-silent")),
        "silent site status {}",
        status("site-silent")
    );
    // Only site-a contributed, so every released pooled cell equals site-a's own value.
    let site_a = result.sites[0].result.as_ref().unwrap();
    for (pooled, own) in result.cells.iter().zip(&site_a.cells) {
        match &own.outcome {
            Some(wire::cell::Outcome::Released(released)) => {
                assert_eq!(pooled.count, Some(released.count))
            }
            _ => assert_eq!(pooled.count, None),
        }
    }
    holder.abort();
    running.stop().await?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_template_file_stops_the_coordinator_with_file_and_line() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let templates = test.alliance.catalogue.templates.clone();
    std::fs::write(
        templates.join("broken.toml"),
        "id = \"broken\"\nversion = 1\ntitle = [\n",
    )?;
    let listings = [listing(&test, 0)];
    let err = coordinator_with(&test, &listings, 1_000)
        .await
        .expect_err("refused to start")
        .to_string();
    assert!(
        err.contains("broken.toml") && err.contains("line 3"),
        "{err}"
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_refused_and_the_node_keeps_serving() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let mut request = node_request(&test.alliance, "low-minimum", vec![])?;
    request.requester = "x".repeat(2 * 1024 * 1024);
    let status = node
        .run_query(request)
        .await
        .expect_err("a 2 MiB request must be refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{}",
        status.message()
    );
    let request = node_request(&test.alliance, "low-minimum", vec![])?;
    let answer = node.run_query(request).await?.into_inner();
    assert_eq!(answer.site_id, "site-a");
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_a_key_that_does_not_match_its_certificate_refuses_to_start() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    let config = std::fs::read_to_string(&test.alliance.node_configs[0])?;
    let site_a_key = &test.alliance.pki.identities[1].key;
    let site_b_key = &test.alliance.pki.identities[2].key;
    let broken = config.replace(
        &site_a_key.display().to_string(),
        &site_b_key.display().to_string(),
    );
    assert_ne!(broken, config);
    let path = test.dir.path().join("broken-node.toml");
    std::fs::write(&path, broken)?;
    let err = alliance::start_node(&path)
        .await
        .expect_err("refused to start")
        .to_string();
    assert!(err.contains("do not form a usable pair"), "{err}");
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_picked_up_on_sighup_without_a_restart() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (config, _) = node_config_with_own_state(&test)?;
    // The node's own copies of its TLS files, so they can be replaced in place.
    let folder = test.dir.path().join(format!("renewal-{}", rand_suffix()));
    std::fs::create_dir_all(&folder)?;
    let pki = &test.alliance.pki;
    let (ca, cert, key) = (
        folder.join("ca.pem"),
        folder.join("node.pem"),
        folder.join("node.key"),
    );
    std::fs::copy(&pki.ca_cert, &ca)?;
    std::fs::copy(&pki.identities[1].cert, &cert)?;
    std::fs::copy(&pki.identities[1].key, &key)?;
    let text = std::fs::read_to_string(&config)?
        .replace(
            &pki.ca_cert.display().to_string(),
            &ca.display().to_string(),
        )
        .replace(
            &pki.identities[1].cert.display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &pki.identities[1].key.display().to_string(),
            &key.display().to_string(),
        );
    std::fs::write(&config, text)?;
    let process = NodeProcess::start(env!("CARGO_BIN_EXE_test-node"), &config, None)?;
    let address = format!("https://localhost:{}", process.address.port());
    let identity = alliance::site_identity("site-a");
    let connect = |pki: &fedq_coordinator::certs::DevPki| {
        let (address, identity) = (address.clone(), identity.clone());
        let (ca, client_cert, client_key) = (
            pki.ca_cert.clone(),
            pki.identities[0].cert.clone(),
            pki.identities[0].key.clone(),
        );
        async move {
            fedq_deploy::node_client(&address, &ca, Some((&client_cert, &client_key)), &identity)
                .await
        }
    };
    assert!(connect(pki).await.is_ok(), "the original certificates work");

    // The alliance renews everything: a new CA, new certificates for node and coordinator.
    let renewed = fedq_coordinator::certs::create_dev_pki(
        &folder.join("renewed"),
        "renewed CA",
        &[alliance::COORDINATOR_IDENTITY.into(), identity.clone()],
    )?;
    std::fs::copy(&renewed.ca_cert, &ca)?;
    std::fs::copy(&renewed.identities[1].cert, &cert)?;
    std::fs::copy(&renewed.identities[1].key, &key)?;
    assert!(
        connect(&renewed).await.is_err(),
        "files replaced, not yet reloaded"
    );
    process.hang_up()?;
    let mut reloaded = false;
    for _ in 0..100 {
        if connect(&renewed).await.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the renewed certificates were not picked up");
    assert!(connect(pki).await.is_err(), "the old CA no longer works");
    process.kill()?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_offering_no_shared_protocol_version_is_refused_clearly() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let offering = |offer: &'static str, id: &str| -> anyhow::Result<_> {
        let mut request = tonic::Request::new(cohort_request(&test.alliance, id, 0)?);
        request.metadata_mut().insert(
            fedq_proto::PROTOCOL_HEADER,
            tonic::metadata::MetadataValue::from_static(offer),
        );
        Ok(request)
    };
    let status = node
        .run_query(offering("fedq.v2", "future")?)
        .await
        .unwrap_err();
    assert_refused(
        &status,
        Code::FailedPrecondition,
        RefusalCode::ProtocolMismatch,
        "this site speaks protocol fedq.v1, but the coordinator offered fedq.v2",
    );
    // An offer that includes the node's version is answered, in that version.
    let answer = node
        .run_query(offering("fedq.v2, fedq.v1", "both")?)
        .await?;
    assert_eq!(
        answer
            .metadata()
            .get(fedq_proto::PROTOCOL_HEADER)
            .and_then(|value| value.to_str().ok()),
        Some("fedq.v1")
    );
    test.alliance.stop().await
}

/// Replaces site-a's data file of a node process started with `poll_secs` and waits for the
/// new snapshot, after a SIGHUP when `signal`. Returns the totals before and after.
async fn swap_data(
    test: &TestAlliance,
    poll_secs: u64,
    signal: bool,
) -> anyhow::Result<(u64, u64)> {
    let (config, _) = node_config_with_own_state(test)?;
    let folder = test.dir.path().join(format!("reload-{}", rand_suffix()));
    std::fs::create_dir_all(&folder)?;
    let original = &test.alliance.data_files[0];
    let data = folder.join(original.file_name().expect("a file name"));
    std::fs::copy(original, &data)?;
    let text = std::fs::read_to_string(&config)?
        .replace(&original.display().to_string(), &data.display().to_string())
        .replacen(
            "listen = ",
            &format!("reload_poll_secs = {poll_secs}\nlisten = "),
            1,
        );
    std::fs::write(&config, text)?;
    let process = NodeProcess::start(env!("CARGO_BIN_EXE_test-node"), &config, None)?;
    let mut node = process.client(test).await?;
    let before = node
        .run_query(cohort_request(&test.alliance, "before", 0)?)
        .await?
        .into_inner();

    // A new extract of the registry, written beside and moved into place.
    let mut site = test.sites[0].clone();
    site.admissions = 1_200;
    site.seed += 1;
    let fresh = folder.join("fresh");
    std::fs::create_dir_all(&fresh)?;
    let written = fedq_deploy::synth::write_site(&site, &fresh)?;
    std::fs::rename(&written, &data)?;
    if signal {
        process.hang_up()?;
    }
    let mut after = None;
    for attempt in 0..300 {
        let answer = node
            .run_query(cohort_request(
                &test.alliance,
                &format!("after-{attempt}"),
                0,
            )?)
            .await?
            .into_inner();
        if answer.snapshot_version != before.snapshot_version {
            after = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    process.kill()?;
    let after = after.ok_or_else(|| anyhow::anyhow!("the new data was not swapped in"))?;
    let total = |answer: &wire::SiteResult| match answer.total.as_ref().and_then(|t| t.outcome) {
        Some(wire::cell::Outcome::Released(released)) => released.count,
        _ => 0,
    };
    Ok((total(&before), total(&after)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_data_files_are_swapped_in_on_sighup_and_show_as_a_new_snapshot() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    // Polling off: only the signal can have done it.
    let (before, after) = swap_data(&test, 0, true).await?;
    assert!(after < before, "the smaller extract is in use");
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_data_file_is_picked_up_without_any_signal() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (before, after) = swap_data(&test, 1, false).await?;
    assert!(after < before, "the smaller extract is in use");
    test.alliance.stop().await
}

/// A TCP forwarder to `target` that drops the first connection it accepts (a connection lost
/// on the way) and forwards every later one. Returns its address and how many it accepted.
async fn flaky_proxy(
    target: std::net::SocketAddr,
) -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                drop(inbound);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok((address, accepted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_on_the_way_is_retried_once_and_the_site_answers() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (site_id, node) = &test.alliance.nodes[0];
    let (proxy, accepted) = flaky_proxy(node.address).await?;
    let listing = NodeListing {
        site_id: site_id.clone(),
        address: Some(format!("https://localhost:{}", proxy.port())),
        identity: alliance::site_identity(site_id),
    };
    let running = coordinator_with(&test, &[listing], 10_000).await?;
    let mut lead = fedq_coordinator::client::connect(
        &format!("https://localhost:{}", running.address.port()),
        &test.alliance.pki.ca_cert,
        &test.alliance.users.study_lead,
    )
    .await?;
    let result = query(&mut lead, "cohort-by-age-sex", vec![], 0).await?;
    assert_eq!(
        result.sites[0].status,
        SiteStatus::Ok as i32,
        "{}",
        result.sites[0].message
    );
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the first connection was dropped and a second one made"
    );
    running.stop().await?;
    test.alliance.stop().await
}
