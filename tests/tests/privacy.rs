//! Red-team tests of disclosure control, against real nodes: each plays an attack a study lead
//! (or a coordinator) could run with approved templates, and fails if the defence it targets
//! is switched off.

use fedq_deploy::alliance;
use fedq_proto::wire;
use fedq_tests::{
    TestAlliance, categories, client_for, cohort_request, integer, node_config_with_own_state,
    query,
};

/// k of the test alliance.
const K: u64 = 10;

/// One site's released values in a pooled result: cells (None: withheld) and the total.
fn site_values(result: &wire::PooledResult, site_id: &str) -> (Vec<Option<u64>>, Option<u64>) {
    let answer = result
        .sites
        .iter()
        .find(|site| site.site_id == site_id)
        .and_then(|site| site.result.as_ref())
        .expect("the site answered");
    let value = |cell: &wire::Cell| match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => Some(released.count),
        _ => None,
    };
    (
        answer.cells.iter().map(value).collect(),
        answer.total.as_ref().and_then(value),
    )
}

fn assert_zero_or_at_least_k(difference: u64, what: &str) {
    assert!(
        difference == 0 || difference >= K,
        "{what}: two released values differ by {difference} records (1 to k-1 reveals someone)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_sweep_releases_no_difference_of_fewer_than_k_records() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut lead = test.coordinator().await?;
    // "Severity at least x" for x = 0, 1, 2, ...: consecutive answers differ by the patients
    // with severity exactly x — often one or two at a small site: all versus all-but-one.
    let mut answers = Vec::new();
    for min_iss in 0..=40 {
        answers.push(
            query(
                &mut lead,
                "cohort-by-age-sex",
                vec![integer("min_iss", min_iss)],
                0,
            )
            .await?,
        );
    }
    for site in ["site-a", "site-b", "site-c"] {
        let values: Vec<_> = answers
            .iter()
            .map(|result| site_values(result, site))
            .collect();
        // The sets are nested (severity >= x contains severity >= y for x < y), so any two
        // released values' difference is the number of records between them.
        for (x, (cells_x, total_x)) in values.iter().enumerate() {
            for (cells_y, total_y) in &values[x + 1..] {
                if let (Some(a), Some(b)) = (total_x, total_y) {
                    assert_zero_or_at_least_k(a - b, &format!("{site} totals"));
                }
                for (cell, (a, b)) in cells_x.iter().zip(cells_y).enumerate() {
                    if let (Some(a), Some(b)) = (a, b) {
                        assert_zero_or_at_least_k(a - b, &format!("{site} cell {cell}"));
                    }
                }
            }
        }
    }
    // The defence was needed: overlap control withheld something along the way.
    let overlap_acted = answers.iter().any(|result| {
        result.sites.iter().any(|site| {
            site.result.as_ref().is_some_and(|answer| {
                answer
                    .mechanisms
                    .contains(&(wire::Mechanism::QueryOverlapControl as i32))
            })
        })
    });
    assert!(overlap_acted, "the sweep must have met overlap control");
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn margins_and_totals_from_other_templates_recover_no_withheld_cell() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut lead = test.coordinator().await?;
    let by_age_sex = query(&mut lead, "cohort-by-age-sex", vec![], 0).await?;
    let by_age = query(&mut lead, "cohort-by-age", vec![], 0).await?;
    let total = query(&mut lead, "cohort-total", vec![], 0).await?;
    let shape: Vec<usize> = by_age_sex
        .axes
        .iter()
        .map(|axis| axis.levels.len())
        .collect();
    let mut withheld_somewhere = false;
    for site in ["site-a", "site-b", "site-c"] {
        let (cells, _) = site_values(&by_age_sex, site);
        let (ages, _) = site_values(&by_age, site);
        let (_, site_total) = site_values(&total, site);
        withheld_somewhere |= cells.contains(&None);
        for age in 0..shape[0] {
            let row = &cells[age * shape[1]..(age + 1) * shape[1]];
            let hidden = row.iter().filter(|cell| cell.is_none()).count();
            assert_ne!(hidden, 1, "{site}: age row {age} has one withheld cell");
            // The age margin from the other template, minus the released cells of the row,
            // is the sum of the row's withheld cells: never a small number.
            if let Some(margin) = ages[age] {
                let released: u64 = row.iter().flatten().sum();
                assert_zero_or_at_least_k(margin - released, &format!("{site} age {age}"));
            }
        }
        for sex in 0..shape[1] {
            let hidden = (0..shape[0])
                .filter(|age| cells[age * shape[1] + sex].is_none())
                .count();
            assert_ne!(hidden, 1, "{site}: sex column {sex} has one withheld cell");
        }
        if let Some(site_total) = site_total {
            let released: u64 = cells.iter().flatten().sum();
            assert_zero_or_at_least_k(site_total - released, &format!("{site} total"));
        }
    }
    assert!(withheld_somewhere, "the fixture must withhold something");
    test.alliance.stop().await
}

/// Site-a's node configuration with its own state and `privacy` settings, started.
async fn site_a_variant(
    test: &TestAlliance,
    privacy: &str,
) -> anyhow::Result<(std::path::PathBuf, alliance::Running)> {
    let (config, _) = node_config_with_own_state(test)?;
    let text = std::fs::read_to_string(&config)?;
    let edited = text.replacen(
        "[[datasets]]",
        &format!("[privacy]\n{privacy}\n\n[[datasets]]"),
        1,
    );
    assert_ne!(edited, text);
    std::fs::write(&config, edited)?;
    let running = alliance::start_node(&config).await?;
    Ok((config, running))
}

async fn node_total(
    test: &TestAlliance,
    node: &alliance::Running,
    request_id: &str,
    min_iss: i64,
) -> anyhow::Result<Option<u64>> {
    let mut client = client_for(test, node).await?;
    let answer = client
        .run_query(cohort_request(&test.alliance, request_id, min_iss)?)
        .await?
        .into_inner();
    Ok(match answer.total.and_then(|total| total.outcome) {
        Some(wire::cell::Outcome::Released(released)) => Some(released.count),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_memory_survives_a_restart_and_concurrent_near_duplicates_do_not_both_pass()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    // Find, on a node without overlap control, two thresholds whose totals differ by 1 to k-1.
    let (_, open) = site_a_variant(&test, "overlap_control = false").await?;
    let mut pair = None;
    for min_iss in 0..60 {
        let (Some(a), Some(b)) = (
            node_total(&test, &open, &format!("probe-{min_iss}"), min_iss).await?,
            node_total(&test, &open, &format!("probe-next-{min_iss}"), min_iss + 1).await?,
        ) else {
            continue;
        };
        if (1..K).contains(&(a - b)) {
            pair = Some(min_iss);
            break;
        }
    }
    open.stop().await?;
    let x = pair.expect("site-a has a severity level with 1 to k-1 patients");

    // Released before a restart, remembered after it.
    let (config, guarded) = site_a_variant(&test, "overlap_control = true").await?;
    assert!(node_total(&test, &guarded, "first", x).await?.is_some());
    guarded.stop().await?;
    let restarted = alliance::start_node(&config).await?;
    assert_eq!(
        node_total(&test, &restarted, "second", x + 1).await?,
        None,
        "the near-duplicate must be withheld after a restart"
    );
    restarted.stop().await?;

    // Sent at the same moment to a fresh node: at most one of the two is released.
    let (_, fresh) = site_a_variant(&test, "overlap_control = true").await?;
    for round in 0..5 {
        let (first, second) = (format!("race-a-{round}"), format!("race-b-{round}"));
        let (a, b) = tokio::join!(
            node_total(&test, &fresh, &first, x),
            node_total(&test, &fresh, &second, x + 1)
        );
        assert!(
            !(a?.is_some() && b?.is_some()),
            "both near-duplicates were released"
        );
    }
    fresh.stop().await?;
    test.alliance.stop().await
}

/// The whole answer a node gave (cells and total), for comparing repeats.
async fn node_answer(
    test: &TestAlliance,
    node: &alliance::Running,
    request_id: &str,
    min_iss: i64,
) -> Result<wire::SiteResult, tonic::Status> {
    let mut client = client_for(test, node)
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let request = cohort_request(&test.alliance, request_id, min_iss)
        .map_err(|err| tonic::Status::internal(err.to_string()))?;
    client
        .run_query(request)
        .await
        .map(tonic::Response::into_inner)
}

fn values_of(answer: &wire::SiteResult) -> (Vec<Option<u64>>, Option<u64>) {
    let value = |cell: &wire::Cell| match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => Some(released.count),
        _ => None,
    };
    (
        answer.cells.iter().map(value).collect(),
        answer.total.as_ref().and_then(value),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_differential_privacy_two_hundred_repeats_give_one_answer_and_spend_once()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (_, plain) = site_a_variant(&test, "overlap_control = false").await?;
    let truth = values_of(&node_answer(&test, &plain, "truth", 0).await?);
    plain.stop().await?;
    let (config, noisy) = site_a_variant(
        &test,
        "differential_privacy = true\nepsilon_per_query = \"1/10\"",
    )
    .await?;
    let first = node_answer(&test, &noisy, "repeat-0", 0).await?;
    assert!(
        first
            .mechanisms
            .contains(&(wire::Mechanism::DifferentialPrivacy as i32))
    );
    let noise = first.noise.clone().expect("the answer reports its noise");
    assert_eq!(noise.epsilon, "1/10");
    assert!(noise.cell_variance > 100.0, "scale 10: variance about 200");
    let answer = values_of(&first);
    assert_ne!(answer, truth, "noise changed the released counts");
    // The total is the sum of the noisy cells (withheld ones included, which are not sent).
    let released: u64 = answer.0.iter().flatten().sum();
    assert!(answer.1.is_none_or(|total| total >= released));
    for repeat in 1..200 {
        let again = node_answer(&test, &noisy, &format!("repeat-{repeat}"), 0).await?;
        assert_eq!(
            values_of(&again),
            answer,
            "repeat {repeat} gave another answer"
        );
    }
    noisy.stop().await?;
    let state = config_state_dir(&config)?;
    let spent: Vec<String> = fedq_tests::audit_queries(&state)?
        .into_iter()
        .filter_map(|query| query.epsilon_spent)
        .collect();
    assert_eq!(spent.len(), 200);
    assert_eq!(spent[0], "1/10");
    assert!(spent[1..].iter().all(|epsilon| epsilon == "0"), "{spent:?}");
    test.alliance.stop().await
}

/// The state directory a node configuration names.
fn config_state_dir(config: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(fedq_node::config::NodeConfig::load(config)?.state_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_privacy_budget_refuses_and_stays_exhausted_after_a_restart()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (config, node) = site_a_variant(
        &test,
        "differential_privacy = true\nepsilon_per_query = \"1/10\"\nstudy_epsilon = \"3/10\"",
    )
    .await?;
    let first = values_of(&node_answer(&test, &node, "b-0", 0).await?);
    for (index, min_iss) in [20, 40].into_iter().enumerate() {
        node_answer(&test, &node, &format!("b-{}", index + 1), min_iss).await?;
    }
    let refused = node_answer(&test, &node, "b-3", 60).await.unwrap_err();
    fedq_tests::assert_refused(
        &refused,
        tonic::Code::ResourceExhausted,
        wire::RefusalCode::PrivacyBudgetExhausted,
        "privacy budget of study 'trauma-outcomes'",
    );
    node.stop().await?;
    let restarted = alliance::start_node(&config).await?;
    let still = node_answer(&test, &restarted, "b-4", 60).await.unwrap_err();
    assert_eq!(
        fedq_tests::refusal_of(&still),
        wire::RefusalCode::PrivacyBudgetExhausted
    );
    // A question already paid for is answered again, the same, for free.
    let repeat = values_of(&node_answer(&test, &restarted, "b-5", 0).await?);
    assert_eq!(repeat, first);
    restarted.stop().await?;
    test.alliance.stop().await
}

fn mechanisms(chosen: &[&str]) -> wire::ParameterValue {
    categories("mechanisms", chosen)
}

/// A differencing chain on `deaths-by-mechanism`: a site, a mechanism whose deaths (ISS >= 16,
/// from the generated data) are small (1 to k-1), and mechanisms with at least k.
struct Chain {
    site_id: String,
    small: &'static str,
    large: Vec<&'static str>,
}

fn chain_in(test: &TestAlliance) -> anyhow::Result<Chain> {
    const MECHANISMS: [&str; 5] = ["road_traffic", "fall", "assault", "self_harm", "other"];
    let rows = fedq_tests::oracle_rows(&test.sites)?;
    let deaths = |site: usize, mechanism: &str| {
        rows[site]
            .iter()
            .filter(|row| row.died && row.iss >= 16 && row.mechanism == mechanism)
            .count() as u64
    };
    (0..test.sites.len())
        .flat_map(|site| MECHANISMS.iter().map(move |&small| (site, small)))
        .filter(|&(site, small)| (1..K).contains(&deaths(site, small)))
        .find_map(|(site, small)| {
            let large: Vec<&'static str> = MECHANISMS
                .iter()
                .copied()
                .filter(|&mechanism| deaths(site, mechanism) >= K)
                .collect();
            (large.len() >= 3).then(|| Chain {
                site_id: test.sites[site].site_id.clone(),
                small,
                large,
            })
        })
        .ok_or_else(|| anyhow::anyhow!("the fixture has no small and three large death counts"))
}

/// The chain's site's released count of `mechanism` in a deaths-by-mechanism answer, and the
/// answer's total there.
fn deaths_released(
    result: &wire::PooledResult,
    chain: &Chain,
    mechanism: &str,
) -> (Option<u64>, Option<u64>) {
    let level = result.axes[0]
        .levels
        .iter()
        .position(|level| level == mechanism)
        .expect("a mechanism level");
    let (cells, total) = site_values(result, &chain.site_id);
    (cells[level], total)
}

fn overlap_acted(result: &wire::PooledResult, site_id: &str) -> bool {
    result.sites.iter().any(|site| {
        site.site_id == site_id
            && site.result.as_ref().is_some_and(|answer| {
                answer
                    .mechanisms
                    .contains(&(wire::Mechanism::QueryOverlapControl as i32))
            })
    })
}

async fn deaths_of(
    lead: &mut fedq_coordinator::client::Connection,
    chosen: &[&str],
) -> anyhow::Result<wire::PooledResult> {
    deaths_from(lead, chosen, 16).await
}

async fn deaths_from(
    lead: &mut fedq_coordinator::client::Connection,
    chosen: &[&str],
    min_iss: i64,
) -> anyhow::Result<wire::PooledResult> {
    let parameters = vec![mechanisms(chosen), integer("min_iss", min_iss)];
    Ok(query(lead, "deaths-by-mechanism", parameters, 0).await?)
}

fn assert_not_recovered(chain: &Chain, recovered: u64) {
    assert!(
        !(1..K).contains(&recovered),
        "{}: the chain recovered the withheld {} deaths ({recovered})",
        chain.site_id,
        chain.small
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_queries_recovers_no_withheld_count() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let chain = chain_in(&test)?;
    let (small, middle, last) = (chain.small, chain.large[0], chain.large[1]);
    let mut lead = test.coordinator().await?;
    // 1. {small, middle}: the small count is withheld (and middle with it), the total released.
    let first = deaths_of(&mut lead, &[small, middle]).await?;
    assert_eq!(
        (
            deaths_released(&first, &chain, small).0,
            deaths_released(&first, &chain, middle).0
        ),
        (None, None),
        "the small count and its complement are withheld"
    );
    let first_total = site_values(&first, &chain.site_id)
        .1
        .expect("a released total");
    // 2. {middle, last}: middle alone would differ from the first total by the small count, so
    // it is withheld (and last with it); their total is released.
    let second = deaths_of(&mut lead, &[middle, last]).await?;
    let second_total = site_values(&second, &chain.site_id)
        .1
        .expect("a released total");
    // 3. {last}: releasing it would give middle = second total - last, and then the small count
    // = first total - middle.
    let third = deaths_of(&mut lead, &[last]).await?;
    let (cell, total) = deaths_released(&third, &chain, last);
    for released in [cell, total].into_iter().flatten() {
        assert_not_recovered(&chain, first_total - (second_total - released));
    }
    assert!(
        overlap_acted(&third, &chain.site_id),
        "overlap control acted"
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_four_queries_whose_last_step_derives_a_count_recovers_nothing()
-> anyhow::Result<()> {
    // Found by an audit: N = {small, a}, M = {a, b}, P = {b, c}, then S = {c}. Releasing S
    // makes b = P - S derivable, which lies inside M: a = M - b, and small = N - a.
    let test = TestAlliance::start().await?;
    let chain = chain_in(&test)?;
    let (small, a, b, c) = (chain.small, chain.large[0], chain.large[1], chain.large[2]);
    let mut lead = test.coordinator().await?;
    let mut totals = Vec::new();
    for chosen in [vec![small, a], vec![a, b], vec![b, c], vec![c]] {
        let result = deaths_of(&mut lead, &chosen).await?;
        totals.push(site_values(&result, &chain.site_id).1);
    }
    if let [Some(n), Some(m), Some(p), Some(s)] = totals[..] {
        assert_not_recovered(&chain, n - (m - (p - s)));
    }
    assert_eq!(totals[3], None, "the last step is withheld");
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_mixing_severity_thresholds_recovers_no_withheld_band() -> anyhow::Result<()> {
    // Found by an audit: deaths of one mechanism from ISS 16 (released), then from ISS 17
    // (withheld: a small band apart), then at ISS 17 {m, a}, {a, b} and {b}: m@17 = {m, a} -
    // ({a, b} - b), and the band = m@16 - m@17.
    let test = TestAlliance::start().await?;
    let chain = chain_in(&test)?;
    let rows = fedq_tests::oracle_rows(&test.sites)?;
    let site = test
        .sites
        .iter()
        .position(|site| site.site_id == chain.site_id)
        .expect("the chain's site");
    let deaths = |mechanism: &str, min_iss: i64| {
        rows[site]
            .iter()
            .filter(|row| row.died && row.iss >= min_iss && row.mechanism == mechanism)
            .count() as u64
    };
    let banded = chain
        .large
        .iter()
        .copied()
        .find(|&mechanism| (1..K).contains(&(deaths(mechanism, 16) - deaths(mechanism, 17))))
        .expect("a mechanism with a small band of deaths at ISS 16");
    let others: Vec<&str> = chain
        .large
        .iter()
        .copied()
        .filter(|&mechanism| mechanism != banded)
        .collect();
    let mut lead = test.coordinator().await?;
    let mut totals = Vec::new();
    for (chosen, min_iss) in [
        (vec![banded], 16),
        (vec![banded], 17),
        (vec![banded, others[0]], 17),
        (vec![others[0], others[1]], 17),
        (vec![others[1]], 17),
    ] {
        let result = deaths_from(&mut lead, &chosen, min_iss).await?;
        totals.push(site_values(&result, &chain.site_id).1);
    }
    assert_eq!(totals[1], None, "the threshold one apart is withheld");
    if let [Some(whole), _, Some(m), Some(p), Some(s)] = totals[..] {
        let band = whole - (m - (p - s));
        assert!(
            !(1..K).contains(&band),
            "{}: the chain recovered the withheld band of {banded} deaths ({band})",
            chain.site_id
        );
    }
    test.alliance.stop().await
}

/// Every way `withheld` cells can be split over the node's reasons (reasons with none left out,
/// as the audit record keeps them).
fn splits(withheld: u64) -> Vec<std::collections::BTreeMap<String, u64>> {
    const REASONS: [&str; 4] = ["complementary", "dominance", "overlap", "threshold"];
    let mut all = vec![std::collections::BTreeMap::new()];
    for (index, reason) in REASONS.iter().enumerate() {
        let last = index == REASONS.len() - 1;
        all = all
            .into_iter()
            .flat_map(|split: std::collections::BTreeMap<String, u64>| {
                let left = withheld - split.values().sum::<u64>();
                let counts = if last { left..=left } else { 0..=left };
                counts.map(move |count| {
                    let mut split = split.clone();
                    if count > 0 {
                        split.insert(reason.to_string(), count);
                    }
                    split
                })
            })
            .collect();
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_head_does_not_let_the_study_lead_guess_why_cells_were_withheld()
-> anyhow::Result<()> {
    use fedq_node::audit::record::{Event, hash_of};
    let test = TestAlliance::start().await?;
    let mut lead = test.coordinator().await?;
    let result = query(&mut lead, "cohort-by-age-sex", vec![], 0).await?;
    let mut guessed = 0;
    for site in &result.sites {
        // The head every answer carries names its audit record by hash.
        let head = site
            .result
            .as_ref()
            .and_then(|answer| answer.audit_head.as_ref())
            .expect("a signed audit head");
        let audit = test.alliance.node_state_dir(&site.site_id).join("audit");
        let record = fedq_node::audit::verify::records(&audit)?
            .into_iter()
            .find(|record| record.seq == head.count)
            .expect("the head's record");
        let Event::Query(event) = &record.event else {
            panic!("the head's record is the query's")
        };
        let withheld: u64 = event.cells_withheld.values().sum();
        if withheld == 0 {
            continue;
        }
        // The reader's best case: every field of the record but the salt (the time too), and
        // a guess of how the withheld cells split over the reasons.
        let matching = |salt: &Option<String>| -> Vec<_> {
            splits(withheld)
                .into_iter()
                .filter(|split| {
                    let mut guess = record.clone();
                    guess.salt = salt.clone();
                    if let Event::Query(event) = &mut guess.event {
                        event.cells_withheld = split.clone();
                    }
                    hash_of(&guess) == head.hash
                })
                .collect()
        };
        assert_eq!(
            matching(&record.salt),
            std::slice::from_ref(&event.cells_withheld),
            "{}: with the log's salt the guesses find the true split",
            site.site_id
        );
        assert!(
            matching(&None).is_empty(),
            "{}: the head's hash gave away why {withheld} cells were withheld",
            site.site_id
        );
        guessed += 1;
    }
    assert!(guessed > 0, "no site withheld a cell");
    test.alliance.stop().await
}
