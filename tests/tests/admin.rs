//! End-to-end tests of the listener's admin HTTP server and slot-safety checks, scraped over
//! real HTTP: metrics after real events, the bearer token, `/health` across a terminated
//! walsender, and the retained-WAL warning of the binary (a slot invalidated by
//! `max_slot_wal_keep_size`: `tests/tests/slot_recovery.rs`).
//!
//! These tests own slots, so they run one at a time (nextest group `serial-cluster`). The binary
//! tests need
//! `cargo build -p listener` first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::admin_support::*;
use e2e::listener_support::*;
use e2e::TestDb;
use listener::config::Config;
use listener::{Event, Filter, Handler, HandlerError, Registry, RetryPolicy};
use serde_json::json;

/// How long a new slot may take to start streaming (it waits for running transactions).
const SLOT_WAIT: Duration = Duration::from_secs(120);
const SCRAPE_WAIT: Duration = Duration::from_secs(30);

/// Raises one event of each type in `types`, all in one transaction.
async fn raise(client: &tokio_postgres::Client, types: &[&str]) {
    let batch: Vec<_> = types
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"aggregate_type": "Loan", "aggregate_id": format!("loan-{i}"), "event_type": t, "payload": {"n": i}}))
        .collect();
    client
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&serde_json::Value::Array(batch)],
        )
        .await
        .expect("raise_events");
}

fn with_admin(mut config: Config, port: u16) -> Config {
    config.admin.listen = Some(format!("127.0.0.1:{port}"));
    config
}

/// Fails the first call for every event (transiently), then succeeds.
#[derive(Clone, Default)]
struct FailsOnce {
    seen: Arc<Mutex<HashSet<uuid::Uuid>>>,
}

#[async_trait::async_trait]
impl Handler for FailsOnce {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        if self.seen.lock().expect("lock").insert(event.id) {
            return Err(HandlerError::transient("first call fails"));
        }
        Ok(())
    }
}

/// Refuses every event for good.
struct Refuses;

#[async_trait::async_trait]
impl Handler for Refuses {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        Err(HandlerError::definite("refused"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_metrics_count_events_outcomes_and_stay_per_listener() {
    let db = TestDb::new().await;
    let other_db = TestDb::new().await;
    let (name, other_name) = (unique_name("adm"), unique_name("adm2"));
    let _guards = (SlotGuard(name.clone()), SlotGuard(other_name.clone()));
    let (port, other_port) = (free_port(), free_port());

    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    };
    let mut registry = Registry::new();
    registry.register("flaky", [Filter::All], retry, FailsOnce::default());
    registry.register(
        "refuses",
        ["Loan.Rejected".parse().expect("filter")],
        retry,
        Refuses,
    );
    let listener = InProcess::start_with(with_admin(config_for(&db, &name), port), registry);
    // A second listener in the same process, on another database: its metrics are its own.
    let other = InProcess::start(with_admin(config_for(&other_db, &other_name), other_port));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    wait_slot_active(&other_db.client, &other_name, SLOT_WAIT).await;

    raise(&db.client, &["Loan.Funded", "Loan.Funded"]).await;
    raise(&db.client, &["Loan.Funded", "Loan.Rejected"]).await;
    raise(&other_db.client, &["Loan.Funded"]).await;

    let funded = [("event_type", "Loan.Funded")];
    let text = wait_samples(
        port,
        None,
        &[
            ("pg_domain_events_events_received_total", &funded, 3.0),
            (
                "pg_domain_events_events_received_total",
                &[("event_type", "Loan.Rejected")],
                1.0,
            ),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "collector"), ("outcome", "ok")],
                4.0,
            ),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "flaky"), ("outcome", "ok")],
                4.0,
            ),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "flaky"), ("outcome", "retried")],
                4.0,
            ),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "flaky"), ("outcome", "dead_lettered")],
                0.0,
            ),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "refuses"), ("outcome", "dead_lettered")],
                1.0,
            ),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "refuses"), ("outcome", "ok")],
                0.0,
            ),
            (
                "pg_domain_events_dead_letters_total",
                &[("handler", "refuses")],
                1.0,
            ),
            (
                "pg_domain_events_dead_letters_total",
                &[("handler", "flaky")],
                0.0,
            ),
            // Every call is timed: two per event for the flaky handler.
            (
                "pg_domain_events_handler_duration_seconds_count",
                &[("handler", "flaky")],
                8.0,
            ),
            (
                "pg_domain_events_handler_duration_seconds_count",
                &[("handler", "collector")],
                4.0,
            ),
            ("pg_domain_events_reconnects_total", &[], 0.0),
            // Every failed call, by why: the flaky handler's first calls, the refusal.
            (
                "pg_domain_events_handler_errors_total",
                &[("handler", "flaky"), ("error_type", "transient")],
                4.0,
            ),
            (
                "pg_domain_events_handler_errors_total",
                &[("handler", "refuses"), ("error_type", "definite")],
                1.0,
            ),
        ],
        SCRAPE_WAIT,
    )
    .await;
    assert!(
        text.contains("# TYPE pg_domain_events_handler_duration_seconds histogram"),
        "{text}"
    );
    // Explicit buckets, cumulative: a 30 s bucket holds every call.
    assert_eq!(
        sample(
            &text,
            "pg_domain_events_handler_duration_seconds_bucket",
            &[("handler", "flaky"), ("le", "30")]
        ),
        Some(8.0),
        "{text}"
    );
    let lag = sample(
        &text,
        "pg_domain_events_handler_lag_seconds",
        &[("handler", "collector")],
    )
    .expect("pg_domain_events_handler_lag_seconds");
    assert!((0.0..60.0).contains(&lag), "handler lag {lag}");
    let confirmed =
        sample(&text, "pg_domain_events_transactions_confirmed_total", &[]).expect("confirmed");
    assert!(confirmed >= 2.0, "transactions confirmed {confirmed}");
    assert!(
        sample(&text, "pg_domain_events_replication_lag_bytes", &[]).is_some(),
        "{text}"
    );
    // Only the two event types seen, no id anywhere in a label.
    assert!(!text.contains("loan-"), "{text}");

    let other_text = wait_samples(
        other_port,
        None,
        &[
            ("pg_domain_events_events_received_total", &funded, 1.0),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "collector"), ("outcome", "ok")],
                1.0,
            ),
        ],
        SCRAPE_WAIT,
    )
    .await;
    assert!(!other_text.contains("flaky"), "{other_text}");
    assert_eq!(
        sample(
            &other_text,
            "pg_domain_events_events_received_total",
            &[("event_type", "Loan.Rejected")]
        ),
        None
    );

    listener.stop().await.expect("clean stop");
    other.stop().await.expect("clean stop");
    // The server stops with the listener.
    assert!(get(port, "/health", None).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_follows_the_replication_session() {
    let db = TestDb::new().await;
    let name = unique_name("admh");
    let _guard = SlotGuard(name.clone());
    let port = free_port();
    let mut config = with_admin(config_for(&db, &name), port);
    // Long enough to observe the reconnect backoff (jitter makes it 1.5-3 s).
    config.replication.reconnect_min_backoff_ms = 3000;
    config.replication.reconnect_max_backoff_ms = 3000;

    // Creating a slot waits for running transactions: hold one open so that the listener is
    // certainly not streaming yet.
    let blocker = db.connect().await;
    blocker
        .batch_execute("BEGIN; SELECT pg_catalog.txid_current();")
        .await
        .expect("open a transaction");
    let listener = InProcess::start(config);
    let (status, body) = wait_get(port, "/health", None, SCRAPE_WAIT).await;
    assert_eq!((status, body.as_str()), (503, "starting\n"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(port, "/health", None).await,
        Some((503, "starting\n".to_string()))
    );
    blocker.batch_execute("COMMIT").await.expect("commit");

    assert_eq!(wait_health(port, None, 200, SLOT_WAIT).await, "streaming\n");
    raise(&db.client, &["Loan.Funded"]).await;
    listener.collector.wait_for(1, SCRAPE_WAIT).await;

    // The database goes away: the walsender is terminated, the listener backs off.
    let terminated: bool = db
        .client
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("terminate the walsender")
        .get(0);
    assert!(terminated);
    let body = wait_health(port, None, 503, Duration::from_secs(2)).await;
    assert!(body.starts_with("reconnecting: "), "{body}");
    assert_eq!(wait_health(port, None, 200, SLOT_WAIT).await, "streaming\n");
    // One reconnect, or more if the old walsender still held the slot for a moment.
    let (_, text) = wait_get(port, "/metrics", None, SCRAPE_WAIT).await;
    let reconnects = sample(&text, "pg_domain_events_reconnects_total", &[])
        .expect("pg_domain_events_reconnects_total");
    assert!(reconnects >= 1.0, "{text}");

    // And streams again.
    raise(&db.client, &["Loan.Funded"]).await;
    listener.collector.wait_for(2, SCRAPE_WAIT).await;
    listener.stop().await.expect("clean stop");
}

/// The binary: bearer token, the retained-WAL warning, and the gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_binary_token_and_slot_wal_warning() {
    let db = TestDb::new().await;
    let name = unique_name("admb");
    let _guard = SlotGuard(name.clone());
    let port = free_port();
    let mut config = with_admin(config_for(&db, &name), port);
    config.admin.token_env = Some("PGDE_TEST_METRICS_TOKEN".into());
    config.replication.slot_wal_warning_bytes = 1;
    config.replication.status_interval_secs = 1;
    config.replication.server_timeout_secs = 10;
    let file = write_config(&config);
    let token = "s3cret-token";
    let mut child = ListenerProcess::spawn(&file, &[("PGDE_TEST_METRICS_TOKEN", token)]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    // Without, or with a wrong token: 401 on both endpoints.
    for path in ["/health", "/metrics"] {
        let (status, _) = wait_get(port, path, None, SCRAPE_WAIT).await;
        assert_eq!(status, 401, "{path} without a token");
        let (status, _) = wait_get(port, path, Some("s3cret-tokem"), SCRAPE_WAIT).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = wait_get(port, path, Some("s3cret-token-and-more"), SCRAPE_WAIT).await;
        assert_eq!(status, 401, "{path} with a longer token");
    }
    assert_eq!(
        wait_health(port, Some(token), 200, SLOT_WAIT).await,
        "streaming\n"
    );

    // Some WAL behind the slot, and events through it.
    db.client
        .batch_execute(
            "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
        )
        .await
        .expect("generate WAL");
    raise(&db.client, &["Loan.Funded", "Loan.Funded"]).await;
    child.wait_lines(2, SCRAPE_WAIT).await;
    let text = wait_samples(
        port,
        Some(token),
        &[(
            "pg_domain_events_events_received_total",
            &[("event_type", "Loan.Funded")],
            2.0,
        )],
        SCRAPE_WAIT,
    )
    .await;
    assert!(
        text.contains("pg_domain_events_events_handled_total{handler=\"stdout\",outcome=\"ok\"} 2"),
        "{text}"
    );

    // The check runs every status interval: the gauge and the warning follow.
    let deadline = std::time::Instant::now() + SCRAPE_WAIT;
    loop {
        let (_, text) = wait_get(port, "/metrics", Some(token), SCRAPE_WAIT).await;
        let retained =
            sample(&text, "pg_domain_events_slot_retained_wal_bytes", &[]).unwrap_or(0.0);
        let warned = child.stderr().contains(
            "the replication slot retains more WAL than replication.slot_wal_warning_bytes",
        );
        if retained > 0.0 && warned {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retained {retained}, warned {warned}; logs:\n{}",
            child.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Rate-limited: one warning per minute at most.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        child
            .stderr()
            .matches("retains more WAL than replication.slot_wal_warning_bytes")
            .count(),
        1,
        "{}",
        child.stderr()
    );

    child.stop_ok().await;
}
