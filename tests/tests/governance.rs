//! Governance: expert signatures, the site's own policy, study approvals, daily limits and
//! coordinator users — real servers on 127.0.0.1.

use fedq_deploy::alliance;
use fedq_proto::wire::{self, RefusalCode, SiteStatus};
use fedq_tests::*;
use tonic::Code;

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
    let template = fedq_tests::template_of(&request)?;
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
    let template = fedq_tests::template_of(&request)?;
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
    // Its own state directory: the running site-a node holds its own.
    let (own_config, _) = node_config_with_own_state(&test)?;
    let config_text = std::fs::read_to_string(own_config)?;
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
    let mut template = fedq_tests::template_of(&request)?;
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
