//! The main job: a local alliance of three hospitals (about 200k, 50k and 2k admissions) on
//! loopback, a few showcase questions asked the way a study lead asks them, readable tables
//! with per-site columns, pooled values and suppression marks, and one refused request.

use std::io::Write;
use std::path::Path;

use fedq_coordinator::{client, quality, render};
use fedq_proto::convert::parameter_to_wire;
use fedq_proto::template::Value;
use fedq_proto::wire;

use crate::alliance::{LocalAlliance, STUDY_ID, bundled_templates};
use crate::synth::SiteProfile;

/// One showcase question.
struct Showcase {
    template: &'static str,
    parameters: Vec<(&'static str, Value)>,
}

fn showcases() -> Vec<Showcase> {
    vec![
        Showcase {
            template: "cohort-by-age-sex",
            parameters: vec![("min_iss", Value::Integer(0))],
        },
        Showcase {
            template: "deaths-by-mechanism",
            parameters: vec![("min_iss", Value::Integer(16))],
        },
        Showcase {
            template: "elderly-major-trauma-deaths",
            parameters: Vec::new(),
        },
        Showcase {
            template: "length-of-stay-by-severity",
            parameters: Vec::new(),
        },
        Showcase {
            template: "systolic-pressure-distribution",
            parameters: vec![("min_iss", Value::Integer(16))],
        },
        Showcase {
            template: "icu-death-odds",
            parameters: Vec::new(),
        },
        Showcase {
            template: "survival-after-admission",
            parameters: vec![("min_iss", Value::Integer(16))],
        },
        Showcase {
            template: "death-risk-regression",
            parameters: Vec::new(),
        },
    ]
}

/// The demo's small rural hospital allows no inbound connections: its node dials the
/// coordinator (outbound-only mode); the other two listen.
const OUTBOUND_SITES: &[&str] = &["site-c"];

/// Runs the demo under `out` (recreated) with sites scaled by `scale`, writing to `output`.
pub async fn run(out: &Path, scale: f64, output: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    let sites = SiteProfile::demo_sites(scale);
    writeln!(
        output,
        "fedq demo: starting a local alliance in {}",
        out.display()
    )?;
    for site in &sites {
        let reach = if OUTBOUND_SITES.contains(&site.site_id.as_str()) {
            "dials the coordinator: outbound-only, behind its firewall"
        } else {
            "listens for the coordinator"
        };
        writeln!(
            output,
            "  {}: {} synthetic admissions ({}); its node {reach}",
            site.site_id,
            site.admissions,
            site.file_name()
        )?;
    }
    let alliance =
        LocalAlliance::start(out, &sites, OUTBOUND_SITES, &bundled_templates(), 10, 0).await?;
    writeln!(
        output,
        "  nodes and coordinator are serving over mutual TLS; coordinator at {}\n",
        alliance.coordinator_url()
    )?;
    let mut coordinator = client::connect(
        &alliance.coordinator_url(),
        &alliance.pki.ca_cert,
        &alliance.users.study_lead,
    )
    .await?;

    for showcase in showcases() {
        let detail = coordinator
            .get_template(wire::GetTemplateRequest {
                id: showcase.template.to_string(),
            })
            .await?
            .into_inner();
        let parameters = showcase
            .parameters
            .iter()
            .map(|(name, value)| parameter_to_wire(name, value))
            .collect();
        let request = wire::RunQueryRequest {
            study_id: STUDY_ID.into(),
            template_id: showcase.template.to_string(),
            parameters,
            deadline_ms: 0,
        };
        let result = client::run_query(&mut coordinator, request, |_| {}).await?;
        let title = detail
            .summary
            .map(|summary| summary.title)
            .unwrap_or_default();
        writeln!(output, "{}", "=".repeat(78))?;
        write!(output, "{}", render::table(&title, &result))?;
        writeln!(output)?;
    }

    writeln!(output, "{}", "=".repeat(78))?;
    writeln!(
        output,
        "Data quality (`fedq quality`: the standing profile template, thresholded like any query):\n"
    )?;
    let standard = coordinator
        .quality_standard(wire::QualityStandardRequest {})
        .await?
        .into_inner();
    let profile = wire::RunQueryRequest {
        study_id: standard.study_id.clone(),
        template_id: standard.template_id.clone(),
        parameters: Vec::new(),
        deadline_ms: 0,
    };
    let profiled = client::run_query(&mut coordinator, profile, |_| {}).await?;
    write!(output, "{}", quality::render(&profiled, &standard))?;
    writeln!(output)?;

    writeln!(output, "{}", "=".repeat(78))?;
    let refusal = |template: &str, parameters: Vec<wire::ParameterValue>| wire::RunQueryRequest {
        study_id: STUDY_ID.into(),
        template_id: template.into(),
        parameters,
        deadline_ms: 0,
    };
    writeln!(output, "Refusals:")?;
    writeln!(
        output,
        "- a request outside the template's approved limits, before any site is asked:"
    )?;
    let out_of_limits = refusal(
        "elderly-major-trauma-deaths",
        vec![parameter_to_wire("min_age", &Value::Integer(30))],
    );
    match client::run_query(&mut coordinator, out_of_limits, |_| {}).await {
        Err(err) => writeln!(output, "  {err}")?,
        Ok(_) => anyhow::bail!("the out-of-limits request was not refused"),
    }
    writeln!(
        output,
        "- an alliance expert (not the study's lead) trying to query under the study:"
    )?;
    let mut expert = client::connect(
        &alliance.coordinator_url(),
        &alliance.pki.ca_cert,
        &alliance.users.expert,
    )
    .await?;
    match client::run_query(
        &mut expert,
        refusal("cohort-by-age-sex", Vec::new()),
        |_| {},
    )
    .await
    {
        Err(err) => writeln!(output, "  {err}\n")?,
        Ok(_) => anyhow::bail!("the expert's query was not refused"),
    }

    writeln!(output, "{}", "=".repeat(78))?;
    writeln!(
        output,
        "Contribution ledger (fedq ledger): records each site contributed to released cells\n"
    )?;
    let ledger = client::reply(coordinator.ledger(wire::LedgerRequest::default()).await)?;
    write!(output, "{}", render::ledger(&ledger.entries))?;
    let mut heads = Vec::new();
    for (site_id, _) in &alliance.nodes {
        let kept = client::reply(
            expert
                .audit_heads(wire::AuditHeadsRequest {
                    site_id: site_id.clone(),
                    clear_pin: false,
                    acknowledge: false,
                })
                .await,
        )?;
        heads.push((site_id.clone(), kept.heads));
    }
    let state_dirs: Vec<_> = heads
        .iter()
        .map(|(site_id, _)| alliance.node_state_dir(site_id))
        .collect();
    alliance.stop().await?;
    writeln!(
        output,
        "\nAudit logs (fedq-node audit verify --heads): each node's hash chain against the signed heads the coordinator kept"
    )?;
    for ((site_id, kept), state_dir) in heads.iter().zip(&state_dirs) {
        let verified = fedq_node::audit::verify::verify(
            &state_dir.join(fedq_node::audit::log::AUDIT_DIR),
            fedq_node::audit::verify::Expected {
                own_key_id: None,
                site_id: Some(site_id),
                heads: kept,
            },
        )
        .map_err(|problem| anyhow::anyhow!("{site_id}: {problem}"))?;
        writeln!(
            output,
            "  {site_id}: {} records, chain intact, agrees with {} published heads",
            verified.last_seq, verified.heads_checked
        )?;
    }
    writeln!(output)?;
    writeln!(
        output,
        "fedq demo: done; the alliance has stopped. Certificates, data and configs remain in {}",
        out.display()
    )?;
    Ok(())
}

/// Starts the demo alliance under `out` (recreated) and keeps it serving until Ctrl-C or
/// SIGTERM, so the `fedq` command line can be tried against it.
pub async fn up(
    out: &Path,
    scale: f64,
    coordinator_port: u16,
    output: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    let sites = SiteProfile::demo_sites(scale);
    let alliance = LocalAlliance::start(
        out,
        &sites,
        OUTBOUND_SITES,
        &bundled_templates(),
        10,
        coordinator_port,
    )
    .await?;
    writeln!(
        output,
        "fedq local alliance is up: {} sites, coordinator at {}",
        sites.len(),
        alliance.coordinator_url()
    )?;
    writeln!(output, "try, in another terminal:")?;
    writeln!(
        output,
        "  export FEDQ_COORDINATOR={} FEDQ_CA_CERT={} FEDQ_STUDY={STUDY_ID} FEDQ_TOKEN={}",
        alliance.coordinator_url(),
        alliance.pki.ca_cert.display(),
        alliance.users.study_lead
    )?;
    writeln!(
        output,
        "  cargo run --release -p fedq-coordinator --bin fedq -- templates list"
    )?;
    writeln!(
        output,
        "  cargo run --release -p fedq-coordinator --bin fedq -- query deaths-by-mechanism -p min_iss=25 -p mechanisms=fall,assault"
    )?;
    writeln!(
        output,
        "the expert {} (reads catalogue, sites and audit heads; runs no queries) has the token\n  {}",
        crate::alliance::EXPERTS[0].0,
        alliance.users.expert
    )?;
    writeln!(
        output,
        "the administrator ({}) has the token\n  {}",
        crate::alliance::ADMINISTRATOR,
        alliance.users.administrator
    )?;
    writeln!(
        output,
        "each node's state directory (audit log, audit key, overlap memory) is {}",
        alliance.node_state_dir("<site>").display()
    )?;
    writeln!(output, "stop with Ctrl-C")?;
    output.flush()?;
    fedq_proto::process::shutdown_signal().await;
    alliance.stop().await?;
    writeln!(output, "fedq local alliance stopped")?;
    Ok(())
}
