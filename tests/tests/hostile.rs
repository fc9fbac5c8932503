//! Hostile input: what an attacker or a broken client can send that `store_malformed.rs` does
//! not cover. Megabyte strings, 10,000-level JSON, identifiers full of quotes and semicolons,
//! Unicode look-alikes, invalid UTF-8 sent through the binary protocol (the one path by which
//! bytes reach the server without a client-side `String`), and rows the listener must carry past.
//!
//! Every rejected call must fail with its SQLSTATE on a backend that stays up (same backend pid,
//! same postmaster start time, the session still answers) and must leave the store, the business
//! table and the capture configuration as they were.

use std::error::Error;
use std::time::Duration;

use bytes::BytesMut;
use e2e::listener_support::*;
use e2e::store_support::{snapshot, sqlstate_deviations, StoreSnapshot};
use e2e::TestDb;
use serde_json::value::RawValue;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::Client;
use uuid::Uuid;

/// Nesting depth of the deep JSON documents.
const DEPTH: usize = 10_000;
/// One mebibyte.
const MB: usize = 1 << 20;

/// SQLSTATE Postgres uses for invalid bytes in the server encoding.
const INVALID_ENCODING: &str = "22021";

/// A text (or jsonb) parameter sent in binary format as exactly these bytes: tokio-postgres'
/// `&str` cannot carry invalid UTF-8, so this is how a hostile client would send it.
#[derive(Debug)]
struct RawBytes(Vec<u8>);

impl ToSql for RawBytes {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]); // jsonb binary format version
        }
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TEXT | Type::JSONB)
    }

    to_sql_checked!();
}

/// One hostile call and the SQLSTATE it must fail with.
struct Case {
    what: String,
    sql: String,
    params: Vec<RawBytes>,
    code: &'static str,
}

fn case(what: impl Into<String>, code: &'static str, sql: impl Into<String>) -> Case {
    Case {
        what: what.into(),
        sql: sql.into(),
        params: Vec::new(),
        code,
    }
}

fn binary(what: &str, sql: &str, params: Vec<&[u8]>) -> Case {
    Case {
        what: what.into(),
        sql: sql.into(),
        params: params.into_iter().map(|p| RawBytes(p.to_vec())).collect(),
        code: INVALID_ENCODING,
    }
}

/// A SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn raise(aggregate_type: &str, aggregate_id: &str, event_type: &str) -> String {
    format!(
        "SELECT * FROM domain_events.raise_event({}, {}, {})",
        lit(aggregate_type),
        lit(aggregate_id),
        lit(event_type)
    )
}

/// `{"a": {"a": … 1 …}}`, `depth` objects deep.
fn deep_object(depth: usize) -> String {
    format!("{}1{}", r#"{"a": "#.repeat(depth), "}".repeat(depth))
}

/// JSON nested deeper than the parser's 128 levels is an invalid argument like any other. (With
/// pgrx's `JsonB` argument type it was an internal error, `XX000`, raised before the function
/// body ran.)
const DEEP_JSON: &str = "22023";

fn catalogue() -> Vec<Case> {
    let huge = "L".repeat(MB);
    let deep = deep_object(DEPTH);
    let deep_array = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let item = |extra: &str| {
        format!(
            r#"[{{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "Loan.Noted"{extra}}}]"#
        )
    };
    let batch = |json: &str| {
        format!(
            "SELECT * FROM domain_events.raise_events({}::jsonb)",
            lit(json)
        )
    };
    let track = |args: &str| format!("SELECT domain_events.track('public.app_loans', {args})");
    vec![
        // Megabyte strings.
        case("1 MB aggregate_type", "22023", raise(&huge, "42", "Loan.Noted")),
        case("1 MB event_type", "22023", raise("Loan", "42", &huge)),
        case("1 MB aggregate_id", "22023", raise("Loan", &"9".repeat(MB), "Loan.Noted")),
        case(
            "1 MB payload, just over the default max_payload_bytes",
            "22023",
            format!(
                "SELECT * FROM domain_events.raise_event('Loan', '42', 'Loan.Noted', \
                 jsonb_build_object('b', repeat('x', {MB})))"
            ),
        ),
        case(
            "1 MB event_type inside a batch",
            "22023",
            batch(&format!(
                r#"[{{"aggregate_type": "Loan", "aggregate_id": "B-1", "event_type": "{huge}"}}]"#
            )),
        ),
        case(
            "1 MB payload inside a batch",
            "22023",
            batch(&item(&format!(r#", "payload": {{"b": "{}"}}"#, "x".repeat(MB)))),
        ),
        case("1 MB aggregate_type to track()", "22023", track(&lit(&huge))),
        // 10,000 levels of JSON.
        case(
            "10,000-level payload",
            DEEP_JSON,
            format!("SELECT * FROM domain_events.raise_event('Loan', '42', 'Loan.Noted', {})", lit(&deep)),
        ),
        case(
            "10,000-level metadata",
            DEEP_JSON,
            format!(
                "SELECT * FROM domain_events.raise_event('Loan', '42', 'Loan.Noted', '{{}}', {})",
                lit(&format!(r#"{{"source": "core", "extra": {deep}}}"#))
            ),
        ),
        case("10,000-level array as the batch", DEEP_JSON, batch(&deep_array)),
        case(
            "10,000-level payload inside a batch",
            DEEP_JSON,
            batch(&item(&format!(r#", "payload": {deep}"#))),
        ),
        case(
            "10,000-level column_events to track()",
            DEEP_JSON,
            track(&format!("'Loan', column_events => {}", lit(&format!(r#"{{"status": {deep}}}"#)))),
        ),
        // Quotes, semicolons and SQL in names.
        case("double quote in aggregate_type", "22023", raise("Lo\"an", "42", "Loan.Noted")),
        case("backslash in event_type", "22023", raise("Loan", "42", "Loan\\.Noted")),
        case("dollar quoting in event_type", "22023", raise("Loan", "42", "Loan.$$Noted$$")),
        case("comment in aggregate_type", "22023", raise("Loan/**/", "42", "Loan.Noted")),
        case(
            "SQL injection in track()'s aggregate_type",
            "22023",
            track(&lit("Loan\"; DROP TABLE app_loans; --")),
        ),
        case(
            "SQL injection in a column_events event type",
            "22023",
            track(&format!(
                "'Loan', column_events => {}",
                lit(r#"{"status": "Loan.x\"; DROP TABLE app_loans; --"}"#)
            )),
        ),
        case(
            "SQL injection as track()'s id_column",
            "42703",
            track("'Loan', 'id\"; DROP TABLE app_loans; --'"),
        ),
        case(
            "SQL injection in track()'s columns",
            "42703",
            track("'Loan', columns => ARRAY['status\"; DROP TABLE app_loans; --']"),
        ),
        case(
            "SQL injection as a column_events column",
            "42703",
            track(&format!(
                "'Loan', column_events => {}",
                lit(r#"{"status\"; DROP TABLE app_loans; --": "Loan.StatusChanged"}"#)
            )),
        ),
        // Unicode look-alikes and invisible characters.
        case("Greek omicron in aggregate_type", "22023", raise("L\u{3bf}an", "42", "Loan.Noted")),
        case("combining accent in aggregate_type", "22023", raise("Loan\u{301}", "42", "Loan.Noted")),
        case("one-dot leader for the dot", "22023", raise("Loan", "42", "Loan\u{2024}Noted")),
        case("fullwidth semicolon in event_type", "22023", raise("Loan", "42", "Loan\u{ff1b}Noted")),
        case("right-to-left override in event_type", "22023", raise("Loan", "42", "Loan.\u{202e}detoN")),
        case("byte order mark before aggregate_type", "22023", raise("\u{feff}Loan", "42", "Loan.Noted")),
        case("non-breaking space in event_type", "22023", raise("Loan", "42", "Loan.\u{a0}Noted")),
        case("confusable track() aggregate_type", "22023", track(&lit("L\u{43e}an"))),
        // Invalid UTF-8 through the binary protocol.
        binary(
            "0xff in a text aggregate_id",
            "SELECT * FROM domain_events.raise_event('Loan', $1::text, 'Loan.Noted')",
            vec![b"4\xff2"],
        ),
        binary(
            "truncated sequence in aggregate_type",
            "SELECT * FROM domain_events.raise_event($1::text, '42', 'Loan.Noted')",
            vec![b"Lo\xc3"],
        ),
        binary(
            "NUL byte in event_type",
            "SELECT * FROM domain_events.raise_event('Loan', '42', $1::text)",
            vec![b"Loan.\0Noted"],
        ),
        binary(
            "UTF-16 surrogate in a jsonb payload",
            "SELECT * FROM domain_events.raise_event('Loan', '42', 'Loan.Noted', $1::jsonb)",
            vec![b"{\"a\": \"\xed\xa0\x80\"}"],
        ),
        binary(
            "overlong encoding in jsonb metadata",
            "SELECT * FROM domain_events.raise_event('Loan', '42', 'Loan.Noted', '{}', $1::jsonb)",
            vec![b"{\"actor\": \"\xc0\xaf\"}"],
        ),
        binary(
            "0xfe in a batch",
            "SELECT * FROM domain_events.raise_events($1::jsonb)",
            vec![b"[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"\xfe\", \"event_type\": \"Loan.Noted\"}]"],
        ),
        binary(
            "0xff in track()'s aggregate_type",
            "SELECT domain_events.track('public.app_loans', $1::text)",
            vec![b"Loan\xff"],
        ),
    ]
}

/// The store, the business table, and the capture configuration.
#[derive(Debug, PartialEq, Eq)]
struct State {
    store: StoreSnapshot,
    tracked: i64,
    triggers: i64,
}

async fn state(client: &Client) -> State {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM domain_events.tracked_tables),
                    (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.app_loans'::regclass)",
            &[],
        )
        .await
        .expect("read the capture state");
    State {
        store: snapshot(client).await,
        tracked: row.get(0),
        triggers: row.get(1),
    }
}

/// `(backend pid, postmaster start time)`. A backend that crashed takes its session with it, and
/// the postmaster then resets every other session too; a restarted server has a new start time.
async fn liveness(client: &Client) -> Result<(i32, String), String> {
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), pg_postmaster_start_time()::text",
            &[],
        )
        .await
        .map_err(|e| format!("the session no longer answers: {e}"))?;
    Ok((row.get(0), row.get(1)))
}

async fn run(client: &Client, case: &Case, before: &State) -> Result<(), String> {
    let alive_before = liveness(client).await?;
    let params: Vec<&(dyn ToSql + Sync)> = case
        .params
        .iter()
        .map(|p| p as &(dyn ToSql + Sync))
        .collect();
    let outcome = client.query(case.sql.as_str(), &params).await;
    let mut problems = sqlstate_deviations(&outcome, case.code, None);
    match liveness(client).await {
        Ok(alive) if alive == alive_before => {}
        Ok(alive) => problems.push(format!("backend changed: {alive_before:?} -> {alive:?}")),
        Err(e) => return Err(e),
    }
    let after = state(client).await;
    if &after != before {
        problems.push(format!("state changed: {before:?} -> {after:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test]
async fn hostile_calls_fail_cleanly_with_nothing_written_and_the_backend_up() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE public.app_loans (id bigint PRIMARY KEY, status text NOT NULL);
             INSERT INTO public.app_loans VALUES (42, 'submitted');
             SELECT * FROM domain_events.raise_event('Loan', 42, 'LoanCreated');",
        )
        .await
        .expect("seed");
    let client = db.connect().await;
    let before = state(&client).await;
    assert_eq!(before.store.events, 1);
    assert_eq!(before.tracked, 0);

    let cases = catalogue();
    let mut deviations = Vec::new();
    for case in &cases {
        if let Err(problem) = run(&client, case, &before).await {
            deviations.push(format!("- {}: {problem}", case.what));
        }
    }
    assert!(
        deviations.is_empty(),
        "{} of {} hostile calls deviate:\n{}",
        deviations.len(),
        cases.len(),
        deviations.join("\n")
    );
    println!("hostile calls rejected cleanly: {}", cases.len());
}

/// Hostile identifiers are data, not SQL: a table and columns named with quotes, semicolons and
/// a fullwidth letter are tracked, and their changes become events naming them verbatim.
#[tokio::test]
async fn track_quotes_hostile_table_and_column_names() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            r#"CREATE TABLE public."we;ird""na'me" ("i""d" int PRIMARY KEY, "st;atus" text, "Ｓtatus" text);
               SELECT domain_events.track('public."we;ird""na''me"', 'Loan', 'i"d',
                   column_events => '{"st;atus": "Loan.StatusChanged"}');
               INSERT INTO public."we;ird""na'me" VALUES (1, 'a', 'b');
               UPDATE public."we;ird""na'me" SET "st;atus" = 'c';"#,
        )
        .await
        .expect("track a table with hostile names");
    let rows = db
        .client
        .query(
            "SELECT aggregate_id, event_type, payload::text FROM domain_events.event ORDER BY position",
            &[],
        )
        .await
        .unwrap();
    let events: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        events.contains(&(
            "1".into(),
            "Loan.Created".into(),
            r#"{"i\"d": 1, "st;atus": "a", "Ｓtatus": "b"}"#.into()
        )),
        "{events:?}"
    );
    assert!(
        events.contains(&(
            "1".into(),
            "Loan.StatusChanged".into(),
            r#"{"new_st;atus": "c", "old_st;atus": "a"}"#.into()
        )),
        "{events:?}"
    );
    let tables: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "no statement ran from a name");
}

/// The complete JSON lines of the stdout handler. Payloads here are nested far deeper than
/// `serde_json::Value` accepts, so each line is read as a map of raw values.
fn raw_lines(process: &ListenerProcess) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(&process.stdout_path).unwrap_or_default();
    let complete = text.rfind('\n').map(|end| &text[..=end]).unwrap_or("");
    complete
        .lines()
        .map(|line| {
            let fields: std::collections::BTreeMap<String, Box<RawValue>> =
                serde_json::from_str(line).expect("a JSON object per line");
            fields
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v.get().to_string())))
                .collect()
        })
        .collect()
}

fn field<'a>(line: &'a serde_json::Map<String, serde_json::Value>, key: &str) -> &'a str {
    line[key].as_str().expect("raw field")
}

/// Rows no raising function accepts, written around it by a superuser: a payload nested 10,000
/// levels deep, a 4 MB payload, metadata 10,000 levels deep, and an id with quotes, a semicolon
/// and a right-to-left override. The real binary (replication mode) hands each to its handler
/// byte for byte (JSON stays raw text, so depth is no limit), keeps streaming, confirms past them,
/// never logs them, and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_streams_past_hostile_rows_and_the_slot_moves_on() {
    let db = TestDb::new().await;
    let name = unique_name("hostile");
    let _slot = SlotGuard(name.clone());
    let config = write_config(&config_for(&db, &name));
    let mut process = ListenerProcess::spawn(&config, &[]);
    wait_slot_active(&db.client, &name, Duration::from_secs(120)).await;

    let insert = |aggregate_id: &str, payload: &str, metadata: &str| {
        format!(
            "INSERT INTO domain_events.event \
                (id, aggregate_type, aggregate_id, aggregate_version, event_type, payload, metadata) \
             VALUES (gen_random_uuid(), 'Loan', {}, 1, 'Loan.Noted', {}::jsonb, {}::jsonb) \
             RETURNING id",
            lit(aggregate_id),
            lit(payload),
            lit(metadata)
        )
    };
    let deep = format!(r#"{{"not for logs": {}}}"#, deep_object(DEPTH));
    let big = format!(r#"{{"blob": "not for logs {}"}}"#, "x".repeat(4 * MB));
    let odd_id = "42'); DROP TABLE x; --\u{202e}";
    let mut client = db.connect().await;
    let tx = client.transaction().await.unwrap();
    let mut ids = Vec::new();
    for sql in [
        insert("deep", &deep, "{}"),
        insert("big", &big, "{}"),
        insert("meta", "{}", &deep),
        insert(odd_id, "{}", "{}"),
    ] {
        ids.push(
            tx.query_one(sql.as_str(), &[])
                .await
                .expect("direct insert")
                .get::<_, Uuid>(0),
        );
    }
    tx.commit().await.unwrap();
    let after: Uuid = client
        .query_one(
            "SELECT id FROM domain_events.raise_event('Loan', 'after', 'Loan.Noted')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    ids.push(after);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines = raw_lines(&process);
        if lines.len() >= ids.len() {
            break lines;
        }
        if let Some(status) = process.wait_exit(Duration::ZERO).await {
            panic!("listener exited ({status}): {}", process.stderr());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} lines; logs:\n{}",
            lines.len(),
            ids.len(),
            process.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got: Vec<Uuid> = lines
        .iter()
        .map(|l| serde_json::from_str::<Uuid>(field(l, "id")).unwrap())
        .collect();
    assert_eq!(got, ids, "every row, in commit order");
    for (line, id) in lines.iter().zip(&ids) {
        let stored = db
            .client
            .query_one(
                "SELECT payload::text, metadata::text, to_json(aggregate_id)::text \
                 FROM domain_events.event WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        assert_eq!(
            field(line, "payload"),
            stored.get::<_, String>(0),
            "payload of {id}"
        );
        assert_eq!(
            field(line, "metadata"),
            stored.get::<_, String>(1),
            "metadata of {id}"
        );
        let sent: String = serde_json::from_str(field(line, "aggregate_id")).unwrap();
        let kept: String = serde_json::from_str(&stored.get::<_, String>(2)).unwrap();
        assert_eq!(sent, kept);
    }
    let commit: listener::Lsn =
        serde_json::from_str::<String>(field(&lines[ids.len() - 1], "commit_lsn"))
            .unwrap()
            .parse()
            .unwrap();
    wait_confirmed_past(&db.client, &name, commit, Duration::from_secs(30)).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());

    process.terminate();
    let status = process
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    let logs = process.stderr();
    assert!(status.success(), "exit status {status}; logs:\n{logs}");
    assert!(!logs.contains("not for logs"), "a payload was logged");
    assert!(!logs.to_lowercase().contains("panic"), "{logs}");
}
