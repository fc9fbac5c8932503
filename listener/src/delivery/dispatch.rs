//! The dispatcher: runs the handlers over the items of a reader in commit order — on one task,
//! or on worker tasks by aggregate — and acknowledges each transaction once all of its events
//! were handled, never past one that is not.

use std::collections::VecDeque;
use std::sync::Arc;

use opentelemetry::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::delivery::attempt::Outcome;
use crate::delivery::dead_letter::{DeadLetterSink, DECODE_HANDLER};
pub use crate::delivery::handler::{Filter, Handler, ParseFilterError};
pub use crate::delivery::item::{Ack, Item, RedriveJob, RedriveOutcome, Undecodable};
pub use crate::delivery::registry::Registry;
pub(crate) use crate::delivery::retry::jitter;
pub use crate::delivery::retry::{OnFailure, RetryPolicy};
use crate::delivery::worker::{Report, Worker, WorkerMsg};
use crate::error::Error;
pub use crate::error::HandlerError;
use crate::event::Event;
use crate::lsn::Lsn;
use crate::ops::metrics::Metrics;
use crate::ops::traces::{end_batch, Tracing};

async fn next_job(jobs: &mut Option<mpsc::Receiver<RedriveJob>>) -> Option<RedriveJob> {
    match jobs {
        Some(jobs) => jobs.recv().await,
        None => std::future::pending().await,
    }
}

/// Messages buffered per worker (backpressure beyond: the coordinator, and so the stream, waits).
/// Small, so that a shutdown finishes what was handed out quickly.
const WORKER_QUEUE: usize = 256;

/// Runs the handlers over a stream of [`Item`]s: in stream order on one task, or, with
/// [`Dispatcher::with_workers`], on N worker tasks that each take the events of a fixed subset
/// of aggregates (by hash of aggregate type and id), so that events of one aggregate are handled
/// in order, one at a time, while unrelated aggregates proceed in parallel. Either way a
/// transaction is acknowledged only once all of its events were handled or dead-lettered, and
/// acknowledgements never pass a transaction that is not.
pub struct Dispatcher {
    worker: Worker,
    workers: usize,
    redrives: Option<mpsc::Receiver<RedriveJob>>,
    /// Between an event and its transaction's commit.
    in_txn: bool,
    position: i64,
    metrics: Option<Arc<Metrics>>,
    /// `transactions_confirmed_total` (no-op without metrics).
    confirmed: ::metrics::Counter,
    /// The span of the current transaction (empty when tracing is off) and its events.
    batch: Batch,
}

/// The span of a transaction, from its first item to its acknowledgement.
#[derive(Default)]
struct Batch {
    span: Context,
    events: u64,
}

impl Batch {
    /// The span of the transaction `event` belongs to, started at its first event.
    fn of_event(&mut self, tracing: &Tracing) -> &Context {
        if self.events == 0 && tracing.is_on() {
            self.span = tracing.batch();
        }
        self.events += 1;
        &self.span
    }

    /// Ends the span (if any) at the transaction's acknowledgement.
    fn end(self, end_lsn: Lsn) {
        if self.events > 0 {
            end_batch(&self.span, self.events, Some(end_lsn.to_string()));
        }
    }
}

/// A transaction handed to workers and not yet acknowledged.
struct Pending {
    seq: u64,
    end_lsn: Lsn,
    position: i64,
    /// Workers that have not reported it done.
    remaining: usize,
    /// Its span, ended at its acknowledgement.
    batch: Batch,
}

/// The worker taking the events of `event`'s aggregate.
fn route(event: &Event, workers: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    event.aggregate_type.hash(&mut hasher);
    event.aggregate_id.hash(&mut hasher);
    (hasher.finish() % workers as u64) as usize
}

/// Publishes progress: acknowledgements only move forward, even if a reconnect replays.
fn acknowledge(acks: &watch::Sender<Ack>, end_lsn: Lsn, position: i64) {
    // (Counting happens in the callers: one call may acknowledge several transactions.)
    acks.send_modify(|ack| {
        if end_lsn > ack.lsn {
            ack.lsn = end_lsn;
        }
        ack.position = ack.position.max(position);
    });
}

impl Dispatcher {
    /// A dispatcher over `registry`, recording dead letters in `dead_letters`.
    pub fn new(registry: Arc<Registry>, dead_letters: Arc<dyn DeadLetterSink>) -> Dispatcher {
        Dispatcher {
            worker: Worker::new(registry, dead_letters),
            workers: 1,
            redrives: None,
            in_txn: false,
            position: 0,
            metrics: None,
            confirmed: ::metrics::Counter::noop(),
            batch: Batch::default(),
        }
    }

    /// Traces every handler call, and every transaction (or replay batch) around them, with
    /// `tracing` (see [`crate::ops::traces`]).
    pub fn with_tracing(mut self, tracing: Tracing) -> Dispatcher {
        self.worker.tracing = tracing;
        self
    }

    /// Records events, handler outcomes, durations, lags and confirmed transactions in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Dispatcher {
        self.worker.metrics = self
            .worker
            .registry
            .entries
            .iter()
            .map(|e| metrics.handler(&e.name, e.handler.target().as_deref()))
            .collect();
        self.worker.decode_metrics = metrics.handler(DECODE_HANDLER, None);
        self.confirmed = metrics.transactions_confirmed.clone();
        self.metrics = Some(metrics);
        self
    }

    fn received(&self, event: &Event) {
        if let Some(metrics) = &self.metrics {
            metrics.event_received(&event.event_type);
        }
    }

    /// Also runs the [`RedriveJob`]s received on `jobs` (between transactions with one worker;
    /// on the worker of the event's aggregate with several).
    pub fn with_redrives(mut self, jobs: mpsc::Receiver<RedriveJob>) -> Dispatcher {
        self.redrives = Some(jobs);
        self
    }

    /// Handles events on `workers` tasks (1, the default: in stream order on the calling task).
    pub fn with_workers(mut self, workers: usize) -> Dispatcher {
        self.workers = workers.max(1);
        self
    }

    /// Handles items until the channel closes, or until `cancel` fires (at the next transaction
    /// boundary, or during a retry backoff). Publishes progress on `acks`.
    pub async fn run(
        self,
        items: mpsc::Receiver<Item>,
        acks: watch::Sender<Ack>,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        if self.workers > 1 {
            self.run_concurrent(items, acks, cancel).await
        } else {
            self.run_sequential(items, acks, cancel).await
        }
    }

    async fn run_sequential(
        mut self,
        mut items: mpsc::Receiver<Item>,
        acks: watch::Sender<Ack>,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        let mut redrives = self.redrives.take();
        loop {
            let item = tokio::select! {
                // A redelivery first, at a transaction boundary: one job at a time, so a busy
                // stream is delayed by one event at most, and cannot starve redrives.
                biased;
                job = next_job(&mut redrives), if !self.in_txn && redrives.is_some() => {
                    match job {
                        Some(job) => self.worker.redrive(job, &cancel).await,
                        None => redrives = None,
                    }
                    continue;
                }
                item = items.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
            };
            match item {
                Item::Event(event) => {
                    self.received(&event);
                    self.in_txn = true;
                    self.position = self.position.max(event.position);
                    let batch = self.batch.of_event(&self.worker.tracing).clone();
                    if let Outcome::Cancelled =
                        self.worker.dispatch(&event, &batch, &cancel).await?
                    {
                        return Ok(());
                    }
                }
                Item::Undecodable(row) => {
                    self.in_txn = true;
                    self.position = self.position.max(row.position);
                    self.worker.undecodable(&row).await?;
                }
                Item::Commit { end_lsn } => {
                    if let Outcome::Cancelled = self.worker.flush(&cancel).await? {
                        return Ok(());
                    }
                    self.in_txn = false;
                    std::mem::take(&mut self.batch).end(end_lsn);
                    acknowledge(&acks, end_lsn, self.position);
                    self.confirmed.increment(1);
                    if cancel.is_cancelled() {
                        debug!(lsn = %end_lsn, "stopping the dispatcher at a transaction boundary");
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    async fn run_concurrent(
        mut self,
        mut items: mpsc::Receiver<Item>,
        acks: watch::Sender<Ack>,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        let n = self.workers;
        // Set when one worker failed: the others stop at their next message instead of handling
        // events that can no longer be acknowledged.
        let abort = CancellationToken::new();
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        let mut queues = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            let mut worker = Worker::new(
                Arc::clone(&self.worker.registry),
                Arc::clone(&self.worker.dead_letters),
            );
            worker.metrics = Arc::clone(&self.worker.metrics);
            worker.decode_metrics = self.worker.decode_metrics.clone();
            worker.tracing = self.worker.tracing.clone();
            tasks.push(tokio::spawn(worker.run(
                rx,
                report_tx.clone(),
                cancel.clone(),
                abort.clone(),
            )));
            queues.push(tx);
        }
        drop(report_tx);
        let mut redrives = self.redrives.take();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut seq: u64 = 0;
        // Workers that received events of the current transaction.
        let mut involved = vec![false; n];
        let mut failure: Option<Error> = None;

        // Feeding: until the stream ends, a worker stops, or shutdown at a transaction boundary.
        'feed: loop {
            tokio::select! {
                biased;
                report = reports.recv() => match report {
                    Some(Report::Done(done)) => complete(&mut pending, done, &acks, &self.confirmed),
                    Some(Report::Failed(err)) => {
                        failure = Some(err);
                        break 'feed;
                    }
                    None => break 'feed,
                },
                job = next_job(&mut redrives), if redrives.is_some() => match job {
                    Some(job) => {
                        let worker = route(&job.event, n);
                        if queues[worker].send(WorkerMsg::Redrive(job)).await.is_err() {
                            break 'feed;
                        }
                    }
                    None => redrives = None,
                },
                item = items.recv() => match item {
                    None => break 'feed,
                    Some(Item::Event(event)) => {
                        self.received(&event);
                        self.position = self.position.max(event.position);
                        let worker = route(&event, n);
                        involved[worker] = true;
                        let batch = self.batch.of_event(&self.worker.tracing).clone();
                        if queues[worker].send(WorkerMsg::Event(event, batch)).await.is_err() {
                            break 'feed;
                        }
                    }
                    Some(Item::Undecodable(row)) => {
                        self.position = self.position.max(row.position);
                        if let Err(err) = self.worker.undecodable(&row).await {
                            failure = Some(err);
                            break 'feed;
                        }
                    }
                    Some(Item::Commit { end_lsn }) => {
                        let mut remaining = 0;
                        for (worker, involved) in involved.iter_mut().enumerate() {
                            if std::mem::take(involved) {
                                remaining += 1;
                                if queues[worker].send(WorkerMsg::EndTxn(seq)).await.is_err() {
                                    break 'feed;
                                }
                            }
                        }
                        let batch = std::mem::take(&mut self.batch);
                        pending.push_back(Pending { seq, end_lsn, position: self.position, remaining, batch });
                        seq += 1;
                        complete(&mut pending, u64::MAX, &acks, &self.confirmed);
                        if cancel.is_cancelled() {
                            debug!(lsn = %end_lsn, "stopping the dispatcher at a transaction boundary");
                            break 'feed;
                        }
                    }
                },
            }
        }

        // Draining: the workers finish what they were given (or stop at a cancelled backoff, or
        // at once after a failure), and every transaction they complete is still acknowledged.
        if failure.is_some() {
            abort.cancel();
        }
        drop(queues);
        while let Some(report) = reports.recv().await {
            match report {
                Report::Done(done) => complete(&mut pending, done, &acks, &self.confirmed),
                Report::Failed(err) => {
                    abort.cancel();
                    failure.get_or_insert(err);
                }
            }
        }
        for task in tasks {
            if let Err(join) = task.await {
                failure.get_or_insert(Error::Task {
                    task: "dispatch worker",
                    reason: join.to_string(),
                });
            }
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// Records that a worker finished its part of transaction `done` (`u64::MAX`: none, just
/// re-check), then acknowledges the completed transactions at the front: never past one that is
/// not complete.
fn complete(
    pending: &mut VecDeque<Pending>,
    done: u64,
    acks: &watch::Sender<Ack>,
    confirmed: &::metrics::Counter,
) {
    if let Some(front) = pending.front() {
        if let Some(txn) = done
            .checked_sub(front.seq)
            .and_then(|i| pending.get_mut(i as usize))
        {
            txn.remaining = txn.remaining.saturating_sub(1);
        }
    }
    let mut last = None;
    while pending.front().is_some_and(|t| t.remaining == 0) {
        if let Some(txn) = pending.pop_front() {
            confirmed.increment(1);
            last = Some((txn.end_lsn, txn.position));
            txn.batch.end(txn.end_lsn);
        }
    }
    if let Some((end_lsn, position)) = last {
        acknowledge(acks, end_lsn, position);
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
