//! A table-driven catalogue of malformed calls to the raising functions. Each must fail with
//! its exact SQLSTATE (`docs/sql-api.md`) and leave the store and the business table as they
//! were: no event, no stream head, no version bump.
//!
//! Every case runs even when an earlier one fails, so one run lists every deviation.

use e2e::store_support::{snapshot, sqlstate_deviations, StoreSnapshot};
use e2e::TestDb;
use tokio_postgres::Client;

/// One malformed call.
struct Case {
    /// What is wrong with it.
    what: &'static str,
    /// Statements run first on the same session (settings), reset afterwards.
    setup: &'static [&'static str],
    /// The call.
    sql: String,
    /// The SQLSTATE it must fail with.
    code: &'static str,
    /// The exact error message, where the contract gives one.
    message: Option<&'static str>,
}

fn case(what: &'static str, code: &'static str, sql: impl Into<String>) -> Case {
    Case {
        what,
        setup: &[],
        sql: sql.into(),
        code,
        message: None,
    }
}

/// `SELECT * FROM domain_events.raise_event(<args>)`.
fn raise(args: &str) -> String {
    format!("SELECT * FROM domain_events.raise_event({args})")
}

/// `SELECT * FROM domain_events.raise_events('<json>')`.
fn batch(json: &str) -> String {
    format!(
        "SELECT * FROM domain_events.raise_events('{}')",
        json.replace('\'', "''")
    )
}

/// A valid batch item for `Loan/<id>`.
fn item(id: &str) -> String {
    format!(r#"{{"aggregate_type": "Loan", "aggregate_id": "{id}", "event_type": "Loan.Noted"}}"#)
}

fn catalogue() -> Vec<Case> {
    let long_name = format!("L{}", "a".repeat(100)); // 101 characters
    let long_id = "9".repeat(201);
    let long_multibyte_id = "ż".repeat(201);
    let big_payload = format!(r#"{{"blob": "{}"}}"#, "x".repeat(2000));
    vec![
        // Names.
        case("empty aggregate_type", "22023", raise("'', '42', 'Loan.Noted'")),
        case("empty event_type", "22023", raise("'Loan', '42', ''")),
        case("aggregate_type starting with a dot", "22023", raise("'.x', '42', 'Loan.Noted'")),
        case("event_type ending with a dot", "22023", raise("'Loan', '42', 'x.'")),
        case("event_type with an empty segment", "22023", raise("'Loan', '42', 'a..b'")),
        case("aggregate_type starting with a digit", "22023", raise("'1abc', '42', 'Loan.Noted'")),
        case("segment starting with an underscore", "22023", raise("'Loan', '42', 'Loan._x'")),
        case("segment starting with a hyphen", "22023", raise("'-Loan', '42', 'Loan.Noted'")),
        case("event_type with a space", "22023", raise("'Loan', '42', 'Loan Status'")),
        case("event_type with a trailing space", "22023", raise("'Loan', '42', 'Loan.Noted '")),
        case("event_type with a semicolon", "22023", raise("'Loan', '42', 'Loan;DROP'")),
        case(
            "SQL injection in aggregate_type",
            "22023",
            raise("'Loan''; DROP TABLE app_loans; --', '42', 'Loan.Noted'"),
        ),
        case(
            "SQL injection in event_type",
            "22023",
            raise("'Loan', '42', 'Loan.Noted\"); DROP TABLE app_loans; --'"),
        ),
        case("identifier quoting in event_type", "22023", raise("'Loan', '42', '\"Loan\".x'")),
        case("Cyrillic о in aggregate_type", "22023", raise("'Lоan', '42', 'Loan.Noted'")),
        case("Cyrillic е in event_type", "22023", raise("'Loan', '42', 'Loan.Opеned'")),
        case("fullwidth letter in aggregate_type", "22023", raise("'Ｌoan', '42', 'Loan.Noted'")),
        case("zero-width space in event_type", "22023", raise("'Loan', '42', 'Loan\u{200b}.Noted'")),
        case("accented letter in event_type", "22023", raise("'Loan', '42', 'Loan.Créé'")),
        case(
            "101-character aggregate_type",
            "22023",
            raise(&format!("'{long_name}', '42', 'Loan.Noted'")),
        ),
        case("101-character event_type", "22023", raise(&format!("'Loan', '42', '{long_name}'"))),
        // Aggregate ids.
        case("empty aggregate_id", "22023", raise("'Loan', '', 'Loan.Noted'")),
        case("201-character aggregate_id", "22023", raise(&format!("'Loan', '{long_id}', 'Loan.Noted'"))),
        case(
            "201-character multibyte aggregate_id",
            "22023",
            raise(&format!("'Loan', '{long_multibyte_id}', 'Loan.Noted'")),
        ),
        case("newline in aggregate_id", "22023", raise("'Loan', e'42\\n', 'Loan.Noted'")),
        case("tab in aggregate_id", "22023", raise("'Loan', e'4\\t2', 'Loan.Noted'")),
        case("SOH in aggregate_id", "22023", raise("'Loan', e'\\x01', 'Loan.Noted'")),
        case("DEL in aggregate_id", "22023", raise("'Loan', e'42\\x7f', 'Loan.Noted'")),
        // Payload and metadata.
        case("array payload", "22023", raise("'Loan', '42', 'Loan.Noted', '[1, 2]'")),
        case("number payload", "22023", raise("'Loan', '42', 'Loan.Noted', '42'")),
        case("string payload", "22023", raise("'Loan', '42', 'Loan.Noted', '\"text\"'")),
        case("JSON null payload", "22023", raise("'Loan', '42', 'Loan.Noted', 'null'")),
        case("boolean payload", "22023", raise("'Loan', '42', 'Loan.Noted', 'true'")),
        case("array metadata", "22023", raise("'Loan', '42', 'Loan.Noted', '{}', '[]'")),
        case("string metadata", "22023", raise("'Loan', '42', 'Loan.Noted', '{}', '\"x\"'")),
        case(
            "object as metadata.actor",
            "22023",
            raise("'Loan', '42', 'Loan.Noted', '{}', '{\"actor\": {\"id\": 1}}'"),
        ),
        case(
            "boolean as metadata.correlation_id",
            "22023",
            raise("'Loan', '42', 'Loan.Noted', '{}', '{\"correlation_id\": true}'"),
        ),
        case(
            "array as metadata.tenant_id",
            "22023",
            raise("'Loan', '42', 'Loan.Noted', '{}', '{\"tenant_id\": [\"t\"]}'"),
        ),
        Case {
            what: "payload over max_payload_bytes",
            setup: &["SET domain_events.max_payload_bytes = 1024"],
            sql: raise(&format!("'Loan', '42', 'Loan.Noted', '{big_payload}'")),
            code: "22023",
            message: None,
        },
        // NULLs.
        case("NULL aggregate_type", "22004", raise("NULL, '42', 'Loan.Noted'")),
        case("NULL text aggregate_id", "22004", raise("'Loan', NULL::text, 'Loan.Noted'")),
        case("NULL uuid aggregate_id", "22004", raise("'Loan', NULL::uuid, 'Loan.Noted'")),
        case("NULL bigint aggregate_id", "22004", raise("'Loan', NULL::bigint, 'Loan.Noted'")),
        case("NULL event_type", "22004", raise("'Loan', '42', NULL")),
        case("NULL payload", "22004", raise("'Loan', '42', 'Loan.Noted', NULL")),
        case("NULL metadata", "22004", raise("'Loan', '42', 'Loan.Noted', '{}', NULL")),
        case(
            "NULL occurred_at",
            "22004",
            raise("'Loan', '42', 'Loan.Noted', '{}', '{}', NULL, NULL"),
        ),
        case(
            "NULL event_version",
            "22004",
            raise("'Loan', '42', 'Loan.Noted', '{}', '{}', NULL, now(), NULL"),
        ),
        case("NULL batch", "22004", "SELECT * FROM domain_events.raise_events(NULL)"),
        // Versions and times.
        case(
            "negative expected_version",
            "22023",
            raise("'Loan', '42', 'Loan.Noted', expected_version => -1"),
        ),
        case("event_version 0", "22023", raise("'Loan', '42', 'Loan.Noted', event_version => 0")),
        case("negative event_version", "22023", raise("'Loan', '42', 'Loan.Noted', event_version => -5")),
        case(
            "infinite occurred_at",
            "22023",
            raise("'Loan', '42', 'Loan.Noted', occurred_at => 'infinity'"),
        ),
        case(
            "minus-infinite occurred_at",
            "22023",
            raise("'Loan', '42', 'Loan.Noted', occurred_at => '-infinity'"),
        ),
        Case {
            what: "stale expected_version",
            setup: &[],
            sql: raise("'Loan', '42', 'Loan.Noted', expected_version => 5"),
            code: "40001",
            message: Some("aggregate Loan/42 is at version 2, expected 5"),
        },
        Case {
            what: "expected_version on a new aggregate",
            setup: &[],
            sql: raise("'Loan', 4242, 'Loan.Noted', expected_version => 1"),
            code: "40001",
            message: Some("aggregate Loan/4242 is at version 0, expected 1"),
        },
        Case {
            what: "expected_version 0 on an existing aggregate",
            setup: &[],
            sql: raise("'Loan', 42, 'Loan.Noted', expected_version => 0"),
            code: "40001",
            message: Some("aggregate Loan/42 is at version 2, expected 0"),
        },
        // Batches: shapes.
        case("batch is an object", "22023", batch(&item("B-1"))),
        case("batch is a string", "22023", batch(r#""events""#)),
        case("batch is a number", "22023", batch("1")),
        case("batch item is a number", "22023", batch("[1]")),
        case("batch item is an array", "22023", batch(&format!("[[{}]]", item("B-1")))),
        case("batch item is null", "22023", batch("[null]")),
        case(
            "batch item without event_type",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1"}]"#),
        ),
        case(
            "batch item without aggregate_type",
            "22023",
            batch(r#"[{"aggregate_id": "B-1", "event_type": "Loan.Noted"}]"#),
        ),
        case(
            "batch item without aggregate_id",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "event_type": "Loan.Noted"}]"#),
        ),
        case(
            "batch item with an unknown key",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "payloda": {}}]"#),
        ),
        case(
            "batch item forging recorded_at (import_events only)",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "recorded_at": "2001-01-01T00:00:00Z"}]"#),
        ),
        // Batches: types.
        case(
            "batch aggregate_id is a boolean",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": true, "event_type": "Loan.Noted"}]"#),
        ),
        case(
            "batch aggregate_id is a fraction",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": 1.5, "event_type": "Loan.Noted"}]"#),
        ),
        case(
            "batch aggregate_id is an object",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": {"id": 1}, "event_type": "Loan.Noted"}]"#),
        ),
        case(
            "batch aggregate_type is a number",
            "22023",
            batch(r#"[{"aggregate_type": 7, "aggregate_id": "B-1", "event_type": "Loan.Noted"}]"#),
        ),
        case(
            "batch payload is an array",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "payload": [1]}]"#),
        ),
        case(
            "batch metadata is a string",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "metadata": "m"}]"#),
        ),
        case(
            "batch expected_version is a string",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "expected_version": "0"}]"#),
        ),
        case(
            "batch expected_version is negative",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "expected_version": -1}]"#),
        ),
        case(
            "batch event_version is a string",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "event_version": "2"}]"#),
        ),
        case(
            "batch event_version is 0",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "event_version": 0}]"#),
        ),
        case(
            "batch occurred_at is not RFC 3339",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "occurred_at": "yesterday"}]"#),
        ),
        case(
            "batch occurred_at is a number",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "occurred_at": 1700000000}]"#),
        ),
        case(
            "batch aggregate_id is empty",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "", "event_type": "Loan.Noted"}]"#),
        ),
        case(
            "batch event_type is an injection",
            "22023",
            batch(r#"[{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "x'); DROP TABLE app_loans; --"}]"#),
        ),
        Case {
            what: "batch payload over max_payload_bytes",
            setup: &["SET domain_events.max_payload_bytes = 1024"],
            sql: batch(&format!(
                r#"[{}, {{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted", "payload": {big_payload}}}]"#,
                item("B-2")
            )),
            code: "22023",
            message: None,
        },
        // Batches: only the last item is bad, after valid items on new and existing aggregates.
        case(
            "batch whose last item has a bad name",
            "22023",
            batch(&format!(
                r#"[{}, {}, {}, {{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan..Noted"}}]"#,
                item("B-1"),
                item("42"),
                item("B-1")
            )),
        ),
        case(
            "batch whose last item has an unknown key",
            "22023",
            batch(&format!(
                r#"[{}, {}, {{"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Noted", "colour": "red"}}]"#,
                item("B-1"),
                item("42")
            )),
        ),
        case(
            "batch whose last item has an array payload",
            "22023",
            batch(&format!(
                r#"[{}, {}, {{"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Noted", "payload": []}}]"#,
                item("B-1"),
                item("42")
            )),
        ),
        Case {
            what: "batch whose last item has a stale expected_version",
            setup: &[],
            sql: batch(&format!(
                r#"[{}, {}, {{"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Noted", "expected_version": 3}}]"#,
                item("42"),
                item("42")
            )),
            code: "40001",
            message: Some("aggregate Loan/42 is at version 4, expected 3"),
        },
        // import_events follows the same rules.
        case(
            "import item with recorded_at not RFC 3339",
            "22023",
            "SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\", \
             \"aggregate_id\": \"I-1\", \"event_type\": \"Loan.Noted\", \"recorded_at\": \"soon\"}]')",
        ),
        case(
            "import item with a bad name",
            "22023",
            "SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\", \
             \"aggregate_id\": \"I-1\", \"event_type\": \"1Loan\", \
             \"recorded_at\": \"2001-01-01T00:00:00Z\"}]')",
        ),
    ]
}

/// The store as it is before every case: `Loan/42` at version 2, `ticket/T-1` at 1, and the
/// business table `app_loans` that the injection attempts aim at.
async fn seed(db: &TestDb) {
    db.client
        .batch_execute(
            "CREATE TABLE public.app_loans (id bigint PRIMARY KEY, status text NOT NULL);
             INSERT INTO public.app_loans VALUES (42, 'submitted');
             SELECT * FROM domain_events.raise_event('Loan', 42, 'LoanCreated');
             SELECT * FROM domain_events.raise_event('Loan', 42, 'LoanSubmitted');
             SELECT * FROM domain_events.raise_event('ticket', 'T-1', 'ticket.created');",
        )
        .await
        .expect("seed the store");
}

/// Runs one case; `Err` describes how it deviated.
async fn run(client: &Client, case: &Case, before: &StoreSnapshot) -> Result<(), String> {
    for statement in case.setup {
        client
            .batch_execute(statement)
            .await
            .map_err(|e| format!("setup `{statement}` failed: {e}"))?;
    }
    let outcome = client.query(case.sql.as_str(), &[]).await;
    client
        .batch_execute("RESET ALL")
        .await
        .map_err(|e| format!("RESET ALL: {e}"))?;
    let after = snapshot(client).await;
    let mut problems = sqlstate_deviations(&outcome, case.code, case.message);
    if &after != before {
        problems.push(format!("store changed: {before:?} -> {after:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test]
async fn malformed_calls_are_rejected_with_nothing_written() {
    let db = TestDb::new().await;
    seed(&db).await;
    let client = db.connect().await;
    let before = snapshot(&client).await;
    assert_eq!(before.events, 3);
    assert_eq!(before.heads, "Loan/42@2,ticket/T-1@1");

    let cases = catalogue();
    assert!(cases.len() >= 25);
    let mut deviations = Vec::new();
    for case in &cases {
        if let Err(problem) = run(&client, case, &before).await {
            deviations.push(format!("- {}: {problem}\n    {}", case.what, case.sql));
        }
    }
    assert!(
        deviations.is_empty(),
        "{} of {} malformed calls deviate from docs/sql-api.md:\n{}",
        deviations.len(),
        cases.len(),
        deviations.join("\n")
    );
}

/// The other side of the catalogue: inputs at the edges of the rules are accepted, so the
/// rejections above are not a validator that refuses everything.
#[tokio::test]
async fn inputs_at_the_limits_are_accepted() {
    let db = TestDb::new().await;
    seed(&db).await;
    let name100 = format!("L{}", "a".repeat(99));
    let id200 = "9".repeat(200);
    let multibyte_id200 = "ż".repeat(200);
    let accepted = [
        raise(&format!("'{name100}', '1', 'Loan.Noted'")),
        raise(&format!("'Loan', '1', '{name100}'")),
        raise(&format!("'Loan', '{id200}', 'Loan.Noted'")),
        raise(&format!("'Loan', '{multibyte_id200}', 'Loan.Noted'")),
        raise("'work-order.v2', 'wo-1', 'ticket.status_changed'"),
        raise("'Loan', 'zażółć gęślą jaźń', 'Loan.Noted'"),
        // Quotes and SQL in an id are just characters of the id.
        raise("'Loan', '42''); DROP TABLE app_loans; --', 'Loan.Noted'"),
        raise("'Loan', '42', 'Loan.Noted', '{}', '{}', NULL"),
        raise("'Loan', '42', 'Loan.Noted', '{}', '{\"actor\": 7, \"source\": \"core\", \"other\": [1, {}]}'"),
        raise("'Loan', '42', 'Loan.Noted', occurred_at => '0001-01-01T00:00:00Z'"),
        raise("'Loan', '42', 'Loan.Noted', event_version => 2147483647"),
        raise("'Loan', gen_random_uuid(), 'Loan.Noted'"),
        raise("'Loan', -1, 'Loan.Noted'"),
        batch(r#"[{"aggregate_type": "Loan", "aggregate_id": 9223372036854775807, "event_type": "Loan.Noted", "payload": {}, "metadata": {}, "expected_version": 0, "occurred_at": "2024-02-29T23:59:59.123456Z", "event_version": 1}]"#),
    ];
    let client = db.connect().await;
    client
        .batch_execute("SET domain_events.max_payload_bytes = 1024")
        .await
        .unwrap();
    let mut rejected = Vec::new();
    for sql in &accepted {
        if let Err(e) = client.query(sql.as_str(), &[]).await {
            rejected.push(format!("- {sql}: {e}"));
        }
    }
    let small = format!(r#"{{"blob": "{}"}}"#, "x".repeat(900));
    if let Err(e) = client
        .query(
            "SELECT * FROM domain_events.raise_event('Loan', '42', 'Loan.Noted', $1::text::jsonb)",
            &[&small],
        )
        .await
    {
        rejected.push(format!("- 912-byte payload under a 1024-byte limit: {e}"));
    }
    assert!(
        rejected.is_empty(),
        "valid calls rejected:\n{}",
        rejected.join("\n")
    );
    let s = snapshot(&db.client).await;
    assert_eq!(s.events, 3 + accepted.len() as i64 + 1);
    assert_eq!(s.app_rows, "42:submitted", "the id's SQL stayed data");
    let stored: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM domain_events.event
              WHERE aggregate_id IN ($1, '42''); DROP TABLE app_loans; --', '-1',
                                    '9223372036854775807')",
            &[&multibyte_id200],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 4, "ids stored verbatim");
}
