//! `listener replay`: the real binary over events stored in a real database, with a stdout
//! handler and an exactly-once `sql` handler.

use std::collections::HashMap;
use std::time::Duration;

use e2e::listener_support::{
    config_for, run_cli, run_cli_ok, unique_name, wait_slot_active, write_config, InProcess,
    SlotGuard, TempFile,
};
use e2e::TestDb;
use listener::config::{Config, HandlerConfig};
use uuid::Uuid;

const SLOT_WAIT: Duration = Duration::from_secs(120);

/// What one run of `listener replay` did.
struct Run {
    code: Option<i32>,
    /// The stdout handler's events, in the order written.
    lines: Vec<serde_json::Value>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ids(&self) -> Vec<Uuid> {
        self.lines
            .iter()
            .map(|l| l["id"].as_str().expect("id").parse().expect("uuid"))
            .collect()
    }
}

fn replay(args: &[&str], file: &TempFile) -> Run {
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    let out = run_cli(&all, file);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect();
    Run {
        code: out.status.code(),
        lines,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// Ids of the stored events matching `condition`, in position order.
async fn ids_where(db: &TestDb, condition: &str) -> Vec<Uuid> {
    db.client
        .query(
            &format!("SELECT id FROM domain_events.event WHERE {condition} ORDER BY position"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{condition}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// 60 events over 3 past months (import_events forges recorded_at), 7 aggregates of two types,
/// in batches of 10 that interleave aggregates.
async fn import_history(db: &TestDb) {
    let months = [
        "2026-08-15T12:00:00Z",
        "2026-09-15T12:00:00Z",
        "2026-10-15T12:00:00Z",
    ];
    for batch in 0..6 {
        let items: Vec<serde_json::Value> = (0..10)
            .map(|k| {
                let i = batch * 10 + k;
                let (aggregate_type, event_type) = match i % 5 {
                    0 => ("User", "User.Created"),
                    1 | 3 => ("Loan", "Loan.Funded"),
                    2 => ("Loan", "Loan.Created"),
                    _ => ("Loan", "Loan.Repaid"),
                };
                serde_json::json!({
                    "aggregate_type": aggregate_type,
                    "aggregate_id": (i % 4).to_string(),
                    "event_type": event_type,
                    "payload": {"i": i},
                    "recorded_at": months[batch / 2],
                })
            })
            .collect();
        db.client
            .execute(
                "SELECT count(*) FROM domain_events.import_events($1)",
                &[&serde_json::Value::Array(items)],
            )
            .await
            .expect("import_events");
    }
}

/// Every aggregate's events appear in version order, gap-free from version 1.
fn assert_aggregate_order(lines: &[serde_json::Value]) {
    let mut last: HashMap<(String, String), i64> = HashMap::new();
    for l in lines {
        let key = (
            l["aggregate_type"].as_str().unwrap().to_string(),
            l["aggregate_id"].as_str().unwrap().to_string(),
        );
        let version = l["aggregate_version"].as_i64().unwrap();
        let previous = last.insert(key.clone(), version).unwrap_or(0);
        assert_eq!(version, previous + 1, "{key:?} out of order");
    }
}

#[tokio::test]
async fn each_filter_selects_exactly_the_matching_events_in_aggregate_order() {
    let db = TestDb::new().await;
    import_history(&db).await;
    let file = write_config(&config_for(&db, &unique_name("rf")));
    let first: i64 = db
        .client
        .query_one("SELECT min(position) FROM domain_events.event", &[])
        .await
        .unwrap()
        .get(0);
    let (p10, p40) = ((first + 10).to_string(), (first + 40).to_string());
    let cases: Vec<(Vec<&str>, String)> =
        vec![
        (vec![], "true".into()),
        (vec!["--aggregate-type", "Loan"], "aggregate_type = 'Loan'".into()),
        (
            vec!["--aggregate-type", "Loan", "--aggregate-id", "2"],
            "aggregate_type = 'Loan' AND aggregate_id = '2'".into(),
        ),
        (vec!["--aggregate-id", "3"], "aggregate_id = '3'".into()),
        (vec!["--event-type", "Loan.Funded"], "event_type = 'Loan.Funded'".into()),
        (vec!["--event-type", "Loan.*"], "event_type LIKE 'Loan.%'".into()),
        (
            vec!["--from-position", &p10, "--to-position", &p40],
            format!("position BETWEEN {p10} AND {p40}"),
        ),
        (vec!["--from-position", &p40], format!("position >= {p40}")),
        (
            vec!["--since", "2026-09-01", "--until", "2026-10-01T00:00:00Z"],
            "recorded_at >= '2026-09-01Z' AND recorded_at < '2026-10-01Z'".into(),
        ),
        (
            vec!["--until", "2026-09-15T14:00:00+02:00"],
            "recorded_at < '2026-09-15T12:00:00Z'".into(),
        ),
        (
            vec!["--aggregate-type", "Loan", "--event-type", "Loan.*", "--since", "2026-09-01"],
            "aggregate_type = 'Loan' AND event_type LIKE 'Loan.%' AND recorded_at >= '2026-09-01Z'"
                .into(),
        ),
        (
            vec!["--event-type", "Loan.Funded", "--batch-size", "3"],
            "event_type = 'Loan.Funded'".into(),
        ),
    ];
    for (args, condition) in &cases {
        let expected = ids_where(&db, condition).await;
        assert!(
            !expected.is_empty() && (condition == "true" || expected.len() < 60),
            "{condition}: a case must select some but not all events"
        );
        let run = replay(args, &file);
        assert_eq!(run.code, Some(0), "{args:?}: {}", run.stderr);
        assert_eq!(run.ids(), expected, "{args:?} selected other events");
        assert!(
            run.stderr
                .contains(&format!("{} event(s) read", expected.len())),
            "{args:?}: {}",
            run.stderr
        );
        assert!(run
            .lines
            .iter()
            .all(|l| l["commit_lsn"] == "0/0" && l["payload"]["i"].is_number()));
    }

    // All of it: every aggregate from version 1, in order, also with parallel workers.
    for args in [vec![], vec!["--set", "replication.workers=4"]] {
        let run = replay(&args, &file);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        assert_eq!(run.lines.len(), 60);
        assert_aggregate_order(&run.lines);
    }
}

/// A config with the stdout handler and a `sql` handler `proj` for `Loan.*` calling
/// `app.project`, which refuses events whose payload says `"fail": true`.
async fn with_projection(db: &TestDb) -> Config {
    db.client
        .batch_execute(
            "CREATE SCHEMA app;
             CREATE TABLE app.seen (n serial PRIMARY KEY, event_id uuid NOT NULL, position bigint NOT NULL);
             CREATE FUNCTION app.project(event jsonb) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 IF (event->'payload'->>'fail')::boolean THEN
                     RAISE EXCEPTION 'refused event %', event->>'id';
                 END IF;
                 INSERT INTO app.seen (event_id, position)
                 VALUES ((event->>'id')::uuid, (event->>'position')::bigint);
             END $$;",
        )
        .await
        .expect("projection schema");
    let mut config = config_for(db, &unique_name("rs"));
    config.handlers.push(HandlerConfig {
        name: Some("proj".into()),
        events: vec!["Loan.*".into()],
        max_attempts: 3,
        initial_backoff_ms: 10,
        max_backoff_ms: 100,
        on_failure: listener::OnFailure::DeadLetter,
        ..HandlerConfig::new(listener::sink::SqlConfig::new("app.project"))
    });
    config
}

async fn seen(db: &TestDb) -> Vec<Uuid> {
    db.client
        .query("SELECT event_id FROM app.seen ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn raise_loans(db: &TestDb) -> Uuid {
    let mut items = Vec::new();
    for i in 0..20 {
        items.push(serde_json::json!({
            "aggregate_type": "Loan",
            "aggregate_id": if i % 2 == 0 { "x" } else { "y" },
            "event_type": if i % 3 == 0 { "Loan.Created" } else { "Loan.Funded" },
            "payload": {"i": i, "fail": i == 6},
        }));
    }
    items.push(serde_json::json!({
        "aggregate_type": "User", "aggregate_id": "u", "event_type": "User.Created",
    }));
    db.client
        .execute(
            "SELECT count(*) FROM domain_events.raise_events($1)",
            &[&serde_json::Value::Array(items)],
        )
        .await
        .expect("raise_events");
    db.client
        .query_one(
            "SELECT id FROM domain_events.event WHERE (payload->>'fail')::boolean",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn sql_handler_replays_regardless_of_its_position_and_reports_failures() {
    let db = TestDb::new().await;
    let config = with_projection(&db).await;
    let file = write_config(&config);
    let row = format!("{}/proj", config.replication.subscription_name());
    // The handler's live position is far ahead of every stored event.
    db.client
        .execute(
            "INSERT INTO domain_events.subscription (name, mode, position, lsn) \
             VALUES ($1, 'replication', 1000000, '7/0')",
            &[&row],
        )
        .await
        .unwrap();
    let failing = raise_loans(&db).await;
    let loans = ids_where(&db, "aggregate_type = 'Loan'").await;

    let dry = replay(&["--dry-run"], &file);
    assert_eq!(dry.code, Some(0), "{}", dry.stderr);
    assert!(
        dry.stdout.contains("21 event(s) selected"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("stdout\t21\n"), "{}", dry.stdout);
    assert!(dry.stdout.contains("proj\t20\n"), "{}", dry.stdout);
    assert!(dry.lines.is_empty(), "a dry run handles nothing");
    assert!(seen(&db).await.is_empty(), "a dry run writes nothing");

    let run = replay(&[], &file);
    assert_eq!(run.code, Some(1), "one event failed: {}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("failed: handler proj event {failing}")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("refused event"), "{}", run.stderr);
    assert!(run.stderr.contains("proj\t20\t19\t1"), "{}", run.stderr);
    assert!(run.stderr.contains("stdout\t21\t21\t0"), "{}", run.stderr);
    assert_eq!(run.lines.len(), 21, "the stdout handler got every event");
    let expected: Vec<Uuid> = loans.iter().copied().filter(|id| *id != failing).collect();
    assert_eq!(
        seen(&db).await,
        expected,
        "every other event applied, in order"
    );
    let letters: i64 = db
        .client
        .query_one("SELECT count(*) FROM domain_events.dead_letter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        letters, 0,
        "replay failures are reported, not dead-lettered"
    );
    let (lsn, position): (String, i64) = {
        let r = db
            .client
            .query_one(
                "SELECT lsn::text, position FROM domain_events.subscription WHERE name = $1",
                &[&row],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (lsn.as_str(), position),
        ("7/0", 1000000),
        "position row moved"
    );

    // Only the projection, only aggregate y (no failing event): applied again, exit 0.
    let again = replay(&["--handler", "proj", "--aggregate-id", "y"], &file);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert!(again.lines.is_empty(), "the stdout handler was not chosen");
    let ys = ids_where(&db, "aggregate_id = 'y'").await;
    assert_eq!(seen(&db).await[expected.len()..], ys[..]);
}

#[tokio::test]
async fn bad_arguments_exit_2_and_handle_nothing() {
    let db = TestDb::new().await;
    let config = with_projection(&db).await;
    let file = write_config(&config);
    raise_loans(&db).await;
    for (args, message) in [
        (
            vec!["--since", "2026-11-02", "--until", "2026-11-01"],
            "is not before --until",
        ),
        (vec!["--handler", "nope"], "no handler named \"nope\""),
        (vec!["--since", "last-tuesday"], "is not a timestamp"),
        (vec!["--until", "2026-11-23 10:00:00"], "is not a timestamp"),
        (
            vec!["--from-position", "9", "--to-position", "3"],
            "is after --to-position",
        ),
        (vec!["--event-type", "Loan.*.x"], "invalid event filter"),
        (vec!["--batch-size", "0"], "batch-size"),
    ] {
        let run = replay(&args, &file);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?} wrote {}", run.stdout);
    }
    assert!(seen(&db).await.is_empty(), "nothing handled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_slot_drop_recovers_events_committed_without_a_slot() {
    let db = TestDb::new().await;
    let name = unique_name("rsd");
    let _slot = SlotGuard(name.clone());
    let config = config_for(&db, &name);
    let file = write_config(&config);
    let raise = |n: usize, id: &'static str| {
        let items: Vec<serde_json::Value> = (0..n)
            .map(|_| serde_json::json!({"aggregate_type": "Loan", "aggregate_id": id, "event_type": "Loan.Funded"}))
            .collect();
        serde_json::Value::Array(items)
    };
    let raise_sql = "SELECT id FROM domain_events.raise_events($1)";

    let live = InProcess::start(config.clone());
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let before: Vec<Uuid> = db
        .client
        .query(raise_sql, &[&raise(3, "before")])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    live.collector.wait_for(3, Duration::from_secs(30)).await;
    live.stop().await.expect("clean stop");

    let stdout = run_cli_ok(&["slot", "drop"], &file);
    let last: i64 = stdout
        .split("up to position ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no position in {stdout}"));

    // Committed while no slot exists: no slot will ever carry these.
    let gap: Vec<Uuid> = db
        .client
        .query(raise_sql, &[&raise(4, "gap")])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let live = InProcess::start(config.clone());
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let after: Vec<Uuid> = db
        .client
        .query(raise_sql, &[&raise(2, "after")])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    live.collector.wait_for(2, Duration::from_secs(30)).await;
    let streamed: Vec<Uuid> = live.collector.events().iter().map(|e| e.id).collect();
    assert_eq!(streamed, after, "the new slot starts after the gap");

    let from = (last + 1).to_string();
    let run = replay(&["--from-position", &from], &file);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let replayed = run.ids();
    let expected: Vec<Uuid> = gap.iter().chain(&after).copied().collect();
    assert_eq!(
        replayed, expected,
        "the gap (and the overlap) replayed in order"
    );
    assert!(before.iter().all(|id| !replayed.contains(id)));
    live.stop().await.expect("clean stop");
}

#[tokio::test]
async fn progress_is_shown_on_a_terminal_and_nowhere_else() {
    let db = TestDb::new().await;
    import_history(&db).await;
    // About 1 s of handling (60 events, 15 ms each), in batches of 10: the bar has time to move.
    db.client
        .batch_execute(
            "CREATE FUNCTION public.slow(event jsonb) RETURNS void LANGUAGE sql \
             AS 'SELECT pg_sleep(0.015)'",
        )
        .await
        .expect("slow handler");
    let mut config = config_for(&db, &unique_name("rp"));
    config.handlers.push(HandlerConfig {
        name: Some("slow".into()),
        events: vec!["*".into()],
        ..HandlerConfig::new(listener::sink::SqlConfig::new("public.slow"))
    });
    let file = write_config(&config);

    // Standard error is a pipe here: only the summary, no bar, no terminal control.
    let run = replay(&["--batch-size", "10"], &file);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("60 event(s) read"), "{}", run.stderr);
    for noise in ["/60", " left", "\r", "\u{1b}["] {
        assert!(
            !run.stderr.contains(noise),
            "progress output ({noise:?}) on a pipe:\n{}",
            run.stderr
        );
    }

    // On a terminal (a pseudo-terminal made by `script`): events done of the selection, rate
    // and time left, then the summary.
    let command = format!(
        "'{}' replay --batch-size 10 --config '{}' >/dev/null",
        e2e::listener_support::listener_binary().display(),
        file.0.display()
    );
    let out = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .env_remove("PGPASSWORD")
        .env_remove("PGDE_PASSWORD")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script(1)");
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {terminal}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        terminal.contains("/60 events"),
        "no progress:\n{terminal:?}"
    );
    assert!(terminal.contains(" left"), "no time left:\n{terminal:?}");
    assert!(terminal.contains("/s"), "no rate:\n{terminal:?}");
    assert!(terminal.contains("60 event(s) read"), "{terminal:?}");
}
