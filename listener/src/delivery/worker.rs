//! The per-event work of one dispatcher task: handlers with retries, flushes, dead letters and
//! redeliveries, and the messages it exchanges with the coordinator.

use std::sync::Arc;

use opentelemetry::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use uuid::Uuid;

use crate::delivery::attempt::{call_with_retries, Attempt, CallTrace, Outcome};
use crate::delivery::dead_letter::{DeadLetter, DeadLetterSink, DECODE_HANDLER};
use crate::delivery::item::{RedriveJob, RedriveOutcome, Undecodable};
use crate::delivery::registry::{Registration, Registry};
use crate::delivery::retry::OnFailure;
use crate::error::{report, Error, HandlerError};
use crate::event::Event;
use crate::ops::metrics::{HandlerMetrics, Outcome as Counted};
use crate::ops::traces::{end_batch, Delivery, Tracing};

/// The per-event work: handlers, retries, dead letters, flushes. One per worker task.
pub(crate) struct Worker {
    pub(crate) registry: Arc<Registry>,
    pub(crate) dead_letters: Arc<dyn DeadLetterSink>,
    /// Per handler: `(id, position)` of the events it handled in the current transaction, to be
    /// flushed (and dead-lettered if the flush fails for good). `Some` once touched.
    pub(crate) touched: Vec<Option<Vec<(Uuid, i64)>>>,
    /// Per handler: `recorded_at` of the events it handled in the current transaction, still
    /// counted in its lag until flushed.
    pub(crate) unflushed: Vec<Vec<chrono::DateTime<chrono::Utc>>>,
    /// Per handler, in registry order.
    pub(crate) metrics: Arc<[HandlerMetrics]>,
    /// Dead letters of undecodable rows.
    pub(crate) decode_metrics: HandlerMetrics,
    /// Spans of the handler calls (off by default).
    pub(crate) tracing: Tracing,
    /// The context of flushes and of calls outside a traced transaction.
    pub(crate) untraced: Context,
}

/// What the coordinator sends a worker.
pub(crate) enum WorkerMsg {
    /// Handle this event, traced under the span of its transaction.
    Event(Box<Event>, Context),
    /// Transaction `seq` has no more events for this worker: flush, then report.
    EndTxn(u64),
    /// A redelivery for an aggregate of this worker.
    Redrive(RedriveJob),
}

/// What a worker tells the coordinator.
pub(crate) enum Report {
    /// The worker finished its part of transaction `seq`.
    Done(u64),
    /// The worker stopped on an error.
    Failed(Error),
}

impl Worker {
    pub(crate) fn new(registry: Arc<Registry>, dead_letters: Arc<dyn DeadLetterSink>) -> Worker {
        let touched = vec![None; registry.entries.len()];
        let unflushed = vec![Vec::new(); registry.entries.len()];
        let metrics = vec![HandlerMetrics::default(); registry.entries.len()].into();
        Worker {
            registry,
            dead_letters,
            touched,
            unflushed,
            metrics,
            decode_metrics: HandlerMetrics::default(),
            tracing: Tracing::off(),
            untraced: Context::new(),
        }
    }

    /// Where a flush's calls are traced: nowhere (a flush is not one event's).
    fn flush_trace(&self) -> CallTrace<'_> {
        CallTrace {
            tracing: &self.tracing,
            batch: &self.untraced,
        }
    }

    /// A worker task: handles its queue in order and reports each finished transaction part.
    pub(crate) async fn run(
        mut self,
        mut queue: mpsc::Receiver<WorkerMsg>,
        reports: mpsc::UnboundedSender<Report>,
        cancel: CancellationToken,
        abort: CancellationToken,
    ) {
        while let Some(message) = queue.recv().await {
            if abort.is_cancelled() {
                return;
            }
            let outcome = match message {
                WorkerMsg::Event(event, batch) => self.dispatch(&event, &batch, &cancel).await,
                WorkerMsg::EndTxn(seq) => match self.flush(&cancel).await {
                    Ok(Outcome::Done) => {
                        // The coordinator may be gone (it stopped on another worker's error).
                        let _ = reports.send(Report::Done(seq));
                        Ok(Outcome::Done)
                    }
                    other => other,
                },
                WorkerMsg::Redrive(job) => {
                    self.redrive(job, &cancel).await;
                    Ok(Outcome::Done)
                }
            };
            match outcome {
                Ok(Outcome::Done) => {}
                // Interrupted during a backoff: this transaction is not acknowledged.
                Ok(Outcome::Cancelled) => return,
                Err(err) => {
                    let _ = reports.send(Report::Failed(err));
                    return;
                }
            }
        }
    }

    /// Dead-letters a row that could not be decoded.
    pub(crate) async fn undecodable(&self, row: &Undecodable) -> Result<(), Error> {
        error!(
            handler = DECODE_HANDLER,
            event_id = %row.event_id,
            position = row.position,
            commit_lsn = %row.commit_lsn,
            error = %row.error,
            "cannot decode an event row; dead-lettering it"
        );
        self.dead_letters
            .record(&DeadLetter {
                handler: DECODE_HANDLER.to_string(),
                event_id: row.event_id,
                position: row.position,
                error: row.error.clone(),
                attempts: 1,
            })
            .await?;
        self.decode_metrics.dead_letter();
        Ok(())
    }

    /// The metrics of the registry entry `entry` (a no-op set if it is not ours).
    pub(crate) fn metrics_of(&self, entry: &Registration) -> HandlerMetrics {
        self.registry
            .entries
            .iter()
            .position(|e| std::ptr::eq(e, entry))
            .and_then(|i| self.metrics.get(i).cloned())
            .unwrap_or_default()
    }

    /// Runs one redelivery and replies with its outcome.
    pub(crate) async fn redrive(&self, job: RedriveJob, cancel: &CancellationToken) {
        let event = &job.event;
        let tracing = self.tracing.delivering(Delivery::Redrive);
        let batch = tracing.batch();
        let trace = CallTrace {
            tracing: &tracing,
            batch: &batch,
        };
        let outcome = if job.handler == DECODE_HANDLER {
            // The row could not be decoded from the stream: it is every matching handler's.
            let mut outcome = RedriveOutcome::Delivered;
            for entry in self
                .registry
                .entries
                .iter()
                .filter(|e| e.filters.iter().any(|f| f.matches(&event.event_type)))
            {
                match self.redrive_one(entry, event, cancel, trace).await {
                    RedriveOutcome::Delivered => {}
                    RedriveOutcome::Cancelled => {
                        outcome = RedriveOutcome::Cancelled;
                        break;
                    }
                    // Now a failure of that handler: its own dead letter.
                    RedriveOutcome::Failed { attempts, error } => {
                        let letter = DeadLetter {
                            handler: entry.name.clone(),
                            event_id: event.id,
                            position: event.position,
                            error,
                            attempts,
                        };
                        let recorded = self.dead_letters.record(&letter).await;
                        if recorded.is_ok() {
                            self.metrics_of(entry).dead_letter();
                        }
                        if let Err(err) = recorded {
                            outcome = RedriveOutcome::Failed {
                                attempts,
                                error: format!(
                                    "handler {:?} failed and its dead letter could not be \
                                     recorded: {}",
                                    entry.name,
                                    report(&err)
                                ),
                            };
                            break;
                        }
                    }
                }
            }
            outcome
        } else {
            match self.registry.entries.iter().find(|e| e.name == job.handler) {
                None => RedriveOutcome::Failed {
                    attempts: 0,
                    error: format!("no handler named {:?} is registered", job.handler),
                },
                Some(entry) if !entry.filters.iter().any(|f| f.matches(&event.event_type)) => {
                    RedriveOutcome::Failed {
                        attempts: 0,
                        error: format!(
                            "handler {:?} no longer receives events of type {:?}",
                            entry.name, event.event_type
                        ),
                    }
                }
                Some(entry) => self.redrive_one(entry, event, cancel, trace).await,
            }
        };
        match &outcome {
            RedriveOutcome::Delivered => {
                debug!(handler = %job.handler, event_id = %event.id, "redelivered a dead letter")
            }
            RedriveOutcome::Failed { attempts, error } => warn!(
                handler = %job.handler,
                event_id = %event.id,
                attempts,
                error = %error,
                "redelivery of a dead letter failed"
            ),
            RedriveOutcome::Cancelled => {}
        }
        end_batch(&batch, 1, None);
        // The requester may have gone (shutdown): nothing to tell then.
        let _ = job.reply.send(outcome);
    }

    /// Handles and flushes one event with one handler, with its retries.
    pub(crate) async fn redrive_one(
        &self,
        entry: &Registration,
        event: &Event,
        cancel: &CancellationToken,
        trace: CallTrace<'_>,
    ) -> RedriveOutcome {
        let handler = &entry.handler;
        let metrics = self.metrics_of(entry);
        match call_with_retries(entry, &metrics, cancel, Some(event), trace, || {
            handler.handle(event)
        })
        .await
        {
            Attempt::Succeeded => {}
            Attempt::Cancelled => return RedriveOutcome::Cancelled,
            Attempt::Failed { attempts, error } => {
                return RedriveOutcome::Failed {
                    attempts,
                    error: report(&error),
                }
            }
        }
        match call_with_retries(entry, &metrics, cancel, None, trace, || handler.flush()).await {
            Attempt::Succeeded => RedriveOutcome::Delivered,
            Attempt::Cancelled => RedriveOutcome::Cancelled,
            Attempt::Failed { attempts, error } => RedriveOutcome::Failed {
                attempts,
                error: format!("flush failed: {}", report(&error)),
            },
        }
    }

    /// Runs the handlers whose filters match on `event`, traced under `batch` (the span of
    /// its transaction).
    pub(crate) async fn dispatch(
        &mut self,
        event: &Event,
        batch: &Context,
        cancel: &CancellationToken,
    ) -> Result<Outcome, Error> {
        let registry = Arc::clone(&self.registry);
        let tracing = self.tracing.clone();
        let trace = CallTrace {
            tracing: &tracing,
            batch,
        };
        for (index, entry) in registry.entries.iter().enumerate() {
            if !entry.filters.iter().any(|f| f.matches(&event.event_type)) {
                continue;
            }
            let handler = &entry.handler;
            let metrics = &self.metrics[index];
            metrics.started(event.recorded_at);
            match call_with_retries(entry, metrics, cancel, Some(event), trace, || {
                handler.handle(event)
            })
            .await
            {
                Attempt::Succeeded => {
                    self.touched[index]
                        .get_or_insert_with(Vec::new)
                        .push((event.id, event.position));
                    self.unflushed[index].push(event.recorded_at);
                }
                Attempt::Cancelled => return Ok(Outcome::Cancelled),
                Attempt::Failed { attempts, error } => {
                    self.give_up(entry, event.id, event.position, attempts, error)
                        .await?;
                    metrics.finished(event.recorded_at);
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// A handler failed for good on an event: dead-letter it, or stop (block).
    pub(crate) async fn give_up(
        &self,
        entry: &Registration,
        event_id: Uuid,
        position: i64,
        attempts: u32,
        error: HandlerError,
    ) -> Result<(), Error> {
        let metrics = self.metrics_of(entry);
        match entry.on_failure {
            OnFailure::Block => {
                metrics.outcome(Counted::Failed, 1);
                Err(Error::Handler {
                    handler: entry.name.clone(),
                    event_id: Some(event_id),
                    attempts,
                    source: error,
                })
            }
            OnFailure::DeadLetter => {
                let text = report(&error);
                error!(
                    handler = %entry.name,
                    event_id = %event_id,
                    position,
                    attempts,
                    error = %text,
                    "handler gave up on an event; dead-lettering it"
                );
                self.dead_letters
                    .record(&DeadLetter {
                        handler: entry.name.clone(),
                        event_id,
                        position,
                        error: text,
                        attempts,
                    })
                    .await?;
                metrics.outcome(Counted::DeadLettered, 1);
                Ok(())
            }
        }
    }

    pub(crate) async fn flush(&mut self, cancel: &CancellationToken) -> Result<Outcome, Error> {
        let registry = Arc::clone(&self.registry);
        for (index, entry) in registry.entries.iter().enumerate() {
            let Some(handled) = self.touched[index].take() else {
                continue;
            };
            let handler = &entry.handler;
            let unflushed = std::mem::take(&mut self.unflushed[index]);
            let metrics = self.metrics[index].clone();
            match call_with_retries(entry, &metrics, cancel, None, self.flush_trace(), || {
                handler.flush()
            })
            .await
            {
                Attempt::Succeeded => {
                    metrics.outcome(Counted::Ok, handled.len() as u64);
                    unflushed.into_iter().for_each(|at| metrics.finished(at));
                }
                Attempt::Cancelled => return Ok(Outcome::Cancelled),
                Attempt::Failed { attempts, error } => {
                    if entry.on_failure == OnFailure::Block {
                        metrics.outcome(Counted::Failed, handled.len() as u64);
                        return Err(Error::Handler {
                            handler: entry.name.clone(),
                            event_id: None,
                            attempts,
                            source: error,
                        });
                    }
                    // The handler's effects for these events may not be durable: each of them
                    // is a dead letter.
                    let message = format!("flush failed: {}", report(&error));
                    for (event_id, position) in handled {
                        self.give_up(
                            entry,
                            event_id,
                            position,
                            attempts,
                            HandlerError::definite(message.clone()),
                        )
                        .await?;
                    }
                    unflushed.into_iter().for_each(|at| metrics.finished(at));
                }
            }
        }
        Ok(Outcome::Done)
    }
}
