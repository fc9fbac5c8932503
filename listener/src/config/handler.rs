//! `[[handlers]]`: the keys every handler has (name, event filters, retry policy) and its sink,
//! whose kind and keys belong to the sink ([`crate::sink::AnySinkConfig`]).

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::delivery::dispatch::{Filter, OnFailure, RetryPolicy};
use crate::error::ConfigError;
use crate::sink::{AnySinkConfig, SinkConfigError};

/// The keys every handler takes, whatever its kind (besides `kind` itself).
const COMMON_KEYS: [&str; 6] = [
    "name",
    "events",
    "max_attempts",
    "initial_backoff_ms",
    "max_backoff_ms",
    "on_failure",
];

/// One `[[handlers]]` entry: `kind` and that kind's keys sit beside the common ones in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerConfig {
    /// Unique name used in logs; defaults to the kind.
    pub name: Option<String>,
    /// Event filters: `"*"`, `"Loan.*"`, exact event types. Default `["*"]`.
    pub events: Vec<String>,
    /// Calls per event before giving up (transient failures only).
    pub max_attempts: u32,
    /// First retry delay in milliseconds (doubles each retry).
    pub initial_backoff_ms: u64,
    /// Largest retry delay in milliseconds.
    pub max_backoff_ms: u64,
    /// What happens once an event failed for good: `dead_letter` (default) or `block`.
    pub on_failure: OnFailure,
    /// The sink: `kind` and its keys.
    pub sink: AnySinkConfig,
}

impl Default for HandlerConfig {
    /// A `stdout` handler for every event with the default retry policy.
    fn default() -> HandlerConfig {
        HandlerConfig::new(AnySinkConfig::default())
    }
}

impl HandlerConfig {
    /// A handler delivering every event to `sink`, with the default retry policy.
    pub fn new(sink: impl Into<AnySinkConfig>) -> HandlerConfig {
        let retry = RetryPolicy::default();
        HandlerConfig {
            name: None,
            events: vec!["*".into()],
            max_attempts: retry.max_attempts,
            initial_backoff_ms: retry.initial_backoff.as_millis() as u64,
            max_backoff_ms: retry.max_backoff.as_millis() as u64,
            on_failure: OnFailure::default(),
            sink: sink.into(),
        }
    }

    /// The handler's name.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.sink.kind().to_string())
    }

    /// Parsed filters.
    pub fn filters(&self) -> Result<Vec<Filter>, ConfigError> {
        self.events
            .iter()
            .map(|f| f.parse().map_err(|e| self.invalid(format!("{e}"))))
            .collect()
    }

    /// The retry policy.
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
        }
    }

    /// The environment variables this handler reads its secrets from.
    pub fn secret_vars(&self) -> Vec<&str> {
        self.sink.sink().secret_vars()
    }

    /// Checks the common keys and the sink's (pure: secrets are not read).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.filters()?;
        if self.events.is_empty() {
            return Err(self.invalid("events is empty"));
        }
        if self.max_attempts == 0 {
            return Err(self.invalid("max_attempts must be ≥ 1"));
        }
        self.sink.sink().validate().map_err(|e| self.sink_error(e))
    }

    /// A configuration error of this handler.
    pub(crate) fn invalid(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(Some(format!("handler {}", self.name())), message)
    }

    /// The sink's error as this handler's configuration error.
    pub fn sink_error(&self, error: SinkConfigError) -> ConfigError {
        self.invalid(error.0)
    }
}

/// Refuses a key the handler's kind does not take, naming the handler and the key (and the
/// kinds that take it): checked on the file's table, before typed reading, whose messages
/// could not name the handler.
pub(crate) fn check_keys(table: &toml::Table) -> Result<(), ConfigError> {
    let Some(kind) = table.get("kind").and_then(toml::Value::as_str) else {
        return Ok(()); // reading reports a missing or mistyped kind
    };
    let Some(keys) = AnySinkConfig::keys(kind) else {
        return Ok(()); // reading reports an unknown kind, listing the known ones
    };
    let name = table
        .get("name")
        .and_then(toml::Value::as_str)
        .unwrap_or(kind);
    let origin = || Some(format!("handler {name}"));
    let foreign = table.keys().find(|key| {
        *key != "kind" && !COMMON_KEYS.contains(&key.as_str()) && !keys.contains(&key.as_str())
    });
    let Some(key) = foreign else {
        return Ok(());
    };
    let owners: Vec<String> = AnySinkConfig::KINDS
        .iter()
        .filter(|k| AnySinkConfig::keys(k).is_some_and(|keys| keys.contains(&key.as_str())))
        .map(|k| format!("\"{k}\""))
        .collect();
    let message = if owners.is_empty() {
        let mut takes: Vec<&str> = COMMON_KEYS.to_vec();
        takes.extend(keys);
        format!(
            "unknown key {key}: a kind = \"{kind}\" handler takes {}",
            takes.join(", ")
        )
    } else {
        format!(
            "{key} is for kind = {} only, not kind = \"{kind}\"",
            owners.join(" or ")
        )
    };
    Err(ConfigError::invalid(origin(), message))
}

/// The common keys as read from the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommonKeys {
    name: Option<String>,
    events: Option<Vec<String>>,
    max_attempts: Option<u32>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    #[serde(default)]
    on_failure: OnFailure,
}

impl<'de> Deserialize<'de> for HandlerConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<HandlerConfig, D::Error> {
        let mut table = toml::Table::deserialize(deserializer)?;
        let kind = match table.remove("kind") {
            Some(toml::Value::String(kind)) => kind,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "kind: expected a string, found {}",
                    other.type_str()
                )))
            }
            None => return Err(D::Error::missing_field("kind")),
        };
        let Some(keys) = AnySinkConfig::keys(&kind) else {
            return Err(D::Error::unknown_variant(&kind, AnySinkConfig::KINDS));
        };
        let own: toml::Table = keys
            .iter()
            .filter_map(|key| table.remove_entry(*key))
            .collect();
        let common: CommonKeys = toml::Value::Table(table)
            .try_into()
            .map_err(D::Error::custom)?;
        let sink = AnySinkConfig::from_table(&kind, own)
            .expect("a known kind")
            .map_err(D::Error::custom)?;
        let defaults = HandlerConfig::new(sink);
        Ok(HandlerConfig {
            name: common.name,
            events: common.events.unwrap_or(defaults.events),
            max_attempts: common.max_attempts.unwrap_or(defaults.max_attempts),
            initial_backoff_ms: common
                .initial_backoff_ms
                .unwrap_or(defaults.initial_backoff_ms),
            max_backoff_ms: common.max_backoff_ms.unwrap_or(defaults.max_backoff_ms),
            on_failure: common.on_failure,
            sink: defaults.sink,
        })
    }
}

/// How a handler is written: the common keys, `kind`, then the sink's keys.
#[derive(Serialize)]
struct WrittenHandler<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    kind: &'static str,
    events: &'a [String],
    max_attempts: u32,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    on_failure: OnFailure,
    #[serde(flatten)]
    sink: &'a AnySinkConfig,
}

impl Serialize for HandlerConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WrittenHandler {
            name: self.name.as_deref(),
            kind: self.sink.kind(),
            events: &self.events,
            max_attempts: self.max_attempts,
            initial_backoff_ms: self.initial_backoff_ms,
            max_backoff_ms: self.max_backoff_ms,
            on_failure: self.on_failure,
            sink: &self.sink,
        }
        .serialize(serializer)
    }
}
