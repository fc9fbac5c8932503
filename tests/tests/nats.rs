//! End-to-end tests of the `nats` handler against a real nats-server with JetStream: each test
//! starts a server of its own on a free port (its store in a temporary directory, killed at the
//! end of the test), so the tests may run in parallel and leave nothing behind.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use e2e::listener_support::*;
use e2e::nats_support::*;
use e2e::sink_support::*;
use e2e::TestDb;
use listener::service::registry_from_config;
use uuid::Uuid;

const SLOT_WAIT: Duration = Duration::from_secs(120);

fn start(config: listener::config::Config) -> InProcess {
    let registry = registry_from_config(&config).expect("registry");
    InProcess::start_with(config, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_follow_the_template_and_the_stream_is_created() {
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let (stream, prefix) = unique_stream();
    assert!(
        js.get_stream(&stream).await.is_err(),
        "stream exists already"
    );
    let db = TestDb::new().await;
    let name = unique_name("nats");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::NatsConfig {
            duplicate_window_secs: Some(600),
            ..nats.sink(&stream, &prefix)
        },
        "bus",
        3,
    )];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let ids = raise(
        &db.client,
        &[
            ("Loan", "42", "Loan.Funded"),
            ("ticket", "t-1", "ticket.created"),
            ("User", "u@example.com", "User.Registered"),
            ("Loan", "42", "Loan.Repaid"),
        ],
    )
    .await;
    wait_stream_count(&js, &stream, 4, Duration::from_secs(60)).await;
    listener
        .collector
        .wait_for(4, Duration::from_secs(30))
        .await;

    let mut info = js.get_stream(&stream).await.unwrap();
    let created = info.info().await.unwrap().config.clone();
    assert_eq!(created.subjects, [format!("{prefix}.>")]);
    assert_eq!(created.duplicate_window, Duration::from_secs(600));
    let stored = stream_messages(&js, &stream).await;
    let got: Vec<(String, Option<String>)> = stored
        .iter()
        .map(|m| (m.subject.clone(), m.msg_id.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                format!("{prefix}.Loan.Loan.Funded"),
                Some(ids[0].to_string())
            ),
            (
                format!("{prefix}.ticket.ticket.created"),
                Some(ids[1].to_string())
            ),
            (
                format!("{prefix}.User.User.Registered"),
                Some(ids[2].to_string())
            ),
            (
                format!("{prefix}.Loan.Loan.Repaid"),
                Some(ids[3].to_string())
            ),
        ]
    );
    assert_eq!(stored[0].event["aggregate_id"], "42");
    assert_eq!(stored[0].event["payload"]["secret"], "not for logs");
    assert!(dead_letters(&db.client, &name).await.is_empty());
    listener.stop().await.unwrap();

    // A second handler with an `{aggregate_id}` template on the now existing stream: the
    // id's characters that are not subject-safe become `_`.
    let name = unique_name("natsid");
    let _slot2 = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::NatsConfig {
            subject: Some(format!("{prefix}.by_id.{{aggregate_id}}")),
            create_stream: Some(false),
            ..nats.sink(&stream, &prefix)
        },
        "by_id",
        3,
    )];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    raise(&db.client, &[("User", "a.b c*>", "User.Renamed")]).await;
    wait_stream_count(&js, &stream, 5, Duration::from_secs(60)).await;
    let last = stream_messages(&js, &stream).await.pop().unwrap();
    assert_eq!(last.subject, format!("{prefix}.by_id.a_b_c__"));
    listener.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_retried_then_dead_lettered() {
    let db = TestDb::new().await;
    let handler = e2e::sink_support::handler(
        listener::sink::NatsConfig {
            timeout_ms: Some(500),
            // Nothing listens on port 9: connection refused.
            ..e2e::nats_support::nats_sink("nats://127.0.0.1:9", "NOWHERE", "nowhere")
        },
        "bus",
        3,
    );
    assert_unreachable_server_dead_letters(&db, handler, "cannot connect to NATS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_blocks_a_blocking_handler() {
    let db = TestDb::new().await;
    let name = unique_name("natsblock");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.handlers = vec![listener::config::HandlerConfig {
        on_failure: listener::OnFailure::Block,
        ..e2e::sink_support::handler(
            listener::sink::NatsConfig {
                timeout_ms: Some(500),
                ..e2e::nats_support::nats_sink("nats://127.0.0.1:9", "NOWHERE", "nowhere")
            },
            "bus",
            2,
        )
    }];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    raise(&db.client, &[("Loan", "1", "Loan.Funded")]).await;
    let err = listener.stop_after_error(Duration::from_secs(60)).await;
    let text = listener::error::report(&err);
    assert!(text.contains("bus"), "{text}");
    assert!(dead_letters(&db.client, &name).await.is_empty());
}

/// Counts every message published under `<prefix>.>` per `Nats-Msg-Id`, duplicates included:
/// a core subscription sees each publish the server received, whatever JetStream kept. Stops
/// after `quiet` without a message.
async fn count_publishes(
    nats: &NatsServer,
    prefix: &str,
    quiet: Duration,
) -> tokio::task::JoinHandle<HashMap<String, usize>> {
    let client = nats.client().await;
    let mut published = client
        .subscribe(format!("{prefix}.>"))
        .await
        .expect("subscribe");
    // The subscription is in place before the first publish.
    client.flush().await.expect("flush the subscription");
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let _client = client;
        let mut per_id: HashMap<String, usize> = HashMap::new();
        while let Some(message) = tokio::time::timeout(quiet, published.next())
            .await
            .ok()
            .flatten()
        {
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string())
                .expect("every publish carries Nats-Msg-Id");
            *per_id.entry(id).or_default() += 1;
        }
        per_id
    })
}

/// The stream holds exactly the table's events, each once, each aggregate's in version order.
async fn assert_stream_holds_each_event_once(
    js: &async_nats::jetstream::Context,
    stream: &str,
    db: &TestDb,
    ids: &[Uuid],
) -> Vec<Stored> {
    let stored = stream_messages(js, stream).await;
    assert_eq!(stored.len(), ids.len(), "each event exactly once");
    let msg_ids: HashSet<String> = stored.iter().filter_map(|m| m.msg_id.clone()).collect();
    let expected: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(msg_ids, expected);
    let table = stored_event_ids(&db.client).await;
    assert_eq!(
        msg_ids, table,
        "the stream holds exactly the table's events"
    );
    let mut versions: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for m in &stored {
        assert_eq!(m.msg_id.as_deref(), m.event["id"].as_str());
        versions
            .entry((
                m.event["aggregate_type"].as_str().unwrap().into(),
                m.event["aggregate_id"].as_str().unwrap().into(),
            ))
            .or_default()
            .push(m.event["aggregate_version"].as_i64().unwrap());
    }
    for (aggregate, seen) in versions {
        let expected: Vec<i64> = (1..=seen.len() as i64).collect();
        assert_eq!(seen, expected, "{aggregate:?} out of order");
    }
    stored
}

/// Raises `txns` transactions of `per_txn` events over 17 aggregates of three types, 5 ms
/// apart, on a connection of its own; returns the ids in commit order.
fn spawn_writer(db: &TestDb, txns: usize, per_txn: usize) -> tokio::task::JoinHandle<Vec<Uuid>> {
    let dsn = db.dsn.clone();
    tokio::spawn(async move {
        let writer_client = e2e::connect(&dsn).await;
        let mut ids = Vec::new();
        let types = [
            ("Loan", "Loan.Funded"),
            ("ticket", "ticket.created"),
            ("User", "User.Renamed"),
        ];
        for txn in 0..txns {
            let events: Vec<(String, String, String)> = (0..per_txn)
                .map(|n| {
                    let (aggregate_type, event_type) = types[(txn + n) % 3];
                    (
                        aggregate_type.to_string(),
                        format!("a-{}", (txn * per_txn + n) % 17),
                        event_type.to_string(),
                    )
                })
                .collect();
            let refs: Vec<(&str, &str, &str)> = events
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
                .collect();
            ids.extend(raise(&writer_client, &refs).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ids
    })
}

/// The binary publishes 2 000 events raised over 200 transactions while it is SIGKILLed twice
/// and restarted. Each restart publishes again what the killed run had not confirmed (the
/// server receives more publishes than there are events, some ids more than once), and
/// JetStream drops those by `Nats-Msg-Id`: the stream ends with each event exactly once, each
/// aggregate's events in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listener_publishes_each_event_exactly_once() {
    const TXNS: usize = 200;
    const PER_TXN: usize = 10;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let (stream, prefix) = unique_stream();
    let db = TestDb::new().await;
    let name = unique_name("natskill");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    // Confirmations a second apart: a kill always leaves published, unconfirmed transactions
    // behind, so the restarted run must publish them again.
    config.replication.ack_interval_ms = 1000;
    config.replication.checkpoint_interval_ms = 1000;
    config.handlers = vec![nats.handler("bus", &stream, &prefix, 10)];
    let file = write_config(&config);
    let publishes = count_publishes(&nats, &prefix, Duration::from_secs(5)).await;
    let mut runs = vec![ListenerProcess::spawn(&file, &[])];
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let writer = spawn_writer(&db, TXNS, PER_TXN);
    for threshold in [300, 1000] {
        wait_stream_count(&js, &stream, threshold, Duration::from_secs(120)).await;
        runs.last_mut().unwrap().kill9();
        runs.push(ListenerProcess::spawn(&file, &[]));
    }
    let ids = writer.await.expect("writer");
    assert_eq!(ids.len(), TXNS * PER_TXN);
    wait_stream_count(&js, &stream, ids.len() as u64, Duration::from_secs(120)).await;
    // Let the last run go on for a moment: nothing more may arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = runs.last_mut().unwrap();
    last.stop_ok().await;

    assert_stream_holds_each_event_once(&js, &stream, &db, &ids).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());
    let per_id = publishes.await.expect("subscriber");
    let publishes: usize = per_id.values().sum();
    let republished = per_id.values().filter(|n| **n > 1).count();
    let expected: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        per_id.keys().cloned().collect::<HashSet<_>>(),
        expected,
        "every event published, nothing else"
    );
    // The restarts redelivered: without this the exactly-once check above proves nothing.
    assert!(
        publishes > ids.len() && republished > 0,
        "no event was published twice: the kills left nothing unconfirmed ({publishes} publishes)"
    );
    eprintln!(
        "{} events, {publishes} publishes: {} redelivered after the kills ({republished} events \
         published more than once), dropped by JetStream as duplicates",
        ids.len(),
        publishes - ids.len()
    );
}

/// The nats-server goes down while the listener publishes and comes back on the same port
/// with its store: the handler's publishes fail meanwhile and are retried (none
/// dead-lettered), the client reconnects, and the stream ends with each event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restarted_on_its_port_gets_each_event_once() {
    const TXNS: usize = 200;
    const PER_TXN: usize = 5;
    let mut nats = NatsServer::start().await;
    let (js, stream, prefix) = nats.own_stream().await;
    let db = TestDb::new().await;
    let name = unique_name("natsdown");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.handlers = vec![listener::config::HandlerConfig {
        max_backoff_ms: 500,
        ..e2e::sink_support::handler(
            listener::sink::NatsConfig {
                create_stream: Some(false),
                timeout_ms: Some(1000),
                ..nats.sink(&stream, &prefix)
            },
            "bus",
            60,
        )
    }];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let writer = spawn_writer(&db, TXNS, PER_TXN);
    wait_stream_count(&js, &stream, 100, Duration::from_secs(60)).await;
    let port = nats.port;
    nats.stop();
    assert!(
        !writer.is_finished(),
        "the writer finished before the outage"
    );
    // Down for a while: the listener's publishes fail and are retried.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the server is down"
    );
    nats.restart().await;
    assert_eq!(nats.port, port, "restarted on the same port");
    let js = nats.jetstream().await;
    let ids = writer.await.expect("writer");
    wait_stream_count(&js, &stream, ids.len() as u64, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    listener.stop().await.expect("clean stop");

    assert_stream_holds_each_event_once(&js, &stream, &db, &ids).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());
}

/// A publish whose ack fails (here: its stream was deleted) fails the transaction's flush; the
/// retried flush publishes it again, and once the stream is back the event is stored, not
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_publishes_are_sent_again_by_the_retried_flush() {
    let nats = NatsServer::start().await;
    let (js, stream, prefix) = nats.own_stream().await;
    let create = || create_stream(&js, &stream, &prefix);
    let db = TestDb::new().await;
    let name = unique_name("natsflush");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.handlers = vec![listener::config::HandlerConfig {
        max_backoff_ms: 300,
        ..e2e::sink_support::handler(
            listener::sink::NatsConfig {
                create_stream: Some(false),
                timeout_ms: Some(1000),
                ..nats.sink(&stream, &prefix)
            },
            "bus",
            40,
        )
    }];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let first = raise(&db.client, &[("Loan", "1", "Loan.Funded")]).await;
    wait_stream_count(&js, &stream, 1, Duration::from_secs(60)).await;
    listener
        .collector
        .wait_for(1, Duration::from_secs(30))
        .await;

    js.delete_stream(&stream).await.expect("delete stream");
    let second = raise(&db.client, &[("Loan", "1", "Loan.Repaid")]).await;
    listener
        .collector
        .wait_for(2, Duration::from_secs(30))
        .await;
    // Several flushes fail meanwhile (no stream answers the publish).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());
    create().await;
    wait_stream_count(&js, &stream, 1, Duration::from_secs(30)).await;
    let stored = stream_messages(&js, &stream).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].msg_id, Some(second[0].to_string()));
    assert_ne!(first[0], second[0]);
    assert!(dead_letters(&db.client, &name).await.is_empty());
    listener.stop().await.unwrap();
}

/// Three workers share the handler while its stream is gone, with few attempts: events are
/// dead-lettered, none is confirmed silently. Afterwards every event raised during the outage
/// is either in the (re-created) stream or in the dead-letter table — a worker's flush never
/// returns success for publishes that another worker's failed flush gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_failing_stream_lose_nothing_silently() {
    let nats = NatsServer::start().await;
    let (js, stream, prefix) = nats.own_stream().await;
    let create = || create_stream(&js, &stream, &prefix);
    let db = TestDb::new().await;
    let name = unique_name("natswrk");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.replication.workers = 3;
    config.handlers = vec![listener::config::HandlerConfig {
        max_backoff_ms: 50,
        ..e2e::sink_support::handler(
            listener::sink::NatsConfig {
                create_stream: Some(false),
                timeout_ms: Some(300),
                ..nats.sink(&stream, &prefix)
            },
            "bus",
            3,
        )
    }];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    raise_mixed(&db.client, 1, 3).await;
    wait_stream_count(&js, &stream, 3, Duration::from_secs(60)).await;

    js.delete_stream(&stream).await.expect("delete stream");
    let during = raise_mixed(&db.client, 30, 6).await;
    // Long enough for many transactions' flushes to fail for good.
    wait_dead_letters(&db.client, &name, 1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    create().await;
    let last = raise_mixed(&db.client, 1, 3).await;
    let expected: HashSet<String> = last.iter().map(Uuid::to_string).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let stored: HashSet<String> = stream_messages(&js, &stream)
            .await
            .into_iter()
            .filter_map(|m| m.msg_id)
            .collect();
        if expected.is_subset(&stored) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last events never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    listener.stop().await.unwrap();

    let mut accounted: HashSet<String> = stream_messages(&js, &stream)
        .await
        .into_iter()
        .filter_map(|m| m.msg_id)
        .collect();
    let in_stream = accounted.len();
    let letters = dead_letters(&db.client, &name).await;
    accounted.extend(letters.iter().map(|l| l.1.to_string()));
    let lost: Vec<String> = during
        .iter()
        .map(Uuid::to_string)
        .filter(|id| !accounted.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} events neither in the stream nor dead-lettered: {lost:?}",
        lost.len()
    );
    eprintln!(
        "{} events during the outage: {in_stream} in the stream, {} dead-lettered",
        during.len(),
        letters.len()
    );
}
