//! Dead letters: events a handler gave up on, kept in `domain_events.dead_letter` so that the
//! stream moves on and an operator can redrive them once the cause is fixed.
//!
//! One row per `(subscription, handler, event_id)`: recording the same event again (a redelivery
//! after a crash, a failed redrive) updates the row, adding up the attempts and keeping the first
//! failure time.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::error::Error;
use crate::event::Event;
use crate::lsn::Lsn;

/// Handler name under which rows the listener cannot turn into an [`crate::Event`] are
/// dead-lettered. Reserved: no configured handler may take it.
pub const DECODE_HANDLER: &str = "decode";

/// One event a handler gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The handler's name ([`DECODE_HANDLER`] for an undecodable row).
    pub handler: String,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's position.
    pub position: i64,
    /// The last failure, with its source chain (never the payload).
    pub error: String,
    /// Calls made before giving up.
    pub attempts: u32,
}

/// Where the dispatcher records dead letters.
///
/// An `Err` means the letter was **not** recorded: the dispatcher then stops without
/// acknowledging the transaction, so the event is delivered again rather than lost.
#[async_trait::async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Records (or updates) one dead letter durably.
    async fn record(&self, letter: &DeadLetter) -> Result<(), Error>;
}

/// A dead letter as stored, for listing.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    /// Row id.
    pub id: i64,
    /// Handler name.
    pub handler: String,
    /// Event id.
    pub event_id: Uuid,
    /// Event position.
    pub position: i64,
    /// Last failure.
    pub error: String,
    /// Calls made so far, over every delivery and redrive.
    pub attempts: i32,
    /// First failure.
    pub first_failed_at: chrono::DateTime<chrono::Utc>,
    /// Last failure.
    pub last_failed_at: chrono::DateTime<chrono::Utc>,
    /// When a redelivery was asked for with `domain_events.redrive()` (pending until then).
    pub redrive_requested_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A dead letter whose redelivery was requested.
#[derive(Debug, Clone, PartialEq)]
pub struct RedriveRequest {
    /// Row id.
    pub id: i64,
    /// Handler to run again ([`DECODE_HANDLER`]: every handler whose filters match).
    pub handler: String,
    /// Event id.
    pub event_id: Uuid,
    /// Event position (0 when unknown).
    pub position: i64,
    /// When the redelivery was requested.
    pub requested_at: chrono::DateTime<chrono::Utc>,
}

/// Renders dead letters as a tab-separated table with a header line, for the CLI.
pub fn render_table(letters: &[StoredDeadLetter]) -> String {
    let mut out = String::from(
        "position\tevent_id\thandler\tattempts\tfirst_failed_at\tlast_failed_at\tredrive_requested_at\terror\n",
    );
    let time =
        |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for l in letters {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            l.position,
            l.event_id,
            l.handler,
            l.attempts,
            time(&l.first_failed_at),
            time(&l.last_failed_at),
            l.redrive_requested_at
                .as_ref()
                .map_or_else(|| "-".to_string(), time),
            // One line per letter: a multi-line error must not break the table.
            l.error.replace(['\n', '\t'], " "),
        ));
    }
    out
}

/// The dead letters of one subscription in `domain_events.dead_letter`.
#[derive(Clone)]
pub struct DeadLetterStore {
    client: Arc<Client>,
    subscription: String,
}

impl DeadLetterStore {
    /// A store for subscription `subscription` over `client`.
    pub fn new(client: Arc<Client>, subscription: impl Into<String>) -> DeadLetterStore {
        DeadLetterStore {
            client,
            subscription: subscription.into(),
        }
    }

    /// The subscription's name.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// The subscription's dead letters, oldest event first.
    pub async fn list(&self) -> Result<Vec<StoredDeadLetter>, Error> {
        let rows = self
            .client
            .query(
                "SELECT id, handler, event_id, position, error, attempts, first_failed_at, \
                        last_failed_at, redrive_requested_at \
                 FROM domain_events.dead_letter WHERE subscription = $1 \
                 ORDER BY position, handler",
                &[&self.subscription],
            )
            .await
            .map_err(Error::sql("listing dead letters"))?;
        Ok(rows
            .iter()
            .map(|r| StoredDeadLetter {
                id: r.get(0),
                handler: r.get(1),
                event_id: r.get(2),
                position: r.get(3),
                error: r.get(4),
                attempts: r.get(5),
                first_failed_at: r.get(6),
                last_failed_at: r.get(7),
                redrive_requested_at: r.get(8),
            })
            .collect())
    }

    /// Asks for the redelivery of the subscription's dead letters (all, or those of one event)
    /// through `domain_events.redrive()`; returns how many were marked.
    pub async fn request_redrive(&self, event_id: Option<Uuid>) -> Result<i32, Error> {
        let row = self
            .client
            .query_one(
                "SELECT domain_events.redrive($1, $2)",
                &[&self.subscription, &event_id],
            )
            .await
            .map_err(Error::sql("requesting a redrive"))?;
        Ok(row.get(0))
    }

    /// Whether the installed extension supports redrive (`dead_letter.redrive_requested_at`).
    pub async fn supports_redrive(&self) -> Result<bool, Error> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
                  WHERE attrelid = 'domain_events.dead_letter'::regclass \
                    AND attname = 'redrive_requested_at' AND NOT attisdropped)",
                &[],
            )
            .await
            .map_err(Error::sql("checking the dead_letter table"))?;
        Ok(row.get(0))
    }

    /// Up to `limit` dead letters of the subscription whose redelivery was requested, oldest
    /// event first.
    pub async fn requested(&self, limit: i64) -> Result<Vec<RedriveRequest>, Error> {
        let rows = self
            .client
            .query(
                "SELECT id, handler, event_id, position, redrive_requested_at \
                 FROM domain_events.dead_letter \
                 WHERE subscription = $1 AND redrive_requested_at IS NOT NULL \
                 ORDER BY position, id LIMIT $2",
                &[&self.subscription, &limit],
            )
            .await
            .map_err(Error::sql("reading requested redrives"))?;
        Ok(rows
            .iter()
            .map(|r| RedriveRequest {
                id: r.get(0),
                handler: r.get(1),
                event_id: r.get(2),
                position: r.get(3),
                requested_at: r.get(4),
            })
            .collect())
    }

    /// Loads an event by id (and position, when known, to use its index) from
    /// `domain_events.event`. `Ok(Err(reason))` when the row exists but is not a valid event;
    /// `Ok(Ok(None))` when it is gone (retention dropped its partition).
    pub async fn load_event(
        &self,
        event_id: Uuid,
        position: i64,
    ) -> Result<Result<Option<Event>, String>, Error> {
        const COLUMNS: &str = EVENT_COLUMNS;
        let row = if position > 0 {
            self.client
                .query_opt(
                    &format!("{COLUMNS} WHERE position = $1 AND id = $2"),
                    &[&position, &event_id],
                )
                .await
        } else {
            self.client
                .query_opt(&format!("{COLUMNS} WHERE id = $1"), &[&event_id])
                .await
        }
        .map_err(Error::sql("loading a dead-lettered event"))?;
        let Some(row) = row else {
            return Ok(Ok(None));
        };
        Ok(event_from_row(&row).map(Some))
    }

    /// A redelivery succeeded: the dead letter is removed.
    pub async fn resolve(&self, id: i64) -> Result<(), Error> {
        self.client
            .execute(
                "DELETE FROM domain_events.dead_letter WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(Error::sql("removing a redriven dead letter"))?;
        Ok(())
    }

    /// A redelivery failed: records the failure and clears the request (unless a newer one came
    /// in meanwhile).
    pub async fn redrive_failed(
        &self,
        request: &RedriveRequest,
        attempts: u32,
        error: &str,
    ) -> Result<(), Error> {
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        self.client
            .execute(
                "UPDATE domain_events.dead_letter SET \
                    attempts = attempts + $2, error = $3, last_failed_at = now(), \
                    redrive_requested_at = CASE WHEN redrive_requested_at > $4 \
                                                THEN redrive_requested_at END \
                 WHERE id = $1",
                &[&request.id, &attempts, &error, &request.requested_at],
            )
            .await
            .map_err(Error::sql("recording a failed redrive"))?;
        Ok(())
    }
}

/// The select list and table that [`event_from_row`] reads.
pub(crate) const EVENT_COLUMNS: &str = "SELECT position, id, aggregate_type, aggregate_id, \
    aggregate_version, event_type, event_version, payload::text, metadata::text, \
    occurred_at, recorded_at, txid::text FROM domain_events.event";

/// Builds an [`Event`] from a row of [`EVENT_COLUMNS`] (its `commit_lsn` is 0/0).
pub(crate) fn event_from_row(row: &tokio_postgres::Row) -> Result<Event, String> {
    fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
        row: &'a tokio_postgres::Row,
        index: usize,
        column: &str,
    ) -> Result<T, String> {
        row.try_get(index)
            .map_err(|e| format!("column {column:?}: {}", crate::error::report(&e)))
    }
    let json = |index: usize, column: &str| -> Result<Box<RawValue>, String> {
        RawValue::from_string(get::<String>(row, index, column)?)
            .map_err(|e| format!("column {column:?}: not JSON: {e}"))
    };
    let txid: String = get(row, 11, "txid")?;
    Ok(Event {
        position: get(row, 0, "position")?,
        id: get(row, 1, "id")?,
        aggregate_type: get(row, 2, "aggregate_type")?,
        aggregate_id: get(row, 3, "aggregate_id")?,
        aggregate_version: get(row, 4, "aggregate_version")?,
        event_type: get(row, 5, "event_type")?,
        event_version: get(row, 6, "event_version")?,
        payload: json(7, "payload")?,
        metadata: json(8, "metadata")?,
        occurred_at: get(row, 9, "occurred_at")?,
        recorded_at: get(row, 10, "recorded_at")?,
        txid: txid
            .parse()
            .map_err(|_| format!("column \"txid\": not a number: {txid:?}"))?,
        // Not known outside the replication stream.
        commit_lsn: Lsn::ZERO,
    })
}

#[async_trait::async_trait]
impl DeadLetterSink for DeadLetterStore {
    async fn record(&self, letter: &DeadLetter) -> Result<(), Error> {
        let attempts = i32::try_from(letter.attempts).unwrap_or(i32::MAX);
        self.client
            .execute(
                "INSERT INTO domain_events.dead_letter AS d \
                    (subscription, handler, event_id, position, error, attempts) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (subscription, handler, event_id) DO UPDATE SET \
                    error = EXCLUDED.error, \
                    attempts = d.attempts + EXCLUDED.attempts, \
                    last_failed_at = now()",
                &[
                    &self.subscription,
                    &letter.handler,
                    &letter.event_id,
                    &letter.position,
                    &letter.error,
                    &attempts,
                ],
            )
            .await
            .map_err(Error::sql("recording a dead letter"))?;
        Ok(())
    }
}
