//! Built-in handlers, one module each.

mod sql;
mod stdout;

pub use sql::{quote_function, Delivery, FunctionNameError, SqlHandler};
pub use stdout::StdoutSink;
