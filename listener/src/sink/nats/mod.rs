//! The `nats` handler: JetStream publish with the event id as `Nats-Msg-Id`.

mod config;
mod options;
mod sink;
mod subject;

pub use config::NatsConfig;
pub use options::{
    NatsCredentials, NatsOptions, DEFAULT_SERVER, DEFAULT_STREAM, DEFAULT_SUBJECT, DEFAULT_TIMEOUT,
};
pub use sink::NatsSink;
pub use subject::{check_stream_name, SubjectError, SubjectTemplate};
