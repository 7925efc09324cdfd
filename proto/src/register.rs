//! The transparency register's public forms: JSON and a static HTML page a hospital or the
//! alliance can publish. One renderer serves a single site's register and the alliance-wide
//! one (every site's register side by side, grouped by study). Registers carry no parameter
//! values and no results, only what studies used the data, for what, and how often.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::wire;

/// The register as JSON: `{"generated_at", "sites": [{"site_id", "studies": [...]}]}`.
pub fn to_json(generated_at: &str, sites: &[wire::SiteRegister]) -> serde_json::Value {
    let sites: Vec<serde_json::Value> = sites
        .iter()
        .map(|site| {
            let studies: Vec<serde_json::Value> = site
                .studies
                .iter()
                .map(|study| {
                    json!({
                        "study_id": study.study_id,
                        "title": study.title,
                        "purpose": study.purpose,
                        "lead_institution": study.lead_institution,
                        "ethics_reference": study.ethics_reference,
                        "valid_from": study.valid_from,
                        "valid_until": study.valid_until,
                        "queries_per_month": study.queries_per_month.iter().map(|month| json!({
                            "month": month.month,
                            "queries": month.queries,
                        })).collect::<Vec<_>>(),
                        "templates_used": study.templates_used,
                    })
                })
                .collect();
            json!({
                "site_id": site.site_id,
                "generated_at": site.generated_at,
                "studies": studies,
            })
        })
        .collect();
    json!({ "generated_at": generated_at, "sites": sites })
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// One study as seen across sites.
struct StudyRows<'a> {
    study: &'a wire::RegisterStudy,
    /// site → month → answered queries.
    per_site: BTreeMap<&'a str, BTreeMap<&'a str, u64>>,
    templates: BTreeSet<&'a str>,
}

/// The register as a self-contained HTML page (no scripts, no external resources).
pub fn to_html(heading: &str, generated_at: &str, sites: &[wire::SiteRegister]) -> String {
    let mut studies: BTreeMap<&str, StudyRows<'_>> = BTreeMap::new();
    for site in sites {
        for study in &site.studies {
            let rows = studies
                .entry(study.study_id.as_str())
                .or_insert_with(|| StudyRows {
                    study,
                    per_site: BTreeMap::new(),
                    templates: BTreeSet::new(),
                });
            let months = rows.per_site.entry(site.site_id.as_str()).or_default();
            for month in &study.queries_per_month {
                *months.entry(month.month.as_str()).or_default() += month.queries;
            }
            rows.templates
                .extend(study.templates_used.iter().map(String::as_str));
        }
    }
    let mut page = String::new();
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    page.push_str(&format!("<title>{}</title>\n", escape(heading)));
    page.push_str("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}table{border-collapse:collapse}td,th{border:1px solid #999;padding:.2em .6em;text-align:right}th:first-child,td:first-child{text-align:left}dt{font-weight:bold}</style>\n");
    page.push_str("</head>\n<body>\n");
    page.push_str(&format!("<h1>{}</h1>\n", escape(heading)));
    page.push_str(&format!(
        "<p>Which approved studies used patient data held at {}, for what purpose, and how often. \
         Only counts of answered statistical queries are shown: no query contents and no results. \
         Generated {}.</p>\n",
        escape(
            &sites
                .iter()
                .map(|site| site.site_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        escape(generated_at)
    ));
    if studies.is_empty() {
        page.push_str("<p>No study has used this data yet.</p>\n");
    }
    for rows in studies.values() {
        let study = rows.study;
        page.push_str(&format!(
            "<section>\n<h2>{}</h2>\n<dl>\n<dt>Purpose</dt><dd>{}</dd>\n<dt>Lead institution</dt><dd>{}</dd>\n<dt>Ethics approval</dt><dd>{}</dd>\n<dt>Approved period</dt><dd>{} to {}</dd>\n<dt>Study id</dt><dd>{}</dd>\n</dl>\n",
            escape(&study.title),
            escape(&study.purpose),
            escape(&study.lead_institution),
            escape(&study.ethics_reference),
            escape(&study.valid_from),
            escape(&study.valid_until),
            escape(&study.study_id),
        ));
        let months: BTreeSet<&str> = rows
            .per_site
            .values()
            .flat_map(|months| months.keys().copied())
            .collect();
        page.push_str("<table>\n<tr><th>Site</th>");
        for month in &months {
            page.push_str(&format!("<th>{}</th>", escape(month)));
        }
        page.push_str("</tr>\n");
        for (site, counts) in &rows.per_site {
            page.push_str(&format!("<tr><td>{}</td>", escape(site)));
            for month in &months {
                page.push_str(&format!(
                    "<td>{}</td>",
                    counts.get(month).copied().unwrap_or(0)
                ));
            }
            page.push_str("</tr>\n");
        }
        page.push_str("</table>\n<p>Queries used these approved templates:</p>\n<ul>\n");
        for template in &rows.templates {
            page.push_str(&format!("<li>{}</li>\n", escape(template)));
        }
        page.push_str("</ul>\n</section>\n");
    }
    page.push_str("</body>\n</html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(site_id: &str, month: &str, queries: u64) -> wire::SiteRegister {
        wire::SiteRegister {
            site_id: site_id.into(),
            generated_at: "2026-11-23T10:00:00Z".into(),
            studies: vec![wire::RegisterStudy {
                study_id: "s1".into(),
                title: "Outcomes <after> trauma".into(),
                purpose: "Learn & improve".into(),
                queries_per_month: vec![wire::MonthCount {
                    month: month.into(),
                    queries,
                }],
                templates_used: vec!["Deaths by mechanism".into()],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn html_escapes_text_and_lists_each_site_under_its_study() {
        let page = to_html(
            "Register",
            "now",
            &[site("north", "2026-10", 3), site("south", "2026-11", 5)],
        );
        assert!(page.contains("Outcomes &lt;after&gt; trauma"));
        assert!(page.contains("Learn &amp; improve"));
        assert!(!page.contains("<after>"));
        assert!(page.contains("<tr><td>north</td><td>3</td><td>0</td></tr>"));
        assert!(page.contains("<tr><td>south</td><td>0</td><td>5</td></tr>"));
        assert_eq!(page.matches("<section>").count(), 1);
    }

    #[test]
    fn json_keeps_every_site_and_month() {
        let value = to_json("now", &[site("north", "2026-10", 3)]);
        assert_eq!(value["sites"][0]["site_id"], "north");
        assert_eq!(
            value["sites"][0]["studies"][0]["queries_per_month"][0]["queries"],
            3
        );
    }
}
