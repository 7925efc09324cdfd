//! The coordinator's error type and its one mapping to gRPC statuses.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Invalid configuration; one line per problem.
    #[error("invalid coordinator configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The template catalogue could not be loaded; one line per file problem.
    #[error("cannot load the template catalogue:\n  {}", .0.join("\n  "))]
    Catalogue(Vec<String>),
    /// A template, parameter, TLS or configuration problem found by the shared contract.
    #[error(transparent)]
    Contract(#[from] fedq_proto::Error),
    /// The study lead asked for a template the catalogue does not hold.
    #[error(
        "no approved template '{0}' in the catalogue; `fedq templates list` shows the approved ones"
    )]
    UnknownTemplate(String),
    /// The request carries no valid API token.
    #[error(
        "not signed in: give your personal API token with --token or FEDQ_TOKEN (your coordinator's administrator issues it)"
    )]
    Unauthenticated,
    /// The user may not run queries under this study.
    #[error("{user} may not run queries under study '{study}': only its study lead ({lead}) may")]
    NotStudyLead {
        user: String,
        study: String,
        lead: String,
    },
    /// The study lead named a study the catalogue does not hold.
    #[error("no approved study '{0}' in the catalogue; `fedq studies` shows the approved ones")]
    UnknownStudy(String),
    /// The template is not approved for the study.
    #[error(
        "template '{template}' is not approved for study '{study}'; `fedq studies` shows each study's templates"
    )]
    TemplateNotInStudy { template: String, study: String },
    /// The coordinator's own database cannot be used.
    #[error("coordinator state: {0}")]
    State(String),
    /// The user's role does not allow this.
    #[error("{user} ({role}) may not {action}")]
    NotAllowed {
        user: String,
        role: String,
        action: String,
    },
    /// The coordinator's configuration declares no data-quality standard.
    #[error(
        "this alliance declared no data-quality standard: its coordinator's administrator adds a [quality] section (study, template, thresholds) to the coordinator configuration"
    )]
    NoQualityStandard,
    /// No such site is configured.
    #[error("no site '{0}' is configured; `fedq sites` lists them")]
    UnknownSite(String),
    /// Certificates could not be created or written.
    #[error("certificates: {0}")]
    Certificates(String),
    /// Talking to the coordinator (CLI side) failed.
    #[error("{0}")]
    Client(String),
    /// A listener or server could not run.
    #[error("server: {0}")]
    Server(String),
}

impl CoordinatorError {
    /// The single mapping to a gRPC status for study-lead clients.
    pub fn to_status(&self) -> Status {
        let code = match self {
            CoordinatorError::UnknownTemplate(_) | CoordinatorError::UnknownStudy(_) => {
                Code::NotFound
            }
            CoordinatorError::TemplateNotInStudy { .. } | CoordinatorError::NoQualityStandard => {
                Code::FailedPrecondition
            }
            CoordinatorError::Unauthenticated => Code::Unauthenticated,
            CoordinatorError::NotStudyLead { .. } | CoordinatorError::NotAllowed { .. } => {
                Code::PermissionDenied
            }
            CoordinatorError::UnknownSite(_) => Code::NotFound,
            CoordinatorError::State(_) => Code::Unavailable,
            CoordinatorError::Contract(fedq_proto::Error::Parameter { .. }) => {
                Code::InvalidArgument
            }
            CoordinatorError::Contract(fedq_proto::Error::Template { .. }) => {
                Code::FailedPrecondition
            }
            _ => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

/// An error with its underlying causes, each said once (TLS and connection errors hide in
/// the causes).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.retain(|part| !part.is_empty());
    parts.join(": ")
}
