//! Unit tests of the template language: parsing, checking, canonical form, binding.

use super::*;

const COHORT: &str = r#"
id = "cohort-by-age-sex"
version = 1
title = "Admissions by age band and sex"
description = "Trauma admissions in a period, by age band and sex."
data_model = "fedq-trauma/1"
dataset = "trauma_admissions"

[statistic]
kind = "count"

[[parameters]]
name = "from"
type = "date"
min = "2010-01-01"
max = "2030-12-31"

[[parameters]]
name = "to"
type = "date"
min = "2010-01-01"
max = "2030-12-31"

[[parameters]]
name = "min_iss"
type = "integer"
min = 0
max = 75
default = 0

[filter]
all = [
  { column = "admission_date", op = "between", params = ["from", "to"] },
  { column = "iss", op = ">=", param = "min_iss" },
]

[[strata]]
column = "age"
bands = [
  { label = "0-17", below = 18 },
  { label = "18-64", at_least = 18, below = 65 },
  { label = "65+", at_least = 65 },
]

[[strata]]
column = "sex"
"#;

fn model() -> DataModel {
    DataModel::builtin()
}

fn cohort() -> Template {
    Template::from_toml(COHORT, "cohort.toml").unwrap()
}

fn date(text: &str) -> Value {
    Value::Date(parse_date(text).unwrap())
}

fn no_extra() -> BTreeSet<String> {
    BTreeSet::new()
}

#[test]
fn valid_template_checks_and_has_missing_level_on_every_axis() {
    let template = cohort();
    let model = model();
    let checked = template.check(&model, &no_extra()).unwrap();
    assert_eq!(checked.axes.len(), 2);
    assert_eq!(checked.axes[0].levels, ["0-17", "18-64", "65+", "missing"]);
    assert_eq!(
        checked.axes[1].levels,
        ["female", "male", "other", "missing"]
    );
}

#[test]
fn reformatted_and_reordered_toml_has_the_same_canonical_bytes() {
    let reordered = COHORT
        .replace(
            "id = \"cohort-by-age-sex\"\nversion = 1\n",
            "version   =   1\nid = \"cohort-by-age-sex\"   # comment\n",
        )
        .replace("min = 0\nmax = 75", "max = 75\nmin = 0");
    let again = Template::from_toml(&reordered, "reordered.toml").unwrap();
    assert_ne!(reordered, COHORT);
    assert_eq!(again.canonical_bytes(), cohort().canonical_bytes());
    assert_eq!(again.content_hash(), cohort().content_hash());
}

#[test]
fn changing_any_value_changes_the_content_hash() {
    let changed = Template::from_toml(&COHORT.replace("max = 75", "max = 74"), "x").unwrap();
    assert_ne!(changed.content_hash(), cohort().content_hash());
}

#[test]
fn canonical_bytes_round_trip_and_non_canonical_bytes_are_refused() {
    let template = cohort();
    let bytes = template.canonical_bytes();
    assert_eq!(Template::from_canonical(&bytes).unwrap(), template);

    let mut pretty = serde_json::to_vec_pretty(&template).unwrap();
    let err = Template::from_canonical(&pretty).unwrap_err().to_string();
    assert!(err.contains("not in canonical form"), "{err}");

    pretty.truncate(10);
    let err = Template::from_canonical(&pretty).unwrap_err();
    assert_eq!(
        err.refusal_code(),
        crate::wire::RefusalCode::MalformedTemplate
    );
}

#[test]
fn malformed_toml_reports_the_line() {
    let broken = COHORT.replace("max = 75", "max = = 75");
    let err = Template::from_toml(&broken, "broken.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.toml"), "{err}");
    assert!(err.contains("line 28"), "{err}");
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    let extra = COHORT.replace("version = 1\n", "version = 1\nowner = \"me\"\n");
    let err = Template::from_toml(&extra, "extra.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("owner"), "{err}");
}

#[test]
fn identifier_column_is_refused_in_every_role() {
    let model = model();
    let in_filter = COHORT.replace(
        "{ column = \"iss\", op = \">=\", param = \"min_iss\" },",
        "{ column = \"iss\", op = \">=\", param = \"min_iss\" },\n  { column = \"national_id\", op = \"=\", value = \"x\" },",
    );
    let in_strata = format!("{COHORT}\n[[strata]]\ncolumn = \"case_number\"\n");
    for text in [in_filter, in_strata] {
        let template = Template::from_toml(&text, "t").unwrap();
        let err = template.check(&model, &no_extra()).unwrap_err();
        assert_eq!(
            err.refusal_code(),
            crate::wire::RefusalCode::IdentifierColumn
        );
        assert!(err.to_string().contains("is an identifier"), "{err}");
    }
}

#[test]
fn column_a_site_marks_as_identifier_is_refused() {
    let model = model();
    let template = cohort();
    let site_identifiers = BTreeSet::from(["sex".to_string()]);
    let err = template.check(&model, &site_identifiers).unwrap_err();
    assert_eq!(
        err.refusal_code(),
        crate::wire::RefusalCode::IdentifierColumn
    );
}

#[test]
fn unknown_column_is_refused_with_its_name() {
    let model = model();
    let template = Template::from_toml(
        &COHORT.replace("column = \"sex\"", "column = \"gender\""),
        "t",
    )
    .unwrap();
    let err = template.check(&model, &no_extra()).unwrap_err();
    assert_eq!(err.refusal_code(), crate::wire::RefusalCode::UnknownColumn);
    assert!(err.to_string().contains("'gender'"), "{err}");
}

#[test]
fn bands_that_leave_a_gap_are_refused() {
    let model = model();
    let gap = COHORT.replace("at_least = 18, below = 65", "at_least = 19, below = 65");
    let template = Template::from_toml(&gap, "t").unwrap();
    let err = template.check(&model, &no_extra()).unwrap_err().to_string();
    assert!(err.contains("must start where band '0-17' ends"), "{err}");
}

#[test]
fn bands_that_do_not_cover_the_domain_are_refused() {
    let model = model();
    let short = COHORT.replace(
        "{ label = \"65+\", at_least = 65 }",
        "{ label = \"65-99\", at_least = 65, below = 100 }",
    );
    let template = Template::from_toml(&short, "t").unwrap();
    let err = template.check(&model, &no_extra()).unwrap_err().to_string();
    assert!(err.contains("go up to 120"), "{err}");
}

#[test]
fn undeclared_and_unused_parameters_are_refused() {
    let model = model();
    let undeclared = Template::from_toml(
        &COHORT.replace("param = \"min_iss\"", "param = \"max_iss\""),
        "t",
    )
    .unwrap();
    let err = undeclared
        .check(&model, &no_extra())
        .unwrap_err()
        .to_string();
    assert!(err.contains("parameter 'max_iss' is not declared"), "{err}");
}

#[test]
fn binding_resolves_values_and_defaults() {
    let model = model();
    let template = cohort();
    let checked = template.check(&model, &no_extra()).unwrap();
    let bound = checked
        .bind(&[
            ("from".into(), date("2020-01-01")),
            ("to".into(), date("2020-12-31")),
        ])
        .unwrap();
    let Some(BoundFilter::All(conditions)) = bound.filter else {
        panic!("expected an 'all' filter");
    };
    assert_eq!(
        conditions[1],
        BoundFilter::Compare {
            column: "iss".into(),
            op: CompareOp::Ge,
            value: Scalar::Integer(0)
        }
    );
}

#[test]
fn out_of_range_parameter_is_refused_naming_it() {
    let model = model();
    let template = cohort();
    let checked = template.check(&model, &no_extra()).unwrap();
    let err = checked
        .bind(&[
            ("from".into(), date("2020-01-01")),
            ("to".into(), date("2020-12-31")),
            ("min_iss".into(), Value::Integer(99)),
        ])
        .unwrap_err();
    assert_eq!(
        err.refusal_code(),
        crate::wire::RefusalCode::InvalidParameter
    );
    let message = err.to_string();
    assert!(
        message.contains("'min_iss'") && message.contains("outside its limits 0 to 75"),
        "{message}"
    );
}

#[test]
fn missing_unknown_and_mistyped_parameters_are_refused() {
    let model = model();
    let template = cohort();
    let checked = template.check(&model, &no_extra()).unwrap();
    let missing = checked
        .bind(&[("from".into(), date("2020-01-01"))])
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("'to'") && missing.contains("is required"),
        "{missing}"
    );

    let unknown = checked
        .bind(&[("colour".into(), Value::Integer(1))])
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("'colour'") && unknown.contains("it takes: from, to, min_iss"),
        "{unknown}"
    );

    let mistyped = checked
        .bind(&[
            ("from".into(), Value::Integer(2020)),
            ("to".into(), date("2020-12-31")),
        ])
        .unwrap_err()
        .to_string();
    assert!(
        mistyped.contains("expects a date value, got a integer"),
        "{mistyped}"
    );
}

#[test]
fn category_parameter_outside_allowed_set_is_refused() {
    let text = r#"
id = "deaths"
version = 2
title = "Deaths"
description = "Deaths by mechanism."
data_model = "fedq-trauma/1"
dataset = "trauma_admissions"
[statistic]
kind = "count"
[[parameters]]
name = "mechanisms"
type = "categories"
column = "injury_mechanism"
allowed = ["fall", "assault"]
[filter]
column = "injury_mechanism"
op = "in"
param = "mechanisms"
"#;
    let model = model();
    let template = Template::from_toml(text, "t").unwrap();
    let checked = template.check(&model, &no_extra()).unwrap();
    let err = checked
        .bind(&[(
            "mechanisms".into(),
            Value::Categories(vec!["self_harm".into()]),
        )])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'self_harm' is not allowed; choose from: fall, assault"),
        "{err}"
    );
    let bound = checked
        .bind(&[(
            "mechanisms".into(),
            Value::Categories(vec!["assault".into()]),
        )])
        .unwrap();
    assert_eq!(
        bound.filter,
        Some(BoundFilter::OneOf {
            column: "injury_mechanism".into(),
            values: vec![Scalar::Category(2)]
        })
    );
}

#[test]
fn wrong_data_model_version_is_refused() {
    let model = model();
    let template =
        Template::from_toml(&COHORT.replace("fedq-trauma/1", "fedq-trauma/2"), "t").unwrap();
    let err = template.check(&model, &no_extra()).unwrap_err();
    assert_eq!(
        err.refusal_code(),
        crate::wire::RefusalCode::DataModelMismatch
    );
}

#[test]
fn empty_between_range_is_refused_naming_both_parameters() {
    let model = model();
    let template = cohort();
    let checked = template.check(&model, &no_extra()).unwrap();
    let err = checked
        .bind(&[
            ("from".into(), date("2023-01-01")),
            ("to".into(), date("2021-01-01")),
        ])
        .unwrap_err();
    assert_eq!(
        err.refusal_code(),
        crate::wire::RefusalCode::InvalidParameter
    );
    let message = err.to_string();
    assert!(
        message.contains("'from' (2023-01-01) is after 'to' (2021-01-01)"),
        "{message}"
    );
}

#[test]
fn oversized_filters_and_duplicate_in_values_are_refused() {
    let model = model();
    let conditions: Vec<String> = (0..70)
        .map(|i| format!("{{ column = \"iss\", op = \">=\", value = {i} }}"))
        .collect();
    let huge = COHORT.replace(
        "{ column = \"iss\", op = \">=\", param = \"min_iss\" },",
        &format!(
            "{{ column = \"iss\", op = \">=\", param = \"min_iss\" }},\n{},",
            conditions.join(",\n")
        ),
    );
    let template = Template::from_toml(&huge, "t").unwrap();
    let err = template.check(&model, &no_extra()).unwrap_err().to_string();
    assert!(err.contains("at most 64 are allowed"), "{err}");

    let duplicates = COHORT.replace(
        "{ column = \"iss\", op = \">=\", param = \"min_iss\" },",
        "{ column = \"iss\", op = \">=\", param = \"min_iss\" },\n{ column = \"sex\", op = \"in\", values = [\"male\", \"male\"] },",
    );
    let template = Template::from_toml(&duplicates, "t").unwrap();
    let err = template.check(&model, &no_extra()).unwrap_err().to_string();
    assert!(err.contains("'male' is listed twice"), "{err}");
}

#[test]
fn canonical_content_is_the_same_however_the_same_question_is_asked() {
    let template = cohort();
    let model = model();
    let checked = template.check(&model, &no_extra()).unwrap();
    let period = |extra: Vec<(String, Value)>| {
        let mut values = vec![
            ("from".to_string(), date("2020-01-01")),
            ("to".to_string(), date("2020-12-31")),
        ];
        values.extend(extra);
        values
    };
    let omitted = checked.canonical_content(&period(vec![])).unwrap();
    let explicit = checked
        .canonical_content(&period(vec![("min_iss".into(), Value::Integer(0))]))
        .unwrap();
    assert_eq!(
        omitted, explicit,
        "an omitted default equals the default given"
    );
    let reordered = {
        let mut values = period(vec![]);
        values.reverse();
        checked.canonical_content(&values).unwrap()
    };
    assert_eq!(omitted, reordered);
    let other = checked
        .canonical_content(&period(vec![("min_iss".into(), Value::Integer(1))]))
        .unwrap();
    assert_ne!(omitted, other);
}

/// A profile template: `age` and `sex` profiled alone, two checks.
fn profile(checks: &str) -> String {
    let head = COHORT
        .replace("kind = \"count\"", "kind = \"profile\"")
        .replace("id = \"cohort-by-age-sex\"", "id = \"quality\"");
    format!("{head}\n{checks}")
}

const CHECKS: &str = r#"
[[checks]]
name = "outcome-within-stay"
title = "outcome no later than the end of the stay"
rule = { column = "days_to_outcome", op = "<=", other_column = "length_of_stay" }

[[checks]]
name = "bp-plausible"
title = "systolic pressure between 40 and 250"
rule = { column = "systolic_bp", op = "between", values = [40, 250] }
"#;

#[test]
fn a_profile_has_one_section_per_column_and_check_and_binds_column_comparisons() {
    let template = Template::from_toml(&profile(CHECKS), "q").unwrap();
    let model = model();
    let checked = template.check(&model, &no_extra()).unwrap();
    let columns: Vec<&str> = checked
        .axes
        .iter()
        .map(|axis| axis.column.as_str())
        .collect();
    assert_eq!(
        columns,
        ["age", "sex", "outcome-within-stay", "bp-plausible"]
    );
    assert_eq!(
        checked.axes[0].levels,
        ["0-17", "18-64", "65+", "outside domain", "missing"]
    );
    assert_eq!(checked.axes[2].levels, CHECK_LEVELS);
    // The canonical form keeps the column comparison.
    let decoded = Template::from_canonical(&template.canonical_bytes()).unwrap();
    assert_eq!(decoded, template);
    let bound = checked
        .bind(&[
            ("from".into(), date("2019-01-01")),
            ("to".into(), date("2019-12-31")),
        ])
        .unwrap();
    assert_eq!(bound.statistic, Statistic::Profile);
    assert_eq!(
        bound.checks[0].rule,
        BoundFilter::CompareColumns {
            column: "days_to_outcome".into(),
            op: CompareOp::Le,
            other: "length_of_stay".into(),
        }
    );
    assert_eq!(
        bound.checks[0].columns,
        ["days_to_outcome", "length_of_stay"]
    );
    assert!(template.columns_used().contains("length_of_stay"));
}

#[test]
fn column_comparisons_need_two_number_or_date_columns_and_no_identifier() {
    let model = model();
    for (rule, words) in [
        (
            r#"{ column = "sex", op = "=", other_column = "icu_admission" }"#,
            "compares two different number or date columns",
        ),
        (
            r#"{ column = "iss", op = "<=", other_column = "admission_date" }"#,
            "compares two different number or date columns",
        ),
        (
            r#"{ column = "iss", op = "<=", other_column = "iss" }"#,
            "compares two different number or date columns",
        ),
        (
            r#"{ column = "iss", op = "<=", other_column = "national_id" }"#,
            "is an identifier",
        ),
    ] {
        let text = profile(&format!(
            "[[checks]]\nname = \"c\"\ntitle = \"t\"\nrule = {rule}\n"
        ));
        let template = Template::from_toml(&text, "q").unwrap();
        let err = template.check(&model, &no_extra()).unwrap_err().to_string();
        assert!(err.contains(words), "{rule}: {err}");
    }
    // Checks belong to profiles only.
    let count = format!("{COHORT}\n{CHECKS}");
    let template = Template::from_toml(&count, "c").unwrap();
    let err = template.check(&model, &no_extra()).unwrap_err().to_string();
    assert!(
        err.contains("'checks' belong to data-quality profiles"),
        "{err}"
    );
}

#[test]
fn coarse_parameters_take_only_aligned_dates_and_stepped_integers() {
    let text = COHORT
        .replace(
            "min = \"2010-01-01\"\nmax = \"2030-12-31\"\n\n[[parameters]]\nname = \"to\"",
            "min = \"2010-01-01\"\nmax = \"2030-12-31\"\nalign = \"month_start\"\n\n[[parameters]]\nname = \"to\"",
        )
        .replace("max = 75\ndefault = 0", "max = 75\ndefault = 0\nstep = 5");
    let template = Template::from_toml(&text, "coarse").unwrap();
    assert!(template.parameters[0].align.is_some() && template.parameters[2].step == Some(5));
    let model = model();
    let checked = template.check(&model, &no_extra()).unwrap();
    let bind = |from: &str, min_iss: i64| {
        checked.bind(&[
            ("from".into(), date(from)),
            ("to".into(), date("2020-06-30")),
            ("min_iss".into(), Value::Integer(min_iss)),
        ])
    };
    assert!(bind("2020-03-01", 15).is_ok());
    let err = bind("2020-03-02", 15).unwrap_err().to_string();
    assert!(err.contains("must be the first day of a month"), "{err}");
    let err = bind("2020-03-01", 16).unwrap_err().to_string();
    assert!(err.contains("in steps of 5 from 0"), "{err}");
    assert!(Align::MonthEnd.holds(parse_date("2024-02-29").unwrap()));
    assert!(Align::MonthEnd.holds(parse_date("2023-02-28").unwrap()));
    assert!(!Align::MonthEnd.holds(parse_date("2024-02-28").unwrap()));
    assert!(Align::YearEnd.holds(parse_date("2024-12-31").unwrap()));
    // Misplaced settings are refused.
    let misplaced = COHORT.replace(
        "max = 75\ndefault = 0",
        "max = 75\ndefault = 0\nalign = \"month_start\"",
    );
    let err = Template::from_toml(&misplaced, "m")
        .unwrap()
        .check(&model, &no_extra())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'align' applies only to date parameters"),
        "{err}"
    );
}

#[test]
fn a_category_stratum_keeps_only_the_categories_the_filter_admits() {
    let text = r#"
id = "deaths"
version = 1
title = "Deaths"
description = "Deaths by mechanism and sex."
data_model = "fedq-trauma/1"
dataset = "trauma_admissions"
[statistic]
kind = "count"
[[parameters]]
name = "mechanisms"
type = "categories"
column = "injury_mechanism"
default = ["road_traffic", "fall", "assault", "self_harm", "other"]
[filter]
all = [
  { column = "injury_mechanism", op = "in", param = "mechanisms" },
  { all = [{ column = "injury_mechanism", op = "in", values = ["fall", "assault", "other"] }] },
  { any = [{ column = "sex", op = "=", value = "female" }, { column = "iss", op = ">=", value = 16 }] },
]
[[strata]]
column = "injury_mechanism"
[[strata]]
column = "sex"
"#;
    let model = model();
    let template = Template::from_toml(text, "t").unwrap();
    let checked = template.check(&model, &no_extra()).unwrap();
    let mechanisms = |names: &[&str]| {
        let names = names.iter().map(|name| name.to_string()).collect();
        vec![("mechanisms".to_string(), Value::Categories(names))]
    };
    // Given in any order, the admitted categories keep the model's order; a condition nested
    // in `all` narrows them further; one inside `any` narrows nothing.
    let bound = checked
        .bind(&mechanisms(&["self_harm", "assault", "fall"]))
        .unwrap();
    assert_eq!(bound.axes[0].levels, ["fall", "assault", MISSING_LEVEL]);
    assert_eq!(
        bound.strata[0],
        BoundStratum::Categories {
            column: "injury_mechanism".into(),
            categories: vec![1, 2],
        }
    );
    assert_eq!(bound.axes[1], checked.axes[1]);
    // Every record has a mechanism (the filter requires one): the `missing` mechanism row is
    // empty by definition; sex is only required under `any`.
    assert_eq!(bound.missing_empty, [true, false]);
    let empty = bound.empty_cells();
    assert_eq!(empty.len(), 3 * 4);
    assert_eq!(
        (0..empty.len())
            .filter(|&cell| empty[cell])
            .collect::<Vec<_>>(),
        [8, 9, 10, 11]
    );
    assert_eq!(
        bound.strata[1],
        BoundStratum::Categories {
            column: "sex".into(),
            categories: vec![0, 1, 2],
        }
    );
    // One mechanism left: its `missing` row is not marked (each column would be one cell).
    let one = checked.bind(&mechanisms(&["fall"])).unwrap();
    assert_eq!(one.axes[0].levels, ["fall", MISSING_LEVEL]);
    assert_eq!(one.missing_empty, [false, false]);
    // Conditions that together admit no category leave the full grid (of zeros).
    let none = checked.bind(&mechanisms(&["road_traffic"])).unwrap();
    assert_eq!(none.axes, checked.axes);
    // A profile counts every category, whatever the filter.
    let profile = Template::from_toml(&text.replace("\"count\"", "\"profile\""), "p").unwrap();
    let checked = profile.check(&model, &no_extra()).unwrap();
    let bound = checked.bind(&mechanisms(&["fall"])).unwrap();
    assert_eq!(bound.axes, checked.axes);
    assert!(!bound.empty_cells().contains(&true));
}
