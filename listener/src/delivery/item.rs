//! The contract between a reader of committed events (the replication stream, the notify poller,
//! replay) and the dispatcher: the items it hands over, in order, and the acknowledgements it gets
//! back.

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::event::Event;
use crate::lsn::Lsn;

/// What the stream hands to the dispatcher, in stream order.
#[derive(Debug)]
pub enum Item {
    /// An event of the current transaction.
    Event(Box<Event>),
    /// A row of the event table that could not be turned into an [`Event`]: dead-lettered under
    /// [`DECODE_HANDLER`], and the stream moves on.
    Undecodable(Box<Undecodable>),
    /// The current transaction committed at `end_lsn`; acknowledge it once handled.
    Commit {
        /// End of the commit record: the position to confirm.
        end_lsn: Lsn,
    },
}

/// What is known of a row that is not a valid event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// The row's id when that column parsed; otherwise an id derived from the transaction's
    /// commit LSN and the row's index in it, stable across redeliveries.
    pub event_id: Uuid,
    /// The row's position when that column parsed, else 0.
    pub position: i64,
    /// Commit LSN of the transaction.
    pub commit_lsn: Lsn,
    /// Why it could not be decoded.
    pub error: String,
}

/// A redelivery of a dead letter, run by the dispatcher between two transactions (so that a
/// handler is never called concurrently with itself for one aggregate).
#[derive(Debug)]
pub struct RedriveJob {
    /// The event, loaded from `domain_events.event` (its `commit_lsn` is 0/0).
    pub event: Box<Event>,
    /// The handler to run again; [`DECODE_HANDLER`]: every handler whose filters match.
    pub handler: String,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<RedriveOutcome>,
}

/// How a [`RedriveJob`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveOutcome {
    /// Handled (and flushed): the dead letter can go.
    Delivered,
    /// Failed again.
    Failed {
        /// Calls made in this redelivery.
        attempts: u32,
        /// The last failure.
        error: String,
    },
    /// Shutdown interrupted it; the request stays.
    Cancelled,
}

/// The dispatcher's progress: everything up to `lsn` has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    /// End LSN of the last fully handled transaction.
    pub lsn: Lsn,
    /// Highest event position handled so far (0 before the first event).
    pub position: i64,
}
