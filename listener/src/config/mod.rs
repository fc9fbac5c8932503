//! Configuration: one TOML file, then `PGDE_*` environment overrides, then command-line flags.
//!
//! Every key of the `database`, `replication`, `log`, `admin`, `registry` and `telemetry` tables can be
//! overridden by the environment as `PGDE_<TABLE>_<KEY>` (e.g. `PGDE_DATABASE_PORT=5433`,
//! `PGDE_REPLICATION_SLOT=orders`) and on the command line with `--set table.key=value` or one of
//! the dedicated flags. Secrets never come from the file or the command line: the password is
//! read from `PGDE_PASSWORD`, else `PGPASSWORD`.

mod admin;
mod args;
mod console;
mod handler;
mod loading;
mod log;
mod overrides;
mod registry;
mod replication;
pub(crate) mod telemetry;
#[cfg(test)]
mod tests;

pub use crate::error::ConfigError;
pub use crate::postgres::database::DatabaseConfig;
pub use crate::replication::subscription::Mode;
pub use admin::AdminConfig;
pub use args::ConfigArgs;
pub use console::ConsoleConfig;
pub use handler::HandlerConfig;
pub use loading::Config;
pub use log::{LogConfig, LogFormat};
pub use overrides::Overrides;
pub use registry::RegistryConfig;
pub use replication::{ReplicationConfig, SlotLostPolicy};
pub use telemetry::{SamplerKind, TelemetryConfig};

/// Loads one `[[handlers]]` table given as TOML text (its keys, without the header).
#[cfg(test)]
pub(crate) fn load_handler(text: &str) -> Result<HandlerConfig, ConfigError> {
    let path = std::env::temp_dir().join(format!(
        "pgde-handler-{}-{:?}.toml",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, format!("[[handlers]]\n{text}")).expect("write temp config");
    let loaded = Config::load(Some(&path), &[], &Overrides::default());
    let _ = std::fs::remove_file(&path);
    loaded.map(|mut config| config.handlers.remove(0))
}

/// Loads one handler of kind `T` given its keys as TOML text, and returns its sink's keys.
#[cfg(test)]
pub(crate) fn load_sink<T>(text: &str) -> T
where
    T: crate::sink::SinkKind + TryFrom<crate::sink::AnySinkConfig>,
    T::Error: std::fmt::Debug,
{
    let handler = load_handler(&format!("kind = \"{}\"\n{text}", T::KIND)).expect("loads");
    T::try_from(handler.sink).expect("of this kind")
}
