//! End-to-end tests of the listener's notify mode (`replication.mode = "notify"`): no slot, no
//! replication privilege; `LISTEN domain_events` wake-ups plus polling by snapshot transitions.
//!
//! Each test uses its own database and subscription name. The binary tests need
//! `cargo build -p listener` first (`target/debug/listener`, or `PGDE_LISTENER_BIN`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use e2e::listener_support::*;
use e2e::TestDb;
use listener::config::{Config, Mode};
use listener::Event;
use serde_json::{json, Value};
use uuid::Uuid;

/// A notify-mode configuration for `db`, subscription `name`, polling every `poll_ms`.
fn notify_config(db: &TestDb, name: &str, poll_ms: u64) -> Config {
    let mut config = config_for(db, name);
    config.replication.mode = Mode::Notify;
    config.replication.poll_interval_ms = poll_ms;
    config
}

/// Waits until the subscription row exists: from then on, every committed event is delivered.
async fn wait_started(db: &TestDb, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = db
            .client
            .query_opt(
                "SELECT mode FROM domain_events.subscription WHERE name = $1",
                &[&name],
            )
            .await
            .expect("read subscription");
        if let Some(row) = row {
            assert_eq!(row.get::<_, String>(0), "notify");
            return;
        }
        assert!(Instant::now() < deadline, "the listener did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `events` of one aggregate in one statement of an open transaction; returns (id, position).
async fn raise(
    client: &impl tokio_postgres::GenericClient,
    aggregate_id: &str,
    n: usize,
) -> Vec<(Uuid, i64)> {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "aggregate_type": "Loan",
                "aggregate_id": aggregate_id,
                "event_type": "Loan.Funded",
                "payload": {"n": i, "text": "Zoë 日本語 🚀"},
            })
        })
        .collect();
    let ids: Vec<Uuid> = client
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&Value::Array(events)],
        )
        .await
        .expect("raise_events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    client
        .query(
            "SELECT id, position FROM domain_events.event WHERE id = ANY($1) ORDER BY position",
            &[&ids],
        )
        .await
        .expect("read positions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn ids(events: &[Event]) -> Vec<Uuid> {
    events.iter().map(|e| e.id).collect()
}

/// Checks that every aggregate's versions arrive strictly increasing.
fn assert_per_aggregate_order<'a>(versions: impl Iterator<Item = (String, i64)> + 'a) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for (aggregate, version) in versions {
        let previous = last.insert(aggregate.clone(), version).unwrap_or(0);
        assert!(
            version > previous,
            "aggregate {aggregate}: version {version} after {previous}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_position_committed_later_is_delivered_too_and_nothing_twice() {
    let db = TestDb::new().await;
    let name = unique_name("nlong");
    let listener = InProcess::start(notify_config(&db, &name, 100));
    wait_started(&db, &name).await;

    // T1 takes an earlier position and stays open.
    let mut long = db.connect().await;
    let t1 = long.transaction().await.expect("begin");
    let early = raise(&t1, "loan-early", 1).await;
    // T2 takes a later position and commits first.
    let mut other = db.connect().await;
    let t2 = other.transaction().await.expect("begin");
    let later = raise(&t2, "loan-later", 2).await;
    t2.commit().await.expect("commit");
    assert!(early[0].1 < later[0].1, "T1 took the earlier position");

    listener
        .collector
        .wait_for(2, Duration::from_secs(30))
        .await;
    // Several polls pass while T1 is open: T2's events are delivered, T1's are not yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = listener.collector.events();
    assert_eq!(
        ids(&first),
        later.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );

    t1.commit().await.expect("commit T1");
    listener
        .collector
        .wait_for(3, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = listener.collector.events();
    assert_eq!(all.len(), 3, "each event exactly once: {:?}", ids(&all));
    assert_eq!(all[2].id, early[0].0, "T1's event came after T2's");
    // The position survived in the subscription row, in notify mode.
    let row = db
        .client
        .query_one(
            "SELECT mode, snapshot_prev IS NOT NULL, snapshot_cur IS NULL, transition \
             FROM domain_events.subscription WHERE name = $1",
            &[&name],
        )
        .await
        .expect("subscription row");
    assert_eq!(row.get::<_, String>(0), "notify");
    assert!(row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert!(row.get::<_, i64>(3) >= 3, "two transitions delivered");
    listener.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_aggregate_order_holds_when_the_younger_xid_takes_the_head_first() {
    let db = TestDb::new().await;
    let name = unique_name("norder");
    let listener = InProcess::start(notify_config(&db, &name, 100));
    wait_started(&db, &name).await;
    let existing = raise(&db.client, "loan-trap", 1).await;
    listener
        .collector
        .wait_for(1, Duration::from_secs(30))
        .await;

    // T_old gets its xid first (a business write), T_young raises first and holds the head.
    let (xid_tx, xid_rx) = tokio::sync::oneshot::channel::<i64>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let dsn = db.dsn.clone();
    let blocked = tokio::spawn(async move {
        let mut old = e2e::connect(&dsn).await;
        let t_old = old.transaction().await.expect("begin");
        let xid: i64 = t_old
            .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
            .await
            .expect("xid")
            .get(0);
        xid_tx.send(xid).expect("send xid");
        go_rx.await.expect("go");
        // Waits for the head lock; gets the next version once T_young commits.
        let events = raise(&t_old, "loan-trap", 1).await;
        t_old.commit().await.expect("commit T_old");
        events
    });
    let old_xid = xid_rx.await.expect("T_old's xid");
    let mut young = db.connect().await;
    let t_young = young.transaction().await.expect("begin");
    let young_events = raise(&t_young, "loan-trap", 1).await;
    let young_xid: i64 = t_young
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .expect("xid")
        .get(0);
    assert!(old_xid < young_xid);
    go_tx.send(()).expect("go");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !blocked.is_finished(),
        "T_old should wait for the head lock"
    );
    t_young.commit().await.expect("commit T_young");
    let old_events = blocked.await.expect("T_old");

    listener
        .collector
        .wait_for(3, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = listener.collector.events();
    assert_eq!(
        ids(&all),
        vec![existing[0].0, young_events[0].0, old_events[0].0],
        "versions in order, each once"
    );
    assert_eq!(
        all.iter().map(|e| e.aggregate_version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        all[2].txid < all[1].txid,
        "the trap: version 3 has the older xid"
    );
    listener.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_delivered_for_rolled_back_transactions() {
    let db = TestDb::new().await;
    let name = unique_name("nrollback");
    let listener = InProcess::start(notify_config(&db, &name, 100));
    wait_started(&db, &name).await;

    let mut client = db.connect().await;
    // A rolled-back transaction that stays open across several polls, then the usual mix.
    let mut long = db.connect().await;
    let long_tx = long.transaction().await.expect("begin");
    let mut rolled_back: HashSet<Uuid> = raise(&long_tx, "loan-long", 3)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut committed = HashSet::new();
    for txn in 0..40 {
        let tx = client.transaction().await.expect("begin");
        let raised = raise(&tx, &format!("loan-{}", txn % 5), 5).await;
        if txn % 4 == 3 {
            tx.rollback().await.expect("rollback");
            rolled_back.extend(raised.iter().map(|(id, _)| *id));
        } else {
            tx.commit().await.expect("commit");
            committed.extend(raised.iter().map(|(id, _)| *id));
        }
        if txn == 20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    long_tx.rollback().await.expect("rollback");
    assert_eq!(committed.len(), 150);

    listener
        .collector
        .wait_for(committed.len(), Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let all = listener.collector.events();
    assert_eq!(all.len(), committed.len(), "each committed event once");
    assert_eq!(all.iter().map(|e| e.id).collect::<HashSet<_>>(), committed);
    assert!(all.iter().all(|e| !rolled_back.contains(&e.id)));
    assert_per_aggregate_order(
        all.iter()
            .map(|e| (e.aggregate_id.clone(), e.aggregate_version)),
    );
    listener.stop().await.expect("clean stop");
}

fn line_id(line: &Value) -> Uuid {
    line["id"].as_str().expect("id").parse().expect("uuid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_redelivers_at_most_the_unsaved_batch() {
    const BATCH: i64 = 50;
    let db = TestDb::new().await;
    let name = unique_name("nkill");
    let mut config = notify_config(&db, &name, 200);
    config.replication.poll_batch_size = BATCH;
    let config = write_config(&config);

    let mut first = ListenerProcess::spawn(&config, &[]);
    wait_started(&db, &name).await;
    let dsn = db.dsn.clone();
    let writer = tokio::spawn(async move {
        let mut client = e2e::connect(&dsn).await;
        for txn in 0..150 {
            let tx = client.transaction().await.expect("begin");
            raise(&tx, &format!("loan-{}", txn % 7), 20).await;
            tx.commit().await.expect("commit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    first.wait_lines(800, Duration::from_secs(120)).await;
    first.kill9();
    assert!(
        !writer.is_finished(),
        "the writer finished before the kill: not mid-stream"
    );
    let before = first.lines();

    let mut second = ListenerProcess::spawn(&config, &[]);
    writer.await.expect("writer");
    let committed: HashSet<Uuid> = db
        .client
        .query("SELECT id FROM domain_events.event", &[])
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(committed.len(), 3_000);

    let first_ids: HashSet<Uuid> = before.iter().map(line_id).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
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
            Instant::now() < deadline,
            "events lost: {} of {} delivered; logs:\n{}",
            first_ids.union(&ids).count(),
            committed.len(),
            second.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    second.terminate();
    let status = second
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}; logs:\n{}", second.stderr());

    for line in before.iter().chain(&after) {
        assert!(committed.contains(&line_id(line)), "an uncommitted event");
    }
    let second_ids: Vec<Uuid> = after.iter().map(line_id).collect();
    assert_eq!(
        second_ids.iter().collect::<HashSet<_>>().len(),
        second_ids.len(),
        "the second run delivered an event twice"
    );
    // Duplicates come only from the batch the first run had not saved: its last lines.
    let duplicates: HashSet<Uuid> = second_ids
        .iter()
        .filter(|id| first_ids.contains(id))
        .copied()
        .collect();
    let tail: HashSet<Uuid> = before
        .iter()
        .rev()
        .take(BATCH as usize)
        .map(line_id)
        .collect();
    assert!(
        duplicates.is_subset(&tail),
        "{} duplicates, not all from the unsaved batch",
        duplicates.len()
    );
    for run in [&before, &after] {
        assert_per_aggregate_order(run.iter().map(|l| {
            (
                l["aggregate_id"]
                    .as_str()
                    .expect("aggregate_id")
                    .to_string(),
                l["aggregate_version"].as_i64().expect("version"),
            )
        }));
    }
    eprintln!(
        "first run: {} events, second run: {} events, duplicates: {}",
        before.len(),
        after.len(),
        duplicates.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_woken_by_notify_well_before_the_poll_interval() {
    let db = TestDb::new().await;
    let name = unique_name("nwake");
    let role = name.clone();
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOREPLICATION PASSWORD 'pässword-n'; \
             GRANT domain_events_listener TO {role};"
        ))
        .await
        .expect("role");
    let mut config = notify_config(&db, &name, 10_000);
    config.database.user = role.clone();
    config.database.host = "127.0.0.1".into();
    let config = write_config(&config);

    let mut process = ListenerProcess::spawn(&config, &[("PGDE_PASSWORD", "pässword-n")]);
    wait_started(&db, &name).await;
    // Let the first poll finish: from now on only a notification or the 10 s tick wakes it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let writer = db.connect().await;
    writer
        .batch_execute("SET domain_events.notify = on")
        .await
        .expect("notify on");
    for round in 1..=3 {
        let started = Instant::now();
        let raised = raise(&writer, &format!("loan-{round}"), 1).await;
        let lines = process.wait_lines(round, Duration::from_secs(30)).await;
        let latency = started.elapsed();
        assert_eq!(line_id(&lines[round - 1]), raised[0].0);
        assert!(
            latency < Duration::from_secs(2),
            "round {round}: handled after {latency:?}; logs:\n{}",
            process.stderr()
        );
    }
    process.terminate();
    let status = process
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(status.success(), "{status}: {}", process.stderr());
    let replication: bool = db
        .client
        .query_one(
            "SELECT rolreplication FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("role")
        .get(0);
    assert!(!replication);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_handler_applies_each_event_once_across_kills_and_a_late_commit() {
    const LOANS: usize = 300;
    let db = TestDb::new().await;
    let name = unique_name("nsql");
    // No unique key: a second application of an event would show as 24 rows.
    db.client
        .batch_execute(
            "CREATE TABLE payment_schedule (loan_id text NOT NULL, n int NOT NULL); \
             CREATE FUNCTION public.create_schedule(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN \
                 PERFORM pg_sleep(0.003); \
                 INSERT INTO payment_schedule \
                 SELECT event->>'aggregate_id', n FROM generate_series(1, 12) n; \
             END $$;",
        )
        .await
        .expect("app schema");
    let mut config = notify_config(&db, &name, 100);
    config.replication.poll_batch_size = 20;
    config.log.level = "info,listener::sink=debug".into();
    config.handlers[0].name = Some("schedule".into());
    config.handlers[0].events = vec!["Loan.Funded".into()];
    config.handlers[0].sink = listener::sink::SqlConfig::new("public.create_schedule").into();
    let file = write_config(&config);

    let mut runs = vec![ListenerProcess::spawn(&file, &[])];
    wait_started(&db, &name).await;
    // A transaction that takes an early position and commits after the kills: its event is
    // applied in a later transition with a lower position than events applied before.
    let mut long = db.connect().await;
    let long_tx = long.transaction().await.expect("begin");
    raise(&long_tx, "loan-late", 1).await;
    let dsn = db.dsn.clone();
    let writer = tokio::spawn(async move {
        let client = e2e::connect(&dsn).await;
        for loan in 0..LOANS {
            raise(&client, &format!("loan-{loan}"), 1).await;
        }
    });

    for round in 0..4 {
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
        let pause = (Uuid::new_v4().as_u128() % 60) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        runs.last_mut().unwrap().kill9();
        runs.push(ListenerProcess::spawn(&file, &[]));
    }
    writer.await.expect("writer");
    long_tx.commit().await.expect("late commit");

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let loans: i64 = db
            .client
            .query_one("SELECT count(DISTINCT loan_id) FROM payment_schedule", &[])
            .await
            .unwrap()
            .get(0);
        if loans == LOANS as i64 + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{loans} of {} schedules; logs:\n{}",
            LOANS + 1,
            runs.last().unwrap().stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finish_and_assert_schedules_once(&mut runs, &db.client, 12 * (LOANS as i64 + 1)).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());
    let handler_mode: String = db
        .client
        .query_one(
            "SELECT mode FROM domain_events.subscription WHERE name = $1",
            &[&format!("{name}/schedule")],
        )
        .await
        .expect("the handler's position row")
        .get(0);
    assert_eq!(handler_mode, "notify");
    let skipped: usize = runs
        .iter()
        .map(|r| r.stderr().matches("already applied").count())
        .sum();
    eprintln!("{} runs, {skipped} redelivered events skipped", runs.len());
    assert!(skipped > 0, "no run was handed an already applied event");
}

/// Waits until the binary's log contains `needle`; panics with the log after 30 s.
async fn wait_log(process: &ListenerProcess, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = process.stderr();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `listener status`: the row of subscription `name` by column, and the standard error.
fn status_of(file: &TempFile, name: &str) -> (HashMap<String, String>, String) {
    let out = run_cli(&["status"], file);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: {stderr}", out.status);
    let header: Vec<&str> = stdout.lines().next().expect("header").split('\t').collect();
    let row: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{name}\t")))
        .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
        .split('\t')
        .collect();
    assert_eq!(header.len(), row.len(), "{stdout}");
    let columns = header
        .iter()
        .zip(row)
        .map(|(h, v)| (h.to_string(), v.to_string()))
        .collect();
    (columns, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_without_wake_ups_is_said_at_start_up_and_in_status() {
    let db = TestDb::new().await;
    let name = unique_name("nwake");
    let file = write_config(&notify_config(&db, &name, 200));
    const WARNING: &str = "domain_events.notify is off";

    // The default: nothing wakes the listener. It says so once, naming the setting and the way
    // to turn it on, and still delivers (by polling).
    let mut process = ListenerProcess::spawn(&file, &[]);
    wait_started(&db, &name).await;
    let log = wait_log(&process, WARNING).await;
    assert!(
        log.contains(&format!(
            "ALTER DATABASE {} SET domain_events.notify = on",
            db.name
        )),
        "{log}"
    );
    assert_eq!(log.matches(WARNING).count(), 1, "{log}");
    let raised = raise(&db.client, "loan-1", 1).await;
    let lines = process.wait_lines(1, Duration::from_secs(30)).await;
    assert_eq!(line_id(&lines[0]), raised[0].0);
    let (columns, stderr) = status_of(&file, &name);
    assert_eq!(columns["mode"], "notify");
    assert_eq!(columns["wakeups"], "polling", "{columns:?}");
    assert!(stderr.contains(WARNING), "{stderr}");
    assert!(stderr.contains(&name), "{stderr}");
    process.stop_ok().await;

    // Turned on for the database's sessions: status and the next start say nothing.
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET domain_events.notify = on",
            db.name
        ))
        .await
        .expect("notify on");
    let (columns, stderr) = status_of(&file, &name);
    assert_eq!(columns["wakeups"], "notify", "{columns:?}");
    assert!(!stderr.contains(WARNING), "{stderr}");
    let mut process = ListenerProcess::spawn(&file, &[]);
    wait_log(&process, "polling (notify mode)").await;
    let raised = raise(&db.client, "loan-2", 1).await;
    let lines = process.wait_lines(1, Duration::from_secs(30)).await;
    assert_eq!(line_id(&lines[0]), raised[0].0);
    assert!(!process.stderr().contains(WARNING), "{}", process.stderr());
    process.stop_ok().await;

    // A writers' role with it on counts too (the listener's own session does not see it).
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} RESET domain_events.notify; \
             CREATE ROLE {name}_app; \
             ALTER ROLE {name}_app IN DATABASE {} SET domain_events.notify = on",
            db.name, db.name
        ))
        .await
        .expect("notify on for a role");
    let (columns, _) = status_of(&file, &name);
    assert_eq!(columns["wakeups"], "notify", "{columns:?}");
    db.client
        .batch_execute(&format!(
            "ALTER ROLE {name}_app IN DATABASE {} RESET ALL; DROP ROLE {name}_app",
            db.name
        ))
        .await
        .expect("drop the role");
    let (columns, _) = status_of(&file, &name);
    assert_eq!(columns["wakeups"], "polling", "{columns:?}");
}
