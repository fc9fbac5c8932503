//! Event contracts end to end: registering JSON Schemas, every raising path checking payloads
//! against them, the `schema_validation` modes, who may register, and the per-backend cache of
//! compiled validators staying exact across sessions, transactions and isolation levels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::listener_support::{config_for, run_cli_ok, unique_name, write_config};
use e2e::store_support::{assert_sqlstate, drop_role, login_role, must_fail};
use e2e::{sqlstate, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;

/// Every payload value in these tests carries this marker; no error may show it.
const SECRET: &str = "SECRET";

/// A schema with what the payload cases exercise: types, `required`,
/// `additionalProperties`, formats, enums, a nested object, an array, numeric edges, unicode.
fn funded_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["loan_id", "amount", "currency"],
        "additionalProperties": false,
        "properties": {
            "loan_id": {"type": "string", "format": "uuid"},
            "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000},
            "term_months": {"type": "integer", "minimum": 1, "maximum": 360},
            "currency": {"enum": ["EUR", "USD", "PLN"]},
            "funded_at": {"type": "string", "format": "date-time"},
            "contact": {"type": "string", "format": "email"},
            "reference": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$", "maxLength": 12},
            "name": {"type": "string", "minLength": 2, "maxLength": 5},
            "borrower": {
                "type": "object",
                "required": ["id"],
                "properties": {
                    "id": {"type": "integer"},
                    "address": {
                        "type": "object",
                        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}
                    }
                }
            },
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3, "uniqueItems": true},
            "ratio": {"type": "number", "multipleOf": 0.25}
        }
    })
}

/// The same contract in draft-07 terms (`exclusiveMinimum` is a number there, too).
fn closed_schema_draft7() -> Value {
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "required": ["reason"],
        "properties": {
            "reason": {"type": "string", "enum": ["paid", "written_off"]},
            "closed_on": {"type": "string", "format": "date"},
            "notes": {"type": ["string", "null"]}
        },
        "additionalProperties": {"type": "string"}
    })
}

const LOAN_ID: &str = "7b0c4a52-3d39-4a39-9a4b-2f7c1d1e0b11";

/// A valid `Loan.Funded` payload with `edit` applied.
fn funded(edit: impl FnOnce(&mut Value)) -> Value {
    let mut payload = json!({"loan_id": LOAN_ID, "amount": 100.5, "currency": "EUR"});
    edit(&mut payload);
    payload
}

async fn register(client: &Client, event_type: &str, version: i32, schema: &Value) -> bool {
    client
        .query_one(
            "SELECT domain_events.register_schema($1, $2, $3)",
            &[&event_type, &version, schema],
        )
        .await
        .unwrap_or_else(|e| panic!("register {event_type} v{version}: {e}"))
        .get(0)
}

async fn raise(
    client: &Client,
    event_type: &str,
    version: i32,
    payload: &Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .query(
            "SELECT * FROM domain_events.raise_event('Loan', 'L-1', $1, $2, event_version => $3)",
            &[&event_type, payload, &version],
        )
        .await
        .map(|_| ())
}

/// Message, detail and hint of a failed call, checked to be a schema violation that shows no
/// value of the payload.
fn violation_text(err: &tokio_postgres::Error) -> String {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    assert_eq!(db.code().code(), "23514", "{}", db.message());
    let text = format!(
        "{}\n{}\n{}",
        db.message(),
        db.detail().unwrap_or_default(),
        db.hint().unwrap_or_default()
    );
    assert!(
        !text.contains(SECRET),
        "an error echoes a payload value: {text}"
    );
    text
}

async fn schema_count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM domain_events.event_schema", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn registration_refuses_what_is_not_a_usable_schema() {
    let db = TestDb::new().await;
    assert!(register(&db.client, "Loan.Funded", 1, &funded_schema()).await);
    assert!(
        !register(&db.client, "Loan.Funded", 1, &funded_schema()).await,
        "registering the identical schema again is a no-op"
    );
    // (schema or call, SQLSTATE, a phrase the message must contain)
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "SELECT domain_events.register_schema('Loan.Funded', 1, '{\"type\": \"object\"}')".into(),
            "23505",
            "a different schema is already registered for Loan.Funded version 1",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"type\": \"obj\"}')".into(),
            "22023",
            "is not a valid JSON Schema at /type",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"properties\": {\"a\": {\"minimum\": \"one\"}}}')".into(),
            "22023",
            "is not a valid JSON Schema at /properties/a/minimum",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"required\": \"amount\"}')".into(),
            "22023",
            "is not a valid JSON Schema at /required",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"properties\": {\"a\": {\"pattern\": \"(unclosed\"}}}')".into(),
            "22023",
            "/properties/a/pattern",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"$schema\": \"http://json-schema.org/draft-04/schema#\"}')".into(),
            "22023",
            "declares the unknown draft \"http://json-schema.org/draft-04/schema#\"",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"$schema\": \"https://example.com/my-draft\"}')".into(),
            "22023",
            "unknown draft",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"$ref\": \"https://example.com/loan.json\"}')".into(),
            "22023",
            "https://example.com/loan.json",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"properties\": {\"a\": {\"$ref\": \"other.json#/x\"}}}')".into(),
            "22023",
            "other.json",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '{\"type\": \"array\"}')".into(),
            "22023",
            "describes no JSON object at its root",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, '[]')".into(),
            "22023",
            "must be a JSON object, got an array",
        ),
        (
            "SELECT domain_events.register_schema('Loan X', 1, '{}')".into(),
            "22023",
            "invalid event_type",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 0, '{}')".into(),
            "22023",
            "invalid event_version",
        ),
        (
            "SELECT domain_events.register_schema('Loan.X', 1, NULL)".into(),
            "22004",
            "schema must not be null",
        ),
        (
            "UPDATE domain_events.event_schema SET schema = '{}'".into(),
            "55000",
            "a registered schema version is immutable",
        ),
    ];
    for (sql, code, phrase) in &cases {
        let message = assert_sqlstate(&db.client, sql, code).await;
        assert!(
            message.contains(phrase),
            "{sql}: {message:?} does not say {phrase:?}"
        );
    }
    assert_eq!(
        schema_count(&db.client).await,
        1,
        "nothing else was registered"
    );
    let err = must_fail(
        &db.client,
        "SELECT domain_events.register_schema('Loan.X', 1, '{\"type\": \"obj\"}')",
    )
    .await;
    assert!(err.hint().is_some_and(|h| h.contains("2020-12")), "{err:?}");
}

#[tokio::test]
async fn payloads_are_checked_against_their_schema_and_violations_show_no_values() {
    let db = TestDb::new().await;
    register(&db.client, "Loan.Funded", 1, &funded_schema()).await;
    register(&db.client, "Loan.Closed", 1, &closed_schema_draft7()).await;
    let s = SECRET;
    // (case, event type, payload, None = accepted | Some(expected "pointer (keyword)" list))
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, &str, Value, Option<&str>)> = vec![
        ("valid minimal", "Loan.Funded", funded(|_| {}), None),
        (
            "valid with every property",
            "Loan.Funded",
            funded(|p| {
                p["term_months"] = json!(360);
                p["funded_at"] = json!("2026-11-23T10:15:00Z");
                p["contact"] = json!("ada@example.com");
                p["reference"] = json!("AB-12");
                p["name"] = json!("Zoë");
                p["borrower"] = json!({"id": 7, "address": {"zip": "12345"}});
                p["tags"] = json!(["a", "b", "c"]);
                p["ratio"] = json!(0.75);
            }),
            None,
        ),
        (
            "missing required",
            "Loan.Funded",
            json!({"loan_id": LOAN_ID, "currency": "EUR"}),
            Some(r#""/amount" (required)"#),
        ),
        (
            "wrong type string for number",
            "Loan.Funded",
            funded(|p| p["amount"] = json!(s)),
            Some(r#""/amount" (type)"#),
        ),
        (
            "integer refuses a fraction",
            "Loan.Funded",
            funded(|p| p["term_months"] = json!(12.5)),
            Some(r#""/term_months" (type)"#),
        ),
        (
            "integer accepts 12.0",
            "Loan.Funded",
            funded(|p| p["term_months"] = json!(12.0)),
            None,
        ),
        (
            "null is not a string",
            "Loan.Funded",
            funded(|p| p["loan_id"] = Value::Null),
            Some(r#""/loan_id" (type)"#),
        ),
        (
            "additional property",
            "Loan.Funded",
            funded(|p| p["secret_note"] = json!(s)),
            Some(r#""/secret_note" (additionalProperties)"#),
        ),
        (
            "enum",
            "Loan.Funded",
            funded(|p| p["currency"] = json!(format!("{s}-GBP"))),
            Some(r#""/currency" (enum)"#),
        ),
        (
            "enum is case-sensitive",
            "Loan.Funded",
            funded(|p| p["currency"] = json!("eur")),
            Some(r#""/currency" (enum)"#),
        ),
        (
            "exclusiveMinimum at the edge",
            "Loan.Funded",
            funded(|p| p["amount"] = json!(0)),
            Some(r#""/amount" (exclusiveMinimum)"#),
        ),
        (
            "just above the exclusive edge",
            "Loan.Funded",
            funded(|p| p["amount"] = json!(0.000001)),
            None,
        ),
        (
            "maximum at the edge",
            "Loan.Funded",
            funded(|p| p["amount"] = json!(1000000)),
            None,
        ),
        (
            "just above maximum",
            "Loan.Funded",
            funded(|p| p["amount"] = json!(1000000.01)),
            Some(r#""/amount" (maximum)"#),
        ),
        (
            "negative",
            "Loan.Funded",
            funded(|p| p["amount"] = json!(-5)),
            Some(r#""/amount" (exclusiveMinimum)"#),
        ),
        (
            "huge integer",
            "Loan.Funded",
            funded(|p| p["term_months"] = json!(u64::MAX)),
            Some(r#""/term_months" (maximum)"#),
        ),
        (
            "minimum of an integer",
            "Loan.Funded",
            funded(|p| p["term_months"] = json!(0)),
            Some(r#""/term_months" (minimum)"#),
        ),
        (
            "multipleOf",
            "Loan.Funded",
            funded(|p| p["ratio"] = json!(0.3)),
            Some(r#""/ratio" (multipleOf)"#),
        ),
        (
            "format uuid",
            "Loan.Funded",
            funded(|p| p["loan_id"] = json!(format!("{s}-not-a-uuid"))),
            Some(r#""/loan_id" (format)"#),
        ),
        (
            "format date-time",
            "Loan.Funded",
            funded(|p| p["funded_at"] = json!("2026-13-45 25:00")),
            Some(r#""/funded_at" (format)"#),
        ),
        (
            "format email",
            "Loan.Funded",
            funded(|p| p["contact"] = json!(format!("{s}.example.com"))),
            Some(r#""/contact" (format)"#),
        ),
        (
            "pattern",
            "Loan.Funded",
            funded(|p| p["reference"] = json!(format!("{s}-1"))),
            Some(r#""/reference" (pattern)"#),
        ),
        (
            "unicode counts characters, not bytes",
            "Loan.Funded",
            funded(|p| p["name"] = json!("ŻółćŹ")),
            None,
        ),
        (
            "unicode too long",
            "Loan.Funded",
            funded(|p| p["name"] = json!("日本語です。")),
            Some(r#""/name" (maxLength)"#),
        ),
        (
            "unicode too short",
            "Loan.Funded",
            funded(|p| p["name"] = json!("😀")),
            Some(r#""/name" (minLength)"#),
        ),
        (
            "nested object required",
            "Loan.Funded",
            funded(|p| p["borrower"] = json!({"name": s})),
            Some(r#""/borrower/id" (required)"#),
        ),
        (
            "nested object type",
            "Loan.Funded",
            funded(|p| p["borrower"] = json!({"id": s})),
            Some(r#""/borrower/id" (type)"#),
        ),
        (
            "deeply nested pattern",
            "Loan.Funded",
            funded(|p| p["borrower"] = json!({"id": 1, "address": {"zip": format!("{s}1")}})),
            Some(r#""/borrower/address/zip" (pattern)"#),
        ),
        (
            "array item type",
            "Loan.Funded",
            funded(|p| p["tags"] = json!(["a", 7, {"x": s}])),
            Some(r#""/tags/1" (type), "/tags/2" (type)"#),
        ),
        (
            "array maxItems",
            "Loan.Funded",
            funded(|p| p["tags"] = json!(["a", "b", "c", "d"])),
            Some(r#""/tags" (maxItems)"#),
        ),
        (
            "array uniqueItems",
            "Loan.Funded",
            funded(|p| p["tags"] = json!([s, s])),
            Some(r#""/tags" (uniqueItems)"#),
        ),
        (
            "not an array",
            "Loan.Funded",
            funded(|p| p["tags"] = json!(s)),
            Some(r#""/tags" (type)"#),
        ),
        (
            "unicode property name in the pointer",
            "Loan.Funded",
            funded(|p| p["wartość"] = json!(s)),
            Some(r#""/wartość" (additionalProperties)"#),
        ),
        (
            "pointer escapes ~ and /",
            "Loan.Funded",
            funded(|p| p["a/b~c"] = json!(s)),
            Some(r#""/a~1b~0c" (additionalProperties)"#),
        ),
        (
            "several failures, in the validator's order",
            "Loan.Funded",
            json!({"amount": s, "currency": s}),
            Some(r#""/loan_id" (required), "/amount" (type), "/currency" (enum)"#),
        ),
        (
            "draft-07 valid",
            "Loan.Closed",
            json!({"reason": "paid", "closed_on": "2026-11-23", "notes": null, "extra": "x"}),
            None,
        ),
        (
            "draft-07 enum",
            "Loan.Closed",
            json!({"reason": s}),
            Some(r#""/reason" (enum)"#),
        ),
        (
            "draft-07 format date",
            "Loan.Closed",
            json!({"reason": "paid", "closed_on": "23.11.2026"}),
            Some(r#""/closed_on" (format)"#),
        ),
        (
            "draft-07 additionalProperties schema",
            "Loan.Closed",
            json!({"reason": "paid", "extra": 1}),
            Some(r#""/extra" (type)"#),
        ),
        (
            "draft-07 missing required",
            "Loan.Closed",
            json!({}),
            Some(r#""/reason" (required)"#),
        ),
        (
            "no schema for this type",
            "Loan.Other",
            json!({"anything": s}),
            None,
        ),
    ];
    assert!(cases.len() >= 25);
    let mut accepted = 0_i64;
    let mut deviations = Vec::new();
    for (case, event_type, payload, expected) in &cases {
        match (raise(&db.client, event_type, 1, payload).await, expected) {
            (Ok(()), None) => accepted += 1,
            (Ok(()), Some(failures)) => {
                deviations.push(format!("{case}: accepted, expected {failures}"))
            }
            (Err(err), None) => deviations.push(format!("{case}: refused: {err}")),
            (Err(err), Some(failures)) => {
                let text = violation_text(&err);
                let expected = format!(
                    "payload does not match the schema of {event_type} version 1: {failures}\n"
                );
                if !text.starts_with(&expected) {
                    deviations.push(format!("{case}: {text:?}, expected {expected:?}"));
                }
            }
        }
    }
    assert!(deviations.is_empty(), "{}", deviations.join("\n"));
    assert_eq!(
        db.event_count().await,
        accepted,
        "refused payloads wrote nothing"
    );
}

#[tokio::test]
async fn raise_events_names_the_item_and_writes_nothing() {
    let db = TestDb::new().await;
    register(&db.client, "Loan.Funded", 1, &funded_schema()).await;
    let item = |payload: Value| json!({"aggregate_type": "Loan", "aggregate_id": "L-2", "event_type": "Loan.Funded", "payload": payload});
    let batch = json!([
        item(funded(|_| {})),
        item(funded(|_| {})),
        item(funded(|p| p["amount"] = json!(SECRET))),
        item(funded(|p| p["currency"] = json!(SECRET))),
    ]);
    let err = db
        .client
        .query("SELECT * FROM domain_events.raise_events($1)", &[&batch])
        .await
        .expect_err("the batch breaks its contract");
    let text = violation_text(&err);
    assert!(
        text.starts_with(
            "events[2].payload does not match the schema of Loan.Funded version 1: \"/amount\" (type)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("/properties/amount/type"),
        "the detail names the schema keyword: {text}"
    );
    assert_eq!(db.event_count().await, 0, "all or nothing");
    // An item without a payload is checked as `{}`.
    let err = db
        .client
        .query(
            "SELECT * FROM domain_events.raise_events($1)",
            &[&json!([{"aggregate_type": "Loan", "aggregate_id": "L-2", "event_type": "Loan.Funded"}])],
        )
        .await
        .expect_err("no payload, required properties missing");
    assert!(violation_text(&err).contains(r#""/amount" (required)"#));
}

#[tokio::test]
async fn strict_mode_refuses_unregistered_event_types_and_off_checks_nothing() {
    let db = TestDb::new().await;
    register(&db.client, "Loan.Funded", 1, &funded_schema()).await;
    db.client
        .batch_execute("SET domain_events.schema_validation = strict")
        .await
        .unwrap();
    let err = raise(&db.client, "Loan.Opened", 1, &json!({"x": SECRET}))
        .await
        .expect_err("strict: no schema for Loan.Opened");
    let text = violation_text(&err);
    assert!(
        text.starts_with("payload: Loan.Opened version 1 has no registered schema"),
        "{text}"
    );
    let err = raise(&db.client, "Loan.Funded", 2, &funded(|_| {}))
        .await
        .expect_err("strict: the schema is per version");
    violation_text(&err);
    raise(&db.client, "Loan.Funded", 1, &funded(|_| {}))
        .await
        .expect("a registered, valid payload");
    db.client
        .batch_execute("SET domain_events.schema_validation = off")
        .await
        .unwrap();
    raise(&db.client, "Loan.Funded", 1, &json!({"amount": SECRET}))
        .await
        .expect("off checks nothing");
    // A writer cannot switch validation off for itself: not before the library is loaded in
    // its session (Postgres drops the placeholder's value when the setting is defined) ...
    let (role, dsn) = login_role(&db, "pgde_sv", Some("domain_events_writer")).await;
    let writer = e2e::connect(&dsn).await;
    let _ = writer
        .batch_execute("SET domain_events.schema_validation = off")
        .await;
    let err = raise(&writer, "Loan.Funded", 1, &json!({"amount": SECRET}))
        .await
        .expect_err("still checked");
    violation_text(&err);
    // ... nor after.
    assert_sqlstate(
        &writer,
        "SET domain_events.schema_validation = off",
        "42501",
    )
    .await;
    drop(writer);
    drop_role(&db, &role).await;
}

#[tokio::test]
async fn only_the_admin_role_registers_and_drops_and_readers_fetch_schemas() {
    let db = TestDb::new().await;
    let (writer_role, writer_dsn) = login_role(&db, "pgde_sw", Some("domain_events_writer")).await;
    let (reader_role, reader_dsn) = login_role(&db, "pgde_sr", Some("domain_events_reader")).await;
    let (admin_role, admin_dsn) = login_role(&db, "pgde_sa", Some("domain_events_admin")).await;
    let writer = e2e::connect(&writer_dsn).await;
    let reader = e2e::connect(&reader_dsn).await;
    let admin = e2e::connect(&admin_dsn).await;
    for client in [&writer, &reader] {
        for sql in [
            "SELECT domain_events.register_schema('Loan.Funded', 1, '{}')",
            "SELECT domain_events.drop_schema('Loan.Funded', 1)",
            "INSERT INTO domain_events.event_schema (event_type, event_version, schema) VALUES ('Loan.Funded', 1, '{}')",
        ] {
            assert_sqlstate(client, sql, "42501").await;
        }
    }
    assert_sqlstate(
        &writer,
        "SELECT * FROM domain_events.event_schemas",
        "42501",
    )
    .await;
    assert!(register(&admin, "Loan.Funded", 1, &funded_schema()).await);
    assert!(register(&admin, "Loan.Funded", 2, &json!({"type": "object"})).await);
    // The writer's raises are checked; the reader fetches the contract, as a consumer would.
    let err = raise(&writer, "Loan.Funded", 1, &json!({"amount": SECRET}))
        .await
        .expect_err("the writer's payload is checked");
    violation_text(&err);
    let row = reader
        .query_one(
            "SELECT schema, registered_by, draft, latest FROM domain_events.event_schemas \
              WHERE event_type = 'Loan.Funded' AND event_version = 1",
            &[],
        )
        .await
        .expect("readers fetch schemas");
    assert_eq!(row.get::<_, Value>(0), funded_schema());
    assert_eq!(row.get::<_, String>(1), admin_role);
    assert_eq!(
        row.get::<_, String>(2),
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert!(!row.get::<_, bool>(3), "version 2 is the latest");
    let changes: i64 = reader
        .query_one(
            "SELECT count(*) FROM domain_events.check_schema_compatibility('Loan.Funded', '{\"required\": [\"x\"]}')",
            &[],
        )
        .await
        .expect("readers may ask what a new version breaks")
        .get(0);
    assert_eq!(changes, 1);
    admin
        .batch_execute("SELECT domain_events.drop_schema('Loan.Funded', 2)")
        .await
        .expect("the admin drops an unused version");
    raise(&writer, "Loan.Funded", 1, &funded(|_| {}))
        .await
        .unwrap();
    assert_sqlstate(
        &admin,
        "SELECT domain_events.drop_schema('Loan.Funded', 1)",
        "2BP01",
    )
    .await;
    drop((writer, reader, admin));
    for role in [writer_role, reader_role, admin_role] {
        drop_role(&db, &role).await;
    }
}

/// Capture runs validation as the extension owner: a writer changing a tracked table gets
/// its rows' events checked without reading the registry itself.
#[tokio::test]
async fn tracked_tables_are_checked_for_writers_too() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE public.loans (id bigint PRIMARY KEY, amount numeric NOT NULL);
             SELECT domain_events.track('public.loans', 'Loan');",
        )
        .await
        .unwrap();
    register(
        &db.client,
        "Loan.Created",
        1,
        &json!({"type": "object", "properties": {"amount": {"type": "number", "maximum": 1000}}}),
    )
    .await;
    let (role, dsn) = login_role(&db, "pgde_sc", Some("domain_events_writer")).await;
    db.client
        .batch_execute(&format!("GRANT INSERT ON public.loans TO {role}"))
        .await
        .unwrap();
    let writer = e2e::connect(&dsn).await;
    writer
        .batch_execute("INSERT INTO public.loans VALUES (1, 10)")
        .await
        .expect("a valid row");
    let err = writer
        .batch_execute("INSERT INTO public.loans VALUES (2, 987654321)")
        .await
        .expect_err("the Loan.Created payload breaks its schema");
    let text = violation_text(&err);
    assert!(text.contains(r#""/amount" (maximum)"#), "{text}");
    assert!(!text.contains("987654321"), "{text}");
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM public.loans", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (rows, db.event_count().await),
        (1, 1),
        "the row went with its event"
    );
    db.client
        .batch_execute(&format!("REVOKE ALL ON public.loans FROM {role}"))
        .await
        .unwrap();
    drop(writer);
    drop_role(&db, &role).await;
}

/// A session whose cache was filled before another session registered a schema enforces it
/// from its next statement: in an open transaction whose snapshot predates the registration
/// (REPEATABLE READ, SERIALIZABLE), and in every transaction after it. A drop is seen the same
/// way.
#[tokio::test]
async fn another_sessions_registration_is_enforced_by_the_next_statement() {
    let db = TestDb::new().await;
    let admin = db.connect().await;
    let writer = db.connect().await;
    let bad = json!({"amount": SECRET});
    for (round, isolation) in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]
        .iter()
        .enumerate()
    {
        let event_type = format!("Round{round}.Funded");
        writer
            .batch_execute(&format!("BEGIN ISOLATION LEVEL {isolation}"))
            .await
            .unwrap();
        // Fills this session's copy of the registry (no schema for event_type) and takes
        // the transaction's snapshot.
        raise(&writer, "Warmup.Done", 1, &bad)
            .await
            .expect("no schema: accepted");
        register(&admin, &event_type, 1, &funded_schema()).await;
        let err = raise(&writer, &event_type, 1, &bad)
            .await
            .expect_err("enforced by the next statement");
        violation_text(&err);
        writer.batch_execute("ROLLBACK").await.unwrap();
        let err = raise(&writer, &event_type, 1, &bad)
            .await
            .expect_err("and by the next transaction");
        violation_text(&err);
        admin
            .batch_execute(&format!(
                "SELECT domain_events.drop_schema('{event_type}', 1)"
            ))
            .await
            .unwrap();
        raise(&writer, &event_type, 1, &bad)
            .await
            .unwrap_or_else(|e| {
                panic!("{isolation}: the dropped schema is no longer enforced: {e}")
            });
    }
}

/// Four writers raise (single events and batches, valid and invalid payloads) while a fifth
/// session registers the schema. No writer sees an error before the registration commits,
/// and every statement a writer starts after it has committed refuses the invalid payloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_registered_while_four_writers_raise_is_enforced_without_a_stale_cache() {
    let db = TestDb::new().await;
    let registered = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = db.connect().await;
        let registered = registered.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let (mut before, mut after) = (0_u32, 0_u32);
            let mut n = 0_u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let valid = n.is_multiple_of(2);
                let payload = if valid {
                    funded(|_| {})
                } else {
                    funded(|p| p["amount"] = json!(SECRET))
                };
                // Read before sending: a statement sent after this saw the commit.
                let committed = registered.load(Ordering::SeqCst);
                let outcome = if w % 2 == 0 {
                    raise(&client, "Loan.Funded", 1, &payload).await
                } else {
                    let item = json!({"aggregate_type": "Loan", "aggregate_id": format!("W-{w}-{n}"), "event_type": "Loan.Funded", "payload": payload});
                    client
                        .query("SELECT * FROM domain_events.raise_events($1)", &[&json!([item])])
                        .await
                        .map(|_| ())
                };
                match (committed, valid, outcome) {
                    (_, true, Ok(())) => {}
                    (false, false, Ok(())) => before += 1,
                    (false, false, Err(e)) if sqlstate(&e) == "23514" => {}
                    (true, false, Err(e)) if sqlstate(&e) == "23514" => after += 1,
                    (committed, valid, outcome) => panic!(
                        "writer {w}, statement {n}: registration committed {committed}, valid {valid}: {outcome:?}"
                    ),
                }
            }
            (before, after)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = db.connect().await;
    register(&admin, "Loan.Funded", 1, &funded_schema()).await;
    registered.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let mut totals = (0, 0);
    for writer in writers {
        let (before, after) = writer.await.expect("a writer panicked");
        assert!(
            after > 0,
            "each writer raised invalid payloads after the registration"
        );
        totals = (totals.0 + before, totals.1 + after);
    }
    assert!(
        totals.0 > 0,
        "invalid payloads were accepted before the registration"
    );
}

/// `listener schemas export DIR`: one file per event type and version, each the registered
/// schema as it reads back from the database.
#[tokio::test]
async fn the_listener_exports_one_file_per_type_and_version() {
    let db = TestDb::new().await;
    let registered = [
        ("Loan.Funded", 1, funded_schema()),
        (
            "Loan.Funded",
            2,
            json!({"type": "object", "required": ["amount"]}),
        ),
        ("Loan.Closed", 1, closed_schema_draft7()),
    ];
    for (event_type, version, schema) in &registered {
        register(&db.client, event_type, *version, schema).await;
    }
    let config = write_config(&config_for(&db, &unique_name("schemas")));
    let dir = std::env::temp_dir().join(format!("pgde-schemas-{}", uuid::Uuid::new_v4().simple()));
    let out = run_cli_ok(
        &["schemas", "export", dir.to_str().expect("a UTF-8 path")],
        &config,
    );
    assert!(out.contains("wrote 3 schema file(s)"), "{out}");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("the directory was created")
        .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "Loan.Closed.v1.schema.json",
            "Loan.Funded.v1.schema.json",
            "Loan.Funded.v2.schema.json"
        ]
    );
    for (event_type, version, schema) in &registered {
        let text =
            std::fs::read_to_string(dir.join(format!("{event_type}.v{version}.schema.json")))
                .expect("read the exported file");
        assert_eq!(&serde_json::from_str::<Value>(&text).expect("JSON"), schema);
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}
