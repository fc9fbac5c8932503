//! The event store end to end, against the SQL contract in `docs/sql-api.md`: transactions,
//! optimistic concurrency, gap-free versions, partitions and retention, immutability, the
//! settings, NOTIFY, the seeds' example events and the roles.
//!
//! Malformed input is catalogued separately in `store_malformed.rs`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::store_support::{
    assert_sqlstate, drop_role, login_role, month_partition, partition_of, relation_exists,
    snapshot, Listening,
};
use e2e::{connect, sqlstate, TestDb};
use serde_json::json;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

/// `raise_event` with the first three arguments and a payload; returns `(id, version)`.
async fn raise(client: &Client, aggregate: &str, id: &str, event: &str) -> (Uuid, i64) {
    let row = client
        .query_one(
            "SELECT id, aggregate_version FROM domain_events.raise_event($1, $2, $3, '{}')",
            &[&aggregate, &id, &event],
        )
        .await
        .unwrap_or_else(|e| panic!("raise_event({aggregate}, {id}, {event}): {e}"));
    (row.get(0), row.get(1))
}

/// `raise_event` with the first three arguments: the new version, or the error's SQLSTATE.
async fn try_raise(client: &Client, aggregate: &str, id: &str, event: &str) -> Result<i64, String> {
    client
        .query_one(
            "SELECT aggregate_version FROM domain_events.raise_event($1, $2, $3)",
            &[&aggregate, &id, &event],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .map_err(|e| sqlstate(&e))
}

/// The versions stored for one aggregate, in version order.
async fn stored_versions(client: &Client, aggregate: &str, id: &str) -> Vec<i64> {
    client
        .query(
            "SELECT aggregate_version FROM domain_events.event
              WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY aggregate_version",
            &[&aggregate, &id],
        )
        .await
        .expect("read versions")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `domain_events.aggregate_version(type, id)`.
async fn head_version(client: &Client, aggregate: &str, id: &str) -> i64 {
    client
        .query_one(
            "SELECT domain_events.aggregate_version($1, $2)",
            &[&aggregate, &id],
        )
        .await
        .expect("aggregate_version")
        .get(0)
}

/// `maintain()` as `(action, partition)` pairs, the partition without its schema.
async fn maintain(client: &Client) -> Vec<(String, String)> {
    client
        .query(
            "SELECT action, partition_name FROM domain_events.maintain()",
            &[],
        )
        .await
        .expect("maintain()")
        .iter()
        .map(|r| {
            let name: String = r.get(1);
            (
                r.get(0),
                name.trim_start_matches("domain_events.").to_string(),
            )
        })
        .collect()
}

/// The partitions `maintain()` reported with `action`, sorted.
fn with_action(rows: &[(String, String)], action: &str) -> Vec<String> {
    let mut names: Vec<String> = rows
        .iter()
        .filter(|(a, _)| a == action)
        .map(|(_, p)| p.clone())
        .collect();
    names.sort();
    names
}

/// RFC 3339 text for the start of the UTC month `months` from now, plus `seconds`.
async fn month_instant(client: &Client, months: i32, seconds: f64) -> String {
    client
        .query_one(
            "SELECT to_char(date_trunc('month', now() AT TIME ZONE 'UTC')
                            + make_interval(months => $1, secs => $2),
                            'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[&months, &seconds],
        )
        .await
        .expect("compute an instant")
        .get(0)
}

/// The server process id of a session.
async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid()")
        .get(0)
}

/// Waits until backend `pid` is blocked on a heavyweight lock (a row lock shows as a wait
/// on the holder's transaction id).
async fn wait_until_blocked(observer: &Client, pid: i32) {
    for _ in 0..200 {
        let waiting: Option<String> = observer
            .query_one(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("read pg_stat_activity")
            .get(0);
        if waiting.as_deref() == Some("Lock") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backend {pid} never blocked on a lock");
}

#[tokio::test]
async fn rolled_back_transaction_leaves_no_event() {
    let db = TestDb::new().await;
    let c = db.connect().await;
    c.batch_execute(
        "BEGIN;
         SELECT * FROM domain_events.raise_event('Loan', 'R-1', 'Loan.Opened', '{\"a\": 1}');
         SELECT * FROM domain_events.raise_events(
             '[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"R-2\", \"event_type\": \"Loan.Opened\"}]');",
    )
    .await
    .expect("raise inside a transaction");
    // Visible to the raising transaction (visibility to others while it is open is checked by
    // `writers_of_different_aggregates_do_not_block_each_other`).
    let inside: i64 = c
        .query_one("SELECT count(*) FROM domain_events.event", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(inside, 2);
    c.batch_execute("ROLLBACK").await.unwrap();

    assert_eq!(db.event_count().await, 0);
    let heads = snapshot(&db.client).await.heads;
    assert_eq!(heads, "", "a rolled-back raise leaves no stream head");
    assert_eq!(head_version(&db.client, "Loan", "R-1").await, 0);
    // The next raise starts at version 1: the rollback left no gap.
    assert_eq!(raise(&db.client, "Loan", "R-1", "Loan.Opened").await.1, 1);
}

#[tokio::test]
async fn event_commits_atomically_with_business_row() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE app_loans (id bigint PRIMARY KEY, status text NOT NULL)")
        .await
        .unwrap();
    let c = db.connect().await;

    // Business row and event in one transaction: both commit.
    c.batch_execute(
        "BEGIN;
         INSERT INTO app_loans VALUES (42, 'submitted');
         SELECT * FROM domain_events.raise_event('Loan', 42, 'LoanCreated', '{\"status\": \"submitted\"}');
         COMMIT;",
    )
    .await
    .expect("business row and event");
    let s = snapshot(&db.client).await;
    assert_eq!(
        (s.events, s.heads.as_str(), s.app_rows.as_str()),
        (1, "Loan/42@1", "42:submitted")
    );

    // The event is raised first, then the business insert fails: neither is kept.
    c.batch_execute(
        "BEGIN;
         SELECT * FROM domain_events.raise_event('Loan', 43, 'LoanCreated', '{\"status\": \"submitted\"}');",
    )
    .await
    .unwrap();
    let err = c
        .batch_execute("INSERT INTO app_loans VALUES (42, 'duplicate')")
        .await
        .expect_err("duplicate key");
    assert_eq!(sqlstate(&err), "23505");
    c.batch_execute("COMMIT").await.unwrap(); // an aborted transaction commits as a rollback

    let after = snapshot(&db.client).await;
    assert_eq!(
        after, s,
        "the failed business change took its event with it"
    );
    assert_eq!(head_version(&db.client, "Loan", "43").await, 0);

    // Same through the client's transaction API, with the update and event together.
    let mut c2 = db.connect().await;
    let tx = c2.transaction().await.unwrap();
    tx.execute(
        "UPDATE app_loans SET status = 'approved' WHERE id = 42",
        &[],
    )
    .await
    .unwrap();
    tx.query(
        "SELECT * FROM domain_events.raise_event('Loan', 42, 'LoanStatusChanged',
             '{\"old_status\": \"submitted\", \"new_status\": \"approved\"}', expected_version => 1)",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let s = snapshot(&db.client).await;
    assert_eq!(
        (s.events, s.heads.as_str(), s.app_rows.as_str()),
        (2, "Loan/42@2", "42:approved")
    );
}

#[tokio::test]
async fn racing_writers_on_expected_version_exactly_one_wins() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "42", "LoanCreated").await;
    raise(&db.client, "Loan", "42", "LoanSubmitted").await;

    let a = db.connect().await;
    let b = db.connect().await;
    let b_pid = backend_pid(&b).await;
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let won = a
        .query_one(
            "SELECT aggregate_version FROM domain_events.raise_event('Loan', 42, 'LoanStatusChanged',
                 '{\"old_status\": \"submitted\", \"new_status\": \"approved\"}', expected_version => 2)",
            &[],
        )
        .await
        .expect("first writer");
    assert_eq!(won.get::<_, i64>(0), 3);

    let second = tokio::spawn(async move {
        let r = b
            .query(
                "SELECT aggregate_version FROM domain_events.raise_event('Loan', 42,
                     'LoanStatusChanged',
                     '{\"old_status\": \"submitted\", \"new_status\": \"rejected\"}',
                     expected_version => 2)",
                &[],
            )
            .await;
        (b, r)
    });
    wait_until_blocked(&db.client, b_pid).await;
    assert!(
        !second.is_finished(),
        "the second writer waits for the first one's row lock"
    );
    a.batch_execute("COMMIT").await.unwrap();

    let (b, result) = tokio::time::timeout(Duration::from_secs(15), second)
        .await
        .expect("the second writer resumes once the first commits")
        .unwrap();
    let err = result.expect_err("the second writer must lose");
    assert_eq!(sqlstate(&err), "40001");
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "aggregate Loan/42 is at version 3, expected 2"
    );
    b.batch_execute("ROLLBACK").await.unwrap();

    assert_eq!(
        stored_versions(&db.client, "Loan", "42").await,
        vec![1, 2, 3]
    );
    let status: String = db
        .client
        .query_one(
            "SELECT payload->>'new_status' FROM domain_events.event
              WHERE aggregate_id = '42' AND aggregate_version = 3",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "approved");
}

#[tokio::test]
async fn racing_creators_with_expected_version_zero_exactly_one_wins() {
    let db = TestDb::new().await;
    let a = db.connect().await;
    let b = db.connect().await;
    let b_pid = backend_pid(&b).await;
    let create = "SELECT aggregate_version FROM domain_events.raise_event('User',
                      'u-1', 'UserCreated', '{}', expected_version => 0)";
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    assert_eq!(a.query_one(create, &[]).await.unwrap().get::<_, i64>(0), 1);
    let second = tokio::spawn(async move {
        let r = b.query(create, &[]).await;
        (b, r)
    });
    wait_until_blocked(&db.client, b_pid).await;
    a.batch_execute("COMMIT").await.unwrap();
    let (b, result) = tokio::time::timeout(Duration::from_secs(15), second)
        .await
        .expect("the second creator resumes")
        .unwrap();
    let err = result.expect_err("the second creator must lose");
    assert_eq!(sqlstate(&err), "40001");
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "aggregate User/u-1 is at version 1, expected 0"
    );
    b.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(stored_versions(&db.client, "User", "u-1").await, vec![1]);
}

#[tokio::test]
async fn waiter_wins_when_the_lock_holder_rolls_back() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "7", "LoanCreated").await;
    let a = db.connect().await;
    let b = db.connect().await;
    let b_pid = backend_pid(&b).await;
    let sql = "SELECT aggregate_version FROM domain_events.raise_event('Loan', 7,
                   'LoanSubmitted', '{}', expected_version => 1)";
    a.batch_execute("BEGIN").await.unwrap();
    a.query_one(sql, &[]).await.unwrap();
    let second = tokio::spawn(async move { b.query_one(sql, &[]).await });
    wait_until_blocked(&db.client, b_pid).await;
    a.batch_execute("ROLLBACK").await.unwrap();
    let version = tokio::time::timeout(Duration::from_secs(15), second)
        .await
        .expect("the waiter resumes")
        .unwrap()
        .expect("the waiter now sees version 1 and wins");
    assert_eq!(version.get::<_, i64>(0), 2);
    assert_eq!(stored_versions(&db.client, "Loan", "7").await, vec![1, 2]);
}

/// REPEATABLE READ promises a transaction never updates a row another transaction changed
/// after its snapshot: raising for a stream another transaction moved on since then is a
/// serialization failure (40001) that writes nothing, and the retry continues the stream.
#[tokio::test]
async fn repeatable_read_raise_on_a_stream_moved_since_the_snapshot_is_a_serialization_failure() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "9", "LoanCreated").await;
    let a = db.connect().await;
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let seen: i64 = a
        .query_one("SELECT domain_events.aggregate_version('Loan', '9')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1);
    raise(&db.client, "Loan", "9", "LoanSubmitted").await;
    let sql =
        "SELECT aggregate_version FROM domain_events.raise_event('Loan', '9', 'LoanApproved')";
    let err = a
        .query_one(sql, &[])
        .await
        .expect_err("the head moved after the snapshot");
    assert_eq!(sqlstate(&err), "40001", "{err}");
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(stored_versions(&db.client, "Loan", "9").await, vec![1, 2]);
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let retried: i64 = a.query_one(sql, &[]).await.unwrap().get(0);
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(retried, 3);
}

/// Per-row raising with savepoints in between, as PL/pgSQL exception blocks do: what a
/// rolled-back savepoint raised is gone, heads included, and the stream goes on gap-free.
#[tokio::test]
async fn per_row_raising_across_rolled_back_savepoints_stays_gap_free() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "S-1", "LoanCreated").await;
    let c = db.connect().await;
    c.batch_execute(
        "BEGIN;
         SELECT * FROM generate_series(1, 3) g,
             LATERAL domain_events.raise_event('Loan', 'S-1', 'Loan.Noted', jsonb_build_object('g', g));
         SAVEPOINT s;
         SELECT * FROM generate_series(1, 2) g,
             LATERAL domain_events.raise_event('Loan', 'S-1', 'Loan.Noted', jsonb_build_object('g', g));
         SELECT * FROM domain_events.raise_event('Loan', 'S-2', 'Loan.Created');
         ROLLBACK TO SAVEPOINT s;
         SELECT * FROM generate_series(1, 2) g,
             LATERAL domain_events.raise_event('Loan', 'S-1', 'Loan.Noted', jsonb_build_object('g', g));
         COMMIT;",
    )
    .await
    .expect("per-row raising around a savepoint");
    assert_eq!(
        stored_versions(&db.client, "Loan", "S-1").await,
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(head_version(&db.client, "Loan", "S-1").await, 6);
    assert_eq!(head_version(&db.client, "Loan", "S-2").await, 0);
}

/// A batch locks the heads of its streams in key order, as the batch statement upserts them,
/// whatever order its items come in: a batch for B then A waits for a transaction holding A
/// without holding B, so that transaction can go on to raise for B. Locked in item order, the
/// two would deadlock (40P01).
#[tokio::test]
async fn a_batch_locks_stream_heads_in_key_order_whatever_its_item_order() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "K-A", "Loan.Opened").await;
    raise(&db.client, "Loan", "K-B", "Loan.Opened").await;
    let a = db.connect().await;
    let b = db.connect().await;
    let b_pid = backend_pid(&b).await;
    a.batch_execute("SET deadlock_timeout = '100ms'; BEGIN")
        .await
        .unwrap();
    raise(&a, "Loan", "K-A", "Loan.Noted").await;
    let batch = json!([
        { "aggregate_type": "Loan", "aggregate_id": "K-B", "event_type": "Loan.Batched" },
        { "aggregate_type": "Loan", "aggregate_id": "K-A", "event_type": "Loan.Batched" }
    ]);
    let batched = tokio::spawn(async move {
        b.query(
            "SELECT aggregate_version FROM domain_events.raise_events($1)",
            &[&batch],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>())
    });
    wait_until_blocked(&db.client, b_pid).await;
    // Were the batch holding K-B, this would close a cycle, found after `a`'s 100 ms.
    assert_eq!(
        try_raise(&a, "Loan", "K-B", "Loan.Noted").await,
        Ok(2),
        "the holder of K-A raises for K-B while the batch waits (40P01 = deadlock)"
    );
    a.batch_execute("COMMIT").await.unwrap();
    let versions = tokio::time::timeout(Duration::from_secs(15), batched)
        .await
        .expect("the batch resumes")
        .unwrap()
        .map_err(|e| sqlstate(&e));
    assert_eq!(
        versions,
        Ok(vec![3, 3]),
        "K-B then K-A, each after the holder's event"
    );
    assert_eq!(
        stored_versions(&db.client, "Loan", "K-A").await,
        vec![1, 2, 3]
    );
    assert_eq!(
        stored_versions(&db.client, "Loan", "K-B").await,
        vec![1, 2, 3]
    );
}

/// A connection whose server notices are collected as `(severity, message)`.
async fn connect_collecting_notices(dsn: &str) -> (Client, Arc<Mutex<Vec<(String, String)>>>) {
    let (client, mut connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .expect("connect to the private cluster");
    let notices = Arc::new(Mutex::new(Vec::new()));
    let collected = notices.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notice(notice) = message {
                collected
                    .lock()
                    .expect("notices")
                    .push((notice.severity().to_string(), notice.message().to_string()));
            }
        }
    });
    (client, notices)
}

/// Raises that fail inside the append itself (a `CHECK` constraint someone added to the event
/// table), caught by a PL/pgSQL exception block in the middle of a per-row statement, leave
/// nothing of the statement's shared append state behind: the raises around them go on
/// gap-free, and the commit finds no relation or buffer left open (Postgres warns of any).
#[tokio::test]
async fn raises_failing_inside_exception_blocks_leave_no_resource_open() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "E-1", "Loan.Opened").await;
    raise(&db.client, "Loan", "E-2", "Loan.Opened").await;
    db.client
        .batch_execute(
            "ALTER TABLE domain_events.event
                 ADD CONSTRAINT no_refusals CHECK (event_type <> 'Loan.Refused');
             CREATE FUNCTION public.raise_or_skip(event_type text) RETURNS bigint
             LANGUAGE plpgsql AS $$
             DECLARE v bigint;
             BEGIN
                 SELECT aggregate_version INTO v
                   FROM domain_events.raise_event('Loan', 'E-1', event_type);
                 RETURN v;
             EXCEPTION WHEN check_violation THEN RETURN NULL;
             END $$;",
        )
        .await
        .unwrap();
    let (c, notices) = connect_collecting_notices(&db.dsn).await;
    c.batch_execute("BEGIN").await.unwrap();
    let rows = c
        .query(
            "SELECT public.raise_or_skip(CASE WHEN g % 2 = 0 THEN 'Loan.Refused' ELSE 'Loan.Noted' END),
                    r.aggregate_version
               FROM generate_series(1, 6) g,
                    LATERAL domain_events.raise_event('Loan', 'E-2', 'Loan.Noted',
                                                      jsonb_build_object('g', g)) r
              ORDER BY g",
            &[],
        )
        .await
        .expect("the statement goes on past the refused raises");
    c.batch_execute("COMMIT").await.unwrap();
    let skipped: Vec<Option<i64>> = rows.iter().map(|r| r.get(0)).collect();
    let versions: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(skipped, vec![Some(2), None, Some(3), None, Some(4), None]);
    assert_eq!(versions, vec![2, 3, 4, 5, 6, 7]);
    assert_eq!(
        stored_versions(&db.client, "Loan", "E-1").await,
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        stored_versions(&db.client, "Loan", "E-2").await,
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    // A notice arrives before the reply to the command after it.
    c.batch_execute("SELECT 1").await.unwrap();
    let notices = notices.lock().expect("notices").clone();
    assert!(
        notices.iter().all(|(severity, _)| severity != "WARNING"),
        "warnings at commit: {notices:?}"
    );
}

/// Straight after `CREATE EXTENSION` (no `maintain()` yet), an open transaction that raised
/// an event must not block readers or the writers of other aggregates (docs/sql-api.md,
/// `domain_events.aggregate`: writers of different aggregates are not serialised).
#[tokio::test]
async fn writers_of_different_aggregates_do_not_block_each_other() {
    let db = TestDb::new().await;
    let a = db.connect().await;
    a.batch_execute(
        "BEGIN;
         SELECT * FROM domain_events.raise_event('Loan', 'A-1', 'Loan.Opened');",
    )
    .await
    .unwrap();
    let b = db.connect().await;
    b.batch_execute("SET statement_timeout = '5s'")
        .await
        .unwrap();
    let read = b
        .query_one("SELECT count(*) FROM domain_events.event", &[])
        .await
        .map(|r| r.get::<_, i64>(0));
    assert_eq!(
        read.map_err(|e| sqlstate(&e)),
        Ok(0),
        "a reader waits for the open raising transaction (57014 = statement timeout)"
    );
    assert_eq!(
        try_raise(&b, "Loan", "B-1", "Loan.Opened").await,
        Ok(1),
        "a writer of another aggregate waits for the open raising transaction"
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(db.event_count().await, 2);
}

/// The event-sourcing pattern (load the aggregate, then raise with `expected_version`) in two
/// sessions at once, straight after `CREATE EXTENSION`: both must commit. Creating the month's
/// partition inside one of them must not deadlock with the other's read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_then_raise_in_two_sessions_does_not_deadlock() {
    let db = TestDb::new().await;
    let mut sessions = Vec::new();
    for id in ["A-1", "B-1"] {
        let c = db.connect().await;
        c.batch_execute("SET statement_timeout = '10s'; BEGIN;")
            .await
            .unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM domain_events.aggregate_events('Loan', $1)",
                &[&id],
            )
            .await
            .expect("load the aggregate")
            .get(0);
        assert_eq!(n, 0);
        sessions.push((id, c));
    }
    let mut tasks = Vec::new();
    for (id, c) in sessions {
        tasks.push(tokio::spawn(async move {
            let raised = c
                .query_one(
                    "SELECT aggregate_version FROM domain_events.raise_event('Loan', $1,
                         'Loan.Opened', '{}', expected_version => 0)",
                    &[&id],
                )
                .await;
            let outcome = match raised {
                Ok(_) => c.batch_execute("COMMIT").await.map_err(|e| sqlstate(&e)),
                Err(e) => Err(sqlstate(&e)),
            };
            (id, outcome)
        }));
    }
    for task in tasks {
        let (id, outcome) = task.await.unwrap();
        assert_eq!(
            outcome,
            Ok(()),
            "session raising Loan/{id} (40P01 = deadlock, 57014 = statement timeout)"
        );
    }
    assert_eq!(db.event_count().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_gap_free_under_concurrency() {
    const WORKERS: i64 = 4;
    const PER_WORKER: i64 = 50;
    let db = TestDb::new().await;
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let dsn = db.dsn.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&dsn).await;
            let mut versions = Vec::new();
            for i in 0..PER_WORKER {
                // Rolled-back raises in between must not leave holes.
                if i % 10 == 3 {
                    c.batch_execute(
                        "BEGIN;
                         SELECT * FROM domain_events.raise_event('Counter', 'c-1', 'Counter.Ghost');
                         ROLLBACK;",
                    )
                    .await
                    .expect("rolled-back raise");
                }
                let payload = json!({ "worker": worker, "i": i });
                let row = c
                    .query_one(
                        "SELECT aggregate_version FROM domain_events.raise_event('Counter', 'c-1',
                             'Counter.Incremented', $1)",
                        &[&payload],
                    )
                    .await
                    .expect("concurrent raise");
                versions.push(row.get::<_, i64>(0));
            }
            versions
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        let versions = task.await.unwrap();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "one session's versions increase: {versions:?}"
        );
        for v in versions {
            assert!(all.insert(v), "version {v} handed out twice");
        }
    }
    let expected: Vec<i64> = (1..=WORKERS * PER_WORKER).collect();
    assert_eq!(all.into_iter().collect::<Vec<_>>(), expected);
    assert_eq!(
        stored_versions(&db.client, "Counter", "c-1").await,
        expected
    );
    assert_eq!(
        head_version(&db.client, "Counter", "c-1").await,
        WORKERS * PER_WORKER
    );
    let row = db
        .client
        .query_one(
            "SELECT count(DISTINCT id), count(DISTINCT position),
                    count(*) FILTER (WHERE event_type = 'Counter.Ghost'),
                    -- Writers of one aggregate are serialised, so a later version must also have
                    -- a later position: notify-mode consumers read by position (DESIGN §4).
                    bool_and(position_order = aggregate_version)
               FROM (SELECT id, position, event_type, aggregate_version,
                            row_number() OVER (ORDER BY position) AS position_order
                       FROM domain_events.event) e",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), WORKERS * PER_WORKER, "ids are unique");
    assert_eq!(
        row.get::<_, i64>(1),
        WORKERS * PER_WORKER,
        "positions are unique"
    );
    assert_eq!(row.get::<_, i64>(2), 0, "rolled-back events are gone");
    assert!(
        row.get::<_, bool>(3),
        "per aggregate, position order is version order"
    );
}

#[tokio::test]
async fn imported_history_lands_in_its_monthly_partitions() {
    let db = TestDb::new().await;
    let events = json!([
        { "aggregate_type": "Legacy", "aggregate_id": "L-1", "event_type": "Legacy.Opened",
          "payload": { "n": 1 }, "occurred_at": "1999-03-15T09:59:00Z",
          "recorded_at": "1999-03-15T10:00:00Z" },
        { "aggregate_type": "Legacy", "aggregate_id": "L-1", "event_type": "Legacy.Renewed",
          "recorded_at": "2099-11-02T10:00:00Z" },
        // 2099-11-30 23:30 in New York is already December in UTC.
        { "aggregate_type": "Legacy", "aggregate_id": "L-1", "event_type": "Legacy.Renewed",
          "recorded_at": "2099-11-30T23:30:00-05:00" },
        // The lower bound of a month belongs to it, the instant before to the month before.
        { "aggregate_type": "Legacy", "aggregate_id": "L-1", "event_type": "Legacy.Renewed",
          "recorded_at": "2099-11-01T00:00:00Z" },
        { "aggregate_type": "Legacy", "aggregate_id": "L-1", "event_type": "Legacy.Renewed",
          "recorded_at": "2099-10-31T23:59:59.999999Z" }
    ]);
    // Months are UTC months, whatever the importing session's time zone (UTC+14 here).
    let importer = db.connect().await;
    importer
        .batch_execute("SET TimeZone = 'Pacific/Kiritimati'")
        .await
        .unwrap();
    importer
        .query("SELECT * FROM domain_events.import_events($1)", &[&events])
        .await
        .expect("import_events");
    let rows = db
        .client
        .query(
            "SELECT aggregate_version, tableoid::regclass::text,
                    to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'),
                    to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS')
               FROM domain_events.event WHERE aggregate_type = 'Legacy'
              ORDER BY aggregate_version",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected = [
        (
            1,
            "domain_events.event_p199903",
            "1999-03-15T10:00:00.000000",
        ),
        (
            2,
            "domain_events.event_p209911",
            "2099-11-02T10:00:00.000000",
        ),
        (
            3,
            "domain_events.event_p209912",
            "2099-12-01T04:30:00.000000",
        ),
        (
            4,
            "domain_events.event_p209911",
            "2099-11-01T00:00:00.000000",
        ),
        (
            5,
            "domain_events.event_p209910",
            "2099-10-31T23:59:59.999999",
        ),
    ];
    let expected: Vec<(i64, String, String)> = expected
        .iter()
        .map(|(v, p, t)| (*v, p.to_string(), t.to_string()))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        rows[0].get::<_, String>(3),
        "1999-03-15T09:59:00",
        "occurred_at kept"
    );

    // Monthly partitions bounded by UTC months.
    let c = db.connect().await;
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let bounds: String = c
        .query_one(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class
              WHERE oid = 'domain_events.event_p199903'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        bounds,
        "FOR VALUES FROM ('1999-03-01 00:00:00+00') TO ('1999-04-01 00:00:00+00')"
    );
    let in_default: i64 = db
        .client
        .query_one("SELECT count(*) FROM domain_events.event_default", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        in_default, 0,
        "on-demand partitions, not the default partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creators_of_one_partition_all_succeed() {
    let db = TestDb::new().await;
    let mut tasks = Vec::new();
    for i in 1..=6 {
        let dsn = db.dsn.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&dsn).await;
            let events = json!([{ "aggregate_type": "Legacy", "aggregate_id": format!("L-{i}"),
                                  "event_type": "Legacy.Imported",
                                  "recorded_at": format!("2077-07-{:02}T12:00:00Z", i) }]);
            c.query("SELECT * FROM domain_events.import_events($1)", &[&events])
                .await
        }));
    }
    for task in tasks {
        task.await
            .unwrap()
            .expect("every concurrent import succeeds");
    }
    let rows = db
        .client
        .query(
            "SELECT DISTINCT tableoid::regclass::text FROM domain_events.event",
            &[],
        )
        .await
        .unwrap();
    let partitions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(partitions, vec!["domain_events.event_p207707".to_string()]);
    assert_eq!(db.event_count().await, 6);
}

#[tokio::test]
async fn raised_events_land_in_the_current_month_even_without_its_partition() {
    let db = TestDb::new().await;
    let current = month_partition(&db.client, 0).await;
    let (id, _) = raise(&db.client, "Loan", "1", "Loan.Opened").await;
    assert_eq!(
        partition_of(&db.client, id).await,
        format!("domain_events.{current}")
    );

    // Without the month's partition, a fresh session creates it on demand.
    let fresh = TestDb::new().await;
    fresh
        .client
        .batch_execute(&format!("DROP TABLE IF EXISTS domain_events.{current}"))
        .await
        .expect("drop the empty current partition");
    assert!(!relation_exists(&fresh.client, &current).await);
    let c = fresh.connect().await;
    let (id, version) = raise(&c, "Loan", "1", "Loan.Opened").await;
    assert_eq!(version, 1);
    assert_eq!(
        partition_of(&c, id).await,
        format!("domain_events.{current}")
    );
}

#[tokio::test]
async fn stray_insert_lands_in_default_and_maintain_moves_it_out() {
    let db = TestDb::new().await;
    let id: Uuid = db
        .client
        .query_one(
            "INSERT INTO domain_events.event (position, id, aggregate_type, aggregate_id,
                 aggregate_version, event_type, event_version, payload, metadata, occurred_at,
                 recorded_at, txid)
             VALUES (nextval('domain_events.event_position_seq'), gen_random_uuid(), 'Stray',
                 's-1', 1, 'Stray.Inserted', 1, '{\"k\": \"v\"}', '{}', '2150-06-15T12:00:00Z',
                 '2150-06-15T12:00:00Z', pg_current_xact_id())
             RETURNING id",
            &[],
        )
        .await
        .expect("a direct INSERT by the superuser")
        .get(0);
    assert_eq!(
        partition_of(&db.client, id).await,
        "domain_events.event_default"
    );

    let report = maintain(&db.client).await;
    assert_eq!(
        with_action(&report, "moved"),
        vec!["event_p215006".to_string()]
    );
    assert_eq!(
        partition_of(&db.client, id).await,
        "domain_events.event_p215006"
    );
    let row = db
        .client
        .query_one(
            "SELECT (SELECT count(*) FROM domain_events.event_default),
                    (SELECT count(*) FROM domain_events.event),
                    (SELECT payload->>'k' FROM domain_events.event WHERE id = $1)",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "the default partition is empty again"
    );
    assert_eq!(
        row.get::<_, i64>(1),
        1,
        "the row was moved, not lost or copied"
    );
    assert_eq!(row.get::<_, String>(2), "v");
    assert!(with_action(&maintain(&db.client).await, "moved").is_empty());
}

#[tokio::test]
async fn maintain_premakes_partitions_ahead() {
    let db = TestDb::new().await;
    // CREATE EXTENSION premade this month and the next two: drop them (empty), so what exists
    // afterwards is maintain()'s doing.
    let mut premade = Vec::new();
    for offset in 0..=2 {
        let name = month_partition(&db.client, offset).await;
        db.client
            .batch_execute(&format!("DROP TABLE domain_events.{name}"))
            .await
            .expect("drop a premade partition");
        assert!(!relation_exists(&db.client, &name).await);
        premade.push(name);
    }
    // Run from a session far from UTC: partitions are still UTC months.
    let far = db.connect().await;
    far.batch_execute("SET TimeZone = 'Pacific/Kiritimati'")
        .await
        .unwrap();
    let created = with_action(&maintain(&far).await, "created");
    assert_eq!(
        created, premade,
        "maintain() created this month and two ahead"
    );
    for name in &premade {
        assert!(relation_exists(&db.client, name).await, "{name} premade");
    }
    let third = month_partition(&db.client, 3).await;
    assert!(
        !relation_exists(&db.client, &third).await,
        "premake_months defaults to 2"
    );
    assert!(
        with_action(&maintain(&db.client).await, "created").is_empty(),
        "a second maintain() has nothing to create"
    );

    db.client
        .batch_execute("SET domain_events.premake_months = 4")
        .await
        .unwrap();
    let created = with_action(&maintain(&db.client).await, "created");
    let expected = vec![
        month_partition(&db.client, 3).await,
        month_partition(&db.client, 4).await,
    ];
    assert_eq!(created, expected);

    // Partitions are bounded by UTC months, whatever the session's time zone.
    let c = db.connect().await;
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let current = month_partition(&c, 0).await;
    let row = c
        .query_one(
            "SELECT pg_get_expr(c.relpartbound, c.oid),
                    format('FOR VALUES FROM (%L) TO (%L)',
                           date_trunc('month', now()), date_trunc('month', now()) + interval '1 month')
               FROM pg_class c WHERE c.oid = format('domain_events.%I', $1::text)::regclass",
            &[&current],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), row.get::<_, String>(1));
}

/// Events in partitions 30 and 13 months back (wholly past a 12-month retention), 12 months
/// back (its range ends inside the retention window, though its row is older than it) and now.
async fn history_for_retention(db: &TestDb) -> [String; 4] {
    let c = &db.client;
    let mut partitions = Vec::new();
    let mut events = Vec::new();
    for (months, seconds) in [(-30, 86_400.0), (-13, 86_400.0), (-12, 1.0)] {
        partitions.push(month_partition(c, months).await);
        events.push(json!({
            "aggregate_type": "Old", "aggregate_id": format!("o{months}"),
            "event_type": "Old.Happened", "recorded_at": month_instant(c, months, seconds).await
        }));
    }
    c.query(
        "SELECT * FROM domain_events.import_events($1)",
        &[&json!(events)],
    )
    .await
    .expect("import history");
    raise(c, "Loan", "now", "Loan.Opened").await;
    partitions.push(month_partition(c, 0).await);
    [
        partitions[0].clone(),
        partitions[1].clone(),
        partitions[2].clone(),
        partitions[3].clone(),
    ]
}

#[tokio::test]
async fn retention_drops_whole_old_partitions() {
    let db = TestDb::new().await;
    let [p30, p13, p12, current] = history_for_retention(&db).await;

    // No retention configured: history is kept forever.
    let report = maintain(&db.client).await;
    assert!(
        with_action(&report, "dropped").is_empty() && with_action(&report, "detached").is_empty()
    );
    assert_eq!(db.event_count().await, 4);

    let c = db.connect().await;
    c.batch_execute(
        "SET domain_events.retention = '12 months';
         SET domain_events.retention_action = 'drop';
         BEGIN;",
    )
    .await
    .unwrap();
    let report = maintain(&c).await;
    let deleted: i64 = c
        .query_one(
            "SELECT coalesce(sum(n_tup_del), 0)::bigint FROM pg_stat_xact_user_tables
              WHERE schemaname = 'domain_events'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.batch_execute("COMMIT").await.unwrap();

    let mut expected = vec![p30.clone(), p13.clone()];
    expected.sort();
    assert_eq!(with_action(&report, "dropped"), expected);
    assert!(with_action(&report, "detached").is_empty());
    assert_eq!(deleted, 0, "retention never deletes rows");
    assert!(!relation_exists(&db.client, &p30).await);
    assert!(!relation_exists(&db.client, &p13).await);
    assert!(relation_exists(&db.client, &p12).await);
    assert!(relation_exists(&db.client, &current).await);
    let kept: Vec<String> = db
        .client
        .query(
            "SELECT aggregate_id FROM domain_events.event ORDER BY aggregate_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // o-12's row is older than 12 months, but its partition is not wholly expired.
    assert_eq!(kept, vec!["now".to_string(), "o-12".to_string()]);
    assert!(
        with_action(&maintain(&c).await, "dropped").is_empty(),
        "nothing left to drop"
    );
}

#[tokio::test]
async fn retention_detaches_by_default() {
    let db = TestDb::new().await;
    let [p30, p13, p12, _] = history_for_retention(&db).await;
    db.client
        .batch_execute("SET domain_events.retention = '12 months'")
        .await
        .unwrap();
    let report = maintain(&db.client).await;
    assert!(with_action(&report, "dropped").is_empty());
    assert_eq!(db.event_count().await, 2);
    // The contract does not name the detached table; it is the one maintain() reports, and
    // it must carry its month.
    let detached = with_action(&report, "detached");
    assert_eq!(detached.len(), 2, "two partitions detached: {report:?}");
    for (old, aggregate) in [(&p30, "o-30"), (&p13, "o-13")] {
        let month = old.trim_start_matches("event_p");
        let name = detached
            .iter()
            .find(|d| d.ends_with(month))
            .unwrap_or_else(|| panic!("no detached table for {month}: {detached:?}"));
        let row = db
            .client
            .query_one(
                &format!(
                    "SELECT c.relispartition, c.relkind::text,
                            (SELECT string_agg(aggregate_id, ',') FROM domain_events.{name})
                       FROM pg_class c WHERE c.oid = 'domain_events.{name}'::regclass"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("detached {name} is left as a table: {e}"));
        assert!(!row.get::<_, bool>(0), "{name} is no longer a partition");
        assert_eq!(row.get::<_, String>(1), "r", "{name} is a plain table");
        assert_eq!(
            row.get::<_, String>(2),
            aggregate,
            "{name} keeps its rows for archiving"
        );
    }
    assert!(with_action(&maintain(&db.client).await, "detached").is_empty());
    assert!(relation_exists(&db.client, &p12).await);
}

#[tokio::test]
async fn update_delete_truncate_are_refused_for_the_superuser() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "1", "Loan.Opened").await;
    raise(&db.client, "Loan", "1", "Loan.Funded").await;
    let before = snapshot(&db.client).await;
    let current = month_partition(&db.client, 0).await;
    for table in [
        "domain_events.event".to_string(),
        format!("domain_events.{current}"),
    ] {
        for sql in [
            format!("UPDATE {table} SET payload = '{{\"tampered\": true}}'"),
            format!("UPDATE {table} SET aggregate_version = aggregate_version + 10 WHERE aggregate_version = 2"),
            format!("DELETE FROM {table}"),
            format!("DELETE FROM {table} WHERE aggregate_version = 1"),
            format!("TRUNCATE {table}"),
            format!("TRUNCATE {table} CASCADE"),
        ] {
            assert_sqlstate(&db.client, &sql, "55000").await;
        }
    }
    assert_sqlstate(&db.client, "TRUNCATE domain_events.event_default", "55000").await;
    assert_eq!(snapshot(&db.client).await, before);
    let tampered: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM domain_events.event WHERE payload ? 'tampered'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tampered, 0);
}

#[tokio::test]
async fn enabled_off_is_a_no_op_and_read_only_refuses() {
    let db = TestDb::new().await;
    let c = db.connect().await;
    c.batch_execute("SET domain_events.enabled = off")
        .await
        .unwrap();
    let rows = c
        .query(
            "SELECT * FROM domain_events.raise_event('Loan', 'd-1', 'Loan.Opened')",
            &[],
        )
        .await
        .expect("a dark-launched raise succeeds");
    assert!(rows.is_empty(), "returns no rows");
    let batch =
        json!([{ "aggregate_type": "Loan", "aggregate_id": "d-2", "event_type": "Loan.Opened" }]);
    let rows = c
        .query("SELECT * FROM domain_events.raise_events($1)", &[&batch])
        .await
        .unwrap();
    assert!(rows.is_empty());
    let s = snapshot(&db.client).await;
    assert_eq!(
        (s.events, s.heads.as_str()),
        (0, ""),
        "nothing written while off"
    );

    c.batch_execute("SET domain_events.enabled = read_only")
        .await
        .unwrap();
    assert_sqlstate(
        &c,
        "SELECT * FROM domain_events.raise_event('Loan', 'd-1', 'Loan.Opened')",
        "25006",
    )
    .await;
    assert_sqlstate(
        &c,
        "SELECT * FROM domain_events.raise_event('Loan', 7, 'Loan.Opened')",
        "25006",
    )
    .await;
    assert_sqlstate(
        &c,
        "SELECT * FROM domain_events.raise_events('[{\"aggregate_type\": \"Loan\",
             \"aggregate_id\": \"d-2\", \"event_type\": \"Loan.Opened\"}]')",
        "25006",
    )
    .await;
    assert_eq!(db.event_count().await, 0);

    c.batch_execute("SET domain_events.enabled = on")
        .await
        .unwrap();
    assert_eq!(raise(&c, "Loan", "d-1", "Loan.Opened").await.1, 1);
    assert_sqlstate(&c, "SET domain_events.enabled = maybe", "22023").await;
}

/// Runs `sql` on `w`, then a marker notification; returns how many notifications arrived on
/// `domain_events` in between.
async fn notifications_after(
    listener: &mut Listening,
    w: &Client,
    marker: &mut u32,
    sql: &str,
) -> usize {
    w.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    *marker += 1;
    w.batch_execute(&format!("NOTIFY pgde_marker, '{marker}'"))
        .await
        .unwrap();
    let seen = listener
        .until_marker("pgde_marker", &marker.to_string())
        .await;
    seen.iter()
        .filter(|n| n.channel() == "domain_events")
        .count()
}

#[tokio::test]
async fn notify_sends_one_notification_per_committed_transaction() {
    let db = TestDb::new().await;
    let mut listener = Listening::connect(&db.dsn, &["domain_events", "pgde_marker"]).await;
    let w = db.connect().await;
    let mut marker = 0;
    let raise_one = "SELECT * FROM domain_events.raise_event('Loan', 'n-1', 'Loan.Noted');";
    assert_eq!(
        notifications_after(&mut listener, &w, &mut marker, raise_one).await,
        0,
        "notify is off by default"
    );

    w.batch_execute("SET domain_events.notify = on")
        .await
        .unwrap();
    let several = "BEGIN;
        SELECT * FROM domain_events.raise_event('Loan', 'n-1', 'Loan.Noted');
        SELECT * FROM domain_events.raise_event('Loan', 'n-2', 'Loan.Noted', '{\"x\": 1}');
        SELECT * FROM domain_events.raise_events('[
            {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"n-3\", \"event_type\": \"Loan.Noted\"},
            {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"n-3\", \"event_type\": \"Loan.Noted\"}]');
        COMMIT;";
    assert_eq!(
        notifications_after(&mut listener, &w, &mut marker, several).await,
        1,
        "one per transaction, not per event"
    );
    let rolled_back =
        "BEGIN; SELECT * FROM domain_events.raise_event('Loan', 'n-1', 'Loan.Noted'); ROLLBACK;";
    assert_eq!(
        notifications_after(&mut listener, &w, &mut marker, rolled_back).await,
        0,
        "none for a rollback"
    );
    assert_eq!(
        notifications_after(&mut listener, &w, &mut marker, raise_one).await,
        1,
        "autocommit raise"
    );
    let partly = "BEGIN;
        SELECT * FROM domain_events.raise_event('Loan', 'n-1', 'Loan.Noted');
        SAVEPOINT s;
        SELECT * FROM domain_events.raise_event('Loan', 'n-2', 'Loan.Noted');
        ROLLBACK TO SAVEPOINT s;
        COMMIT;";
    assert_eq!(
        notifications_after(&mut listener, &w, &mut marker, partly).await,
        1,
        "a committed event survives a savepoint rollback"
    );
    let no_event = "BEGIN; SELECT 1; COMMIT;";
    assert_eq!(
        notifications_after(&mut listener, &w, &mut marker, no_event).await,
        0,
        "no event, no notification"
    );
    assert_eq!(db.event_count().await, 7);
}

#[tokio::test]
async fn notify_ignores_events_rolled_back_to_a_savepoint() {
    let db = TestDb::new().await;
    let mut listener = Listening::connect(&db.dsn, &["domain_events", "pgde_marker"]).await;
    let w = db.connect().await;
    w.batch_execute(
        "SET domain_events.notify = on;
         BEGIN;
         SAVEPOINT s;
         SELECT * FROM domain_events.raise_event('Loan', 'n-1', 'Loan.Noted');
         ROLLBACK TO SAVEPOINT s;
         COMMIT;
         NOTIFY pgde_marker, 'done';",
    )
    .await
    .unwrap();
    let seen = listener.until_marker("pgde_marker", "done").await;
    assert_eq!(
        seen.iter()
            .filter(|n| n.channel() == "domain_events")
            .count(),
        0,
        "the transaction committed no event"
    );
    assert_eq!(db.event_count().await, 0);
}

#[tokio::test]
async fn seed_examples_work_from_plain_sql() {
    let db = TestDb::new().await;
    let user = "7b0c9a8e-2f4d-4c1b-9a57-3e6f8d2c1b0a";
    db.client
        .batch_execute(&format!(
            "SELECT * FROM domain_events.raise_event('User', '{user}', 'UserCreated',
                 '{{\"email\": \"ada@example.com\", \"name\": \"Ada\"}}');
             -- The LoanStatusChanged example expects Loan 42 to exist already.
             SELECT * FROM domain_events.raise_event('Loan', 42, 'LoanCreated', '{{\"status\": \"submitted\"}}');
             SELECT * FROM domain_events.raise_event('Loan', 42, 'LoanStatusChanged',
                 '{{\"old_status\": \"submitted\", \"new_status\": \"approved\"}}', expected_version => 1);
             SELECT * FROM domain_events.raise_event('ticket', 'T-1001', 'ticket.created', '{{\"status\": \"submitted\"}}',
                 '{{\"actor\": \"dev-1\", \"source\": \"core\"}}');
             SELECT * FROM domain_events.raise_event('Loan', 42, 'Loan.Funded', '{{\"amount\": 100000, \"rate\": 7.5, \"term_months\": 12}}');
             -- uuid and bigint overloads address the same streams as their text forms.
             SELECT * FROM domain_events.raise_event('User', '{user}'::uuid, 'UserEmailChanged',
                 '{{\"email\": \"ada@lovelace.example\"}}');
             SELECT * FROM domain_events.raise_event('Loan', 42::bigint, 'Loan.Repaid', '{{}}', expected_version => 3);
             SELECT * FROM domain_events.raise_event('Loan', 9007199254740993, 'LoanCreated');"
        ))
        .await
        .expect("the documented examples");

    let rows = db
        .client
        .query(
            "SELECT aggregate_type, aggregate_id, aggregate_version, event_type, payload, metadata
               FROM domain_events.event ORDER BY position",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(
        String,
        String,
        i64,
        String,
        serde_json::Value,
        serde_json::Value,
    )> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let e = |t: &str, id: &str, v: i64, ty: &str, p: serde_json::Value, m: serde_json::Value| {
        (t.to_string(), id.to_string(), v, ty.to_string(), p, m)
    };
    let expected = vec![
        e(
            "User",
            user,
            1,
            "UserCreated",
            json!({"email": "ada@example.com", "name": "Ada"}),
            json!({}),
        ),
        e(
            "Loan",
            "42",
            1,
            "LoanCreated",
            json!({"status": "submitted"}),
            json!({}),
        ),
        e(
            "Loan",
            "42",
            2,
            "LoanStatusChanged",
            json!({"old_status": "submitted", "new_status": "approved"}),
            json!({}),
        ),
        e(
            "ticket",
            "T-1001",
            1,
            "ticket.created",
            json!({"status": "submitted"}),
            json!({"actor": "dev-1", "source": "core"}),
        ),
        e(
            "Loan",
            "42",
            3,
            "Loan.Funded",
            json!({"amount": 100000, "rate": 7.5, "term_months": 12}),
            json!({}),
        ),
        e(
            "User",
            user,
            2,
            "UserEmailChanged",
            json!({"email": "ada@lovelace.example"}),
            json!({}),
        ),
        e("Loan", "42", 4, "Loan.Repaid", json!({}), json!({})),
        e(
            "Loan",
            "9007199254740993",
            1,
            "LoanCreated",
            json!({}),
            json!({}),
        ),
    ];
    assert_eq!(got, expected);

    // Reading them back through the read API, in version order.
    let funded: Vec<(i64, String)> = db
        .client
        .query(
            "SELECT aggregate_version, event_type FROM domain_events.aggregate_events('Loan', '42', 2)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        funded,
        vec![
            (2, "LoanStatusChanged".to_string()),
            (3, "Loan.Funded".to_string()),
            (4, "Loan.Repaid".to_string())
        ]
    );
}

#[tokio::test]
async fn a_raised_event_row_matches_the_contract() {
    let db = TestDb::new().await;
    let mut c = db.connect().await;
    let tx = c.transaction().await.unwrap();
    let metadata = json!({"actor": "u-1", "correlation_id": 17, "custom": {"x": [1, 2]}});
    let ret = tx
        .query_one(
            "SELECT id, position, aggregate_version, recorded_at = now()
               FROM domain_events.raise_event('Loan', 'L-7', 'Loan.Opened', '{\"amount\": 5}', $1)",
            &[&metadata],
        )
        .await
        .unwrap();
    let id: Uuid = ret.get(0);
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
    assert!(
        ret.get::<_, bool>(3),
        "recorded_at is the transaction's now()"
    );
    let row = tx
        .query_one(
            "SELECT position, aggregate_type, aggregate_id, aggregate_version, event_type,
                    event_version, payload, metadata, occurred_at = now(), recorded_at = now(),
                    txid = pg_current_xact_id()
               FROM domain_events.event WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), ret.get::<_, i64>(1));
    assert_eq!(row.get::<_, String>(1), "Loan");
    assert_eq!(row.get::<_, String>(2), "L-7");
    assert_eq!(row.get::<_, i64>(3), 1);
    assert_eq!(row.get::<_, String>(4), "Loan.Opened");
    assert_eq!(row.get::<_, i32>(5), 1, "event_version defaults to 1");
    assert_eq!(row.get::<_, serde_json::Value>(6), json!({"amount": 5}));
    assert_eq!(
        row.get::<_, serde_json::Value>(7),
        metadata,
        "metadata kept as given"
    );
    assert!(row.get::<_, bool>(8), "occurred_at defaults to now()");
    assert!(row.get::<_, bool>(9));
    assert!(row.get::<_, bool>(10), "txid is the raising transaction's");
    tx.commit().await.unwrap();

    c.query(
        "SELECT * FROM domain_events.raise_event('Loan', 'L-7', 'Loan.Approved', '{}', '{}', 1,
             '2020-01-02T03:04:05+01:00', 3)",
        &[],
    )
    .await
    .expect("all eight arguments, positionally");
    let row = c
        .query_one(
            "SELECT event_version, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'),
                    position > $1
               FROM domain_events.event WHERE aggregate_id = 'L-7' AND aggregate_version = 2",
            &[&ret.get::<_, i64>(1)],
        )
        .await
        .expect("the second event with explicit occurred_at and event_version");
    assert_eq!(row.get::<_, i32>(0), 3);
    assert_eq!(row.get::<_, String>(1), "2020-01-02 02:04:05");
    assert!(row.get::<_, bool>(2), "a later event has a later position");
}

#[tokio::test]
async fn raise_events_is_ordered_versioned_and_all_or_nothing() {
    let db = TestDb::new().await;
    let batch = json!([
        { "aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Opened",
          "expected_version": 0 },
        { "aggregate_type": "Loan", "aggregate_id": 7, "event_type": "Loan.Opened" },
        { "aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Approved",
          "expected_version": 1, "payload": { "by": "x" }, "metadata": { "actor": "a" },
          "occurred_at": "2024-05-06T07:08:09+02:00", "event_version": 2 },
        { "aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Funded" }
    ]);
    let rows = db
        .client
        .query(
            "SELECT id, position, aggregate_version, recorded_at FROM domain_events.raise_events($1)",
            &[&batch],
        )
        .await
        .expect("a valid batch");
    let versions: Vec<i64> = rows.iter().map(|r| r.get(2)).collect();
    assert_eq!(
        versions,
        vec![1, 1, 2, 3],
        "rows in input order, consecutive per aggregate"
    );
    let positions: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions in input order: {positions:?}"
    );
    let recorded: BTreeSet<chrono::DateTime<chrono::Utc>> = rows.iter().map(|r| r.get(3)).collect();
    assert_eq!(recorded.len(), 1, "one transaction, one recorded_at");

    let row = db
        .client
        .query_one(
            "SELECT payload, metadata, event_version,
                    to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), id
               FROM domain_events.event WHERE aggregate_id = 'B-1' AND aggregate_version = 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, serde_json::Value>(0), json!({"by": "x"}));
    assert_eq!(row.get::<_, serde_json::Value>(1), json!({"actor": "a"}));
    assert_eq!(row.get::<_, i32>(2), 2);
    assert_eq!(row.get::<_, String>(3), "2024-05-06 05:08:09");
    assert_eq!(row.get::<_, Uuid>(4), rows[2].get::<_, Uuid>(0));
    assert_eq!(
        stored_versions(&db.client, "Loan", "7").await,
        vec![1],
        "integer ids as text"
    );

    // The third item's expectation is checked against the version just before it (2): once
    // with a new stream in the batch (the batch statement), once over streams that all exist
    // (stored without it). The error and the all-or-nothing are the same.
    let before = snapshot(&db.client).await;
    for first in ["B-2", "7"] {
        let stale = json!([
            { "aggregate_type": "Loan", "aggregate_id": first, "event_type": "Loan.Opened" },
            { "aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted",
              "expected_version": 3 },
            { "aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted",
              "expected_version": 3 }
        ]);
        let err = db
            .client
            .query("SELECT * FROM domain_events.raise_events($1)", &[&stale])
            .await
            .expect_err("stale expectation");
        assert_eq!(sqlstate(&err), "40001", "batch starting with {first}");
        assert_eq!(
            err.as_db_error().unwrap().message(),
            "aggregate Loan/B-1 is at version 4, expected 3"
        );
        assert_eq!(snapshot(&db.client).await, before, "all or nothing");
    }

    let none = db
        .client
        .query("SELECT * FROM domain_events.raise_events('[]')", &[])
        .await
        .expect("an empty batch");
    assert!(none.is_empty());
    assert_eq!(snapshot(&db.client).await, before);
}

#[tokio::test]
async fn read_functions_follow_the_contract() {
    let db = TestDb::new().await;
    let c = &db.client;
    c.batch_execute(
        "SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Opened', '{}', '{}', NULL, '2024-01-01T00:00:00Z');
         SELECT * FROM domain_events.raise_event('Loan', '2', 'Loan.Opened', '{}', '{}', NULL, '2024-06-01T00:00:00Z');
         SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Funded');
         SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Repaid');
         SELECT * FROM domain_events.raise_event('User', '1', 'UserCreated');",
    )
    .await
    .unwrap();
    let pairs = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, i64)> {
        rows.iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect()
    };
    let loan1 = pairs(
        c.query(
            "SELECT event_type, aggregate_version FROM domain_events.aggregate_events('Loan', '1')",
            &[],
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        loan1,
        vec![
            ("Loan.Opened".into(), 1),
            ("Loan.Funded".into(), 2),
            ("Loan.Repaid".into(), 3)
        ]
    );
    let positions: Vec<i64> = c
        .query("SELECT position FROM domain_events.events_after(0)", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(positions.len(), 5);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "by position");
    let page: Vec<i64> = c
        .query(
            "SELECT position FROM domain_events.events_after($1, 2)",
            &[&positions[0]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(page, positions[1..3].to_vec());
    let opened = pairs(
        c.query(
            "SELECT aggregate_id, aggregate_version
               FROM domain_events.events_of_type('Loan.Opened', '2024-03-01T00:00:00Z')",
            &[],
        )
        .await
        .unwrap(),
    );
    assert_eq!(opened, vec![("2".into(), 1)]);
    let all_opened: i64 = c
        .query_one(
            "SELECT count(*) FROM domain_events.events_of_type('Loan.Opened')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(all_opened, 2);
    assert_eq!(head_version(c, "Loan", "1").await, 3);
    assert_eq!(head_version(c, "Loan", "nope").await, 0);
}

#[tokio::test]
async fn writer_role_raises_but_cannot_touch_the_tables() {
    let db = TestDb::new().await;
    let (role, dsn) = login_role(&db, "pgde_w", Some("domain_events_writer")).await;
    let w = connect(&dsn).await;
    let (_, v) = raise(&w, "Loan", "W-1", "Loan.Opened").await;
    assert_eq!(v, 1);
    w.query(
        "SELECT * FROM domain_events.raise_events('[{\"aggregate_type\": \"Loan\",
             \"aggregate_id\": \"W-1\", \"event_type\": \"Loan.Funded\"}]')",
        &[],
    )
    .await
    .expect("the writer may raise a batch");
    w.query(
        "SELECT * FROM domain_events.raise_event('Loan', 9, 'Loan.Opened')",
        &[],
    )
    .await
    .expect("the writer may use the bigint overload");
    assert_eq!(head_version(&w, "Loan", "W-1").await, 2);

    let before = snapshot(&db.client).await;
    assert_eq!(before.events, 3);
    for sql in [
        "SELECT * FROM domain_events.event",
        "SELECT * FROM domain_events.aggregate",
        "UPDATE domain_events.event SET payload = '{}'",
        "DELETE FROM domain_events.event",
        "TRUNCATE domain_events.event",
        "UPDATE domain_events.aggregate SET version = 0",
        "INSERT INTO domain_events.event (position, id, aggregate_type, aggregate_id,
             aggregate_version, event_type, event_version, payload, metadata, occurred_at,
             recorded_at, txid)
         VALUES (1, gen_random_uuid(), 'Loan', 'W-1', 3, 'Loan.Forged', 1, '{}', '{}', now(),
             now(), pg_current_xact_id())",
        "SELECT * FROM domain_events.aggregate_events('Loan', 'W-1')",
        "SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\",
             \"aggregate_id\": \"W-1\", \"event_type\": \"Loan.Forged\",
             \"recorded_at\": \"2001-01-01T00:00:00Z\"}]')",
        "SELECT * FROM domain_events.maintain()",
    ] {
        assert_sqlstate(&w, sql, "42501").await;
    }
    assert_eq!(snapshot(&db.client).await, before);
    drop_role(&db, &role).await;
}

#[tokio::test]
async fn reader_role_reads_but_cannot_raise() {
    let db = TestDb::new().await;
    raise(&db.client, "Loan", "R-1", "Loan.Opened").await;
    let (role, dsn) = login_role(&db, "pgde_r", Some("domain_events_reader")).await;
    let r = connect(&dsn).await;
    for (sql, expected) in [
        ("SELECT count(*) FROM domain_events.event", 1),
        ("SELECT count(*) FROM domain_events.aggregate", 1),
        ("SELECT count(*) FROM domain_events.subscription", 0),
        ("SELECT count(*) FROM domain_events.dead_letter", 0),
        (
            "SELECT count(*) FROM domain_events.aggregate_events('Loan', 'R-1')",
            1,
        ),
        ("SELECT count(*) FROM domain_events.events_after(0)", 1),
        (
            "SELECT count(*) FROM domain_events.events_of_type('Loan.Opened')",
            1,
        ),
        ("SELECT domain_events.aggregate_version('Loan', 'R-1')", 1),
    ] {
        let n: i64 = r
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("the reader may run {sql}: {e}"))
            .get(0);
        assert_eq!(n, expected, "{sql}");
    }
    let before = snapshot(&db.client).await;
    for sql in [
        "SELECT * FROM domain_events.raise_event('Loan', 'R-1', 'Loan.Funded')",
        "SELECT * FROM domain_events.raise_event('Loan', 1, 'Loan.Funded')",
        "SELECT * FROM domain_events.raise_event('Loan', gen_random_uuid(), 'Loan.Funded')",
        "SELECT * FROM domain_events.raise_events('[{\"aggregate_type\": \"Loan\",
             \"aggregate_id\": \"R-1\", \"event_type\": \"Loan.Funded\"}]')",
        "UPDATE domain_events.event SET payload = '{}'",
        "DELETE FROM domain_events.event",
        "INSERT INTO domain_events.aggregate VALUES ('Loan', 'R-9', 1, now())",
        "SELECT * FROM domain_events.import_events('[]')",
        "SELECT * FROM domain_events.maintain()",
    ] {
        assert_sqlstate(&r, sql, "42501").await;
    }
    assert_eq!(snapshot(&db.client).await, before);
    drop_role(&db, &role).await;
}

#[tokio::test]
async fn public_has_no_execute_and_raising_functions_pin_search_path() {
    let db = TestDb::new().await;
    let (role, dsn) = login_role(&db, "pgde_nobody", None).await;
    let nobody = connect(&dsn).await;
    for sql in [
        "SELECT * FROM domain_events.raise_event('Loan', 'P-1', 'Loan.Opened')",
        "SELECT * FROM domain_events.raise_events('[]')",
        "SELECT domain_events.aggregate_version('Loan', 'P-1')",
    ] {
        assert_sqlstate(&nobody, sql, "42501").await;
    }
    assert_eq!(db.event_count().await, 0);

    let public_execute: Vec<String> = db
        .client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = 'domain_events'::regnamespace
                AND (p.proacl IS NULL
                     OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                 WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        public_execute.is_empty(),
        "PUBLIC may execute {public_execute:?}"
    );

    let raising = db
        .client
        .query(
            "SELECT p.oid::regprocedure::text, p.prosecdef, coalesce(p.proconfig, '{}')
               FROM pg_proc p
              WHERE p.pronamespace = 'domain_events'::regnamespace
                AND p.proname IN ('raise_event', 'raise_events', 'import_events')
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        raising.len(),
        5,
        "three raise_event overloads, raise_events, import_events"
    );
    for row in raising {
        let name: String = row.get(0);
        assert!(row.get::<_, bool>(1), "{name} is SECURITY DEFINER");
        let config: Vec<String> = row.get(2);
        let pinned: Vec<String> = config.iter().map(|s| s.replace(' ', "")).collect();
        assert!(
            pinned.contains(&"search_path=pg_catalog,pg_temp".to_string()),
            "{name} pins search_path: {config:?}"
        );
    }
    drop_role(&db, &role).await;
}

#[tokio::test]
async fn application_role_cannot_switch_recording_off() {
    let db = TestDb::new().await;
    let (role, dsn) = login_role(&db, "pgde_app", Some("domain_events_writer")).await;
    let w = connect(&dsn).await;
    // Raise first so the library (and its settings) is loaded in this session.
    raise(&w, "Loan", "A-1", "Loan.Opened").await;
    for sql in [
        "SET domain_events.enabled = off",
        "SET domain_events.enabled = read_only",
        "SET domain_events.notify = on",
        "SET domain_events.max_payload_bytes = 2000000000",
        "SELECT set_config('domain_events.enabled', 'off', false)",
    ] {
        assert_sqlstate(&w, sql, "42501").await;
    }
    assert_sqlstate(
        &w,
        &format!("ALTER ROLE {role} SET domain_events.enabled = off"),
        "42501",
    )
    .await;
    assert_eq!(raise(&w, "Loan", "A-1", "Loan.Funded").await.1, 2);
    assert_eq!(db.event_count().await, 2);
    drop_role(&db, &role).await;
}

#[tokio::test]
async fn listener_role_reads_and_keeps_its_bookkeeping_but_cannot_raise() {
    let db = TestDb::new().await;
    let (id, _) = raise(&db.client, "Loan", "L-1", "Loan.Opened").await;
    let (role, dsn) = login_role(&db, "pgde_l", Some("domain_events_listener")).await;
    let l = connect(&dsn).await;
    let n: i64 = l
        .query_one("SELECT count(*) FROM domain_events.events_after(0)", &[])
        .await
        .expect("the listener reads events")
        .get(0);
    assert_eq!(n, 1);
    l.batch_execute(
        "INSERT INTO domain_events.subscription (name, mode, position, updated_at)
             VALUES ('projections', 'notify', 0, now());
         UPDATE domain_events.subscription SET position = 1, updated_at = now()
          WHERE name = 'projections';",
    )
    .await
    .expect("the listener keeps its subscription row");
    l.execute(
        "INSERT INTO domain_events.dead_letter (subscription, handler, event_id, position, error,
             attempts, first_failed_at, last_failed_at)
         VALUES ('projections', 'sql', $1, 1, 'boom', 3, now(), now())",
        &[&id],
    )
    .await
    .expect("the listener writes dead letters (bigserial id included)");
    let before = snapshot(&db.client).await;
    for sql in [
        "SELECT * FROM domain_events.raise_event('Loan', 'L-1', 'Loan.Funded')",
        "SELECT * FROM domain_events.raise_events('[]')",
        "UPDATE domain_events.event SET payload = '{}'",
        "DELETE FROM domain_events.event",
        "UPDATE domain_events.aggregate SET version = 0",
    ] {
        assert_sqlstate(&l, sql, "42501").await;
    }
    assert_eq!(snapshot(&db.client).await, before);
    drop_role(&db, &role).await;
}

#[tokio::test]
async fn session_metadata_defaults_fill_missing_keys_only() {
    let db = TestDb::new().await;
    let (role, dsn) = login_role(&db, "pgde_m", Some("domain_events_writer")).await;
    let w = connect(&dsn).await;
    w.batch_execute(
        "BEGIN;
         SET LOCAL domain_events.actor = 'user-17';
         SET LOCAL domain_events.correlation_id = 'corr-1';
         SET LOCAL domain_events.causation_id = 'cause-1';
         SELECT * FROM domain_events.raise_event('Loan', 'M-1', 'Loan.Opened');
         SELECT * FROM domain_events.raise_event('Loan', 'M-1', 'Loan.Funded', '{}',
             '{\"actor\": \"explicit\", \"custom\": 1}');
         SELECT * FROM domain_events.raise_events('[{\"aggregate_type\": \"Loan\",
             \"aggregate_id\": \"M-1\", \"event_type\": \"Loan.Repaid\",
             \"metadata\": {\"correlation_id\": 42}}]');
         COMMIT;
         SELECT * FROM domain_events.raise_event('Loan', 'M-1', 'Loan.Closed');",
    )
    .await
    .expect("an application role sets the metadata defaults");
    let metadata: Vec<serde_json::Value> = db
        .client
        .query(
            "SELECT metadata FROM domain_events.event ORDER BY aggregate_version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        metadata,
        vec![
            json!({"actor": "user-17", "correlation_id": "corr-1", "causation_id": "cause-1"}),
            json!({"actor": "explicit", "custom": 1, "correlation_id": "corr-1",
                   "causation_id": "cause-1"}),
            json!({"actor": "user-17", "correlation_id": 42, "causation_id": "cause-1"}),
            json!({}),
        ],
        "defaults fill missing keys, given keys win, SET LOCAL ends with the transaction"
    );
    drop_role(&db, &role).await;
}
