//! Table capture end to end: `track()` on a real table, row changes from ordinary client
//! sessions, privileges of the user changing the row, and transactions that roll back.

use e2e::store_support::login_role;
use e2e::{sqlstate, TestDb};

const LOANS: &str = "CREATE TABLE public.loans (
        id bigint PRIMARY KEY, status text NOT NULL, amount numeric NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now());
    SELECT domain_events.track('public.loans', 'Loan',
        ignore_columns => '{updated_at}', column_events => '{\"status\": \"Loan.StatusChanged\"}');";

async fn events(db: &TestDb) -> Vec<(String, i64, String, serde_json::Value)> {
    db.client
        .query(
            "SELECT event_type, aggregate_version, aggregate_id, payload FROM domain_events.event ORDER BY position",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn row_changes_become_events_in_their_transaction() {
    let db = TestDb::new().await;
    db.client.batch_execute(LOANS).await.expect("track loans");
    let app = db.connect().await;
    app.batch_execute(
        "BEGIN;
         SET LOCAL domain_events.actor = 'clerk-7';
         INSERT INTO loans VALUES (42, 'submitted', 100000);
         UPDATE loans SET status = 'approved', updated_at = now() WHERE id = 42;
         COMMIT;
         UPDATE loans SET updated_at = now() + interval '1 minute' WHERE id = 42;",
    )
    .await
    .expect("business transactions");
    // A unit of work that fails after its row change leaves neither the change nor its event.
    let failed = app
        .batch_execute(
            "BEGIN;
             UPDATE loans SET status = 'funded' WHERE id = 42;
             SELECT 1 / 0;
             COMMIT;",
        )
        .await;
    assert_eq!(sqlstate(&failed.expect_err("division by zero")), "22012");
    app.batch_execute("ROLLBACK").await.expect("rollback");

    let seen = events(&db).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "Loan.Created");
    assert_eq!((seen[0].1, seen[0].2.as_str()), (1, "42"));
    assert_eq!(
        seen[0].3,
        serde_json::json!({"id": 42, "status": "submitted", "amount": 100000})
    );
    assert_eq!(seen[1].0, "Loan.StatusChanged");
    assert_eq!(
        seen[1].3,
        serde_json::json!({"old_status": "submitted", "new_status": "approved"})
    );
    let actors: Vec<Option<String>> = db
        .client
        .query("SELECT metadata->>'actor' FROM domain_events.event", &[])
        .await
        .expect("metadata")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(actors, vec![Some("clerk-7".to_string()); 2]);
    let status: String = db
        .client
        .query_one("SELECT status FROM loans WHERE id = 42", &[])
        .await
        .expect("loan")
        .get(0);
    assert_eq!(status, "approved");
}

#[tokio::test]
async fn writing_a_tracked_table_needs_the_writer_role() {
    let db = TestDb::new().await;
    db.client.batch_execute(LOANS).await.expect("track loans");
    let (role, dsn) = login_role(&db, "capture_app", None).await;
    db.client
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON loans TO {role}"
        ))
        .await
        .expect("grant table");
    let app = e2e::connect(&dsn).await;
    let refused = app
        .execute("INSERT INTO loans VALUES (1, 'submitted', 10)", &[])
        .await
        .expect_err("no writer role");
    assert_eq!(sqlstate(&refused), "42501");
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM loans", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!((rows, db.event_count().await), (0, 0));

    db.client
        .batch_execute(&format!("GRANT domain_events_writer TO {role}"))
        .await
        .expect("grant writer");
    let app = e2e::connect(&dsn).await;
    app.execute("INSERT INTO loans VALUES (1, 'submitted', 10)", &[])
        .await
        .expect("insert as writer");
    app.execute("DELETE FROM loans WHERE id = 1", &[])
        .await
        .expect("delete as writer");
    let kinds: Vec<String> = events(&db).await.into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["Loan.Created", "Loan.Deleted"]);
    // The writer still cannot read or rewrite the history it produced.
    let read = app
        .query("SELECT * FROM domain_events.event", &[])
        .await
        .expect_err("writer cannot read the table");
    assert_eq!(sqlstate(&read), "42501");
}

#[tokio::test]
async fn track_is_validated_and_untrack_stops_capture() {
    let db = TestDb::new().await;
    db.client.batch_execute(LOANS).await.expect("track loans");
    let bad = db
        .client
        .execute(
            "SELECT domain_events.track('public.loans', 'Loan', id_column => 'loan_id')",
            &[],
        )
        .await
        .expect_err("unknown id column");
    assert_eq!(sqlstate(&bad), "42703");
    let message = bad
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("public.loans"), "{message}");
    let bad = db
        .client
        .execute("SELECT domain_events.track('public.loans', 'Lo an')", &[])
        .await
        .expect_err("bad aggregate type");
    assert_eq!(sqlstate(&bad), "22023");
    let tracked: i64 = db
        .client
        .query_one("SELECT count(*) FROM domain_events.tracked_tables", &[])
        .await
        .expect("tracked")
        .get(0);
    assert_eq!(
        tracked, 1,
        "a failed re-track keeps the working configuration"
    );

    db.client
        .batch_execute(
            "SELECT domain_events.untrack('public.loans'); INSERT INTO loans VALUES (5, 'x', 1);",
        )
        .await
        .expect("untrack");
    assert_eq!(db.event_count().await, 0);
    let again = db
        .client
        .execute("SELECT domain_events.untrack('public.loans')", &[])
        .await
        .expect_err("not tracked");
    assert_eq!(sqlstate(&again), "42704");
}

#[tokio::test]
async fn capture_ignores_a_hostile_search_path() {
    let db = TestDb::new().await;
    db.client.batch_execute(LOANS).await.expect("track loans");
    let (role, dsn) = login_role(&db, "capture_evil", Some("domain_events_writer")).await;
    db.client
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE ON loans TO {role};
             CREATE SCHEMA evil AUTHORIZATION {role};"
        ))
        .await
        .expect("grants");
    let app = e2e::connect(&dsn).await;
    // Objects that would win over pg_catalog's if the event store's SQL resolved names through
    // the caller's search_path while running with the extension owner's rights: an operator on
    // the exact types the batch insert subtracts, and a one-argument unnest.
    app.batch_execute(
        "CREATE FUNCTION evil.unnest(text[]) RETURNS SETOF text
             LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked unnest'; END $$;
         CREATE FUNCTION evil.minus(bigint, bigint) RETURNS bigint
             LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked minus'; END $$;
         CREATE OPERATOR evil.- (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.minus);
         SET search_path = evil, public, pg_catalog;
         INSERT INTO loans VALUES (7, 'submitted', 10);
         UPDATE loans SET status = 'approved', amount = 11 WHERE id = 7;",
    )
    .await
    .expect("row changes by a writer with a hostile search_path");
    let stored: Vec<(String, i64)> = events(&db).await.into_iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(
        stored,
        [
            ("Loan.Created".to_string(), 1),
            ("Loan.Updated".to_string(), 2),
            ("Loan.StatusChanged".to_string(), 3)
        ]
    );
}
