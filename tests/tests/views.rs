//! The operations views: events per type and hour, and how far subscriptions are behind.

use e2e::store_support::login_role;
use e2e::TestDb;

#[tokio::test]
async fn stats_count_events_per_type_and_hour_for_readers() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "SELECT * FROM domain_events.raise_events('[
                {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"1\", \"event_type\": \"Loan.Created\"},
                {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"2\", \"event_type\": \"Loan.Created\"},
                {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"1\", \"event_type\": \"Loan.Funded\",
                 \"payload\": {\"amount\": 100000}}]');
             SELECT * FROM domain_events.import_events('[
                {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"9\", \"event_type\": \"Loan.Created\",
                 \"recorded_at\": \"2020-05-01T10:30:00Z\"}]');",
        )
        .await
        .expect("raise");
    let (_, dsn) = login_role(&db, "views_reader", Some("domain_events_reader")).await;
    let reader = e2e::connect(&dsn).await;
    let rows: Vec<(String, String, i64)> = reader
        .query(
            "SELECT event_type, to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24'), events
               FROM domain_events.stats ORDER BY hour, event_type",
            &[],
        )
        .await
        .expect("reader reads stats")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let now_hour: String = db
        .client
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24')",
            &[],
        )
        .await
        .expect("hour")
        .get(0);
    assert_eq!(
        rows,
        [
            ("Loan.Created".to_string(), "2020-05-01 10".to_string(), 1),
            ("Loan.Created".to_string(), now_hour.clone(), 2),
            ("Loan.Funded".to_string(), now_hour, 1),
        ]
    );
}

#[tokio::test]
async fn subscription_lag_reports_events_and_bytes_behind() {
    let db = TestDb::new().await;
    let slot = format!("lag_{}", &db.name[7..19]);
    db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("slot");
    // One statement per call: statements sharing a query string share a transaction, and a
    // snapshot never sees its own transaction's events.
    let setup = [
        "SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created')".to_string(),
        format!(
            "INSERT INTO domain_events.subscription (name, mode, position, lsn)
                  SELECT '{slot}', 'replication', max(position), pg_current_wal_lsn()
                    FROM domain_events.event"
        ),
        "SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Funded')".to_string(),
        "SELECT * FROM domain_events.raise_event('Loan', '2', 'Loan.Created')".to_string(),
        "INSERT INTO domain_events.subscription (name, mode, snapshot_prev)
              VALUES ('poller', 'notify', pg_current_snapshot())"
            .to_string(),
    ];
    for sql in &setup {
        db.client.batch_execute(sql).await.expect(sql);
    }
    // Committed after the notify subscription's snapshot: its next transition delivers these.
    for sql in [
        "SELECT * FROM domain_events.raise_event('Loan', '3', 'Loan.Created')",
        "SELECT * FROM domain_events.raise_event('Loan', '3', 'Loan.Funded')",
    ] {
        db.client.batch_execute(sql).await.expect(sql);
    }
    let (_, dsn) = login_role(&db, "views_lag", Some("domain_events_reader")).await;
    let reader = e2e::connect(&dsn).await;
    let rows = reader
        .query(
            "SELECT name, mode, events_behind, bytes_behind, slot_wal_retained, slot_active
               FROM domain_events.subscription_lag ORDER BY mode DESC",
            &[],
        )
        .await
        .expect("reader reads subscription_lag");
    assert_eq!(rows.len(), 2);
    let (name, mode, behind): (String, String, i64) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!(
        (name.as_str(), mode.as_str(), behind),
        (slot.as_str(), "replication", 4)
    );
    let bytes: Option<i64> = rows[0].get(3);
    let retained: Option<i64> = rows[0].get(4);
    assert!(bytes.unwrap_or(0) > 0, "bytes behind {bytes:?}");
    assert!(
        retained.unwrap_or(0) >= bytes.unwrap_or(0),
        "retained {retained:?} < behind {bytes:?}"
    );
    assert_eq!(rows[0].get::<_, Option<bool>>(5), Some(false));
    let (name, mode, behind): (String, String, i64) =
        (rows[1].get(0), rows[1].get(1), rows[1].get(2));
    assert_eq!(
        (name.as_str(), mode.as_str(), behind),
        ("poller", "notify", 2)
    );
    assert_eq!(
        rows[1].get::<_, Option<i64>>(3),
        None,
        "no WAL position in notify mode"
    );
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
}
