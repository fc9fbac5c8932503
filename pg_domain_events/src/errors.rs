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
    /// A stream head this transaction holds was changed behind the raising functions' back,
    /// e.g. by an `UPDATE` of `domain_events.aggregate` (`55000`).
    #[error("the stream head of {aggregate_type}/{aggregate_id} was changed directly in this transaction")]
    HeadMoved {
        aggregate_type: String,
        aggregate_id: String,
    },
    /// `domain_events.enabled = read_only` (`25006`).
    #[error("the event store is read-only (domain_events.enabled = read_only)")]
    ReadOnly,
    /// A payload breaks the JSON Schema registered for its event type and version (`23514`).
    /// Names where and which keyword failed, never a value of the payload.
    #[error(
        "{field} does not match the schema of {event_type} version {event_version}: {}",
        SchemaFailure::list(failures)
    )]
    SchemaViolation {
        field: String,
        event_type: String,
        event_version: i32,
        /// The first failures, in the validator's order.
        failures: Vec<SchemaFailure>,
        /// How many failures there are in all.
        total: usize,
    },
    /// `domain_events.schema_validation = strict` and no schema is registered (`23514`).
    #[error("{field}: {event_type} version {event_version} has no registered schema (domain_events.schema_validation = strict)")]
    SchemaRequired {
        field: String,
        event_type: String,
        event_version: i32,
    },
    /// A different schema is already registered for this event type and version (`23505`).
    #[error("a different schema is already registered for {event_type} version {event_version}")]
    SchemaExists {
        event_type: String,
        event_version: i32,
    },
    /// No schema is registered for this event type (and version) (`42704`).
    #[error("no schema is registered for {event_type}{}", version_suffix(*event_version))]
    SchemaNotFound {
        event_type: String,
        event_version: Option<i32>,
    },
    /// Events of this type and version exist, so its schema stays (`2BP01`).
    #[error("the schema of {event_type} version {event_version} is in use by stored events")]
    SchemaInUse {
        event_type: String,
        event_version: i32,
    },
}

fn version_suffix(version: Option<i32>) -> String {
    version.map(|v| format!(" version {v}")).unwrap_or_default()
}

/// Where a payload breaks its schema: a location and a keyword, never the value found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaFailure {
    /// JSON pointer into the payload (`""` is the payload itself). For `required` and
    /// `additionalProperties` it points at the missing or unexpected property.
    pub pointer: String,
    /// The JSON Schema keyword that failed, e.g. `type`, `required`, `enum`.
    pub keyword: String,
    /// JSON pointer to that keyword in the schema.
    pub schema_path: String,
}

impl SchemaFailure {
    fn list(failures: &[SchemaFailure]) -> String {
        failures
            .iter()
            .map(|f| format!("{:?} ({})", f.pointer, f.keyword))
            .collect::<Vec<_>>()
            .join(", ")
    }
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
            EventError::HeadMoved { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            EventError::ReadOnly => PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            EventError::SchemaViolation { .. } | EventError::SchemaRequired { .. } => {
                PgSqlErrorCode::ERRCODE_CHECK_VIOLATION
            }
            EventError::SchemaExists { .. } => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
            EventError::SchemaNotFound { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            EventError::SchemaInUse { .. } => PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
        }
    }

    fn detail(&self) -> String {
        match self {
            EventError::Null { field } => format!("{field} is NULL; nothing was written."),
            EventError::Invalid { .. } => "Nothing was written.".to_string(),
            EventError::VersionConflict { actual, expected, .. } => format!(
                "Another transaction raised events for this aggregate since version {expected} was read; it is now at {actual}. Nothing was written."
            ),
            EventError::HeadMoved { .. } => "Stream heads are moved only by the raising functions; the events this transaction raised for the stream cannot be versioned. The transaction is aborted.".to_string(),
            EventError::ReadOnly => "Raising events is switched off for maintenance.".to_string(),
            EventError::SchemaViolation { failures, total, .. } => {
                let paths: Vec<&str> = failures.iter().map(|f| f.schema_path.as_str()).collect();
                let more = match total.saturating_sub(failures.len()) {
                    0 => String::new(),
                    n => format!(" ({n} more failure(s) not listed)"),
                };
                format!(
                    "Failing schema keywords: {}{more}. Payload values are not shown. Nothing was written.",
                    paths.join(", ")
                )
            }
            EventError::SchemaRequired { .. } => {
                "Every event type and version needs a registered schema. Nothing was written."
                    .to_string()
            }
            EventError::SchemaExists { .. } => {
                "A registered version is immutable: consumers may rely on it. Nothing was changed."
                    .to_string()
            }
            EventError::SchemaNotFound { .. } => "Nothing was changed.".to_string(),
            EventError::SchemaInUse { .. } => {
                "Stored events keep the schema version they were raised with. Nothing was changed."
                    .to_string()
            }
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            EventError::Null { .. } => "Pass a value, or omit the argument to use its default.",
            EventError::Invalid { hint, .. } => hint,
            EventError::VersionConflict { .. } => {
                "Reload the aggregate and retry the transaction, or pass expected_version => NULL to skip the check."
            }
            EventError::HeadMoved { .. } => {
                "Do not write domain_events.aggregate directly; raise events with domain_events.raise_event()."
            }
            EventError::ReadOnly => "Ask an administrator to set domain_events.enabled = on.",
            EventError::SchemaViolation { .. } => {
                "Read the schema from domain_events.event_schemas; send a payload that matches it, or raise the event with the event_version whose schema it follows."
            }
            EventError::SchemaRequired { .. } => {
                "Register one with domain_events.register_schema(event_type, event_version, schema), or set domain_events.schema_validation = registered."
            }
            EventError::SchemaExists { .. } => {
                "Register the changed schema as the next event_version; domain_events.check_schema_compatibility() tells what it would break."
            }
            EventError::SchemaNotFound { .. } => {
                "SELECT event_type, event_version FROM domain_events.event_schemas lists the registered schemas."
            }
            EventError::SchemaInUse { .. } => {
                "Register a new event_version instead; a schema can be dropped only before any event uses it."
            }
        }
    }

    /// Raises this error as a Postgres `ERROR`, aborting the statement (and so every write it made).
    pub fn report(self) -> ! {
        raise(
            self.sqlstate(),
            self.to_string(),
            self.detail(),
            self.hint(),
        )
    }
}

/// Raises a Postgres `ERROR` with an explicit SQLSTATE, message, detail and hint, aborting the
/// statement (and so every write it made).
pub fn raise(
    sqlstate: PgSqlErrorCode,
    message: String,
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> ! {
    ErrorReport::new(sqlstate, message, "pg_domain_events")
        .set_detail(detail)
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
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
