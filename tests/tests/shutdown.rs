//! SIGTERM drains: the `listener` binary, signalled while a transaction is in flight, receives
//! it up to its commit, lets the handler finish it (retries included), confirms it and exits 0,
//! within `replication.shutdown_timeout_secs`. A real slot, a real HTTP receiver as the handler.

use std::time::{Duration, Instant};

use e2e::listener_support::*;
use e2e::sink_support::*;
use e2e::TestDb;
use listener::config::{Config, HandlerConfig};
use listener::Lsn;
use serde_json::json;
use uuid::Uuid;

const SLOT_WAIT: Duration = Duration::from_secs(120);

fn webhook(receiver: &Receiver, max_attempts: u32, backoff_ms: u64) -> HandlerConfig {
    HandlerConfig {
        initial_backoff_ms: backoff_ms,
        max_backoff_ms: backoff_ms,
        ..handler(
            listener::sink::WebhookConfig {
                timeout_ms: Some(5000),
                ..listener::sink::WebhookConfig::new(receiver.url())
            },
            "hook",
            max_attempts,
        )
    }
}

/// Raises `n` events of one aggregate in one transaction; returns their ids and the WAL insert
/// position read inside the transaction, before its commit: a slot that confirmed past it
/// confirmed the transaction.
async fn raise_in_one_transaction(db: &TestDb, n: usize) -> (Vec<Uuid>, Lsn) {
    let mut client = db.connect().await;
    let txn = client.transaction().await.expect("begin");
    let batch: Vec<_> = (0..n)
        .map(|i| json!({"aggregate_type": "Loan", "aggregate_id": "L-1", "event_type": "Loan.Changed", "payload": {"i": i}}))
        .collect();
    let ids = raise_batch(&txn, &serde_json::Value::Array(batch)).await;
    let before_commit: String = txn
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("wal position")
        .get(0);
    txn.commit().await.expect("commit");
    (ids, before_commit.parse().expect("lsn"))
}

async fn start(db: &TestDb, name: &str, configure: impl FnOnce(&mut Config)) -> ListenerProcess {
    let mut config = config_for(db, name);
    configure(&mut config);
    let file = write_config(&config);
    let process = ListenerProcess::spawn(&file, &[]);
    wait_slot_active(&db.connect().await, name, SLOT_WAIT).await;
    // The config file may go: the listener has read it.
    drop(file);
    process
}

/// SIGTERM, then the exit status and how long the exit took (at most 30 s).
async fn terminate_and_wait(process: &mut ListenerProcess) -> (std::process::ExitStatus, Duration) {
    let signalled = Instant::now();
    process.terminate();
    let status = process
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits within 30 s of SIGTERM");
    (status, signalled.elapsed())
}

async fn wait_requests(receiver: &Receiver, n: usize, process: &ListenerProcess) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.requests().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} requests; logs:\n{}",
            receiver.requests().len(),
            process.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_a_transaction_whose_commit_arrives_after_the_signal() {
    let db = TestDb::new().await;
    let name = unique_name("drain");
    let _slot = SlotGuard(name.clone());
    // 20 ms per event and a queue of 8: the stream is blocked inside the transaction, its
    // commit not yet read, while the handler works through it.
    let receiver = Receiver::start(None, |_, _| (200, Duration::from_millis(20))).await;
    let mut process = start(&db, &name, |c| {
        c.replication.queue_capacity = 8;
        c.handlers = vec![webhook(&receiver, 3, 10)];
    })
    .await;

    let (ids, before_commit) = raise_in_one_transaction(&db, 150).await;
    wait_requests(&receiver, 5, &process).await;
    let (status, _) = terminate_and_wait(&mut process).await;
    assert!(
        status.success(),
        "exit {status}; logs:\n{}",
        process.stderr()
    );

    // Every event of the transaction was handled, once, and the transaction confirmed.
    receiver.wait_delivered(&ids, Duration::from_secs(1)).await;
    assert_eq!(receiver.requests().len(), ids.len(), "each event once");
    let confirmed = confirmed_after_exit(&db.connect().await, &name).await;
    assert!(
        confirmed > before_commit,
        "confirmed {confirmed}, not past the transaction (inserted up to {before_commit})"
    );
    assert!(
        process
            .stderr()
            .contains("receiving the rest of the transaction in flight"),
        "the signal came inside the transaction; logs:\n{}",
        process.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_retry_backoff_finishes_the_retries() {
    let db = TestDb::new().await;
    let name = unique_name("drainretry");
    let _slot = SlotGuard(name.clone());
    // The first three attempts fail; each retry waits 1 s.
    let receiver = Receiver::start(None, |_, attempt| {
        (if attempt <= 3 { 503 } else { 200 }, Duration::ZERO)
    })
    .await;
    let mut process = start(&db, &name, |c| {
        c.handlers = vec![webhook(&receiver, 10, 1000)]
    })
    .await;

    let (ids, before_commit) = raise_in_one_transaction(&db, 1).await;
    wait_requests(&receiver, 1, &process).await;
    // Inside the first backoff.
    let (status, _) = terminate_and_wait(&mut process).await;
    assert!(
        status.success(),
        "exit {status}; logs:\n{}",
        process.stderr()
    );
    assert_eq!(
        receiver.attempts(ids[0]),
        4,
        "retried to success after the signal"
    );
    receiver.wait_delivered(&ids, Duration::from_secs(1)).await;
    let confirmed = confirmed_after_exit(&db.connect().await, &name).await;
    assert!(
        confirmed > before_commit,
        "confirmed {confirmed}, not past the transaction (inserted up to {before_commit})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_timeout_bounds_the_drain_and_the_rest_is_delivered_on_restart() {
    let db = TestDb::new().await;
    let name = unique_name("draintimeout");
    let _slot = SlotGuard(name.clone());
    // Failing for the first 6 attempts (500 ms apart): longer than the 1 s shutdown timeout.
    let receiver = Receiver::start(None, |_, attempt| {
        (if attempt <= 6 { 503 } else { 200 }, Duration::ZERO)
    })
    .await;
    let configure = |c: &mut Config| {
        c.replication.shutdown_timeout_secs = 1;
        c.handlers = vec![webhook(&receiver, 20, 500)];
    };
    let mut process = start(&db, &name, configure).await;

    let (ids, before_commit) = raise_in_one_transaction(&db, 1).await;
    wait_requests(&receiver, 1, &process).await;
    let (status, took) = terminate_and_wait(&mut process).await;
    assert!(
        status.success(),
        "exit {status}; logs:\n{}",
        process.stderr()
    );
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} with a 1 s shutdown timeout"
    );
    assert!(
        process.stderr().contains("the shutdown timeout passed"),
        "logs:\n{}",
        process.stderr()
    );
    assert!(receiver.delivered().is_empty());
    let confirmed = confirmed_after_exit(&db.connect().await, &name).await;
    assert!(
        confirmed < before_commit,
        "an abandoned transaction must not be confirmed: {confirmed}"
    );

    // Delivered again by the next run.
    let mut process = start(&db, &name, configure).await;
    receiver.wait_delivered(&ids, Duration::from_secs(30)).await;
    process.stop_ok().await;
}
