//! `fedq-alliance prepare`: the files of a three-site alliance for containers
//! (`deploy/container/compose.yaml`): development certificates, the signed catalogue and
//! studies, each site's synthetic data, and node and coordinator configurations that name the
//! compose services as hosts — site-a and site-b listen, site-c dials the coordinator
//! (outbound-only). Run once into the shared volume; a prepared folder is left as it is, so
//! restarting the alliance keeps its audit logs, keys and budgets.

use std::io::Write;
use std::path::Path;

use crate::alliance::{Groundwork, NodeListing, QUALITY_STUDY_ID, Reach, STUDY_ID, site_identity};
use crate::synth::SiteProfile;

/// The port every node listens on inside its container.
pub const NODE_PORT: u16 = 7443;
/// The coordinator's port for study leads.
pub const COORDINATOR_PORT: u16 = 7700;
/// The coordinator's tunnel port for outbound-only nodes.
pub const TUNNEL_PORT: u16 = 7701;
/// The compose service of the coordinator (its host name on the alliance's network).
pub const COORDINATOR_SERVICE: &str = "coordinator";
/// The site that dials out (the small rural hospital behind its firewall).
pub const OUTBOUND_SITE: &str = "site-c";

/// Prepares the alliance's files under `out` unless they are there already. Node `i` is the
/// compose service named by its site id.
pub async fn prepare(
    out: &Path,
    scale: f64,
    templates: &Path,
    output: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let coordinator_config = out.join("config").join("coordinator.toml");
    if coordinator_config.is_file() {
        writeln!(
            output,
            "{} is prepared already; keeping it (delete the folder to start afresh)",
            out.display()
        )?;
        return Ok(());
    }
    let sites = SiteProfile::demo_sites(scale);
    let ground = Groundwork::create(out, &sites, templates).await?;
    let mut listings = Vec::new();
    for (index, site) in sites.iter().enumerate() {
        let outbound = site.site_id == OUTBOUND_SITE;
        let reach = if outbound {
            Reach::Dial(format!("{COORDINATOR_SERVICE}:{TUNNEL_PORT}"))
        } else {
            Reach::Listen(format!("0.0.0.0:{NODE_PORT}"))
        };
        let config = ground.write_node(&sites, index, 10, reach)?;
        listings.push(NodeListing {
            site_id: site.site_id.clone(),
            address: (!outbound).then(|| format!("https://{}:{NODE_PORT}", site.site_id)),
            identity: site_identity(&site.site_id),
        });
        writeln!(
            output,
            "{}: {} admissions, {}",
            site.site_id,
            site.admissions,
            config.display()
        )?;
    }
    let written = ground.write_coordinator(
        &listings,
        &format!("0.0.0.0:{COORDINATOR_PORT}"),
        &format!("0.0.0.0:{TUNNEL_PORT}"),
    )?;
    // Settings for the `fedq` command on the host, one file per person (each token is a
    // secret: owner-only files). Copy them and certs/ca.pem into one folder there; inside the
    // coordinator's container the CA is /alliance/certs/ca.pem.
    let people = [
        ("study-lead.env", &ground.users.study_lead, Some(STUDY_ID)),
        ("expert.env", &ground.users.expert, None),
        ("administrator.env", &ground.users.administrator, None),
    ];
    for (file, token, study) in people {
        let study = study
            .map(|study| format!("FEDQ_STUDY={study}\n"))
            .unwrap_or_default();
        let text = format!(
            "FEDQ_COORDINATOR=https://localhost:{COORDINATOR_PORT}\nFEDQ_CA_CERT=ca.pem\n{study}FEDQ_TOKEN={token}\n"
        );
        write_private(&ground.root.join(file), &text)?;
    }
    writeln!(output, "coordinator: {}", written.display())?;
    writeln!(
        output,
        "settings for the fedq command (tokens included): {}/{{study-lead,expert,administrator}}.env with certs/ca.pem — studies {STUDY_ID} and {QUALITY_STUDY_ID}",
        ground.root.display()
    )?;
    Ok(())
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}
