//! The example applications under `examples/`, run for real against the private cluster.
//!
//! Each test creates a fresh database, runs `examples/run.sh NAME URL` (which installs the
//! example's npm or PyPI packages when missing) and requires exit status 0: the example checks its
//! own expectations. Then the test reads the database itself, so an example that checked too
//! little, or not at all, still fails here: the committed events are stored with the expected
//! types, payloads, metadata and versions, and the rolled-back unit of work left no row and no
//! event.

use std::path::{Path, PathBuf};

use e2e::{admin_dsn, TestDb};
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

/// `examples/run.sh`'s exit status when installing the example's dependencies failed.
const INSTALL_FAILED: i32 = 69;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A `postgres://` URL for `dbname`, on the server and as the user of `admin_dsn()`.
fn database_url(dbname: &str) -> String {
    let dsn = admin_dsn();
    let setting = |key: &str| {
        dsn.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    let host = setting("host").unwrap_or_else(|| "127.0.0.1".to_string());
    let port = setting("port").unwrap_or_else(|| "5432".to_string());
    let user = setting("user").unwrap_or_else(|| "postgres".to_string());
    let password = setting("password")
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!("postgres://{user}{password}@{host}:{port}/{dbname}")
}

/// Runs `examples/run.sh name` against `db`; panics unless it exits 0. Returns its stdout.
async fn run_example(name: &str, db: &TestDb) -> String {
    let script = workspace_root().join("examples/run.sh");
    let output = tokio::process::Command::new(&script)
        .arg(name)
        .arg(database_url(&db.name))
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    match output.status.code() {
        Some(0) => stdout,
        Some(INSTALL_FAILED) => panic!(
            "installing the {name} example's dependencies failed (npm ci / pip install: is the \
             package registry reachable?)\n{report}"
        ),
        _ => panic!(
            "examples/run.sh {name} failed ({})\n{report}",
            output.status
        ),
    }
}

/// One stored event, the columns these tests look at.
#[derive(Debug)]
struct Stored {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    version: i64,
    payload: Value,
    metadata: Value,
    txid: String,
}

/// Every event in the database, in position order.
async fn all_events(client: &Client) -> Vec<Stored> {
    client
        .query(
            "SELECT aggregate_type, aggregate_id, event_type, aggregate_version, payload,
                    metadata, txid::text
               FROM domain_events.event ORDER BY position",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|r| Stored {
            aggregate_type: r.get(0),
            aggregate_id: r.get(1),
            event_type: r.get(2),
            version: r.get(3),
            payload: r.get(4),
            metadata: r.get(5),
            txid: r.get(6),
        })
        .collect()
}

/// The stream heads, as `(aggregate_type, aggregate_id, version)`.
async fn stream_heads(client: &Client) -> Vec<(String, String, i64)> {
    client
        .query(
            "SELECT aggregate_type, aggregate_id, version FROM domain_events.aggregate
              ORDER BY aggregate_type, aggregate_id",
            &[],
        )
        .await
        .expect("read stream heads")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The first column of the one row `sql` returns.
async fn scalar(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
    client
        .query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// In the first line of the example's output that contains `line_mark`, the word after
/// `marker`: how the examples name the aggregate of their rolled-back unit of work.
fn id_in_output(stdout: &str, line_mark: &str, marker: &str) -> String {
    stdout
        .lines()
        .filter(|line| line.contains(line_mark))
        .find_map(|line| line.split_once(marker))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no line with {line_mark:?} and {marker:?} in:\n{stdout}"))
        .to_string()
}

/// Asserts that the rolled-back aggregate left no event and no stream head.
async fn assert_no_stream(client: &Client, aggregate_type: &str, aggregate_id: &str) {
    let events = scalar(
        client,
        "SELECT count(*) FROM domain_events.event WHERE aggregate_type = $1 AND aggregate_id = $2",
        &[&aggregate_type, &aggregate_id],
    )
    .await;
    assert_eq!(
        events, 0,
        "events of the rolled-back {aggregate_type}/{aggregate_id}"
    );
    let version = scalar(
        client,
        "SELECT domain_events.aggregate_version($1, $2)",
        &[&aggregate_type, &aggregate_id],
    )
    .await;
    assert_eq!(
        version, 0,
        "stream head of the rolled-back {aggregate_type}/{aggregate_id}"
    );
}

#[tokio::test]
async fn typeorm_user_created_commits_with_the_user_and_rolls_back_with_it() {
    let db = TestDb::new().await;
    let stdout = run_example("typeorm", &db).await;

    let users = db
        .client
        .query("SELECT id::text, email, name FROM user_account", &[])
        .await
        .expect("read user_account");
    assert_eq!(
        users.len(),
        1,
        "only the committed user has a row: {users:?}"
    );
    let (user_id, email, name): (String, String, String) =
        (users[0].get(0), users[0].get(1), users[0].get(2));
    assert!(email.starts_with("ada+"), "committed user: {email}");
    assert_eq!(name, "Ada Lovelace");

    let events = all_events(&db.client).await;
    assert_eq!(
        events.len(),
        1,
        "only the committed UserCreated is stored: {events:?}"
    );
    let event = &events[0];
    assert_eq!(
        (event.aggregate_type.as_str(), event.aggregate_id.as_str()),
        ("User", user_id.as_str())
    );
    assert_eq!(
        (event.event_type.as_str(), event.version),
        ("UserCreated", 1)
    );
    assert_eq!(
        event.payload,
        json!({"email": email, "name": "Ada Lovelace"})
    );
    // actor from set_config('domain_events.actor', ...) in the TypeORM transaction.
    assert_eq!(
        event.metadata,
        json!({"actor": "signup-form", "source": "typeorm-example"})
    );

    let doomed = id_in_output(&stdout, "rolled back", " as User/");
    assert_ne!(doomed, user_id);
    assert_no_stream(&db.client, "User", &doomed).await;
    let rows = scalar(
        &db.client,
        "SELECT count(*) FROM user_account WHERE id::text = $1 OR email LIKE 'grace+%'",
        &[&doomed],
    )
    .await;
    assert_eq!(rows, 0, "the rolled-back user has no row");
    assert_eq!(
        stream_heads(&db.client).await,
        vec![("User".to_string(), user_id, 1)]
    );
}

#[tokio::test]
async fn sqlalchemy_collected_ticket_events_are_raised_in_the_unit_of_work() {
    let db = TestDb::new().await;
    let stdout = run_example("sqlalchemy", &db).await;

    let tickets = db
        .client
        .query(
            "SELECT id, title, status, assignee_id FROM support_ticket",
            &[],
        )
        .await
        .expect("read support_ticket");
    assert_eq!(tickets.len(), 1, "only the committed ticket has a row");
    let ticket_id: i32 = tickets[0].get(0);
    let title: String = tickets[0].get(1);
    assert!(
        title.starts_with("Printer on fire"),
        "committed ticket: {title}"
    );
    assert_eq!(tickets[0].get::<_, String>(2), "closed");
    assert_eq!(
        tickets[0].get::<_, Option<String>>(3).as_deref(),
        Some("dev-1")
    );

    let events = all_events(&db.client).await;
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.aggregate_type.as_str(),
                e.aggregate_id.clone(),
                e.event_type.as_str(),
                e.version,
            )
        })
        .collect();
    let id = ticket_id.to_string();
    assert_eq!(
        summary,
        vec![
            ("ticket", id.clone(), "ticket.created", 1),
            ("ticket", id.clone(), "ticket.status_changed", 2),
            ("ticket", id.clone(), "ticket.status_changed", 3),
        ],
        "the committed units of work's events, in order; nothing of the failed one"
    );
    assert_eq!(
        events[0].payload,
        json!({"title": title, "status": "submitted"})
    );
    assert_eq!(
        events[1].payload,
        json!({"old_status": "submitted", "new_status": "verified", "assignee_id": "dev-1"})
    );
    assert_eq!(
        events[2].payload,
        json!({"old_status": "verified", "new_status": "closed", "assignee_id": "dev-1"})
    );
    // The first unit of work: one transaction, one actor and correlation id for both events;
    // the second unit of work is another transaction with its own actor.
    assert_eq!(
        events[0].txid, events[1].txid,
        "events 1 and 2 share a transaction"
    );
    assert_ne!(events[1].txid, events[2].txid);
    for (event, actor) in events.iter().zip(["dev-1", "dev-1", "dev-2"]) {
        assert_eq!(event.metadata["actor"], actor, "{event:?}");
        assert_eq!(event.metadata["source"], "core", "{event:?}");
        assert!(event.metadata["correlation_id"].is_string(), "{event:?}");
    }
    assert_eq!(
        events[0].metadata["correlation_id"],
        events[1].metadata["correlation_id"]
    );

    let doomed = id_in_output(&stdout, "failed as intended", "ticket ");
    assert_ne!(doomed, id);
    assert_no_stream(&db.client, "ticket", &doomed).await;
    let rows = scalar(
        &db.client,
        "SELECT count(*) FROM support_ticket WHERE id::text = $1 OR title LIKE 'Doomed ticket%'",
        &[&doomed],
    )
    .await;
    assert_eq!(rows, 0, "the rolled-back ticket has no row");
    assert_eq!(
        stream_heads(&db.client).await,
        vec![("ticket".to_string(), id, 3)]
    );
}

#[tokio::test]
async fn psql_script_commits_loan_events_and_rolls_back_the_failed_application() {
    let db = TestDb::new().await;
    let stdout = run_example("psql", &db).await;

    let loans = db
        .client
        .query(
            "SELECT id::text, applicant, status FROM loan_application",
            &[],
        )
        .await
        .expect("read loan_application");
    assert_eq!(loans.len(), 1, "only the committed application has a row");
    let loan_id: String = loans[0].get(0);
    assert_eq!(loans[0].get::<_, String>(1), "Ada");
    assert_eq!(loans[0].get::<_, String>(2), "approved");

    let events = all_events(&db.client).await;
    assert_eq!(events.len(), 2, "only the committed events: {events:?}");
    for (event, (event_type, version)) in events
        .iter()
        .zip([("LoanApplied", 1), ("Loan.StatusChanged", 2)])
    {
        assert_eq!(
            (event.aggregate_type.as_str(), event.aggregate_id.as_str()),
            ("Loan", loan_id.as_str())
        );
        assert_eq!(
            (event.event_type.as_str(), event.version),
            (event_type, version)
        );
        // actor from SET LOCAL domain_events.actor.
        assert_eq!(
            event.metadata,
            json!({"actor": "loan-officer-7", "source": "psql-demo"})
        );
    }
    assert_eq!(
        events[0].payload,
        json!({"applicant": "Ada", "amount": 100000})
    );
    assert_eq!(
        events[1].payload,
        json!({"old_status": "submitted", "new_status": "approved"})
    );

    let rows = scalar(
        &db.client,
        "SELECT count(*) FROM loan_application WHERE applicant = 'Grace'",
        &[],
    )
    .await;
    assert_eq!(rows, 0, "the failed application has no row");
    let doomed = id_in_output(&stdout, "was rolled back", " as Loan/");
    assert_ne!(doomed, loan_id);
    assert_no_stream(&db.client, "Loan", &doomed).await;
    assert_eq!(
        stream_heads(&db.client).await,
        vec![("Loan".to_string(), loan_id, 2)],
        "the failed application has no stream"
    );
}
