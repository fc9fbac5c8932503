//! Least privilege, beyond the per-role tests of `store.rs`, `capture.rs`, `listener.rs` (a
//! `REPLICATION` + `domain_events_listener` role streaming) and `notify.rs` (a `NOREPLICATION`
//! role in notify mode): every way around the tables a writer or reader might try, history
//! through every partition, and every `SECURITY DEFINER` function of the extension against a
//! hostile `search_path`.

use e2e::store_support::{assert_sqlstate, drop_role, login_role, month_partition, snapshot};
use e2e::{connect, TestDb};

/// Every `SECURITY DEFINER` function the extension installs. A new one must be added here, on
/// purpose, after checking that it pins `search_path`.
const SECURITY_DEFINER: [&str; 11] = [
    "domain_events.aggregate_version(text,text)",
    "domain_events.check_schema_compatibility(text,jsonb)",
    "domain_events.drop_schema(text,integer)",
    "domain_events.import_events(jsonb)",
    // The listener writes its own handlers' registry rows (managed_by = 'listener') only.
    "domain_events.mirror_listener_handlers(text,jsonb)",
    "domain_events.raise_event(text,bigint,text,jsonb,jsonb,bigint,timestamp with time zone,integer)",
    "domain_events.raise_event(text,text,text,jsonb,jsonb,bigint,timestamp with time zone,integer)",
    "domain_events.raise_event(text,uuid,text,jsonb,jsonb,bigint,timestamp with time zone,integer)",
    "domain_events.raise_events(jsonb)",
    // The operator console's one write: marking one event's dead letters for redelivery.
    "domain_events.redrive_dead_letter(text,uuid)",
    "domain_events.register_schema(text,integer,jsonb)",
];

/// The statements neither a writer nor a reader may run: every path to the rows that is not a
/// function granted to it. `{p}` is a monthly partition.
fn reserved(p: &str) -> Vec<String> {
    [
        "INSERT INTO domain_events.{p} (id, aggregate_type, aggregate_id, aggregate_version, event_type) \
         VALUES (gen_random_uuid(), 'Loan', 'X-1', 9, 'Loan.Forged')",
        "UPDATE domain_events.{p} SET payload = '{}'",
        "DELETE FROM domain_events.event_default",
        "SELECT nextval('domain_events.event_position_seq')",
        "SELECT setval('domain_events.event_position_seq', 1)",
        "ALTER TABLE domain_events.event DISABLE TRIGGER USER",
        "ALTER TABLE domain_events.{p} DISABLE TRIGGER USER",
        "DROP TABLE domain_events.{p}",
        "ALTER TABLE domain_events.event DETACH PARTITION domain_events.{p}",
        "SELECT * FROM domain_events.aggregate FOR UPDATE",
        "INSERT INTO domain_events.subscription (name, mode, position, updated_at) \
         VALUES ('forged', 'notify', 0, now())",
        "DELETE FROM domain_events.dead_letter",
        "SELECT domain_events.redrive('pg_domain_events')",
        "SELECT * FROM domain_events.maintain()",
        "SELECT * FROM domain_events.import_events('[]')",
        "SELECT domain_events.register_schema('Loan.Forged', 1, '{}')",
        "SELECT domain_events.drop_schema('Loan.Opened', 1)",
        "INSERT INTO domain_events.event_schema (event_type, event_version, schema) \
         VALUES ('Loan.Forged', 1, '{}')",
        "DELETE FROM domain_events.event_schema",
    ]
    .iter()
    .map(|s| s.replace("{p}", p))
    .collect()
}

#[tokio::test]
async fn writer_reaches_no_row_except_through_the_raising_functions() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "SELECT * FROM domain_events.raise_event('Loan', 'tenant-b-1', 'Loan.Opened', \
                 '{\"secret\": 1}', '{\"tenant_id\": \"b\"}')",
        )
        .await
        .unwrap();
    let current = month_partition(&db.client, 0).await;
    let (role, dsn) = login_role(&db, "pgde_pw", Some("domain_events_writer")).await;
    let w = connect(&dsn).await;
    let before = snapshot(&db.client).await;
    let mut reads: Vec<String> = [
        "SELECT payload FROM domain_events.{p}",
        "SELECT payload FROM domain_events.event_default",
        "SELECT * FROM domain_events.events_after(0)",
        "SELECT * FROM domain_events.events_of_type('Loan.Opened')",
        "SELECT * FROM domain_events.subscription",
        "SELECT * FROM domain_events.dead_letter",
        "SELECT * FROM domain_events.stats",
        "SELECT * FROM domain_events.subscription_lag",
        "SELECT * FROM domain_events.tracked_tables",
        "COPY domain_events.event TO STDOUT",
        "COPY domain_events.{p} TO STDOUT",
    ]
    .iter()
    .map(|s| s.replace("{p}", &current))
    .collect();
    reads.extend(reserved(&current));
    for sql in &reads {
        assert_sqlstate(&w, sql, "42501").await;
    }
    assert_eq!(snapshot(&db.client).await, before);
    drop_role(&db, &role).await;
}

#[tokio::test]
async fn reader_writes_nothing_through_any_path() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("SELECT * FROM domain_events.raise_event('Loan', 'R-1', 'Loan.Opened')")
        .await
        .unwrap();
    db.client
        .batch_execute("CREATE TABLE public.app_loans (id bigint PRIMARY KEY, status text)")
        .await
        .unwrap();
    let current = month_partition(&db.client, 0).await;
    let (role, dsn) = login_role(&db, "pgde_pr", Some("domain_events_reader")).await;
    let r = connect(&dsn).await;
    let n: i64 = r
        .query_one("SELECT count(*) FROM domain_events.event", &[])
        .await
        .expect("the reader reads the event table")
        .get(0);
    assert_eq!(n, 1);
    let before = snapshot(&db.client).await;
    let mut writes = reserved(&current);
    writes.extend([
        "SELECT domain_events.track('public.app_loans', 'Loan')".to_string(),
        "UPDATE domain_events.subscription SET position = 0".to_string(),
    ]);
    for sql in &writes {
        assert_sqlstate(&r, sql, "42501").await;
    }
    assert_eq!(snapshot(&db.client).await, before);
    drop_role(&db, &role).await;
}

/// `store.rs` refuses UPDATE, DELETE and TRUNCATE on the root, the current partition and the
/// default partition; here every partition there is, through the statement forms that reach
/// rows without naming `UPDATE` or `DELETE` at the top level.
#[tokio::test]
async fn no_dml_form_rewrites_history_in_any_partition() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("SELECT * FROM domain_events.raise_event('Loan', 'H-1', 'Loan.Opened')")
        .await
        .unwrap();
    let partitions: Vec<String> = db
        .client
        .query(
            "SELECT inhrelid::regclass::text FROM pg_inherits \
              WHERE inhparent = 'domain_events.event'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        partitions.len() >= 4,
        "default, current and premade months: {partitions:?}"
    );
    // Row triggers only fire on rows: one in every partition (a superuser may insert directly;
    // a time past every monthly partition lands in the default one).
    for p in &partitions {
        let at = match p.strip_prefix("domain_events.event_p") {
            Some(month) => format!("{}-{}-15", &month[..4], &month[4..]),
            None => "2999-01-15".to_string(),
        };
        db.client
            .batch_execute(&format!(
                "INSERT INTO domain_events.event \
                    (id, aggregate_type, aggregate_id, aggregate_version, event_type, recorded_at) \
                 VALUES (gen_random_uuid(), 'Loan', 'in-{p}', 1, 'Loan.Opened', '{at}')"
            ))
            .await
            .unwrap_or_else(|e| panic!("a row in {p}: {e}"));
        let rows: i64 = db
            .client
            .query_one(&format!("SELECT count(*) FROM {p}"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(rows >= 1, "{p} holds a row");
    }
    let before = snapshot(&db.client).await;
    let mut statements = Vec::new();
    for p in partitions
        .iter()
        .chain(["domain_events.event".to_string()].iter())
    {
        statements.extend([
            format!("UPDATE {p} SET aggregate_id = 'H-2'"),
            format!("DELETE FROM {p}"),
            format!("TRUNCATE {p}"),
            format!("WITH gone AS (DELETE FROM {p} RETURNING 1) SELECT count(*) FROM gone"),
            format!("MERGE INTO {p} e USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE"),
            format!(
                "MERGE INTO {p} e USING (SELECT 1) s ON true \
                 WHEN MATCHED THEN UPDATE SET payload = '{{\"tampered\": true}}'"
            ),
        ]);
    }
    for sql in &statements {
        assert_sqlstate(&db.client, sql, "55000").await;
    }
    assert_eq!(snapshot(&db.client).await, before);
}

/// A superuser who turns ordinary triggers off for the session (`session_replication_role =
/// replica`, as restore and replication tools do) still cannot rewrite history with plain DML:
/// the immutability triggers fire `ALWAYS`, on every partition.
#[tokio::test]
async fn replica_sessions_cannot_rewrite_history_either() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("SELECT * FROM domain_events.raise_event('Loan', 'H-1', 'Loan.Opened')")
        .await
        .unwrap();
    // A partition made after CREATE EXTENSION (here by an import into an old month) too.
    db.client
        .batch_execute(
            "SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\", \
                 \"aggregate_id\": \"H-0\", \"event_type\": \"Loan.Opened\", \
                 \"recorded_at\": \"2001-01-15T00:00:00Z\"}]')",
        )
        .await
        .unwrap();
    let not_always: Vec<String> = db
        .client
        .query(
            "SELECT t.tgrelid::regclass::text || ' ' || t.tgname FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
              WHERE c.relnamespace = 'domain_events'::regnamespace
                AND t.tgname IN ('event_immutable', 'event_no_truncate')
                AND t.tgenabled <> 'A'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(not_always.is_empty(), "not ENABLE ALWAYS: {not_always:?}");
    let before = snapshot(&db.client).await;
    db.client
        .batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    for sql in [
        "UPDATE domain_events.event SET payload = '{\"tampered\": true}'",
        "DELETE FROM domain_events.event",
        "TRUNCATE domain_events.event",
        "TRUNCATE domain_events.event_p200101",
        "DELETE FROM domain_events.event_p200101",
    ] {
        assert_sqlstate(&db.client, sql, "55000").await;
    }
    db.client
        .batch_execute("RESET session_replication_role")
        .await
        .unwrap();
    assert_eq!(snapshot(&db.client).await, before);
}

#[tokio::test]
async fn every_security_definer_function_pins_search_path() {
    let db = TestDb::new().await;
    // Every function of the extension, in any schema (pg_depend), not only those named today.
    let rows = db
        .client
        .query(
            "SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}')
               FROM pg_proc p
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                               AND d.deptype = 'e'
               JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'pg_domain_events'
              WHERE p.prosecdef
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let found: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        found, SECURITY_DEFINER,
        "SECURITY DEFINER functions of the extension"
    );
    for row in &rows {
        let name: String = row.get(0);
        let config: Vec<String> = row.get(1);
        let paths: Vec<String> = config
            .iter()
            .filter(|c| c.starts_with("search_path="))
            .map(|c| c.replace(' ', ""))
            .collect();
        assert_eq!(
            paths,
            ["search_path=pg_catalog,pg_temp"],
            "{name}: {config:?}"
        );
    }

    // And in practice: a writer whose search_path puts look-alikes of what the functions call
    // ahead of pg_catalog gets the real ones. Each trap fails the call if it ever runs.
    let (role, dsn) = login_role(&db, "pgde_sp", Some("domain_events_writer")).await;
    db.client
        .batch_execute(&format!(
            "CREATE SCHEMA evil;
             GRANT USAGE ON SCHEMA evil TO {role};
             CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'trap: now'; END $$;
             CREATE FUNCTION evil.pg_current_xact_id() RETURNS xid8 LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'trap: pg_current_xact_id'; END $$;
             CREATE FUNCTION evil.nextval(regclass) RETURNS bigint LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'trap: nextval'; END $$;
             CREATE FUNCTION evil.jsonb_typeof(jsonb) RETURNS text LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'trap: jsonb_typeof'; END $$;
             CREATE FUNCTION evil.texteq(text, text) RETURNS boolean LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'trap: ='; END $$;
             CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, PROCEDURE = evil.texteq);
             CREATE FUNCTION evil.int8eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'trap: bigint ='; END $$;
             CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, PROCEDURE = evil.int8eq);
             CREATE TABLE evil.aggregate (aggregate_type text, aggregate_id text, version bigint);
             CREATE TABLE evil.event (id uuid);
             GRANT ALL ON ALL TABLES IN SCHEMA evil TO {role};"
        ))
        .await
        .expect("plant the traps");
    let w = connect(&dsn).await;
    w.batch_execute("SET search_path = evil, pg_catalog, public")
        .await
        .unwrap();
    for sql in [
        "SELECT * FROM domain_events.raise_event('Loan', 'S-1', 'Loan.Opened')",
        "SELECT * FROM domain_events.raise_event('Loan', 7, 'Loan.Opened', expected_version => 0)",
        "SELECT * FROM domain_events.raise_event('Loan', '00000000-0000-0000-0000-000000000001'::uuid, 'Loan.Opened')",
        "SELECT * FROM domain_events.raise_events('[{\"aggregate_type\": \"Loan\", \
             \"aggregate_id\": \"S-1\", \"event_type\": \"Loan.Funded\", \"expected_version\": 1}]')",
        "SELECT domain_events.aggregate_version('Loan', 'S-1')",
    ] {
        w.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} under a hostile search_path: {e}"));
    }
    let version: i64 = w
        .query_one("SELECT domain_events.aggregate_version('Loan', 'S-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
    let decoys: i64 = db
        .client
        .query_one(
            "SELECT (SELECT count(*) FROM evil.aggregate) + (SELECT count(*) FROM evil.event)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(decoys, 0, "nothing landed in the look-alike tables");
    assert_eq!(db.event_count().await, 4);
    db.client
        .batch_execute("DROP SCHEMA evil CASCADE")
        .await
        .unwrap();
    drop_role(&db, &role).await;
}
