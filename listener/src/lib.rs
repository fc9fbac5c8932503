//! The pg_domain_events listener: follows committed events through logical replication
//! (`pgoutput`) and dispatches them to handlers, confirming WAL only after they succeeded.
//!
//! Embed it by building a [`dispatch::Registry`] of your [`dispatch::Handler`]s and calling
//! [`service::Listener::run`] with a cancellation token; the `listener` binary does exactly that
//! with the built-in handlers named in its TOML configuration.

// Every public item documents its contract; clippy -D warnings enforces it.
#![warn(missing_docs)]

// Grouped by path: following committed events, delivering them, operating the listener,
// and what all of them share (connections, configuration, the event model, errors).
pub mod config;
pub mod console;
pub mod delivery;
pub mod error;
pub mod event;
pub mod lsn;
pub mod ops;
pub mod postgres;
pub mod replay;
pub mod replication;
pub mod service;
pub mod sink;

// The module paths of 0.1.0 (`listener::dispatch::Registry`, …), kept for applications.
pub use delivery::{dead_letter, dispatch};
pub use ops::{admin, metrics, operations};
pub use postgres::{database, tls};
pub use replication::{
    notify, pgoutput, publication, recovery, retention, standby, stream, subscription,
};

pub use dead_letter::{DeadLetter, DeadLetterSink, DeadLetterStore};
pub use dispatch::{Filter, Handler, HandlerError, OnFailure, Registry, RetryPolicy};
pub use error::Error;
pub use event::Event;
pub use lsn::Lsn;
pub use service::Listener;
