//! The `Handler` contract and the event filters that route events to a handler.

use std::str::FromStr;

use crate::error::HandlerError;
use crate::event::Event;

/// Receives events.
///
/// Contract:
/// - `handle` is called **at least once** per event whose type matches the handler's filters, in
///   commit order. After a crash or a lost connection, events of unacknowledged transactions are
///   delivered again: a handler must be idempotent, deduplicating by [`Event::id`] when its effect
///   is not naturally idempotent.
/// - A transaction is acknowledged (and never delivered again) only after `handle` returned `Ok`
///   for each of its events and `flush` returned `Ok`. A handler that buffers must make its effects
///   durable in `flush`.
/// - An `Err` is retried with backoff when [`HandlerError::transient`], up to the handler's
///   `max_attempts`. A definite error, running out of attempts, or a panic (caught, never a
///   crash) is a failure: under [`OnFailure::DeadLetter`] (the default) the event is recorded in
///   `domain_events.dead_letter` and the stream moves on; under [`OnFailure::Block`] the listener
///   stops without acknowledging the transaction.
/// - When `flush` fails for good, every event this handler handled in the transaction is
///   dead-lettered (or, under [`OnFailure::Block`], the listener stops).
/// - Implementations must be `Send + Sync`: with `workers > 1`, `handle` is called concurrently
///   for different aggregates (never concurrently for one aggregate, whose events stay in
///   order), and each worker calls `flush` after its part of a transaction, possibly while other
///   workers call `handle`. Each worker is a task of its own, and calls `handle` and `flush` on
///   it: `flush` must make durable at least every event whose `handle` that task called, and
///   must not return `Ok` while one of them is not. A handler that buffers for all workers
///   together must also never drop another worker's buffered event on its own account: only
///   that worker's failed `flush` decides it (see the `kafka` and `nats` sinks, which tell the
///   workers apart by [`tokio::task::try_id`]).
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one event.
    async fn handle(&self, event: &Event) -> Result<(), HandlerError>;

    /// Makes the effects of the events handled since the last flush durable; called at the end
    /// of every transaction that delivered at least one event to this handler.
    async fn flush(&self) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Where the handler publishes, the `target` label of
    /// `pg_domain_events_events_published_total`: a host, or a subject or topic *template*
    /// (bounded, never a name rendered per event). `None`, the default: it publishes nowhere.
    fn target(&self) -> Option<String> {
        None
    }
}

/// Which events a handler receives, matched against [`Event::event_type`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `"*"`: every event.
    All,
    /// `"Loan.*"`: event types starting with `Loan.` (the stored prefix keeps the dot).
    Prefix(String),
    /// `"Loan.Funded"`: exactly this event type.
    Exact(String),
}

impl Filter {
    /// Whether an event of type `event_type` passes.
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            Filter::All => true,
            Filter::Prefix(prefix) => event_type.starts_with(prefix.as_str()),
            Filter::Exact(name) => event_type == name,
        }
    }
}

impl std::fmt::Display for Filter {
    /// As written in the configuration: `*`, `Prefix.*` or the event type.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Filter::All => f.write_str("*"),
            Filter::Prefix(prefix) => write!(f, "{prefix}*"),
            Filter::Exact(name) => f.write_str(name),
        }
    }
}

/// A filter that is neither `*`, `Prefix.*`, nor a plain event type.
#[derive(Debug, thiserror::Error)]
#[error("invalid event filter {0:?}: use \"*\", \"Prefix.*\" or an exact event type")]
pub struct ParseFilterError(String);

impl FromStr for Filter {
    type Err = ParseFilterError;

    fn from_str(s: &str) -> Result<Filter, ParseFilterError> {
        if s == "*" {
            return Ok(Filter::All);
        }
        let (body, wildcard) = match s.strip_suffix(".*") {
            Some(prefix) => (prefix, true),
            None => (s, false),
        };
        let valid = !body.is_empty()
            && !body.contains('*')
            && !body.starts_with('.')
            && !body.ends_with('.')
            && !body.contains(char::is_whitespace);
        match (valid, wildcard) {
            (false, _) => Err(ParseFilterError(s.to_string())),
            (true, true) => Ok(Filter::Prefix(format!("{body}."))),
            (true, false) => Ok(Filter::Exact(body.to_string())),
        }
    }
}
