//! Benchmark (not a test): a three-strata count over a large synthetic dataset at one node,
//! end to end through gRPC and mutual TLS, against the same polars plan run directly on the
//! same in-memory snapshot (prints both medians and their ratio); then audited throughput:
//! many concurrent count queries over a small dataset, each with its own durable audit record
//! (prints queries per second and checks the audit chain afterwards).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fedq_node::config::NodeConfig;
use fedq_node::plan;
use fedq_node::query::load_snapshots;
use fedq_proto::study::{PinnedTemplate, Study};
use fedq_proto::template::Template;
use fedq_proto::wire;

use crate::alliance::{
    COORDINATOR_IDENTITY, NodeFiles, site_identity, start_node, write_node_config,
};
use crate::synth::{self, LocalFormat, SiteProfile};

const BENCH_TEMPLATE: &str = r#"
id = "bench-age-sex-mechanism"
version = 1
title = "Admissions by age band, sex and mechanism"
description = "Benchmark: a three-strata count over every admission with ISS >= min_iss."
data_model = "fedq-trauma/1"
dataset = "trauma_admissions"
[statistic]
kind = "count"
[[parameters]]
name = "min_iss"
type = "integer"
min = 0
max = 75
[filter]
column = "iss"
op = ">="
param = "min_iss"
[[strata]]
column = "age"
bands = [
  { label = "0-17", below = 18 },
  { label = "18-39", at_least = 18, below = 40 },
  { label = "40-64", at_least = 40, below = 65 },
  { label = "65+", at_least = 65 },
]
[[strata]]
column = "sex"
[[strata]]
column = "injury_mechanism"
"#;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Runs the benchmark in `out` (recreated) over `rows` admissions, `iterations` times each.
pub async fn run(
    out: &Path,
    rows: usize,
    iterations: usize,
    output: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    // Configuration files resolve relative paths against their own folder.
    let out = &out.canonicalize()?;
    let site = SiteProfile {
        site_id: "bench".into(),
        admissions: rows,
        seed: 7,
        elderly_share: 0.3,
        mechanism_weights: [0.3, 0.4, 0.15, 0.05, 0.1],
        severity_shift: 2.0,
        format: LocalFormat::ModelLikeParquet,
    };
    writeln!(output, "generating {rows} admissions ...")?;
    let data_file = {
        let (site, out) = (site.clone(), out.to_path_buf());
        tokio::task::spawn_blocking(move || synth::write_site(&site, &out)).await??
    };
    let identity = site_identity(&site.site_id);
    let pki = fedq_coordinator::certs::create_dev_pki(
        &out.join("certs"),
        "bench CA",
        &[COORDINATOR_IDENTITY.into(), identity.clone()],
    )?;
    let expert = fedq_proto::signing::ExpertSecretKey::generate("benchmark expert");
    let expert_public = out.join("expert.pub");
    std::fs::write(&expert_public, expert.public().to_toml())?;
    let config_path = write_node_config(
        out,
        &NodeFiles {
            site_id: &site.site_id,
            data_file: &data_file,
            format: site.format,
            ca_cert: &pki.ca_cert,
            cert: &pki.identities[1].cert,
            key: &pki.identities[1].key,
            accepted_coordinators: &[COORDINATOR_IDENTITY],
            min_cell_count: 10,
            trusted_expert_keys: &[expert_public],
            signature_quorum: 1,
            accepted_studies: &["bench"],
        },
    )?;

    // The direct plan: the same snapshot type and plan the node runs, without gRPC.
    let config = NodeConfig::load(&config_path)?;
    let (snapshots, _) = load_snapshots(&config, &fedq_node::records::NodeSecret::ephemeral())?;
    let snapshot = snapshots.values().next().context("snapshot")?;
    let template = Template::from_toml(BENCH_TEMPLATE, "bench template")?;
    let checked = template.check(&config.data_model, &BTreeSet::new())?;
    let query = checked.bind(&[("min_iss".into(), fedq_proto::template::Value::Integer(0))])?;
    let mut direct = Vec::new();
    for _ in 0..iterations {
        let started = Instant::now();
        let table = plan::count_grid(&query, &checked.axes, snapshot)?;
        direct.push(started.elapsed());
        anyhow::ensure!(
            table.total() == rows as u64,
            "direct plan counted {} of {rows}",
            table.total()
        );
    }

    // End to end: a real node over mutual TLS.
    let node = start_node(&config_path).await?;
    let address = format!("https://localhost:{}", node.address.port());
    let coordinator = &pki.identities[0];
    let mut client = crate::node_client(
        &address,
        &pki.ca_cert,
        Some((&coordinator.cert, &coordinator.key)),
        &identity,
    )
    .await?;
    let study = Study {
        id: "bench".into(),
        title: "Benchmark".into(),
        purpose: "Measures query speed on synthetic data.".into(),
        lead_institution: "fedq".into(),
        study_lead: "benchmark".into(),
        ethics_reference: "none (synthetic data)".into(),
        templates: vec![PinnedTemplate::of(&template)],
        sites: vec![site.site_id.clone()],
        valid_from: "2000-01-01".into(),
        valid_until: "2099-12-31".into(),
        max_queries_per_day: u32::MAX,
    };
    let study_signature = expert.sign(fedq_proto::study::DOCUMENT_KIND, &study.canonical_bytes());
    let request = wire::QueryRequest {
        study: Some(fedq_proto::document::study_document(
            &study,
            vec![study_signature],
        )),
        request_id: "bench".into(),
        template: Some(fedq_proto::document::template_document(
            &template,
            vec![expert.sign(
                fedq_proto::template::DOCUMENT_KIND,
                &template.canonical_bytes(),
            )],
        )),
        parameters: vec![fedq_proto::convert::parameter_to_wire(
            "min_iss",
            &fedq_proto::template::Value::Integer(0),
        )],
        requester: "benchmark".into(),
    };
    let mut end_to_end = Vec::new();
    for _ in 0..iterations {
        let started = Instant::now();
        let answer = client.run_query(request.clone()).await?.into_inner();
        end_to_end.push(started.elapsed());
        anyhow::ensure!(
            answer.cells.len()
                == checked
                    .axes
                    .iter()
                    .map(|axis| axis.levels.len())
                    .product::<usize>()
        );
    }
    node.stop().await?;
    let throughput = audited_throughput(out, &pki, &config_path, &request, iterations * 50).await?;

    let direct = median(direct);
    let end_to_end = median(end_to_end);
    writeln!(
        output,
        "\nthree-strata count (age band x sex x mechanism = {} cells), {rows} rows, median of {iterations}:",
        checked
            .axes
            .iter()
            .map(|axis| axis.levels.len())
            .product::<usize>()
    )?;
    writeln!(
        output,
        "  {:<34} {:>10.2} ms",
        "polars plan, direct",
        direct.as_secs_f64() * 1e3
    )?;
    writeln!(
        output,
        "  {:<34} {:>10.2} ms",
        "node end to end (gRPC + mTLS)",
        end_to_end.as_secs_f64() * 1e3
    )?;
    writeln!(
        output,
        "  {:<34} {:>10.2} x   (target <= 1.5 x)",
        "ratio",
        end_to_end.as_secs_f64() / direct.as_secs_f64()
    )?;
    writeln!(
        output,
        "\naudited count queries, {} concurrent clients, {THROUGHPUT_ROWS} rows, each query fsynced to the audit log before its reply:",
        THROUGHPUT_CLIENTS
    )?;
    writeln!(
        output,
        "  {:<34} {:>10}",
        "queries answered", throughput.queries
    )?;
    writeln!(
        output,
        "  {:<34} {:>10.0} q/s (target >= 500 q/s)",
        "audited throughput",
        throughput.queries as f64 / throughput.elapsed.as_secs_f64()
    )?;
    writeln!(
        output,
        "  {:<34} {:>10}",
        "audit chain after the run", "verified"
    )?;
    Ok(())
}

const THROUGHPUT_ROWS: usize = 2_000;
const THROUGHPUT_CLIENTS: usize = 32;

struct Throughput {
    queries: usize,
    elapsed: Duration,
}

/// Runs `queries` distinct count queries from [`THROUGHPUT_CLIENTS`] concurrent clients at a
/// node over a small dataset (so the audit path, not the scan, is what is measured), then
/// verifies the node's audit chain.
async fn audited_throughput(
    out: &Path,
    pki: &fedq_coordinator::certs::DevPki,
    bench_config: &Path,
    request: &wire::QueryRequest,
    queries: usize,
) -> anyhow::Result<Throughput> {
    let folder = out.join("throughput");
    std::fs::create_dir_all(&folder)?;
    let site = SiteProfile {
        site_id: "bench".into(),
        admissions: THROUGHPUT_ROWS,
        seed: 11,
        elderly_share: 0.3,
        mechanism_weights: [0.3, 0.4, 0.15, 0.05, 0.1],
        severity_shift: 2.0,
        format: LocalFormat::ModelLikeParquet,
    };
    let data_file = {
        let (site, folder) = (site.clone(), folder.clone());
        tokio::task::spawn_blocking(move || synth::write_site(&site, &folder)).await??
    };
    // The benchmark node's configuration over the small file, with its own state directory.
    let text = std::fs::read_to_string(bench_config)?;
    let config = NodeConfig::load(bench_config)?;
    let state = folder.join("state");
    let small = text
        .replace(
            &config.datasets[0].path.display().to_string(),
            &data_file.display().to_string(),
        )
        .replace(
            &config.state_dir.display().to_string(),
            &state.display().to_string(),
        );
    let config_path = folder.join("node.toml");
    std::fs::write(&config_path, small)?;
    let node = start_node(&config_path).await?;
    let client = crate::node_client(
        &format!("https://localhost:{}", node.address.port()),
        &pki.ca_cert,
        Some((&pki.identities[0].cert, &pki.identities[0].key)),
        &site_identity("bench"),
    )
    .await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..THROUGHPUT_CLIENTS)
        .map(|_| {
            let (mut client, next, request) = (client.clone(), next.clone(), request.clone());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if index >= queries {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let mut request = request.clone();
                    request.request_id = format!("throughput-{index}");
                    client.run_query(request).await?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let elapsed = started.elapsed();
    node.stop().await?;
    let records = fedq_node::audit::verify::verify(
        &state.join("audit"),
        fedq_node::audit::verify::Expected::default(),
    )?;
    anyhow::ensure!(
        records.last_seq as usize > queries,
        "the audit log holds {} records for {queries} queries",
        records.last_seq
    );
    Ok(Throughput { queries, elapsed })
}
