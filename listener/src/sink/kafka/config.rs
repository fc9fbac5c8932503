//! `kind = "kafka"`: brokers, topic template, topic creation, batching, TLS files, timeout.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::options::{
    KafkaCompression, KafkaOptions, KafkaTls, DEFAULT_BROKER, DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT, DEFAULT_TOPIC,
};
use super::sink::KafkaSink;
use super::topic::TopicTemplate;
use crate::delivery::dispatch::Handler;
use crate::sink::config::timeout;
use crate::sink::config::{SinkConfig, SinkConfigError, SinkContext, SinkKind};

/// A Kafka record per event ([`KafkaSink`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Connect, metadata, topic creation and produce-ack timeout in milliseconds, default
    /// 10 000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Bootstrap brokers (`host:port`), default `["127.0.0.1:9092"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<Vec<String>>,
    /// Topic template, default `events.{aggregate_type}` (placeholders `{aggregate_type}`,
    /// `{event_type}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Create a topic when it is missing (default `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_topics: Option<bool>,
    /// Partitions of a created topic (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Replication factor of a created topic (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i16>,
    /// Batch compression, `none` (default), `gzip` or `snappy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<KafkaCompression>,
    /// Largest record batch in bytes, default 1 048 588 (the broker's default
    /// `message.max.bytes`). A larger event is dead-lettered; larger transactions are split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// Connect to the brokers over TLS (default `false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// With `tls`: CA certificates (PEM) that sign the brokers' certificates (default: the
    /// system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// With `tls`: client certificate chain (PEM), with `tls_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// With `tls`: the client certificate's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl KafkaConfig {
    /// The sink's options; `max_attempts` is the handler's. Files are not read here.
    pub fn options(&self, max_attempts: u32) -> Result<KafkaOptions, SinkConfigError> {
        let timeout = timeout(self.timeout_ms, DEFAULT_TIMEOUT)?;
        let topic = TopicTemplate::parse(self.topic.as_deref().unwrap_or(DEFAULT_TOPIC))
            .map_err(|e| SinkConfigError(e.to_string()))?;
        let create_topics = self.create_topics.unwrap_or(true);
        if !create_topics && (self.partitions.is_some() || self.replication_factor.is_some()) {
            return Err(SinkConfigError::new(
                "partitions and replication_factor apply to topics the listener creates \
                 (create_topics = true)",
            ));
        }
        let partitions = self.partitions.unwrap_or(1);
        if partitions < 1 {
            return Err(SinkConfigError::new("partitions must be at least 1"));
        }
        let replication_factor = self.replication_factor.unwrap_or(1);
        if replication_factor < 1 {
            return Err(SinkConfigError::new(
                "replication_factor must be at least 1",
            ));
        }
        let max_message_bytes = self.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if max_message_bytes < 1024 {
            return Err(SinkConfigError::new(
                "max_message_bytes must be at least 1024",
            ));
        }
        let brokers = self
            .brokers
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_BROKER.into()]);
        if brokers.is_empty() {
            return Err(SinkConfigError::new("brokers is empty"));
        }
        if let Some(broker) = brokers.iter().find(|b| !is_host_port(b)) {
            return Err(SinkConfigError(format!(
                "broker {broker:?}: use host:port (no scheme)"
            )));
        }
        Ok(KafkaOptions {
            brokers,
            topic,
            create_topics,
            partitions,
            replication_factor,
            compression: self.compression.unwrap_or_default(),
            max_message_bytes,
            timeout,
            max_attempts,
            tls: self.tls()?,
        })
    }

    fn tls(&self) -> Result<Option<KafkaTls>, SinkConfigError> {
        let files = [&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file];
        match self.tls.unwrap_or(false) {
            true if self.tls_cert_file.is_some() != self.tls_key_file.is_some() => Err(
                SinkConfigError::new("set tls_cert_file and tls_key_file together"),
            ),
            true => Ok(Some(KafkaTls {
                ca_file: self.tls_ca_file.clone(),
                cert_file: self.tls_cert_file.clone(),
                key_file: self.tls_key_file.clone(),
            })),
            false if files.iter().any(|f| f.is_some()) => Err(SinkConfigError::new(
                "tls_ca_file, tls_cert_file and tls_key_file need tls = true",
            )),
            false => Ok(None),
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

impl SinkConfig for KafkaConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        self.options(1).map(|_| ())
    }

    /// Reads the TLS files (when set) now: a missing or unreadable file is a configuration
    /// error at startup, not a delivery failure.
    fn build(&self, context: &SinkContext<'_>) -> Result<Arc<dyn Handler>, SinkConfigError> {
        let sink = KafkaSink::new(self.options(context.max_attempts)?)
            .map_err(|e| SinkConfigError(e.to_string()))?;
        Ok(Arc::new(sink))
    }
}

impl SinkKind for KafkaConfig {
    const KIND: &'static str = "kafka";
    const KEYS: &'static [&'static str] = &[
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
    ];
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{load_handler, load_sink};

    fn kafka(text: &str) -> KafkaConfig {
        load_sink(text)
    }

    #[test]
    fn defaults_and_settings() {
        let options = kafka("").options(5).unwrap();
        assert_eq!(options.brokers, ["127.0.0.1:9092"]);
        assert_eq!((options.partitions, options.replication_factor), (1, 1));
        assert!(options.create_topics);
        assert_eq!(options.timeout, Duration::from_secs(10));
        assert_eq!(options.max_message_bytes, 1_048_588);
        assert_eq!(options.max_attempts, 5);
        let options = kafka(
            "brokers = [\"k1:9092\", \"[::1]:9093\"]\n\
             topic = \"app.{aggregate_type}.{event_type}\"\npartitions = 6\n\
             replication_factor = 3\ncompression = \"snappy\"\ntimeout_ms = 2500\n",
        )
        .options(5)
        .unwrap();
        assert_eq!(options.partitions, 6);
        assert_eq!(options.compression, KafkaCompression::Snappy);
        assert_eq!(options.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn bad_keys_are_refused() {
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
            let text = format!("kind = \"kafka\"\n{text}\n");
            let err = load_handler(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
