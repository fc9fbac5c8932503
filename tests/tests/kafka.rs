//! End-to-end tests of the `kafka` handler against a real Kafka-protocol broker: tansu
//! (in-memory storage), one of each test's own on a free loopback port, so that a test can stop,
//! freeze or restart it. Records are read back through the Kafka protocol.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use e2e::kafka_support::*;
use e2e::listener_support::*;
use e2e::sink_support::{assert_unreachable_server_dead_letters, raise_batch, raise_mixed};
use e2e::TestDb;
use listener::config::{Config, HandlerConfig};
use listener::service::registry_from_config;
use listener::sink::kafka::partition_for;
use listener::Lsn;
use serde_json::json;
use uuid::Uuid;

const SLOT_WAIT: Duration = Duration::from_secs(120);
const DELIVERY_WAIT: Duration = Duration::from_secs(120);

fn start(config: Config) -> InProcess {
    let registry = registry_from_config(&config).expect("registry");
    InProcess::start_with(config, registry)
}

fn topic_names(prefix: &str) -> Vec<String> {
    ["Loan", "Ticket", "User"]
        .iter()
        .map(|t| format!("{prefix}.{t}"))
        .collect()
}

/// Checks per-key order: dropping repeated event ids (redeliveries), each aggregate's versions
/// are 1, 2, 3, … within its one partition; returns the number of repeats.
fn assert_keyed_order(records: &[Fetched]) -> usize {
    let mut seen = HashSet::new();
    let mut versions: HashMap<(String, String), Vec<i64>> = HashMap::new();
    let mut partitions: HashMap<(String, String), HashSet<i32>> = HashMap::new();
    let mut repeats = 0;
    for r in records {
        if !seen.insert(r.event_id().to_string()) {
            repeats += 1;
            continue;
        }
        let key = (
            r.event["aggregate_type"].as_str().unwrap().to_string(),
            r.event["aggregate_id"].as_str().unwrap().to_string(),
        );
        versions
            .entry(key.clone())
            .or_default()
            .push(r.event["aggregate_version"].as_i64().unwrap());
        partitions.entry(key).or_default().insert(r.partition);
    }
    for (aggregate, seen) in versions {
        let expected: Vec<i64> = (1..=seen.len() as i64).collect();
        assert_eq!(seen, expected, "{aggregate:?} out of order");
        assert_eq!(
            partitions[&aggregate].len(),
            1,
            "{aggregate:?} spread over partitions"
        );
    }
    repeats
}

fn ids_of(records: &[Fetched]) -> HashSet<String> {
    records.iter().map(|r| r.event_id().to_string()).collect()
}

fn as_strings(ids: &[Uuid]) -> HashSet<String> {
    ids.iter().map(Uuid::to_string).collect()
}

/// The latest commit among `records` (from the `commit_lsn` of their event JSON): the slot
/// has confirmed them all once its confirmed position is past it. Waiting for the server's
/// current WAL position instead would wait for WAL of other databases, which this slot only
/// confirms at the next keepalive.
fn last_commit(records: &[Fetched]) -> Lsn {
    records
        .iter()
        .map(|r| r.event["commit_lsn"].as_str().unwrap().parse().unwrap())
        .max()
        .expect("records")
}

/// Waits until every event of `ids` is in the topics in `names`; returns all records then.
async fn wait_ids(
    reader: &rskafka::client::Client,
    names: &[String],
    ids: &[Uuid],
) -> Vec<Fetched> {
    let expected = as_strings(ids);
    let deadline = std::time::Instant::now() + DELIVERY_WAIT;
    loop {
        let records = read_topics(reader, names).await;
        let present = ids_of(&records);
        if expected.is_subset(&present) {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} events in {names:?} after {DELIVERY_WAIT:?}",
            expected.intersection(&present).count(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn confirmed(client: &tokio_postgres::Client, slot: &str) -> Lsn {
    slot_positions(client, slot).await.0.parse().unwrap()
}

/// Three aggregate types land in three topics created with the configured partitions; each
/// record is keyed by its aggregate id, in the partition Kafka's own partitioner picks, with
/// the identity headers and the event JSON; each aggregate's events are in version order. A
/// second handler compresses its batches with gzip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_keys_headers_and_order() {
    let (broker, prefix, db, name, _slot, mut config) = case("kafka").await;
    config.replication.workers = 3;
    config.handlers = vec![
        kafka_handler("bus", &broker, &prefix, 3),
        e2e::sink_support::handler(
            listener::sink::KafkaConfig {
                topic: Some(format!("{prefix}-gz.{{aggregate_type}}")),
                partitions: Some(1),
                compression: Some(listener::sink::KafkaCompression::Gzip),
                ..e2e::kafka_support::kafka_sink(&broker, &prefix)
            },
            "zipped",
            3,
        ),
    ];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let mut ids = raise_mixed(&db.client, 20, 15).await;
    // Correlation and causation ids become headers.
    let traced: Uuid = db
        .client
        .query_one(
            "SELECT id FROM domain_events.raise_event('Loan', 'loan-traced', 'Loan.Funded', \
             '{}', metadata => $1::jsonb)",
            &[&json!({"correlation_id": "corr-1", "causation_id": "cause-2"})],
        )
        .await
        .unwrap()
        .get(0);
    ids.push(traced);

    let reader = client(&broker.address()).await;
    let names = topic_names(&prefix);
    let records = wait_ids(&reader, &names, &ids).await;
    listener.stop().await.unwrap();

    let created = topics(&reader).await;
    for name in &names {
        assert_eq!(created.get(name), Some(&3), "{name} in {created:?}");
    }
    assert_eq!(records.len(), ids.len(), "each event once");
    assert_eq!(ids_of(&records), as_strings(&ids));
    assert_eq!(assert_keyed_order(&records), 0);
    let stored: HashMap<String, (String, String)> = db
        .client
        .query(
            "SELECT id::text, to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS'), \
             event_version::text FROM domain_events.event",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for r in &records {
        let aggregate_type = r.event["aggregate_type"].as_str().unwrap();
        let aggregate_id = r.event["aggregate_id"].as_str().unwrap();
        assert_eq!(r.key.as_deref(), Some(aggregate_id));
        assert_eq!(
            r.partition,
            partition_for(aggregate_id.as_bytes(), 3),
            "{r:?}"
        );
        assert_eq!(r.headers["event_id"], r.event["id"].as_str().unwrap());
        assert_eq!(
            r.headers["event_type"],
            r.event["event_type"].as_str().unwrap()
        );
        assert_eq!(r.headers["aggregate_type"], aggregate_type);
        assert_eq!(
            r.headers["aggregate_version"],
            r.event["aggregate_version"].to_string()
        );
        let (recorded_at, event_version) = &stored[r.event_id()];
        assert_eq!(&r.headers["event_version"], event_version);
        assert_eq!(
            &r.timestamp.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
            recorded_at
        );
        assert_eq!(r.headers["content-type"], "application/json");
    }
    let traced = records
        .iter()
        .find(|r| r.event_id() == traced.to_string())
        .unwrap();
    assert_eq!(traced.headers["correlation_id"], "corr-1");
    assert_eq!(traced.headers["causation_id"], "cause-2");
    assert!(!records[0].headers.contains_key("correlation_id"));

    let zipped_names: Vec<String> = ["Loan", "Ticket", "User"]
        .iter()
        .map(|t| format!("{prefix}-gz.{t}"))
        .collect();
    let zipped = read_topics(&reader, &zipped_names).await;
    assert_eq!(ids_of(&zipped), as_strings(&ids));
    assert_eq!(zipped.len(), ids.len());
    assert!(dead_letters(&db.client, &name).await.is_empty());
}

/// What each test starts from: a broker of its own, a topic prefix no other test uses, a
/// database, a name for the listener's slot (dropped with the guard), and a configuration for
/// that slot.
async fn case(label: &str) -> (Broker, String, TestDb, String, SlotGuard, Config) {
    let broker = Broker::start().await;
    let db = TestDb::new().await;
    let name = unique_name(label);
    let config = config_for(&db, &name);
    let slot = SlotGuard(name.clone());
    (broker, unique_prefix(), db, name, slot, config)
}

/// How the broker goes away in [`ride_out`].
enum Outage {
    /// SIGSTOP, then SIGCONT: connections stay open, nothing is answered, nothing is lost.
    Freeze,
    /// SIGKILL, then a new, empty broker on the same port.
    Restart,
}

/// What [`ride_out`] saw.
struct AfterOutage {
    /// Events confirmed before the outage.
    before: Vec<Uuid>,
    /// Events raised during it.
    during: Vec<Uuid>,
    /// Every record once everything was confirmed after the outage.
    records: Vec<Fetched>,
}

/// Streams 50 events to the broker and waits until they are confirmed; takes the broker away
/// (`outage`) and raises 50 more; checks for 5 s (several timeouts and retries) that nothing
/// after the last acknowledged transaction is confirmed and nothing is dead-lettered; brings
/// the broker back and waits until the broker holds every event it should and the slot
/// confirmed them.
async fn ride_out(outage: Outage) -> AfterOutage {
    let (mut broker, prefix, db, name, _slot, mut config) = case("kafkaout").await;
    config.handlers = vec![HandlerConfig {
        max_backoff_ms: 500,
        ..e2e::sink_support::handler(
            listener::sink::KafkaConfig {
                timeout_ms: Some(1000),
                ..e2e::kafka_support::kafka_sink(&broker, &prefix)
            },
            "bus",
            1000,
        )
    }];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let names = topic_names(&prefix);

    let before = raise_mixed(&db.client, 10, 5).await;
    {
        let reader = client(&broker.address()).await;
        let records = wait_ids(&reader, &names, &before).await;
        wait_confirmed_past(&db.client, &name, last_commit(&records), DELIVERY_WAIT).await;
    }
    match outage {
        Outage::Freeze => broker.freeze(),
        Outage::Restart => broker.kill(),
    }
    let during = raise_mixed(&db.client, 10, 5).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Checked against the events' commit positions once they can be read back.
    let confirmed_during_outage = confirmed(&db.client, &name).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());

    let expected: Vec<Uuid> = match outage {
        Outage::Freeze => {
            broker.thaw();
            before.iter().chain(&during).copied().collect()
        }
        // The old broker's records are gone with it.
        Outage::Restart => {
            broker.restart().await;
            during.clone()
        }
    };
    let reader = client(&broker.address()).await;
    let records = wait_ids(&reader, &names, &expected).await;
    wait_confirmed_past(&db.client, &name, last_commit(&records), DELIVERY_WAIT).await;
    // Everything is confirmed: nothing more may be produced.
    let records = read_topics(&reader, &names).await;
    listener.stop().await.unwrap();
    assert!(dead_letters(&db.client, &name).await.is_empty());
    let during_ids = as_strings(&during);
    let first_during: Lsn = records
        .iter()
        .filter(|r| during_ids.contains(r.event_id()))
        .map(|r| r.event["commit_lsn"].as_str().unwrap().parse().unwrap())
        .min()
        .expect("events of the outage");
    // Confirming a transaction moves the slot past its commit record; the slot may also move
    // past other databases' WAL while idle, but never past a transaction it still has to handle.
    assert!(
        confirmed_during_outage <= first_during,
        "confirmed {confirmed_during_outage} during the outage, past the first unacknowledged \
         commit {first_during}"
    );
    AfterOutage {
        before,
        during,
        records,
    }
}

/// A broker that stops answering mid-stream (SIGSTOP) makes the flush time out and be retried
/// with backoff; nothing after the last acknowledged transaction is confirmed, nothing is
/// dead-lettered. Once it answers again every event is there, and only events that were not
/// yet confirmed may appear twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_broker_is_retried_without_confirming() {
    let seen = ride_out(Outage::Freeze).await;
    let all: Vec<Uuid> = seen.before.iter().chain(&seen.during).copied().collect();
    assert_eq!(
        ids_of(&seen.records),
        as_strings(&all),
        "every event, nothing else"
    );
    let repeats = assert_keyed_order(&seen.records);
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &seen.records {
        *copies.entry(r.event_id()).or_default() += 1;
    }
    for id in &seen.before {
        assert_eq!(
            copies[id.to_string().as_str()],
            1,
            "confirmed event {id} sent again"
        );
    }
    eprintln!(
        "{} events, {repeats} repeated from the unconfirmed tail",
        all.len()
    );
}

/// A broker killed mid-stream (losing its in-memory topics) and started again empty: while it
/// is down nothing is confirmed or dead-lettered; once back, the listener reconnects, creates
/// the topics again and produces every event that was not confirmed — and none that was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_gets_every_unconfirmed_event() {
    let seen = ride_out(Outage::Restart).await;
    assert_eq!(
        ids_of(&seen.records),
        as_strings(&seen.during),
        "the new broker holds exactly the events not confirmed before the old one died"
    );
    assert!(ids_of(&seen.records).is_disjoint(&as_strings(&seen.before)));
    assert_keyed_order_from_restart(&seen.records, &seen.during);
}

/// After a broker restart the aggregates' first versions are gone with the old broker, so
/// order is checked as "increasing" rather than "from 1".
fn assert_keyed_order_from_restart(records: &[Fetched], expected: &[Uuid]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, (i64, i32)> = HashMap::new();
    for r in records {
        if !seen.insert(r.event_id().to_string()) {
            continue;
        }
        let key = r.key.clone().unwrap();
        let version = r.event["aggregate_version"].as_i64().unwrap();
        if let Some((previous, partition)) = last.insert(key.clone(), (version, r.partition)) {
            assert!(version > previous, "{key}: {version} after {previous}");
            assert_eq!(partition, r.partition, "{key} spread over partitions");
        }
    }
    assert_eq!(seen.len(), expected.len());
}

/// The binary produces 2 000 events raised over 200 transactions while it is SIGKILLed twice
/// and restarted: every event of the table is in Kafka, the events confirmed before the first
/// kill exactly once, and each aggregate's first copies are in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listener_loses_nothing() {
    const TXNS: usize = 200;
    const PER_TXN: usize = 10;
    let (broker, prefix, db, name, _slot, mut config) = case("kafkakill").await;
    config.handlers = vec![kafka_handler("bus", &broker, &prefix, 10)];
    let file = write_config(&config);
    let mut runs = vec![ListenerProcess::spawn(&file, &[])];
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let writer_client = db.connect().await;
    let writer = tokio::spawn(async move {
        let mut ids = Vec::new();
        for _ in 0..TXNS {
            ids.extend(raise_mixed(&writer_client, 1, PER_TXN).await);
            // About 5 s of writing, so that the kills fall mid-stream.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ids
    });

    let reader = client(&broker.address()).await;
    let names = topic_names(&prefix);
    let mut confirmed_at_first_kill = None;
    for threshold in [300, 1000] {
        wait_count(&reader, &names, threshold, DELIVERY_WAIT).await;
        runs.last_mut().unwrap().kill9();
        confirmed_at_first_kill.get_or_insert(confirmed(&db.client, &name).await);
        runs.push(ListenerProcess::spawn(&file, &[]));
    }
    let ids = writer.await.expect("writer");
    assert_eq!(ids.len(), TXNS * PER_TXN);
    let records = wait_ids(&reader, &names, &ids).await;
    wait_confirmed_past(&db.client, &name, last_commit(&records), DELIVERY_WAIT).await;
    let last = runs.last_mut().unwrap();
    last.stop_ok().await;

    let records = read_topics(&reader, &names).await;
    let table = stored_event_ids(&db.client).await;
    assert_eq!(
        ids_of(&records),
        table,
        "Kafka holds exactly the table's events"
    );
    assert_eq!(table, as_strings(&ids));
    let repeats = assert_keyed_order(&records);
    let first_kill = confirmed_at_first_kill.unwrap();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        *copies.entry(r.event_id()).or_default() += 1;
    }
    let mut confirmed_before = 0;
    for r in &records {
        let commit: Lsn = r.event["commit_lsn"].as_str().unwrap().parse().unwrap();
        if commit < first_kill {
            confirmed_before += 1;
            assert_eq!(
                copies[r.event_id()],
                1,
                "{} confirmed, then sent again",
                r.event_id()
            );
        }
    }
    assert!(
        confirmed_before > 0,
        "nothing was confirmed before the first kill"
    );
    assert!(dead_letters(&db.client, &name).await.is_empty());
    eprintln!(
        "{} events, {} records: {repeats} repeated after the kills; {confirmed_before} \
         confirmed before the first kill, each once",
        ids.len(),
        records.len()
    );
}

/// Nothing listens: each event is retried `max_attempts` times, then dead-lettered, and the
/// stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried_then_dead_lettered() {
    let db = TestDb::new().await;
    let handler = e2e::sink_support::handler(
        listener::sink::KafkaConfig {
            // Nothing listens on port 9: connection refused.
            brokers: Some(vec!["127.0.0.1:9".into()]),
            timeout_ms: Some(500),
            topic: Some("nowhere.{aggregate_type}".into()),
            ..listener::sink::KafkaConfig::default()
        },
        "bus",
        3,
    );
    assert_unreachable_server_dead_letters(&db, handler, "cannot connect to Kafka").await;
}

/// An event whose record exceeds `max_message_bytes` is a definite failure: dead-lettered after
/// one attempt, while the rest of its transaction and the stream go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_dead_lettered_and_the_stream_goes_on() {
    let (broker, prefix, db, name, _slot, mut config) = case("kafkabig").await;
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::KafkaConfig {
            max_message_bytes: Some(4096),
            ..e2e::kafka_support::kafka_sink(&broker, &prefix)
        },
        "bus",
        5,
    )];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let batch = json!([
        {"aggregate_type": "Loan", "aggregate_id": "1", "event_type": "Loan.Funded",
         "payload": {"blob": "x".repeat(8000)}},
        {"aggregate_type": "Loan", "aggregate_id": "2", "event_type": "Loan.Funded",
         "payload": {"small": true}},
    ]);
    let ids = raise_batch(&db.client, &batch).await;
    let reader = client(&broker.address()).await;
    let records = wait_ids(&reader, &[format!("{prefix}.Loan")], &ids[1..]).await;
    assert_eq!(ids_of(&records), as_strings(&ids[1..]));
    let letters = wait_dead_letters(&db.client, &name, 1, Duration::from_secs(30)).await;
    assert_eq!((letters[0].1, letters[0].3), (ids[0], 1));
    assert!(letters[0].4.contains("max_message_bytes"), "{letters:?}");
    listener.stop().await.unwrap();
}

/// One transaction of 5,000 events of about 2 KB each (10 MB, more than the handler buffers
/// before it starts producing from `handle`, and hundreds of requests): every event once, each
/// aggregate's in version order, and the transaction confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_is_produced_whole_and_in_order() {
    const EVENTS: usize = 5_000;
    let (broker, prefix, db, name, _slot, mut config) = case("kafkalarge").await;
    config.handlers = vec![kafka_handler("bus", &broker, &prefix, 5)];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let batch = serde_json::Value::Array(
        (0..EVENTS)
            .map(|i| {
                json!({"aggregate_type": "Loan", "aggregate_id": format!("loan-{}", i % 40),
                       "event_type": "Loan.Changed", "payload": {"n": i, "note": "x".repeat(2000)}})
            })
            .collect(),
    );
    let ids = raise_batch(&db.client, &batch).await;
    let reader = client(&broker.address()).await;
    let names = [format!("{prefix}.Loan")];
    let records = wait_ids(&reader, &names, &ids).await;
    wait_confirmed_past(&db.client, &name, last_commit(&records), DELIVERY_WAIT).await;
    listener.stop().await.unwrap();
    let records = read_topics(&reader, &names).await;
    assert_eq!(records.len(), EVENTS, "each event once");
    assert_eq!(assert_keyed_order(&records), 0);
    assert!(dead_letters(&db.client, &name).await.is_empty());
}

/// Three workers share the handler while the broker is frozen, with few attempts: events are
/// dead-lettered, none is confirmed silently. Afterwards every event of the table is either in
/// Kafka or in the dead-letter table — a worker's flush never returns success for records that
/// another worker's failed flush gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_failing_broker_lose_nothing_silently() {
    let (broker, prefix, db, name, _slot, mut config) = case("kafkawrk").await;
    config.replication.workers = 3;
    config.handlers = vec![HandlerConfig {
        max_backoff_ms: 50,
        ..e2e::sink_support::handler(
            listener::sink::KafkaConfig {
                timeout_ms: Some(300),
                ..e2e::kafka_support::kafka_sink(&broker, &prefix)
            },
            "bus",
            3,
        )
    }];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let reader = client(&broker.address()).await;
    let names = topic_names(&prefix);
    // The topics exist before the outage.
    let first = raise_mixed(&db.client, 1, 3).await;
    wait_ids(&reader, &names, &first).await;

    broker.freeze();
    raise_mixed(&db.client, 30, 6).await;
    // Long enough for every transaction's flushes to fail for good.
    wait_dead_letters(&db.client, &name, 1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    broker.thaw();
    let last = raise_mixed(&db.client, 1, 3).await;
    let records = wait_ids(&reader, &names, &last).await;
    wait_confirmed_past(&db.client, &name, last_commit(&records), DELIVERY_WAIT).await;
    listener.stop().await.unwrap();

    let records = read_topics(&reader, &names).await;
    let mut accounted = ids_of(&records);
    let letters = dead_letters(&db.client, &name).await;
    accounted.extend(letters.iter().map(|l| l.1.to_string()));
    let table = stored_event_ids(&db.client).await;
    let lost: Vec<&String> = table.difference(&accounted).collect();
    assert!(
        lost.is_empty(),
        "{} events neither in Kafka nor dead-lettered: {lost:?}",
        lost.len()
    );
    eprintln!(
        "{} events: {} in Kafka, {} dead-lettered",
        table.len(),
        ids_of(&records).len(),
        letters.len()
    );
}

/// Over TLS, to a broker that requires a client certificate: the handler verifies the broker
/// against the CA file and presents its certificate; the events arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file_and_a_client_certificate() {
    let certs = TestCertificates::generate();
    let front = TlsFront::start(&certs, true).await;
    let prefix = unique_prefix();
    let db = TestDb::new().await;
    let name = unique_name("kafkatls");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::KafkaConfig {
            brokers: Some(vec![front.address()]),
            tls: Some(true),
            tls_ca_file: Some(certs.ca.clone()),
            tls_cert_file: Some(certs.client_cert.clone()),
            tls_key_file: Some(certs.client_key.clone()),
            ..e2e::kafka_support::kafka_sink(&front.broker, &prefix)
        },
        "bus",
        3,
    )];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let ids = raise_mixed(&db.client, 5, 6).await;
    let reader = tls_client(&front, &certs).await;
    let records = wait_ids(&reader, &topic_names(&prefix), &ids).await;
    listener.stop().await.unwrap();
    assert_eq!(ids_of(&records), as_strings(&ids));
    assert!(dead_letters(&db.client, &name).await.is_empty());
    assert!(
        front.refused.lock().unwrap().is_empty(),
        "{:?}",
        front.refused.lock().unwrap()
    );
}

/// A broker whose certificate the system's CAs do not sign, and a broker that requires a client
/// certificate the handler does not have: both handshakes fail, and the events are retried, then
/// dead-lettered, while the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_an_unknown_broker_and_is_refused_without_a_client_certificate() {
    let certs = TestCertificates::generate();
    let db = TestDb::new().await;

    let front = TlsFront::start(&certs, false).await;
    let handler = e2e::sink_support::handler(
        listener::sink::KafkaConfig {
            brokers: Some(vec![front.address()]),
            tls: Some(true),
            timeout_ms: Some(1000),
            ..e2e::kafka_support::kafka_sink(&front.broker, &unique_prefix())
        },
        "bus",
        2,
    );
    assert_unreachable_server_dead_letters(&db, handler, "cannot connect to Kafka").await;
    assert!(
        !front.refused.lock().unwrap().is_empty(),
        "no handshake was refused"
    );

    let front = TlsFront::start(&certs, true).await;
    let handler = e2e::sink_support::handler(
        listener::sink::KafkaConfig {
            brokers: Some(vec![front.address()]),
            tls: Some(true),
            tls_ca_file: Some(certs.ca.clone()),
            timeout_ms: Some(1000),
            ..e2e::kafka_support::kafka_sink(&front.broker, &unique_prefix())
        },
        "bus",
        2,
    );
    let db = TestDb::new().await;
    assert_unreachable_server_dead_letters(&db, handler, "cannot connect to Kafka").await;
    let refused = front.refused.lock().unwrap().clone();
    assert!(
        refused
            .iter()
            .any(|why| why.to_lowercase().contains("certificate")),
        "{refused:?}"
    );
}

/// A TLS file that cannot be read stops `listener run` at once with exit status 2, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_tls_file_stops_the_binary_with_a_clear_error() {
    let db = TestDb::new().await;
    let mut config = config_for(&db, &unique_name("kafkatlsbad"));
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::KafkaConfig {
            brokers: Some(vec!["127.0.0.1:9".into()]),
            tls: Some(true),
            tls_ca_file: Some("/nonexistent/kafka-ca.pem".into()),
            ..listener::sink::KafkaConfig::default()
        },
        "bus",
        3,
    )];
    let output = run_cli(&["run"], &write_config(&config));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/kafka-ca.pem"), "{stderr}");
    assert!(stderr.contains("handler bus"), "{stderr}");
}
