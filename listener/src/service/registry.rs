//! The registry of built-in handlers described by the configuration's `[[handlers]]`.

use std::sync::Arc;

use crate::config::{Config, ConfigError, HandlerConfig, HandlerKind};
use crate::delivery::dispatch::{Handler, Registry};
use crate::error::Error;
use crate::sink::{KafkaSink, NatsSink, SqlHandler, StdoutSink, WebhookSink};

/// What built-in handlers are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Following the stream (`listener run`).
    Stream,
    /// Running over stored events (`listener replay`): a `sql` handler applies every event,
    /// whatever its position row says ([`SqlHandler::for_replay`]).
    Replay,
}

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
    let invalid = |handler: &HandlerConfig, message: String| ConfigError::Invalid {
        origin: Some(format!("handler {}", handler.name())),
        message,
    };
    let mut registry = Registry::new();
    for handler in handlers {
        let sink: Arc<dyn Handler> = match handler.kind {
            HandlerKind::Stdout => Arc::new(StdoutSink::new()),
            HandlerKind::Sql => {
                let function = handler.function.as_deref().unwrap_or_default();
                let sql = SqlHandler::new(
                    config.database.clone(),
                    function,
                    handler.name(),
                    config.replication.subscription_name(),
                )
                .map_err(|e| invalid(handler, e.to_string()))?
                .with_mode(config.replication.mode);
                match purpose {
                    Purpose::Stream => Arc::new(sql),
                    Purpose::Replay => Arc::new(sql.for_replay()),
                }
            }
            HandlerKind::Webhook => {
                let secret = handler.webhook_secret(env)?;
                let url = handler.url.as_deref().unwrap_or_default();
                Arc::new(
                    WebhookSink::new(url, handler.timeout(), secret)
                        .map_err(|e| invalid(handler, crate::error::report(&e)))?,
                )
            }
            HandlerKind::Nats => Arc::new(NatsSink::new(handler.nats_options(env)?)),
            HandlerKind::Kafka => Arc::new(
                KafkaSink::new(handler.kafka_options()?)
                    .map_err(|e| invalid(handler, e.to_string()))?,
            ),
        };
        registry.register_with(
            handler.name(),
            handler.filters()?,
            handler.retry(),
            handler.on_failure,
            sink,
        );
    }
    Ok(registry)
}
