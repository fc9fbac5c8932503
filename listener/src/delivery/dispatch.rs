//! Handlers, the registry that routes events to them, and the dispatcher that runs them in commit
//! order and acknowledges each transaction once all of its events were handled.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use uuid::Uuid;

use crate::delivery::dead_letter::{DeadLetter, DeadLetterSink, DECODE_HANDLER};
pub use crate::error::HandlerError;

use crate::error::{report, Error};
use crate::event::Event;
use crate::lsn::Lsn;
use crate::ops::metrics::{HandlerMetrics, Metrics, Outcome as Counted};

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

/// How a handler's transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Calls per event, first one included (at least 1).
    pub max_attempts: u32,
    /// Delay before the second call; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of the delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1` (exponential, with up to 50 % jitter so that
    /// many listeners do not hammer a recovering downstream in step).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.initial_backoff.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        jitter(exp.min(self.max_backoff))
    }
}

/// Scales `d` by a pseudo-random factor in [0.5, 1.0].
pub(crate) fn jitter(d: Duration) -> Duration {
    // Jitter needs no cryptographic quality: the clock's nanoseconds are spread enough.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.5 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}

/// What happens to an event once a handler failed on it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Record it in `domain_events.dead_letter` and move on (redrive it later).
    #[default]
    DeadLetter,
    /// Stop the listener without acknowledging the transaction: the event is delivered again
    /// after a restart, and nothing after it is delivered before.
    Block,
}

struct Registration {
    name: String,
    filters: Vec<Filter>,
    handler: Arc<dyn Handler>,
    retry: RetryPolicy,
    on_failure: OnFailure,
}

/// The handlers and their filters.
#[derive(Default)]
pub struct Registry {
    entries: Vec<Registration>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `handler` under `name` for events passing any of `filters`.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        filters: impl IntoIterator<Item = Filter>,
        retry: RetryPolicy,
        handler: impl Handler,
    ) -> &mut Registry {
        self.register_arc(name, filters, retry, Arc::new(handler))
    }

    /// Like [`Registry::register`], for a handler already shared elsewhere.
    pub fn register_arc(
        &mut self,
        name: impl Into<String>,
        filters: impl IntoIterator<Item = Filter>,
        retry: RetryPolicy,
        handler: Arc<dyn Handler>,
    ) -> &mut Registry {
        self.register_with(name, filters, retry, OnFailure::default(), handler)
    }

    /// Registers `handler` with an explicit [`OnFailure`] (the other methods dead-letter).
    pub fn register_with(
        &mut self,
        name: impl Into<String>,
        filters: impl IntoIterator<Item = Filter>,
        retry: RetryPolicy,
        on_failure: OnFailure,
        handler: Arc<dyn Handler>,
    ) -> &mut Registry {
        self.entries.push(Registration {
            name: name.into(),
            filters: filters.into_iter().collect(),
            handler,
            retry: RetryPolicy {
                max_attempts: retry.max_attempts.max(1),
                ..retry
            },
            on_failure,
        });
        self
    }

    /// Number of registered handlers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Names of the registered handlers, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|r| r.name.as_str()).collect()
    }

    /// Names of the handlers `event_type` is routed to, in registration order.
    pub fn routes(&self, event_type: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|r| r.filters.iter().any(|f| f.matches(event_type)))
            .map(|r| r.name.as_str())
            .collect()
    }
}

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

/// Whether a retry loop finished or was interrupted by shutdown.
enum Outcome {
    Done,
    Cancelled,
}

/// How a handler call (with its retries) ended.
enum Attempt {
    Succeeded,
    Cancelled,
    /// Failed for good: a definite error, a panic, or out of attempts.
    Failed {
        attempts: u32,
        error: HandlerError,
    },
}

/// Polls a future, turning a panic inside it into an `Err` (a handler's panic is a failure of
/// that handler, not of the listener).
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic_message(panic.as_ref()))),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// Calls `call` until it succeeds, retrying transient errors with the entry's backoff.
/// Every call of `handle` is timed; every retry is counted.
async fn call_with_retries<'a>(
    entry: &'a Registration,
    metrics: &HandlerMetrics,
    cancel: &CancellationToken,
    event: Option<&'a Event>,
    mut call: impl FnMut() -> HandlerFuture<'a>,
) -> Attempt {
    let mut attempt = 1;
    loop {
        let started = std::time::Instant::now();
        let result = CatchUnwind(call()).await;
        if event.is_some() {
            metrics.call_took(started.elapsed());
        }
        let err = match result {
            Ok(Ok(())) => return Attempt::Succeeded,
            Ok(Err(err)) => err,
            Err(panic) => HandlerError::definite(format!("handler panicked: {panic}")),
        };
        if !err.is_transient() || attempt >= entry.retry.max_attempts {
            return Attempt::Failed {
                attempts: attempt,
                error: err,
            };
        }
        let delay = entry.retry.backoff(attempt);
        match event {
            Some(event) => warn!(
                handler = %entry.name,
                event_id = %event.id,
                event_type = %event.event_type,
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                error = %report(&err),
                "handler failed, retrying"
            ),
            None => warn!(
                handler = %entry.name,
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                error = %report(&err),
                "handler flush failed, retrying"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Attempt::Cancelled,
        }
        metrics.outcome(Counted::Retried, 1);
        attempt += 1;
    }
}

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
}

/// The per-event work: handlers, retries, dead letters, flushes. One per worker task.
struct Worker {
    registry: Arc<Registry>,
    dead_letters: Arc<dyn DeadLetterSink>,
    /// Per handler: `(id, position)` of the events it handled in the current transaction, to be
    /// flushed (and dead-lettered if the flush fails for good). `Some` once touched.
    touched: Vec<Option<Vec<(Uuid, i64)>>>,
    /// Per handler: `recorded_at` of the latest event it handled in the current transaction,
    /// for `handler_lag_seconds` once flushed.
    latest: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    /// Per handler, in registry order.
    metrics: Arc<[HandlerMetrics]>,
    /// Dead letters of undecodable rows.
    decode_metrics: HandlerMetrics,
}

/// What the coordinator sends a worker.
enum WorkerMsg {
    /// Handle this event.
    Event(Box<Event>),
    /// Transaction `seq` has no more events for this worker: flush, then report.
    EndTxn(u64),
    /// A redelivery for an aggregate of this worker.
    Redrive(RedriveJob),
}

/// What a worker tells the coordinator.
enum Report {
    /// The worker finished its part of transaction `seq`.
    Done(u64),
    /// The worker stopped on an error.
    Failed(Error),
}

/// A transaction handed to workers and not yet acknowledged.
struct Pending {
    seq: u64,
    end_lsn: Lsn,
    position: i64,
    /// Workers that have not reported it done.
    remaining: usize,
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
        }
    }

    /// Records events, handler outcomes, durations, lags and confirmed transactions in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Dispatcher {
        self.worker.metrics = self
            .worker
            .registry
            .entries
            .iter()
            .map(|e| metrics.handler(&e.name))
            .collect();
        self.worker.decode_metrics = metrics.handler(DECODE_HANDLER);
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
                    if let Outcome::Cancelled = self.worker.dispatch(&event, &cancel).await? {
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
                        if queues[worker].send(WorkerMsg::Event(event)).await.is_err() {
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
                        pending.push_back(Pending { seq, end_lsn, position: self.position, remaining });
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
        last = pending.pop_front();
        confirmed.increment(1);
    }
    if let Some(txn) = last {
        acknowledge(acks, txn.end_lsn, txn.position);
    }
}

impl Worker {
    fn new(registry: Arc<Registry>, dead_letters: Arc<dyn DeadLetterSink>) -> Worker {
        let touched = vec![None; registry.entries.len()];
        let latest = vec![None; registry.entries.len()];
        let metrics = vec![HandlerMetrics::default(); registry.entries.len()].into();
        Worker {
            registry,
            dead_letters,
            touched,
            latest,
            metrics,
            decode_metrics: HandlerMetrics::default(),
        }
    }

    /// A worker task: handles its queue in order and reports each finished transaction part.
    async fn run(
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
                WorkerMsg::Event(event) => self.dispatch(&event, &cancel).await,
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
    async fn undecodable(&self, row: &Undecodable) -> Result<(), Error> {
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
    fn metrics_of(&self, entry: &Registration) -> HandlerMetrics {
        self.registry
            .entries
            .iter()
            .position(|e| std::ptr::eq(e, entry))
            .and_then(|i| self.metrics.get(i).cloned())
            .unwrap_or_default()
    }

    /// Runs one redelivery and replies with its outcome.
    async fn redrive(&self, job: RedriveJob, cancel: &CancellationToken) {
        let event = &job.event;
        let outcome = if job.handler == DECODE_HANDLER {
            // The row could not be decoded from the stream: it is every matching handler's.
            let mut outcome = RedriveOutcome::Delivered;
            for entry in self
                .registry
                .entries
                .iter()
                .filter(|e| e.filters.iter().any(|f| f.matches(&event.event_type)))
            {
                match self.redrive_one(entry, event, cancel).await {
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
                Some(entry) => self.redrive_one(entry, event, cancel).await,
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
        // The requester may have gone (shutdown): nothing to tell then.
        let _ = job.reply.send(outcome);
    }

    /// Handles and flushes one event with one handler, with its retries.
    async fn redrive_one(
        &self,
        entry: &Registration,
        event: &Event,
        cancel: &CancellationToken,
    ) -> RedriveOutcome {
        let handler = &entry.handler;
        let metrics = self.metrics_of(entry);
        match call_with_retries(entry, &metrics, cancel, Some(event), || {
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
        match call_with_retries(entry, &metrics, cancel, None, || handler.flush()).await {
            Attempt::Succeeded => RedriveOutcome::Delivered,
            Attempt::Cancelled => RedriveOutcome::Cancelled,
            Attempt::Failed { attempts, error } => RedriveOutcome::Failed {
                attempts,
                error: format!("flush failed: {}", report(&error)),
            },
        }
    }

    async fn dispatch(
        &mut self,
        event: &Event,
        cancel: &CancellationToken,
    ) -> Result<Outcome, Error> {
        let registry = Arc::clone(&self.registry);
        for (index, entry) in registry.entries.iter().enumerate() {
            if !entry.filters.iter().any(|f| f.matches(&event.event_type)) {
                continue;
            }
            let handler = &entry.handler;
            let metrics = &self.metrics[index];
            match call_with_retries(entry, metrics, cancel, Some(event), || {
                handler.handle(event)
            })
            .await
            {
                Attempt::Succeeded => {
                    self.touched[index]
                        .get_or_insert_with(Vec::new)
                        .push((event.id, event.position));
                    let latest = &mut self.latest[index];
                    *latest = Some(latest.map_or(event.recorded_at, |t| t.max(event.recorded_at)));
                }
                Attempt::Cancelled => return Ok(Outcome::Cancelled),
                Attempt::Failed { attempts, error } => {
                    self.give_up(entry, event.id, event.position, attempts, error)
                        .await?;
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// A handler failed for good on an event: dead-letter it, or stop (block).
    async fn give_up(
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

    async fn flush(&mut self, cancel: &CancellationToken) -> Result<Outcome, Error> {
        let registry = Arc::clone(&self.registry);
        for (index, entry) in registry.entries.iter().enumerate() {
            let Some(handled) = self.touched[index].take() else {
                continue;
            };
            let handler = &entry.handler;
            let latest = self.latest[index].take();
            let metrics = self.metrics[index].clone();
            match call_with_retries(entry, &metrics, cancel, None, || handler.flush()).await {
                Attempt::Succeeded => {
                    metrics.outcome(Counted::Ok, handled.len() as u64);
                    if let Some(recorded_at) = latest {
                        metrics.finished(recorded_at);
                    }
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
                }
            }
        }
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_match() {
        let all: Filter = "*".parse().unwrap();
        let loan: Filter = "Loan.*".parse().unwrap();
        let exact: Filter = "Loan.Funded".parse().unwrap();
        assert_eq!(loan, Filter::Prefix("Loan.".into()));
        assert!(all.matches("anything"));
        assert!(loan.matches("Loan.Funded"));
        assert!(loan.matches("Loan.Status.Changed"));
        assert!(!loan.matches("Loan"));
        assert!(!loan.matches("LoanApplication.Created"));
        assert!(exact.matches("Loan.Funded"));
        assert!(!exact.matches("Loan.FundedLate"));
        for bad in ["", "**", "Loan*", ".*", "Lo*an", "Loan..*", "a b"] {
            assert!(bad.parse::<Filter>().is_err(), "{bad:?} parsed");
        }
    }

    fn event(position: i64, event_type: &str) -> Box<Event> {
        Box::new(Event {
            position,
            id: uuid::Uuid::from_u128(position as u128),
            aggregate_type: "Loan".into(),
            aggregate_id: "1".into(),
            aggregate_version: position,
            event_type: event_type.into(),
            event_version: 1,
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            occurred_at: chrono::Utc::now(),
            recorded_at: chrono::Utc::now(),
            txid: 1,
            commit_lsn: Lsn(1),
        })
    }

    /// Records calls; fails the first `fail_first` calls with `failure`.
    #[derive(Default)]
    struct Probe {
        log: std::sync::Mutex<Vec<String>>,
        fail_first: std::sync::atomic::AtomicU32,
        definite: bool,
    }

    #[async_trait::async_trait]
    impl Handler for Arc<Probe> {
        async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("handle {}", event.position));
            let left = self.fail_first.load(std::sync::atomic::Ordering::SeqCst);
            if left > 0 {
                self.fail_first
                    .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                return Err(if self.definite {
                    HandlerError::definite("nope")
                } else {
                    HandlerError::transient("later")
                });
            }
            Ok(())
        }

        async fn flush(&self) -> Result<(), HandlerError> {
            self.log.lock().unwrap().push("flush".into());
            Ok(())
        }
    }

    fn quick(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    /// Collects dead letters; refuses them when `broken`.
    #[derive(Default)]
    struct Letters {
        recorded: std::sync::Mutex<Vec<DeadLetter>>,
        broken: bool,
    }

    #[async_trait::async_trait]
    impl DeadLetterSink for Letters {
        async fn record(&self, letter: &DeadLetter) -> Result<(), Error> {
            if self.broken {
                return Err(Error::Protocol("dead-letter store unavailable".into()));
            }
            self.recorded.lock().unwrap().push(letter.clone());
            Ok(())
        }
    }

    async fn run_items(
        registry: Registry,
        items: Vec<Item>,
        cancel: CancellationToken,
    ) -> (Result<(), Error>, Ack) {
        let (result, ack, _) = run_items_with(registry, items, cancel, Letters::default()).await;
        (result, ack)
    }

    async fn run_items_with(
        registry: Registry,
        items: Vec<Item>,
        cancel: CancellationToken,
        letters: Letters,
    ) -> (Result<(), Error>, Ack, Vec<DeadLetter>) {
        let (tx, rx) = mpsc::channel(items.len().max(1));
        for item in items {
            tx.send(item).await.unwrap();
        }
        drop(tx);
        let (ack_tx, ack_rx) = watch::channel(Ack::default());
        let letters = Arc::new(letters);
        let result = Dispatcher::new(Arc::new(registry), letters.clone())
            .run(rx, ack_tx, cancel)
            .await;
        let ack = *ack_rx.borrow();
        let recorded = letters.recorded.lock().unwrap().clone();
        (result, ack, recorded)
    }

    #[tokio::test]
    async fn routes_by_filter_flushes_then_acknowledges_the_commit() {
        let loans = Arc::new(Probe::default());
        let all = Arc::new(Probe::default());
        let none = Arc::new(Probe::default());
        let mut registry = Registry::new();
        registry.register(
            "loans",
            ["Loan.*".parse().unwrap()],
            quick(1),
            loans.clone(),
        );
        registry.register("all", [Filter::All], quick(1), all.clone());
        registry.register("none", ["Nothing".parse().unwrap()], quick(1), none.clone());
        assert_eq!(registry.routes("Loan.Funded"), ["loans", "all"]);
        let items = vec![
            Item::Event(event(1, "Loan.Funded")),
            Item::Event(event(2, "User.Created")),
            Item::Commit { end_lsn: Lsn(100) },
            Item::Event(event(3, "User.Created")),
            Item::Commit { end_lsn: Lsn(200) },
        ];
        let (result, ack) = run_items(registry, items, CancellationToken::new()).await;
        result.unwrap();
        assert_eq!(
            ack,
            Ack {
                lsn: Lsn(200),
                position: 3
            }
        );
        assert_eq!(*loans.log.lock().unwrap(), ["handle 1", "flush"]);
        assert_eq!(
            *all.log.lock().unwrap(),
            ["handle 1", "handle 2", "flush", "handle 3", "flush"]
        );
        assert!(
            none.log.lock().unwrap().is_empty(),
            "untouched handlers are not flushed"
        );
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let probe = Arc::new(Probe::default());
        probe
            .fail_first
            .store(2, std::sync::atomic::Ordering::SeqCst);
        let mut registry = Registry::new();
        registry.register("p", [Filter::All], quick(3), probe.clone());
        let items = vec![
            Item::Event(event(1, "A")),
            Item::Commit { end_lsn: Lsn(10) },
        ];
        let (result, ack) = run_items(registry, items, CancellationToken::new()).await;
        result.unwrap();
        assert_eq!(ack.lsn, Lsn(10));
        assert_eq!(
            probe.log.lock().unwrap().len(),
            4,
            "three calls and a flush"
        );
    }

    #[tokio::test]
    async fn blocking_handlers_stop_without_acknowledging_on_exhausted_or_definite_failures() {
        for (definite, max_attempts, expected_attempts) in [(false, 3, 3), (true, 3, 1)] {
            let probe = Arc::new(Probe {
                definite,
                ..Probe::default()
            });
            probe
                .fail_first
                .store(10, std::sync::atomic::Ordering::SeqCst);
            let mut registry = Registry::new();
            registry.register_with(
                "p",
                [Filter::All],
                quick(max_attempts),
                OnFailure::Block,
                Arc::new(probe.clone()),
            );
            let items = vec![
                Item::Event(event(1, "A")),
                Item::Commit { end_lsn: Lsn(10) },
            ];
            let (result, ack) = run_items(registry, items, CancellationToken::new()).await;
            match result {
                Err(Error::Handler {
                    attempts, event_id, ..
                }) => {
                    assert_eq!(attempts, expected_attempts);
                    assert_eq!(event_id, Some(uuid::Uuid::from_u128(1)));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                ack.lsn,
                Lsn::ZERO,
                "a failed transaction is not acknowledged"
            );
        }
    }

    /// Fails (transiently) on events of type `"Bad"`, panics on `"Panic"`, handles the rest.
    #[derive(Default)]
    struct Picky {
        handled: std::sync::Mutex<Vec<i64>>,
        calls: std::sync::atomic::AtomicU32,
        fail_flush: bool,
    }

    #[async_trait::async_trait]
    impl Handler for Arc<Picky> {
        async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match event.event_type.as_str() {
                "Bad" => Err(HandlerError::transient("downstream says no")),
                "Panic" => panic!("handler bug on event {}", event.position),
                _ => {
                    self.handled.lock().unwrap().push(event.position);
                    Ok(())
                }
            }
        }

        async fn flush(&self) -> Result<(), HandlerError> {
            if self.fail_flush {
                return Err(HandlerError::definite("disk full"));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn failed_and_panicking_events_are_dead_lettered_and_the_stream_moves_on() {
        let picky = Arc::new(Picky::default());
        let other = Arc::new(Probe::default());
        let mut registry = Registry::new();
        registry.register("picky", [Filter::All], quick(3), picky.clone());
        registry.register("other", [Filter::All], quick(1), other.clone());
        let items = vec![
            Item::Event(event(1, "Good")),
            Item::Event(event(2, "Bad")),
            Item::Event(event(3, "Panic")),
            Item::Commit { end_lsn: Lsn(10) },
            Item::Event(event(4, "Good")),
            Item::Commit { end_lsn: Lsn(20) },
        ];
        let (result, ack, letters) = run_items_with(
            registry,
            items,
            CancellationToken::new(),
            Letters::default(),
        )
        .await;
        result.unwrap();
        assert_eq!(
            ack,
            Ack {
                lsn: Lsn(20),
                position: 4
            },
            "both transactions acknowledged"
        );
        assert_eq!(*picky.handled.lock().unwrap(), [1, 4]);
        assert_eq!(
            picky.calls.load(std::sync::atomic::Ordering::SeqCst),
            1 + 3 + 1 + 1,
            "a transient failure is retried up to max_attempts, a panic is not retried"
        );
        assert_eq!(
            *other.log.lock().unwrap(),
            ["handle 1", "handle 2", "handle 3", "flush", "handle 4", "flush"],
            "another handler gets every event"
        );
        assert_eq!(letters.len(), 2, "{letters:?}");
        assert_eq!(letters[0].handler, "picky");
        assert_eq!(letters[0].event_id, uuid::Uuid::from_u128(2));
        assert_eq!(letters[0].position, 2);
        assert_eq!(letters[0].attempts, 3);
        assert!(
            letters[0].error.contains("downstream says no"),
            "{letters:?}"
        );
        assert_eq!(letters[1].event_id, uuid::Uuid::from_u128(3));
        assert_eq!(letters[1].attempts, 1);
        assert!(
            letters[1]
                .error
                .contains("handler panicked: handler bug on event 3"),
            "{letters:?}"
        );
    }

    #[tokio::test]
    async fn a_panic_in_a_blocking_handler_stops_without_acknowledging() {
        let picky = Arc::new(Picky::default());
        let mut registry = Registry::new();
        registry.register_with(
            "picky",
            [Filter::All],
            quick(3),
            OnFailure::Block,
            Arc::new(picky.clone()),
        );
        let items = vec![
            Item::Event(event(1, "Panic")),
            Item::Commit { end_lsn: Lsn(10) },
        ];
        let (result, ack) = run_items(registry, items, CancellationToken::new()).await;
        match result {
            Err(err @ Error::Handler { .. }) => {
                assert!(report(&err).contains("panicked"), "{}", report(&err))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ack.lsn, Lsn::ZERO);
    }

    #[tokio::test]
    async fn a_failed_flush_dead_letters_the_events_it_covered() {
        let picky = Arc::new(Picky {
            fail_flush: true,
            ..Picky::default()
        });
        let mut registry = Registry::new();
        registry.register("picky", [Filter::All], quick(2), picky.clone());
        let items = vec![
            Item::Event(event(1, "Good")),
            Item::Event(event(2, "Bad")),
            Item::Event(event(3, "Good")),
            Item::Commit { end_lsn: Lsn(10) },
        ];
        let (result, ack, letters) = run_items_with(
            registry,
            items,
            CancellationToken::new(),
            Letters::default(),
        )
        .await;
        result.unwrap();
        assert_eq!(ack.lsn, Lsn(10));
        let mut positions: Vec<i64> = letters.iter().map(|l| l.position).collect();
        positions.sort();
        assert_eq!(positions, [1, 2, 3], "{letters:?}");
        assert!(letters
            .iter()
            .filter(|l| l.position != 2)
            .all(|l| l.error.starts_with("flush failed: disk full")));
    }

    #[tokio::test]
    async fn undecodable_rows_are_dead_lettered_under_decode() {
        let probe = Arc::new(Probe::default());
        let mut registry = Registry::new();
        registry.register("p", [Filter::All], quick(1), probe.clone());
        let items = vec![
            Item::Event(event(1, "A")),
            Item::Undecodable(Box::new(Undecodable {
                event_id: uuid::Uuid::from_u128(2),
                position: 2,
                commit_lsn: Lsn(10),
                error: "column \"occurred_at\": not an ISO timestamptz".into(),
            })),
            Item::Event(event(3, "A")),
            Item::Commit { end_lsn: Lsn(10) },
        ];
        let (result, ack, letters) = run_items_with(
            registry,
            items,
            CancellationToken::new(),
            Letters::default(),
        )
        .await;
        result.unwrap();
        assert_eq!(
            ack,
            Ack {
                lsn: Lsn(10),
                position: 3
            }
        );
        assert_eq!(
            *probe.log.lock().unwrap(),
            ["handle 1", "handle 3", "flush"]
        );
        assert_eq!(
            letters,
            [DeadLetter {
                handler: DECODE_HANDLER.into(),
                event_id: uuid::Uuid::from_u128(2),
                position: 2,
                error: "column \"occurred_at\": not an ISO timestamptz".into(),
                attempts: 1,
            }]
        );
    }

    #[tokio::test]
    async fn a_dead_letter_that_cannot_be_recorded_is_not_acknowledged() {
        let picky = Arc::new(Picky::default());
        let mut registry = Registry::new();
        registry.register("picky", [Filter::All], quick(1), picky.clone());
        let items = vec![
            Item::Event(event(1, "Bad")),
            Item::Commit { end_lsn: Lsn(10) },
        ];
        let (result, ack, _) = run_items_with(
            registry,
            items,
            CancellationToken::new(),
            Letters {
                broken: true,
                ..Letters::default()
            },
        )
        .await;
        assert!(result.is_err());
        assert_eq!(ack.lsn, Lsn::ZERO, "the event must come again");
    }

    #[tokio::test]
    async fn redrive_jobs_run_between_transactions_and_report_their_outcome() {
        let picky = Arc::new(Picky::default());
        let other = Arc::new(Probe::default());
        let mut registry = Registry::new();
        registry.register("picky", [Filter::All], quick(2), picky.clone());
        registry.register("other", ["Good".parse().unwrap()], quick(1), other.clone());
        let letters = Arc::new(Letters::default());
        let (jobs_tx, jobs_rx) = mpsc::channel(1);
        let (items_tx, items_rx) = mpsc::channel(8);
        let (ack_tx, _ack_rx) = watch::channel(Ack::default());
        let dispatcher = tokio::spawn(
            Dispatcher::new(Arc::new(registry), letters.clone())
                .with_redrives(jobs_rx)
                .run(items_rx, ack_tx, CancellationToken::new()),
        );
        // Mid-transaction: the job waits for the commit.
        items_tx.send(Item::Event(event(1, "Good"))).await.unwrap();
        let run = |handler: &str, event_type: &str| {
            let (reply, outcome) = oneshot::channel();
            let job = RedriveJob {
                event: event(9, event_type),
                handler: handler.into(),
                reply,
            };
            (job, outcome)
        };
        while picky.handled.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (job, mut outcome) = run("picky", "Good");
        jobs_tx.send(job).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(outcome.try_recv().is_err(), "ran inside a transaction");
        items_tx
            .send(Item::Commit { end_lsn: Lsn(10) })
            .await
            .unwrap();
        assert_eq!(outcome.await.unwrap(), RedriveOutcome::Delivered);
        assert_eq!(*picky.handled.lock().unwrap(), [1, 9]);

        let (job, outcome) = run("picky", "Bad");
        jobs_tx.send(job).await.unwrap();
        match outcome.await.unwrap() {
            RedriveOutcome::Failed { attempts, error } => {
                assert_eq!(attempts, 2);
                assert!(error.contains("downstream says no"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        let (job, outcome) = run("gone", "Good");
        jobs_tx.send(job).await.unwrap();
        assert!(matches!(
            outcome.await.unwrap(),
            RedriveOutcome::Failed { attempts: 0, error } if error.contains("no handler named")
        ));
        let (job, outcome) = run("other", "Bad");
        jobs_tx.send(job).await.unwrap();
        assert!(matches!(
            outcome.await.unwrap(),
            RedriveOutcome::Failed { error, .. } if error.contains("no longer receives")
        ));

        // An undecodable row, now loadable: every matching handler gets it; one that fails
        // gets its own dead letter, and the decode letter is done.
        let (job, outcome) = run(DECODE_HANDLER, "Good");
        jobs_tx.send(job).await.unwrap();
        assert_eq!(outcome.await.unwrap(), RedriveOutcome::Delivered);
        assert!(other.log.lock().unwrap().contains(&"handle 9".to_string()));
        let (job, outcome) = run(DECODE_HANDLER, "Bad");
        jobs_tx.send(job).await.unwrap();
        assert_eq!(outcome.await.unwrap(), RedriveOutcome::Delivered);
        let recorded = letters.recorded.lock().unwrap().clone();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        assert_eq!(recorded[0].handler, "picky");

        drop(items_tx);
        dispatcher.await.unwrap().unwrap();
    }

    fn event_of(position: i64, aggregate_id: &str, version: i64) -> Box<Event> {
        let mut e = event(position, "A");
        e.aggregate_id = aggregate_id.into();
        e.aggregate_version = version;
        e
    }

    /// Two aggregate ids that `route` sends to different workers out of `n`.
    fn apart(n: usize) -> (String, String) {
        let first = event_of(1, "agg-0", 1);
        let other = (1..1000)
            .map(|i| format!("agg-{i}"))
            .find(|id| route(&event_of(1, id, 1), n) != route(&first, n))
            .expect("two routes");
        ("agg-0".into(), other)
    }

    /// Blocks on events of aggregate `slow` until `release` is notified; records every
    /// `(aggregate_id, version)` in call order.
    struct Gate {
        slow: String,
        release: tokio::sync::Semaphore,
        seen: std::sync::Mutex<Vec<(String, i64)>>,
    }

    #[async_trait::async_trait]
    impl Handler for Arc<Gate> {
        async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
            if event.aggregate_id == self.slow {
                let _ = self.release.acquire().await.expect("semaphore");
            }
            self.seen
                .lock()
                .unwrap()
                .push((event.aggregate_id.clone(), event.aggregate_version));
            Ok(())
        }
    }

    #[tokio::test]
    async fn workers_run_aggregates_in_parallel_and_acknowledge_only_completed_prefixes() {
        let (slow, fast) = apart(4);
        let gate = Arc::new(Gate {
            slow: slow.clone(),
            release: tokio::sync::Semaphore::new(0),
            seen: Default::default(),
        });
        let mut registry = Registry::new();
        registry.register("gate", [Filter::All], quick(1), gate.clone());
        let (items_tx, items_rx) = mpsc::channel(16);
        let (ack_tx, mut ack_rx) = watch::channel(Ack::default());
        let dispatcher = tokio::spawn(
            Dispatcher::new(Arc::new(registry), Arc::new(Letters::default()))
                .with_workers(4)
                .run(items_rx, ack_tx, CancellationToken::new()),
        );
        for item in [
            Item::Event(event_of(1, &slow, 1)),
            Item::Commit { end_lsn: Lsn(100) },
            Item::Event(event_of(2, &fast, 1)),
            Item::Commit { end_lsn: Lsn(200) },
            Item::Commit { end_lsn: Lsn(300) }, // an empty transaction (a heartbeat)
        ] {
            items_tx.send(item).await.unwrap();
        }
        // The later transaction is handled while the earlier one is stuck, but not acknowledged.
        while gate.seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*gate.seen.lock().unwrap(), [(fast.clone(), 1)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            ack_rx.borrow().lsn,
            Lsn::ZERO,
            "acknowledged past a pending transaction"
        );
        gate.release.add_permits(1);
        tokio::time::timeout(Duration::from_secs(5), async {
            while ack_rx.borrow_and_update().lsn < Lsn(300) {
                ack_rx.changed().await.unwrap();
            }
        })
        .await
        .expect("everything acknowledged once released");
        assert_eq!(
            *ack_rx.borrow(),
            Ack {
                lsn: Lsn(300),
                position: 2
            }
        );
        drop(items_tx);
        dispatcher.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn workers_keep_each_aggregates_order_dead_letter_and_block_like_one() {
        // Many aggregates, interleaved transactions, some events failing.
        let picky = Arc::new(Picky::default());
        let gate = Arc::new(Gate {
            slow: "none".into(),
            release: tokio::sync::Semaphore::new(0),
            seen: Default::default(),
        });
        let mut registry = Registry::new();
        registry.register("picky", [Filter::All], quick(2), picky.clone());
        registry.register("gate", [Filter::All], quick(1), gate.clone());
        let mut items = Vec::new();
        let mut position = 0;
        for txn in 0..50 {
            for a in 0..10 {
                position += 1;
                let mut e = event_of(position, &format!("agg-{a}"), txn + 1);
                if position % 97 == 0 {
                    e.event_type = "Bad".into();
                }
                items.push(Item::Event(e));
            }
            items.push(Item::Commit {
                end_lsn: Lsn(1000 + txn as u64),
            });
        }
        let (tx, rx) = mpsc::channel(items.len());
        for item in items {
            tx.send(item).await.unwrap();
        }
        drop(tx);
        let (ack_tx, ack_rx) = watch::channel(Ack::default());
        let letters = Arc::new(Letters::default());
        Dispatcher::new(Arc::new(registry), letters.clone())
            .with_workers(3)
            .run(rx, ack_tx, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            *ack_rx.borrow(),
            Ack {
                lsn: Lsn(1049),
                position: 500
            }
        );
        let seen = gate.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 500);
        for a in 0..10 {
            let versions: Vec<i64> = seen
                .iter()
                .filter(|(id, _)| *id == format!("agg-{a}"))
                .map(|(_, v)| *v)
                .collect();
            assert_eq!(
                versions,
                (1..=50).collect::<Vec<_>>(),
                "agg-{a} out of order"
            );
        }
        let mut dead: Vec<i64> = letters
            .recorded
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.position)
            .collect();
        dead.sort();
        assert_eq!(dead, [97, 194, 291, 388, 485]);

        // A blocking handler's failure stops the dispatcher without acknowledging it.
        let mut registry = Registry::new();
        registry.register_with(
            "picky",
            [Filter::All],
            quick(1),
            OnFailure::Block,
            Arc::new(Arc::new(Picky::default())),
        );
        let (tx, rx) = mpsc::channel(8);
        for item in [
            Item::Event(event_of(1, "x", 1)),
            Item::Commit { end_lsn: Lsn(10) },
            Item::Event({
                let mut e = event_of(2, "y", 1);
                e.event_type = "Bad".into();
                e
            }),
            Item::Commit { end_lsn: Lsn(20) },
        ] {
            tx.send(item).await.unwrap();
        }
        drop(tx);
        let (ack_tx, ack_rx) = watch::channel(Ack::default());
        let result = Dispatcher::new(Arc::new(registry), Arc::new(Letters::default()))
            .with_workers(2)
            .run(rx, ack_tx, CancellationToken::new())
            .await;
        assert!(matches!(result, Err(Error::Handler { .. })), "{result:?}");
        assert!(ack_rx.borrow().lsn < Lsn(20));
    }

    #[tokio::test]
    async fn cancellation_stops_at_the_next_transaction_boundary() {
        let probe = Arc::new(Probe::default());
        let mut registry = Registry::new();
        registry.register("p", [Filter::All], quick(1), probe.clone());
        let cancel = CancellationToken::new();
        cancel.cancel();
        let items = vec![
            Item::Event(event(1, "A")),
            Item::Event(event(2, "A")),
            Item::Commit { end_lsn: Lsn(10) },
            Item::Event(event(3, "A")),
            Item::Commit { end_lsn: Lsn(20) },
        ];
        let (result, ack) = run_items(registry, items, cancel).await;
        result.unwrap();
        assert_eq!(
            ack.lsn,
            Lsn(10),
            "the in-flight transaction is finished and acknowledged"
        );
        assert_eq!(
            *probe.log.lock().unwrap(),
            ["handle 1", "handle 2", "flush"]
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let first = policy.backoff(1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let third = policy.backoff(3);
        assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
        assert!(policy.backoff(40) <= Duration::from_secs(1));
    }
}
