//! The node's error type. Every message is safe to send to the coordinator: it names
//! templates, parameters, columns and counts of problems, never a data value.

use fedq_proto::wire::RefusalCode;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid; one line per problem.
    #[error("invalid node configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The site's data could not be loaded; one line per problem.
    #[error("cannot load this site's data:\n  {}", .0.join("\n  "))]
    Data(Vec<String>),
    /// A template, parameter or TLS problem found by the shared contract.
    #[error(transparent)]
    Contract(#[from] fedq_proto::Error),
    /// The document's signatures do not satisfy this site's trust policy.
    #[error("{0}")]
    Signature(#[from] fedq_proto::signing::SignatureProblem),
    /// The caller's certificate names no identity this node accepts.
    #[error(
        "caller identity {presented} is not an accepted coordinator of this site; the site's administrator lists accepted identities in policy.accepted_coordinators"
    )]
    CallerNotAccepted { presented: String },
    /// The request names no study.
    #[error(
        "the request names no study approval; every query is made under an approved study (fedq query --study ID)"
    )]
    StudyMissing,
    /// The study is not in force today.
    #[error(
        "study '{study}' is in force from {from} to {until} (UTC) and today is {today}; ask the experts to renew the approval"
    )]
    StudyNotInForce {
        study: String,
        from: String,
        until: String,
        today: String,
    },
    /// The study does not list this site.
    #[error(
        "study '{study}' does not include this site ('{site}'); only the sites its approval lists take part"
    )]
    SiteNotInStudy { study: String, site: String },
    /// The template (exactly this version and content) is not approved for the study.
    #[error(
        "template '{template}' version {version} is not approved for study '{study}' (the approval pins each template's id, version and content); ask the experts to add it to the study"
    )]
    TemplateNotInStudy {
        study: String,
        template: String,
        version: u32,
    },
    /// This site has not accepted the study.
    #[error(
        "this site has not accepted study '{study}'; a site takes part only in studies its administrator lists in policy.accepted_studies"
    )]
    StudyNotAccepted { study: String },
    /// The study's daily query limit at this site is used up.
    #[error(
        "study '{study}' has used its daily limit of {limit} queries at this site; it resets at midnight UTC"
    )]
    DailyLimitReached { study: String, limit: u32 },
    /// The node cannot write its state directory, so it refuses rather than lose track.
    #[error(
        "this site cannot record the query in its state directory, so it refuses it; nothing was released (the site's administrator can find the cause in the node log)"
    )]
    StateUnwritable,
    /// The node cannot make the query's audit record durable, so it refuses (fail closed).
    #[error(
        "this site cannot write its audit log, so it refuses the query; nothing was released (the site's administrator can find the cause in the node log)"
    )]
    AuditUnavailable,
    /// The caller offered no protocol version this node speaks.
    #[error(
        "this site speaks protocol {speaks}, but the coordinator offered {offered}; upgrade the coordinator or the node so they share a version"
    )]
    ProtocolMismatch { speaks: String, offered: String },
    /// The caller's deadline passed before the query could start.
    #[error(
        "the query's deadline passed before this site could start it; nothing was computed (ask again with a longer --deadline-ms)"
    )]
    DeadlinePassed,
    /// The node is computing as many queries as it allows at once.
    #[error(
        "this site is busy ({most} queries are being computed, its limit); nothing was computed — try again shortly"
    )]
    Busy { most: usize },
    /// The study has used its share of the overlap memory.
    #[error(
        "study '{study}' has used its share of this site's memory of released results ({used_mb} of {share_mb} MiB), so the site refuses its new queries (other studies are not affected); the site's administrator can raise privacy.overlap_study_share_percent or privacy.overlap_memory_mb"
    )]
    OverlapStudyShare {
        study: String,
        used_mb: u64,
        share_mb: u64,
    },
    /// A privacy budget would be passed.
    #[error(
        "the privacy budget of {scope} at this site is used up ({spent} of epsilon {budget} spent; this query would pass it); nothing was released. Budgets do not reset by themselves: more queries need a larger budget, which this site's administrator sets (privacy.study_epsilon, privacy.node_epsilon; a study's approval can only ask for less)"
    )]
    BudgetExhausted {
        scope: String,
        spent: String,
        budget: String,
    },
    /// The overlap memory reached its bound: the node refuses rather than forget.
    #[error(
        "this site's memory of released results is full ({used_mb} of {limit_mb} MiB), so it refuses queries until its administrator raises privacy.overlap_memory_mb or archives the memory; nothing was released"
    )]
    OverlapMemoryFull { used_mb: u64, limit_mb: u64 },
    /// The site's own policy refuses this template.
    #[error(
        "this site does not run template '{0}' (its local policy refuses it, however it is signed); ask the site's administrator"
    )]
    TemplateRefusedBySite(String),
    /// The template's dataset is in the data model but this site does not hold it.
    #[error("this site does not hold dataset '{0}'")]
    DatasetNotHeld(String),
    /// The template uses a column this site does not record.
    #[error(
        "this site does not record column '{column}' of dataset '{dataset}', which template '{template}' uses"
    )]
    ColumnNotHeld {
        template: String,
        dataset: String,
        column: String,
    },
    /// The statistic is one this site does not release under its policy.
    #[error(
        "this site adds differential-privacy noise, which fedq provides for counts, histograms, 2x2 tables and data-quality profiles only (not means, survival curves or regressions); it does not answer '{statistic}' templates"
    )]
    StatisticNotUnderDp { statistic: String },
    /// The site's records cannot safely take part in the regression asked.
    #[error("this site does not take part in the regression: {0}")]
    RegressionRefused(String),
    /// Rounding released counts cannot keep this statistic consistent.
    #[error(
        "this site rounds released counts (privacy.rounding_base), which a '{statistic}' answer cannot keep consistent (its counts depend on each other); it does not answer '{statistic}' templates"
    )]
    StatisticNotRounded { statistic: String },
    /// The query engine failed. The cause is logged at the node; nothing was released.
    #[error(
        "the query could not be computed at this site; nothing was released (the site's administrator can find the cause in the node log)"
    )]
    Engine,
    /// A listener or server could not run.
    #[error("server: {0}")]
    Server(String),
}

impl NodeError {
    /// The typed reason sent with a refusal.
    pub fn refusal_code(&self) -> RefusalCode {
        match self {
            NodeError::Contract(inner) => inner.refusal_code(),
            NodeError::CallerNotAccepted { .. } => RefusalCode::CallerNotAccepted,
            NodeError::Signature(problem) => {
                use fedq_proto::signing::SignatureProblem;
                match problem {
                    SignatureProblem::NoTrustedKeys => RefusalCode::NoTrustedKeys,
                    SignatureProblem::Invalid { .. } | SignatureProblem::TooMany { .. } => {
                        RefusalCode::SignatureInvalid
                    }
                    SignatureProblem::Revoked { .. } => RefusalCode::SignerRevoked,
                    SignatureProblem::QuorumNotMet { .. } => RefusalCode::QuorumNotMet,
                }
            }
            NodeError::TemplateRefusedBySite(_) => RefusalCode::TemplateRefusedBySite,
            NodeError::StudyMissing => RefusalCode::StudyMissing,
            NodeError::DailyLimitReached { .. } => RefusalCode::DailyLimitReached,
            NodeError::StateUnwritable => RefusalCode::Internal,
            NodeError::AuditUnavailable => RefusalCode::AuditUnavailable,
            NodeError::OverlapMemoryFull { .. } | NodeError::OverlapStudyShare { .. } => {
                RefusalCode::OverlapMemoryFull
            }
            NodeError::BudgetExhausted { .. } => RefusalCode::PrivacyBudgetExhausted,
            NodeError::Busy { .. } => RefusalCode::SiteBusy,
            NodeError::DeadlinePassed => RefusalCode::DeadlinePassed,
            NodeError::ProtocolMismatch { .. } => RefusalCode::ProtocolMismatch,
            NodeError::StudyNotInForce { .. } => RefusalCode::StudyNotInForce,
            NodeError::SiteNotInStudy { .. } => RefusalCode::SiteNotInStudy,
            NodeError::TemplateNotInStudy { .. } => RefusalCode::TemplateNotInStudy,
            NodeError::StudyNotAccepted { .. } => RefusalCode::StudyNotAccepted,
            NodeError::DatasetNotHeld(_) => RefusalCode::UnknownDataset,
            NodeError::ColumnNotHeld { .. } => RefusalCode::UnknownColumn,
            NodeError::RegressionRefused(_) => RefusalCode::RegressionRefused,
            NodeError::StatisticNotUnderDp { .. } | NodeError::StatisticNotRounded { .. } => {
                RefusalCode::UnsupportedStatistic
            }
            NodeError::Config(_)
            | NodeError::Data(_)
            | NodeError::Engine
            | NodeError::Server(_) => RefusalCode::Internal,
        }
    }
}
