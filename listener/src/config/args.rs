//! The command-line flags of the subcommands that read the configuration.

use std::path::PathBuf;

use super::loading::Config;
use super::overrides::Overrides;
use crate::error::ConfigError;

/// Command-line flags shared by the subcommands that read the configuration.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short, env = "PGDE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides `database.host`.
    #[arg(long)]
    pub host: Option<String>,
    /// Overrides `database.port`.
    #[arg(long)]
    pub port: Option<u16>,
    /// Overrides `database.user`.
    #[arg(long)]
    pub user: Option<String>,
    /// Overrides `database.dbname`.
    #[arg(long)]
    pub dbname: Option<String>,
    /// Overrides `replication.slot`.
    #[arg(long)]
    pub slot: Option<String>,
    /// Overrides `replication.publication`.
    #[arg(long)]
    pub publication: Option<String>,
    /// Overrides `replication.subscription`.
    #[arg(long)]
    pub subscription: Option<String>,
    /// Overrides `log.level`.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Overrides `log.format` (`pretty` or `json`).
    #[arg(long)]
    pub log_format: Option<String>,
    /// Overrides any key: `--set replication.heartbeat_interval_secs=30` (repeatable).
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The flags as overrides, dedicated flags first, then `--set` in order.
    pub fn overrides(&self) -> Result<Overrides, ConfigError> {
        let mut pairs = Vec::new();
        let mut add = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                pairs.push((key.to_string(), value));
            }
        };
        add("database.host", self.host.clone().map(quote));
        add("database.port", self.port.map(|p| p.to_string()));
        add("database.user", self.user.clone().map(quote));
        add("database.dbname", self.dbname.clone().map(quote));
        add("replication.slot", self.slot.clone().map(quote));
        add(
            "replication.publication",
            self.publication.clone().map(quote),
        );
        add(
            "replication.subscription",
            self.subscription.clone().map(quote),
        );
        add("log.level", self.log_level.clone().map(quote));
        add("log.format", self.log_format.clone().map(quote));
        for item in &self.set {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                ConfigError::invalid(Some(format!("--set {item}")), "expected TABLE.KEY=VALUE")
            })?;
            pairs.push((key.trim().to_string(), value.to_string()));
        }
        Ok(Overrides { pairs })
    }

    /// Loads the configuration these flags describe, with the process environment.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load(self.config.as_deref(), &env, &self.overrides()?)
    }
}

/// Quotes a string flag as a TOML string, so that values such as `5432` given to `--dbname` stay
/// strings.
fn quote(s: String) -> String {
    toml::Value::String(s).to_string()
}
