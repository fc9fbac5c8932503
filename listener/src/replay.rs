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
//! aggregate always has a larger position. Reading and handling overlap: a bounded queue lets
//! the next batch be fetched and decoded while the handlers run over the previous one.
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
//! event regardless of its position row, and leaves that row where it is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use crate::config::{Config, ConfigError, DatabaseConfig};
use crate::delivery::dead_letter::{event_from_row, DeadLetter, DeadLetterSink, EVENT_COLUMNS};
use crate::delivery::dispatch::{Ack, Dispatcher, Filter, Item, Registry, Undecodable};
use crate::error::{report, Error};
use crate::lsn::Lsn;
use crate::service::Purpose;

/// Count per event type of the selected events (for `--dry-run`); appended to a WHERE clause.
const COUNT_BY_TYPE: &str =
    "SELECT event_type, count(*) FROM domain_events.event WHERE true{filters} GROUP BY event_type";

/// Events read per fetch unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 10_000;

/// Which stored events to replay; every given bound must hold (AND).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Only events of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only events of aggregates with this id.
    pub aggregate_id: Option<String>,
    /// Only events whose type passes this filter (`Loan.Funded`, `Loan.*`, `*`).
    pub event_type: Option<Filter>,
    /// Only events at or after this position.
    pub from_position: Option<i64>,
    /// Only events at or before this position.
    pub to_position: Option<i64>,
    /// Only events recorded at or after this time (`recorded_at`, the partition key).
    pub since: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub until: Option<DateTime<Utc>>,
}

fn invalid(origin: &str, message: impl Into<String>) -> Error {
    Error::Config(ConfigError::invalid(Some(origin.to_string()), message))
}

/// A SQL parameter of the WHERE clause.
type Param = Box<dyn ToSql + Sync + Send>;

impl Selection {
    /// Refuses empty ranges, which are most likely a mistake (a definite configuration error).
    pub fn validate(&self) -> Result<(), Error> {
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since >= until {
                return Err(invalid(
                    "--since/--until",
                    format!("--since {since} is not before --until {until}: the range is empty"),
                ));
            }
        }
        if let (Some(from), Some(to)) = (self.from_position, self.to_position) {
            if from > to {
                return Err(invalid(
                    "--from-position/--to-position",
                    format!("--from-position {from} is after --to-position {to}"),
                ));
            }
        }
        Ok(())
    }

    /// ` AND …` conditions for every bound, with their parameters numbered from `$1`.
    fn filters(&self) -> (String, Vec<Param>) {
        let mut sql = String::new();
        let mut params: Vec<Param> = Vec::new();
        let mut add = |condition: &str, param: Param| {
            params.push(param);
            sql.push_str(&condition.replace('?', &format!("${}", params.len())));
        };
        if let Some(t) = &self.aggregate_type {
            add(" AND aggregate_type = ?", Box::new(t.clone()));
        }
        if let Some(id) = &self.aggregate_id {
            add(" AND aggregate_id = ?", Box::new(id.clone()));
        }
        match &self.event_type {
            None | Some(Filter::All) => {}
            Some(Filter::Exact(t)) => add(" AND event_type = ?", Box::new(t.clone())),
            // starts_with: no LIKE escaping of `_` and `%` in event types.
            Some(Filter::Prefix(p)) => add(" AND starts_with(event_type, ?)", Box::new(p.clone())),
        }
        if let Some(from) = self.from_position {
            add(" AND position >= ?", Box::new(from));
        }
        if let Some(to) = self.to_position {
            add(" AND position <= ?", Box::new(to));
        }
        if let Some(since) = self.since {
            add(" AND recorded_at >= ?", Box::new(since));
        }
        if let Some(until) = self.until {
            add(" AND recorded_at < ?", Box::new(until));
        }
        (sql, params)
    }

    /// The events, in position order.
    fn events_query(&self) -> (String, Vec<Param>) {
        let (filters, params) = self.filters();
        (
            format!("{EVENT_COLUMNS} WHERE true{filters} ORDER BY position"),
            params,
        )
    }
}

/// Parses a `--since`/`--until` value: RFC 3339 (`2026-11-23T16:00:00Z`, any offset), the same
/// with a space (`2026-11-23 16:00:00+00`), or a date (`2026-11-23`, midnight UTC).
pub fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc());
        }
    }
    Err(format!(
        "{s:?} is not a timestamp: use RFC 3339 with an offset (2026-11-23T16:00:00Z) or a \
         date (2026-11-23, midnight UTC)"
    ))
}

/// The handlers of `config` named in `names` (all of them when `names` is empty), in the
/// configuration's order, built for replay (`sql` handlers by [`crate::sink::SqlHandler::for_replay`]).
/// An unknown name is a configuration error.
pub fn registry_for_replay(config: &Config, names: &[String]) -> Result<Registry, Error> {
    let known: Vec<String> = config.handlers.iter().map(|h| h.name()).collect();
    if let Some(unknown) = names.iter().find(|n| !known.contains(n)) {
        return Err(invalid(
            "--handler",
            format!(
                "no handler named {unknown:?} in the configuration (configured: {})",
                known.join(", ")
            ),
        ));
    }
    let selected = config
        .handlers
        .iter()
        .filter(|h| names.is_empty() || names.contains(&h.name()));
    crate::service::build_registry(config, selected, Purpose::Replay)
}

/// One event a handler failed on for good during a replay.
pub type Failure = DeadLetter;

/// Collects failures instead of writing dead letters: a replay reports them.
#[derive(Default)]
struct Failures(Mutex<Vec<Failure>>);

#[async_trait::async_trait]
impl DeadLetterSink for Failures {
    async fn record(&self, letter: &DeadLetter) -> Result<(), Error> {
        self.0
            .lock()
            .map_err(|_| Error::Task {
                task: "replay",
                reason: "failure list poisoned".into(),
            })?
            .push(letter.clone());
        Ok(())
    }
}

/// How a replay ended.
#[derive(Debug)]
pub enum Ending {
    /// Every selected event was read and given to its handlers.
    Complete,
    /// Stopped on request (SIGINT/SIGTERM) at a batch boundary.
    Interrupted,
    /// Stopped by an error: a blocking handler's failure, or the database.
    Stopped(Error),
}

/// What one handler did in a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerCount {
    /// Handler name.
    pub name: String,
    /// Events routed to it (its filters matched) in the finished batches.
    pub routed: u64,
    /// Of those, events it failed on for good.
    pub failed: u64,
}

impl HandlerCount {
    /// Events handled successfully.
    pub fn handled(&self) -> u64 {
        self.routed.saturating_sub(self.failed)
    }
}

/// The outcome of [`Replay::run`].
#[derive(Debug)]
pub struct Summary {
    /// Events read and handed to the handlers in finished batches.
    pub read: u64,
    /// Highest position handled (every selected event up to it was given to its handlers).
    pub last_position: Option<i64>,
    /// Per handler, in registration order.
    pub handlers: Vec<HandlerCount>,
    /// Events a handler failed on for good (and rows that could not be decoded, under handler
    /// `decode`), in the order they failed.
    pub failures: Vec<Failure>,
    /// Wall time from the first query to the end.
    pub elapsed: Duration,
    /// How it ended.
    pub ending: Ending,
}

impl Summary {
    /// Whether every selected event was handled by every handler it was routed to.
    pub fn succeeded(&self) -> bool {
        matches!(self.ending, Ending::Complete) && self.failures.is_empty()
    }

    /// Events read per second.
    pub fn rate(&self) -> f64 {
        self.read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A human-readable report (never payloads): totals, a line per handler, one per failure.
    pub fn render(&self) -> String {
        let mut out = format!(
            "replay: {} event(s) read in {:.2} s ({:.0} events/s)",
            self.read,
            self.elapsed.as_secs_f64(),
            self.rate()
        );
        if let Some(p) = self.last_position {
            out.push_str(&format!(", up to position {p}"));
        }
        out.push('\n');
        out.push_str("handler\tevents\thandled\tfailed\n");
        for h in &self.handlers {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                h.name,
                h.routed,
                h.handled(),
                h.failed
            ));
        }
        for f in &self.failures {
            out.push_str(&format!(
                "failed: handler {} event {} position {} after {} attempt(s): {}\n",
                f.handler,
                f.event_id,
                if f.position > 0 {
                    f.position.to_string()
                } else {
                    "-".into()
                },
                f.attempts,
                f.error.replace(['\n', '\t'], " ")
            ));
        }
        let resume = |out: &mut String| match self.last_position {
            Some(p) => out.push_str(&format!(
                "events after position {p} were not replayed: resume with --from-position {}\n",
                p + 1
            )),
            None => out.push_str("no event was replayed\n"),
        };
        match &self.ending {
            Ending::Complete => {}
            Ending::Interrupted => {
                out.push_str("interrupted: ");
                resume(&mut out);
            }
            Ending::Stopped(err) => {
                out.push_str(&format!("stopped: {}\n", report(err)));
                resume(&mut out);
            }
        }
        out
    }
}

/// Events per type in one batch, to count per handler once the batch is finished.
type TypeCounts = HashMap<String, u64>;

/// A replay of stored events: what to read, and how.
#[derive(Debug, Clone)]
pub struct Replay {
    database: DatabaseConfig,
    selection: Selection,
    batch_size: usize,
    workers: usize,
}

impl Replay {
    /// Replays the events of `selection` from the database `database` describes.
    pub fn new(database: DatabaseConfig, selection: Selection) -> Replay {
        Replay {
            database,
            selection,
            batch_size: DEFAULT_BATCH_SIZE,
            workers: 1,
        }
    }

    /// Events fetched (and flushed to the handlers) per batch; at least 1.
    pub fn with_batch_size(mut self, batch_size: usize) -> Replay {
        self.batch_size = batch_size.clamp(1, i32::MAX as usize);
        self
    }

    /// Handler tasks (per-aggregate order holds with any number), as `replication.workers`.
    pub fn with_workers(mut self, workers: usize) -> Replay {
        self.workers = workers.max(1);
        self
    }

    /// Counts the selected events per event type, handling nothing (`--dry-run`).
    pub async fn count(&self) -> Result<Vec<(String, u64)>, Error> {
        self.selection.validate()?;
        let (client, connection) =
            crate::replication::subscription::connect(&self.database).await?;
        let (filters, params) = self.selection.filters();
        let sql = COUNT_BY_TYPE.replace("{filters}", &filters);
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client
            .query(&sql, &refs)
            .await
            .map_err(Error::sql("counting the events to replay"))?;
        drop(client);
        let _ = connection.await;
        let mut counts: Vec<(String, u64)> = rows
            .iter()
            .map(|r| (r.get(0), u64::try_from(r.get::<_, i64>(1)).unwrap_or(0)))
            .collect();
        counts.sort();
        Ok(counts)
    }

    /// Reads the selected events and runs `registry`'s handlers over them until done, a
    /// blocking handler fails, or `cancel` fires (at the next batch boundary). Errors before the
    /// first event (bad selection, no connection) are returned; later ones end the
    /// [`Summary`] as [`Ending::Stopped`].
    pub async fn run(
        &self,
        registry: Registry,
        cancel: CancellationToken,
    ) -> Result<Summary, Error> {
        self.selection.validate()?;
        let started = Instant::now();
        let (client, connection) =
            crate::replication::subscription::connect(&self.database).await?;
        let registry = Arc::new(registry);
        let failures = Arc::new(Failures::default());
        // Two batches in flight: one being handled, the next being fetched and decoded.
        let (items_tx, items_rx) = mpsc::channel(self.batch_size.saturating_mul(2));
        let (ack_tx, ack_rx) = watch::channel(Ack::default());
        let dispatcher = tokio::spawn(
            Dispatcher::new(Arc::clone(&registry), failures.clone())
                .with_workers(self.workers)
                .run(items_rx, ack_tx, cancel.clone()),
        );
        let reader = Reader {
            selection: self.selection.clone(),
            batch_size: self.batch_size,
            items: items_tx,
            cancel: cancel.clone(),
        };
        let (batches, read) = reader.run(client).await;
        let _ = connection.await;
        let dispatched = match dispatcher.await {
            Ok(result) => result,
            Err(join) => Err(Error::Task {
                task: "replay dispatcher",
                reason: join.to_string(),
            }),
        };
        let ack = *ack_rx.borrow();
        let mut failures = std::mem::take(&mut *failures.0.lock().map_err(|_| Error::Task {
            task: "replay",
            reason: "failure list poisoned".into(),
        })?);
        let finished = usize::try_from(ack.lsn.0)
            .unwrap_or(usize::MAX)
            .min(batches.len());
        let ending = match (dispatched, read) {
            (
                Err(Error::Handler {
                    handler,
                    event_id,
                    attempts,
                    source,
                }),
                _,
            ) => {
                // A blocking handler: its failure is one of the replay's failures, and it stops.
                failures.push(Failure {
                    handler: handler.clone(),
                    event_id: event_id.unwrap_or(Uuid::nil()),
                    position: 0,
                    error: report(&source),
                    attempts,
                });
                Ending::Stopped(Error::Handler {
                    handler,
                    event_id,
                    attempts,
                    source,
                })
            }
            (Err(err), _) | (Ok(()), Err(err)) => Ending::Stopped(err),
            // Only finished batches count: the dispatcher acknowledges batch n as LSN 0/n.
            (Ok(()), Ok(true)) if finished == batches.len() => Ending::Complete,
            (Ok(()), Ok(_)) => Ending::Interrupted,
        };
        let mut by_type = TypeCounts::new();
        let mut read = 0;
        for batch in &batches[..finished] {
            for (event_type, n) in batch {
                *by_type.entry(event_type.clone()).or_default() += n;
                read += n;
            }
        }
        let mut handlers: Vec<HandlerCount> = registry
            .names()
            .into_iter()
            .map(|name| HandlerCount {
                name: name.to_string(),
                routed: 0,
                failed: 0,
            })
            .collect();
        for (event_type, n) in &by_type {
            for name in registry.routes(event_type) {
                if let Some(h) = handlers.iter_mut().find(|h| h.name == name) {
                    h.routed += n;
                }
            }
        }
        for failure in &failures {
            if let Some(h) = handlers.iter_mut().find(|h| h.name == failure.handler) {
                h.failed += 1;
            }
        }
        Ok(Summary {
            read,
            last_position: (ack.position > 0).then_some(ack.position),
            handlers,
            failures,
            elapsed: started.elapsed(),
            ending,
        })
    }
}

/// Fetches the selected events in one snapshot and hands them to the dispatcher, each batch
/// followed by a commit marker `0/n` (n = 1, 2, …).
struct Reader {
    selection: Selection,
    batch_size: usize,
    items: mpsc::Sender<Item>,
    cancel: CancellationToken,
}

/// The batches handed out (events per type in each), and whether every selected event was
/// read (`Ok(false)`: stopped early, on request or because the dispatcher stopped).
type ReadResult = (Vec<TypeCounts>, Result<bool, Error>);

impl Reader {
    async fn run(self, mut client: tokio_postgres::Client) -> ReadResult {
        let mut batches = Vec::new();
        let read = self.read(&mut client, &mut batches).await;
        (batches, read)
    }

    async fn read(
        &self,
        client: &mut tokio_postgres::Client,
        batches: &mut Vec<TypeCounts>,
    ) -> Result<bool, Error> {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(Error::sql("starting the replay's read-only transaction"))?;
        let (sql, params) = self.selection.events_query();
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let portal = tx
            .bind(sql.as_str(), &refs)
            .await
            .map_err(Error::sql("selecting the events to replay"))?;
        let max_rows = i32::try_from(self.batch_size).unwrap_or(i32::MAX);
        let mut exhausted = false;
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let rows = tx
                .query_portal(&portal, max_rows)
                .await
                .map_err(Error::sql("reading the events to replay"))?;
            if rows.is_empty() {
                exhausted = true;
                break;
            }
            let full = rows.len() >= self.batch_size;
            let mut counts = TypeCounts::new();
            let seq = batches.len() as u64 + 1;
            for row in &rows {
                let item = item(row);
                if let Item::Event(event) = &item {
                    match counts.get_mut(&event.event_type) {
                        Some(n) => *n += 1,
                        None => {
                            counts.insert(event.event_type.clone(), 1);
                        }
                    }
                }
                if self.items.send(item).await.is_err() {
                    // The dispatcher stopped (a blocking failure): it reports why.
                    return Ok(false);
                }
            }
            batches.push(counts);
            if self
                .items
                .send(Item::Commit { end_lsn: Lsn(seq) })
                .await
                .is_err()
            {
                return Ok(false);
            }
            debug!(batch = seq, events = rows.len(), "replay batch read");
            if !full {
                exhausted = true;
                break;
            }
        }
        // Read-only: nothing to keep; ending it early is harmless.
        tx.rollback()
            .await
            .map_err(Error::sql("ending the replay's read-only transaction"))?;
        Ok(exhausted)
    }
}

/// A row as the dispatcher takes it; an undecodable row fails under handler `decode`.
fn item(row: &Row) -> Item {
    match event_from_row(row) {
        Ok(event) => Item::Event(Box::new(event)),
        Err(error) => {
            let position: i64 = row.try_get(0).unwrap_or(0);
            Item::Undecodable(Box::new(Undecodable {
                event_id: row.try_get::<_, Uuid>(1).unwrap_or(Uuid::nil()),
                position,
                commit_lsn: Lsn::ZERO,
                error,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_number_their_parameters_in_order() {
        let selection = Selection {
            aggregate_type: Some("Loan".into()),
            event_type: Some("Loan.*".parse().unwrap()),
            from_position: Some(5),
            until: Some(parse_timestamp("2026-11-23").unwrap()),
            ..Selection::default()
        };
        let (sql, params) = selection.filters();
        assert_eq!(
            sql,
            " AND aggregate_type = $1 AND starts_with(event_type, $2) AND position >= $3 \
             AND recorded_at < $4"
        );
        assert_eq!(params.len(), 4);
        let (sql, params) = Selection::default().events_query();
        assert!(sql.ends_with("WHERE true ORDER BY position"), "{sql}");
        assert!(params.is_empty());
    }

    #[test]
    fn timestamps_and_ranges_are_checked() {
        assert_eq!(
            parse_timestamp("2026-11-23T18:00:00+02:00").unwrap(),
            parse_timestamp("2026-11-23 16:00:00+00").unwrap()
        );
        assert_eq!(
            parse_timestamp("2026-11-23").unwrap().to_rfc3339(),
            "2026-11-23T00:00:00+00:00"
        );
        assert!(parse_timestamp("yesterday").is_err());
        assert!(parse_timestamp("2026-11-23 16:00:00").is_err(), "no offset");
        let empty = Selection {
            since: Some(parse_timestamp("2026-11-24").unwrap()),
            until: Some(parse_timestamp("2026-11-23").unwrap()),
            ..Selection::default()
        };
        assert!(matches!(empty.validate(), Err(Error::Config(_))));
        let backwards = Selection {
            from_position: Some(10),
            to_position: Some(9),
            ..Selection::default()
        };
        assert!(matches!(backwards.validate(), Err(Error::Config(_))));
    }
}
