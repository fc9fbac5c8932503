//! The registry of built-in handlers described by the configuration's `[[handlers]]`.

use crate::config::{Config, HandlerConfig};
use crate::delivery::dispatch::Registry;
use crate::error::Error;
pub use crate::sink::Purpose;
use crate::sink::SinkContext;

/// Builds the registry of built-in handlers described by `config.handlers`.
///
/// Secrets named by handlers (`secret_env`, `user_env`, …) are read from the process
/// environment now: a missing variable is a configuration error naming it.
pub fn registry_from_config(config: &Config) -> Result<Registry, Error> {
    build_registry(config, &config.handlers, Purpose::Stream)
}

/// Builds the registry of `handlers` (entries of `config.handlers`), in their order, for
/// `purpose`; the rest of `config` supplies the database and subscription they work for.
pub fn build_registry<'a>(
    config: &Config,
    handlers: impl IntoIterator<Item = &'a HandlerConfig>,
    purpose: Purpose,
) -> Result<Registry, Error> {
    let env = |name: &str| std::env::var(name).ok();
    let mut registry = Registry::new();
    for handler in handlers {
        let name = handler.name();
        let context = SinkContext {
            handler: &name,
            max_attempts: handler.max_attempts,
            database: &config.database,
            subscription: config.replication.subscription_name(),
            mode: config.replication.mode,
            purpose,
            env: &env,
        };
        let sink = handler
            .sink
            .sink()
            .build(&context)
            .map_err(|e| handler.sink_error(e))?;
        registry.register_with(
            name,
            handler.filters()?,
            handler.retry(),
            handler.on_failure,
            sink,
        );
    }
    Ok(registry)
}
