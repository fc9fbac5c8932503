//! What every built-in sink provides to the configuration: a type for its `[[handlers]]` keys
//! that checks itself without touching the environment, and builds the handler (reading the
//! secrets and files it names). The configuration knows sinks only through these traits and
//! [`super::AnySinkConfig`], so a new sink brings its keys, defaults and checks with it.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::delivery::dispatch::Handler;
use crate::postgres::database::DatabaseConfig;
use crate::replication::subscription::Mode;

/// What built-in handlers are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Following the stream (`listener run`).
    Stream,
    /// Running over stored events (`listener replay`): a `sql` handler applies every event,
    /// whatever its position row says ([`crate::sink::SqlHandler::for_replay`]).
    Replay,
}

/// Why a sink's keys cannot be used: the message the configuration error carries, after the
/// name of the handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SinkConfigError(pub String);

impl SinkConfigError {
    /// An error saying `message`.
    pub fn new(message: impl Into<String>) -> SinkConfigError {
        SinkConfigError(message.into())
    }
}

/// What building a sink may use besides its own keys.
pub struct SinkContext<'a> {
    /// The handler's name (its `name`, else its kind).
    pub handler: &'a str,
    /// The handler's `max_attempts` (sinks that retry inside a flush give up after as many).
    pub max_attempts: u32,
    /// The database the listener follows (a `sql` handler opens its own connection to it).
    pub database: &'a DatabaseConfig,
    /// The subscription the handler delivers for.
    pub subscription: &'a str,
    /// How the listener follows commits.
    pub mode: Mode,
    /// Stream or replay.
    pub purpose: Purpose,
    /// Reads an environment variable: secrets come from the environment only.
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// The behaviour of a sink's configuration, object-safe so that [`super::AnySinkConfig`] can
/// hand out any of them.
pub trait SinkConfig: std::fmt::Debug + Send + Sync {
    /// Checks the keys: required ones present, values well formed, combinations allowed. Pure:
    /// no environment, no files, no network (so `print-config` and the CLI subcommands work
    /// without the secrets).
    fn validate(&self) -> Result<(), SinkConfigError>;

    /// Builds the handler, reading the secrets (through [`SinkContext::env`]) and files named.
    fn build(&self, context: &SinkContext<'_>) -> Result<Arc<dyn Handler>, SinkConfigError>;

    /// The environment variables this sink reads its secrets from.
    fn secret_vars(&self) -> Vec<&str> {
        Vec::new()
    }

    /// Whether the handler must see events one at a time in stream order (`workers = 1`).
    fn needs_stream_order(&self) -> bool {
        false
    }
}

/// A sink's configuration type: its kind's name and keys, read from and written to TOML.
pub trait SinkKind:
    SinkConfig + Clone + Default + PartialEq + Serialize + DeserializeOwned + 'static
{
    /// The name in the file: `kind = "..."`.
    const KIND: &'static str;
    /// The keys this kind takes besides the common ones (`name`, `events`, retry settings).
    const KEYS: &'static [&'static str];
}

/// The timeout of a sink with a `timeout_ms` key: positive, else `default`.
pub fn timeout(timeout_ms: Option<u64>, default: Duration) -> Result<Duration, SinkConfigError> {
    match timeout_ms {
        Some(0) => Err(SinkConfigError::new("timeout_ms must be positive")),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(default),
    }
}

/// Reads the secret in the variable `name` (a `*_env` key), naming the variable when unset.
pub fn secret(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<String, SinkConfigError> {
    env(name).ok_or_else(|| SinkConfigError(format!("environment variable {name} is not set")))
}

/// An environment that has every variable: what pure validation checks secrets against.
pub fn any_secret(_: &str) -> Option<String> {
    Some("set".into())
}
