//! Built-in handlers ("sinks"), one folder each: the handler, and the configuration type that
//! owns its `[[handlers]]` keys, defaults, checks and construction ([`SinkKind`]).
//!
//! Adding a sink: its folder, its `mod` line below, and its line in `sinks!`.

mod config;
mod template;
pub(crate) mod trace_context;

pub mod kafka;
pub mod nats;
pub mod sql;
pub mod stdout;
pub mod webhook;

pub use config::{Purpose, SinkConfig, SinkConfigError, SinkContext, SinkKind};
pub use kafka::{KafkaCompression, KafkaConfig, KafkaOptions, KafkaSink, KafkaTls, TopicTemplate};
pub use nats::{NatsConfig, NatsCredentials, NatsOptions, NatsSink, SubjectTemplate};
pub use sql::{quote_function, Delivery, FunctionNameError, SqlConfig, SqlHandler};
pub use stdout::{StdoutConfig, StdoutSink};
pub use webhook::{WebhookConfig, WebhookSink};

/// Declares [`AnySinkConfig`] over the registered sinks, in the order their kinds are listed in
/// messages.
macro_rules! sinks {
    ($($variant:ident($config:ty)),+ $(,)?) => {
        /// The configuration of any built-in sink: what a handler's `kind` selects, with that
        /// kind's keys. In the file its keys sit beside the handler's common ones.
        #[derive(Debug, Clone, PartialEq, serde::Serialize)]
        #[serde(untagged)]
        pub enum AnySinkConfig {
            $(
                #[doc = concat!("[`", stringify!($config), "`].")]
                $variant($config),
            )+
        }

        $(
            impl From<$config> for AnySinkConfig {
                fn from(config: $config) -> AnySinkConfig {
                    AnySinkConfig::$variant(config)
                }
            }

            impl TryFrom<AnySinkConfig> for $config {
                /// The configuration, of another kind.
                type Error = AnySinkConfig;

                fn try_from(any: AnySinkConfig) -> Result<$config, AnySinkConfig> {
                    match any {
                        AnySinkConfig::$variant(config) => Ok(config),
                        other => Err(other),
                    }
                }
            }
        )+

        impl AnySinkConfig {
            /// Every kind's name, in registration order.
            pub const KINDS: &'static [&'static str] = &[$(<$config as SinkKind>::KIND),+];

            /// The keys `kind` takes besides the common ones; `None` for an unknown kind.
            pub fn keys(kind: &str) -> Option<&'static [&'static str]> {
                $(
                    if kind == <$config as SinkKind>::KIND {
                        return Some(<$config as SinkKind>::KEYS);
                    }
                )+
                None
            }

            /// Reads `kind`'s keys from `table`; `None` for an unknown kind.
            pub fn from_table(
                kind: &str,
                table: toml::Table,
            ) -> Option<Result<AnySinkConfig, toml::de::Error>> {
                $(
                    if kind == <$config as SinkKind>::KIND {
                        return Some(
                            toml::Value::Table(table)
                                .try_into::<$config>()
                                .map(AnySinkConfig::$variant),
                        );
                    }
                )+
                None
            }

            /// The name of this kind (`kind = "..."`).
            pub fn kind(&self) -> &'static str {
                match self {
                    $(AnySinkConfig::$variant(_) => <$config as SinkKind>::KIND,)+
                }
            }

            /// The sink's behaviour: checks and construction.
            pub fn sink(&self) -> &dyn SinkConfig {
                match self {
                    $(AnySinkConfig::$variant(config) => config,)+
                }
            }
        }
    };
}

sinks! {
    Stdout(StdoutConfig),
    Sql(SqlConfig),
    Webhook(WebhookConfig),
    Nats(NatsConfig),
    Kafka(KafkaConfig),
}

impl Default for AnySinkConfig {
    /// JSON lines on standard output.
    fn default() -> AnySinkConfig {
        AnySinkConfig::Stdout(StdoutConfig::default())
    }
}
