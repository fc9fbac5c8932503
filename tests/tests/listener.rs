//! End-to-end tests of the listener against the private cluster: real slots, real publications,
//! the real binary killed with SIGKILL.
//!
//! Each test uses its own database (logical slots are per database) and its own slot and
//! publication names (slots are cluster-wide), so the tests may run in parallel. The binary tests
//! need `cargo build -p listener` first (`target/debug/listener`, or `PGDE_LISTENER_BIN`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use e2e::listener_support::*;
use e2e::TestDb;
use listener::{Event, Lsn};
use serde_json::{json, Value};
use uuid::Uuid;

/// How long a new slot may take to start streaming: creating a logical slot waits for every
/// transaction running in the cluster to end, and other suites share the cluster.
const SLOT_WAIT: Duration = Duration::from_secs(120);

/// A payload mixing what breaks naive pipelines: unicode of every width, nesting, big numbers,
/// escapes, and (for one event per transaction) a big document.
fn payload(txn: usize, n: usize) -> Value {
    let mut p = json!({
        "txn": txn,
        "n": n,
        "text": "Zoë – naïve café, 日本語, emoji 🚀👩‍🚀, quote \" backslash \\ tab \t nul-free",
        "nested": {"a": [1, 2.5, -3e-7, null, true, {"deep": {"deeper": [[], {}]}}]},
        "big_int": 9007199254740993_i64,
    });
    if n == 0 {
        let items: Vec<Value> = (0..2000)
            .map(|i| json!({"i": i, "label": format!("item {i} ✓")}))
            .collect();
        p["big"] = Value::Array(items);
    }
    p
}

fn batch(txn: usize, size: usize) -> Value {
    Value::Array(
        (0..size)
            .map(|n| {
                json!({
                    "aggregate_type": "Loan",
                    "aggregate_id": format!("loan-{}", txn % 7),
                    "event_type": if n % 2 == 0 { "Loan.Funded" } else { "Loan.StatusChanged" },
                    "payload": payload(txn, n),
                    "metadata": {"actor": "e2e", "correlation_id": format!("c-{txn}")},
                })
            })
            .collect(),
    )
}

/// Raises `size` events in one transaction and commits or rolls back; returns their ids.
async fn raise_txn(
    client: &mut tokio_postgres::Client,
    txn: usize,
    size: usize,
    commit: bool,
) -> Vec<Uuid> {
    let tx = client.transaction().await.expect("begin");
    let rows = tx
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&batch(txn, size)],
        )
        .await
        .expect("raise_events");
    let ids = rows.iter().map(|r| r.get(0)).collect();
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
    ids
}

/// The stored events, keyed by id, as JSON comparable with what handlers receive.
async fn stored_events(db: &TestDb) -> HashMap<Uuid, Value> {
    db.client
        .query(
            "SELECT id, position, aggregate_type, aggregate_id, aggregate_version, event_type, \
                    event_version, payload, metadata, txid::text::bigint, \
                    to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') \
             FROM domain_events.event",
            &[],
        )
        .await
        .expect("read events")
        .into_iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            (
                id,
                json!({
                    "position": r.get::<_, i64>(1),
                    "aggregate_type": r.get::<_, String>(2),
                    "aggregate_id": r.get::<_, String>(3),
                    "aggregate_version": r.get::<_, i64>(4),
                    "event_type": r.get::<_, String>(5),
                    "event_version": r.get::<_, i32>(6),
                    "payload": r.get::<_, Value>(7),
                    "metadata": r.get::<_, Value>(8),
                    "txid": r.get::<_, i64>(9),
                    "occurred_at": r.get::<_, String>(10),
                }),
            )
        })
        .collect()
}

fn comparable(e: &Event) -> Value {
    json!({
        "position": e.position,
        "aggregate_type": e.aggregate_type,
        "aggregate_id": e.aggregate_id,
        "aggregate_version": e.aggregate_version,
        "event_type": e.event_type,
        "event_version": e.event_version,
        "payload": serde_json::from_str::<Value>(e.payload.get()).expect("payload JSON"),
        "metadata": serde_json::from_str::<Value>(e.metadata.get()).expect("metadata JSON"),
        "txid": e.txid as i64,
        "occurred_at": e.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
    })
}

/// Checks a delivered sequence against commit order: each transaction's events are contiguous and
/// in raise order, and transactions follow each other with strictly increasing commit LSNs.
fn assert_commit_order(events: &[Event]) {
    let mut seen_txids = HashSet::new();
    for pair in events.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.txid == b.txid {
            assert_eq!(
                a.commit_lsn, b.commit_lsn,
                "one transaction, one commit LSN"
            );
            assert!(a.position < b.position, "raise order inside a transaction");
        } else {
            assert!(
                a.commit_lsn < b.commit_lsn,
                "transactions out of commit order"
            );
            assert!(
                seen_txids.insert(a.txid),
                "transaction {} delivered in two pieces",
                a.txid
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_exactly_the_committed_events_once_in_commit_order() {
    let db = TestDb::new().await;
    let name = unique_name("exact");
    let _slot = SlotGuard(name.clone());
    let listener = InProcess::start(config_for(&db, &name));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    // Premake this month's partition: two first writers racing to create it on demand fail with
    // 42P07 in the current extension build (reported; not what this test is about).
    db.client
        .batch_execute("SELECT domain_events.maintain()")
        .await
        .expect("maintain");

    // Two writers interleave: positions are assigned in one order, commits land in another.
    let mut writers = Vec::new();
    for w in 0..2 {
        let dsn = db.dsn.clone();
        writers.push(tokio::spawn(async move {
            let mut client = e2e::connect(&dsn).await;
            let mut committed = Vec::new();
            let mut rolled_back = Vec::new();
            for i in 0..60 {
                let txn = w * 1000 + i;
                // 50 committed + 10 rolled back per writer.
                if i % 6 == 5 {
                    rolled_back.extend(raise_txn(&mut client, txn, 100, false).await);
                } else {
                    committed.push(raise_txn(&mut client, txn, 100, true).await);
                }
            }
            (committed, rolled_back)
        }));
    }
    let mut committed_txns = Vec::new();
    let mut rolled_back = HashSet::new();
    for writer in writers {
        let (committed, rb) = writer.await.expect("writer");
        committed_txns.push(committed);
        rolled_back.extend(rb);
    }
    assert_eq!(committed_txns.iter().map(Vec::len).sum::<usize>(), 100);
    assert_eq!(rolled_back.len(), 2000);

    listener
        .collector
        .wait_for(10_000, Duration::from_secs(120))
        .await;
    // Nothing more may arrive (no duplicates, nothing rolled back).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = listener.collector.events();
    assert_eq!(events.len(), 10_000);

    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 10_000, "an event was delivered twice");
    assert!(
        unique.is_disjoint(&rolled_back),
        "a rolled-back event was delivered"
    );

    // Exactly the stored events, fields and payloads intact.
    let stored = stored_events(&db).await;
    assert_eq!(stored.len(), 10_000);
    for event in &events {
        let expected = stored.get(&event.id).expect("delivered event is stored");
        assert_eq!(&comparable(event), expected, "event {} differs", event.id);
    }

    // Commit order: per transaction contiguous, globally by commit LSN, and each writer's
    // transactions in the order that writer committed them.
    assert_commit_order(&events);
    let delivered_txn_order: Vec<Uuid> = events
        .iter()
        .zip(std::iter::once(None).chain(events.iter().map(Some)))
        .filter(|(e, prev)| prev.is_none_or(|p| p.txid != e.txid))
        .map(|(e, _)| e.id)
        .collect();
    assert_eq!(delivered_txn_order.len(), 100);
    for writer_txns in &committed_txns {
        let firsts: Vec<Uuid> = writer_txns.iter().map(|ids| ids[0]).collect();
        let order: Vec<Uuid> = delivered_txn_order
            .iter()
            .copied()
            .filter(|id| firsts.contains(id))
            .collect();
        assert_eq!(
            order, firsts,
            "a writer's transactions arrived out of commit order"
        );
    }
    for txn in committed_txns.iter().flatten() {
        let delivered: Vec<Uuid> = events
            .iter()
            .filter(|e| txn.contains(&e.id))
            .map(|e| e.id)
            .collect();
        assert_eq!(
            &delivered, txn,
            "a transaction's events arrived out of raise order"
        );
    }

    // A graceful stop confirms the last transaction durably and on the slot.
    listener.stop().await.expect("clean stop");
    let last_commit = events.last().expect("events").commit_lsn;
    let durable: Lsn = subscription_lsn(&db.client, &name)
        .await
        .expect("row")
        .parse()
        .unwrap();
    assert!(
        durable > last_commit,
        "durable {durable} not past the last commit {last_commit}"
    );
    let (confirmed, _) = slot_positions(&db.client, &name).await;
    let confirmed: Lsn = confirmed.parse().unwrap();
    assert!(
        confirmed >= durable,
        "slot confirmed {confirmed} behind durable {durable}"
    );
}

fn line_lsn(line: &Value) -> Lsn {
    line["commit_lsn"]
        .as_str()
        .expect("commit_lsn")
        .parse()
        .expect("lsn")
}

fn line_id(line: &Value) -> Uuid {
    line["id"].as_str().expect("id").parse().expect("uuid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let db = TestDb::new().await;
    let name = unique_name("kill");
    let _slot = SlotGuard(name.clone());
    let config = write_config(&config_for(&db, &name));

    let mut first = ListenerProcess::spawn(&config, &[]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let dsn = db.dsn.clone();
    let writer = tokio::spawn(async move {
        let mut client = e2e::connect(&dsn).await;
        for txn in 0..200 {
            raise_txn(&mut client, txn, 50, true).await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });

    // Kill while the writer is still going and some transactions were delivered.
    first.wait_lines(1_500, Duration::from_secs(120)).await;
    first.kill9();
    assert!(
        !writer.is_finished(),
        "the writer finished before the kill: not mid-stream"
    );
    let before = first.lines();
    let durable: Lsn = subscription_lsn(&db.client, &name)
        .await
        .map(|s| s.parse().expect("lsn"))
        .unwrap_or_default();

    let mut second = ListenerProcess::spawn(&config, &[]);
    writer.await.expect("writer");
    let committed: HashSet<Uuid> = stored_events(&db).await.into_keys().collect();
    assert_eq!(committed.len(), 10_000);

    // Wait until every committed event was delivered by one run or the other.
    let first_ids: HashSet<Uuid> = before.iter().map(line_id).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let after = loop {
        let lines = second.lines();
        let ids: HashSet<Uuid> = lines.iter().map(line_id).collect();
        if committed
            .iter()
            .all(|id| ids.contains(id) || first_ids.contains(id))
        {
            break lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events lost: {} of {} delivered; logs:\n{}",
            first_ids.union(&ids).count(),
            committed.len(),
            second.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Graceful stop of the second run: exit 0.
    second.terminate();
    let status = second
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    assert!(
        status.success(),
        "exit status {status}; logs:\n{}",
        second.stderr()
    );

    // Nothing delivered that was not committed.
    for line in before.iter().chain(&after) {
        assert!(
            committed.contains(&line_id(line)),
            "an uncommitted event was delivered"
        );
    }
    // The second run resumed at a transaction boundary at or after the durable mark, replays
    // nothing twice itself, and keeps commit order.
    let second_ids: Vec<Uuid> = after.iter().map(line_id).collect();
    assert_eq!(
        second_ids.iter().collect::<HashSet<_>>().len(),
        second_ids.len()
    );
    for pair in after.windows(2) {
        assert!(
            line_lsn(&pair[0]) <= line_lsn(&pair[1]),
            "second run out of commit order"
        );
    }
    for line in &after {
        assert!(
            line_lsn(line) >= durable,
            "event of a transaction confirmed before the kill ({} < {durable}) was redelivered",
            line_lsn(line)
        );
    }
    // Duplicates exist only for transactions the first run had not confirmed: all of them are at
    // or after the durable mark (checked above) and form whole transactions in the second run.
    let duplicates: Vec<&Value> = after
        .iter()
        .filter(|l| first_ids.contains(&line_id(l)))
        .collect();
    let dup_lsns: HashSet<Lsn> = duplicates.iter().map(|l| line_lsn(l)).collect();
    for lsn in &dup_lsns {
        let in_second = after.iter().filter(|l| line_lsn(l) == *lsn).count();
        assert_eq!(in_second, 50, "transaction {lsn} replayed partially");
    }
    eprintln!(
        "first run: {} events, second run: {} events, duplicates: {} ({} transactions)",
        before.len(),
        after.len(),
        duplicates.len(),
        dup_lsns.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_writes_do_not_pile_up_wal_behind_the_slot() {
    let db = TestDb::new().await;
    let name = unique_name("wal");
    let _slot = SlotGuard(name.clone());
    db.client
        .batch_execute("CREATE TABLE noise (id bigserial PRIMARY KEY, pad text)")
        .await
        .expect("noise table");
    let listener = InProcess::start(config_for(&db, &name));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let start: Lsn = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    // About 50 MB of table data (plus WAL overhead), in 50 transactions, none touching events.
    for _ in 0..50 {
        db.client
            .batch_execute(
                "INSERT INTO noise (pad) SELECT repeat(md5(g::text), 32) FROM generate_series(1, 1000) g",
            )
            .await
            .expect("noise");
    }
    let end: Lsn = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    assert!(
        end.0 - start.0 > 50 * 1024 * 1024,
        "wrote only {} bytes of WAL",
        end.0 - start.0
    );

    // The slot must follow: confirmed_flush past everything written, and retained WAL (from
    // restart_lsn, which moves at running-xacts records, logged by CHECKPOINT) small.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        db.client
            .batch_execute("CHECKPOINT")
            .await
            .expect("checkpoint");
        let row = db
            .client
            .query_one(
                "SELECT confirmed_flush_lsn::text, \
                        (pg_current_wal_lsn() - restart_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .expect("slot");
        let confirmed: Lsn = row.get::<_, String>(0).parse().unwrap();
        let retained: i64 = row.get(1);
        if confirmed >= end && retained < 8 * 1024 * 1024 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot not keeping up: confirmed {confirmed} vs written {end}, retained {retained} bytes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(listener.collector.is_empty(), "no event was raised");
    listener.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_advance_the_durable_position_of_an_idle_database() {
    let db = TestDb::new().await;
    let name = unique_name("beat");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.replication.heartbeat_interval_secs = 1;
    let listener = InProcess::start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    // Without events, only heartbeat transactions can move the subscription row forward.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        if let Some(lsn) = subscription_lsn(&db.client, &name).await {
            let lsn: Lsn = lsn.parse().unwrap();
            if seen.last() != Some(&lsn) {
                seen.push(lsn);
            }
        }
        if seen.len() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "subscription row moved through {seen:?} only"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(listener.collector.is_empty(), "heartbeats are not events");
    listener.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_and_publication_creation_is_idempotent_and_resumes() {
    let db = TestDb::new().await;
    let name = unique_name("idem");
    let _slot = SlotGuard(name.clone());
    let mut client = db.connect().await;

    let first = InProcess::start(config_for(&db, &name));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let a = raise_txn(&mut client, 1, 3, true).await;
    first.collector.wait_for(3, Duration::from_secs(30)).await;
    first.stop().await.expect("clean stop");

    // Raised while nobody listens: the restarted listener finds the slot and publication and
    // resumes after what it confirmed.
    let b = raise_txn(&mut client, 2, 4, true).await;
    let second = InProcess::start(config_for(&db, &name));
    second.collector.wait_for(4, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<Uuid> = second.collector.events().iter().map(|e| e.id).collect();
    assert_eq!(
        ids, b,
        "second run must deliver exactly the events raised after the first stopped"
    );
    assert!(a.iter().all(|id| !ids.contains(id)));
    second.stop().await.expect("clean stop");

    // Two listeners starting at once race to create: both must come up (one streams, the other
    // waits for the slot), and exactly one slot and one publication exist.
    let other = unique_name("race");
    let _other_slot = SlotGuard(other.clone());
    let x = InProcess::start(config_for(&db, &other));
    let y = InProcess::start(config_for(&db, &other));
    wait_slot_active(&db.client, &other, SLOT_WAIT).await;
    let c = raise_txn(&mut client, 3, 2, true).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while x.collector.len() + y.collector.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "nobody delivered the events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered: Vec<Uuid> = x
        .collector
        .events()
        .iter()
        .chain(y.collector.events().iter())
        .map(|e| e.id)
        .collect();
    assert_eq!(delivered, c);
    x.stop().await.expect("clean stop");
    y.stop().await.expect("clean stop");
    for (table, column) in [
        ("pg_replication_slots", "slot_name"),
        ("pg_publication", "pubname"),
    ] {
        for n in [&name, &other] {
            let count: i64 = db
                .client
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE {column} = $1"),
                    &[n],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(count, 1, "{table} {n}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_publication_is_a_definite_error() {
    let db = TestDb::new().await;
    let name = unique_name("pub");
    let _slot = SlotGuard(name.clone());
    db.client
        .batch_execute(&format!(
            "CREATE PUBLICATION {name} FOR TABLE domain_events.event"
        ))
        .await
        .expect("publication without publish_via_partition_root");
    let listener = InProcess::start(config_for(&db, &name));
    let err = listener.stop_after_error(Duration::from_secs(30)).await;
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("publish_via_partition_root"),
        "{err}"
    );
}

/// Runs the binary and expects it to fail fast with exactly one error line.
async fn expect_one_error_line(mut process: ListenerProcess, expected: &str) {
    let status = process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the listener hangs instead of failing; logs:\n{}",
                process.stderr()
            )
        });
    assert!(!status.success(), "exit status {status}");
    let logs = process.stderr();
    assert!(!logs.contains("panicked"), "the listener panicked:\n{logs}");
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{logs}");
    assert!(
        errors[0].contains(expected),
        "error line lacks {expected:?}: {}",
        errors[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_extension_fails_with_one_clear_line() {
    let db = TestDb::without_extension().await;
    let name = unique_name("noext");
    let _slot = SlotGuard(name.clone());
    let config = write_config(&config_for(&db, &name));
    let process = ListenerProcess::spawn(&config, &[]);
    expect_one_error_line(process, "extension pg_domain_events is not installed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_credentials_work_and_wrong_ones_fail_with_one_clear_line() {
    let db = TestDb::new().await;
    let name = unique_name("auth");
    let _slot = SlotGuard(name.clone());
    let role = name.clone();
    // An ordinary role, as an operator would set it up: REPLICATION plus domain_events_listener;
    // the publication is created by the table owner because the role cannot create it.
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'right-pässword'; \
             GRANT domain_events_listener TO {role}; \
             CREATE PUBLICATION {name} FOR TABLE domain_events.event \
                WITH (publish_via_partition_root = true, publish = 'insert')"
        ))
        .await
        .expect("role");
    let mut config = config_for(&db, &name);
    config.database.user = role.clone();
    config.database.host = "127.0.0.1".into();
    let config = write_config(&config);

    let wrong = ListenerProcess::spawn(&config, &[("PGDE_PASSWORD", "wrong")]);
    expect_one_error_line(wrong, "password authentication failed").await;
    let none = ListenerProcess::spawn(&config, &[]);
    expect_one_error_line(none, "password").await;

    let mut right = ListenerProcess::spawn(&config, &[("PGPASSWORD", "right-pässword")]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let mut client = db.connect().await;
    let ids = raise_txn(&mut client, 1, 2, true).await;
    let lines = right.wait_lines(2, Duration::from_secs(30)).await;
    assert_eq!(lines.iter().map(line_id).collect::<Vec<_>>(), ids);
    right.terminate();
    let status = right
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(status.success(), "{status}: {}", right.stderr());
    assert!(
        subscription_lsn(&db.client, &name).await.is_some(),
        "the role saved its position"
    );
    db.client
        .batch_execute(&format!("DROP PUBLICATION {name}"))
        .await
        .expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_reconnects_and_loses_nothing() {
    let db = TestDb::new().await;
    let name = unique_name("reconn");
    let _slot = SlotGuard(name.clone());
    let listener = InProcess::start(config_for(&db, &name));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let mut client = db.connect().await;

    let mut committed = Vec::new();
    for txn in 0..10 {
        committed.extend(raise_txn(&mut client, txn, 20, true).await);
    }
    listener
        .collector
        .wait_for(100, Duration::from_secs(30))
        .await;
    // Kill the walsender mid-stream: a transient failure.
    db.client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("terminate walsender");
    for txn in 10..20 {
        committed.extend(raise_txn(&mut client, txn, 20, true).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ids: HashSet<Uuid> = listener.collector.events().iter().map(|e| e.id).collect();
        if committed.iter().all(|id| ids.contains(id)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events lost after the reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At least once, and only what was unconfirmed at the failure comes again: one failure,
    // so no event more than twice. (The interrupted session may have handed part of its last
    // transaction to the handler before the connection died; the next one replays it whole.)
    let events = listener.collector.events();
    let mut per_id: HashMap<Uuid, usize> = HashMap::new();
    for e in &events {
        *per_id.entry(e.id).or_default() += 1;
    }
    assert!(
        per_id.values().all(|n| *n <= 2),
        "an event was delivered more than twice"
    );
    assert_eq!(per_id.len(), committed.len(), "only committed events");
    // When something was replayed, the second session started at the second delivery of the
    // earliest duplicated event: from there on, whole transactions in commit order, no repeats.
    if let Some(first_dup) = events.iter().position(|e| per_id[&e.id] == 2) {
        let dup_id = events[first_dup].id;
        let start = events
            .iter()
            .rposition(|x| x.id == dup_id)
            .expect("second delivery");
        let replay = &events[start..];
        assert_commit_order(replay);
        let unique: HashSet<Uuid> = replay.iter().map(|e| e.id).collect();
        assert_eq!(
            unique.len(),
            replay.len(),
            "the second session repeated an event"
        );
        let first = &replay[0];
        assert!(
            events
                .iter()
                .filter(|e| e.txid == first.txid)
                .all(|e| e.position >= first.position),
            "the replay must start at the first event of a transaction"
        );
    }
    listener.stop().await.expect("clean stop after a reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_a_definite_error() {
    let db = TestDb::new().await;
    let name = unique_name("drop");
    let _slot = SlotGuard(name.clone());
    let mut client = db.connect().await;
    let first = InProcess::start(config_for(&db, &name));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    raise_txn(&mut client, 1, 1, true).await;
    first.collector.wait_for(1, Duration::from_secs(30)).await;
    first.stop().await.expect("clean stop");
    assert!(subscription_lsn(&db.client, &name).await.is_some());

    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .expect("drop slot");
    let second = InProcess::start(config_for(&db, &name));
    let err = second.stop_after_error(Duration::from_secs(30)).await;
    assert!(!err.is_transient());
    assert!(err.to_string().contains("the slot was dropped"), "{err}");
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a dropped slot must not be recreated silently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_needs_a_server_with_tls() {
    let db = TestDb::new().await;
    let name = unique_name("tlsreq");
    let _slot = SlotGuard(name.clone());
    let ssl: String = db.client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    let mut config = config_for(&db, &name);
    config.database.sslmode = listener::tls::SslMode::Require;
    let config = write_config(&config);
    let mut process = ListenerProcess::spawn(&config, &[]);
    if ssl == "off" {
        // The private cluster of scripts/cluster.sh has no TLS: require must refuse, not downgrade.
        expect_one_error_line(process, "does not accept TLS").await;
    } else {
        wait_slot_active(&db.client, &name, SLOT_WAIT).await;
        let encrypted: bool = db
            .client
            .query_one(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_replication_slots r ON r.active_pid = s.pid \
                 WHERE r.slot_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(encrypted, "sslmode=require streamed without TLS");
        process.terminate();
        let status = process
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("exits");
        assert!(status.success());
    }
}

/// Needs a cluster with `ssl = on` whose certificate is signed by the CA in
/// `PGDE_TEST_TLS_ROOTCERT` and names 127.0.0.1 (PGDE_TEST_DSN pointing at it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a TLS-enabled cluster: PGDE_TEST_DSN and PGDE_TEST_TLS_ROOTCERT"]
async fn verify_full_streams_over_tls_and_refuses_an_unknown_ca() {
    let rootcert = std::env::var("PGDE_TEST_TLS_ROOTCERT").expect("PGDE_TEST_TLS_ROOTCERT");
    let db = TestDb::new().await;
    let name = unique_name("tlsfull");
    let _slot = SlotGuard(name.clone());

    // The system trust store does not know the test CA: refused, definitely.
    let mut config = config_for(&db, &name);
    config.database.sslmode = listener::tls::SslMode::VerifyFull;
    let refused = InProcess::start(config.clone());
    let err = refused.stop_after_error(Duration::from_secs(30)).await;
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("certificate verify failed"),
        "{err}"
    );

    config.database.sslrootcert = Some(rootcert.into());
    let listener = InProcess::start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let mut client = db.connect().await;
    let ids = raise_txn(&mut client, 1, 3, true).await;
    listener
        .collector
        .wait_for(3, Duration::from_secs(30))
        .await;
    let delivered: Vec<Uuid> = listener.collector.events().iter().map(|e| e.id).collect();
    assert_eq!(delivered, ids);
    let encrypted: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database() AND a.application_name = 'pg_domain_events_listener' \
               AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        encrypted, 2,
        "the replication and SQL connections both use TLS"
    );
    listener.stop().await.expect("clean stop");
}
