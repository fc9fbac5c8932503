//! End-to-end tests of `domain_events.outbox()` against a running listener, in replication and
//! notify mode: an entry is pending from its commit until the listener handled it, and a long
//! transaction that took a low position stays pending after a higher position was delivered.

use std::time::{Duration, Instant};

use e2e::listener_support::*;
use e2e::TestDb;
use listener::config::{Config, Mode};
use uuid::Uuid;

/// `(position, status)` of every entry `outbox(name, status)` lists.
async fn outbox(db: &TestDb, name: &str, status: &str) -> Vec<(i64, String)> {
    db.client
        .query(
            "SELECT position, entry_status FROM domain_events.outbox($1, $2, 10000)",
            &[&name, &status],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The status of the event at `position`, per `outbox(name, 'all')`.
async fn status_of(db: &TestDb, name: &str, position: i64) -> Option<String> {
    outbox(db, name, "all")
        .await
        .into_iter()
        .find(|(p, _)| *p == position)
        .map(|(_, s)| s)
}

/// Waits until the event at `position` has `status`; panics after a minute.
async fn wait_status(db: &TestDb, name: &str, position: i64, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = status_of(db, name, position).await;
        if got.as_deref() == Some(status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "position {position} is {got:?}, not {status}, after a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Raises one event of aggregate `id` through `client`; returns its position.
async fn raise(client: &impl tokio_postgres::GenericClient, id: &str) -> (Uuid, i64) {
    let row = client
        .query_one(
            "SELECT id FROM domain_events.raise_event('Loan', $1::text, 'Loan.Funded', '{\"amount\": 1}')",
            &[&id],
        )
        .await
        .expect("raise_event");
    let event_id: Uuid = row.get(0);
    let position = client
        .query_one(
            "SELECT position FROM domain_events.event WHERE id = $1",
            &[&event_id],
        )
        .await
        .expect("position")
        .get(0);
    (event_id, position)
}

/// Waits until the subscription row exists (the listener delivers what commits from then on).
async fn wait_row(db: &TestDb, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while db
        .client
        .query_opt(
            "SELECT 1 FROM domain_events.subscription WHERE name = $1",
            &[&name],
        )
        .await
        .expect("subscription row")
        .is_none()
    {
        assert!(Instant::now() < deadline, "the listener did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn started(db: &TestDb, config: &Config, name: &str) -> InProcess {
    let listener = InProcess::start(config.clone());
    wait_row(db, name).await;
    if config.replication.mode == Mode::Replication {
        wait_slot_active(&db.client, name, Duration::from_secs(60)).await;
    }
    listener
}

/// A long transaction takes a low position and commits only after a later transaction was
/// delivered (and the listener stopped): it is pending, the later one delivered, until a
/// listener handles it.
async fn a_long_transaction_stays_pending_until_delivered(config: Config, name: &str, db: &TestDb) {
    let listener = started(db, &config, name).await;

    let mut long = db.connect().await;
    let long_tx = long.transaction().await.expect("BEGIN");
    let (_, low) = raise(&long_tx, "long").await;
    let (_, high) = raise(&db.client, "short").await;
    assert!(low < high);
    listener
        .collector
        .wait_for(1, Duration::from_secs(60))
        .await;
    wait_status(db, name, high, "delivered").await;
    assert_eq!(outbox(db, name, "pending").await, vec![]);
    listener.stop().await.expect("listener stops cleanly");

    long_tx.commit().await.expect("COMMIT");
    if config.replication.mode == Mode::Replication {
        // The row's high-water mark is past the long transaction's position: comparing
        // positions would call it delivered.
        let position: i64 = db
            .client
            .query_one(
                "SELECT position FROM domain_events.subscription WHERE name = $1",
                &[&name],
            )
            .await
            .expect("subscription position")
            .get(0);
        assert!(
            position >= high,
            "the row's position {position} is past the long transaction's {low}"
        );
    }
    assert_eq!(
        outbox(db, name, "pending").await,
        vec![(low, "pending".to_string())]
    );
    assert_eq!(
        outbox(db, name, "delivered").await,
        vec![(high, "delivered".to_string())]
    );

    let listener = started(db, &config, name).await;
    listener
        .collector
        .wait_for(1, Duration::from_secs(60))
        .await;
    wait_status(db, name, low, "delivered").await;
    assert_eq!(outbox(db, name, "pending").await, vec![]);
    listener.stop().await.expect("listener stops cleanly");
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_mode_pending_is_exact_for_a_long_transaction() {
    let db = TestDb::new().await;
    let name = unique_name("outbox");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    // Delivered snapshots are promoted as confirmed positions pass them: heartbeats keep the
    // confirmed position moving when no event follows.
    config.replication.heartbeat_interval_secs = 1;
    a_long_transaction_stays_pending_until_delivered(config, &name, &db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_mode_pending_is_exact_for_a_long_transaction() {
    let db = TestDb::new().await;
    let name = unique_name("outbox");
    let mut config = config_for(&db, &name);
    config.replication.mode = Mode::Notify;
    config.replication.poll_interval_ms = 100;
    a_long_transaction_stays_pending_until_delivered(config, &name, &db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_lettered_entries_name_their_handler_and_error() {
    let db = TestDb::new().await;
    let name = unique_name("outbox");
    let mut config = config_for(&db, &name);
    config.replication.mode = Mode::Notify;
    config.replication.poll_interval_ms = 100;
    let mut registry = listener::Registry::new();
    registry.register(
        "refuser",
        [listener::Filter::All],
        listener::RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        },
        Refuser,
    );
    let listener = InProcess::start_with(config, registry);
    wait_row(&db, &name).await;
    let (id, position) = raise(&db.client, "7").await;
    listener
        .collector
        .wait_for(1, Duration::from_secs(60))
        .await;
    wait_status(&db, &name, position, "dead_lettered").await;
    let row = db
        .client
        .query_one(
            "SELECT id, handler, last_error, attempts FROM domain_events.outbox($1, 'dead_lettered')",
            &[&name],
        )
        .await
        .expect("dead-lettered entry");
    assert_eq!(row.get::<_, Uuid>(0), id);
    assert_eq!(row.get::<_, String>(1), "refuser");
    assert!(row.get::<_, String>(2).contains("refused on purpose"));
    assert_eq!(row.get::<_, i32>(3), 2);
    listener.stop().await.expect("listener stops cleanly");
}

/// Fails every event (transiently, so it is retried up to max_attempts).
struct Refuser;

#[async_trait::async_trait]
impl listener::Handler for Refuser {
    async fn handle(&self, _event: &listener::Event) -> Result<(), listener::HandlerError> {
        Err(listener::HandlerError::transient("refused on purpose"))
    }
}
