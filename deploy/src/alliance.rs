//! A local alliance on loopback: development certificates, each site's synthetic data file and
//! node configuration, real nodes and a real coordinator serving over mutual TLS on
//! `127.0.0.1:0`. The demo, the benchmark and the end-to-end tests all build on these pieces;
//! every piece is the production code path (config files are written and loaded like a
//! hospital's own).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fedq_coordinator::certs::{self, DevPki};
use fedq_coordinator::config::CoordinatorConfig;
use fedq_coordinator::experts::{self, DocumentKind, GeneratedKey};
use fedq_coordinator::server::PreparedCoordinator;
use fedq_node::config::NodeConfig;
use fedq_node::server::PreparedNode;
use fedq_proto::study::{PinnedTemplate, Study};
use fedq_proto::template::Template;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::synth::{self, SiteProfile};

/// Where a local alliance's servers listen: loopback, any free port.
const LOOPBACK: &str = "127.0.0.1:0";

/// The coordinator's certificate identity in a local alliance.
pub const COORDINATOR_IDENTITY: &str = "coordinator.fedq.local";

/// A site's certificate identity in a local alliance.
pub fn site_identity(site_id: &str) -> String {
    format!("{site_id}.fedq.local")
}

/// The approved templates shipped with fedq (`deploy/templates`).
pub fn bundled_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")
}

/// A server running in this process; stops when [`Running::stop`] is called or it is dropped.
#[derive(Debug)]
pub struct Running {
    /// Where the server listens (an outbound-only node: the coordinator tunnel it dials).
    pub address: SocketAddr,
    /// Where a coordinator accepts outbound nodes, if it does.
    pub tunnel: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), String>>,
}

impl Running {
    /// Stops gracefully and waits for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?.map_err(anyhow::Error::msg)
    }

    /// Stops abruptly, as if the process died.
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The shutdown future handed to a server: completes when its [`Running`] is stopped.
type Stopped = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs a server task that stops when the returned [`Running`] is stopped or dropped.
fn spawn_server<F>(address: SocketAddr, serve: impl FnOnce(Stopped) -> F) -> Running
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    // Sent or dropped: either way the server stops.
    let task = tokio::spawn(serve(Box::pin(async move {
        let _ = stopped.await;
    })));
    Running {
        address,
        tunnel: None,
        stop: Some(stop),
        task,
    }
}

async fn loopback(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))
}

/// Loads a node's configuration and data and serves it on a fresh loopback port.
pub async fn start_node(config_path: &Path) -> anyhow::Result<Running> {
    start_node_on(config_path, 0).await
}

/// Like [`start_node`], on loopback `port` (0: any free port) — to restart a node where the
/// coordinator expects it.
pub async fn start_node_on(config_path: &Path, port: u16) -> anyhow::Result<Running> {
    let config = NodeConfig::load(config_path)?;
    let (node, _warnings) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || PreparedNode::load(&config)
    })
    .await??;
    let (listener, address) = match (&config.listen, &config.outbound) {
        (Some(_), _) => {
            let listener = loopback(port).await?;
            let address = listener.local_addr()?;
            (Some(listener), address)
        }
        (None, Some(outbound)) => {
            let address = tokio::net::lookup_host(&outbound.coordinator)
                .await?
                .next()
                .context("the outbound coordinator address resolves to nothing")?;
            (None, address)
        }
        (None, None) => anyhow::bail!("the node neither listens nor dials out"),
    };
    Ok(spawn_server(address, move |stopped| async move {
        node.serve(listener, stopped)
            .await
            .map_err(|err| err.to_string())
    }))
}

/// Loads a coordinator's configuration and serves it on loopback `port` (0: any free port),
/// accepting outbound nodes on a fresh loopback port if the configuration has `tunnel_listen`.
pub async fn start_coordinator(config_path: &Path, port: u16) -> anyhow::Result<Running> {
    let config = CoordinatorConfig::load(config_path)?;
    let coordinator = PreparedCoordinator::new(&config)?;
    let listener = loopback(port).await?;
    let address = listener.local_addr()?;
    let tunnel = match config.tunnel_listen {
        Some(_) => Some(loopback(0).await?),
        None => None,
    };
    let tunnel_address = tunnel.as_ref().map(TcpListener::local_addr).transpose()?;
    let mut running = spawn_server(address, move |stopped| async move {
        coordinator
            .serve(listener, tunnel, stopped)
            .await
            .map_err(|err| err.to_string())
    });
    running.tunnel = tunnel_address;
    Ok(running)
}

/// Options for one node's configuration file.
#[derive(Debug, Clone)]
pub struct NodeFiles<'a> {
    pub site_id: &'a str,
    pub data_file: &'a Path,
    pub format: synth::LocalFormat,
    pub ca_cert: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub accepted_coordinators: &'a [&'a str],
    pub min_cell_count: u32,
    /// Public key files of the experts this site trusts.
    pub trusted_expert_keys: &'a [PathBuf],
    pub signature_quorum: usize,
    /// Studies this site accepts.
    pub accepted_studies: &'a [&'a str],
    /// How the coordinator reaches the node.
    pub reach: Reach,
}

/// How a node is reached, as its configuration says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// It listens on this address (e.g. `127.0.0.1:0`, `0.0.0.0:7443`).
    Listen(String),
    /// Outbound-only: it dials the coordinator's tunnel at this `host:port`.
    Dial(String),
}

/// The state directory a node configuration written into `folder` gives its site.
pub fn node_state_dir(folder: &Path, site_id: &str) -> PathBuf {
    folder.join("state").join(site_id)
}

/// Writes a node configuration file (as a hospital administrator would) and returns its path.
pub fn write_node_config(folder: &Path, files: &NodeFiles<'_>) -> anyhow::Result<PathBuf> {
    let identifiers: Vec<String> = synth::identifier_columns(files.format)
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect();
    let accepted: Vec<String> = files
        .accepted_coordinators
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect();
    let text = format!(
        r#"# fedq node configuration for {site} (generated for a local alliance)
site_id = "{site}"
{listen}state_dir = "{state}"
{outbound}
[tls]
ca_cert = "{ca}"
cert = "{cert}"
key = "{key}"

[policy]
accepted_coordinators = [{accepted}]
min_cell_count = {floor}
trusted_expert_keys = [{trusted}]
signature_quorum = {quorum}
accepted_studies = [{studies}]

[[datasets]]
name = "trauma_admissions"
path = "{data}"
identifiers = [{identifiers}]

[datasets.columns]
{mapping}"#,
        site = files.site_id,
        listen = match &files.reach {
            Reach::Listen(address) => format!("listen = \"{address}\"\n"),
            Reach::Dial(_) => String::new(),
        },
        outbound = match &files.reach {
            Reach::Listen(_) => String::new(),
            Reach::Dial(tunnel) => format!(
                "\n[outbound]\ncoordinator = \"{tunnel}\"\ncoordinator_identity = \"{}\"\n",
                files
                    .accepted_coordinators
                    .first()
                    .copied()
                    .unwrap_or_default()
            ),
        },
        state = node_state_dir(folder, files.site_id).display(),
        ca = files.ca_cert.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        accepted = accepted.join(", "),
        floor = files.min_cell_count,
        trusted = files
            .trusted_expert_keys
            .iter()
            .map(|path| format!("\"{}\"", path.display()))
            .collect::<Vec<_>>()
            .join(", "),
        quorum = files.signature_quorum,
        studies = files
            .accepted_studies
            .iter()
            .map(|id| format!("\"{id}\""))
            .collect::<Vec<_>>()
            .join(", "),
        data = files.data_file.display(),
        identifiers = identifiers.join(", "),
        mapping = synth::column_mapping(files.format),
    );
    let path = folder.join(format!("{}.toml", files.site_id));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A local alliance site's node configuration options: its certificate, every expert trusted
/// (quorum 2), the alliance's studies, and how it is reached.
fn site_files<'a>(
    site: &'a SiteProfile,
    data_file: &'a Path,
    pki: &'a DevPki,
    trusted: &'a [PathBuf],
    min_cell_count: u32,
    reach: Reach,
) -> anyhow::Result<NodeFiles<'a>> {
    let issued = pki
        .identities
        .iter()
        .find(|issued| issued.identity == site_identity(&site.site_id))
        .context("no certificate issued for the site")?;
    Ok(NodeFiles {
        site_id: &site.site_id,
        data_file,
        format: site.format,
        ca_cert: &pki.ca_cert,
        cert: &issued.cert,
        key: &issued.key,
        accepted_coordinators: &[COORDINATOR_IDENTITY],
        min_cell_count,
        trusted_expert_keys: trusted,
        signature_quorum: 2,
        accepted_studies: &[STUDY_ID, QUALITY_STUDY_ID],
        reach,
    })
}

/// One node as the coordinator's configuration lists it.
#[derive(Debug, Clone)]
pub struct NodeListing {
    pub site_id: String,
    /// `https://host:port` where the node listens; `None`: it dials the coordinator
    /// (outbound-only).
    pub address: Option<String>,
    pub identity: String,
}

impl NodeListing {
    /// A local alliance's node listening on loopback `address`.
    pub fn loopback(site_id: &str, address: SocketAddr) -> NodeListing {
        NodeListing {
            site_id: site_id.to_string(),
            address: Some(format!("https://localhost:{}", address.port())),
            identity: site_identity(site_id),
        }
    }
}

/// Everything a coordinator configuration file says, for [`write_coordinator_config`].
#[derive(Debug, Clone)]
pub struct CoordinatorFiles<'a> {
    pub catalogue: &'a SignedCatalogue,
    pub users: &'a Users,
    pub pki: &'a DevPki,
    pub coordinator_identity: &'a str,
    pub nodes: &'a [NodeListing],
    pub default_deadline_ms: u64,
    /// Where study leads connect, e.g. `127.0.0.1:0`.
    pub listen: &'a str,
    /// Where outbound nodes dial (written only if some node is outbound).
    pub tunnel_listen: &'a str,
}

/// Writes a coordinator configuration file into `folder` and returns its path.
pub fn write_coordinator_config(
    folder: &Path,
    files: &CoordinatorFiles<'_>,
) -> anyhow::Result<PathBuf> {
    let issued = files
        .pki
        .identities
        .iter()
        .find(|issued| issued.identity == files.coordinator_identity)
        .context("no certificate issued for the coordinator")?;
    let mut text = format!(
        r#"# fedq coordinator configuration (generated for a local alliance)
listen = "{listen}"
{tunnel}templates = "{templates}"
studies = "{studies}"
state_dir = "{state}"

[tls]
ca_cert = "{ca}"
cert = "{cert}"
key = "{key}"

[query]
default_deadline_ms = {deadline}
max_deadline_ms = 120000
"#,
        listen = files.listen,
        tunnel = if files.nodes.iter().any(|node| node.address.is_none()) {
            format!("tunnel_listen = \"{}\"\n", files.tunnel_listen)
        } else {
            String::new()
        },
        templates = files.catalogue.templates.display(),
        studies = files.catalogue.studies.display(),
        state = folder.join("state").join("coordinator").display(),
        ca = files.pki.ca_cert.display(),
        cert = issued.cert.display(),
        key = issued.key.display(),
        deadline = files.default_deadline_ms,
    );
    if files
        .catalogue
        .templates
        .join("data-quality.toml")
        .is_file()
    {
        text.push_str(&format!(
            "\n[quality]\nstudy = \"{QUALITY_STUDY_ID}\"\ntemplate = \"data-quality\"\nmax_missing_percent = 15.0\nmax_outside_domain_percent = 1.0\nmax_implausible_percent = 2.0\n"
        ));
    }
    text.push_str(&files.users.config);
    for node in files.nodes {
        let reach = match &node.address {
            Some(address) => format!("address = \"{address}\""),
            None => "outbound = true".to_string(),
        };
        text.push_str(&format!(
            "\n[[nodes]]\nsite_id = \"{}\"\n{reach}\nidentity = \"{}\"\n",
            node.site_id, node.identity
        ));
    }
    let path = folder.join("coordinator.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The local alliance's experts: Ada, Ben and Chen.
pub const EXPERTS: [(&str, &str); 3] = [
    ("Dr. Ada Okafor", "ada"),
    ("Dr. Ben Novak", "ben"),
    ("Dr. Chen Li", "chen"),
];

/// The people of a local alliance's coordinator and their API tokens.
#[derive(Debug, Clone)]
pub struct Users {
    /// Token of the study lead named in the study approval.
    pub study_lead: String,
    /// Token of an expert (may read, may not query).
    pub expert: String,
    /// Token of an administrator (reads everything, lifts holds, runs no queries).
    pub administrator: String,
    /// The `[[users]]` configuration blocks (hashes only).
    config: String,
}

/// The administrator of every local alliance's coordinator.
pub const ADMINISTRATOR: &str = "Alliance Administrator";

/// The study lead every local alliance's study names.
pub const STUDY_LEAD: &str = "Dr. Lea Study";

impl Users {
    /// Creates tokens for the study lead and one expert.
    pub fn create() -> anyhow::Result<Users> {
        let (study_lead, lead_hash) = fedq_coordinator::users::new_token()?;
        let (expert, expert_hash) = fedq_coordinator::users::new_token()?;
        let (administrator, administrator_hash) = fedq_coordinator::users::new_token()?;
        let config = format!(
            "\n[[users]]\nname = \"{STUDY_LEAD}\"\nrole = \"study_lead\"\ntoken_hash = \"{lead_hash}\"\n\n[[users]]\nname = \"{}\"\nrole = \"expert\"\ntoken_hash = \"{expert_hash}\"\n\n[[users]]\nname = \"{ADMINISTRATOR}\"\nrole = \"administrator\"\ntoken_hash = \"{administrator_hash}\"\n",
            EXPERTS[0].0
        );
        Ok(Users {
            study_lead,
            expert,
            administrator,
            config,
        })
    }
}

/// The study every local alliance approves: all its templates, all its sites.
pub const STUDY_ID: &str = "trauma-outcomes";

/// The standing data-quality study of a local alliance: it pins the profile templates, and
/// `fedq quality` runs under it. (Its study lead is the research study's, who doubles as the
/// alliance's data steward here.)
pub const QUALITY_STUDY_ID: &str = "alliance-data-quality";

/// Where a signed catalogue lives.
#[derive(Debug, Clone)]
pub struct SignedCatalogue {
    pub experts: Vec<GeneratedKey>,
    /// Approved templates with their signatures files.
    pub templates: PathBuf,
    /// The study approval [`STUDY_ID`] with its signatures file.
    pub studies: PathBuf,
}

/// Creates the three expert keys under `root/experts`, copies every template from `templates`
/// into `root/catalogue` and has Ada and Ben sign each one (quorum 2 of 3), then writes and
/// signs the study approvals for `sites` in `root/studies`: [`STUDY_ID`] pinning every count
/// template, [`QUALITY_STUDY_ID`] every profile template.
pub fn sign_catalogue(
    root: &Path,
    templates: &Path,
    sites: &[&str],
) -> anyhow::Result<SignedCatalogue> {
    let experts_dir = root.join("experts");
    let catalogue = root.join("catalogue");
    std::fs::create_dir_all(&catalogue)?;
    let experts = EXPERTS
        .iter()
        .map(|(name, file)| experts::generate_key(name, file, &experts_dir))
        .collect::<Result<Vec<_>, _>>()?;
    // Count templates are pinned by the research study, profiles by the standing data-quality
    // study.
    let (mut pins, mut profiles) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(templates)? {
        let source = entry?.path();
        let name = source
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        if !name.ends_with(".toml") || name.ends_with(".signatures.toml") {
            continue;
        }
        let copy = catalogue.join(name);
        std::fs::copy(&source, &copy)?;
        for expert in &experts[..2] {
            experts::sign_file(&copy, DocumentKind::Template, &expert.secret)?;
        }
        let template = Template::from_toml(&std::fs::read_to_string(&copy)?, name)?;
        if template.statistic.is_profile() {
            profiles.push(PinnedTemplate::of(&template));
        } else {
            pins.push(PinnedTemplate::of(&template));
        }
    }
    pins.sort_by(|left, right| left.id.cmp(&right.id));
    profiles.sort_by(|left, right| left.id.cmp(&right.id));
    let studies = root.join("studies");
    std::fs::create_dir_all(&studies)?;
    let sites: Vec<String> = sites.iter().map(|site| site.to_string()).collect();
    let research = Study {
        id: STUDY_ID.into(),
        title: "Outcomes of trauma care across the alliance".into(),
        purpose: "To learn how many injured people are treated and how many die in hospital, by age, sex and cause of injury, so that hospitals can compare and improve trauma care.".into(),
        lead_institution: "Alliance Trauma Research Group".into(),
        study_lead: STUDY_LEAD.into(),
        ethics_reference: "EC-2026-001 (synthetic demo approval)".into(),
        templates: pins,
        sites: sites.clone(),
        valid_from: "2025-01-01".into(),
        valid_until: "2035-12-31".into(),
        max_queries_per_day: 1000,
        differential_privacy: None,
    };
    let quality = Study {
        id: QUALITY_STUDY_ID.into(),
        title: "Standing data-quality review of the alliance registry".into(),
        purpose: "To check before results are trusted that every site's data is complete, conforms to the data model and is plausible, and to show sites where they fall short of the alliance's standards.".into(),
        lead_institution: "Alliance data stewardship".into(),
        study_lead: STUDY_LEAD.into(),
        ethics_reference: "Alliance governance rule DQ-1 (no patient-level data leaves a site)".into(),
        templates: profiles,
        sites,
        valid_from: "2025-01-01".into(),
        valid_until: "2035-12-31".into(),
        max_queries_per_day: 100,
        differential_privacy: None,
    };
    for study in [research, quality] {
        let study_file = studies.join(format!("{}.toml", study.id));
        std::fs::write(&study_file, toml::to_string(&study)?)?;
        for expert in &experts[..2] {
            experts::sign_file(&study_file, DocumentKind::Study, &expert.secret)?;
        }
    }
    Ok(SignedCatalogue {
        experts,
        templates: catalogue,
        studies,
    })
}

/// A whole local alliance: certificates, data, nodes and a coordinator.
#[derive(Debug)]
pub struct LocalAlliance {
    pub root: PathBuf,
    pub pki: DevPki,
    /// The experts' keys (three; every node trusts all, quorum 2), the signed templates and
    /// the signed study approval, as the coordinator serves them.
    pub catalogue: SignedCatalogue,
    /// The coordinator's users and their tokens.
    pub users: Users,
    pub data_files: Vec<PathBuf>,
    pub node_configs: Vec<PathBuf>,
    pub nodes: Vec<(String, Running)>,
    pub coordinator: Running,
}

/// The files of an alliance before anything runs: certificates, the signed catalogue and
/// studies, each site's data, and the coordinator's users.
#[derive(Debug)]
pub struct Groundwork {
    pub root: PathBuf,
    pub pki: DevPki,
    pub catalogue: SignedCatalogue,
    pub users: Users,
    /// The experts' public key files every node trusts.
    pub trusted: Vec<PathBuf>,
    /// One per site, in the sites' order.
    pub data_files: Vec<PathBuf>,
}

impl Groundwork {
    /// Creates certificates (the coordinator's and every site's identity), three expert keys,
    /// the signed catalogue of `templates` and the studies, each site's synthetic data and the
    /// users, under `root` (created if absent; paths written into configuration files are
    /// absolute).
    pub async fn create(
        root: &Path,
        sites: &[SiteProfile],
        templates: &Path,
    ) -> anyhow::Result<Groundwork> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let data_dir = root.join("data");
        std::fs::create_dir_all(&data_dir)?;
        let mut identities = vec![COORDINATOR_IDENTITY.to_string()];
        identities.extend(sites.iter().map(|site| site_identity(&site.site_id)));
        let pki =
            certs::create_dev_pki(&root.join("certs"), "fedq local alliance CA", &identities)?;
        let site_ids: Vec<&str> = sites.iter().map(|site| site.site_id.as_str()).collect();
        let catalogue = sign_catalogue(&root, templates, &site_ids)?;
        let trusted = catalogue
            .experts
            .iter()
            .map(|expert| expert.public.clone())
            .collect();
        let mut data_files = Vec::new();
        for site in sites {
            let (site, data_dir) = (site.clone(), data_dir.clone());
            data_files.push(
                tokio::task::spawn_blocking(move || synth::write_site(&site, &data_dir)).await??,
            );
        }
        Ok(Groundwork {
            root,
            pki,
            catalogue,
            users: Users::create()?,
            trusted,
            data_files,
        })
    }

    /// The folder configuration files are written to.
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }

    /// Writes site `index`'s node configuration.
    pub fn write_node(
        &self,
        sites: &[SiteProfile],
        index: usize,
        min_cell_count: u32,
        reach: Reach,
    ) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(self.config_dir())?;
        write_node_config(
            &self.config_dir(),
            &site_files(
                &sites[index],
                &self.data_files[index],
                &self.pki,
                &self.trusted,
                min_cell_count,
                reach,
            )?,
        )
    }

    /// Writes the coordinator's configuration listing `nodes`.
    pub fn write_coordinator(
        &self,
        nodes: &[NodeListing],
        listen: &str,
        tunnel_listen: &str,
    ) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(self.config_dir())?;
        write_coordinator_config(
            &self.config_dir(),
            &CoordinatorFiles {
                catalogue: &self.catalogue,
                users: &self.users,
                pki: &self.pki,
                coordinator_identity: COORDINATOR_IDENTITY,
                nodes,
                default_deadline_ms: 30_000,
                listen,
                tunnel_listen,
            },
        )
    }
}

impl LocalAlliance {
    /// Creates everything under `root` (which must be empty or absent) and starts it; the
    /// coordinator listens on loopback `coordinator_port` (0: any free port). The nodes of
    /// `outbound_sites` listen nowhere: they dial the coordinator's tunnel port.
    pub async fn start(
        root: &Path,
        sites: &[SiteProfile],
        outbound_sites: &[&str],
        templates: &Path,
        min_cell_count: u32,
        coordinator_port: u16,
    ) -> anyhow::Result<LocalAlliance> {
        let ground = Groundwork::create(root, sites, templates).await?;
        // Listening nodes start first (the coordinator's configuration names their ports);
        // outbound-only nodes once the coordinator's tunnel port is known.
        let mut listings = Vec::new();
        let mut started = Vec::new();
        for (index, site) in sites.iter().enumerate() {
            let node = if outbound_sites.contains(&site.site_id.as_str()) {
                None
            } else {
                let config = ground.write_node(
                    sites,
                    index,
                    min_cell_count,
                    Reach::Listen(LOOPBACK.into()),
                )?;
                let running = start_node(&config)
                    .await
                    .with_context(|| format!("starting node {}", site.site_id))?;
                Some((config, running))
            };
            listings.push(match &node {
                Some((_, running)) => NodeListing::loopback(&site.site_id, running.address),
                None => NodeListing {
                    site_id: site.site_id.clone(),
                    address: None,
                    identity: site_identity(&site.site_id),
                },
            });
            started.push(node);
        }
        let coordinator_config = ground.write_coordinator(&listings, LOOPBACK, LOOPBACK)?;
        let coordinator = start_coordinator(&coordinator_config, coordinator_port)
            .await
            .context("starting the coordinator")?;
        let mut node_configs = Vec::new();
        let mut nodes = Vec::new();
        for ((index, site), node) in sites.iter().enumerate().zip(started) {
            let (config, running) = match (node, coordinator.tunnel) {
                (Some(node), _) => node,
                (None, Some(tunnel)) => {
                    let dial = Reach::Dial(format!("localhost:{}", tunnel.port()));
                    let config = ground.write_node(sites, index, min_cell_count, dial)?;
                    let running = start_node(&config)
                        .await
                        .with_context(|| format!("starting outbound node {}", site.site_id))?;
                    (config, running)
                }
                (None, None) => anyhow::bail!("the coordinator opened no tunnel port"),
            };
            node_configs.push(config);
            nodes.push((site.site_id.clone(), running));
        }
        Ok(LocalAlliance {
            root: ground.root,
            pki: ground.pki,
            catalogue: ground.catalogue,
            users: ground.users,
            data_files: ground.data_files,
            node_configs,
            nodes,
            coordinator,
        })
    }

    /// The state directory (audit log, key, daily counts) of site `site_id`'s node.
    pub fn node_state_dir(&self, site_id: &str) -> PathBuf {
        node_state_dir(&self.root.join("config"), site_id)
    }

    /// The address study-lead clients use.
    pub fn coordinator_url(&self) -> String {
        format!("https://localhost:{}", self.coordinator.address.port())
    }

    /// Stops every server gracefully.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.coordinator.stop().await?;
        for (_, node) in self.nodes {
            node.stop().await?;
        }
        Ok(())
    }
}
