//! The dispatcher's tests: ordering, retries, dead letters, flush failures, workers, redrive
//! and shutdown, against in-memory handlers and a recording dead-letter sink.
use super::*;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::delivery::dead_letter::DeadLetter;
use crate::error::report;

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
