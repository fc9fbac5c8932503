//! Handlers in the database, end to end: who may change the registry, whose rights a sync
//! handler runs with, registry changes reaching other sessions, hostile registrations, the
//! counters without preloading, and the seed scenario (`sql/examples/loan_funded_handlers.sql`).

use std::path::Path;

use e2e::store_support::{assert_sqlstate, drop_role, login_role};
use e2e::{connect, TestDb};

/// An audit table and handler owned by the superuser; only `admin` may use them.
async fn audit_setup(db: &TestDb, admin: &str) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE public.audit_log (event_id uuid, event_type text, current_role_name text, \
               session_role_name text, search_path text); \
             CREATE FUNCTION public.audit(event jsonb) RETURNS void LANGUAGE sql AS $$ \
               INSERT INTO public.audit_log SELECT (event->>'id')::uuid, event->>'event_type', \
                 current_user, session_user, current_setting('search_path') $$; \
             REVOKE ALL ON FUNCTION public.audit(jsonb) FROM PUBLIC; \
             GRANT EXECUTE ON FUNCTION public.audit(jsonb) TO {admin}; \
             GRANT INSERT ON public.audit_log TO {admin}; \
             CREATE FUNCTION public.not_granted(event jsonb) RETURNS void LANGUAGE sql AS 'SELECT 1'; \
             REVOKE ALL ON FUNCTION public.not_granted(jsonb) FROM PUBLIC;"
        ))
        .await
        .expect("audit set-up");
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test]
async fn only_the_admin_registers_alters_or_drops_handlers() {
    let db = TestDb::new().await;
    let (admin, admin_dsn) = login_role(&db, "hadmin", Some("domain_events_admin")).await;
    let (writer, writer_dsn) = login_role(&db, "hwriter", Some("domain_events_writer")).await;
    let (reader, reader_dsn) = login_role(&db, "hreader", Some("domain_events_reader")).await;
    audit_setup(&db, &admin).await;
    db.client
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION public.audit(jsonb) TO {writer}, {reader}"
        ))
        .await
        .unwrap();
    let admin_client = connect(&admin_dsn).await;
    admin_client
        .batch_execute(
            "SELECT domain_events.register_handler('audit', 'public.audit(jsonb)', '{*}')",
        )
        .await
        .expect("the admin registers a handler");
    let forbidden = [
        "SELECT domain_events.register_handler('mine', 'public.audit(jsonb)', '{*}')",
        "SELECT domain_events.register_handler_function('mine', 'public.audit(jsonb)'::regprocedure::oid, '{*}', 'sync', 1, true, NULL, 'off')",
        "SELECT domain_events.disable_handler('audit')",
        "SELECT domain_events.enable_handler('audit')",
        "SELECT domain_events.unregister_handler('audit')",
        "INSERT INTO domain_events.handler (name, function, events, run_as) VALUES ('mine', 'public.audit(jsonb)', '{*}', current_user::regrole)",
        "UPDATE domain_events.handler SET enabled = false",
        "UPDATE domain_events.handler SET function = 'public.not_granted(jsonb)'",
        "DELETE FROM domain_events.handler",
        "TRUNCATE domain_events.handler",
        "DELETE FROM domain_events.handler_log",
        "ALTER TABLE domain_events.handler DISABLE TRIGGER ALL",
    ];
    for dsn in [&writer_dsn, &reader_dsn] {
        let client = connect(dsn).await;
        for sql in forbidden {
            assert_sqlstate(&client, sql, "42501").await;
        }
    }
    // The admin changes the registry through the functions only, and registers only what it
    // may execute itself.
    for sql in &forbidden[5..] {
        assert_sqlstate(&admin_client, sql, "42501").await;
    }
    let refused = assert_sqlstate(
        &admin_client,
        "SELECT domain_events.register_handler('sneaky', 'public.not_granted(jsonb)', '{*}')",
        "42501",
    )
    .await;
    assert_eq!(
        refused,
        "permission denied for function public.not_granted(jsonb)"
    );
    admin_client
        .batch_execute(
            "SELECT domain_events.disable_handler('audit'); \
             SELECT domain_events.enable_handler('audit')",
        )
        .await
        .unwrap();
    // Readers see the registry and its statistics.
    let reader_client = connect(&reader_dsn).await;
    assert_eq!(
        count(
            &reader_client,
            "SELECT count(*) FROM domain_events.handler_stats WHERE enabled"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &reader_client,
            "SELECT count(*) FROM domain_events.handler_log"
        )
        .await,
        0
    );
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM domain_events.handler WHERE name = 'audit' AND function = 'public.audit(jsonb)'::regprocedure").await,
        1
    );
    drop(admin_client);
    drop(reader_client);
    db.client
        .batch_execute("DROP TABLE public.audit_log; DROP FUNCTION public.audit(jsonb); DROP FUNCTION public.not_granted(jsonb)")
        .await
        .unwrap();
    db.client
        .batch_execute("DELETE FROM domain_events.handler")
        .await
        .unwrap();
    for role in [admin, writer, reader] {
        drop_role(&db, &role).await;
    }
}

#[tokio::test]
async fn a_sync_handler_runs_with_the_rights_of_the_role_that_registered_it() {
    let db = TestDb::new().await;
    let (admin, admin_dsn) = login_role(&db, "hadmin", Some("domain_events_admin")).await;
    let (writer, writer_dsn) = login_role(&db, "hwriter", Some("domain_events_writer")).await;
    audit_setup(&db, &admin).await;
    let admin_client = connect(&admin_dsn).await;
    admin_client
        .batch_execute(
            "SELECT domain_events.register_handler('audit', 'public.audit(jsonb)', '{Loan.*}')",
        )
        .await
        .unwrap();
    let writer_client = connect(&writer_dsn).await;
    // The writer may neither call the handler nor write its table, and its search_path does
    // not reach the handler.
    assert_sqlstate(
        &writer_client,
        "INSERT INTO public.audit_log DEFAULT VALUES",
        "42501",
    )
    .await;
    writer_client
        .batch_execute(
            "SET search_path = public, pg_catalog; \
             SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded')",
        )
        .await
        .expect("the writer raises; the handler runs as the admin");
    let row = db
        .client
        .query_one(
            "SELECT current_role_name, session_role_name, search_path FROM public.audit_log",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), admin);
    assert_eq!(row.get::<_, String>(1), writer);
    assert_eq!(row.get::<_, String>(2), "pg_catalog, pg_temp");
    // Inside the handler, the role cannot be switched back to something else.
    db.client
        .batch_execute(&format!(
            "CREATE FUNCTION public.escalate(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
               BEGIN SET ROLE postgres; END $$; \
             GRANT EXECUTE ON FUNCTION public.escalate(jsonb) TO {admin}"
        ))
        .await
        .unwrap();
    admin_client
        .batch_execute(
            "SELECT domain_events.register_handler('escalate', 'public.escalate(jsonb)', '{Loan.Escalated}')",
        )
        .await
        .unwrap();
    assert_sqlstate(
        &writer_client,
        "SELECT domain_events.raise_event('Loan', '1', 'Loan.Escalated')",
        "42501",
    )
    .await;
    drop(admin_client);
    drop(writer_client);
    db.client
        .batch_execute(
            "DELETE FROM domain_events.handler; DROP TABLE public.audit_log; \
             DROP FUNCTION public.audit(jsonb), public.not_granted(jsonb), public.escalate(jsonb)",
        )
        .await
        .unwrap();
    for role in [admin, writer] {
        drop_role(&db, &role).await;
    }
}

#[tokio::test]
async fn registry_changes_reach_other_sessions_at_their_next_statement() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE public.audit_log (event_type text); \
             CREATE FUNCTION public.audit(event jsonb) RETURNS void LANGUAGE sql AS $$ \
               INSERT INTO public.audit_log VALUES (event->>'event_type') $$",
        )
        .await
        .unwrap();
    let other = connect(&db.dsn).await;
    let raise = "SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded')";
    other.batch_execute(raise).await.unwrap();
    // A transaction of the other session that began before the registration runs it too.
    other
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    other.batch_execute(raise).await.unwrap();
    db.client
        .batch_execute(
            "SELECT domain_events.register_handler('audit', 'public.audit(jsonb)', '{*}')",
        )
        .await
        .unwrap();
    other.batch_execute(raise).await.unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM public.audit_log").await,
        1
    );
    // Each change, committed by one session, then a raise in the other: the audit rows by then.
    for (change, audited) in [
        ("SELECT domain_events.disable_handler('audit')", 1),
        ("SELECT domain_events.enable_handler('audit')", 2),
    ] {
        db.client.batch_execute(change).await.unwrap();
        other.batch_execute(raise).await.unwrap();
        assert_eq!(
            count(&db.client, "SELECT count(*) FROM public.audit_log").await,
            audited,
            "after {change}"
        );
    }
    // Replacing the function's body is picked up as well.
    db.client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION public.audit(event jsonb) RETURNS void LANGUAGE sql AS $$ \
               INSERT INTO public.audit_log VALUES ('replaced') $$",
        )
        .await
        .unwrap();
    other.batch_execute(raise).await.unwrap();
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM public.audit_log WHERE event_type = 'replaced'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn hostile_registrations_are_refused_and_write_nothing() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE FUNCTION public.audit(event jsonb) RETURNS void LANGUAGE sql AS 'SELECT 1'",
        )
        .await
        .unwrap();
    let huge = "x".repeat(1 << 20);
    let cases: Vec<(String, &str)> = vec![
        (format!("SELECT domain_events.register_handler('{huge}', 'public.audit(jsonb)', '{{*}}')"), "22023"),
        ("SELECT domain_events.register_handler('a''; DROP TABLE domain_events.handler; --', 'public.audit(jsonb)', '{*}')".into(), "22023"),
        ("SELECT domain_events.register_handler('Lоan', 'public.audit(jsonb)', '{*}')".into(), "22023"),
        ("SELECT domain_events.register_handler('h', 'public.audit(jsonb)', ARRAY['Loan.*', 'Loan.*''; --'])".into(), "22023"),
        ("SELECT domain_events.register_handler('h', 'public.audit(jsonb)', ARRAY['**'])".into(), "22023"),
        ("SELECT domain_events.register_handler('h', 'public.audit(jsonb)', array_fill('*'::text, ARRAY[101]))".into(), "22023"),
        (format!("SELECT domain_events.register_handler('h', 'public.audit(jsonb)', ARRAY['{huge}'])"), "22023"),
        (format!("SELECT domain_events.register_handler('h', 'public.audit(jsonb)', '{{*}}', description => '{huge}')"), "22023"),
        ("SELECT domain_events.register_handler('h', 'public.audit(jsonb)', '{*}', mode => E'sync\\n')".into(), "22023"),
        ("SELECT domain_events.register_handler('h', 'pg_catalog.pg_sleep(double precision)', '{*}')".into(), "42P13"),
        ("SELECT domain_events.register_handler('h', 'domain_events.raise_events(jsonb)', '{*}')".into(), "42P13"),
        ("SELECT domain_events.register_handler('h', 'domain_events.handler_changed()', '{*}')".into(), "42P13"),
        ("SELECT domain_events.register_handler_function('h', 0, '{*}', 'sync', 1, true, NULL, 'off')".into(), "42P13"),
        ("SELECT domain_events.enable_handler(NULL)".into(), "22004"),
    ];
    for (sql, code) in &cases {
        assert_sqlstate(&db.client, sql, code).await;
    }
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM domain_events.handler").await,
        0
    );
}

#[tokio::test]
async fn without_preloading_sync_counters_are_null_and_raising_still_works() {
    let db = TestDb::new().await;
    let preloaded: String = db
        .client
        .query_one("SHOW shared_preload_libraries", &[])
        .await
        .unwrap()
        .get(0);
    db.client
        .batch_execute(
            "CREATE FUNCTION public.audit(event jsonb) RETURNS void LANGUAGE sql AS 'SELECT 1'; \
             SELECT domain_events.register_handler('audit', 'public.audit(jsonb)', '{*}'); \
             SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded')",
        )
        .await
        .unwrap();
    let calls: Option<i64> = db
        .client
        .query_one("SELECT calls FROM domain_events.handler_stats", &[])
        .await
        .unwrap()
        .get(0);
    if preloaded.contains("pg_domain_events") {
        assert_eq!(calls, Some(1));
    } else {
        assert_eq!(
            calls, None,
            "nothing is counted without shared_preload_libraries"
        );
    }
}

#[tokio::test]
async fn the_loan_funded_example_creates_the_schedule_in_the_funding_transaction() {
    let db = TestDb::new().await;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/examples/loan_funded_handlers.sql");
    let sql = std::fs::read_to_string(&script).expect("the example");
    db.client
        .batch_execute(&sql)
        .await
        .expect("the example runs and checks itself");
    // What the example checked, checked again from outside.
    let row = db
        .client
        .query_one(
            "SELECT count(*), sum(principal)::text, min(payment)::text, max(payment)::text, \
                    bool_and(event_id = (SELECT id FROM domain_events.event WHERE event_type = 'Loan.Funded')) \
               FROM lending.payment WHERE loan_id = 42",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 12);
    assert_eq!(row.get::<_, String>(1), "100000.00");
    assert_eq!(row.get::<_, String>(2), "8675.74");
    assert_eq!(row.get::<_, String>(3), "8675.74");
    assert!(row.get::<_, bool>(4));
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM domain_events.event WHERE aggregate_id IN ('43', '44')"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM lending.payment WHERE loan_id <> 42"
        )
        .await,
        0
    );
    // The validation handler's error reaches the application as its own.
    let err = e2e::store_support::must_fail(
        &db.client,
        "SELECT domain_events.raise_event('Loan', 45, 'Loan.Funded', '{\"rate\": 1}')",
    )
    .await;
    assert_eq!(err.code().code(), "23514");
    assert_eq!(
        err.message(),
        "Loan.Funded of loan 45 has no positive amount"
    );
    assert!(err.hint().unwrap_or_default().contains("term_months"));
    assert!(
        err.where_()
            .unwrap_or_default()
            .contains("sync handler \"require_funding_terms\" handling event "),
        "{:?}",
        err.where_()
    );
    // log_level = all: the schedule's execution is in the processing log.
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM domain_events.handler_log WHERE handler = 'create_payment_schedule' AND outcome = 'success'").await,
        1
    );
}
