//! End-to-end behaviour of a real alliance: three nodes and a coordinator over mutual TLS on
//! 127.0.0.1, driven only through their gRPC interfaces.

use std::time::{Duration, Instant};

use fedq_deploy::alliance::{self, NodeListing};
use fedq_proto::convert::parameter_to_wire;
use fedq_proto::template::Value;
use fedq_proto::wire::{self, RefusalCode, SiteStatus};
use fedq_tests::{TestAlliance, cell_levels, node_request, oracle_rows, query, sign_with};
use prost::Message;
use tonic::Code;

fn integer(name: &str, value: i64) -> wire::ParameterValue {
    parameter_to_wire(name, &Value::Integer(value))
}

/// Asserts a node refusal: gRPC code, typed reason, and words in the message.
fn assert_refused(status: &tonic::Status, code: Code, refusal: RefusalCode, words: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(refusal_of(status), refusal, "{status:?}");
    assert!(status.message().contains(words), "{}", status.message());
}

fn refusal_of(status: &tonic::Status) -> RefusalCode {
    let refusal =
        wire::Refusal::decode(status.details()).expect("a node refusal carries a typed reason");
    RefusalCode::try_from(refusal.code).expect("a known refusal code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_counts_equal_a_direct_count_over_the_concatenated_rows() -> anyhow::Result<()> {
    // Every site large enough that no cell of this grid is small: nothing is suppressed.
    let mut sites = fedq_tests::small_sites();
    sites[2].admissions = 2_500;
    let test = TestAlliance::start_with(sites).await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(
        &mut coordinator,
        "mechanism-by-icu",
        vec![integer("min_iss", 4)],
        0,
    )
    .await?;

    for site in &result.sites {
        assert_eq!(
            site.status,
            SiteStatus::Ok as i32,
            "{}: {}",
            site.site_id,
            site.message
        );
    }
    let rows: Vec<_> = oracle_rows(&test.sites)?
        .into_iter()
        .flatten()
        .filter(|row| row.iss >= 4)
        .collect();
    for cell in &result.cells {
        let levels = cell_levels(&result, cell);
        let expected = rows
            .iter()
            .filter(|row| {
                row.mechanism == levels[0] && (if row.icu { "yes" } else { "no" }) == levels[1]
            })
            .count() as u64;
        assert!(cell.complete, "{levels:?} should be released by every site");
        assert_eq!(cell.count, Some(expected), "{levels:?}");
    }
    let total = result.total.expect("total");
    assert_eq!(total.count, Some(rows.len() as u64));
    assert!(total.complete);
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_cell_is_withheld_without_any_value_and_the_pooled_cell_is_incomplete()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(&mut coordinator, "cohort-by-age-sex", vec![], 0).await?;
    let small_site = result
        .sites
        .iter()
        .position(|site| site.site_id == "site-c")
        .expect("site-c");
    let site_c_rows = &oracle_rows(&test.sites)?[2];
    let site_result = result.sites[small_site]
        .result
        .as_ref()
        .expect("site-c answered");

    let mut checked_small_cells = 0;
    for (index, cell) in site_result.cells.iter().enumerate() {
        let pooled = &result.cells[index];
        let levels = cell_levels(&result, pooled);
        let band = |age: i64| match age {
            0..=17 => "0-17",
            18..=39 => "18-39",
            40..=64 => "40-64",
            _ => "65+",
        };
        let true_count = site_c_rows
            .iter()
            .filter(|row| band(row.age) == levels[0] && row.sex == levels[1])
            .count();
        if (1..10).contains(&true_count) {
            checked_small_cells += 1;
            assert_eq!(
                cell.outcome,
                Some(wire::cell::Outcome::Withheld(wire::Withheld {})),
                "{levels:?}"
            );
            // The encoded cell holds nothing but its coordinates and an empty withheld mark.
            let encoded = cell.encode_to_vec();
            let bare = wire::Cell {
                coordinates: cell.coordinates.clone(),
                outcome: None,
            }
            .encode_to_vec();
            assert_eq!(
                encoded.len(),
                bare.len() + 2,
                "a withheld cell must carry no value"
            );
            assert!(!pooled.complete, "{levels:?} must be marked incomplete");
            assert!(pooled.sites_withheld >= 1);
        }
    }
    assert!(
        checked_small_cells > 0,
        "the fixture must produce small cells at site-c"
    );
    let total = site_result.total.as_ref().expect("total");
    assert_eq!(
        total.outcome,
        Some(wire::cell::Outcome::Withheld(wire::Withheld {}))
    );
    assert!(
        site_result
            .mechanisms
            .contains(&(wire::Mechanism::SmallCellSuppression as i32))
    );
    assert!(
        site_result
            .mechanisms
            .contains(&(wire::Mechanism::ComplementarySuppression as i32))
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_minimum_below_the_node_floor_does_not_lower_it() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(&mut coordinator, "low-minimum", vec![], 0).await?;
    for site in &result.sites {
        let answer = site.result.as_ref().expect("answered");
        assert_eq!(answer.applied_min_cell_count, 10, "{}", site.site_id);
    }
    // site-c has a handful of patients of sex "other" at most: released only if >= 10.
    let site_c = result.sites[2].result.as_ref().unwrap();
    let other = site_c
        .cells
        .iter()
        .find(|cell| cell.coordinates == [2])
        .unwrap();
    if let Some(wire::cell::Outcome::Released(released)) = &other.outcome {
        assert!(
            released.count == 0 || released.count >= 10,
            "released {}",
            released.count
        );
    }
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_parameter_is_refused_by_the_coordinator_and_by_the_node_itself()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut coordinator = test.coordinator().await?;
    let status = coordinator
        .run_query(wire::RunQueryRequest {
            template_id: "elderly-major-trauma-deaths".into(),
            parameters: vec![integer("min_age", 30)],
            deadline_ms: 0,
            study_id: alliance::STUDY_ID.into(),
        })
        .await
        .expect_err("refused by the coordinator");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("'min_age'")
            && status.message().contains("outside its limits 50 to 100"),
        "{}",
        status.message()
    );

    let mut node = test.node_as_coordinator(0).await?;
    let request = node_request(
        &test.alliance,
        "elderly-major-trauma-deaths",
        vec![integer("min_age", 30)],
    )?;
    let status = node
        .run_query(request)
        .await
        .expect_err("refused by the node");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("'min_age'"),
        "{}",
        status.message()
    );
    assert_eq!(refusal_of(&status), RefusalCode::InvalidParameter);
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_using_an_identifier_column_is_refused_by_the_node() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(1).await?;
    let mut request = node_request(&test.alliance, "low-minimum", vec![])?;
    let mut template = fedq_proto::document::open_template(request.template.as_ref().unwrap())?;
    template.strata[0].column = "national_id".into();
    // Even a quorum of experts, signing the template and a study that pins it, cannot make an
    // identifier column usable.
    request.template = Some(sign_with(&test.alliance, &template, &[0, 1])?);
    request.study = Some(fedq_tests::study_with(&test.alliance, |study| {
        study.templates.retain(|pin| pin.id != template.id);
        study
            .templates
            .push(fedq_proto::study::PinnedTemplate::of(&template));
    })?);
    let status = node.run_query(request).await.expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::IdentifierColumn,
        "'national_id' is an identifier",
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_changed_byte_in_a_signed_template_is_refused_as_tampered() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let mut request = node_request(&test.alliance, "low-minimum", vec![])?;
    let document = request.template.as_mut().unwrap();
    let position = document
        .canonical
        .iter()
        .position(|byte| *byte == b'3')
        .expect("min_cell_count 3");
    document.canonical[position] = b'2';
    let status = node.run_query(request).await.expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::SignatureInvalid,
        "changed after signing",
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validly_signed_but_non_canonical_document_is_refused_as_malformed() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let mut request = node_request(&test.alliance, "low-minimum", vec![])?;
    let template = fedq_proto::document::open_template(request.template.as_ref().unwrap())?;
    let pretty = serde_json::to_vec_pretty(&template)?;
    let signatures = fedq_tests::sign_bytes(
        &test.alliance,
        fedq_proto::template::DOCUMENT_KIND,
        &pretty,
        &[0, 1],
    )?;
    request.template = Some(wire::SignedDocument {
        kind: fedq_proto::template::DOCUMENT_KIND.into(),
        canonical: pretty,
        signatures,
    });
    let status = node.run_query(request).await.expect_err("refused");
    assert_refused(
        &status,
        Code::InvalidArgument,
        RefusalCode::MalformedTemplate,
        "",
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_signed_by_one_expert_is_refused_when_the_quorum_is_two() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let mut request = node_request(&test.alliance, "low-minimum", vec![])?;
    let template = fedq_proto::document::open_template(request.template.as_ref().unwrap())?;
    request.template = Some(sign_with(&test.alliance, &template, &[2])?);
    let status = node.run_query(request.clone()).await.expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::QuorumNotMet,
        "",
    );
    assert!(
        status
            .message()
            .contains("signed by 1 key(s) this site trusts, but it requires 2"),
        "{}",
        status.message()
    );
    // The same template with a second expert's signature is accepted.
    request.template = Some(sign_with(&test.alliance, &template, &[2, 0])?);
    node.run_query(request).await?;
    test.alliance.stop().await
}

/// Writes a variant of site-a's node configuration and starts it.
async fn node_variant(
    test: &TestAlliance,
    edit: impl Fn(String) -> String,
) -> anyhow::Result<alliance::Running> {
    let config = std::fs::read_to_string(&test.alliance.node_configs[0])?;
    let edited = edit(config.clone());
    assert_ne!(edited, config, "the edit must change the configuration");
    let path = test
        .alliance
        .root
        .join("config")
        .join(format!("variant-{}.toml", rand_suffix()));
    std::fs::write(&path, edited)?;
    alliance::start_node(&path).await
}

async fn client_for(
    test: &TestAlliance,
    node: &alliance::Running,
) -> anyhow::Result<fedq_proto::wire::node_client::NodeClient<tonic::transport::Channel>> {
    let coordinator = &test.alliance.pki.identities[0];
    fedq_deploy::node_client(
        &format!("https://localhost:{}", node.address.port()),
        &test.alliance.pki.ca_cert,
        Some((&coordinator.cert, &coordinator.key)),
        &alliance::site_identity("site-a"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_signed_with_a_revoked_key_is_refused() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let revoked = test.alliance.catalogue.experts[0].key_id.clone();
    let node = node_variant(&test, |config| {
        config.replace(
            "signature_quorum = 2",
            &format!("signature_quorum = 2\nrevoked_keys = [\"{revoked}\"]"),
        )
    })
    .await?;
    let mut client = client_for(&test, &node).await?;
    let status = client
        .run_query(node_request(&test.alliance, "low-minimum", vec![])?)
        .await
        .expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::SignerRevoked,
        "",
    );
    assert!(status.message().contains(&revoked), "{}", status.message());
    node.stop().await?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_no_trusted_keys_refuses_every_query_and_says_why_at_start() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    let config_text = std::fs::read_to_string(&test.alliance.node_configs[0])?;
    let trusted_line = config_text
        .lines()
        .find(|line| line.starts_with("trusted_expert_keys"))
        .unwrap()
        .to_string();
    let untrusting = |config: String| config.replace(&trusted_line, "trusted_expert_keys = []");
    let path = test.alliance.root.join("config").join("untrusting.toml");
    std::fs::write(&path, untrusting(config_text.clone()))?;
    let config = fedq_node::config::NodeConfig::load(&path)?;
    let (_, warnings) = fedq_node::query::QueryEngine::load(&config)?;
    assert!(
        warnings
            .iter()
            .any(|line| line.contains("trusts no expert keys") && line.contains("deny by default")),
        "{warnings:?}"
    );

    let node = node_variant(&test, untrusting).await?;
    let mut client = client_for(&test, &node).await?;
    let status = client
        .run_query(node_request(&test.alliance, "low-minimum", vec![])?)
        .await
        .expect_err("refused");
    assert_refused(
        &status,
        Code::FailedPrecondition,
        RefusalCode::NoTrustedKeys,
        "",
    );
    node.stop().await?;
    test.alliance.stop().await
}

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

/// Starts a second coordinator over the test alliance's nodes with a custom node listing.
async fn coordinator_with(
    test: &TestAlliance,
    listings: &[NodeListing],
    deadline_ms: u64,
) -> anyhow::Result<alliance::Running> {
    let folder = test
        .dir
        .path()
        .join(format!("coordinator-{}", rand_suffix()));
    std::fs::create_dir_all(&folder)?;
    let config = alliance::write_coordinator_config(
        &folder,
        &test.alliance.catalogue,
        &test.alliance.users,
        &test.alliance.pki,
        alliance::COORDINATOR_IDENTITY,
        listings,
        deadline_ms,
    )?;
    alliance::start_coordinator(&config, 0).await
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn listing(test: &TestAlliance, index: usize) -> NodeListing {
    let (site_id, node) = &test.alliance.nodes[index];
    NodeListing {
        site_id: site_id.clone(),
        address: node.address,
        identity: alliance::site_identity(site_id),
    }
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
            address: closed_address,
            identity: "site-down.fedq.local".into(),
        },
        NodeListing {
            site_id: "site-silent".into(),
            address: silent_address,
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

/// Rewrites one catalogue file, starts a second coordinator over all three nodes, and runs it.
async fn query_after_editing_catalogue(
    test: &TestAlliance,
    template_id: &str,
    edit: impl Fn(String) -> String,
) -> anyhow::Result<wire::PooledResult> {
    let path = test
        .alliance
        .catalogue
        .templates
        .join(format!("{template_id}.toml"));
    let text = std::fs::read_to_string(&path)?;
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit must change the file");
    std::fs::write(&path, edited)?;
    let listings: Vec<NodeListing> = (0..3).map(|index| listing(test, index)).collect();
    let running = coordinator_with(test, &listings, 5_000).await?;
    let mut client = fedq_coordinator::client::connect(
        &format!("https://localhost:{}", running.address.port()),
        &test.alliance.pki.ca_cert,
        &test.alliance.users.study_lead,
    )
    .await?;
    let result = query(&mut client, template_id, vec![], 0).await;
    running.stop().await?;
    Ok(result?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reformatted_signed_template_is_still_accepted_by_every_node() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let result = query_after_editing_catalogue(&test, "low-minimum", |text| {
        text.replace(
            "version = 1\n",
            "version     =   1    # reformatted, same meaning\n",
        )
        .replace(
            "[statistic]\nkind = \"count\"",
            "statistic = { kind = \"count\" }",
        )
    })
    .await;
    // Moving a table changes TOML layout only; if the edit above made the file invalid the
    // test fails loudly rather than passing for the wrong reason.
    let result = result?;
    for site in &result.sites {
        assert_eq!(
            site.status,
            SiteStatus::Ok as i32,
            "{}: {}",
            site.site_id,
            site.message
        );
    }
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_version_bumped_without_re_signing_is_refused() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    // Straight to a node: the old signatures do not cover the new bytes.
    let mut node = test.node_as_coordinator(0).await?;
    let mut request = node_request(&test.alliance, "low-minimum", vec![])?;
    let mut template = fedq_proto::document::open_template(request.template.as_ref().unwrap())?;
    template.version = 2;
    let old_signatures = request.template.take().unwrap().signatures;
    request.template = Some(fedq_proto::document::template_document(
        &template,
        old_signatures,
    ));
    let status = node.run_query(request).await.expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::SignatureInvalid,
        "changed after signing",
    );
    // Through the coordinator: the study pins version 1, so it is not even sent.
    let err = query_after_editing_catalogue(&test, "low-minimum", |text| {
        text.replace("version = 1", "version = 2")
    })
    .await
    .expect_err("refused by the coordinator")
    .to_string();
    assert!(err.contains("not approved for study"), "{err}");
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_the_site_refuses_is_refused_however_it_is_signed() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let node = node_variant(&test, |config| {
        config.replace(
            "signature_quorum = 2",
            "signature_quorum = 2\nrefused_templates = [\"low-minimum\"]",
        )
    })
    .await?;
    let mut client = client_for(&test, &node).await?;
    let status = client
        .run_query(node_request(&test.alliance, "low-minimum", vec![])?)
        .await
        .expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::TemplateRefusedBySite,
        "does not run template 'low-minimum'",
    );
    // Other templates still run.
    let request = node_request(
        &test.alliance,
        "mechanism-by-icu",
        vec![integer("min_iss", 0)],
    )?;
    client.run_query(request).await?;
    node.stop().await?;
    test.alliance.stop().await
}

/// A change to a study approval, for table-driven tests.
type StudyEdit = Box<dyn Fn(&mut fedq_proto::study::Study)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_refuses_queries_outside_a_valid_accepted_study_naming_the_reason()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let request = || node_request(&test.alliance, "low-minimum", vec![]);

    let mut missing = request()?;
    missing.study = None;
    let status = node.run_query(missing).await.expect_err("no study");
    assert_refused(
        &status,
        Code::InvalidArgument,
        RefusalCode::StudyMissing,
        "names no study",
    );

    let cases: [(StudyEdit, Code, RefusalCode, &str); 4] = [
        (
            Box::new(|study| {
                study.valid_from = "2020-01-01".into();
                study.valid_until = "2020-12-31".into();
            }),
            Code::FailedPrecondition,
            RefusalCode::StudyNotInForce,
            "in force from 2020-01-01 to 2020-12-31",
        ),
        (
            Box::new(|study| study.sites.retain(|site| site != "site-a")),
            Code::FailedPrecondition,
            RefusalCode::SiteNotInStudy,
            "does not include this site ('site-a')",
        ),
        (
            Box::new(|study| study.templates.retain(|pin| pin.id != "low-minimum")),
            Code::FailedPrecondition,
            RefusalCode::TemplateNotInStudy,
            "'low-minimum' version 1 is not approved",
        ),
        (
            Box::new(|study| study.id = "another-study".into()),
            Code::PermissionDenied,
            RefusalCode::StudyNotAccepted,
            "has not accepted study 'another-study'",
        ),
    ];
    for (edit, code, refusal, words) in cases {
        let mut changed = request()?;
        changed.study = Some(fedq_tests::study_with(&test.alliance, edit)?);
        let status = node.run_query(changed).await.expect_err("refused");
        assert_refused(&status, code, refusal, words);
    }

    // A study approval changed without re-signing is refused as tampered.
    let mut tampered = request()?;
    let document = tampered.study.as_mut().unwrap();
    let study = fedq_proto::document::open_study(document)?;
    let mut longer = study.clone();
    longer.valid_until = "2099-12-31".into();
    document.canonical = longer.canonical_bytes();
    let status = node.run_query(tampered).await.expect_err("refused");
    assert_refused(
        &status,
        Code::PermissionDenied,
        RefusalCode::SignatureInvalid,
        "changed after signing",
    );

    // The unchanged request is answered.
    node.run_query(request()?).await?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_limit_refuses_the_next_query_counts_retries_once_and_survives_a_restart()
-> anyhow::Result<()> {
    let mut test = TestAlliance::start().await?;
    let mut base = node_request(&test.alliance, "low-minimum", vec![])?;
    base.study = Some(fedq_tests::study_with(&test.alliance, |study| {
        study.max_queries_per_day = 2
    })?);
    let request = |id: &str| -> anyhow::Result<wire::QueryRequest> {
        let mut request = base.clone();
        request.request_id = id.into();
        Ok(request)
    };
    let mut node = test.node_as_coordinator(0).await?;
    node.run_query(request("q-1")?).await?;
    node.run_query(request("q-1")?).await?; // a retry: not counted again
    node.run_query(request("q-2")?).await?;
    let status = node
        .run_query(request("q-3")?)
        .await
        .expect_err("limit reached");
    assert_refused(
        &status,
        Code::ResourceExhausted,
        RefusalCode::DailyLimitReached,
        "daily limit of 2 queries",
    );

    // Restart site-a's node from the same configuration and state directory.
    let (_, old) = test.alliance.nodes.remove(0);
    old.stop().await?;
    let restarted = alliance::start_node(&test.alliance.node_configs[0]).await?;
    let mut node = client_for(&test, &restarted).await?;
    let status = node
        .run_query(request("q-4")?)
        .await
        .expect_err("still at the limit");
    assert_refused(
        &status,
        Code::ResourceExhausted,
        RefusalCode::DailyLimitReached,
        "daily limit",
    );
    node.run_query(request("q-2")?).await?;
    restarted.stop().await?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_requires_a_token_and_only_the_named_study_lead_may_query() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    for token in ["", "fedq_not-a-real-token"] {
        let mut anonymous = test.coordinator_as(token).await?;
        let status = anonymous
            .list_templates(wire::ListTemplatesRequest {})
            .await
            .expect_err("no valid token");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(
            status.message().contains("FEDQ_TOKEN"),
            "{}",
            status.message()
        );
    }

    let mut expert = test.coordinator_as(&test.alliance.users.expert).await?;
    let templates = expert
        .list_templates(wire::ListTemplatesRequest {})
        .await?
        .into_inner();
    assert!(!templates.templates.is_empty());
    let err = query(&mut expert, "low-minimum", vec![], 0)
        .await
        .expect_err("an expert may not query")
        .to_string();
    assert!(
        err.contains("may not run queries under study 'trauma-outcomes': only its study lead (Dr. Lea Study) may"),
        "{err}"
    );

    let mut lead = test.coordinator().await?;
    let result = query(&mut lead, "low-minimum", vec![], 0).await?;
    assert!(
        result
            .sites
            .iter()
            .all(|site| site.status == SiteStatus::Ok as i32)
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_a_request_id_for_a_different_question_counts_as_a_new_query() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let study = fedq_tests::study_with(&test.alliance, |study| study.max_queries_per_day = 1)?;
    let ask = |min_iss: i64| -> anyhow::Result<wire::QueryRequest> {
        let mut request = node_request(
            &test.alliance,
            "mechanism-by-icu",
            vec![integer("min_iss", min_iss)],
        )?;
        request.request_id = "same-id".into();
        request.study = Some(study.clone());
        Ok(request)
    };
    node.run_query(ask(5)?).await?;
    node.run_query(ask(5)?).await?; // a true retry
    let status = node
        .run_query(ask(6)?)
        .await
        .expect_err("a new question under an old id");
    assert_refused(
        &status,
        Code::ResourceExhausted,
        RefusalCode::DailyLimitReached,
        "daily limit of 1",
    );
    test.alliance.stop().await
}
