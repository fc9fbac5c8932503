//! End-to-end tests of the listener's metrics against a real cluster, scraped over real HTTP:
//! the handler lag while a handler is stalled, handler errors by `error_type`, and the
//! extension's raise-side figures exported with the listener's.
//!
//! These tests own slots, so they run one at a time (nextest group `serial-cluster`).

use std::time::Duration;

use e2e::admin_support::*;
use e2e::listener_support::*;
use e2e::TestDb;
use listener::{Event, Filter, Handler, HandlerError, Registry, RetryPolicy};
use serde_json::json;
use tokio::sync::watch;

/// How long a new slot may take to start streaming (it waits for running transactions).
const SLOT_WAIT: Duration = Duration::from_secs(120);
const SCRAPE_WAIT: Duration = Duration::from_secs(30);
const LAG: &str = "pg_domain_events_handler_lag_seconds";

/// Holds every event until released.
struct Stalls {
    released: watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl Handler for Stalls {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        let mut released = self.released.clone();
        released
            .wait_for(|r| *r)
            .await
            .map_err(|_| HandlerError::transient("the test ended"))?;
        Ok(())
    }
}

/// Panics on every event.
struct Panics;

#[async_trait::async_trait]
impl Handler for Panics {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        panic!("a handler bug");
    }
}

async fn raise(client: &tokio_postgres::Client, event_type: &str) {
    client
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&json!([{"aggregate_type": "Loan", "aggregate_id": "loan-1",
                        "event_type": event_type, "payload": {}}])],
        )
        .await
        .expect("raise_events");
}

async fn lag_of(port: u16, handler: &str) -> f64 {
    let (status, text) = wait_get(port, "/metrics", None, SCRAPE_WAIT).await;
    assert_eq!(status, 200, "{text}");
    sample(&text, LAG, &[("handler", handler)]).unwrap_or_else(|| panic!("no {LAG}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_lag_grows_while_a_handler_is_stalled_and_panics_count_as_errors() {
    let db = TestDb::new().await;
    let name = unique_name("met");
    let _guard = SlotGuard(name.clone());
    let port = free_port();
    let (release, released) = watch::channel(false);
    let retry = RetryPolicy {
        max_attempts: 1,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
    };
    let mut registry = Registry::new();
    registry.register(
        "stalls",
        ["Loan.Stalled".parse().expect("filter")],
        retry,
        Stalls { released },
    );
    registry.register("panics", [Filter::All], retry, Panics);
    let mut config = config_for(&db, &name);
    config.admin.listen = Some(format!("127.0.0.1:{port}"));
    // The raise-side figures are read at this period.
    config.replication.status_interval_secs = 1;
    let listener = InProcess::start_with(config, registry);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    // A panic is a failure of its own type, dead-lettered.
    raise(&db.client, "Loan.Funded").await;
    wait_samples(
        port,
        None,
        &[
            (
                "pg_domain_events_handler_errors_total",
                &[("handler", "panics"), ("error_type", "panic")],
                1.0,
            ),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "panics"), ("outcome", "dead_lettered")],
                1.0,
            ),
            (LAG, &[("handler", "stalls")], 0.0),
        ],
        SCRAPE_WAIT,
    )
    .await;

    // Stalled: the lag is the age of the event it holds, growing between scrapes.
    raise(&db.client, "Loan.Stalled").await;
    let deadline = std::time::Instant::now() + SCRAPE_WAIT;
    let first = loop {
        let lag = lag_of(port, "stalls").await;
        if lag >= 1.0 {
            break lag;
        }
        assert!(std::time::Instant::now() < deadline, "lag stays at {lag}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = lag_of(port, "stalls").await;
    assert!(
        second >= first + 1.0,
        "the lag of a stalled handler grows: {first} then {second}"
    );

    // Released and flushed: nothing waits, the lag is 0 again.
    release.send(true).expect("release");
    wait_samples(
        port,
        None,
        &[
            (LAG, &[("handler", "stalls")], 0.0),
            (
                "pg_domain_events_events_handled_total",
                &[("handler", "stalls"), ("outcome", "ok")],
                1.0,
            ),
        ],
        SCRAPE_WAIT,
    )
    .await;

    // The extension's figures, read from the database: counted with preloading, zero without.
    let preloaded: String = db
        .client
        .query_one("SHOW shared_preload_libraries", &[])
        .await
        .expect("show")
        .get(0);
    let (raised, stored) = if preloaded.contains("pg_domain_events") {
        (Some(1.0), 2.0)
    } else {
        (None, 0.0)
    };
    let text = wait_samples(
        port,
        None,
        &[
            (
                "pg_domain_events_events_stored_duration_seconds_count",
                &[],
                stored,
            ),
            (
                "pg_domain_events_events_stored_duration_seconds_bucket",
                &[("le", "+Inf")],
                stored,
            ),
        ],
        SCRAPE_WAIT,
    )
    .await;
    for event_type in ["Loan.Funded", "Loan.Stalled"] {
        let labels = [("aggregate_type", "Loan"), ("event_type", event_type)];
        assert_eq!(
            sample(&text, "pg_domain_events_events_raised_total", &labels),
            raised,
            "{text}"
        );
    }
    assert!(
        text.contains("# TYPE pg_domain_events_events_raised_total counter"),
        "{text}"
    );
    listener.stop().await.expect("clean stop");
}
