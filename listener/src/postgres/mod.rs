//! Connections to PostgreSQL shared by every path: the `[database]` settings and TLS.

pub mod database;
pub mod tls;
