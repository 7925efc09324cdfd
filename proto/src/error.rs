//! The one error type of the shared contract crate.

use crate::wire::RefusalCode;

/// Everything that can go wrong while reading or checking a shared-contract artefact.
///
/// Messages are written for the person who has to act: the alliance expert editing a
/// template, the study lead choosing parameters, or the administrator fixing a file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A TOML or JSON document is not well-formed (the message includes line and column).
    #[error("{what} is not valid: {message}")]
    Syntax { what: String, message: String },
    /// The common data model file is inconsistent.
    #[error("data model: {0}")]
    DataModel(String),
    /// A template is well-formed but not valid against the data model.
    #[error("template '{template}': {message}")]
    Template {
        template: String,
        code: TemplateProblem,
        message: String,
    },
    /// A study approval is not valid.
    #[error("study '{study}': {message}")]
    Study { study: String, message: String },
    /// A parameter value does not fit its declaration.
    #[error("parameter '{parameter}': {message}")]
    Parameter { parameter: String, message: String },
    /// A certificate, key or TLS setting is unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// A key or signature file is unusable.
    #[error("signing: {0}")]
    Signing(String),
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
}

/// What kind of template problem occurred; decides the refusal code a node reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateProblem {
    Malformed,
    UnknownDataset,
    UnknownColumn,
    IdentifierColumn,
    DataModelMismatch,
}

impl Error {
    /// The typed refusal reason a node sends when this error stops a query.
    pub fn refusal_code(&self) -> RefusalCode {
        match self {
            Error::Template { code, .. } => match code {
                TemplateProblem::Malformed => RefusalCode::MalformedTemplate,
                TemplateProblem::UnknownDataset => RefusalCode::UnknownDataset,
                TemplateProblem::UnknownColumn => RefusalCode::UnknownColumn,
                TemplateProblem::IdentifierColumn => RefusalCode::IdentifierColumn,
                TemplateProblem::DataModelMismatch => RefusalCode::DataModelMismatch,
            },
            Error::Syntax { .. } => RefusalCode::MalformedTemplate,
            Error::Parameter { .. } => RefusalCode::InvalidParameter,
            Error::Study { .. } => RefusalCode::MalformedStudy,
            Error::Io { .. }
            | Error::DataModel(_)
            | Error::Tls(_)
            | Error::Signing(_)
            | Error::Config(_) => RefusalCode::Internal,
        }
    }
}
