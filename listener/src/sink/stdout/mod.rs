//! The `stdout` handler: JSON lines.

mod config;
mod sink;

pub use config::StdoutConfig;
pub use sink::StdoutSink;
