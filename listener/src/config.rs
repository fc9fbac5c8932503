//! Configuration: one TOML file, then `PGDE_*` environment overrides, then command-line flags.
//!
//! Every key of the `database`, `replication` and `log` tables can be overridden by the
//! environment as `PGDE_<TABLE>_<KEY>` (e.g. `PGDE_DATABASE_PORT=5433`,
//! `PGDE_REPLICATION_SLOT=orders`) and on the command line with `--set table.key=value` or one of
//! the dedicated flags. Secrets never come from the file or the command line: the password is
//! read from `PGDE_PASSWORD`, else `PGPASSWORD`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::delivery::dead_letter::DECODE_HANDLER;
use crate::delivery::dispatch::{Filter, OnFailure, RetryPolicy};

/// Tables of the file that environment variables may override.
const OVERRIDABLE: [&str; 4] = ["database", "replication", "log", "admin"];

pub use crate::error::ConfigError;
pub use crate::postgres::database::DatabaseConfig;
pub use crate::replication::subscription::Mode;

fn invalid(origin: Option<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin,
        message: message.into(),
    }
}

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
    /// Handlers, each `[[handlers]]` table one handler.
    pub handlers: Vec<HandlerConfig>,
}

/// `[replication]`: slot, publication, durable position and stream timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// How committed events are followed: `replication` (a logical replication slot; needs the
    /// `REPLICATION` attribute) or `notify` (`LISTEN domain_events` wake-ups plus polling of
    /// `domain_events.event`; needs `domain_events_listener` only).
    pub mode: Mode,
    /// `mode = "notify"`: the longest wait between two polls when no notification arrives, in
    /// milliseconds (the safety net for a lost or disabled `NOTIFY`). Also the poll period of a
    /// recovery from a lost slot.
    pub poll_interval_ms: u64,
    /// `mode = "notify"` and lost-slot recovery: events read per query, handled and
    /// acknowledged as one poll batch.
    pub poll_batch_size: i64,
    /// What happens when the slot is invalidated (`wal_status = lost`) or dropped while the
    /// subscription row says events were delivered through it: `recover` (catch up from the
    /// event table by snapshot-safe polling, create a new slot, stream again; no gap) or `stop`
    /// (exit with an error that says how to recover without a gap).
    pub on_slot_lost: SlotLostPolicy,
    /// Logical replication slot (`pgoutput`); created when missing if `create_slot`.
    pub slot: String,
    /// Publication of `domain_events.event`; created when missing if `create_publication`.
    pub publication: String,
    /// Row name in `domain_events.subscription` holding the durable position; defaults to the slot.
    pub subscription: Option<String>,
    /// Create the slot when it does not exist.
    pub create_slot: bool,
    /// Create the publication when it does not exist (needs ownership of the event table).
    pub create_publication: bool,
    /// Maximum seconds between two standby status updates (keep below `wal_sender_timeout`).
    pub status_interval_secs: u64,
    /// Seconds without any message from the server (while reading) after which the connection is
    /// considered dead and re-opened; periodic status updates ask the server for a reply, so a
    /// live server is never silent that long. 0 turns the check off.
    pub server_timeout_secs: u64,
    /// How often newly handled transactions are confirmed to the server, in milliseconds.
    pub ack_interval_ms: u64,
    /// How often the durable position is written to the subscription row, in milliseconds.
    pub checkpoint_interval_ms: u64,
    /// Seconds between heartbeats (`pg_logical_emit_message(true, ...)`); 0 turns them off.
    pub heartbeat_interval_secs: u64,
    /// Events and commits buffered between the stream and the handlers.
    pub queue_capacity: usize,
    /// First delay before reconnecting after a transient failure, in milliseconds.
    pub reconnect_min_backoff_ms: u64,
    /// Largest delay between reconnect attempts, in milliseconds.
    pub reconnect_max_backoff_ms: u64,
    /// How often requested redeliveries of dead letters are looked for, in milliseconds (also
    /// at the start of every session); `0` turns redrive off.
    pub redrive_interval_ms: u64,
    /// Handler tasks. Events are routed by a hash of (aggregate type, aggregate id): per
    /// aggregate order holds, unrelated aggregates are handled in parallel. `1`: one task, in
    /// commit order.
    pub workers: usize,
    /// Log a warning (at most once a minute) while the slot retains more WAL than this many
    /// bytes; checked every `status_interval_secs`. 0 turns the warning off (the
    /// `slot_retained_wal_bytes` metric is exported either way).
    pub slot_wal_warning_bytes: u64,
    /// On shutdown (SIGTERM, SIGINT, or the library's cancellation), how long the listener may
    /// take to finish the transaction in flight: receive it up to its commit, handle it
    /// (retries included), confirm it. After that it stops at once, and what it did not confirm
    /// is delivered again on the next start.
    pub shutdown_timeout_secs: u64,
    /// Replication mode: while another listener streams from the slot, this one stands by and
    /// checks this often (in milliseconds) whether the slot is free, then takes over.
    pub standby_check_interval_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> ReplicationConfig {
        ReplicationConfig {
            mode: Mode::Replication,
            poll_interval_ms: 1000,
            poll_batch_size: 1000,
            on_slot_lost: SlotLostPolicy::Recover,
            slot: "pg_domain_events".into(),
            publication: "pg_domain_events".into(),
            subscription: None,
            create_slot: true,
            create_publication: true,
            status_interval_secs: 10,
            server_timeout_secs: 120,
            ack_interval_ms: 100,
            checkpoint_interval_ms: 1000,
            heartbeat_interval_secs: 0,
            queue_capacity: 4096,
            reconnect_min_backoff_ms: 500,
            reconnect_max_backoff_ms: 30_000,
            redrive_interval_ms: 5_000,
            workers: 1,
            slot_wal_warning_bytes: 1 << 30,
            shutdown_timeout_secs: 30,
            standby_check_interval_ms: 1000,
        }
    }
}

impl ReplicationConfig {
    /// The subscription row's name.
    pub fn subscription_name(&self) -> &str {
        self.subscription.as_deref().unwrap_or(&self.slot)
    }
}

/// `[admin]`: the HTTP server for `/health` and `/metrics`. Off unless `listen` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` to serve on, e.g. `127.0.0.1:9187`; unset or empty: no admin server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Name of the environment variable holding a bearer token; when set, both endpoints
    /// require `Authorization: Bearer <token>`. The token itself never comes from the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl AdminConfig {
    /// The address to serve on, if the server is enabled.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen
            .as_deref()
            .filter(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().parse().ok())
    }
}

/// What the listener does when its slot is lost (`replication.on_slot_lost`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotLostPolicy {
    /// Deliver what the lost slot did not by polling the event table from the subscription's
    /// delivered snapshot, create a new slot, and stream again (see [`crate::replication::recovery`]).
    #[default]
    Recover,
    /// Stop with [`crate::Error::SlotLost`], whose message says how to recover.
    Stop,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `listener=debug,warn`… (`RUST_LOG` wins when set).
    pub level: String,
    /// `pretty` (human) or `json` (one object per line).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// One `[[handlers]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// Unique name used in logs; defaults to the kind.
    pub name: Option<String>,
    /// Built-in handler: `stdout`.
    pub kind: HandlerKind,
    /// Event filters: `"*"`, `"Loan.*"`, exact event types. Default `["*"]`.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Calls per event before giving up (transient failures only).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay in milliseconds (doubles each retry).
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Largest retry delay in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// What happens once an event failed for good: `dead_letter` (default) or `block`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// `kind = "sql"`: the function `schema.function(event jsonb)` to call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// `kind = "webhook"`: the `http(s)` URL each event is POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `kind = "webhook"`: name of the environment variable holding the HMAC-SHA256 key of the
    /// `X-Signature` header (no secret, no header). Secrets never come from the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// `kind = "webhook"`: per-request timeout; `kind = "nats"`: connect, API and publish-ack
    /// timeout; `kind = "kafka"`: connect, metadata, topic creation and produce-ack timeout.
    /// Milliseconds, default 10 000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `kind = "nats"`: server URLs, default `["nats://127.0.0.1:4222"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<Vec<String>>,
    /// `kind = "nats"`: subject template, default `events.{aggregate_type}.{event_type}`
    /// (placeholders `{aggregate_type}`, `{event_type}`, `{aggregate_id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `kind = "nats"`: JetStream stream capturing the subjects, default `DOMAIN_EVENTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// `kind = "nats"`: create the stream when missing (default `true`), capturing the
    /// template's fixed prefix (`events.>` for the default template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_stream: Option<bool>,
    /// `kind = "nats"`: duplicate window of a stream the listener creates, in seconds (default:
    /// the server's, 2 minutes). A replay later than this after its first publish is stored twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window_secs: Option<u64>,
    /// `kind = "nats"`: name of the environment variable holding the user name (with
    /// `password_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_env: Option<String>,
    /// `kind = "nats"`: name of the environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `kind = "nats"`: name of the environment variable holding an authentication token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// `kind = "kafka"`: bootstrap brokers (`host:port`), default `["127.0.0.1:9092"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<Vec<String>>,
    /// `kind = "kafka"`: topic template, default `events.{aggregate_type}` (placeholders
    /// `{aggregate_type}`, `{event_type}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// `kind = "kafka"`: create a topic when it is missing (default `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_topics: Option<bool>,
    /// `kind = "kafka"`: partitions of a created topic (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// `kind = "kafka"`: replication factor of a created topic (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i16>,
    /// `kind = "kafka"`: batch compression, `none` (default), `gzip` or `snappy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::sink::KafkaCompression>,
    /// `kind = "kafka"`: largest record batch in bytes, default 1 048 588 (the broker's default
    /// `message.max.bytes`). A larger event is dead-lettered; larger transactions are split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// `kind = "kafka"`: connect to the brokers over TLS (default `false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// `kind = "kafka"` with `tls`: CA certificates (PEM) that sign the brokers' certificates
    /// (default: the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `kind = "kafka"` with `tls`: client certificate chain (PEM), with `tls_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// `kind = "kafka"` with `tls`: the client certificate's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl Default for HandlerConfig {
    /// A `stdout` handler for every event with the default retry policy.
    fn default() -> HandlerConfig {
        HandlerConfig {
            name: None,
            kind: HandlerKind::Stdout,
            events: all_events(),
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            on_failure: OnFailure::default(),
            function: None,
            url: None,
            secret_env: None,
            timeout_ms: None,
            servers: None,
            subject: None,
            stream: None,
            create_stream: None,
            duplicate_window_secs: None,
            user_env: None,
            password_env: None,
            token_env: None,
            brokers: None,
            topic: None,
            create_topics: None,
            partitions: None,
            replication_factor: None,
            compression: None,
            max_message_bytes: None,
            tls: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn all_events() -> Vec<String> {
    vec!["*".into()]
}
fn default_max_attempts() -> u32 {
    RetryPolicy::default().max_attempts
}
fn default_initial_backoff_ms() -> u64 {
    RetryPolicy::default().initial_backoff.as_millis() as u64
}
fn default_max_backoff_ms() -> u64 {
    RetryPolicy::default().max_backoff.as_millis() as u64
}

/// Built-in handler kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// JSON lines on standard output ([`crate::sink::StdoutSink`]).
    Stdout,
    /// A SQL function called exactly once per event ([`crate::sink::SqlHandler`]).
    Sql,
    /// A signed HTTP POST per event ([`crate::sink::WebhookSink`]).
    Webhook,
    /// A JetStream publish per event ([`crate::sink::NatsSink`]).
    Nats,
    /// A Kafka record per event ([`crate::sink::KafkaSink`]).
    Kafka,
}

impl HandlerKind {
    /// The name used in the file (`kind = "..."`).
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerKind::Stdout => "stdout",
            HandlerKind::Sql => "sql",
            HandlerKind::Webhook => "webhook",
            HandlerKind::Nats => "nats",
            HandlerKind::Kafka => "kafka",
        }
    }

    /// The kind-specific keys this kind accepts.
    fn keys(self) -> &'static [&'static str] {
        match self {
            HandlerKind::Stdout => &[],
            HandlerKind::Sql => &["function"],
            HandlerKind::Webhook => &["url", "secret_env", "timeout_ms"],
            HandlerKind::Nats => &[
                "servers",
                "subject",
                "stream",
                "create_stream",
                "duplicate_window_secs",
                "timeout_ms",
                "user_env",
                "password_env",
                "token_env",
            ],
            HandlerKind::Kafka => &[
                "brokers",
                "topic",
                "create_topics",
                "partitions",
                "replication_factor",
                "compression",
                "max_message_bytes",
                "timeout_ms",
                "tls",
                "tls_ca_file",
                "tls_cert_file",
                "tls_key_file",
            ],
        }
    }
}

impl HandlerConfig {
    /// The handler's name.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.as_str().to_string())
    }

    /// The kind-specific keys that are set, by their name in the file.
    fn keys_set(&self) -> Vec<&'static str> {
        [
            ("function", self.function.is_some()),
            ("url", self.url.is_some()),
            ("secret_env", self.secret_env.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("servers", self.servers.is_some()),
            ("subject", self.subject.is_some()),
            ("stream", self.stream.is_some()),
            ("create_stream", self.create_stream.is_some()),
            (
                "duplicate_window_secs",
                self.duplicate_window_secs.is_some(),
            ),
            ("user_env", self.user_env.is_some()),
            ("password_env", self.password_env.is_some()),
            ("token_env", self.token_env.is_some()),
            ("brokers", self.brokers.is_some()),
            ("topic", self.topic.is_some()),
            ("create_topics", self.create_topics.is_some()),
            ("partitions", self.partitions.is_some()),
            ("replication_factor", self.replication_factor.is_some()),
            ("compression", self.compression.is_some()),
            ("max_message_bytes", self.max_message_bytes.is_some()),
            ("tls", self.tls.is_some()),
            ("tls_ca_file", self.tls_ca_file.is_some()),
            ("tls_cert_file", self.tls_cert_file.is_some()),
            ("tls_key_file", self.tls_key_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    /// The environment variables this handler reads its secrets from.
    pub fn secret_vars(&self) -> Vec<&str> {
        [
            &self.secret_env,
            &self.user_env,
            &self.password_env,
            &self.token_env,
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect()
    }

    /// The timeout of a `webhook`, `nats` or `kafka` handler.
    pub fn timeout(&self) -> Duration {
        match (self.timeout_ms, self.kind) {
            (Some(ms), _) => Duration::from_millis(ms),
            (None, HandlerKind::Nats) => crate::sink::nats::DEFAULT_TIMEOUT,
            (None, HandlerKind::Kafka) => crate::sink::kafka::DEFAULT_TIMEOUT,
            (None, _) => crate::sink::webhook::DEFAULT_TIMEOUT,
        }
    }

    /// The options of a `kafka` handler.
    pub fn kafka_options(&self) -> Result<crate::sink::KafkaOptions, ConfigError> {
        use crate::sink::kafka;
        let origin = || Some(format!("handler {}", self.name()));
        let topic = crate::sink::TopicTemplate::parse(
            self.topic.as_deref().unwrap_or(kafka::DEFAULT_TOPIC),
        )
        .map_err(|e| invalid(origin(), e.to_string()))?;
        let create_topics = self.create_topics.unwrap_or(true);
        if !create_topics && (self.partitions.is_some() || self.replication_factor.is_some()) {
            return Err(invalid(
                origin(),
                "partitions and replication_factor apply to topics the listener creates \
                 (create_topics = true)",
            ));
        }
        let partitions = self.partitions.unwrap_or(1);
        if partitions < 1 {
            return Err(invalid(origin(), "partitions must be at least 1"));
        }
        let replication_factor = self.replication_factor.unwrap_or(1);
        if replication_factor < 1 {
            return Err(invalid(origin(), "replication_factor must be at least 1"));
        }
        let max_message_bytes = self
            .max_message_bytes
            .unwrap_or(kafka::DEFAULT_MAX_MESSAGE_BYTES);
        if max_message_bytes < 1024 {
            return Err(invalid(origin(), "max_message_bytes must be at least 1024"));
        }
        let brokers = self
            .brokers
            .clone()
            .unwrap_or_else(|| vec![kafka::DEFAULT_BROKER.into()]);
        if brokers.is_empty() {
            return Err(invalid(origin(), "brokers is empty"));
        }
        if let Some(broker) = brokers.iter().find(|b| !is_host_port(b)) {
            return Err(invalid(
                origin(),
                format!("broker {broker:?}: use host:port (no scheme)"),
            ));
        }
        let tls = match self.tls.unwrap_or(false) {
            true => {
                if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
                    return Err(invalid(
                        origin(),
                        "set tls_cert_file and tls_key_file together",
                    ));
                }
                Some(crate::sink::KafkaTls {
                    ca_file: self.tls_ca_file.clone(),
                    cert_file: self.tls_cert_file.clone(),
                    key_file: self.tls_key_file.clone(),
                })
            }
            false
                if self.tls_ca_file.is_some()
                    || self.tls_cert_file.is_some()
                    || self.tls_key_file.is_some() =>
            {
                return Err(invalid(
                    origin(),
                    "tls_ca_file, tls_cert_file and tls_key_file need tls = true",
                ))
            }
            false => None,
        };
        Ok(crate::sink::KafkaOptions {
            brokers,
            topic,
            create_topics,
            partitions,
            replication_factor,
            compression: self.compression.unwrap_or_default(),
            max_message_bytes,
            timeout: self.timeout(),
            max_attempts: self.max_attempts,
            tls,
        })
    }

    /// The options of a `nats` handler, secrets read through `lookup` (an environment).
    pub fn nats_options(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<crate::sink::NatsOptions, ConfigError> {
        let origin = || Some(format!("handler {}", self.name()));
        let subject = crate::sink::SubjectTemplate::parse(
            self.subject
                .as_deref()
                .unwrap_or(crate::sink::nats::DEFAULT_SUBJECT),
        )
        .map_err(|e| invalid(origin(), e.to_string()))?;
        let stream = self
            .stream
            .clone()
            .unwrap_or_else(|| crate::sink::nats::DEFAULT_STREAM.into());
        crate::sink::nats::check_stream_name(&stream)
            .map_err(|e| invalid(origin(), e.to_string()))?;
        let create_stream = self.create_stream.unwrap_or(true);
        if create_stream && subject.stream_subject().is_none() {
            return Err(invalid(
                origin(),
                "create_stream needs a subject template that starts with a fixed token                  (e.g. \"events.{aggregate_type}\"); or create the stream yourself and set                  create_stream = false",
            ));
        }
        if self.duplicate_window_secs.is_some() && !create_stream {
            return Err(invalid(
                origin(),
                "duplicate_window_secs applies to a stream the listener creates (create_stream = true)",
            ));
        }
        if self.duplicate_window_secs == Some(0) {
            return Err(invalid(origin(), "duplicate_window_secs must be positive"));
        }
        let servers = self
            .servers
            .clone()
            .unwrap_or_else(|| vec![crate::sink::nats::DEFAULT_SERVER.into()]);
        if servers.is_empty() {
            return Err(invalid(origin(), "servers is empty"));
        }
        if let Some((server, e)) = servers.iter().find_map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .err()
                .map(|e| (s.clone(), e))
        }) {
            return Err(invalid(origin(), format!("server {server:?}: {e}")));
        }
        let secret = |var: &Option<String>| -> Result<Option<String>, ConfigError> {
            var.as_deref()
                .map(|name| {
                    lookup(name).ok_or_else(|| {
                        invalid(origin(), format!("environment variable {name} is not set"))
                    })
                })
                .transpose()
        };
        let credentials = match (
            secret(&self.user_env)?,
            secret(&self.password_env)?,
            secret(&self.token_env)?,
        ) {
            (None, None, None) => None,
            (Some(user), Some(password), None) => {
                Some(crate::sink::NatsCredentials::UserPassword(user, password))
            }
            (None, None, Some(token)) => Some(crate::sink::NatsCredentials::Token(token)),
            _ => {
                return Err(invalid(
                    origin(),
                    "set user_env with password_env, or token_env alone",
                ))
            }
        };
        Ok(crate::sink::NatsOptions {
            servers,
            subject,
            stream,
            create_stream,
            duplicate_window: self.duplicate_window_secs.map(Duration::from_secs),
            timeout: self.timeout(),
            credentials,
            max_attempts: self.max_attempts,
        })
    }

    /// The HMAC key of a `webhook` handler, read through `lookup` (an environment).
    pub fn webhook_secret(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Vec<u8>>, ConfigError> {
        self.secret_env
            .as_deref()
            .map(|name| match lookup(name) {
                Some(secret) if !secret.is_empty() => Ok(secret.into_bytes()),
                _ => Err(invalid(
                    Some(format!("handler {}", self.name())),
                    format!("environment variable {name} (secret_env) is not set or empty"),
                )),
            })
            .transpose()
    }

    /// Checks the kind-specific keys: those of another kind are refused, required ones present,
    /// values well-formed. Secrets are not read (any variable counts as set).
    fn validate_kind(&self) -> Result<(), ConfigError> {
        let lookup = |_: &str| Some("set".to_string());
        let origin = || Some(format!("handler {}", self.name()));
        let allowed = self.kind.keys();
        if let Some(key) = self.keys_set().into_iter().find(|k| !allowed.contains(k)) {
            let owners: Vec<String> = [
                HandlerKind::Stdout,
                HandlerKind::Sql,
                HandlerKind::Webhook,
                HandlerKind::Nats,
                HandlerKind::Kafka,
            ]
            .into_iter()
            .filter(|k| k.keys().contains(&key))
            .map(|k| format!("\"{}\"", k.as_str()))
            .collect();
            return Err(invalid(
                origin(),
                format!(
                    "{key} is for kind = {} only, not kind = \"{}\"",
                    owners.join(" or "),
                    self.kind.as_str()
                ),
            ));
        }
        if self.timeout_ms == Some(0) {
            return Err(invalid(origin(), "timeout_ms must be positive"));
        }
        match self.kind {
            HandlerKind::Stdout => {}
            HandlerKind::Sql => {
                let function = self.function.as_deref().ok_or_else(|| {
                    invalid(
                        origin(),
                        "kind = \"sql\" needs function = \"schema.function\"",
                    )
                })?;
                crate::sink::quote_function(function)
                    .map_err(|e| invalid(origin(), e.to_string()))?;
            }
            HandlerKind::Webhook => {
                let url = self.url.as_deref().ok_or_else(|| {
                    invalid(origin(), "kind = \"webhook\" needs url = \"https://...\"")
                })?;
                crate::sink::webhook::parse_url(url)
                    .map_err(|e| invalid(origin(), e.to_string()))?;
                self.webhook_secret(lookup)?;
            }
            HandlerKind::Nats => {
                self.nats_options(lookup)?;
            }
            HandlerKind::Kafka => {
                self.kafka_options()?;
            }
        }
        Ok(())
    }

    /// Parsed filters.
    pub fn filters(&self) -> Result<Vec<Filter>, ConfigError> {
        self.events
            .iter()
            .map(|f| {
                f.parse()
                    .map_err(|e| invalid(Some(format!("handler {}", self.name())), format!("{e}")))
            })
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
}

/// `host:port` with a non-empty host and a port number (a bracketed IPv6 host is fine).
fn is_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains(['/', ' ']) && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

/// Overrides given on the command line, applied after the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `(dotted key, value)` pairs, e.g. `("database.port", "5433")`.
    pub pairs: Vec<(String, String)>,
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
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| invalid(Some(path.display().to_string()), e.to_string()))?
            }
            None => toml::Table::new(),
        };
        if let Some(db) = table.get("database").and_then(|d| d.as_table()) {
            if db.contains_key("password") {
                return Err(invalid(
                    path.map(|p| p.display().to_string()),
                    "database.password is not allowed in the file: secrets come from the \
                     environment only (PGDE_PASSWORD or PGPASSWORD)",
                ));
            }
        }
        let mut overridden = false;
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
                invalid(
                    Some(format!("--set {dotted}")),
                    "expected table.key=value, e.g. database.port=5433",
                )
            })?;
            if section == "database" && key == "password" {
                return Err(invalid(
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
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(origin, e.to_string()))?;
        let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        config.database.password = lookup("PGDE_PASSWORD").or_else(|| lookup("PGPASSWORD"));
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
            return Err(invalid(
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
            return Err(invalid(
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
            return Err(invalid(
                Some("replication.publication".into()),
                format!(
                    "{:?}: use a lowercase identifier of at most 63 characters",
                    r.publication
                ),
            ));
        }
        if r.subscription_name().is_empty() {
            return Err(invalid(
                Some("replication.subscription".into()),
                "must not be empty",
            ));
        }
        if r.status_interval_secs == 0 || r.ack_interval_ms == 0 || r.checkpoint_interval_ms == 0 {
            return Err(invalid(
                Some("replication".into()),
                "status_interval_secs, ack_interval_ms and checkpoint_interval_ms must be positive",
            ));
        }
        if r.server_timeout_secs != 0 && r.server_timeout_secs <= r.status_interval_secs {
            return Err(invalid(
                Some("replication.server_timeout_secs".into()),
                "must exceed status_interval_secs (replies are asked for at that interval)",
            ));
        }
        let polls = r.mode == Mode::Notify || r.on_slot_lost == SlotLostPolicy::Recover;
        if polls && (r.poll_interval_ms == 0 || r.poll_batch_size <= 0) {
            return Err(invalid(
                Some("replication".into()),
                "poll_interval_ms and poll_batch_size must be positive",
            ));
        }
        if r.workers == 0 || r.workers > 1024 {
            return Err(invalid(
                Some("replication.workers".into()),
                "must be between 1 and 1024",
            ));
        }
        if r.queue_capacity == 0 {
            return Err(invalid(
                Some("replication.queue_capacity".into()),
                "must be positive",
            ));
        }
        if r.standby_check_interval_ms == 0 {
            return Err(invalid(
                Some("replication.standby_check_interval_ms".into()),
                "must be positive",
            ));
        }
        if let Some(listen) = self.admin.listen.as_deref() {
            if !listen.trim().is_empty() && self.admin.address().is_none() {
                return Err(invalid(
                    Some("admin.listen".into()),
                    format!("{listen:?}: use an IP address and port, e.g. \"127.0.0.1:9187\""),
                ));
            }
        }
        if let Some(name) = self.admin.token_env.as_deref() {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(invalid(
                    Some("admin.token_env".into()),
                    format!("{name:?}: name an environment variable (letters, digits, _)"),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for handler in &self.handlers {
            handler.filters()?;
            if handler.events.is_empty() {
                return Err(invalid(
                    Some(format!("handler {}", handler.name())),
                    "events is empty",
                ));
            }
            if handler.max_attempts == 0 {
                return Err(invalid(
                    Some(format!("handler {}", handler.name())),
                    "max_attempts must be ≥ 1",
                ));
            }
            handler.validate_kind()?;
            if handler.kind == HandlerKind::Sql && r.workers > 1 {
                return Err(invalid(
                    Some(format!("handler {}", handler.name())),
                    "a sql handler is exactly-once in stream order only: use workers = 1",
                ));
            }
            if handler.name() == DECODE_HANDLER {
                return Err(invalid(
                    Some(format!("handler {}", handler.name())),
                    "the name is reserved for dead letters of undecodable rows; choose another",
                ));
            }
            if !names.insert(handler.name()) {
                return Err(invalid(
                    Some(format!("handler {}", handler.name())),
                    "two handlers have this name; give each a distinct `name`",
                ));
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

/// Sets `section.key` to `value`, typed as TOML when it parses as a TOML value (numbers,
/// booleans, arrays) and as a string otherwise.
fn set(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    value: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    let typed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let inner = entry.as_table_mut().ok_or_else(|| {
        invalid(
            Some(origin.to_string()),
            format!("{section} is not a table"),
        )
    })?;
    inner.insert(key.to_string(), typed);
    Ok(())
}

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
                invalid(Some(format!("--set {item}")), "expected TABLE.KEY=VALUE")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A temporary config file, removed on drop (one test helper does not justify a dependency).
    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write(text: &str) -> TempFile {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("pgde-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write temp config");
        TempFile(path)
    }

    const FILE: &str = r#"
        [database]
        host = "db.internal"
        port = 5433
        dbname = "app"

        [replication]
        slot = "orders"

        [[handlers]]
        kind = "stdout"
        events = ["Loan.*", "User.Created"]
    "#;

    #[test]
    fn file_then_env_then_flags() {
        let file = write(FILE);
        let config = Config::load(
            Some(&file.0),
            &env(&[
                ("PGDE_DATABASE_PORT", "6000"),
                ("PGDE_REPLICATION_HEARTBEAT_INTERVAL_SECS", "30"),
                ("PGDE_TEST_DSN", "ignored: not a config table"),
                ("PGPASSWORD", "from-pgpassword"),
            ]),
            &Overrides {
                pairs: vec![
                    ("database.port".into(), "7000".into()),
                    ("log.format".into(), "json".into()),
                ],
            },
        )
        .unwrap();
        assert_eq!(config.database.host, "db.internal");
        assert_eq!(config.database.port, 7000);
        assert_eq!(config.database.dbname, "app");
        assert_eq!(config.replication.slot, "orders");
        assert_eq!(config.replication.subscription_name(), "orders");
        assert_eq!(config.replication.heartbeat_interval_secs, 30);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.database.password.as_deref(), Some("from-pgpassword"));
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("from-pgpassword"),
            "Debug shows the password: {debug}"
        );
        assert_eq!(config.handlers[0].filters().unwrap().len(), 2);
    }

    #[test]
    fn pgde_password_wins_over_pgpassword() {
        let file = write(FILE);
        let config = Config::load(
            Some(&file.0),
            &env(&[("PGPASSWORD", "b"), ("PGDE_PASSWORD", "a")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.database.password.as_deref(), Some("a"));
    }

    #[test]
    fn rejects_secrets_unknown_keys_and_bad_names() {
        let file = write("[database]\npassword = \"x\"\n[[handlers]]\nkind = \"stdout\"\n");
        let err = Config::load(Some(&file.0), &[], &Overrides::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("secrets come from the environment"),
            "{err}"
        );

        let file = write(FILE);
        let err = Config::load(
            Some(&file.0),
            &env(&[("PGDE_DATABASE_PROT", "1")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");

        let err = Config::load(
            Some(&file.0),
            &[],
            &Overrides {
                pairs: vec![("replication.slot".into(), "Bad-Slot".into())],
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("replication.slot"), "{err}");

        let file = write("[database]\nport = 1\n");
        let err = Config::load(Some(&file.0), &[], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("no handlers"), "{err}");
    }

    #[test]
    fn sql_handlers_need_a_function_and_one_worker() {
        let load = |text: &str| {
            let file = write(text);
            Config::load(Some(&file.0), &[], &Overrides::default())
        };
        let ok = load("[[handlers]]\nkind = \"sql\"\nfunction = \"app.on_event\"\n").unwrap();
        assert_eq!(ok.handlers[0].name(), "sql");
        for (text, expected) in [
            ("[[handlers]]\nkind = \"sql\"\n", "needs function"),
            (
                "[[handlers]]\nkind = \"sql\"\nfunction = \"on_event\"\n",
                "schema.function",
            ),
            (
                "[[handlers]]\nkind = \"sql\"\nfunction = \"app.f; DROP TABLE x\"\n",
                "schema.function",
            ),
            (
                "[replication]\nworkers = 4\n[[handlers]]\nkind = \"sql\"\nfunction = \"app.f\"\n",
                "workers = 1",
            ),
            (
                "[[handlers]]\nkind = \"stdout\"\nfunction = \"app.f\"\n",
                "sql\" only",
            ),
            (
                "[[handlers]]\nkind = \"stdout\"\nname = \"decode\"\n",
                "reserved",
            ),
            (
                "[replication]\nworkers = 0\n[[handlers]]\nkind = \"stdout\"\n",
                "workers",
            ),
            (
                "[[handlers]]\nkind = \"stdout\"\non_failure = \"retry\"\n",
                "on_failure",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let block = load("[[handlers]]\nkind = \"stdout\"\non_failure = \"block\"\n").unwrap();
        assert_eq!(block.handlers[0].on_failure, OnFailure::Block);
    }

    #[test]
    fn admin_is_off_by_default_and_overridable_from_the_environment() {
        let file = write("[[handlers]]\nkind = \"stdout\"\n");
        let none = Config::load(Some(&file.0), &[], &Overrides::default()).unwrap();
        assert_eq!(none.admin.address(), None);
        assert_eq!(none.replication.slot_wal_warning_bytes, 1 << 30);
        let on = Config::load(
            Some(&file.0),
            &env(&[
                ("PGDE_ADMIN_LISTEN", "127.0.0.1:9187"),
                ("PGDE_ADMIN_TOKEN_ENV", "METRICS_TOKEN"),
                ("PGDE_REPLICATION_SLOT_WAL_WARNING_BYTES", "0"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(on.admin.address(), Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(on.admin.token_env.as_deref(), Some("METRICS_TOKEN"));
        assert_eq!(on.replication.slot_wal_warning_bytes, 0);
        // Empty: disabled (how an environment variable turns a file's setting off).
        let off = Config::load(
            Some(&file.0),
            &env(&[("PGDE_ADMIN_LISTEN", "")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(off.admin.address(), None);
        for (key, value) in [("admin.listen", "localhost"), ("admin.token_env", "A-B")] {
            let flags = Overrides {
                pairs: vec![(key.into(), format!("{value:?}"))],
            };
            let err = Config::load(Some(&file.0), &[], &flags)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn notify_mode_needs_positive_poll_settings() {
        let load = |text: &str| {
            let file = write(text);
            Config::load(Some(&file.0), &[], &Overrides::default())
        };
        let ok =
            load("[replication]\nmode = \"notify\"\n[[handlers]]\nkind = \"stdout\"\n").unwrap();
        assert_eq!(ok.replication.mode, Mode::Notify);
        assert_eq!(ok.replication.poll_interval_ms, 1000);
        for text in [
            "[replication]\nmode = \"notify\"\npoll_interval_ms = 0\n[[handlers]]\nkind = \"stdout\"\n",
            "[replication]\nmode = \"notify\"\npoll_batch_size = 0\n[[handlers]]\nkind = \"stdout\"\n",
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains("must be positive"), "{text}: {err}");
        }
        let err = load("[replication]\nmode = \"poll\"\n[[handlers]]\nkind = \"stdout\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mode"), "{err}");
    }

    #[test]
    fn example_file_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("example.toml");
        Config::load(Some(&example), &[], &Overrides::default()).unwrap();
    }

    #[test]
    fn webhook_and_nats_handlers_are_checked_with_their_secrets() {
        let load = |text: &str| {
            let file = write(text);
            Config::load(Some(&file.0), &[], &Overrides::default())
        };
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        // Loading does not need the secrets (CLI subcommands work without them)…
        let webhook = load(
            "[[handlers]]\nkind = \"webhook\"\nurl = \"https://h.example/e\"\n\
             secret_env = \"HOOK_SECRET\"\ntimeout_ms = 500\n",
        )
        .unwrap();
        let hook = &webhook.handlers[0];
        assert_eq!(hook.name(), "webhook");
        assert_eq!(hook.timeout(), Duration::from_millis(500));
        // …building the handler does, and names the missing variable.
        assert_eq!(
            hook.webhook_secret(vars(&[("HOOK_SECRET", "s3cret")]))
                .unwrap(),
            Some(b"s3cret".to_vec())
        );
        for missing in [&[][..], &[("HOOK_SECRET", "")][..]] {
            let err = hook.webhook_secret(vars(missing)).unwrap_err().to_string();
            assert!(err.contains("HOOK_SECRET"), "{err}");
        }
        let nats =
            load("[[handlers]]\nkind = \"nats\"\nuser_env = \"NU\"\npassword_env = \"NP\"\n")
                .unwrap();
        let bus = &nats.handlers[0];
        let options = bus.nats_options(vars(&[("NU", "u"), ("NP", "p")])).unwrap();
        assert_eq!(options.stream, "DOMAIN_EVENTS");
        assert!(options.create_stream);
        assert_eq!(options.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(options.timeout, Duration::from_secs(10));
        assert!(matches!(
            options.credentials,
            Some(crate::sink::NatsCredentials::UserPassword(ref u, ref p)) if u == "u" && p == "p"
        ));
        let err = bus
            .nats_options(vars(&[("NU", "u")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("NP is not set"), "{err}");
        for (text, expected) in [
            ("[[handlers]]\nkind = \"webhook\"\n", "needs url"),
            (
                "[[handlers]]\nkind = \"webhook\"\nurl = \"ftp://x\"\n",
                "scheme",
            ),
            (
                "[[handlers]]\nkind = \"webhook\"\nurl = \"http://x\"\nsubject = \"a\"\n",
                "subject is for kind = \"nats\" only",
            ),
            (
                "[[handlers]]\nkind = \"stdout\"\ntimeout_ms = 5\n",
                "kind = \"webhook\" or \"nats\" or \"kafka\" only",
            ),
            (
                "[[handlers]]\nkind = \"webhook\"\nurl = \"http://x\"\ntimeout_ms = 0\n",
                "positive",
            ),
            (
                "[[handlers]]\nkind = \"nats\"\nuser_env = \"NU\"\n",
                "password_env",
            ),
            (
                "[[handlers]]\nkind = \"nats\"\nsubject = \"events.{tenant}\"\n",
                "unknown placeholder {tenant}",
            ),
            (
                "[[handlers]]\nkind = \"nats\"\nsubject = \"{aggregate_type}.x\"\n",
                "create_stream",
            ),
            (
                "[[handlers]]\nkind = \"nats\"\nstream = \"a.b\"\n",
                "stream \"a.b\"",
            ),
            (
                "[[handlers]]\nkind = \"nats\"\nservers = []\n",
                "servers is empty",
            ),
            (
                "[[handlers]]\nkind = \"nats\"\ncreate_stream = false\nduplicate_window_secs = 60\n",
                "create_stream = true",
            ),
            (
                "[[handlers]]\nkind = \"nats\"\nservers = [\"http://x:4222\"]\n",
                "server \"http://x:4222\"",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        // A template starting with a placeholder is fine for a stream made by hand.
        load(
            "[[handlers]]\nkind = \"nats\"\nsubject = \"{aggregate_type}.x\"\n\
             create_stream = false\n",
        )
        .unwrap();
    }

    #[test]
    fn kafka_handlers_are_checked() {
        let load = |text: &str| {
            let file = write(text);
            Config::load(Some(&file.0), &[], &Overrides::default())
        };
        let config = load("[[handlers]]\nkind = \"kafka\"\n").unwrap();
        let options = config.handlers[0].kafka_options().unwrap();
        assert_eq!(options.brokers, ["127.0.0.1:9092"]);
        assert_eq!((options.partitions, options.replication_factor), (1, 1));
        assert!(options.create_topics);
        assert_eq!(options.timeout, Duration::from_secs(10));
        assert_eq!(options.max_message_bytes, 1_048_588);
        let config = load(
            "[[handlers]]\nkind = \"kafka\"\nbrokers = [\"k1:9092\", \"[::1]:9093\"]\n\
             topic = \"app.{aggregate_type}.{event_type}\"\npartitions = 6\n\
             replication_factor = 3\ncompression = \"snappy\"\ntimeout_ms = 2500\n",
        )
        .unwrap();
        let options = config.handlers[0].kafka_options().unwrap();
        assert_eq!(options.partitions, 6);
        assert_eq!(options.compression, crate::sink::KafkaCompression::Snappy);
        assert_eq!(options.timeout, Duration::from_millis(2500));
        for (text, expected) in [
            ("brokers = []", "brokers is empty"),
            ("brokers = [\"kafka://k:9092\"]", "use host:port"),
            ("brokers = [\"k\"]", "use host:port"),
            ("topic = \"events.{aggregate_id}\"", "unknown placeholder"),
            ("topic = \"ev ents\"", "not allowed"),
            ("partitions = 0", "at least 1"),
            ("replication_factor = 0", "at least 1"),
            (
                "create_topics = false\npartitions = 3",
                "create_topics = true",
            ),
            ("compression = \"zstd\"", "zstd"),
            ("max_message_bytes = 10", "at least 1024"),
            ("subject = \"x\"", "subject is for kind = \"nats\" only"),
            ("tls_ca_file = \"/ca.pem\"", "need tls = true"),
            (
                "tls = true\ntls_cert_file = \"/c.pem\"",
                "tls_cert_file and tls_key_file together",
            ),
        ] {
            let text = format!("[[handlers]]\nkind = \"kafka\"\n{text}\n");
            let err = load(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
