//! Captures the pgoutput byte fixtures under `listener/tests/fixtures/` from a real PG 15 stream.
//!
//! ```sh
//! scripts/cluster.sh start
//! cargo run -p listener --example capture_fixtures -- \
//!     "host=127.0.0.1 port=54329 user=postgres" listener/tests/fixtures
//! ```
//!
//! It creates a throwaway database `pgde_fixtures` (dropped first if present) with the extension,
//! a publication `FOR ALL TABLES`, a slot, runs one transaction per message kind, and writes the
//! payload of every XLogData as `NN-<kind>[-<what>].bin` in stream order.

use std::path::PathBuf;
use std::time::Duration;

use listener::pgoutput::{self, PgOutputMessage};
use listener::stream::{ConnectOptions, ReplicationConnection, ReplicationMessage, SlotState};
use tokio_postgres::NoTls;

const SCENARIO: &[&str] = &[
    // 1: an event raised through the extension (Relation of the partition root, Insert).
    "SELECT * FROM domain_events.raise_event('Loan', '42', 'Loan.Funded', \
        '{\"amount\": 100, \"name\": \"Zo\u{eb} \u{1f680}\", \"nested\": {\"a\": [1, 2.5, null]}}', \
        '{\"actor\": \"fixture\"}')",
    // 2: a user-defined type column (Type message), plain insert.
    "INSERT INTO item VALUES (1, 'happy', 'hello')",
    // 3: update without key change (no old tuple).
    "UPDATE item SET status = 'sad' WHERE id = 1",
    // 4: update of the key (old key tuple 'K').
    "UPDATE item SET id = 2 WHERE id = 1",
    // 5: replica identity full with a TOASTed column left unchanged ('O' old row, 'u' value).
    "INSERT INTO full_item VALUES (1, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 100) g), 'a')",
    "UPDATE full_item SET small = 'b' WHERE id = 1",
    // 6: deletes with key and full old rows.
    "DELETE FROM item WHERE id = 2",
    "DELETE FROM full_item WHERE id = 1",
    // 7: truncate.
    "TRUNCATE item",
    // 8: transactional logical message.
    "SELECT pg_logical_emit_message(true, 'fixture', 'hello')",
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dsn = args
        .next()
        .unwrap_or_else(|| "host=127.0.0.1 port=54329 user=postgres".into());
    let out = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "listener/tests/fixtures".into()),
    );
    std::fs::create_dir_all(&out)?;

    let admin = connect(&format!("{dsn} dbname=postgres")).await?;
    for sql in [
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name = 'pgde_fixtures'",
        "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin \
         WHERE roname = 'fixture_origin'",
        "DROP DATABASE IF EXISTS pgde_fixtures",
        "CREATE DATABASE pgde_fixtures",
    ] {
        admin.batch_execute(sql).await?;
    }
    let db = connect(&format!("{dsn} dbname=pgde_fixtures")).await?;
    db.batch_execute(
        "CREATE EXTENSION pg_domain_events; \
         CREATE TYPE mood AS ENUM ('happy', 'sad'); \
         CREATE TABLE item (id int PRIMARY KEY, status mood, note text); \
         CREATE TABLE full_item (id int PRIMARY KEY, big text, small text); \
         ALTER TABLE full_item REPLICA IDENTITY FULL; \
         ALTER TABLE full_item ALTER COLUMN big SET STORAGE EXTERNAL; \
         CREATE PUBLICATION pgde_fixtures FOR ALL TABLES WITH (publish_via_partition_root = true); \
         SELECT pg_replication_origin_create('fixture_origin')",
    )
    .await?;

    let mut conn = ReplicationConnection::connect(&ConnectOptions {
        host: "127.0.0.1".into(),
        port: 54329,
        user: "postgres".into(),
        password: None,
        dbname: "pgde_fixtures".into(),
        application_name: "capture_fixtures".into(),
        connect_timeout: Duration::from_secs(10),
        sslmode: listener::tls::SslMode::Disable,
        tls: None,
    })
    .await?;
    let start = match conn.create_slot("pgde_fixtures").await? {
        SlotState::Created(lsn) => lsn,
        SlotState::CreatedConcurrently => return Err("slot pgde_fixtures already existed".into()),
    };

    for sql in SCENARIO {
        db.batch_execute(sql).await?;
    }
    // 9: a transaction replayed from another node carries an Origin message.
    db.batch_execute(
        "SELECT pg_replication_origin_session_setup('fixture_origin'); \
         BEGIN; \
         SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2026-01-01 00:00:00+00'); \
         INSERT INTO item VALUES (3, 'happy', 'from elsewhere'); \
         COMMIT; \
         SELECT pg_replication_origin_session_reset()",
    )
    .await?;
    let commits_expected = SCENARIO.len() + 1;

    conn.start_replication("pgde_fixtures", "pgde_fixtures", start)
        .await?;
    let mut commits = 0;
    let mut index = 0;
    while commits < commits_expected {
        let Some(message) = conn.next_message().await? else {
            return Err("stream ended early".into());
        };
        let ReplicationMessage::XLogData { data, .. } = message else {
            continue;
        };
        let kind = match pgoutput::decode(data.clone())? {
            PgOutputMessage::Begin(_) => "begin".to_string(),
            PgOutputMessage::Commit(_) => {
                commits += 1;
                "commit".to_string()
            }
            PgOutputMessage::Origin(_) => "origin".to_string(),
            PgOutputMessage::Relation(r) => format!("relation-{}", r.name),
            PgOutputMessage::Type(t) => format!("type-{}", t.name),
            PgOutputMessage::Insert(_) => "insert".to_string(),
            PgOutputMessage::Update(_) => "update".to_string(),
            PgOutputMessage::Delete(_) => "delete".to_string(),
            PgOutputMessage::Truncate(_) => "truncate".to_string(),
            PgOutputMessage::Message(_) => "message".to_string(),
        };
        index += 1;
        let path = out.join(format!("{index:02}-{kind}.bin"));
        std::fs::write(&path, &data)?;
        println!("{} ({} bytes)", path.display(), data.len());
    }
    conn.close(Duration::from_secs(2)).await;
    admin
        .batch_execute(
            "SELECT pg_drop_replication_slot('pgde_fixtures'); \
             SELECT pg_replication_origin_drop('fixture_origin')",
        )
        .await?;
    Ok(())
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}
