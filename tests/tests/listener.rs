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
    // What the killed run confirmed: the slot's confirmed_flush_lsn once its walsender let go,
    // and the subscription row's position (the next run starts from the later one). Both must
    // exist; a missing one fails here rather than turning into a bound of 0/0.
    let slot_confirmed = confirmed_after_exit(&db.client, &name).await;
    let row: Lsn = subscription_lsn(&db.client, &name)
        .await
        .expect("the killed run checkpointed its position")
        .parse()
        .expect("lsn");
    let durable = slot_confirmed.max(row);
    // The bound means something only if the killed run confirmed part of what it delivered.
    let confirmed_lines = before.iter().filter(|l| line_lsn(l) < durable).count();
    assert!(
        confirmed_lines > 0 && durable > Lsn::ZERO,
        "the killed run confirmed none of its {} events (slot {slot_confirmed}, row {row})",
        before.len()
    );

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
    right.stop_ok().await;
    assert!(
        subscription_lsn(&db.client, &name).await.is_some(),
        "the role saved its position"
    );
    db.client
        .batch_execute(&format!("DROP PUBLICATION {name}"))
        .await
        .expect("cleanup");
}

/// The walsender streaming our slot: its PID, checked to be a walsender in `pg_stat_replication`.
async fn walsender_of(client: &tokio_postgres::Client, slot: &str) -> i32 {
    client
        .query_one(
            "SELECT s.active_pid FROM pg_replication_slots s \
             JOIN pg_stat_replication r ON r.pid = s.active_pid \
             JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1 AND a.backend_type = 'walsender'",
            &[&slot],
        )
        .await
        .expect("a walsender streams the slot")
        .get(0)
}

/// `reconnects_total` scraped from the listener's admin endpoint on `port`.
async fn reconnects(port: u16) -> f64 {
    let (status, text) =
        e2e::admin_support::wait_get(port, "/metrics", None, Duration::from_secs(10)).await;
    assert_eq!(status, 200, "{text}");
    e2e::admin_support::sample(&text, "pg_domain_events_reconnects_total", &[])
        .expect("pg_domain_events_reconnects_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_reconnects_and_loses_nothing() {
    let db = TestDb::new().await;
    let name = unique_name("reconn");
    let _slot = SlotGuard(name.clone());
    let port = e2e::admin_support::free_port();
    let mut config = config_for(&db, &name);
    config.admin.listen = Some(format!("127.0.0.1:{port}"));
    let listener = InProcess::start(config);
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
    assert_eq!(reconnects(port).await, 0.0, "no reconnect before the kill");
    // Kill the walsender mid-stream: a transient failure.
    let walsender = walsender_of(&db.client, &name).await;
    let terminated: bool = db
        .client
        .query_one("SELECT pg_terminate_backend($1)", &[&walsender])
        .await
        .expect("terminate walsender")
        .get(0);
    assert!(terminated, "walsender {walsender} was not terminated");
    for txn in 10..20 {
        committed.extend(raise_txn(&mut client, txn, 20, true).await);
    }
    // The connection really died, and the listener came back on a new one.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let replacement = loop {
        let active = slot_active_pid(&db.client, &name).await;
        if let Some(pid) = active.filter(|pid| *pid != walsender) {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new walsender took the slot after {walsender} was terminated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let gone: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&walsender],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0, "walsender {walsender} still runs");
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    assert_eq!(walsender_of(&db.client, &name).await, replacement);
    assert!(
        reconnects(port).await >= 1.0,
        "the listener did not count a reconnect"
    );
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

/// Streams one transaction through a new slot, stops, and drops the slot; returns the
/// listener's configuration.
async fn deliver_one_then_drop_the_slot(db: &TestDb, name: &str) -> listener::config::Config {
    let mut client = db.connect().await;
    let first = InProcess::start(config_for(db, name));
    wait_slot_active(&db.client, name, SLOT_WAIT).await;
    raise_txn(&mut client, 1, 1, true).await;
    first.collector.wait_for(1, Duration::from_secs(30)).await;
    first.stop().await.expect("clean stop");
    assert!(subscription_lsn(&db.client, name).await.is_some());
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .expect("drop slot");
    config_for(db, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_with_on_slot_lost_stop_is_a_definite_error() {
    let db = TestDb::new().await;
    let name = unique_name("drop");
    let _slot = SlotGuard(name.clone());
    let mut config = deliver_one_then_drop_the_slot(&db, &name).await;
    config.replication.on_slot_lost = listener::config::SlotLostPolicy::Stop;
    let second = InProcess::start(config);
    let err = second.stop_after_error(Duration::from_secs(30)).await;
    assert!(!err.is_transient());
    assert!(err.to_string().contains("was dropped"), "{err}");
    assert!(err.to_string().contains("listener slot recover"), "{err}");
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

/// A dropped slot is not recreated silently either: the events committed while it was gone are
/// delivered from the table before the new slot streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recovered_with_the_events_committed_while_it_was_gone() {
    let db = TestDb::new().await;
    let name = unique_name("dropr");
    let _slot = SlotGuard(name.clone());
    let mut config = deliver_one_then_drop_the_slot(&db, &name).await;
    config.replication.poll_interval_ms = 100;
    let mut client = db.connect().await;
    let missed = raise_txn(&mut client, 2, 3, true).await;
    let second = InProcess::start(config);
    second
        .collector
        .wait_for(missed.len(), Duration::from_secs(60))
        .await;
    let delivered: Vec<Uuid> = second.collector.events().iter().map(|e| e.id).collect();
    for id in &missed {
        assert!(
            delivered.contains(id),
            "{id} committed while the slot was gone"
        );
    }
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let streamed = raise_txn(&mut client, 3, 1, true).await;
    second
        .collector
        .wait_for(missed.len() + streamed.len(), Duration::from_secs(30))
        .await;
    second.stop().await.expect("clean stop after the recovery");
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

/// A CA of the test's own, named `name`: `(certificate, key)`.
fn test_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params.self_signed(&key).expect("CA certificate"), key)
}

/// A server certificate for `names` signed by `ca`: `(certificate PEM, key PEM)`.
fn server_certificate(
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    names: &[&str],
) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("server key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    let cert = params
        .signed_by(&key, &ca.0, &ca.1)
        .expect("server certificate");
    (cert.pem(), key.serialize_pem())
}

/// Writes `pem` to a temporary file removed on drop.
fn pem_file(pem: &str) -> TempFile {
    let path = std::env::temp_dir().join(format!("pgde-ca-{}.pem", Uuid::new_v4().simple()));
    std::fs::write(&path, pem).expect("write PEM");
    TempFile(path)
}

/// How many of the listener's sessions on the current database use TLS, and how many do not.
async fn listener_sessions_by_tls(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database() \
               AND a.application_name = 'pg_domain_events_listener'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

/// Streams three events through a listener with `config` and checks that both of its
/// connections (replication and SQL) use TLS; stops it.
async fn streams_over_tls(
    client: &tokio_postgres::Client,
    config: listener::config::Config,
    txn: usize,
) {
    let name = config.replication.slot.clone();
    let listener = InProcess::start(config);
    wait_slot_active(client, &name, SLOT_WAIT).await;
    let ids = raise_txn_on(client, txn, 3).await;
    listener
        .collector
        .wait_for(3, Duration::from_secs(30))
        .await;
    let delivered: Vec<Uuid> = listener.collector.events().iter().map(|e| e.id).collect();
    assert_eq!(delivered, ids);
    // (A stopped listener's sessions may linger a moment: at least this one's two.)
    let (encrypted, plain) = listener_sessions_by_tls(client).await;
    assert!(
        encrypted >= 2 && plain == 0,
        "the replication and SQL connections both use TLS: {encrypted} with, {plain} without"
    );
    listener.stop().await.expect("clean stop");
}

/// Raises `n` events in one transaction on `client`; returns their ids.
async fn raise_txn_on(client: &tokio_postgres::Client, txn: usize, n: usize) -> Vec<Uuid> {
    client
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&batch(txn, n)],
        )
        .await
        .expect("raise_events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A private cluster with `ssl = on` and a certificate for `localhost` and `127.0.0.1` signed
/// by a CA the test made: `verify-full` with that CA as `sslrootcert` and `require` both stream
/// end to end over TLS; `verify-full` refuses, definitely and with a clear error, the system
/// trust store (which does not know the CA), another CA, and a certificate for another host
/// name signed by the right CA (which `verify-ca` accepts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_and_require_stream_over_tls_and_wrong_certificates_are_refused() {
    use listener::tls::SslMode;
    let cluster = e2e::cluster_support::PrivateCluster::start("tls");
    let ca = test_ca("pgde test CA");
    let (cert, key) = server_certificate(&ca, &["localhost", "127.0.0.1"]);
    cluster.enable_tls(&cert, &key).await;
    cluster.create_database("tls").await;
    let client = e2e::connect(&cluster.dsn("tls")).await;
    let rootcert = pem_file(&ca.0.pem());
    let other_ca = pem_file(&test_ca("another CA").0.pem());

    let config = |name: &str, mode: SslMode, root: Option<&TempFile>| {
        let mut config = cluster.listener_config("tls", name);
        config.database.sslmode = mode;
        config.database.sslrootcert = root.map(|f| f.0.clone());
        config
    };
    let refused = |config: listener::config::Config, why: &'static str| async move {
        let err = InProcess::start(config)
            .stop_after_error(Duration::from_secs(30))
            .await;
        let text = listener::error::report(&err);
        assert!(
            !err.is_transient(),
            "{why}: a retry would fail again: {text}"
        );
        assert!(text.contains("certificate verify failed"), "{why}: {text}");
        text
    };

    streams_over_tls(
        &client,
        config("tls_full", SslMode::VerifyFull, Some(&rootcert)),
        1,
    )
    .await;
    streams_over_tls(&client, config("tls_req", SslMode::Require, None), 2).await;
    refused(
        config("tls_sys", SslMode::VerifyFull, None),
        "system trust store",
    )
    .await;
    refused(
        config("tls_other", SslMode::VerifyFull, Some(&other_ca)),
        "another CA",
    )
    .await;

    // The right CA, but a certificate naming another host: verify-full checks the name.
    let (cert, key) = server_certificate(&ca, &["db.example.invalid"]);
    cluster.enable_tls(&cert, &key).await;
    let text = refused(
        config("tls_host", SslMode::VerifyFull, Some(&rootcert)),
        "host name mismatch",
    )
    .await;
    eprintln!("host name mismatch: {text}");
    // The same certificate passes verify-ca (chain only): what verify-full refused is the name.
    streams_over_tls(
        &client,
        config("tls_ca", SslMode::VerifyCa, Some(&rootcert)),
        3,
    )
    .await;
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ('tls_sys', 'tls_other', 'tls_host')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a refused connection created no slot");
}

/// Raises `(aggregate_id, event_type)` events of aggregate type `Loan` in one transaction;
/// returns their ids.
async fn raise_types(
    client: &impl tokio_postgres::GenericClient,
    events: &[(&str, &str)],
) -> Vec<Uuid> {
    let batch = Value::Array(
        events
            .iter()
            .map(|(id, event_type)| {
                json!({"aggregate_type": "Loan", "aggregate_id": id, "event_type": event_type,
                       "payload": {"secret": "not for logs"}})
            })
            .collect(),
    );
    client
        .query("SELECT id FROM domain_events.raise_events($1)", &[&batch])
        .await
        .expect("raise_events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Fails transiently on `Loan.Rejected`, definitely on `Loan.Refused`, panics on
/// `Loan.Exploded`; records what it handled.
#[derive(Clone, Default)]
struct Picky {
    handled: std::sync::Arc<std::sync::Mutex<Vec<Uuid>>>,
}

#[async_trait::async_trait]
impl listener::Handler for Picky {
    async fn handle(&self, event: &Event) -> Result<(), listener::HandlerError> {
        match event.event_type.as_str() {
            "Loan.Rejected" => Err(listener::HandlerError::transient("downstream unavailable")),
            "Loan.Refused" => Err(listener::HandlerError::definite("invalid for this handler")),
            "Loan.Exploded" => panic!("bug in the handler"),
            _ => {
                self.handled.lock().expect("lock").push(event.id);
                Ok(())
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_events_are_dead_lettered_and_the_slot_moves_past_them() {
    let db = TestDb::new().await;
    let name = unique_name("dead");
    let _slot = SlotGuard(name.clone());
    let picky = Picky::default();
    let mut registry = listener::Registry::new();
    registry.register(
        "picky",
        [listener::Filter::All],
        listener::RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        },
        picky.clone(),
    );
    let listener = InProcess::start_with(config_for(&db, &name), registry);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let t1 = raise_types(
        &db.client,
        &[
            ("1", "Loan.Funded"),
            ("2", "Loan.Rejected"),
            ("3", "Loan.Funded"),
        ],
    )
    .await;
    let t2 = raise_types(&db.client, &[("4", "Loan.Exploded"), ("5", "Loan.Refused")]).await;
    let t3 = raise_types(&db.client, &[("6", "Loan.Funded")]).await;

    // Every event reaches the other handler, and the stream went past the failures.
    listener
        .collector
        .wait_for(6, Duration::from_secs(60))
        .await;
    let last_commit = listener
        .collector
        .events()
        .last()
        .expect("events")
        .commit_lsn;
    wait_confirmed_past(&db.client, &name, last_commit, Duration::from_secs(30)).await;
    assert_eq!(
        *picky.handled.lock().unwrap(),
        [t1[0], t1[2], t3[0]],
        "the failing handler handled the other events in order"
    );

    let letters = dead_letters(&db.client, &name).await;
    let positions: HashMap<Uuid, i64> = db
        .client
        .query("SELECT id, position FROM domain_events.event", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let summary: Vec<(&str, Uuid, i64, i32)> = letters
        .iter()
        .map(|(h, id, pos, attempts, _)| (h.as_str(), *id, *pos, *attempts))
        .collect();
    assert_eq!(
        summary,
        [
            ("picky", t1[1], positions[&t1[1]], 3),
            ("picky", t2[0], positions[&t2[0]], 1),
            ("picky", t2[1], positions[&t2[1]], 1),
        ],
        "transient failures use every attempt; definite ones and panics one"
    );
    assert!(
        letters[0].4.contains("downstream unavailable"),
        "{letters:?}"
    );
    assert!(
        letters[1]
            .4
            .contains("handler panicked: bug in the handler"),
        "{letters:?}"
    );
    assert!(
        letters[2].4.contains("invalid for this handler"),
        "{letters:?}"
    );
    let times_ordered: bool = db
        .client
        .query_one(
            "SELECT bool_and(first_failed_at <= last_failed_at) FROM domain_events.dead_letter",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(times_ordered);

    // A restart does not deliver the dead-lettered transactions again.
    listener.stop().await.expect("clean stop");
    let again = InProcess::start(config_for(&db, &name));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let t4 = raise_types(&db.client, &[("7", "Loan.Funded")]).await;
    again.collector.wait_for(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<Uuid> = again.collector.events().iter().map(|e| e.id).collect();
    assert_eq!(ids, t4);
    again.stop().await.expect("clean stop");
    assert_eq!(dead_letters(&db.client, &name).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_dead_letters_an_undecodable_row_and_the_slot_moves_on() {
    let db = TestDb::new().await;
    let name = unique_name("undec");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.replication.redrive_interval_ms = 200;
    let config = write_config(&config);
    let mut process = ListenerProcess::spawn(&config, &[]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    // A row written around raise_event with a value the listener cannot represent (an infinite
    // timestamp), between two good events of the same transaction, then a later transaction.
    let mut client = db.connect().await;
    let tx = client.transaction().await.unwrap();
    let first = raise_types(&tx, &[("1", "Loan.Funded")]).await;
    let bad: Uuid = tx
        .query_one(
            "INSERT INTO domain_events.event \
                (id, aggregate_type, aggregate_id, aggregate_version, event_type, occurred_at) \
             VALUES (gen_random_uuid(), 'Loan', 'bad', 1, 'Loan.Funded', 'infinity') \
             RETURNING id",
            &[],
        )
        .await
        .expect("direct insert")
        .get(0);
    let second = raise_types(&tx, &[("2", "Loan.Funded")]).await;
    tx.commit().await.unwrap();
    let third = raise_types(&client, &[("3", "Loan.Funded")]).await;

    let lines = process.wait_lines(3, Duration::from_secs(60)).await;
    let ids: Vec<Uuid> = lines.iter().map(line_id).collect();
    assert_eq!(ids, [first[0], second[0], third[0]]);
    let letters = wait_dead_letters(&db.client, &name, 1, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (handler, event_id, position, attempts, error) = &letters[0];
    assert_eq!(handler, "decode");
    assert_eq!(*event_id, bad);
    let bad_position: i64 = db
        .client
        .query_one(
            "SELECT position FROM domain_events.event WHERE id = $1",
            &[&bad],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(*position, bad_position);
    assert_eq!(*attempts, 1);
    assert!(error.contains("occurred_at"), "{error}");
    wait_confirmed_past(
        &db.client,
        &name,
        line_lsn(&lines[2]),
        Duration::from_secs(30),
    )
    .await;

    process.terminate();
    let status = process
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    let logs = process.stderr();
    assert!(status.success(), "exit status {status}; logs:\n{logs}");
    assert!(
        !logs.contains("not for logs"),
        "a payload was logged:\n{logs}"
    );
    assert!(logs.contains("dead-lettering"), "{logs}");

    // Its redrive cannot load the row either: the failure is recorded and the request cleared,
    // and the listener keeps running.
    let mut process = ListenerProcess::spawn(&config, &[]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    run_cli_ok(&["dead-letters", "redrive"], &config);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = db
            .client
            .query_one(
                "SELECT redrive_requested_at IS NULL, error, attempts FROM domain_events.dead_letter",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, bool>(0) {
            let error: String = row.get(1);
            assert!(error.starts_with("cannot load the event"), "{error}");
            assert_eq!(row.get::<_, i32>(2), 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redrive not attempted; logs:\n{}",
            process.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fourth = raise_types(&client, &[("4", "Loan.Funded")]).await;
    let lines = process.wait_lines(1, Duration::from_secs(30)).await;
    assert_eq!(line_id(&lines[0]), fourth[0]);
    process.stop_ok().await;
}

/// Fails (definitely) on `Loan.Rejected` while `broken`; records what it handled.
#[derive(Clone, Default)]
struct Switchable {
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handled: std::sync::Arc<std::sync::Mutex<Vec<Uuid>>>,
}

#[async_trait::async_trait]
impl listener::Handler for Switchable {
    async fn handle(&self, event: &Event) -> Result<(), listener::HandlerError> {
        if event.event_type == "Loan.Rejected"
            && self.broken.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(listener::HandlerError::definite("still broken"));
        }
        self.handled.lock().expect("lock").push(event.id);
        Ok(())
    }
}

impl Switchable {
    fn set_broken(&self, broken: bool) {
        self.broken
            .store(broken, std::sync::atomic::Ordering::SeqCst);
    }

    fn registry(&self) -> listener::Registry {
        let mut registry = listener::Registry::new();
        registry.register(
            "flaky",
            [listener::Filter::All],
            listener::RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(10),
            },
            self.clone(),
        );
        registry
    }
}

/// `(attempts, error, redrive requested)` of the dead letter of `event_id`, if any.
async fn dead_letter_state(
    client: &tokio_postgres::Client,
    event_id: Uuid,
) -> Option<(i32, String, bool)> {
    client
        .query_opt(
            "SELECT attempts, error, redrive_requested_at IS NOT NULL \
             FROM domain_events.dead_letter WHERE event_id = $1",
            &[&event_id],
        )
        .await
        .expect("read dead letter")
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redriven_from_sql_and_the_cli_while_streaming_and_at_start() {
    let db = TestDb::new().await;
    let name = unique_name("redrive");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.replication.redrive_interval_ms = 200;
    let file = write_config(&config);
    let handler = Switchable::default();
    handler.set_broken(true);
    let listener = InProcess::start_with(config.clone(), handler.registry());
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let t1 = raise_types(&db.client, &[("1", "Loan.Rejected"), ("2", "Loan.Funded")]).await;
    let t2 = raise_types(&db.client, &[("3", "Loan.Rejected")]).await;
    listener
        .collector
        .wait_for(3, Duration::from_secs(60))
        .await;
    wait_dead_letters(&db.client, &name, 2, Duration::from_secs(30)).await;

    // The CLI lists them.
    let table = run_cli_ok(&["dead-letters", "list"], &file);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("position\tevent_id\thandler\tattempts"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].contains(&t1[0].to_string()) && lines[1].contains("\tflaky\t1\t"),
        "{table}"
    );
    assert!(
        lines[2].contains(&t2[0].to_string()) && lines[2].contains("still broken"),
        "{table}"
    );

    // A redrive that fails again: attempts add up, the request is cleared, the row stays.
    let stdout = run_cli_ok(
        &["dead-letters", "redrive", "--event-id", &t1[0].to_string()],
        &file,
    );
    assert!(stdout.contains("requested redelivery of 1 dead letter"));
    wait_until(
        "the failed redrive is recorded",
        Duration::from_secs(30),
        || async {
            dead_letter_state(&db.client, t1[0]).await == Some((2, "still broken".into(), false))
        },
    )
    .await;
    assert_eq!(
        dead_letter_state(&db.client, t2[0]).await,
        Some((1, "still broken".into(), false)),
        "only the requested event was redriven"
    );
    // An event without a dead letter: the CLI says so.
    let out = run_cli(
        &["dead-letters", "redrive", "--event-id", &t1[1].to_string()],
        &file,
    );
    assert!(!out.status.success(), "{out:?}");

    // Fixed: a redrive of everything delivers both and removes the rows.
    handler.set_broken(false);
    let requested: i32 = db
        .client
        .query_one("SELECT domain_events.redrive($1)", &[&name])
        .await
        .expect("redrive()")
        .get(0);
    assert_eq!(requested, 2);
    wait_until(
        "the dead letters are gone",
        Duration::from_secs(30),
        || async { dead_letters(&db.client, &name).await.is_empty() },
    )
    .await;
    {
        let handled = handler.handled.lock().unwrap().clone();
        assert_eq!(handled, [t1[1], t1[0], t2[0]], "redriven in position order");
    }

    // Requested while no listener runs: picked up when one starts.
    handler.set_broken(true);
    let t3 = raise_types(&db.client, &[("4", "Loan.Rejected")]).await;
    wait_dead_letters(&db.client, &name, 1, Duration::from_secs(30)).await;
    listener.stop().await.expect("clean stop");
    handler.set_broken(false);
    run_cli_ok(&["dead-letters", "redrive"], &file);
    config.replication.redrive_interval_ms = 600_000;
    let again = InProcess::start_with(config, handler.registry());
    wait_until(
        "the dead letter is redriven at start",
        Duration::from_secs(60),
        || async { dead_letters(&db.client, &name).await.is_empty() },
    )
    .await;
    assert_eq!(handler.handled.lock().unwrap().last(), Some(&t3[0]));
    again.stop().await.expect("clean stop");
}

/// Sleeps a random 0–2 ms per event; records every `(aggregate_id, version, id)` in call order
/// and the most calls seen running at once.
#[derive(Clone, Default)]
struct Sleepy {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, i64, Uuid)>>>,
    running: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl listener::Handler for Sleepy {
    async fn handle(&self, event: &Event) -> Result<(), listener::HandlerError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        let delay = (Uuid::new_v4().as_u128() % 2_000) as u64;
        tokio::time::sleep(Duration::from_micros(delay)).await;
        self.seen.lock().expect("lock").push((
            event.aggregate_id.clone(),
            event.aggregate_version,
            event.id,
        ));
        self.running.fetch_sub(1, SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_keep_per_aggregate_order_and_deliver_every_event_once_on_the_slot() {
    const AGGREGATES: usize = 200;
    const VERSIONS: usize = 50;
    let db = TestDb::new().await;
    let name = unique_name("workers");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.replication.workers = 8;
    let sleepy = Sleepy::default();
    let mut registry = listener::Registry::new();
    registry.register(
        "sleepy",
        [listener::Filter::All],
        listener::RetryPolicy::default(),
        sleepy.clone(),
    );
    let listener = InProcess::start_with(config, registry);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    // Each transaction carries 20 aggregates' next event; every aggregate gets 50 versions.
    for version in 0..VERSIONS {
        for chunk in (0..AGGREGATES).collect::<Vec<_>>().chunks(20) {
            let batch = Value::Array(
                chunk
                    .iter()
                    .map(|a| {
                        json!({"aggregate_type": "Loan", "aggregate_id": format!("loan-{a}"),
                               "event_type": "Loan.Changed", "payload": {"v": version}})
                    })
                    .collect(),
            );
            db.client
                .query("SELECT 1 FROM domain_events.raise_events($1)", &[&batch])
                .await
                .expect("raise_events");
        }
    }
    let total = AGGREGATES * VERSIONS;
    listener
        .collector
        .wait_for(total, Duration::from_secs(300))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while sleepy.seen.lock().unwrap().len() < total {
        assert!(
            std::time::Instant::now() < deadline,
            "the workers handled {} of {total}",
            sleepy.seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_commit = listener
        .collector
        .events()
        .iter()
        .map(|e| e.commit_lsn)
        .max()
        .expect("events");
    wait_confirmed_past(&db.client, &name, last_commit, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let seen = sleepy.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), total, "more calls than events");
    let ids: HashSet<Uuid> = seen.iter().map(|(_, _, id)| *id).collect();
    assert_eq!(ids.len(), total, "an event was handled twice");
    let stored: HashSet<Uuid> = stored_events(&db).await.into_keys().collect();
    assert_eq!(ids, stored, "exactly the stored events");
    let mut per_aggregate: HashMap<&str, Vec<i64>> = HashMap::new();
    for (aggregate, version, _) in &seen {
        per_aggregate.entry(aggregate).or_default().push(*version);
    }
    assert_eq!(per_aggregate.len(), AGGREGATES);
    for (aggregate, versions) in &per_aggregate {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{aggregate} observed out of order: {versions:?}"
        );
        assert_eq!(versions.len(), VERSIONS);
    }
    let most = sleepy.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most > 1, "never more than one call at a time: not parallel");
    eprintln!("at most {most} handler calls at once");
    listener.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_handler_creates_each_schedule_exactly_once_across_kills() {
    const LOANS: usize = 600;
    let db = TestDb::new().await;
    let name = unique_name("sqlonce");
    let _slot = SlotGuard(name.clone());
    // No unique key: a second application of an event would show as 24 rows.
    db.client
        .batch_execute(
            "CREATE TABLE payment_schedule ( \
                loan_id text NOT NULL, n int NOT NULL, due_on date NOT NULL, amount numeric NOT NULL); \
             CREATE FUNCTION public.create_schedule(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN \
                 PERFORM pg_sleep(0.003); \
                 INSERT INTO payment_schedule \
                 SELECT event->>'aggregate_id', n, \
                        ((event->>'occurred_at')::timestamptz + n * interval '1 month')::date, \
                        round((event->'payload'->>'amount')::numeric / 12, 2) \
                   FROM generate_series(1, 12) n; \
             END $$;",
        )
        .await
        .expect("app schema");
    let mut config = config_for(&db, &name);
    config.log.level = "info,listener::sink=debug".into();
    config.handlers[0].name = Some("schedule".into());
    config.handlers[0].events = vec!["Loan.Funded".into()];
    config.handlers[0].sink = listener::sink::SqlConfig::new("public.create_schedule").into();
    let file = write_config(&config);

    let mut runs = vec![ListenerProcess::spawn(&file, &[])];
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let dsn = db.dsn.clone();
    let writer = tokio::spawn(async move {
        let client = e2e::connect(&dsn).await;
        for txn in 0..LOANS / 3 {
            let events: Vec<(String, &str)> = (0..3)
                .flat_map(|i| {
                    let loan = format!("loan-{}", txn * 3 + i);
                    [(loan.clone(), "Loan.Funded"), (loan, "Loan.Approved")]
                })
                .collect();
            let batch = Value::Array(
                events
                    .iter()
                    .map(|(id, t)| {
                        json!({"aggregate_type": "Loan", "aggregate_id": id, "event_type": t,
                               "payload": {"amount": 120000}})
                    })
                    .collect(),
            );
            client
                .query("SELECT 1 FROM domain_events.raise_events($1)", &[&batch])
                .await
                .expect("raise_events");
        }
    });

    // Kill mid-work five times: each time once the current run has applied some events.
    for round in 0..5 {
        let start = payment_schedule_rows(&db.client).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while payment_schedule_rows(&db.client).await < start + 12 * 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "run {round} makes no progress; logs:\n{}",
                runs.last().unwrap().stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pause = (Uuid::new_v4().as_u128() % 100) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        runs.last_mut().unwrap().kill9();
        runs.push(ListenerProcess::spawn(&file, &[]));
    }
    writer.await.expect("writer");

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let loans: i64 = db
            .client
            .query_one("SELECT count(DISTINCT loan_id) FROM payment_schedule", &[])
            .await
            .unwrap()
            .get(0);
        if loans == LOANS as i64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{loans} of {LOANS} schedules; logs:\n{}",
            runs.last().unwrap().stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finish_and_assert_schedules_once(&mut runs, &db.client, 12 * LOANS as i64).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());
    // The kills did land mid-stream: restarted runs were handed events already applied.
    let skipped: usize = runs
        .iter()
        .map(|r| r.stderr().matches("already applied").count())
        .sum();
    eprintln!("{} runs, {skipped} redelivered events skipped", runs.len());
    assert!(skipped > 0, "no run was handed an already applied event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sql_handler_dead_letters_and_its_redrive_applies_once() {
    let db = TestDb::new().await;
    let name = unique_name("sqlredrive");
    let _slot = SlotGuard(name.clone());
    db.client
        .batch_execute(
            "CREATE TABLE payment_schedule ( \
                loan_id text NOT NULL, n int NOT NULL, due_on date NOT NULL, amount numeric NOT NULL); \
             CREATE FUNCTION public.create_schedule(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN \
                 IF event->>'aggregate_id' = 'bad' THEN \
                     RAISE EXCEPTION 'no terms for this loan'; \
                 END IF; \
                 INSERT INTO payment_schedule \
                 SELECT event->>'aggregate_id', n, current_date, 1 FROM generate_series(1, 12) n; \
             END $$;",
        )
        .await
        .expect("app schema");
    let mut config = config_for(&db, &name);
    config.replication.redrive_interval_ms = 200;
    config.handlers[0].name = Some("schedule".into());
    config.handlers[0].sink = listener::sink::SqlConfig::new("public.create_schedule").into();
    let file = write_config(&config);
    let mut process = ListenerProcess::spawn(&file, &[]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let ids = raise_types(
        &db.client,
        &[
            ("a", "Loan.Funded"),
            ("bad", "Loan.Funded"),
            ("c", "Loan.Funded"),
        ],
    )
    .await;
    let letters = wait_dead_letters(&db.client, &name, 1, Duration::from_secs(60)).await;
    assert_eq!(letters[0].0, "schedule");
    assert_eq!(letters[0].1, ids[1]);
    assert_eq!(
        letters[0].3, 1,
        "a raised exception is definite: not retried"
    );
    assert!(
        letters[0].4.contains("no terms for this loan"),
        "{letters:?}"
    );
    wait_until(
        "the other schedules exist",
        Duration::from_secs(30),
        || async { payment_schedule_rows(&db.client).await == 24 },
    )
    .await;

    // Fixed, then redriven: applied once, the dead letter removed in the same transaction.
    db.client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION public.create_schedule(event jsonb) RETURNS void \
             LANGUAGE sql AS $$ INSERT INTO payment_schedule \
             SELECT event->>'aggregate_id', n, current_date, 1 FROM generate_series(1, 12) n $$",
        )
        .await
        .expect("fix");
    run_cli_ok(&["dead-letters", "redrive"], &file);
    wait_until(
        "the dead letter is redriven",
        Duration::from_secs(30),
        || async { dead_letters(&db.client, &name).await.is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_loan: Vec<(String, i64)> = db
        .client
        .query(
            "SELECT loan_id, count(*) FROM payment_schedule GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        per_loan,
        [("a".into(), 12), ("bad".into(), 12), ("c".into(), 12)]
    );
    process.stop_ok().await;
}
