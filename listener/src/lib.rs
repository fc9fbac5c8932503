//! The pg_domain_events listener: follows committed events through logical replication
//! (`pgoutput`) and dispatches them to handlers, confirming WAL only after they succeeded.
//!
//! Embed it by building a [`dispatch::Registry`] of your [`dispatch::Handler`]s and calling
//! [`service::Listener::run`] with a cancellation token; the `listener` binary does exactly that
//! with the built-in handlers named in its TOML configuration.

// Every public item documents its contract; clippy -D warnings enforces it.
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod database;
pub mod dead_letter;
pub mod dispatch;
pub mod error;
pub mod event;
pub mod lsn;
pub mod metrics;
pub mod notify;
pub mod operations;
pub mod pgoutput;
pub mod publication;
pub mod recovery;
mod redrive;
pub mod replay;
pub mod retention;
pub mod service;
pub mod sink;
pub mod standby;
pub mod stream;
pub mod subscription;
pub mod tls;

pub use dead_letter::{DeadLetter, DeadLetterSink, DeadLetterStore};
pub use dispatch::{Filter, Handler, HandlerError, OnFailure, Registry, RetryPolicy};
pub use error::Error;
pub use event::Event;
pub use lsn::Lsn;
pub use service::Listener;
