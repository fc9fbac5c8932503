//! The `kafka` handler: one record per event, keyed by aggregate id, on a topic per aggregate
//! type, confirmed only once the broker acknowledged every record of the transaction.

mod config;
mod options;
mod record;
mod sink;
mod topic;

pub use config::KafkaConfig;
pub use options::{
    KafkaCompression, KafkaOptions, KafkaTls, TlsError, DEFAULT_BROKER, DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT, DEFAULT_TOPIC,
};
pub use record::record;
pub use sink::{KafkaSink, RECORD_OVERHEAD, SMALL_REQUEST_BYTES};
pub use topic::{partition_for, TopicError, TopicTemplate};
