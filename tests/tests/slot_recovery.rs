//! A lost slot without a gap: the slot is invalidated by `max_slot_wal_keep_size` while a
//! transaction holds a position lower than events already delivered and commits only after the
//! loss. Positions are taken at insert, so "replay from the last position" would skip it; the
//! recovery from the delivered snapshot delivers it. Each test runs on a private cluster (a
//! 1 MB `max_slot_wal_keep_size` would invalidate the shared cluster's slots).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use e2e::cluster_support::{invalidate_slot, PrivateCluster, StartReplicationHold};
use e2e::listener_support::{
    run_cli, slot_active_pid, stored_event_ids, unique_name, wait_slot_active, write_config,
    InProcess, ListenerProcess,
};
use e2e::sink_support::raise;
use listener::config::SlotLostPolicy;
use tokio_postgres::Client;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Waits until the subscription's delivered snapshot shows every event stored now: the
/// boundary moved past them while streaming.
async fn wait_boundary_past_everything(client: &Client, name: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let covered: Option<bool> = client
            .query_one(
                "SELECT bool_and(pg_visible_in_snapshot(e.txid, s.delivered_snapshot)) \
                 FROM domain_events.event e, domain_events.subscription s WHERE s.name = $1",
                &[&name],
            )
            .await
            .expect("read the delivered snapshot")
            .get(0);
        if covered == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the delivered snapshot never moved past the delivered events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a transaction on its own connection that raises one event and stays open; returns
/// the connection, the event's id and its position.
async fn hold_open_transaction(dsn: &str) -> (Client, Uuid, i64) {
    let long = e2e::connect(dsn).await;
    long.batch_execute("BEGIN").await.expect("BEGIN");
    let row = long
        .query_one(
            "SELECT id, position FROM domain_events.raise_event('Loan', 'held', 'Loan.Held')",
            &[],
        )
        .await
        .expect("raise in the open transaction");
    (long, row.get(0), row.get(1))
}

/// Raises three events, one transaction each; returns their ids.
async fn raise_three(client: &Client, prefix: &str) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = format!("{prefix}-{n}");
        ids.extend(raise(client, &[("Loan", id.as_str(), "Loan.Funded")]).await);
    }
    ids
}

async fn max_position(client: &Client) -> i64 {
    client
        .query_one("SELECT max(position) FROM domain_events.event", &[])
        .await
        .expect("max position")
        .get(0)
}

/// The subscription row is streaming again: not recovering, with a confirmed LSN and a
/// delivered snapshot.
async fn assert_row_streaming(client: &Client, name: &str) {
    let row = client
        .query_one(
            "SELECT recovering, lsn IS NOT NULL, \
                    (SELECT delivered_snapshot IS NOT NULL FROM domain_events.subscription \
                      WHERE name = $1), slot_wal_status \
             FROM domain_events.subscription_lag WHERE name = $1",
            &[&name],
        )
        .await
        .expect("subscription_lag row");
    let (recovering, confirmed, bounded, wal_status): (bool, bool, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert!(
        !recovering && confirmed && bounded,
        "{recovering} {confirmed} {bounded}"
    );
    assert_ne!(
        wal_status.as_deref(),
        Some("lost"),
        "a new slot replaced the lost one"
    );
}

/// The slot is lost while the listener streams (the walsender is terminated at the
/// invalidation); the listener recovers by itself and streams from a new slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_slot_while_streaming_is_recovered_without_a_gap() {
    let cluster = PrivateCluster::start("recover");
    cluster.create_database("rec").await;
    let dsn = cluster.dsn("rec");
    let client = e2e::connect(&dsn).await;
    let name = unique_name("recover");
    let mut config = cluster.listener_config("rec", &name);
    config.replication.poll_interval_ms = 100;
    config.replication.status_interval_secs = 1;
    // Heartbeats are transactions of the stream: they move the delivered snapshot on while no
    // event is written (without them it waits for the next event).
    config.replication.heartbeat_interval_secs = 1;
    let port = e2e::admin_support::free_port();
    config.admin.listen = Some(format!("127.0.0.1:{port}"));
    let listener = InProcess::start(config);
    wait_slot_active(&client, &name, WAIT).await;
    assert_eq!(slot_recoveries(port).await, 0.0);

    let first = raise_three(&client, "first").await;
    listener.collector.wait_for(first.len(), WAIT).await;
    wait_boundary_past_everything(&client, &name).await;

    // A transaction takes a position, stays open; later ones commit and are streamed.
    let (long, held, held_position) = hold_open_transaction(&dsn).await;
    let during = raise_three(&client, "during").await;
    listener
        .collector
        .wait_for(first.len() + during.len(), WAIT)
        .await;
    assert!(
        held_position < max_position(&client).await,
        "the open transaction holds a position below events already delivered"
    );

    // The open transaction keeps the slot's restart_lsn back, so the WAL written now exceeds
    // max_slot_wal_keep_size and a checkpoint invalidates the slot under the running listener.
    let walsender = slot_active_pid(&client, &name)
        .await
        .expect("the listener streams the slot when it is lost");
    invalidate_slot(&client, &name).await;
    long.batch_execute("COMMIT")
        .await
        .expect("COMMIT after the loss");
    let after = raise_three(&client, "after").await;

    // Every stored event is delivered: the held one, and those committed after the loss.
    let deadline = Instant::now() + WAIT;
    loop {
        let delivered: HashSet<String> = listener
            .collector
            .events()
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        let missing: Vec<String> = stored_event_ids(&client)
            .await
            .difference(&delivered)
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} events never delivered after the slot was lost (held {held}: {}): {missing:?}",
            missing.len(),
            missing.contains(&held.to_string())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(after
        .iter()
        .all(|id| listener.collector.events().iter().any(|e| e.id == *id)));

    // Then it streams again, from a new slot.
    wait_slot_active(&client, &name, WAIT).await;
    let streamed = raise_three(&client, "streamed").await;
    let deadline = Instant::now() + WAIT;
    while !streamed
        .iter()
        .all(|id| listener.collector.events().iter().any(|e| e.id == *id))
    {
        assert!(Instant::now() < deadline, "not streamed after the recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_row_streaming(&client, &name).await;
    // The same listener noticed the loss of the slot it was streaming from, and recovered once.
    let new_walsender = slot_active_pid(&client, &name).await;
    assert!(
        new_walsender.is_some_and(|pid| pid != walsender),
        "a new walsender streams the new slot ({walsender} before, {new_walsender:?} now)"
    );
    assert_eq!(slot_recoveries(port).await, 1.0);
    listener.stop().await.expect("the listener stops cleanly");
}

/// `slot_recoveries_total` scraped from the listener's admin endpoint on `port`.
async fn slot_recoveries(port: u16) -> f64 {
    let (status, text) = e2e::admin_support::wait_get(port, "/metrics", None, WAIT).await;
    assert_eq!(status, 200, "{text}");
    e2e::admin_support::sample(&text, "pg_domain_events_slot_recoveries_total", &[])
        .expect("pg_domain_events_slot_recoveries_total")
}

/// With `on_slot_lost = "stop"` the binary stops on the lost slot and names the gap-free
/// command; `listener slot recover` delivers what the slot missed, then `run` streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_slot_with_stop_policy_names_slot_recover_which_delivers_without_a_gap() {
    let cluster = PrivateCluster::start("lostslot");
    cluster.create_database("lost").await;
    let dsn = cluster.dsn("lost");
    let client = e2e::connect(&dsn).await;
    let name = unique_name("stoplost");
    let mut config = cluster.listener_config("lost", &name);
    config.replication.on_slot_lost = SlotLostPolicy::Stop;
    config.replication.poll_interval_ms = 100;
    config.replication.heartbeat_interval_secs = 1;
    let file = write_config(&config);

    let mut child = ListenerProcess::spawn(&file, &[]);
    wait_slot_active(&client, &name, WAIT).await;
    let first = raise_three(&client, "first").await;
    child.wait_lines(first.len(), WAIT).await;
    wait_boundary_past_everything(&client, &name).await;
    let (long, held, _) = hold_open_transaction(&dsn).await;
    let during = raise_three(&client, "during").await;
    child.wait_lines(first.len() + during.len(), WAIT).await;
    child.terminate();
    assert!(child
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits")
        .success());

    // Lost while no listener runs; the held transaction commits afterwards.
    invalidate_slot(&client, &name).await;
    long.batch_execute("COMMIT")
        .await
        .expect("COMMIT after the loss");
    let after = raise_three(&client, "after").await;

    let mut child = ListenerProcess::spawn(&file, &[]);
    let exit = child
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the listener must stop on a lost slot");
    assert_eq!(exit.code(), Some(1), "{}", child.stderr());
    let logs = child.stderr();
    assert!(logs.contains("wal_status = lost"), "{logs}");
    assert!(logs.contains("listener slot recover"), "{logs}");

    let recovered = run_cli(&["slot", "recover"], &file);
    let stderr = String::from_utf8_lossy(&recovered.stderr);
    assert!(recovered.status.success(), "slot recover: {stderr}");
    let lines = String::from_utf8(recovered.stdout).expect("UTF-8");
    let delivered: HashSet<Uuid> = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            v["id"].as_str().expect("id").parse().expect("uuid")
        })
        .collect();
    assert!(
        delivered.contains(&held),
        "the transaction that held a low position was delivered: {stderr}"
    );
    for id in &after {
        assert!(
            delivered.contains(id),
            "{id} committed after the loss was delivered"
        );
    }
    // Nothing to recover any more.
    let again = run_cli(&["slot", "recover"], &file);
    assert!(!again.status.success(), "a second recover is refused");

    let mut child = ListenerProcess::spawn(&file, &[]);
    wait_slot_active(&client, &name, WAIT).await;
    let streamed = raise_three(&client, "streamed").await;
    let lines = child.wait_lines(streamed.len(), WAIT).await;
    let ids: HashSet<Uuid> = lines
        .iter()
        .map(|v| v["id"].as_str().expect("id").parse().expect("uuid"))
        .collect();
    assert!(streamed.iter().all(|id| ids.contains(id)), "{lines:?}");
    assert_row_streaming(&client, &name).await;
    child.stop_ok().await;
}

/// The slot passes the listener's checks and is lost before its `START_REPLICATION` reaches
/// the server (a relay holds the command back meanwhile): invalidated, then, for a second
/// subscription, dropped. `START_REPLICATION`'s own error is recognised as a lost slot: the
/// error carries the server's answer to that command, which the startup check never sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_between_the_checks_and_start_replication_is_a_lost_slot() {
    let cluster = PrivateCluster::start("startrepl");
    cluster.create_database("sr").await;
    let client = e2e::connect(&cluster.dsn("sr")).await;

    for (prefix, invalidate) in [("inval", true), ("drop", false)] {
        let name = unique_name(prefix);
        let mut config = cluster.listener_config("sr", &name);
        config.replication.on_slot_lost = SlotLostPolicy::Stop;
        // A first run creates the slot and delivers, so the subscription has a position.
        let first = InProcess::start(config.clone());
        wait_slot_active(&client, &name, WAIT).await;
        raise_three(&client, prefix).await;
        first.collector.wait_for(3, WAIT).await;
        first.stop().await.expect("clean stop");

        let relay = StartReplicationHold::start(cluster.port).await;
        config.database.port = relay.port;
        let second = InProcess::start(config);
        let go = relay.wait_held(WAIT).await;
        // The listener found the slot usable; now it goes.
        let status: Option<String> = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .expect("the slot exists when START_REPLICATION is sent")
            .get(0);
        assert_ne!(status.as_deref(), Some("lost"));
        if invalidate {
            invalidate_slot(&client, &name).await;
        } else {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
                .expect("drop the slot");
        }
        let _ = go.send(());
        let err = second.stop_after_error(WAIT).await;
        let text = listener::error::report(&err);
        assert!(
            matches!(err, listener::Error::SlotLost { .. }),
            "not a lost slot: {text}"
        );
        assert!(text.contains("listener slot recover"), "{text}");
        if invalidate {
            // The server's answer to START_REPLICATION (SQLSTATE and detail), which the
            // startup check's message does not carry. 15 to 17 say "because it exceeded the
            // maximum reserved size", 18 "due to \"wal_removed\"".
            assert!(
                text.contains("SQLSTATE 55000")
                    && (text.contains("maximum reserved size")
                        || text.contains("due to \"wal_removed\"")),
                "{text}"
            );
        } else {
            assert!(text.contains("disappeared (was it dropped?)"), "{text}");
            assert!(text.contains("SQLSTATE 42704"), "{text}");
        }
        eprintln!("{prefix}: {text}");
    }
}
