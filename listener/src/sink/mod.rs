//! Built-in handlers, one module each.

pub mod nats;
mod sql;
mod stdout;
pub mod webhook;

pub use nats::{NatsCredentials, NatsOptions, NatsSink, SubjectTemplate};
pub use sql::{quote_function, Delivery, FunctionNameError, SqlHandler};
pub use stdout::StdoutSink;
pub use webhook::WebhookSink;
