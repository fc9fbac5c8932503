//! What the sink is built from: servers, subject, stream, timeout, credentials, retries.

use std::time::Duration;

use super::subject::SubjectTemplate;

/// Subject template when none is configured.
pub const DEFAULT_SUBJECT: &str = "events.{aggregate_type}.{event_type}";
/// Stream name when none is configured.
pub const DEFAULT_STREAM: &str = "DOMAIN_EVENTS";
/// Server when none is configured.
pub const DEFAULT_SERVER: &str = "nats://127.0.0.1:4222";
/// Connect, API and ack timeout when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the server and where to publish.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URLs (`nats://host:port`); the client fails over between them.
    pub servers: Vec<String>,
    /// Subject of each event.
    pub subject: SubjectTemplate,
    /// The JetStream stream that must capture the subjects.
    pub stream: String,
    /// Create the stream (subjects: [`SubjectTemplate::stream_subject`]) when it is missing.
    pub create_stream: bool,
    /// Duplicate window of a created stream; `None`: the server's default (2 minutes).
    pub duplicate_window: Option<Duration>,
    /// Connect, API and publish-ack timeout.
    pub timeout: Duration,
    /// Credentials: resolved from the environment by the caller.
    pub credentials: Option<NatsCredentials>,
    /// Failed flushes after which a publish is given up (its events are dead-lettered by then):
    /// the handler's `max_attempts`.
    pub max_attempts: u32,
}

/// Credentials for the NATS server.
#[derive(Clone)]
pub enum NatsCredentials {
    /// User and password.
    UserPassword(String, String),
    /// A token.
    Token(String),
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsCredentials::UserPassword(user, _) => {
                write!(f, "UserPassword({user:?}, <redacted>)")
            }
            NatsCredentials::Token(_) => write!(f, "Token(<redacted>)"),
        }
    }
}
