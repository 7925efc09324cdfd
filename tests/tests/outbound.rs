//! Outbound-only nodes: a node that dials the coordinator's tunnel port (real TCP, mutual TLS,
//! the node serving gRPC over the connection it opened) answers exactly like a listening node;
//! it dials again after a restart; a connection presenting the certificate of a site that is
//! not configured as outbound is not taken for one.

use std::time::{Duration, Instant};

use fedq_deploy::alliance;
use fedq_proto::wire::{self, SiteStatus};
use fedq_tests::{TestAlliance, integer, query, small_sites};

/// The queries both alliances answer: one table with small cells at site-c, a filtered one,
/// and one with a list parameter.
fn questions() -> Vec<(&'static str, Vec<wire::ParameterValue>)> {
    vec![
        ("cohort-by-age-sex", vec![integer("min_iss", 16)]),
        ("cohort-by-age-sex", vec![integer("min_iss", 1)]),
        ("deaths-by-mechanism", vec![integer("min_iss", 9)]),
    ]
}

/// What a study lead reads, without what legitimately differs between two alliances (query
/// ids, timings, each node's keyed snapshot version and audit head).
fn readable(result: &wire::PooledResult) -> String {
    let sites: Vec<String> = result
        .sites
        .iter()
        .map(|site| {
            let answer = site.result.as_ref().map(|answer| {
                (
                    &answer.axes,
                    &answer.cells,
                    &answer.total,
                    &answer.mechanisms,
                    answer.applied_min_cell_count,
                )
            });
            format!(
                "{} {:?} {:?} {:?}",
                site.site_id, site.status, site.message, answer
            )
        })
        .collect();
    format!(
        "{:?}\n{:?}\n{:?}\n{}",
        result.axes,
        result.cells,
        result.total,
        sites.join("\n")
    )
}

fn site<'a>(result: &'a wire::PooledResult, site_id: &str) -> &'a wire::SiteProgress {
    result
        .sites
        .iter()
        .find(|site| site.site_id == site_id)
        .expect("every configured site has a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alliance_with_an_outbound_node_answers_exactly_like_one_with_listening_nodes()
-> anyhow::Result<()> {
    let listening = TestAlliance::start_with(small_sites()).await?;
    let mixed = TestAlliance::start_with_outbound(small_sites(), &["site-c"]).await?;
    let config = std::fs::read_to_string(&mixed.alliance.node_configs[2])?;
    assert!(
        config.contains("[outbound]") && !config.contains("listen ="),
        "site-c must not listen:\n{config}"
    );
    let mut to_listening = listening.coordinator().await?;
    let mut to_mixed = mixed.coordinator().await?;
    for (template, parameters) in questions() {
        let expected = query(&mut to_listening, template, parameters.clone(), 10_000).await?;
        let answered = query(&mut to_mixed, template, parameters, 10_000).await?;
        assert_eq!(
            site(&answered, "site-c").status,
            SiteStatus::Ok as i32,
            "{answered:?}"
        );
        // The outbound node's answer carries its signed audit head like any other.
        assert!(
            site(&answered, "site-c")
                .result
                .as_ref()
                .and_then(|answer| answer.audit_head.as_ref())
                .is_some()
        );
        assert_eq!(readable(&answered), readable(&expected), "{template}");
    }
    // site-c's small cells were withheld over the tunnel as over a listening connection.
    let (template, parameters) = questions().remove(0);
    let answered = query(&mut to_mixed, template, parameters, 10_000).await?;
    let site_c = site(&answered, "site-c").result.as_ref().unwrap();
    assert!(
        site_c
            .cells
            .iter()
            .any(|cell| matches!(cell.outcome, Some(wire::cell::Outcome::Withheld(_)))),
        "{site_c:?}"
    );
    mixed.alliance.stop().await?;
    listening.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_outbound_node_is_marked_unreachable_and_answers_again_after_it_dials_in()
-> anyhow::Result<()> {
    let mut mixed = TestAlliance::start_with_outbound(small_sites(), &["site-c"]).await?;
    let mut coordinator = mixed.coordinator().await?;
    let (template, parameters) = questions().remove(0);
    let first = query(&mut coordinator, template, parameters.clone(), 10_000).await?;
    assert_eq!(site(&first, "site-c").status, SiteStatus::Ok as i32);

    let (site_id, node) = mixed.alliance.nodes.remove(2);
    assert_eq!(site_id, "site-c");
    node.stop().await?;
    let started = Instant::now();
    let down = query(&mut coordinator, template, parameters.clone(), 10_000).await?;
    assert!(started.elapsed() < Duration::from_secs(10));
    let site_c = site(&down, "site-c");
    assert_eq!(site_c.status, SiteStatus::Unreachable as i32, "{site_c:?}");
    assert!(
        site_c
            .message
            .contains("connects outbound and has no connection open"),
        "{}",
        site_c.message
    );
    assert_eq!(site(&down, "site-a").status, SiteStatus::Ok as i32);

    let restarted = alliance::start_node(&mixed.alliance.node_configs[2]).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = query(&mut coordinator, template, parameters.clone(), 10_000).await?;
        if site(&again, "site-c").status == SiteStatus::Ok as i32 {
            assert_eq!(readable(&again), readable(&first));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node never answered: {again:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    restarted.stop().await?;
    mixed.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dialling_with_another_sites_certificate_is_not_taken_for_an_outbound_site()
-> anyhow::Result<()> {
    let mut mixed = TestAlliance::start_with_outbound(small_sites(), &["site-c"]).await?;
    let (_, site_c) = mixed.alliance.nodes.remove(2);
    site_c.stop().await?;
    // site-a's own node (a listening site) dials the tunnel with its certificate.
    let tunnel = mixed.alliance.coordinator.tunnel.expect("a tunnel port");
    let config = std::fs::read_to_string(&mixed.alliance.node_configs[0])?;
    let state_line = config
        .lines()
        .find(|line| line.starts_with("state_dir"))
        .unwrap();
    let impostor = config
        .replace("listen = \"127.0.0.1:0\"\n", "")
        .replace(
            state_line,
            &format!(
                "state_dir = \"{}\"\n\n[outbound]\ncoordinator = \"localhost:{}\"\ncoordinator_identity = \"{}\"\n",
                mixed.dir.path().join("impostor-state").display(),
                tunnel.port(),
                alliance::COORDINATOR_IDENTITY
            ),
        );
    let path = mixed.dir.path().join("impostor.toml");
    std::fs::write(&path, impostor)?;
    let impostor = alliance::start_node(&path).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut coordinator = mixed.coordinator().await?;
    let (template, parameters) = questions().remove(0);
    let result = query(&mut coordinator, template, parameters, 10_000).await?;
    let site_c = site(&result, "site-c");
    assert_eq!(site_c.status, SiteStatus::Unreachable as i32, "{site_c:?}");
    assert_eq!(site(&result, "site-a").status, SiteStatus::Ok as i32);
    impostor.stop().await?;
    mixed.alliance.stop().await?;
    Ok(())
}
