//! Handlers, the registry that routes events to them, and the dispatcher that runs them in commit
//! order and acknowledges each transaction once all of its events were handled.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Retry};
use crate::event::Event;
use crate::lsn::Lsn;

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
///   `max_attempts`; a definite error, or running out of attempts, stops the listener without
///   acknowledging the transaction.
/// - Implementations must be `Send + Sync`: future versions may call them concurrently for
///   different aggregates (never concurrently for one aggregate).
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

/// A handler's failure, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    retry: Retry,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    /// A failure that may go away (a timeout, an unavailable downstream): retried with backoff.
    pub fn transient(message: impl Into<String>) -> HandlerError {
        HandlerError {
            retry: Retry::Transient,
            message: message.into(),
            source: None,
        }
    }

    /// A failure that retrying cannot cure (the event is invalid for this handler).
    pub fn definite(message: impl Into<String>) -> HandlerError {
        HandlerError {
            retry: Retry::Definite,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> HandlerError {
        self.source = Some(source.into());
        self
    }

    /// Whether the dispatcher may retry.
    pub fn is_transient(&self) -> bool {
        self.retry == Retry::Transient
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

struct Registration {
    name: String,
    filters: Vec<Filter>,
    handler: Arc<dyn Handler>,
    retry: RetryPolicy,
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
        self.entries.push(Registration {
            name: name.into(),
            filters: filters.into_iter().collect(),
            handler,
            retry: RetryPolicy {
                max_attempts: retry.max_attempts.max(1),
                ..retry
            },
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
    /// The current transaction committed at `end_lsn`; acknowledge it once handled.
    Commit {
        /// End of the commit record: the position to confirm.
        end_lsn: Lsn,
    },
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

/// Runs the handlers over a stream of [`Item`]s.
pub struct Dispatcher {
    registry: Arc<Registry>,
    touched: Vec<bool>,
    position: i64,
}

impl Dispatcher {
    /// A dispatcher over `registry`.
    pub fn new(registry: Arc<Registry>) -> Dispatcher {
        let touched = vec![false; registry.entries.len()];
        Dispatcher {
            registry,
            touched,
            position: 0,
        }
    }

    /// Handles items until the channel closes, or until `cancel` fires (at the next transaction
    /// boundary, or during a retry backoff). Publishes progress on `acks`.
    pub async fn run(
        mut self,
        mut items: mpsc::Receiver<Item>,
        acks: watch::Sender<Ack>,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        while let Some(item) = items.recv().await {
            match item {
                Item::Event(event) => {
                    if let Outcome::Cancelled = self.dispatch(&event, &cancel).await? {
                        return Ok(());
                    }
                }
                Item::Commit { end_lsn } => {
                    if let Outcome::Cancelled = self.flush(&cancel).await? {
                        return Ok(());
                    }
                    let position = self.position;
                    acks.send_modify(|ack| {
                        // Acknowledgements only move forward, even if a reconnect replays.
                        if end_lsn > ack.lsn {
                            ack.lsn = end_lsn;
                        }
                        ack.position = ack.position.max(position);
                    });
                    if cancel.is_cancelled() {
                        debug!(lsn = %end_lsn, "stopping the dispatcher at a transaction boundary");
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    async fn dispatch(
        &mut self,
        event: &Event,
        cancel: &CancellationToken,
    ) -> Result<Outcome, Error> {
        self.position = self.position.max(event.position);
        let registry = Arc::clone(&self.registry);
        for (index, entry) in registry.entries.iter().enumerate() {
            if !entry.filters.iter().any(|f| f.matches(&event.event_type)) {
                continue;
            }
            self.touched[index] = true;
            let mut attempt = 1;
            loop {
                match entry.handler.handle(event).await {
                    Ok(()) => break,
                    Err(err) => {
                        if !err.is_transient() || attempt >= entry.retry.max_attempts {
                            return Err(Error::Handler {
                                handler: entry.name.clone(),
                                event_id: Some(event.id),
                                attempts: attempt,
                                source: err,
                            });
                        }
                        let delay = entry.retry.backoff(attempt);
                        warn!(
                            handler = %entry.name,
                            event_id = %event.id,
                            event_type = %event.event_type,
                            attempt,
                            retry_in_ms = delay.as_millis() as u64,
                            error = %err,
                            "handler failed, retrying"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = cancel.cancelled() => return Ok(Outcome::Cancelled),
                        }
                        attempt += 1;
                    }
                }
            }
        }
        Ok(Outcome::Done)
    }

    async fn flush(&mut self, cancel: &CancellationToken) -> Result<Outcome, Error> {
        let registry = Arc::clone(&self.registry);
        for (index, entry) in registry.entries.iter().enumerate() {
            if !std::mem::take(&mut self.touched[index]) {
                continue;
            }
            let mut attempt = 1;
            loop {
                match entry.handler.flush().await {
                    Ok(()) => break,
                    Err(err) => {
                        if !err.is_transient() || attempt >= entry.retry.max_attempts {
                            return Err(Error::Handler {
                                handler: entry.name.clone(),
                                event_id: None,
                                attempts: attempt,
                                source: err,
                            });
                        }
                        let delay = entry.retry.backoff(attempt);
                        warn!(handler = %entry.name, attempt, error = %err, "handler flush failed, retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = cancel.cancelled() => return Ok(Outcome::Cancelled),
                        }
                        attempt += 1;
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

    async fn run_items(
        registry: Registry,
        items: Vec<Item>,
        cancel: CancellationToken,
    ) -> (Result<(), Error>, Ack) {
        let (tx, rx) = mpsc::channel(items.len().max(1));
        for item in items {
            tx.send(item).await.unwrap();
        }
        drop(tx);
        let (ack_tx, ack_rx) = watch::channel(Ack::default());
        let result = Dispatcher::new(Arc::new(registry))
            .run(rx, ack_tx, cancel)
            .await;
        let ack = *ack_rx.borrow();
        (result, ack)
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
    async fn exhausted_or_definite_failures_stop_without_acknowledging() {
        for (definite, max_attempts, expected_attempts) in [(false, 3, 3), (true, 3, 1)] {
            let probe = Arc::new(Probe {
                definite,
                ..Probe::default()
            });
            probe
                .fail_first
                .store(10, std::sync::atomic::Ordering::SeqCst);
            let mut registry = Registry::new();
            registry.register("p", [Filter::All], quick(max_attempts), probe.clone());
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
