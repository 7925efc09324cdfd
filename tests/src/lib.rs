//! Fixtures for fedq's end-to-end tests: a small local alliance (real nodes and a real
//! coordinator over mutual TLS on 127.0.0.1), clients that talk to it only through its public
//! interfaces, and an independent oracle that counts straight from the generated rows.

use std::path::{Path, PathBuf};

use fedq_coordinator::client;
use fedq_deploy::alliance::NodeListing;
use fedq_deploy::alliance::{self, LocalAlliance};
use fedq_deploy::synth::{self, LocalFormat, SiteProfile};
use fedq_proto::convert::parameter_to_wire;
use fedq_proto::template::Value;
use fedq_proto::wire::{self, RefusalCode, node_client::NodeClient};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

/// Three small sites in both local formats; site-c is small enough to have small cells.
pub fn small_sites() -> Vec<SiteProfile> {
    let mut sites = SiteProfile::demo_sites(1.0);
    sites[0].admissions = 3_000;
    sites[1].admissions = 2_000;
    sites[2].admissions = 150;
    sites
}

/// A folder with the bundled templates plus the test templates.
pub fn catalogue(root: &Path) -> anyhow::Result<PathBuf> {
    let folder = root.join("templates");
    std::fs::create_dir_all(&folder)?;
    let test_templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    for source in [alliance::bundled_templates(), test_templates] {
        for entry in std::fs::read_dir(source)? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, folder.join(name))?;
            }
        }
    }
    Ok(folder)
}

/// A running test alliance and the temporary folder it lives in.
pub struct TestAlliance {
    pub dir: tempfile::TempDir,
    pub alliance: LocalAlliance,
    pub sites: Vec<SiteProfile>,
}

impl TestAlliance {
    /// The standard test alliance ([`small_sites`]).
    pub async fn start() -> anyhow::Result<TestAlliance> {
        TestAlliance::start_with(small_sites()).await
    }

    /// A test alliance of the given sites.
    pub async fn start_with(sites: Vec<SiteProfile>) -> anyhow::Result<TestAlliance> {
        TestAlliance::start_with_outbound(sites, &[]).await
    }

    /// A test alliance of the given sites whose `outbound` sites dial the coordinator.
    pub async fn start_with_outbound(
        sites: Vec<SiteProfile>,
        outbound: &[&str],
    ) -> anyhow::Result<TestAlliance> {
        TestAlliance::start_custom(sites, outbound, 10).await
    }

    /// A test alliance whose nodes apply the disclosure floor `min_cell_count`.
    pub async fn start_custom(
        sites: Vec<SiteProfile>,
        outbound: &[&str],
        min_cell_count: u32,
    ) -> anyhow::Result<TestAlliance> {
        fedq_proto::tls::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let templates = catalogue(dir.path())?;
        let alliance = LocalAlliance::start(
            &dir.path().join("alliance"),
            &sites,
            outbound,
            &templates,
            min_cell_count,
            0,
        )
        .await?;
        Ok(TestAlliance {
            dir,
            alliance,
            sites,
        })
    }

    /// The coordinator, signed in as the study's study lead.
    pub async fn coordinator(&self) -> anyhow::Result<client::Connection> {
        self.coordinator_as(&self.alliance.users.study_lead).await
    }

    /// The coordinator, signed in with `token`.
    pub async fn coordinator_as(&self, token: &str) -> anyhow::Result<client::Connection> {
        Ok(client::connect(
            &self.alliance.coordinator_url(),
            &self.alliance.pki.ca_cert,
            token,
        )
        .await?)
    }

    /// A direct client to site `index`, presenting the coordinator's certificate.
    pub async fn node_as_coordinator(&self, index: usize) -> anyhow::Result<NodeClient<Channel>> {
        let coordinator = &self.alliance.pki.identities[0];
        self.node_with(index, Some((&coordinator.cert, &coordinator.key)))
            .await
    }

    /// A direct client to site `index` presenting `client_cert`, if any.
    pub async fn node_with(
        &self,
        index: usize,
        client_cert: Option<(&Path, &Path)>,
    ) -> anyhow::Result<NodeClient<Channel>> {
        let (site_id, node) = &self.alliance.nodes[index];
        fedq_deploy::node_client(
            &format!("https://localhost:{}", node.address.port()),
            &self.alliance.pki.ca_cert,
            client_cert,
            &alliance::site_identity(site_id),
        )
        .await
    }
}

/// A node request for a catalogue template with the given parameters, carrying the
/// signatures the alliance's experts made (as the coordinator would send it).
pub fn node_request(
    alliance: &LocalAlliance,
    template_id: &str,
    parameters: Vec<wire::ParameterValue>,
) -> anyhow::Result<wire::QueryRequest> {
    let path = alliance
        .catalogue
        .templates
        .join(format!("{template_id}.toml"));
    let (template, signatures) = signed_file(&path, fedq_proto::template::Template::from_toml)?;
    let study_path = alliance
        .catalogue
        .studies
        .join(format!("{}.toml", alliance::STUDY_ID));
    let (study, study_signatures) = signed_file(&study_path, fedq_proto::study::Study::from_toml)?;
    Ok(wire::QueryRequest {
        request_id: format!("test-{template_id}"),
        template: Some(fedq_proto::document::template_document(
            &template, signatures,
        )),
        parameters,
        requester: "test".into(),
        study: Some(fedq_proto::document::study_document(
            &study,
            study_signatures,
        )),
        coefficients: Vec::new(),
        iteration: 0,
    })
}

/// The alliance's study approval changed by `edit`, re-signed by two of its experts.
pub fn study_with(
    alliance: &LocalAlliance,
    edit: impl Fn(&mut fedq_proto::study::Study),
) -> anyhow::Result<wire::SignedDocument> {
    let path = alliance
        .catalogue
        .studies
        .join(format!("{}.toml", alliance::STUDY_ID));
    let (mut study, _) = signed_file(&path, fedq_proto::study::Study::from_toml)?;
    edit(&mut study);
    let signatures = sign_bytes(
        alliance,
        fedq_proto::study::DOCUMENT_KIND,
        &study.canonical_bytes(),
        &[0, 1],
    )?;
    Ok(fedq_proto::document::study_document(&study, signatures))
}

/// The template a node request carries.
pub fn template_of(request: &wire::QueryRequest) -> anyhow::Result<fedq_proto::template::Template> {
    let document = request
        .template
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the request carries no template"))?;
    Ok(fedq_proto::document::open_template(document)?)
}

/// A document file and the signatures in its signatures file.
fn signed_file<T>(
    path: &Path,
    parse: impl Fn(&str, &str) -> Result<T, fedq_proto::Error>,
) -> anyhow::Result<(T, Vec<wire::Signature>)> {
    let document = parse(&std::fs::read_to_string(path)?, &path.display().to_string())?;
    let signatures = fedq_proto::signing::SignaturesFile::from_toml(
        &std::fs::read_to_string(fedq_proto::signing::signatures_path(path))?,
        "signatures",
    )?;
    Ok((document, signatures.to_wire()))
}

/// Signatures of the given experts of the alliance (by index) over a document's bytes.
pub fn sign_bytes(
    alliance: &LocalAlliance,
    kind: &str,
    canonical: &[u8],
    experts: &[usize],
) -> anyhow::Result<Vec<wire::Signature>> {
    experts
        .iter()
        .map(|index| {
            let path = &alliance.catalogue.experts[*index].secret;
            let key = fedq_proto::signing::ExpertSecretKey::from_toml(
                &std::fs::read_to_string(path)?,
                "key",
            )?;
            Ok(key.sign(kind, canonical))
        })
        .collect()
}

/// A template document signed by the given experts of the alliance (by index).
pub fn sign_with(
    alliance: &LocalAlliance,
    template: &fedq_proto::template::Template,
    experts: &[usize],
) -> anyhow::Result<wire::SignedDocument> {
    let signatures = sign_bytes(
        alliance,
        fedq_proto::template::DOCUMENT_KIND,
        &template.canonical_bytes(),
        experts,
    )?;
    Ok(fedq_proto::document::template_document(
        template, signatures,
    ))
}

/// Runs a catalogue query through the coordinator.
pub async fn query(
    coordinator: &mut client::Connection,
    template_id: &str,
    parameters: Vec<wire::ParameterValue>,
    deadline_ms: u32,
) -> Result<wire::PooledResult, fedq_coordinator::CoordinatorError> {
    let request = wire::RunQueryRequest {
        template_id: template_id.into(),
        parameters,
        deadline_ms,
        study_id: alliance::STUDY_ID.into(),
    };
    client::run_query(coordinator, request, |_| {}).await
}

/// One generated admission reduced to what the oracle needs, read from the site's local file
/// format with code written independently of the node's mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct OracleRow {
    pub age: i64,
    pub sex: String,
    pub mechanism: String,
    pub iss: i64,
    pub icu: bool,
    pub systolic_bp: Option<i64>,
    /// Days (the legacy format records hours).
    pub length_of_stay: i64,
    pub died: bool,
    pub days_to_outcome: i64,
}

/// Every admission of every site, straight from the generator.
pub fn oracle_rows(sites: &[SiteProfile]) -> anyhow::Result<Vec<Vec<OracleRow>>> {
    sites.iter().map(site_rows).collect()
}

fn site_rows(site: &SiteProfile) -> anyhow::Result<Vec<OracleRow>> {
    const MECHANISMS: [&str; 5] = ["road_traffic", "fall", "assault", "self_harm", "other"];
    let frame = synth::generate(site)?;
    let ints = |name: &str| -> anyhow::Result<Vec<i64>> {
        Ok(frame
            .column(name)?
            .i64()?
            .iter()
            .map(|value| value.unwrap_or(-1))
            .collect())
    };
    let optional_ints = |name: &str| -> anyhow::Result<Vec<Option<i64>>> {
        Ok(frame.column(name)?.i64()?.iter().collect())
    };
    let texts = |name: &str| -> anyhow::Result<Vec<String>> {
        Ok(frame
            .column(name)?
            .str()?
            .iter()
            .map(|value| value.unwrap_or("").to_string())
            .collect())
    };
    let rows = match site.format {
        LocalFormat::ModelLikeParquet => {
            let flags = |name: &str| -> anyhow::Result<Vec<bool>> {
                Ok(frame
                    .column(name)?
                    .bool()?
                    .iter()
                    .map(|v| v == Some(true))
                    .collect())
            };
            let (icu, died) = (flags("icu_admission")?, flags("in_hospital_death")?);
            let outcome_days = ints("days_to_outcome")?;
            let (age, sex, mechanism, iss, systolic, stay) = (
                ints("age")?,
                texts("sex")?,
                texts("injury_mechanism")?,
                ints("iss")?,
                optional_ints("systolic_bp")?,
                ints("length_of_stay")?,
            );
            (0..frame.height())
                .map(|i| OracleRow {
                    age: age[i],
                    sex: sex[i].clone(),
                    mechanism: mechanism[i].clone(),
                    iss: iss[i],
                    icu: icu[i],
                    systolic_bp: systolic[i],
                    length_of_stay: stay[i],
                    died: died[i],
                    days_to_outcome: outcome_days[i],
                })
                .collect()
        }
        LocalFormat::LegacyCsv => {
            let (age, sex, mechanism, iss, icu, systolic, hours, died) = (
                ints("AGE_Y")?,
                texts("SEX")?,
                ints("MECH")?,
                ints("ISS")?,
                ints("ICU")?,
                optional_ints("SBP")?,
                ints("LOS_HOURS")?,
                ints("DIED")?,
            );
            let outcome_days = ints("OUTCOME_DAYS")?;
            (0..frame.height())
                .map(|i| OracleRow {
                    age: age[i],
                    sex: match sex[i].as_str() {
                        "F" => "female",
                        "M" => "male",
                        _ => "other",
                    }
                    .to_string(),
                    mechanism: MECHANISMS[(mechanism[i] - 1) as usize].to_string(),
                    iss: iss[i],
                    icu: icu[i] == 1,
                    systolic_bp: systolic[i],
                    length_of_stay: hours[i] / 24,
                    died: died[i] == 1,
                    days_to_outcome: outcome_days[i],
                })
                .collect()
        }
    };
    Ok(rows)
}

/// The levels of one pooled cell, by axis column.
pub fn cell_levels<'a>(result: &'a wire::PooledResult, cell: &wire::PooledCell) -> Vec<&'a str> {
    cell.coordinates
        .iter()
        .zip(&result.axes)
        .map(|(level, axis)| axis.levels[*level as usize].as_str())
        .collect()
}

// Helpers shared by the end-to-end test files.

/// A typed integer parameter value.
pub fn integer(name: &str, value: i64) -> wire::ParameterValue {
    parameter_to_wire(name, &Value::Integer(value))
}

/// A typed category-list parameter value.
pub fn categories(name: &str, chosen: &[&str]) -> wire::ParameterValue {
    parameter_to_wire(
        name,
        &Value::Categories(chosen.iter().map(|category| category.to_string()).collect()),
    )
}

/// Asserts a node refusal: gRPC code, typed reason, and words in the message.
pub fn assert_refused(status: &tonic::Status, code: Code, refusal: RefusalCode, words: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(refusal_of(status), refusal, "{status:?}");
    assert!(status.message().contains(words), "{}", status.message());
}

pub fn refusal_of(status: &tonic::Status) -> RefusalCode {
    let refusal =
        wire::Refusal::decode(status.details()).expect("a node refusal carries a typed reason");
    RefusalCode::try_from(refusal.code).expect("a known refusal code")
}

/// Writes a variant of site-a's node configuration (with its own state directory: two nodes
/// never share one) and starts it.
pub async fn node_variant(
    test: &TestAlliance,
    edit: impl Fn(String) -> String,
) -> anyhow::Result<alliance::Running> {
    let (config_path, _) = node_config_with_own_state(test)?;
    let config = std::fs::read_to_string(config_path)?;
    let edited = edit(config.clone());
    assert_ne!(edited, config, "the edit must change the configuration");
    let path = test
        .alliance
        .root
        .join("config")
        .join(format!("variant-{}.toml", rand_suffix()));
    std::fs::write(&path, edited)?;
    alliance::start_node(&path).await
}

pub async fn client_for(
    test: &TestAlliance,
    node: &alliance::Running,
) -> anyhow::Result<fedq_proto::wire::node_client::NodeClient<tonic::transport::Channel>> {
    let coordinator = &test.alliance.pki.identities[0];
    fedq_deploy::node_client(
        &format!("https://localhost:{}", node.address.port()),
        &test.alliance.pki.ca_cert,
        Some((&coordinator.cert, &coordinator.key)),
        &alliance::site_identity("site-a"),
    )
    .await
}

/// Starts a second coordinator over the test alliance's nodes with a custom node listing.
pub async fn coordinator_with(
    test: &TestAlliance,
    listings: &[NodeListing],
    deadline_ms: u64,
) -> anyhow::Result<alliance::Running> {
    let folder = test
        .dir
        .path()
        .join(format!("coordinator-{}", rand_suffix()));
    std::fs::create_dir_all(&folder)?;
    let config = alliance::write_coordinator_config(
        &folder,
        &alliance::CoordinatorFiles {
            catalogue: &test.alliance.catalogue,
            users: &test.alliance.users,
            pki: &test.alliance.pki,
            coordinator_identity: alliance::COORDINATOR_IDENTITY,
            nodes: listings,
            default_deadline_ms: deadline_ms,
            listen: "127.0.0.1:0",
            tunnel_listen: "127.0.0.1:0",
        },
    )?;
    alliance::start_coordinator(&config, 0).await
}

pub fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn listing(test: &TestAlliance, index: usize) -> NodeListing {
    let (site_id, node) = &test.alliance.nodes[index];
    NodeListing::loopback(site_id, node.address)
}

/// Rewrites one catalogue file, starts a second coordinator over all three nodes, and runs it.
pub async fn query_after_editing_catalogue(
    test: &TestAlliance,
    template_id: &str,
    edit: impl Fn(String) -> String,
) -> anyhow::Result<wire::PooledResult> {
    let path = test
        .alliance
        .catalogue
        .templates
        .join(format!("{template_id}.toml"));
    let text = std::fs::read_to_string(&path)?;
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit must change the file");
    std::fs::write(&path, edited)?;
    let listings: Vec<NodeListing> = (0..3).map(|index| listing(test, index)).collect();
    let running = coordinator_with(test, &listings, 5_000).await?;
    let mut client = fedq_coordinator::client::connect(
        &format!("https://localhost:{}", running.address.port()),
        &test.alliance.pki.ca_cert,
        &test.alliance.users.study_lead,
    )
    .await?;
    let result = query(&mut client, template_id, vec![], 0).await;
    running.stop().await?;
    Ok(result?)
}

/// A change to a study approval, for table-driven tests.
pub type StudyEdit = Box<dyn Fn(&mut fedq_proto::study::Study)>;

/// A node running as its own operating-system process (the real `fedq-node` program), on the
/// loopback port it reports when it starts serving.
pub struct NodeProcess {
    child: std::process::Child,
    pub address: std::net::SocketAddr,
}

impl NodeProcess {
    /// Starts `program serve --config config` (`program` is the node program,
    /// `env!("CARGO_BIN_EXE_test-node")` in this package's tests); with `file_size_limit`,
    /// every file the process writes is limited to that many bytes (RLIMIT_FSIZE).
    pub fn start(
        program: &str,
        config: &Path,
        file_size_limit: Option<u64>,
    ) -> anyhow::Result<NodeProcess> {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(program);
        command
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(limit) = file_size_limit {
            // SAFETY: only an async-signal-safe system call runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let (found, address) = std::sync::mpsc::channel();
        // Reads the log until the serving line, then keeps draining it so the node never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("node serving")
                    && let Some(address) = line
                        .split_whitespace()
                        .find_map(|part| part.strip_prefix("address="))
                        .and_then(|text| text.parse::<std::net::SocketAddr>().ok())
                    && let Some(sender) = found.take()
                {
                    let _ = sender.send(address);
                }
            }
        });
        match address.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(address) => Ok(NodeProcess { child, address }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait()?;
                anyhow::bail!("the node process did not start serving ({status})")
            }
        }
    }

    /// A client presenting the coordinator's certificate.
    pub async fn client(&self, test: &TestAlliance) -> anyhow::Result<NodeClient<Channel>> {
        let coordinator = &test.alliance.pki.identities[0];
        fedq_deploy::node_client(
            &format!("https://localhost:{}", self.address.port()),
            &test.alliance.pki.ca_cert,
            Some((&coordinator.cert, &coordinator.key)),
            &alliance::site_identity("site-a"),
        )
        .await
    }

    /// SIGTERM, then waits (at most a minute) for the process to exit; returns its status.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the node did not exit within a minute of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGHUP: the node reloads its certificates.
    pub fn hang_up(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGHUP)
    }

    /// SIGSTOP: the process freezes wherever it is (its sockets stay open, nothing answers).
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: sending a signal to our own child process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            anyhow::bail!(
                "cannot signal the node: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILL: the process dies at once, wherever it is.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of site-a's node configuration with its own state directory (returned too), for a
/// node process that must not share state with the in-process node.
pub fn node_config_with_own_state(test: &TestAlliance) -> anyhow::Result<(PathBuf, PathBuf)> {
    let config = std::fs::read_to_string(&test.alliance.node_configs[0])?;
    let state = test
        .dir
        .path()
        .join(format!("process-state-{}", rand_suffix()));
    let line = config
        .lines()
        .find(|line| line.starts_with("state_dir"))
        .ok_or_else(|| anyhow::anyhow!("no state_dir line"))?;
    let edited = config.replace(line, &format!("state_dir = \"{}\"", state.display()));
    let path = test
        .alliance
        .root
        .join("config")
        .join(format!("process-{}.toml", rand_suffix()));
    std::fs::write(&path, edited)?;
    Ok((path, state))
}

/// A node request for `cohort-by-age-sex` with its own request id and minimum severity.
pub fn cohort_request(
    alliance: &LocalAlliance,
    request_id: &str,
    min_iss: i64,
) -> anyhow::Result<wire::QueryRequest> {
    let mut request = node_request(
        alliance,
        "cohort-by-age-sex",
        vec![integer("min_iss", min_iss)],
    )?;
    request.request_id = request_id.to_string();
    Ok(request)
}

/// The query records of the audit log in a node's state directory.
pub fn audit_queries(
    state_dir: &Path,
) -> anyhow::Result<Vec<fedq_node::audit::record::QueryEvent>> {
    let records = fedq_node::audit::verify::records(&state_dir.join("audit"))?;
    Ok(records
        .into_iter()
        .filter_map(|record| match record.event {
            fedq_node::audit::record::Event::Query(query) => Some(*query),
            _ => None,
        })
        .collect())
}

/// Verifies the audit log in a node's state directory against `heads`.
pub fn verify_audit(
    state_dir: &Path,
    heads: &[wire::SignedAuditHead],
) -> Result<fedq_node::audit::verify::Verified, fedq_node::audit::verify::Problem> {
    let key_text = std::fs::read_to_string(state_dir.join("audit-key.toml")).ok();
    let key_id = key_text
        .and_then(|text| fedq_proto::signing::ExpertSecretKey::from_toml(&text, "key").ok())
        .map(|key| key.key_id());
    fedq_node::audit::verify::verify(
        &state_dir.join("audit"),
        fedq_node::audit::verify::Expected {
            own_key_id: key_id.as_deref(),
            site_id: Some("site-a"),
            heads,
        },
    )
}
