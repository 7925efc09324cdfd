//! Accountability, end to end: every request leaves one hash-chained audit record at the node,
//! durable before the reply; the coordinator keeps the heads nodes sign, so a cut log shows;
//! a node that cannot write its log refuses; a node killed under load loses no answered query;
//! the contribution ledger credits sites only with released cells; the transparency register
//! names studies and templates but no parameter values.

use fedq_node::audit::record::Outcome;
use fedq_node::audit::verify::Problem;
use fedq_proto::wire::{self, RefusalCode};
use fedq_tests::{
    NodeProcess, TestAlliance, assert_refused, audit_queries, cohort_request, integer,
    node_config_with_own_state, query, verify_audit,
};
use tonic::Code;

/// The node program, run as its own process.
const NODE_PROGRAM: &str = env!("CARGO_BIN_EXE_test-node");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_signed_heads_the_coordinator_keeps_and_a_cut_log_is_caught_by_them()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut lead = test.coordinator().await?;
    for min_iss in [0, 16, 25] {
        let result = query(
            &mut lead,
            "cohort-by-age-sex",
            vec![integer("min_iss", min_iss)],
            0,
        )
        .await?;
        for site in &result.sites {
            let head = site
                .result
                .as_ref()
                .and_then(|result| result.audit_head.as_ref())
                .expect("every answer carries the node's signed audit head");
            assert!(fedq_proto::audit_head::AuditHead::verify(head).is_ok());
        }
    }
    // A request the node refuses is audited too.
    let mut node = test.node_as_coordinator(0).await?;
    let mut unapproved = cohort_request(&test.alliance, "no-study", 0)?;
    unapproved.study = None;
    let status = node.run_query(unapproved).await.unwrap_err();
    assert_refused(
        &status,
        Code::InvalidArgument,
        RefusalCode::StudyMissing,
        "names no study",
    );

    let mut expert = test.coordinator_as(&test.alliance.users.expert).await?;
    let heads = expert
        .audit_heads(wire::AuditHeadsRequest {
            site_id: "site-a".into(),
            clear_pin: false,
            acknowledge: false,
        })
        .await?
        .into_inner()
        .heads;
    assert!(heads.len() >= 4, "{} heads kept", heads.len());
    // Study leads may not read them.
    let denied = lead
        .audit_heads(wire::AuditHeadsRequest {
            site_id: "site-a".into(),
            clear_pin: false,
            acknowledge: false,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let site_a = test.alliance.node_state_dir("site-a");
    let verified = verify_audit(&site_a, &heads)?;
    assert_eq!(verified.heads_checked, heads.len());
    let queries = audit_queries(&site_a)?;
    assert_eq!(queries.len(), 4);
    let released: Vec<_> = queries
        .iter()
        .filter(|query| query.outcome == Outcome::Released)
        .collect();
    assert_eq!(released.len(), 3);
    assert_eq!(
        released[1].parameters.get("min_iss").map(String::as_str),
        Some("16")
    );
    // The template's defaults are recorded as such: the record says what was computed.
    assert_eq!(
        released[1].parameters.get("from").map(String::as_str),
        Some("2019-01-01 (default)")
    );
    assert_eq!(released[1].requester, fedq_deploy::alliance::STUDY_LEAD);
    assert_eq!(
        released[1].study.as_ref().map(|study| study.id.as_str()),
        Some(fedq_deploy::alliance::STUDY_ID)
    );
    let refused = queries.last().expect("four records");
    assert_eq!(refused.outcome, Outcome::Refused);
    assert_eq!(
        refused
            .refusal
            .as_ref()
            .map(|refusal| refusal.code.as_str()),
        Some("REFUSAL_CODE_STUDY_MISSING")
    );
    test.alliance.stop().await?;

    // Cut the last record off: the chain alone still looks whole, the kept heads do not.
    let segment = fedq_node::audit::log::segments(&site_a.join("audit"))?
        .pop()
        .expect("a segment");
    let text = std::fs::read_to_string(&segment.path)?;
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&segment.path, lines.join("\n") + "\n")?;
    assert!(verify_audit(&site_a, &[]).is_ok());
    assert!(matches!(
        verify_audit(&site_a, &heads),
        Err(Problem::Truncated { .. })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_queries_leave_exactly_a_thousand_records_in_a_verifying_chain()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let node = test.node_as_coordinator(0).await?;
    let calls = (0..1000).map(|index| {
        let mut node = node.clone();
        let request = cohort_request(&test.alliance, &format!("concurrent-{index}"), index % 30);
        async move { node.run_query(request?).await.map_err(anyhow::Error::from) }
    });
    let outcomes = futures::future::join_all(calls).await;
    // Each is answered or, beyond the node's concurrency limit, refused as busy — and every
    // one of them, refused or not, leaves exactly one record.
    let mut answered = 0;
    for outcome in &outcomes {
        match outcome {
            Ok(_) => answered += 1,
            Err(err) => {
                let status = err.downcast_ref::<tonic::Status>().expect("a gRPC status");
                assert_eq!(fedq_tests::refusal_of(status), RefusalCode::SiteBusy);
            }
        }
    }
    assert!(answered > 0);
    let site_a = test.alliance.node_state_dir("site-a");
    let queries = audit_queries(&site_a)?;
    assert_eq!(queries.len(), 1000);
    let mut ids: Vec<&str> = queries
        .iter()
        .map(|query| query.request_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "each request has its own record");
    verify_audit(&site_a, &[])?;
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_write_its_audit_log_refuses_and_releases_nothing() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    let (config, state) = node_config_with_own_state(&test)?;
    // Every file the node writes is capped at 64 KiB: the record-number dictionary (16 bytes
    // per record) fits, so do some dozens of audit records; then appends fail. The queries are
    // identical, so the overlap memory does not grow.
    let process = NodeProcess::start(NODE_PROGRAM, &config, Some(64 * 1024))?;
    let mut node = process.client(&test).await?;
    let mut answered = 0;
    let mut refusal = None;
    for index in 0..400 {
        match node
            .run_query(cohort_request(&test.alliance, &format!("full-{index}"), 0)?)
            .await
        {
            Ok(_) => answered += 1,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let status = refusal.expect("the log fills up within 400 queries");
    assert!(answered > 0, "the first queries fit");
    assert_refused(
        &status,
        Code::Unavailable,
        RefusalCode::AuditUnavailable,
        "cannot write its audit log",
    );
    // It stays closed: the next query is refused as well.
    let again = node
        .run_query(cohort_request(&test.alliance, "full-again", 0)?)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Unavailable);
    process.kill()?;
    // The failed appends were cut back: the chain verifies and holds exactly the answered
    // queries.
    verify_audit(&state, &[])?;
    let queries = audit_queries(&state)?;
    assert_eq!(queries.len(), answered);
    assert!(
        queries
            .iter()
            .all(|query| query.outcome == Outcome::Released)
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_keeps_every_answered_query_in_a_log_that_verifies()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (config, state) = node_config_with_own_state(&test)?;
    let process = NodeProcess::start(NODE_PROGRAM, &config, None)?;
    let node = process.client(&test).await?;
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let mut node = node.clone();
            let answered = std::sync::Arc::clone(&answered);
            let requests: Vec<wire::QueryRequest> = (0..10_000)
                .map(|index| cohort_request(&test.alliance, &format!("load-{worker}-{index}"), 0))
                .take(400)
                .collect::<Result<_, _>>()
                .expect("requests build");
            tokio::spawn(async move {
                for request in requests {
                    let id = request.request_id.clone();
                    match node.run_query(request).await {
                        Ok(_) => answered.lock().expect("not poisoned").push(id),
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    // Kill once a good number of queries were answered, while the rest are in flight.
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if answered.lock().expect("not poisoned").len() >= 150 {
            break;
        }
    }
    process.kill()?;
    for worker in workers {
        worker.await?;
    }
    let seen = answered.lock().expect("not poisoned").clone();
    assert!(seen.len() >= 150);

    // Restart on the same state: the log verifies and has every answered query.
    let restarted = NodeProcess::start(NODE_PROGRAM, &config, None)?;
    let mut node = restarted.client(&test).await?;
    node.run_query(cohort_request(&test.alliance, "after-restart", 0)?)
        .await?;
    verify_audit(&state, &[])?;
    let recorded: std::collections::BTreeSet<String> = audit_queries(&state)?
        .into_iter()
        .map(|query| query.request_id)
        .collect();
    for id in &seen {
        assert!(
            recorded.contains(id),
            "answered query {id} is not in the log"
        );
    }
    assert!(recorded.contains("after-restart"));
    restarted.kill()?;

    // The command an auditor runs agrees, and names a record edited afterwards.
    let verify = |state: &std::path::Path| {
        std::process::Command::new(NODE_PROGRAM)
            .args(["audit", "verify", "--state-dir"])
            .arg(state)
            .output()
    };
    let passed = verify(&state)?;
    assert!(
        passed.status.success(),
        "{}",
        String::from_utf8_lossy(&passed.stdout)
    );
    let segment = fedq_node::audit::log::segments(&state.join("audit"))?
        .pop()
        .expect("a segment");
    let text = std::fs::read_to_string(&segment.path)?;
    let edited = text.replacen("\"load-", "\"lOad-", 1);
    assert_ne!(edited, text);
    std::fs::write(&segment.path, edited)?;
    let failed = verify(&state)?;
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("FAIL record #") && stdout.contains("was edited"),
        "{stdout}"
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_credits_sites_with_released_cells_only_and_only_for_the_leads_studies()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut lead = test.coordinator().await?;
    let mut expected: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for min_iss in [0, 25] {
        let result = query(
            &mut lead,
            "cohort-by-age-sex",
            vec![integer("min_iss", min_iss)],
            0,
        )
        .await?;
        for site in &result.sites {
            let released: Vec<u64> = site
                .result
                .iter()
                .flat_map(|result| &result.cells)
                .filter_map(|cell| match &cell.outcome {
                    Some(wire::cell::Outcome::Released(released)) => Some(released.count),
                    _ => None,
                })
                .collect();
            let entry = expected.entry(site.site_id.clone()).or_default();
            entry.0 += released.len() as u64;
            entry.1 += released.iter().sum::<u64>();
        }
    }
    let entries = lead
        .ledger(wire::LedgerRequest::default())
        .await?
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 3);
    for entry in &entries {
        assert_eq!(entry.study_id, fedq_deploy::alliance::STUDY_ID);
        assert_eq!(entry.queries_answered, 2);
        assert_eq!(
            (entry.cells_released, entry.records_contributed),
            expected[&entry.site_id],
            "site {}",
            entry.site_id
        );
    }
    // The small site withheld cells: its credit is below its true total.
    let small = entries
        .iter()
        .find(|entry| entry.site_id == "site-c")
        .expect("site-c");
    assert!(small.cells_released < 2 * 21, "site-c released every cell");
    let denied = lead
        .ledger(wire::LedgerRequest {
            study_id: "someone-elses-study".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_register_names_study_and_templates_and_carries_no_parameter_values()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut lead = test.coordinator().await?;
    for _ in 0..2 {
        query(
            &mut lead,
            "cohort-by-age-sex",
            vec![integer("min_iss", 37)],
            0,
        )
        .await?;
    }
    let register = lead
        .transparency_register(wire::AllianceRegisterRequest {})
        .await?
        .into_inner();
    assert!(
        register.unavailable.is_empty(),
        "{:?}",
        register.unavailable
    );
    assert_eq!(register.sites.len(), 3);
    for site in &register.sites {
        assert_eq!(site.studies.len(), 1);
        let study = &site.studies[0];
        assert_eq!(study.study_id, fedq_deploy::alliance::STUDY_ID);
        assert!(!study.purpose.is_empty() && !study.ethics_reference.is_empty());
        assert_eq!(study.queries_per_month.len(), 1);
        assert_eq!(study.queries_per_month[0].queries, 2);
        assert_eq!(
            study.templates_used,
            vec!["Trauma admissions by age band and sex".to_string()]
        );
        let published = format!("{:?}", site.studies);
        assert!(!published.contains("37"), "{published}");
        assert!(!published.contains("min_iss"), "{published}");
    }
    let page = fedq_proto::register::to_html("Register", &register.generated_at, &register.sites);
    assert!(!page.contains("min_iss") && !page.contains(">37<"));
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_queries_in_flight_finish_with_their_audit_records_and_exits_zero()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (config, state) = node_config_with_own_state(&test)?;
    let process = NodeProcess::start(NODE_PROGRAM, &config, None)?;
    let node = process.client(&test).await?;
    let first_answer = std::sync::Arc::new(tokio::sync::Notify::new());
    let calls: Vec<_> = (0..200)
        .map(|index| {
            let mut node = node.clone();
            let first_answer = std::sync::Arc::clone(&first_answer);
            let request = cohort_request(&test.alliance, &format!("term-{index}"), index % 20);
            tokio::spawn(async move {
                let request = request?;
                let id = request.request_id.clone();
                let answered = node.run_query(request).await.is_ok();
                if answered {
                    first_answer.notify_one();
                }
                Ok::<_, anyhow::Error>((id, answered, std::time::Instant::now()))
            })
        })
        .collect();
    // Terminate as soon as the first answer is back: most queries are still in flight.
    first_answer.notified().await;
    let signalled = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || process.terminate()).await??;
    assert!(status.success(), "the node exited with {status}");
    let mut answered = Vec::new();
    let mut after_signal = 0;
    for call in calls {
        let (id, ok, at) = call.await??;
        if ok {
            answered.push(id);
            after_signal += usize::from(at > signalled);
        }
    }
    assert!(after_signal > 0, "no query in flight at SIGTERM completed");
    verify_audit(&state, &[])?;
    let recorded: std::collections::BTreeSet<String> = audit_queries(&state)?
        .into_iter()
        .map(|query| query.request_id)
        .collect();
    for id in &answered {
        assert!(
            recorded.contains(id),
            "answered query {id} has no audit record"
        );
    }
    test.alliance.stop().await
}

/// Copies a folder tree (a node's state directory, as a backup would).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn status_of_site(result: &wire::PooledResult, site_id: &str) -> (i32, String) {
    let site = result
        .sites
        .iter()
        .find(|site| site.site_id == site_id)
        .expect("the site is listed");
    (site.status, site.message.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_an_older_backup_is_held_until_an_administrator_acknowledges()
-> anyhow::Result<()> {
    let mut test = TestAlliance::start().await?;
    let mut lead = test.coordinator().await?;
    let state = test.alliance.node_state_dir("site-a");
    let backup = test.dir.path().join("site-a-backup");
    copy_tree(&state, &backup)?;
    for min_iss in [0, 16] {
        query(
            &mut lead,
            "cohort-by-age-sex",
            vec![integer("min_iss", min_iss)],
            0,
        )
        .await?;
    }
    // The site restores last week's backup (rolling back its audit log, privacy budgets and
    // overlap memory) and restarts where the coordinator expects it.
    let (_, node) = test.alliance.nodes.remove(0);
    let port = node.address.port();
    node.stop().await?;
    std::fs::remove_dir_all(&state)?;
    copy_tree(&backup, &state)?;
    let restarted =
        fedq_deploy::alliance::start_node_on(&test.alliance.node_configs[0], port).await?;

    // Its first answer shows the log went back: nothing of it is released.
    let first = query(&mut lead, "cohort-by-age-sex", vec![], 0).await?;
    let (status, message) = status_of_site(&first, "site-a");
    assert_eq!(status, wire::SiteStatus::Failed as i32, "{message}");
    assert!(message.contains("is held"), "{message}");
    assert!(
        first
            .sites
            .iter()
            .any(|site| site.site_id == "site-a" && site.result.is_none())
    );
    // From then on it is not even asked.
    let second = query(
        &mut lead,
        "cohort-by-age-sex",
        vec![integer("min_iss", 9)],
        0,
    )
    .await?;
    let (_, message) = status_of_site(&second, "site-a");
    assert!(
        message.starts_with("not asked: site site-a is held"),
        "{message}"
    );

    // Only an administrator lifts the hold.
    let mut expert = test.coordinator_as(&test.alliance.users.expert).await?;
    let lift = wire::AuditHeadsRequest {
        site_id: "site-a".into(),
        clear_pin: false,
        acknowledge: true,
    };
    let denied = expert.audit_heads(lift.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut administrator = test
        .coordinator_as(&test.alliance.users.administrator)
        .await?;
    let answer = administrator.audit_heads(lift).await?.into_inner();
    assert!(
        answer
            .events
            .iter()
            // Shorter than before, or (once it appended again) two hashes for one record.
            .any(|event| event.contains("went back") || event.contains("rewritten")),
        "{:?}",
        answer.events
    );
    let third = query(
        &mut lead,
        "cohort-by-age-sex",
        vec![integer("min_iss", 20)],
        0,
    )
    .await?;
    let (status, message) = status_of_site(&third, "site-a");
    assert_eq!(status, wire::SiteStatus::Ok as i32, "{message}");
    restarted.stop().await?;
    test.alliance.stop().await
}
