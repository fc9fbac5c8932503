//! The whole configuration, and how it is loaded: the file, then `PGDE_*` variables, then
//! flags, then the checks.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::admin::AdminConfig;
use super::console::ConsoleConfig;
use super::handler::{self, HandlerConfig};
use super::log::LogConfig;
use super::overrides::{set, set_value, Overrides};
use super::registry::RegistryConfig;
use super::replication::{ReplicationConfig, SlotLostPolicy};
use super::telemetry::{self, TelemetryConfig};
use crate::delivery::dead_letter::DECODE_HANDLER;
use crate::error::ConfigError;
use crate::postgres::database::DatabaseConfig;
use crate::replication::subscription::Mode;

/// Tables of the file that environment variables may override.
const OVERRIDABLE: [&str; 6] = [
    "database",
    "replication",
    "log",
    "admin",
    "registry",
    "telemetry",
];

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to connect.
    pub database: DatabaseConfig,
    /// Slot, publication and stream tuning.
    pub replication: ReplicationConfig,
    /// Logging.
    pub log: LogConfig,
    /// The admin HTTP server (health and metrics).
    pub admin: AdminConfig,
    /// The async handlers registered in the database.
    pub registry: RegistryConfig,
    /// The operator console on the admin server (left out of `print-config` while unset).
    #[serde(skip_serializing_if = "ConsoleConfig::is_unset")]
    pub console: ConsoleConfig,
    /// Traces of the handler calls, exported over OTLP.
    pub telemetry: TelemetryConfig,
    /// Handlers, each `[[handlers]]` table one handler.
    pub handlers: Vec<HandlerConfig>,
}

impl Config {
    /// Loads `path` (if any), applies `PGDE_*` variables from `env`, then `flags`, and validates.
    /// `env` is passed in (rather than read here) so that tests are hermetic.
    pub fn load(
        path: Option<&Path>,
        env: &[(String, String)],
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| {
                    ConfigError::invalid(Some(path.display().to_string()), e.to_string())
                })?
            }
            None => toml::Table::new(),
        };
        if let Some(db) = table.get("database").and_then(|d| d.as_table()) {
            if db.contains_key("password") {
                return Err(ConfigError::invalid(
                    path.map(|p| p.display().to_string()),
                    "database.password is not allowed in the file: secrets come from the \
                     environment only (PGDE_PASSWORD or PGPASSWORD)",
                ));
            }
        }
        let mut overridden = false;
        // The standard OpenTelemetry variables first: the listener's own override them.
        for (name, value) in env {
            if let Some((_, key)) = telemetry::OTEL_VARIABLES.iter().find(|(n, _)| n == name) {
                let value = match *key {
                    // A number, whatever TOML would make of it.
                    "sampler_arg" => value
                        .trim()
                        .parse::<f64>()
                        .map(toml::Value::Float)
                        .map_err(|_| {
                            ConfigError::invalid(
                                Some(name.clone()),
                                format!("{value:?}: not a number"),
                            )
                        })?,
                    _ => toml::Value::String(value.clone()),
                };
                set_value(&mut table, "telemetry", key, value, name)?;
                overridden = true;
            } else if name == "OTEL_TRACES_EXPORTER" {
                if let Some(enabled) = telemetry::otel_exporter(value) {
                    set_value(
                        &mut table,
                        "telemetry",
                        "enabled",
                        toml::Value::Boolean(enabled),
                        name,
                    )?;
                    overridden = true;
                }
            }
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("PGDE_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            let section = section.to_ascii_lowercase();
            if !OVERRIDABLE.contains(&section.as_str()) {
                continue;
            }
            let key = key.to_ascii_lowercase();
            if section == "database" && key == "password" {
                continue;
            }
            set(&mut table, &section, &key, value, name)?;
            overridden = true;
        }
        for (dotted, value) in &flags.pairs {
            let (section, key) = dotted.split_once('.').ok_or_else(|| {
                ConfigError::invalid(
                    Some(format!("--set {dotted}")),
                    "expected table.key=value, e.g. database.port=5433",
                )
            })?;
            if section == "database" && key == "password" {
                return Err(ConfigError::invalid(
                    Some("--set".into()),
                    "the password comes from PGDE_PASSWORD or PGPASSWORD only",
                ));
            }
            set(&mut table, section, key, value, &format!("--set {dotted}"))?;
            overridden = true;
        }
        let origin = match (path, overridden) {
            (Some(p), false) => Some(p.display().to_string()),
            (Some(p), true) => Some(format!("{} with PGDE_* and flag overrides", p.display())),
            (None, true) => Some("PGDE_* and flag overrides".to_string()),
            (None, false) => None,
        };
        if let Some(handlers) = table.get("handlers").and_then(toml::Value::as_array) {
            for handler in handlers.iter().filter_map(toml::Value::as_table) {
                handler::check_keys(handler)?;
            }
        }
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::invalid(origin, e.to_string()))?;
        let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        config.database.password = lookup("PGDE_PASSWORD").or_else(|| lookup("PGPASSWORD"));
        if lookup("OTEL_SDK_DISABLED").is_some_and(|v| telemetry::otel_disabled(&v)) {
            config.telemetry.enabled = false;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks names and ranges, so that mistakes fail at startup with a clear message.
    ///
    /// Handler secrets are not read here: only the command that runs the handlers needs them
    /// ([`crate::service::registry_from_config`] reads them, and names a missing variable), so
    /// `listener dead-letters list` works without the webhook's key in the environment.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_embedded()?;
        if self.handlers.is_empty() {
            return Err(ConfigError::invalid(
                None,
                "no handlers configured: add a [[handlers]] table, e.g. kind = \"stdout\"",
            ));
        }
        Ok(())
    }

    /// What [`crate::Listener::new`] checks: everything [`Config::validate`] checks, except that
    /// `handlers` may be empty (an embedding application brings its handlers in the registry).
    pub(crate) fn validate_embedded(&self) -> Result<(), ConfigError> {
        let r = &self.replication;
        if !is_simple_name(&r.slot) || r.slot.contains('$') {
            return Err(ConfigError::invalid(
                Some("replication.slot".into()),
                format!(
                    "{:?}: use 1-63 lowercase letters, digits and underscores",
                    r.slot
                ),
            ));
        }
        if !is_simple_name(&r.publication)
            || r.publication.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(ConfigError::invalid(
                Some("replication.publication".into()),
                format!(
                    "{:?}: use a lowercase identifier of at most 63 characters",
                    r.publication
                ),
            ));
        }
        if r.subscription_name().is_empty() {
            return Err(ConfigError::invalid(
                Some("replication.subscription".into()),
                "must not be empty",
            ));
        }
        if r.status_interval_secs == 0 || r.ack_interval_ms == 0 || r.checkpoint_interval_ms == 0 {
            return Err(ConfigError::invalid(
                Some("replication".into()),
                "status_interval_secs, ack_interval_ms and checkpoint_interval_ms must be positive",
            ));
        }
        if r.server_timeout_secs != 0 && r.server_timeout_secs <= r.status_interval_secs {
            return Err(ConfigError::invalid(
                Some("replication.server_timeout_secs".into()),
                "must exceed status_interval_secs (replies are asked for at that interval)",
            ));
        }
        let polls = r.mode == Mode::Notify || r.on_slot_lost == SlotLostPolicy::Recover;
        if polls && (r.poll_interval_ms == 0 || r.poll_batch_size <= 0) {
            return Err(ConfigError::invalid(
                Some("replication".into()),
                "poll_interval_ms and poll_batch_size must be positive",
            ));
        }
        if r.workers == 0 || r.workers > 1024 {
            return Err(ConfigError::invalid(
                Some("replication.workers".into()),
                "must be between 1 and 1024",
            ));
        }
        if r.queue_capacity == 0 {
            return Err(ConfigError::invalid(
                Some("replication.queue_capacity".into()),
                "must be positive",
            ));
        }
        if r.standby_check_interval_ms == 0 {
            return Err(ConfigError::invalid(
                Some("replication.standby_check_interval_ms".into()),
                "must be positive",
            ));
        }
        if let Some(listen) = self.admin.listen.as_deref() {
            if !listen.trim().is_empty() && self.admin.address().is_none() {
                return Err(ConfigError::invalid(
                    Some("admin.listen".into()),
                    format!("{listen:?}: use an IP address and port, e.g. \"127.0.0.1:9187\""),
                ));
            }
        }
        if let Some(name) = self.admin.token_env.as_deref() {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::invalid(
                    Some("admin.token_env".into()),
                    format!("{name:?}: name an environment variable (letters, digits, _)"),
                ));
            }
        }
        self.registry.validate()?;
        self.telemetry.validate()?;
        self.console.validate(self.admin.address().is_some())?;
        let mut names = std::collections::HashSet::new();
        for handler in &self.handlers {
            handler.validate()?;
            if handler.sink.sink().needs_stream_order() && r.workers > 1 {
                return Err(handler.invalid(format!(
                    "a {} handler is exactly-once in stream order only: use workers = 1",
                    handler.sink.kind()
                )));
            }
            if handler.name() == DECODE_HANDLER {
                return Err(handler.invalid(
                    "the name is reserved for dead letters of undecodable rows; choose another",
                ));
            }
            if !names.insert(handler.name()) {
                return Err(
                    handler.invalid("two handlers have this name; give each a distinct `name`")
                );
            }
        }
        Ok(())
    }
}

/// Lowercase letters, digits, `_` and `$`, 1 to 63 characters: needs no quoting anywhere.
fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
}
