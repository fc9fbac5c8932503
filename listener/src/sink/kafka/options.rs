//! What the sink is built from: brokers, topics, batching, timeout, retries and TLS.

use std::sync::Arc;
use std::time::Duration;

use rskafka::client::partition::Compression;

use super::topic::TopicTemplate;

/// Topic template when none is configured.
pub const DEFAULT_TOPIC: &str = "events.{aggregate_type}";
/// Bootstrap broker when none is configured.
pub const DEFAULT_BROKER: &str = "127.0.0.1:9092";
/// Connect, metadata and produce-ack timeout when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest record batch sent, and so largest event, when none is configured: the broker's
/// default `message.max.bytes` (1 MiB plus the batch overhead).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;

/// Record compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaCompression {
    /// Uncompressed batches (the default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
}

impl KafkaCompression {
    pub(super) fn codec(self) -> Compression {
        match self {
            KafkaCompression::None => Compression::NoCompression,
            KafkaCompression::Gzip => Compression::Gzip,
            KafkaCompression::Snappy => Compression::Snappy,
        }
    }
}

/// How to reach the brokers and where to produce.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// Bootstrap brokers, `host:port`; the others are found through metadata.
    pub brokers: Vec<String>,
    /// Topic of each event.
    pub topic: TopicTemplate,
    /// Create a topic when it is missing.
    pub create_topics: bool,
    /// Partitions of a created topic.
    pub partitions: i32,
    /// Replication factor of a created topic.
    pub replication_factor: i16,
    /// Batch compression.
    pub compression: KafkaCompression,
    /// Largest record batch: an event whose record alone is larger is refused (dead-lettered);
    /// larger transactions are split.
    pub max_message_bytes: usize,
    /// Connect, metadata, topic creation and produce-ack timeout.
    pub timeout: Duration,
    /// Failed flushes after which a record is given up (its event is dead-lettered by then): the
    /// handler's `max_attempts`.
    pub max_attempts: u32,
    /// TLS to the brokers; `None`: plaintext.
    pub tls: Option<KafkaTls>,
}

/// TLS to the brokers: the server is verified against `ca_file` (PEM) or, without it, the
/// system's CA certificates; a client certificate is presented when `cert_file` and `key_file`
/// (PEM) are set. The broker's host name (or IP address) in `brokers` and in the cluster's
/// metadata is what its certificate must name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaTls {
    /// CA certificates (PEM) that sign the brokers' certificates.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate chain (PEM), for brokers that authenticate clients by certificate.
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<std::path::PathBuf>,
}

/// Why the TLS settings cannot be used (a file missing or not PEM, no CA certificate).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl KafkaTls {
    /// The rustls configuration: reads the files named.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read_certs =
            |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
                if certs.is_empty() {
                    return Err(TlsError(format!("{}: no PEM certificate", path.display())));
                }
                Ok(certs)
            };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    // An unusable system certificate is skipped, as every TLS client does.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(TlsError(
                        "no system CA certificates found: set tls_ca_file".into(),
                    ));
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| TlsError(format!("{}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError(format!("client certificate: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError(
                    "set tls_cert_file and tls_key_file together".into(),
                ))
            }
        };
        Ok(Arc::new(config))
    }
}
