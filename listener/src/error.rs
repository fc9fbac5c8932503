//! The listener's error type and its retry policy.
//!
//! Every failure is either *transient* (the connection dropped, the server is restarting, another
//! listener still holds the slot: reconnect with backoff and resume from the confirmed position) or
//! *definite* (bad credentials, missing extension, dropped slot or publication, an event table we
//! cannot map, a failure of a blocking handler: retrying cannot help, so the listener stops and
//! says why). Failures of single events are not errors here: they become dead letters. [`Error::is_transient`] is
//! the one place that decides, and [`classify_sqlstate`] the one place that maps SQLSTATEs.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::event::EventError;
use crate::replication::pgoutput::DecodeError;

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reconnect with backoff and resume.
    Transient,
    /// Stop and report: retrying cannot succeed.
    Definite,
}

/// An `ErrorResponse` from the server, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// Five-character SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// Everything that can stop or interrupt the listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}")]
    Connect {
        /// `host:port` tried.
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// Opening the connection took longer than the connect timeout.
    #[error("timed out connecting to {addr}")]
    ConnectTimeout {
        /// `host:port` tried.
        addr: String,
    },
    /// The established connection failed or was closed.
    #[error("replication connection lost")]
    ConnectionLost(#[source] io::Error),
    /// The server ended the replication stream.
    #[error("the server ended the replication stream")]
    StreamEnded,
    /// The server sent an `ErrorResponse`.
    #[error("{context}: {error}")]
    Server {
        /// What we were doing.
        context: &'static str,
        /// The server's error (boxed: it is large and rare).
        error: Box<ServerError>,
    },
    /// The server asked for a password and none was configured.
    #[error("the server requires a password for user {user:?}; set PGDE_PASSWORD (or PGPASSWORD)")]
    PasswordRequired {
        /// Role name.
        user: String,
    },
    /// The server asked for an authentication method we do not implement, or SCRAM failed locally.
    #[error("authentication failed: {0}")]
    Authentication(String),
    /// TLS could not be set up, the server refused it while `sslmode` requires it, or its
    /// certificate failed verification.
    #[error("TLS: {0}")]
    Tls(String),
    /// `CREATE EXTENSION pg_domain_events` has not been run in the database.
    #[error(
        "extension pg_domain_events is not installed in database {dbname:?} \
         (table domain_events.event not found); run CREATE EXTENSION pg_domain_events"
    )]
    MissingExtension {
        /// Database name.
        dbname: String,
    },
    /// The publication is missing, wrong, or cannot be created.
    #[error("publication {name:?}: {problem}")]
    Publication {
        /// Publication name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The replication slot is missing, wrong, lost, or cannot be created.
    #[error("replication slot {name:?}: {problem}")]
    Slot {
        /// Slot name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The slot was invalidated (`wal_status = lost`) or dropped while the subscription row
    /// says events were delivered through it: events committed since its last confirmed
    /// position are in no slot. With `replication.on_slot_lost = "recover"` the listener catches
    /// up from the event table by itself; otherwise this stops it.
    #[error("replication slot {name:?} {how}; {remedy}")]
    SlotLost {
        /// Slot name.
        name: String,
        /// `has been invalidated (…)` or `was dropped`.
        how: String,
        /// What happens next, or what the operator runs to recover without a gap.
        remedy: String,
    },
    /// The subscription row cannot be used as configured (e.g. its mode differs).
    #[error("subscription {name:?}: {problem}")]
    Subscription {
        /// Subscription name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The server broke the replication protocol as we understand it.
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    /// A pgoutput message could not be decoded.
    #[error("cannot decode the replication stream at {lsn}")]
    Decode {
        /// WAL position of the XLogData that failed.
        lsn: crate::lsn::Lsn,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The stream carried a row of a relation the listener has no layout for.
    #[error("cannot decode an event of the transaction committed at {commit_lsn}")]
    Event {
        /// Commit LSN of the transaction.
        commit_lsn: crate::lsn::Lsn,
        /// Why.
        #[source]
        source: EventError,
    },
    /// A blocking handler failed on an event and retries were exhausted (or the failure was
    /// definite, or it panicked).
    #[error(
        "handler {handler:?} failed {} after {attempts} attempt(s)",
        event_id.map_or_else(|| "to flush".to_string(), |id| format!("on event {id}"))
    )]
    Handler {
        /// Handler name.
        handler: String,
        /// The event's id, or `None` when `flush` failed.
        event_id: Option<uuid::Uuid>,
        /// How many times it was called.
        attempts: u32,
        /// The last failure.
        #[source]
        source: HandlerError,
    },
    /// An internal task ended abnormally (a panic in the listener itself; handler panics are
    /// caught and treated as handler failures).
    #[error("the {task} task failed: {reason}")]
    Task {
        /// Which task.
        task: &'static str,
        /// The panic message or cancellation.
        reason: String,
    },
    /// A statement on the ordinary SQL connection failed.
    #[error("{context}")]
    Sql {
        /// What we were doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl Error {
    /// The policy: may a reconnect (with backoff) cure this?
    pub fn retry(&self) -> Retry {
        match self {
            Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::ConnectionLost(_)
            | Error::StreamEnded => Retry::Transient,
            Error::Server { error, .. } => classify_sqlstate(&error.code),
            Error::Sql { source, .. } => match source.code() {
                Some(code) => classify_sqlstate(code.code()),
                // No SQLSTATE: a lost or refused connection (an I/O error in the chain, or a
                // closed connection) is transient; anything else (the driver's configuration or
                // authentication checks) is definite.
                None if source.is_closed() || has_io_source(source) => Retry::Transient,
                None => Retry::Definite,
            },
            Error::Config(_)
            | Error::PasswordRequired { .. }
            | Error::Authentication(_)
            | Error::Tls(_)
            | Error::MissingExtension { .. }
            | Error::Publication { .. }
            | Error::Slot { .. }
            | Error::SlotLost { .. }
            | Error::Subscription { .. }
            | Error::Protocol(_)
            | Error::Decode { .. }
            | Error::Event { .. }
            | Error::Handler { .. }
            | Error::Task { .. } => Retry::Definite,
        }
    }

    /// Shorthand for `self.retry() == Retry::Transient`.
    pub fn is_transient(&self) -> bool {
        self.retry() == Retry::Transient
    }

    /// `START_REPLICATION` refused because another process streams from the slot (55006): a
    /// standby lost the race for a slot that had just become free.
    pub fn is_slot_in_use(&self) -> bool {
        matches!(self, Error::Server { context: "START_REPLICATION", error } if error.code == "55006")
    }

    pub(crate) fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
        move |source| Error::Sql { context, source }
    }
}

fn has_io_source(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = err.source();
    while let Some(cause) = source {
        if cause.is::<io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Maps a SQLSTATE to the retry policy. Unknown codes are definite: retrying an error we do not
/// understand in a loop would hide it.
pub fn classify_sqlstate(code: &str) -> Retry {
    match code {
        // admin_shutdown, crash_shutdown, cannot_connect_now (server starting or stopping),
        // object_in_use (the slot is still held by a previous listener's walsender),
        // serialization/deadlock failures, idle session timeout.
        "57P01" | "57P02" | "57P03" | "55006" | "40001" | "40P01" | "57P05" => Retry::Transient,
        // connection_exception and insufficient_resources (e.g. too many connections).
        _ if code.starts_with("08") || code.starts_with("53") => Retry::Transient,
        _ => Retry::Definite,
    }
}

/// Renders an error and its whole source chain on one line, for the final log line.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // tokio-postgres repeats its cause in its own Display; skip exact repeats.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file, an override or the merged result is not valid.
    #[error("invalid configuration{}: {message}", origin.as_ref().map(|o| format!(" ({o})")).unwrap_or_default())]
    Invalid {
        /// Where the bad value came from (a file, an env var, a flag).
        origin: Option<String>,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// An invalid value from `origin` (a file, a table, a handler, a flag).
    pub fn invalid(origin: Option<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin,
            message: message.into(),
        }
    }
}

/// A handler's failure, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    retry: Retry,
    /// A transient error that is a timeout, told apart in `handler_errors_total`.
    timed_out: bool,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    /// A failure that may go away (a timeout, an unavailable downstream): retried with backoff.
    pub fn transient(message: impl Into<String>) -> HandlerError {
        HandlerError {
            retry: Retry::Transient,
            timed_out: false,
            message: message.into(),
            source: None,
        }
    }

    /// A call that took too long (a transient failure): retried with backoff.
    pub fn timeout(message: impl Into<String>) -> HandlerError {
        HandlerError {
            timed_out: true,
            ..HandlerError::transient(message)
        }
    }

    /// A failure that retrying cannot cure (the event is invalid for this handler).
    pub fn definite(message: impl Into<String>) -> HandlerError {
        HandlerError {
            retry: Retry::Definite,
            timed_out: false,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> HandlerError {
        self.source = Some(source.into());
        self
    }

    /// Whether the dispatcher may retry.
    pub fn is_transient(&self) -> bool {
        self.retry == Retry::Transient
    }

    /// Whether the failure is a timeout ([`HandlerError::timeout`]).
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_the_policy() {
        assert_eq!(classify_sqlstate("28P01"), Retry::Definite); // bad password
        assert_eq!(classify_sqlstate("3D000"), Retry::Definite); // no such database
        assert_eq!(classify_sqlstate("42704"), Retry::Definite); // slot does not exist
        assert_eq!(classify_sqlstate("55000"), Retry::Definite); // slot invalidated
        assert_eq!(classify_sqlstate("57P01"), Retry::Transient);
        assert_eq!(classify_sqlstate("08006"), Retry::Transient);
        assert_eq!(classify_sqlstate("53300"), Retry::Transient);
        assert_eq!(classify_sqlstate("55006"), Retry::Transient);
    }

    #[test]
    fn lost_connections_are_transient_and_bad_credentials_definite() {
        let lost = Error::ConnectionLost(io::Error::from(io::ErrorKind::UnexpectedEof));
        assert!(lost.is_transient());
        let auth = Error::Server {
            context: "authentication",
            error: Box::new(ServerError {
                severity: "FATAL".into(),
                code: "28P01".into(),
                message: "password authentication failed for user \"x\"".into(),
                detail: None,
                hint: None,
            }),
        };
        assert!(!auth.is_transient());
        assert_eq!(
            report(&auth),
            "authentication: password authentication failed for user \"x\" (SQLSTATE 28P01)"
        );
    }
}
