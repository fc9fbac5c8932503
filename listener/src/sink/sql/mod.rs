//! The `sql` handler: a SQL function applied exactly once per event.

mod config;
mod sink;

pub use config::SqlConfig;
pub use sink::{quote_function, Delivery, FunctionNameError, SqlHandler};
