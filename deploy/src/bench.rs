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
    COORDINATOR_IDENTITY, NodeFiles, Reach, site_identity, start_node, write_node_config,
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
    let site = bench_site(rows, 7);
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
            reach: Reach::Listen("127.0.0.1:0".into()),
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
        let table = plan::count_grid(&query, snapshot)?;
        direct.push(started.elapsed());
        anyhow::ensure!(
            table.total() == rows as u64,
            "direct plan counted {} of {rows}",
            table.total()
        );
    }

    let costs = mechanism_costs(&query, snapshot, iterations, out)?;

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
        differential_privacy: None,
    };
    let study_signature = expert.sign(fedq_proto::study::DOCUMENT_KIND, &study.canonical_bytes());
    let request = wire::QueryRequest {
        study: Some(fedq_proto::document::study_document(
            &study,
            vec![study_signature],
        )),
        request_id: "bench".into(),
        coefficients: Vec::new(),
        iteration: 0,
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
    let cells: usize = query.axes.iter().map(|axis| axis.levels.len()).product();
    // End to end: a real node over mutual TLS, as configured (overlap control on), and the
    // same node with overlap control off (its own state directory).
    let end_to_end =
        node_median(&config_path, &pki, &identity, &request, iterations, cells).await?;
    let plain_config = out.join("bench-without-overlap.toml");
    let text = std::fs::read_to_string(&config_path)?;
    std::fs::write(
        &plain_config,
        text.replace(
            &config.state_dir.display().to_string(),
            &out.join("state-without-overlap").display().to_string(),
        )
        .replacen(
            "[[datasets]]",
            "[privacy]\noverlap_control = false\n\n[[datasets]]",
            1,
        ),
    )?;
    let without_overlap =
        node_median(&plain_config, &pki, &identity, &request, iterations, cells).await?;
    let throughput = audited_throughput(out, &pki, &config_path, &request, iterations * 50).await?;

    let direct = median(direct);
    writeln!(
        output,
        "\nthree-strata count (age band x sex x mechanism = {} cells), {rows} rows, median of {iterations}:",
        cells
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
        without_overlap.as_secs_f64() * 1e3
    )?;
    writeln!(
        output,
        "  {:<34} {:>10.2} x   (target <= 1.5 x)",
        "ratio",
        without_overlap.as_secs_f64() / direct.as_secs_f64()
    )?;
    writeln!(
        output,
        "  {:<34} {:>10.2} ms   ({:.2} x the plan)",
        "same, with overlap control",
        end_to_end.as_secs_f64() * 1e3,
        end_to_end.as_secs_f64() / direct.as_secs_f64()
    )?;
    writeln!(
        output,
        "\ndisclosure mechanisms, each on its own, same query, median of {iterations}:"
    )?;
    for (name, time) in [
        ("threshold + complementary", Some(costs.suppression)),
        ("record sets per cell", costs.record_sets),
        (OVERLAP_CHECK_LABEL, Some(costs.overlap_check)),
        ("same, cells nested in an answer", Some(costs.nested_check)),
        ("rounding", Some(costs.rounding)),
        ("differential-privacy noise", Some(costs.noise)),
    ] {
        match time {
            Some(time) => writeln!(output, "  {name:<34} {:>10.3} ms", time.as_secs_f64() * 1e3)?,
            None => writeln!(output, "  {name:<34} {:>13}", "within noise")?,
        }
    }
    writeln!(
        output,
        "  {:<34} {:>10.2} ms   (target: below the scan, {:.2} ms)",
        "overlap control in all",
        (costs.record_sets.unwrap_or_default() + costs.overlap_check).as_secs_f64() * 1e3,
        direct.as_secs_f64() * 1e3
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

/// The median time of `iterations` runs of `request` at a node started from `config_path`.
async fn node_median(
    config_path: &Path,
    pki: &fedq_coordinator::certs::DevPki,
    identity: &str,
    request: &wire::QueryRequest,
    iterations: usize,
    cells: usize,
) -> anyhow::Result<Duration> {
    let node = start_node(config_path).await?;
    let coordinator = &pki.identities[0];
    let mut client = crate::node_client(
        &format!("https://localhost:{}", node.address.port()),
        &pki.ca_cert,
        Some((&coordinator.cert, &coordinator.key)),
        identity,
    )
    .await?;
    let mut samples = Vec::new();
    for _ in 0..iterations {
        let started = Instant::now();
        let answer = client.run_query(request.clone()).await?.into_inner();
        samples.push(started.elapsed());
        anyhow::ensure!(
            answer.cells.len() == cells,
            "the node answered another grid"
        );
    }
    node.stop().await?;
    Ok(median(samples))
}

/// How many released sets the overlap benchmark remembers.
const REMEMBERED_SETS: usize = 10_000;
const OVERLAP_CHECK_LABEL: &str = "overlap + chain check, 10,000 sets";

struct MechanismCosts {
    suppression: Duration,
    /// The extra time collecting each cell's record set takes; none when within the noise.
    record_sets: Option<Duration>,
    overlap_check: Duration,
    /// The same check after an earlier answer the new cells are nested in.
    nested_check: Duration,
    rounding: Duration,
    noise: Duration,
}

/// Times each disclosure mechanism on its own for one query: threshold and complementary
/// suppression, collecting each cell's record set, checking the answer (cells, total,
/// margins, for closeness and for chains through nested sets) against [`REMEMBERED_SETS`]
/// remembered sets of scattered records spread over the whole dataset, the same after an
/// earlier, coarser answer over the same records, and rounding.
fn mechanism_costs(
    query: &fedq_proto::template::BoundQuery,
    snapshot: &fedq_node::data::Snapshot,
    iterations: usize,
    out: &Path,
) -> anyhow::Result<MechanismCosts> {
    use fedq_node::{disclosure, overlap};
    let rows = snapshot.rows() as u32;
    let mut numbered = snapshot.clone();
    numbered.frame.with_column(polars::prelude::Column::new(
        plan::RECORD_COLUMN.into(),
        (0..rows).collect::<Vec<u32>>(),
    ))?;
    let raw = plan::count_grid(query, &numbered)?;
    let time = |mut work: Box<dyn FnMut() -> anyhow::Result<()> + '_>| -> anyhow::Result<Duration> {
        let mut samples = Vec::new();
        for _ in 0..iterations {
            let started = Instant::now();
            work()?;
            samples.push(started.elapsed());
        }
        Ok(median(samples))
    };
    let suppression = time(Box::new(|| {
        disclosure::apply(&raw, 10);
        Ok(())
    }))?;
    // Counting with and without the record sets, in turn, so that both see the same state of
    // the machine: the cost is the median of the differences (none when within the noise).
    let mut differences = Vec::new();
    for _ in 0..iterations {
        let started = Instant::now();
        plan::count_grid(query, &numbered)?;
        let counting = started.elapsed();
        let started = Instant::now();
        plan::count_grid_with_sets(query, &numbered)?;
        differences.push(started.elapsed().as_secs_f64() - counting.as_secs_f64());
    }
    differences.sort_by(f64::total_cmp);
    let record_sets = Duration::try_from_secs_f64(differences[differences.len() / 2]).ok();
    // Remembered sets: sizes spread evenly on a log scale from 10 to 100,000 records (or the
    // dataset's size), each scattered over the whole dataset (as a filter's records are).
    let state = out.join("overlap-bench");
    let mut memory = overlap::OverlapMemory::open(&state, u64::MAX).map_err(anyhow::Error::msg)?;
    let sets: Vec<roaring::RoaringBitmap> = (0..REMEMBERED_SETS)
        .map(|index| {
            let largest = 100_000f64.min(f64::from(rows)).max(10.0);
            let spread = largest / 10.0;
            let size = (10f64 * spread.powf(index as f64 / REMEMBERED_SETS as f64)) as u32;
            let stride = (rows / size.max(1)).max(1);
            let offset = (index as u32).wrapping_mul(7_919) % stride;
            (0..size).map(|step| offset + step * stride).collect()
        })
        .collect();
    memory.remember(sets)?;
    let (raw_with_sets, cell_sets) = plan::count_grid_with_sets(query, &numbered)?;
    let overlap_check = time(Box::new(|| {
        overlap::decide(&raw_with_sets, &cell_sets, 10, &memory, &[], false, &[]);
        Ok(())
    }))?;
    // Then an earlier, coarser answer over the same records (each pair of neighbouring cells
    // as one): every cell of the new answer lies inside one of its sets, so the chain check
    // has nested sets to subtract, compare and follow, as when a study refines a question.
    let coarser: Vec<roaring::RoaringBitmap> = cell_sets
        .chunks(2)
        .map(|pair| roaring::MultiOps::union(pair.iter()))
        .filter(|set: &roaring::RoaringBitmap| !set.is_empty())
        .collect();
    memory.remember(coarser)?;
    let nested_check = time(Box::new(|| {
        overlap::decide(&raw_with_sets, &cell_sets, 10, &memory, &[], false, &[]);
        Ok(())
    }))?;
    let decided = disclosure::apply(&raw, 10);
    let rounding = time(Box::new(|| {
        let mut table = decided.clone();
        disclosure::round_released(&mut table, 5);
        Ok(())
    }))?;
    let secret = fedq_node::records::NodeSecret::ephemeral();
    let epsilon = fedq_proto::rational::Rational::new(1, 10).context("epsilon")?;
    let noise = time(Box::new(|| {
        let mut table = decided.clone();
        let mut rng = fedq_node::dp::noise_generator(&secret, b"bench query", "snapshot");
        fedq_node::dp::add_noise(&mut table, &raw.counts, epsilon, &mut rng);
        Ok(())
    }))?;
    Ok(MechanismCosts {
        suppression,
        record_sets,
        overlap_check,
        nested_check,
        rounding,
        noise,
    })
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
    let site = bench_site(THROUGHPUT_ROWS, 11);
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
        )
        // Every client's query is computed, none refused as busy.
        .replacen(
            "listen = ",
            &format!("max_concurrent_queries = {THROUGHPUT_CLIENTS}\nlisten = "),
            1,
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

/// The benchmark's one site: `rows` admissions in the Parquet format.
fn bench_site(rows: usize, seed: u64) -> SiteProfile {
    SiteProfile {
        site_id: "bench".into(),
        admissions: rows,
        seed,
        elderly_share: 0.3,
        mechanism_weights: [0.3, 0.4, 0.15, 0.05, 0.1],
        severity_shift: 2.0,
        systolic_missing_share: 0.03,
        format: LocalFormat::ModelLikeParquet,
    }
}
