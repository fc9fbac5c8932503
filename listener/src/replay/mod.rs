//! Replay: runs chosen handlers over events stored in `domain_events.event`, straight from the
//! table, selected by aggregate, event type, position range and time range.
//!
//! Uses: rebuilding a projection, feeding a new consumer history, and recovering after
//! `listener slot drop` (events committed while no slot existed never reach a new slot).
//!
//! # Consistency and order
//!
//! The events are read in one `REPEATABLE READ READ ONLY` transaction through a portal fetched
//! in batches, so a replay sees one snapshot however long it runs, in **position order**. That
//! is per-aggregate version order: the extension takes an event's position from the sequence
//! while it holds the row lock of the aggregate's stream head (single events and batches alike,
//! batches inserting in input order, in which versions are numbered), so a later version of an
//! aggregate always has a larger position. Reading and handling overlap: the next batch is
//! requested before the current one is read (the server produces it meanwhile), and a bounded
//! queue lets the reader decode ahead while the handlers run; reader and dispatcher share one
//! task, so handing an event over wakes no thread.
//!
//! # Handling
//!
//! The handlers run under the same [`Dispatcher`] as the stream: each batch is one
//! "transaction" (handlers are flushed after it), transient failures are retried with each
//! handler's retry policy, and `workers > 1` keeps per-aggregate order. A failure for good is
//! **not** written to `domain_events.dead_letter`: a replay is an operator's action, not the
//! subscription's stream, so its failures are collected and reported (event id, position,
//! error) and the replay ends as failed; fix the cause and replay those events again. A handler
//! with `on_failure = "block"` stops the replay at its failure, as it stops the stream.
//!
//! Delivery is at least once, as for the stream. A `sql` handler is built
//! [`SqlHandler::for_replay`](crate::sink::SqlHandler::for_replay): it applies every replayed

mod run;
mod selection;
mod summary;

pub use run::{registry_for_replay, Replay, DEFAULT_BATCH_SIZE};
pub use selection::{parse_timestamp, Selection};
pub use summary::{Ending, Failure, HandlerCount, Summary};

/// The runtime a replay runs on (`listener replay`, and the replay bench): one thread. A replay
/// is one ordered stream; on a multi-thread runtime the connection's task, the reader and the
/// handlers' tasks hand every batch across threads, and those wake-ups were a quarter of the
/// client's CPU. On one thread the same replay keeps up with `COPY` of the same rows
/// (docs/benchmarks.md). Handlers still overlap their I/O (`workers` are tasks); a handler doing
/// heavy CPU work per event runs one at a time.
pub fn runtime_builder() -> tokio::runtime::Builder {
    tokio::runtime::Builder::new_current_thread()
}
