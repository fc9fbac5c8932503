//! Running a replay: reading the selection in one snapshot, batch by batch, and handing each
//! batch to the dispatcher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::{FutureExt, TryStreamExt};
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use super::selection::{invalid, Selection, COUNT_BY_TYPE};
use super::summary::{Ending, Failure, Failures, HandlerCount, Summary};
use crate::config::{Config, DatabaseConfig};
use crate::delivery::dead_letter::event_from_row;
use crate::delivery::dispatch::{Ack, Dispatcher, Item, Registry, Undecodable};
use crate::error::{report, Error};
use crate::lsn::Lsn;
use crate::ops::traces::{Delivery, Tracing};
use crate::service::Purpose;

/// Events read per fetch unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 10_000;

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

/// Events per type in one batch, to count per handler once the batch is finished.
type TypeCounts = HashMap<String, u64>;

/// A replay of stored events: what to read, and how.
#[derive(Debug, Clone)]
pub struct Replay {
    database: DatabaseConfig,
    selection: Selection,
    batch_size: usize,
    workers: usize,
    progress: Option<Arc<AtomicU64>>,
    tracing: Tracing,
}

impl Replay {
    /// Replays the events of `selection` from the database `database` describes.
    pub fn new(database: DatabaseConfig, selection: Selection) -> Replay {
        Replay {
            database,
            selection,
            batch_size: DEFAULT_BATCH_SIZE,
            workers: 1,
            progress: None,
            tracing: Tracing::off(),
        }
    }

    /// Keeps `done` up to date with the number of events handled so far (whole batches, as the
    /// dispatcher finishes them), for a progress display.
    pub fn with_progress(mut self, done: Arc<AtomicU64>) -> Replay {
        self.progress = Some(done);
        self
    }

    /// Traces the handler calls with `tracing`, marked as replayed (`[telemetry]`).
    pub fn with_tracing(mut self, tracing: Tracing) -> Replay {
        self.tracing = tracing.delivering(Delivery::Replay);
        self
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
        // The dispatcher runs on this task next to the reader, not spawned: a queue between two
        // tasks on different threads costs a thread wake-up whenever the consumer has caught up,
        // which is most of the time here (a third of the replay's CPU in a profile). A panic is
        // still reported as the dispatcher's failure.
        let dispatcher = std::panic::AssertUnwindSafe(
            Dispatcher::new(Arc::clone(&registry), failures.clone())
                .with_workers(self.workers)
                .with_tracing(self.tracing.clone())
                .run(items_rx, ack_tx, cancel.clone()),
        )
        .catch_unwind();
        let progress = self.progress.as_ref().map(|done| {
            Arc::new(BatchProgress {
                ends: Default::default(),
                done: Arc::clone(done),
            })
        });
        let following = progress
            .clone()
            .map(|p| tokio::spawn(p.follow(ack_rx.clone())));
        let reader = Reader {
            selection: self.selection.clone(),
            batch_size: self.batch_size,
            items: items_tx,
            cancel: cancel.clone(),
            progress,
        };
        let (dispatched, (batches, read)) = tokio::join!(dispatcher, reader.run(client));
        let _ = connection.await;
        let dispatched = dispatched.unwrap_or_else(|_| {
            Err(Error::Task {
                task: "replay dispatcher",
                reason: "panicked".into(),
            })
        });
        if let Some(following) = following {
            // Ends with the dispatcher's acknowledgement sender.
            let _ = following.await;
        }
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
    progress: Option<Arc<BatchProgress>>,
}

/// Turns the dispatcher's acknowledgements (batch numbers) into events done, for
/// [`Replay::with_progress`].
struct BatchProgress {
    /// Events read up to the end of each batch (cumulative).
    ends: std::sync::Mutex<Vec<u64>>,
    done: Arc<AtomicU64>,
}

impl BatchProgress {
    fn batch_read(&self, events: u64) {
        if let Ok(mut ends) = self.ends.lock() {
            let total = ends.last().copied().unwrap_or(0) + events;
            ends.push(total);
        }
    }

    /// Follows `acks` until the dispatcher is gone.
    async fn follow(self: Arc<Self>, mut acks: watch::Receiver<Ack>) {
        while acks.changed().await.is_ok() {
            let finished = usize::try_from(acks.borrow_and_update().lsn.0).unwrap_or(0);
            let done = match self.ends.lock() {
                Ok(ends) if finished > 0 => ends.get(finished - 1).copied(),
                _ => None,
            };
            if let Some(done) = done {
                self.done.fetch_max(done, Ordering::Relaxed);
            }
        }
    }
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
        // The next fetch is always requested before the current one is consumed, and rows are
        // decoded as they arrive: the server produces batch n + 1 while batch n is decoded and
        // handed out, instead of waiting for a round trip and a whole batch per fetch.
        let mut next = tx
            .query_portal_raw(&portal, max_rows)
            .await
            .map_err(Error::sql("reading the events to replay"))?;
        let mut exhausted = false;
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let rows = std::mem::replace(
                &mut next,
                tx.query_portal_raw(&portal, max_rows)
                    .await
                    .map_err(Error::sql("reading the events to replay"))?,
            );
            futures_util::pin_mut!(rows);
            let mut counts = TypeCounts::new();
            let seq = batches.len() as u64 + 1;
            let mut read = 0usize;
            while let Some(row) = rows
                .try_next()
                .await
                .map_err(Error::sql("reading the events to replay"))?
            {
                read += 1;
                let item = item(&row);
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
            if read == 0 {
                exhausted = true;
                break;
            }
            batches.push(counts);
            if let Some(progress) = &self.progress {
                progress.batch_read(read as u64);
            }
            if self
                .items
                .send(Item::Commit { end_lsn: Lsn(seq) })
                .await
                .is_err()
            {
                return Ok(false);
            }
            debug!(batch = seq, events = read, "replay batch read");
            if read < self.batch_size {
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
