//! The data-quality report against real nodes: the standing profile template runs like any
//! query (signed, verified, thresholded, audited); `fedq quality`'s rows flag the seeded defect
//! (a fifth of site-b's admissions lack a blood pressure) at that site only, with counts equal
//! to an oracle's; small profile counts at the small site are withheld; a `[quality]` section
//! naming a count template stops the coordinator at start.

use fedq_coordinator::quality::{self, Measure};
use fedq_deploy::alliance;
use fedq_proto::wire;
use fedq_tests::{TestAlliance, oracle_rows};

/// Runs `fedq quality`'s query: the standard, then the standing template under its study.
async fn quality_report(
    test: &TestAlliance,
) -> anyhow::Result<(wire::PooledResult, wire::QualityStandard)> {
    let mut coordinator = test.coordinator().await?;
    let standard = coordinator
        .quality_standard(wire::QualityStandardRequest {})
        .await?
        .into_inner();
    let result = fedq_coordinator::client::run_query(
        &mut coordinator,
        wire::RunQueryRequest {
            study_id: standard.study_id.clone(),
            template_id: standard.template_id.clone(),
            parameters: Vec::new(),
            deadline_ms: 20_000,
        },
        |_| {},
    )
    .await?;
    Ok((result, standard))
}

fn released(cell: &wire::Cell) -> Option<u64> {
    match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => Some(released.count),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_flags_the_seeded_defect_at_the_one_site_that_has_it() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    assert!(test.sites[1].systolic_missing_share > 0.1);
    assert!(
        test.sites
            .iter()
            .enumerate()
            .all(|(index, site)| index == 1 || site.systolic_missing_share < 0.05)
    );
    let (result, standard) = quality_report(&test).await?;
    assert_eq!(standard.study_id, alliance::QUALITY_STUDY_ID);
    for site in &result.sites {
        assert_eq!(
            site.status,
            wire::SiteStatus::Ok as i32,
            "{}: {}",
            site.site_id,
            site.message
        );
    }
    let rows = quality::rows(&result, &standard);
    let findings = quality::findings(&rows, &standard);
    assert!(
        findings
            .iter()
            .any(|finding| finding.starts_with("site-b: systolic_bp:")
                && finding.contains("% missing")),
        "{findings:?}"
    );
    for finding in &findings {
        assert!(
            finding.starts_with("site-b: systolic_bp:"),
            "only the seeded defect is flagged: {finding}"
        );
    }
    let missing_bp = rows
        .iter()
        .find(|row| row.section == "systolic_bp" && row.measure == Measure::Missing)
        .expect("a systolic_bp row");
    let flagged: Vec<&str> = missing_bp
        .by_site
        .iter()
        .filter(|(_, share)| share.flagged)
        .map(|(site, _)| site.as_str())
        .collect();
    assert_eq!(flagged, ["site-b"]);

    // The counts behind the shares are the oracle's: records without a blood pressure, and
    // all records, at the two large sites (nothing small there to withhold).
    let oracle = oracle_rows(&test.sites)?;
    let section = result
        .sections
        .iter()
        .position(|section| {
            section
                .axis
                .as_ref()
                .is_some_and(|axis| axis.column == "systolic_bp")
        })
        .expect("systolic_bp is profiled");
    for (index, rows) in oracle.iter().enumerate().take(2) {
        let answer = result.sites[index].result.as_ref().unwrap();
        let own = &answer.sections[section];
        let missing = rows.iter().filter(|row| row.systolic_bp.is_none()).count() as u64;
        assert_eq!(released(own.cells.last().unwrap()), Some(missing));
        assert_eq!(
            released(own.total.as_ref().unwrap()),
            Some(rows.len() as u64)
        );
        let low = rows
            .iter()
            .filter(|row| row.systolic_bp.is_some_and(|bp| bp < 90))
            .count() as u64;
        assert_eq!(released(&own.cells[0]), Some(low));
    }

    // The text form says the same, and the query was audited at every node like any other.
    let text = quality::render(&result, &standard);
    assert!(
        text.contains("sites falling short of the alliance's standard:"),
        "{text}"
    );
    assert!(text.contains("site-b: systolic_bp:"), "{text}");
    // `fedq query data-quality` shows each section as a table of its own, in text and JSON.
    let table = fedq_coordinator::render::table("profile", &result);
    assert!(table.contains("\nsystolic_bp\n"), "{table}");
    assert!(table.contains("cannot be evaluated"), "{table}");
    let json = fedq_coordinator::render::json(&result);
    assert_eq!(json.sections.len(), result.sections.len());
    assert_eq!(json.sections[section].axis.column, "systolic_bp");
    for (site_id, _) in &test.alliance.nodes {
        let audited = fedq_tests::audit_queries(&test.alliance.node_state_dir(site_id))?;
        assert!(
            audited.iter().any(|event| event
                .template
                .as_ref()
                .is_some_and(|template| template.id == "data-quality")),
            "{site_id} has no audit record of the profile"
        );
    }
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_profile_counts_at_the_small_site_are_withheld_and_give_no_share()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let (result, standard) = quality_report(&test).await?;
    let site_c = result
        .sites
        .iter()
        .find(|site| site.site_id == "site-c")
        .and_then(|site| site.result.as_ref())
        .expect("site-c answered");
    let k = u64::from(site_c.applied_min_cell_count);
    let mut withheld = 0;
    for section in &site_c.sections {
        for cell in &section.cells {
            match released(cell) {
                Some(count) => assert!(count == 0 || count >= k, "{count} released"),
                None => withheld += 1,
            }
        }
    }
    assert!(withheld > 0, "150 admissions must have small profile cells");
    assert!(
        site_c
            .mechanisms
            .contains(&(wire::Mechanism::SmallCellSuppression as i32))
    );
    // A column whose missing count site-c withheld gets no share for site-c, and no flag.
    let rows = quality::rows(&result, &standard);
    let hidden: Vec<&str> = site_c
        .sections
        .iter()
        .zip(&result.sections)
        .filter(|(own, _)| own.cells.last().and_then(released).is_none())
        .filter_map(|(_, section)| section.axis.as_ref().map(|axis| axis.column.as_str()))
        .filter(|column| {
            rows.iter()
                .any(|row| row.section == *column && row.measure == Measure::Missing)
        })
        .collect();
    assert!(!hidden.is_empty(), "some missing count at site-c is small");
    for column in hidden {
        let row = rows
            .iter()
            .find(|row| row.section == column && row.measure == Measure::Missing)
            .unwrap();
        let (_, share) = row
            .by_site
            .iter()
            .find(|(site, _)| site == "site-c")
            .unwrap();
        assert_eq!(share.percent, None, "{column}");
        assert!(!share.flagged);
    }
    let pooled_incomplete = result
        .sections
        .iter()
        .flat_map(|section| &section.cells)
        .any(|cell| !cell.complete);
    assert!(
        pooled_incomplete,
        "a withheld site cell makes its pooled cell incomplete"
    );
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quality_standard_naming_a_count_template_stops_the_coordinator() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let config = test.alliance.root.join("config").join("coordinator.toml");
    let text = std::fs::read_to_string(&config)?;
    let edited = text.replace(
        "template = \"data-quality\"",
        "template = \"cohort-by-age-sex\"",
    );
    assert_ne!(edited, text);
    let path = test.dir.path().join("coordinator-bad-quality.toml");
    std::fs::write(&path, edited)?;
    let err = alliance::start_coordinator(&path, 0).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("template 'cohort-by-age-sex' is not a data-quality profile"),
        "{err:#}"
    );
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_profile_count_is_not_the_difference_of_counts_released_in_another_section()
-> anyhow::Result<()> {
    // The audited attacks. A check's "cannot be evaluated" records are exactly the records
    // missing a column it reads (the others are never missing here). (1) A column's withheld
    // cells add up to its total minus its released cells; if the check releases "cannot be
    // evaluated" and the column withheld "missing" with one small cell, the small one follows
    // by subtraction. (2) The other way round: a check withholds "implausible" with "cannot
    // be evaluated" as its complement, while the column releases "missing".
    const CHECKS: [(&str, &str); 4] = [
        ("coma-with-injury", "gcs"),
        ("blood-pressure-plausible", "systolic_bp"),
        ("stay-plausible", "length_of_stay"),
        ("outcome-within-stay", "length_of_stay"),
    ];
    let test = TestAlliance::start().await?;
    let (result, _) = quality_report(&test).await?;
    for site in &result.sites {
        let answer = site.result.as_ref().expect("every site answered");
        let k = u64::from(answer.applied_min_cell_count);
        let section = |name: &str| {
            answer
                .sections
                .iter()
                .find(|section| {
                    section
                        .axis
                        .as_ref()
                        .is_some_and(|axis| axis.column == name)
                })
                .expect("a profiled section")
        };
        // The withheld cells' sum (total minus released cells), when there is one.
        let withheld_sum = |section: &wire::Section| -> Option<u64> {
            let total = section.total.as_ref().and_then(released)?;
            let shown: u64 = section.cells.iter().filter_map(released).sum();
            (total > shown).then_some(total - shown)
        };
        let missing = |section: &wire::Section| section.cells.last().and_then(released);
        for (check, column) in CHECKS {
            let (check, column) = (section(check), section(column));
            for (group, known) in [
                (withheld_sum(column), missing(check)),
                (withheld_sum(check), missing(column)),
            ] {
                if let (Some(group), Some(known)) = (group, known) {
                    assert!(
                        !(known < group && (1..k).contains(&(group - known))),
                        "{}: {:?} and {:?}: a withheld group of {group} less a released {known}",
                        site.site_id,
                        check.axis.as_ref().map(|axis| &axis.column),
                        column.axis.as_ref().map(|axis| &axis.column),
                    );
                }
            }
        }
    }
    test.alliance.stop().await?;
    Ok(())
}
