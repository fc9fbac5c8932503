//! Async handlers of the database's registry, end to end: a running listener picks up
//! `register_handler(..., mode => 'async')`, `disable_handler` and `enable_handler` without a
//! restart, runs each handler after commit with the rights of the role that registered it
//! (the listener's own role has none on the function or its table), pauses a disabled one and
//! resumes it with nothing skipped, retries, logs and dead-letters failures, and applies each
//! event exactly once across SIGKILLs of the binary.
//!
//! The binary test needs `cargo build -p listener` first (`target/debug/listener`, or
//! `PGDE_LISTENER_BIN`).

use std::time::{Duration, Instant};

use e2e::listener_support::*;
use e2e::store_support::{drop_role, login_role};
use e2e::{connect, TestDb};
use listener::config::{Config, Mode};
use tokio_postgres::Client;

const PASSWORD: &str = "pgde-test-password";

/// A notify-mode listener for `db` (no slot needed) logging in as `user`, reading the registry
/// every 200 ms.
fn registry_config(db: &TestDb, name: &str, user: &str) -> Config {
    let mut config = config_for(db, name);
    config.replication.mode = Mode::Notify;
    config.replication.poll_interval_ms = 100;
    config.database.user = user.to_string();
    config.database.password = Some(PASSWORD.to_string());
    config.registry.poll_interval_ms = 200;
    config.registry.max_attempts = 2;
    config.registry.initial_backoff_ms = 10;
    config.registry.max_backoff_ms = 50;
    config
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Waits until `sql` counts `n`; panics after `timeout`.
async fn wait_count(client: &Client, sql: &str, n: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = count(client, sql).await;
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {got}, expected {n} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn raise(client: &Client, aggregate_id: &str, event_type: &str, payload: &str) {
    client
        .execute(
            "SELECT domain_events.raise_event('Loan', $1, $2, $3::text::jsonb)",
            &[&aggregate_id, &event_type, &payload],
        )
        .await
        .expect("raise");
}

/// A cross-domain table and handler owned by the superuser, open to `admin` only.
async fn billing_setup(db: &TestDb, admin: &str) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE public.invoice (event_id uuid, loan text, position bigint, \
               role_name text, search_path text); \
             CREATE FUNCTION public.open_invoice(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF event->'payload'->>'fail' = 'definite' THEN \
                 RAISE EXCEPTION 'billing refused loan %', event->>'aggregate_id' \
                   USING ERRCODE = 'check_violation'; \
               END IF; \
               IF event->'payload'->>'fail' = 'transient' THEN \
                 RAISE EXCEPTION 'billing busy for loan %', event->>'aggregate_id' \
                   USING ERRCODE = 'serialization_failure'; \
               END IF; \
               INSERT INTO public.invoice SELECT (event->>'id')::uuid, event->>'aggregate_id', \
                 (event->>'position')::bigint, current_user, current_setting('search_path'); \
             END $$; \
             REVOKE ALL ON FUNCTION public.open_invoice(jsonb) FROM PUBLIC; \
             GRANT EXECUTE ON FUNCTION public.open_invoice(jsonb) TO {admin}; \
             GRANT INSERT ON public.invoice TO {admin};"
        ))
        .await
        .expect("billing set-up");
}

/// Drops what [`billing_setup`] made (its grants would keep the admin role from being dropped).
async fn drop_billing(db: &TestDb) {
    db.client
        .batch_execute("DROP TABLE public.invoice; DROP FUNCTION public.open_invoice(jsonb)")
        .await
        .expect("drop the billing objects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_async_handler_runs_after_commit_as_its_registrant_and_pauses_when_disabled() {
    let db = TestDb::new().await;
    let (admin, admin_dsn) = login_role(&db, "radmin", Some("domain_events_admin")).await;
    let (listener_role, _) = login_role(&db, "rlisten", Some("domain_events_listener")).await;
    billing_setup(&db, &admin).await;
    let name = unique_name("reg");
    let running = InProcess::start(registry_config(&db, &name, &listener_role));
    wait_count(
        &db.client,
        &format!("SELECT count(*) FROM domain_events.subscription WHERE name = '{name}'"),
        1,
        Duration::from_secs(30),
    )
    .await;

    // Registered while the listener runs; events raised right after the registration commits
    // (before the listener can have noticed it) are delivered too.
    let admin_client = connect(&admin_dsn).await;
    admin_client
        .batch_execute(
            "SELECT domain_events.register_handler('billing', 'public.open_invoice(jsonb)', \
               '{Loan.Funded}', mode => 'async', log_level => 'all')",
        )
        .await
        .expect("the admin registers an async handler");
    for loan in 0..5 {
        raise(&db.client, &format!("L-{loan}"), "Loan.Funded", "{}").await;
    }
    raise(&db.client, "L-0", "Loan.Repaid", "{}").await;
    // A rolled-back raise is never delivered.
    db.client
        .batch_execute(
            "BEGIN; SELECT domain_events.raise_event('Loan', 'L-rolled-back', 'Loan.Funded'); ROLLBACK",
        )
        .await
        .unwrap();
    wait_count(
        &db.client,
        "SELECT count(*) FROM public.invoice",
        5,
        Duration::from_secs(20),
    )
    .await;
    // It ran as the registering role with the pinned search_path: the listener's role has no
    // right on the function or the table.
    let rows = db
        .client
        .query(
            "SELECT DISTINCT role_name, search_path FROM public.invoice",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), admin);
    assert_eq!(rows[0].get::<_, String>(1), "pg_catalog, pg_temp");
    let listener_may: bool = db
        .client
        .query_one(
            "SELECT has_function_privilege($1, 'public.open_invoice(jsonb)', 'EXECUTE') \
               OR has_table_privilege($1, 'public.invoice', 'INSERT')",
            &[&listener_role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!listener_may);
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM domain_events.handler_log WHERE handler = 'billing' \
               AND mode = 'async' AND outcome = 'success'"
        )
        .await,
        5
    );

    // Disabled: paused at its position while events keep coming.
    admin_client
        .batch_execute("SELECT domain_events.disable_handler('billing')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for loan in 5..15 {
        raise(&db.client, &format!("L-{loan}"), "Loan.Funded", "{}").await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM public.invoice").await,
        5,
        "a disabled handler ran"
    );
    // Enabled again: everything raised meanwhile, once, in position order.
    admin_client
        .batch_execute("SELECT domain_events.enable_handler('billing')")
        .await
        .unwrap();
    wait_count(
        &db.client,
        "SELECT count(*) FROM public.invoice",
        15,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        count(
            &db.client,
            "SELECT count(DISTINCT event_id) FROM public.invoice"
        )
        .await,
        15
    );
    let out_of_order: i64 = count(
        &db.client,
        "SELECT count(*) FROM (SELECT position, lag(position) OVER (ORDER BY ctid) AS before \
           FROM public.invoice) p WHERE before > position",
    )
    .await;
    assert_eq!(out_of_order, 0);

    // Unregistered: it stops, and its lane is gone.
    admin_client
        .batch_execute("SELECT domain_events.unregister_handler('billing')")
        .await
        .unwrap();
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM domain_events.subscription WHERE name LIKE 'handler:billing%'"
        )
        .await,
        0
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    raise(&db.client, "L-after", "Loan.Funded", "{}").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM public.invoice").await,
        15
    );
    running.stop().await.expect("the listener stops cleanly");
    drop(admin_client);
    drop_billing(&db).await;
    for role in [admin, listener_role] {
        drop_role(&db, &role).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_async_registry_handler_is_retried_logged_and_dead_lettered() {
    let db = TestDb::new().await;
    let (admin, admin_dsn) = login_role(&db, "radmin", Some("domain_events_admin")).await;
    billing_setup(&db, &admin).await;
    let name = unique_name("regfail");
    let running = InProcess::start(registry_config(&db, &name, "postgres"));
    let admin_client = connect(&admin_dsn).await;
    admin_client
        .batch_execute(
            "SELECT domain_events.register_handler('billing', 'public.open_invoice(jsonb)', \
               '{Loan.*}', mode => 'async')",
        )
        .await
        .unwrap();
    raise(&db.client, "L-1", "Loan.Funded", "{}").await;
    raise(&db.client, "L-2", "Loan.Funded", r#"{"fail": "definite"}"#).await;
    raise(&db.client, "L-3", "Loan.Funded", r#"{"fail": "transient"}"#).await;
    raise(&db.client, "L-4", "Loan.Funded", "{}").await;
    // A definite error is not retried; a transient one is, up to registry.max_attempts (2).
    wait_count(
        &db.client,
        "SELECT count(*) FROM domain_events.dead_letter WHERE subscription = 'handler:billing' \
           AND handler = 'billing' AND attempts = CASE WHEN error LIKE '%L-2%' THEN 1 ELSE 2 END",
        2,
        Duration::from_secs(20),
    )
    .await;
    wait_count(
        &db.client,
        "SELECT count(*) FROM public.invoice",
        2,
        Duration::from_secs(20),
    )
    .await;
    // log_level 'errors' (the default): each failed attempt, the last one as dead_lettered,
    // with the function's own message; no successes.
    let log: Vec<String> = db
        .client
        .query(
            "SELECT format('%s %s %s %s', outcome, attempt, subscription, error) \
               FROM domain_events.handler_log WHERE handler = 'billing' \
               ORDER BY position, attempt",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        log,
        [
            "dead_lettered 1 handler:billing billing refused loan L-2",
            "failure 1 handler:billing billing busy for loan L-3",
            "dead_lettered 2 handler:billing billing busy for loan L-3",
        ]
    );
    running.stop().await.expect("the listener stops cleanly");
    admin_client
        .batch_execute("SELECT domain_events.unregister_handler('billing')")
        .await
        .unwrap();
    drop(admin_client);
    drop_billing(&db).await;
    drop_role(&db, &admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_registry_handler_applies_each_event_once_across_sigkills() {
    const LOANS: usize = 200;
    let db = TestDb::new().await;
    // No unique key: a second application of an event would show as 24 rows.
    db.client
        .batch_execute(
            "CREATE TABLE payment_schedule (loan_id text NOT NULL, n int NOT NULL); \
             CREATE FUNCTION public.create_schedule(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN \
                 PERFORM pg_sleep(0.003); \
                 INSERT INTO public.payment_schedule \
                 SELECT event->>'aggregate_id', n FROM generate_series(1, 12) n; \
             END $$; \
             SELECT domain_events.register_handler('schedule', 'public.create_schedule(jsonb)', \
               '{Loan.Funded}', mode => 'async')",
        )
        .await
        .expect("app schema");
    let name = unique_name("regkill");
    let mut config = registry_config(&db, &name, "postgres");
    config.database.password = None;
    let file = write_config(&config);
    let mut runs = vec![ListenerProcess::spawn(&file, &[])];
    let dsn = db.dsn.clone();
    let writer = tokio::spawn(async move {
        let client = connect(&dsn).await;
        for loan in 0..LOANS {
            raise(&client, &format!("loan-{loan}"), "Loan.Funded", "{}").await;
        }
    });
    for round in 0..3 {
        let start = payment_schedule_rows(&db.client).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while payment_schedule_rows(&db.client).await < start + 12 * 20 {
            assert!(
                Instant::now() < deadline,
                "run {round} makes no progress; logs:\n{}",
                runs.last().unwrap().stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pause = (uuid::Uuid::new_v4().as_u128() % 60) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        runs.last_mut().unwrap().kill9();
        runs.push(ListenerProcess::spawn(&file, &[]));
    }
    writer.await.expect("writer");
    wait_count(
        &db.client,
        "SELECT count(DISTINCT loan_id) FROM payment_schedule",
        LOANS as i64,
        Duration::from_secs(120),
    )
    .await;
    finish_and_assert_schedules_once(&mut runs, &db.client, 12 * LOANS as i64).await;
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM domain_events.dead_letter").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listeners_own_handlers_are_in_the_registry_and_pause_when_disabled_there() {
    let db = TestDb::new().await;
    let name = unique_name("mirror");
    let mut config = registry_config(&db, &name, "postgres");
    config.database.password = None;
    let running = InProcess::start(config);
    let row = format!("{name}/collector");
    wait_count(
        &db.client,
        &format!(
            "SELECT count(*) FROM domain_events.handler WHERE name = '{row}' \
               AND managed_by = 'listener' AND mode = 'async' AND events = '{{*}}' \
               AND description LIKE 'kind = \"library\"%'"
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    for loan in 0..3 {
        raise(&db.client, &format!("L-{loan}"), "Loan.Funded", "{}").await;
    }
    running.collector.wait_for(3, Duration::from_secs(20)).await;

    // Disabled from SQL: it waits, holding its event, while events keep coming.
    db.client
        .execute("SELECT domain_events.disable_handler($1)", &[&row])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    for loan in 3..8 {
        raise(&db.client, &format!("L-{loan}"), "Loan.Funded", "{}").await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(running.collector.len(), 3, "a disabled handler was called");
    // It belongs to the listener's configuration: not unregistered from SQL.
    let refused = db
        .client
        .execute("SELECT domain_events.unregister_handler($1)", &[&row])
        .await
        .expect_err("a listener-managed handler is not unregistered from SQL");
    assert_eq!(e2e::sqlstate(&refused), "55000");

    // Enabled again: it resumes where it paused, nothing skipped, nothing twice.
    db.client
        .execute("SELECT domain_events.enable_handler($1)", &[&row])
        .await
        .unwrap();
    running.collector.wait_for(8, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = running.collector.events();
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e.id).collect();
    assert_eq!((events.len(), ids.len()), (8, 8));
    running.stop().await.expect("the listener stops cleanly");
}
