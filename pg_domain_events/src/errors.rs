//! Errors a caller of the SQL API sees, each with an explicit SQLSTATE, a detail and a hint.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Why raising or reading events was refused. Every variant maps to one SQLSTATE.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    /// A required value was NULL (`22004`).
    #[error("{field} must not be null")]
    Null { field: String },
    /// A value breaks a rule of the event model (`22023`).
    #[error("invalid {field}: {reason}")]
    Invalid {
        field: String,
        reason: String,
        hint: &'static str,
    },
    /// Optimistic concurrency: the aggregate moved on (`40001`).
    #[error(
        "aggregate {aggregate_type}/{aggregate_id} is at version {actual}, expected {expected}"
    )]
    VersionConflict {
        aggregate_type: String,
        aggregate_id: String,
        actual: i64,
        expected: i64,
    },
    /// `domain_events.enabled = read_only` (`25006`).
    #[error("the event store is read-only (domain_events.enabled = read_only)")]
    ReadOnly,
}

impl EventError {
    /// Shorthand for [`EventError::Invalid`].
    pub fn invalid(
        field: impl Into<String>,
        reason: impl Into<String>,
        hint: &'static str,
    ) -> Self {
        EventError::Invalid {
            field: field.into(),
            reason: reason.into(),
            hint,
        }
    }

    /// Shorthand for [`EventError::Null`].
    pub fn null(field: impl Into<String>) -> Self {
        EventError::Null {
            field: field.into(),
        }
    }

    /// The SQLSTATE this error is raised with.
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            EventError::Null { .. } => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            EventError::Invalid { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            EventError::VersionConflict { .. } => PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            EventError::ReadOnly => PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
        }
    }

    fn detail(&self) -> String {
        match self {
            EventError::Null { field } => format!("{field} is NULL; nothing was written."),
            EventError::Invalid { .. } => "Nothing was written.".to_string(),
            EventError::VersionConflict { actual, expected, .. } => format!(
                "Another transaction raised events for this aggregate since version {expected} was read; it is now at {actual}. Nothing was written."
            ),
            EventError::ReadOnly => "Raising events is switched off for maintenance.".to_string(),
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            EventError::Null { .. } => "Pass a value, or omit the argument to use its default.",
            EventError::Invalid { hint, .. } => hint,
            EventError::VersionConflict { .. } => {
                "Reload the aggregate and retry the transaction, or pass expected_version => NULL to skip the check."
            }
            EventError::ReadOnly => "Ask an administrator to set domain_events.enabled = on.",
        }
    }

    /// Raises this error as a Postgres `ERROR`, aborting the statement (and so every write it made).
    pub fn report(self) -> ! {
        ErrorReport::new(self.sqlstate(), self.to_string(), "pg_domain_events")
            .set_detail(self.detail())
            .set_hint(self.hint())
            .report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwraps a result, raising the error as a Postgres `ERROR`.
pub trait OrReport<T> {
    /// The value, or the error raised with its SQLSTATE.
    fn or_report(self) -> T;
}

impl<T> OrReport<T> for Result<T, EventError> {
    fn or_report(self) -> T {
        self.unwrap_or_else(|e| e.report())
    }
}
