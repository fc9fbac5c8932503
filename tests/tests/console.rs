//! End-to-end tests of the operator console's API over real HTTP, served by a running listener
//! that connects as a role granted `domain_events_console`: every route for every role, what
//! each role sees, parameter errors, the security headers and cross-site POSTs, and that the
//! console's role can read but not write.

use e2e::console_support::*;
use e2e::TestDb;
use serde_json::{json, Value};

/// One aggregate with two versions, and a dead letter of a subscription no listener serves
/// (a redrive request on it stays, so it can be asked for again).
async fn seed(db: &TestDb) -> (Value, String) {
    let ids: Vec<uuid::Uuid> = db
        .client
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&json!([
                {"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Created",
                 "payload": {"amount": 100}, "metadata": {"actor": "dev-1"}},
                {"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Funded",
                 "payload": {"amount": 100, "rate": 7.5}},
                {"aggregate_type": "Card", "aggregate_id": "7", "event_type": "Card.Issued"},
            ])],
        )
        .await
        .expect("raise_events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.client
        .execute(
            "INSERT INTO domain_events.dead_letter (subscription, handler, event_id, position, error, attempts) \
             SELECT 'ghost', 'mailer', id, position, 'smtp down', 3 FROM domain_events.event WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .expect("dead letter");
    let redrive = json!({"subscription": "ghost", "event_id": ids[1].to_string()});
    (redrive, ids[1].to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_each_role_as_the_table_says() {
    let db = TestDb::new().await;
    let (redrive, _) = seed(&db).await;
    let console = ConsoleUnderTest::start(&db).await;
    let outbox = format!(
        "/api/subscriptions/{}/outbox?status=all",
        console.subscription
    );
    let body = redrive.to_string();
    // (method, path, body, lowest role allowed: 0 viewer, 1 developer, 2 operator)
    let routes: Vec<(&str, &str, Option<&str>, usize)> = vec![
        ("GET", "/api/events", None, 0),
        ("GET", "/api/events?event_type=Loan.Funded&limit=1", None, 0),
        ("GET", "/api/aggregates/Loan/42", None, 0),
        ("GET", "/api/event-types", None, 0),
        ("GET", "/api/subscriptions", None, 0),
        ("GET", "/api/handlers", None, 0),
        ("GET", &outbox, None, 1),
        ("GET", "/api/dead-letters", None, 1),
        ("GET", "/api/dead-letters?subscription=ghost", None, 1),
        ("POST", "/api/dead-letters/redrive", Some(&body), 2),
    ];
    let callers = [
        (None, None),
        (Some("not-a-token"), None),
        (Some(VIEWER), Some(0)),
        (Some(DEVELOPER), Some(1)),
        (Some(OPERATOR), Some(2)),
    ];
    let json_type = [("content-type", "application/json")];
    for (method, path, body, lowest) in &routes {
        for (token, rank) in callers {
            let expected = match rank {
                None => 401,
                Some(rank) if rank < *lowest => 403,
                Some(_) => 200,
            };
            let (status, _, text) = console.call(method, path, token, &json_type, *body).await;
            assert_eq!(status, expected, "{method} {path} with {token:?}: {text}");
            let error: Value = serde_json::from_str(&text).expect("JSON body");
            if expected != 200 {
                assert!(error["error"].is_string(), "{text}");
            }
        }
    }
    // The document itself needs no token.
    let (status, doc) = console.get_json("/api/openapi.json", None).await;
    assert_eq!(status, 200);
    let documented: Vec<&String> = doc["paths"].as_object().expect("paths").keys().collect();
    assert_eq!(documented.len(), 9, "{documented:?}");
    console.stop(&db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_sees_no_payloads_or_metadata_and_a_developer_does() {
    let db = TestDb::new().await;
    seed(&db).await;
    let console = ConsoleUnderTest::start(&db).await;
    for path in ["/api/events?aggregate_type=Loan", "/api/aggregates/Loan/42"] {
        let (_, viewer) = console.get_json(path, Some(VIEWER)).await;
        let items = viewer["items"].as_array().expect("items");
        assert_eq!(items.len(), 2, "{viewer}");
        for item in items {
            assert!(
                item.get("payload").is_none() && item.get("metadata").is_none(),
                "{item}"
            );
            assert_eq!(item["aggregate_id"], "42");
        }
        let (_, developer) = console.get_json(path, Some(DEVELOPER)).await;
        assert_eq!(developer["items"][0]["payload"], json!({"amount": 100}));
        assert_eq!(developer["items"][0]["metadata"]["actor"], "dev-1");
        assert_eq!(developer["items"][1]["payload"]["rate"], 7.5);
    }
    let (_, viewer) = console.get_json("/api/handlers", Some(VIEWER)).await;
    assert!(viewer["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|h| h.get("last_error").is_none()));
    console.stop(&db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_follow_the_cursor_and_bad_parameters_are_named() {
    let db = TestDb::new().await;
    seed(&db).await;
    let console = ConsoleUnderTest::start(&db).await;
    let (_, first) = console.get_json("/api/events?limit=2", Some(VIEWER)).await;
    assert_eq!(first["items"].as_array().expect("items").len(), 2);
    let next = first["next"]
        .as_i64()
        .expect("a next cursor on a full page");
    let (_, second) = console
        .get_json(
            &format!("/api/events?limit=2&after_position={next}"),
            Some(VIEWER),
        )
        .await;
    assert_eq!(second["items"].as_array().expect("items").len(), 1);
    assert_eq!(second["next"], Value::Null);
    let (_, history) = console
        .get_json("/api/aggregates/Loan/42?after_version=1", Some(VIEWER))
        .await;
    assert_eq!(history["items"][0]["aggregate_version"], 2);

    let sub = &console.subscription;
    for (path, parameter) in [
        ("/api/events?limit=0".to_string(), "limit"),
        ("/api/events?limit=501".to_string(), "limit"),
        ("/api/events?limit=ten".to_string(), "limit"),
        ("/api/events?from=yesterday".to_string(), "from"),
        ("/api/events?to=10000-01-01T00:00:00Z".to_string(), "to"),
        (
            "/api/events?after_position=1e3".to_string(),
            "after_position",
        ),
        ("/api/events?event_type=a%00b".to_string(), "event_type"),
        ("/api/events?aggregate_type=".to_string(), "aggregate_type"),
        (
            "/api/events?order=position;DROP%20TABLE%20x".to_string(),
            "order",
        ),
        ("/api/events?limit=1&limit=2".to_string(), "limit"),
        (
            format!("/api/subscriptions/{sub}/outbox?status=sent"),
            "status",
        ),
        ("/api/dead-letters?after_id=-".to_string(), "after_id"),
        (
            "/api/aggregates/Loan/42?after_version=x".to_string(),
            "after_version",
        ),
        (
            "/api/aggregates/Loan/a%00?limit=1".to_string(),
            "aggregate_id",
        ),
    ] {
        let (status, error) = console.get_json(&path, Some(OPERATOR)).await;
        assert_eq!(
            (status, error["parameter"].as_str()),
            (400, Some(parameter)),
            "{path}: {error}"
        );
        assert_eq!(error["error"], "bad_parameter");
    }
    let (status, error) = console
        .get_json("/api/subscriptions/nope/outbox", Some(DEVELOPER))
        .await;
    assert_eq!((status, error["error"].as_str()), (404, Some("not_found")));
    console.stop(&db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_carry_security_headers_and_cross_site_posts_are_refused() {
    let db = TestDb::new().await;
    let (redrive, _) = seed(&db).await;
    let console = ConsoleUnderTest::start(&db).await;
    let (_, headers, _) = console
        .call("GET", "/api/events", Some(VIEWER), &[], None)
        .await;
    let csp = headers["content-security-policy"].to_str().expect("CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    let (_, headers, _) = console.call("GET", "/api/events", None, &[], None).await;
    assert_eq!(headers["x-frame-options"], "DENY", "401s carry them too");

    let body = redrive.to_string();
    let url = format!("http://127.0.0.1:{}", console.port);
    for headers in [
        vec![("content-type", "application/x-www-form-urlencoded")],
        vec![("content-type", "text/plain")],
        vec![
            ("content-type", "application/json"),
            ("origin", "http://evil.example"),
        ],
        vec![
            ("content-type", "application/json"),
            ("sec-fetch-site", "cross-site"),
        ],
    ] {
        let (status, _, text) = console
            .call(
                "POST",
                "/api/dead-letters/redrive",
                Some(OPERATOR),
                &headers,
                Some(&body),
            )
            .await;
        assert_eq!(status, 403, "{headers:?}: {text}");
        assert!(text.contains("cross_site"), "{text}");
    }
    let same_origin = [
        ("content-type", "application/json"),
        ("origin", url.as_str()),
        ("sec-fetch-site", "same-origin"),
    ];
    let (status, _, text) = console
        .call(
            "POST",
            "/api/dead-letters/redrive",
            Some(OPERATOR),
            &same_origin,
            Some(&body),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    console.stop(&db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_role_reads_and_redrives_but_writes_nothing() {
    let db = TestDb::new().await;
    let (_, event_id) = seed(&db).await;
    let console = ConsoleUnderTest::start(&db).await;
    let client = console.connect_as_console(&db).await;
    // Every table of the schema, partitions included.
    let tables: Vec<String> = db
        .client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'domain_events' AND c.relkind IN ('r', 'p') ORDER BY 1",
            &[],
        )
        .await
        .expect("tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 8, "{tables:?}");
    for table in &tables {
        for statement in [
            format!("INSERT INTO {table} DEFAULT VALUES"),
            format!(
                "UPDATE {table} SET {} = {0}",
                first_column(&db, table).await
            ),
            format!("DELETE FROM {table}"),
            format!("TRUNCATE {table}"),
        ] {
            let err = client
                .batch_execute(&statement)
                .await
                .expect_err(&statement);
            assert_eq!(e2e::sqlstate(&err), "42501", "{statement}: {err}");
        }
    }
    for function in [
        "SELECT domain_events.redrive('ghost')",
        "SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created')",
        "SELECT domain_events.maintain()",
    ] {
        let err = client.batch_execute(function).await.expect_err(function);
        assert_eq!(e2e::sqlstate(&err), "42501", "{function}: {err}");
    }
    // It reads, and it may ask for one event's redrive.
    let n: i64 = client
        .query_one("SELECT count(*) FROM domain_events.event", &[])
        .await
        .expect("reads")
        .get(0);
    assert_eq!(n, 3);
    let id: uuid::Uuid = event_id.parse().expect("uuid");
    let marked: i32 = client
        .query_one(
            "SELECT domain_events.redrive_dead_letter('ghost', $1)",
            &[&id],
        )
        .await
        .expect("redrive_dead_letter")
        .get(0);
    assert_eq!(marked, 1);
    console.stop(&db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_lasts_the_configured_time_and_no_longer() {
    let db = TestDb::new().await;
    seed(&db).await;
    let console = ConsoleUnderTest::start_tuned(&db, listener::Registry::new(), |c| {
        c.session_max_age_secs = 600;
    })
    .await;
    let url = format!("http://127.0.0.1:{}", console.port);
    // No redirects followed: the cookie is on the sign-in's own answer.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client");
    let sign_in = |extra: Option<(&'static str, &'static str)>| {
        let mut request = http
            .post(format!("{url}/session"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={DEVELOPER}"));
        if let Some((name, value)) = extra {
            request = request.header(name, value);
        }
        request.send()
    };
    let answer = sign_in(None).await.expect("sign in");
    assert_eq!(answer.status(), 303);
    let cookie = answer.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    let attributes: Vec<&str> = cookie.split("; ").collect();
    for wanted in ["Path=/", "Max-Age=600", "HttpOnly", "SameSite=Strict"] {
        assert!(attributes.contains(&wanted), "{wanted} missing: {cookie}");
    }
    assert!(
        !attributes.contains(&"Secure"),
        "plain HTTP: a Secure cookie would be dropped: {cookie}"
    );
    // The value carries its expiry, about 600 s from now.
    let value = attributes[0].strip_prefix("pgde_console=").expect("value");
    let (hex_token, expires) = value.split_once('.').expect("token.expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expires: u64 = expires.parse().expect("expiry");
    assert!(
        (now + 590..=now + 610).contains(&expires),
        "{expires} vs {now}"
    );

    let page = |cookie: String| http.get(format!("{url}/")).header("cookie", cookie).send();
    let signed_in = page(format!("pgde_console={value}"))
        .await
        .expect("page")
        .text()
        .await
        .expect("body");
    assert!(signed_in.contains("id=\"role\">developer<"), "{signed_in}");
    // Past its expiry (a browser restoring an old cookie), or without one (a cookie of an
    // earlier version), the cookie signs nobody in.
    for stale in [
        format!("pgde_console={hex_token}.{}", now - 1),
        format!("pgde_console={hex_token}"),
    ] {
        let body = page(stale.clone())
            .await
            .expect("page")
            .text()
            .await
            .expect("body");
        assert!(
            body.contains("name=\"token\"") && !body.contains("id=\"role\""),
            "{stale} still signed in: {body}"
        );
    }
    // Behind a TLS-terminating proxy the cookie is Secure.
    let answer = sign_in(Some(("x-forwarded-proto", "https")))
        .await
        .expect("sign in");
    let cookie = answer.headers()["set-cookie"].to_str().expect("cookie");
    assert!(cookie.split("; ").any(|a| a == "Secure"), "{cookie}");
    console.stop(&db).await;
}

async fn first_column(db: &TestDb, table: &str) -> String {
    db.client
        .query_one(
            "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = $1::text::regclass \
             AND attnum > 0 AND NOT attisdropped ORDER BY attnum LIMIT 1",
            &[&table],
        )
        .await
        .expect("a column")
        .get(0)
}

/// The console's statement for a page of one event type, planned with `after` and run.
async fn plan_and_positions(db: &TestDb, event_type: &str, after: i64) -> (String, Vec<i64>) {
    let none: Option<&str> = None;
    let no_time: Option<chrono::DateTime<chrono::Utc>> = None;
    let (limit, payloads) = (100i64, false);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
        &none,
        &none,
        &event_type,
        &no_time,
        &no_time,
        &after,
        &limit,
        &payloads,
    ];
    let sql = listener::console::queries::EVENTS_OF_TYPE;
    let plan = db
        .client
        .query(&format!("EXPLAIN (COSTS OFF) {sql}"), &params)
        .await
        .expect("EXPLAIN the page of a type")
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    let positions = db
        .client
        .query(sql, &params)
        .await
        .expect("a page of a type")
        .iter()
        .map(|row| {
            row.get::<_, Value>(0)["position"]
                .as_i64()
                .expect("position")
        })
        .collect();
    (plan, positions)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_of_one_type_is_read_from_the_type_index_however_the_type_clusters() {
    let db = TestDb::new().await;
    // Half the events are of one type, but in two runs at either end of the history: a page
    // after the first run is where walking the position index and filtering by type reads the
    // whole other run, and the statistics (half the rows match) invite that walk.
    db.client
        .batch_execute(
            "INSERT INTO domain_events.event (position, id, aggregate_type, aggregate_id, \
                aggregate_version, event_type) \
             SELECT g, gen_random_uuid(), 'Loan', (g % 100)::text, g / 100 + 1, \
                    CASE WHEN g <= 10000 OR g > 19900 THEN 'Loan.Funded' ELSE 'Loan.Repaid' END \
               FROM generate_series(1, 20000) g; \
             ANALYZE domain_events.event",
        )
        .await
        .expect("store the history");
    // (type, after, whether many of its events follow): the pages the old plan walked for.
    for (event_type, after, many) in [
        ("Loan.Funded", 0, true),
        ("Loan.Funded", 9950, true),
        ("Loan.Funded", 19990, false),
        ("Loan.Repaid", 0, true),
        ("Loan.Repaid", 19000, false),
        ("Loan.Closed", 0, false),
    ] {
        let (plan, positions) = plan_and_positions(&db, event_type, after).await;
        // A sort node (a line of its own with COSTS OFF), not Merge Append's "Sort Key".
        let sorts = plan.lines().any(|line| {
            let node = line.trim_start().trim_start_matches("->").trim_start();
            node == "Sort" || node == "Incremental Sort"
        });
        // The type index is `<partition>_event_type_position_idx`.
        let other_index = plan
            .lines()
            .filter_map(|line| line.split(" using ").nth(1))
            .any(|index| !index.contains("event_type_position_idx"));
        // Never the position index read in order and filtered by type until the page is full.
        // A short position range (the last few events, or a type without any) may be read
        // whole and sorted; a page with many events of the type ahead is read in order from
        // the type index.
        let walks = other_index && !sorts;
        let from_type_index = !other_index && !sorts;
        assert!(
            !walks && (from_type_index || !many),
            "{event_type} after {after}: the page is not read in order from the type index:\n{plan}"
        );
        // The rows and order of the plain filter.
        let expected: Vec<i64> = db
            .client
            .query(
                "SELECT position FROM domain_events.event \
                  WHERE event_type = $1 AND position > $2 ORDER BY position LIMIT 100",
                &[&event_type, &after],
            )
            .await
            .expect("the reference page")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(positions, expected, "{event_type} after {after}");
    }
    // Through the API, page by page: every event of the type once, in position order.
    let console = ConsoleUnderTest::start(&db).await;
    let mut listed = Vec::new();
    let mut path = "/api/events?event_type=Loan.Funded&limit=500".to_string();
    loop {
        let (status, page) = console.get_json(&path, Some(VIEWER)).await;
        assert_eq!(status, 200, "{page}");
        listed.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|e| e["position"].as_i64().expect("position")),
        );
        match page["next"].as_i64() {
            Some(next) => {
                path = format!("/api/events?event_type=Loan.Funded&limit=500&after_position={next}")
            }
            None => break,
        }
    }
    let expected: Vec<i64> = (1..=10000).chain(19901..=20000).collect();
    assert_eq!(listed, expected);
    console.stop(&db).await;
}
