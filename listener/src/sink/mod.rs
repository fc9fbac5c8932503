//! Built-in handlers, one module each.

pub mod kafka;
pub mod nats;
mod sql;
mod stdout;
mod template;
pub mod webhook;

pub use kafka::{KafkaCompression, KafkaOptions, KafkaSink, KafkaTls, TopicTemplate};
pub use nats::{NatsCredentials, NatsOptions, NatsSink, SubjectTemplate};
pub use sql::{quote_function, Delivery, FunctionNameError, SqlHandler};
pub use stdout::StdoutSink;
pub use webhook::WebhookSink;
