//! Results: pooled counts against an independent oracle, small-cell suppression, the node's
//! own floor and parameter checks, identifier columns — real servers on 127.0.0.1.

use fedq_deploy::alliance;
use fedq_proto::wire::{self, RefusalCode, SiteStatus};
use fedq_tests::*;
use prost::Message;
use tonic::Code;

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
async fn a_filter_on_chosen_categories_answers_with_their_rows_only() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut coordinator = test.coordinator().await?;
    let parameters = vec![
        categories("mechanisms", &["assault", "fall"]),
        integer("min_iss", 9),
    ];
    let result = query(&mut coordinator, "deaths-by-mechanism", parameters, 0).await?;

    // The excluded mechanisms get no row (they would be empty by the query's own definition,
    // shown as zeros or as withheld); the chosen keep the model's order.
    assert_eq!(result.axes.len(), 1);
    assert_eq!(result.axes[0].levels, ["fall", "assault", "missing"]);
    assert_eq!(result.cells.len(), 3);
    // What each site released is its own count of those deaths.
    let rows = oracle_rows(&test.sites)?;
    let mut released = 0;
    for (site, site_rows) in test.sites.iter().zip(&rows) {
        let answer = result
            .sites
            .iter()
            .find(|answered| answered.site_id == site.site_id)
            .and_then(|answered| answered.result.as_ref())
            .expect("every site answered");
        assert_eq!(answer.cells.len(), 3, "{}", site.site_id);
        for (cell, level) in answer.cells.iter().zip(&result.axes[0].levels) {
            let expected = site_rows
                .iter()
                .filter(|row| row.died && row.iss >= 9 && &row.mechanism == level)
                .count() as u64;
            if let Some(wire::cell::Outcome::Released(value)) = &cell.outcome {
                assert_eq!(value.count, expected, "{} {level}", site.site_id);
                released += 1;
            }
        }
    }
    assert!(released > 0, "no site released a count");
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
    // Complementary suppression: no row or column of site-c's table has exactly one withheld
    // cell, so none is the difference of its margin and the released cells…
    let shape: Vec<usize> = site_result
        .axes
        .iter()
        .map(|axis| axis.levels.len())
        .collect();
    assert_eq!(shape.len(), 2);
    let withheld = |row: usize, column: usize| {
        matches!(
            site_result.cells[row * shape[1] + column].outcome,
            Some(wire::cell::Outcome::Withheld(_))
        )
    };
    for row in 0..shape[0] {
        let hidden = (0..shape[1])
            .filter(|&column| withheld(row, column))
            .count();
        assert_ne!(hidden, 1, "row {row} has a single withheld cell");
    }
    for column in 0..shape[1] {
        let hidden = (0..shape[0]).filter(|&row| withheld(row, column)).count();
        assert_ne!(hidden, 1, "column {column} has a single withheld cell");
    }
    // …which makes the site's total safe to release.
    let total = site_result.total.as_ref().expect("total");
    assert_eq!(
        total.outcome,
        Some(wire::cell::Outcome::Released(wire::Released {
            count: site_c_rows.len() as u64,
            summary: None,
        }))
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
    assert_refused(
        &status,
        Code::InvalidArgument,
        RefusalCode::InvalidParameter,
        "'min_age'",
    );
    test.alliance.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_using_an_identifier_column_is_refused_by_the_node() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(1).await?;
    let mut request = node_request(&test.alliance, "low-minimum", vec![])?;
    let mut template = fedq_tests::template_of(&request)?;
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
