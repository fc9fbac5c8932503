//! `[registry]`: the async handlers registered in the database (`domain_events.handler`).

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// `[registry]`: running the async handlers registered with `domain_events.register_handler(...,
/// mode => 'async')`. Each enabled one runs in a lane of its own (notify-mode subscription
/// `handler:<name>`, exactly once); registrations, `enable_handler` and `disable_handler` are
/// picked up every `poll_interval_ms`. Where several listeners share a database, one of them
/// runs each handler at a time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Run the registry's async handlers (default `true`).
    pub handlers: bool,
    /// How often the registry is read, in milliseconds.
    pub poll_interval_ms: u64,
    /// Attempts per event before it is dead-lettered (subscription `handler:<name>`).
    pub max_attempts: u32,
    /// First retry delay, doubled per attempt up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    /// Longest retry delay.
    pub max_backoff_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            handlers: true,
            poll_interval_ms: 1000,
            max_attempts: 5,
            initial_backoff_ms: 100,
            max_backoff_ms: 10_000,
        }
    }
}

impl RegistryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::invalid(
                Some(format!("registry.{key}")),
                message.to_string(),
            ))
        };
        if self.poll_interval_ms == 0 {
            return invalid("poll_interval_ms", "must be positive");
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts", "must be at least 1");
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return invalid("initial_backoff_ms", "must not exceed max_backoff_ms");
        }
        Ok(())
    }

    /// The retry policy of every registry handler.
    pub fn retry(&self) -> crate::delivery::dispatch::RetryPolicy {
        crate::delivery::dispatch::RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: std::time::Duration::from_millis(self.initial_backoff_ms),
            max_backoff: std::time::Duration::from_millis(self.max_backoff_ms),
        }
    }
}
