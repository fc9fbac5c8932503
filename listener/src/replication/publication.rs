//! The publication of the event table, and the check that the extension is installed.

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::error::Error;

/// What the connected database's extension schema offers the listener. Binaries are upgraded
/// before databases (`docs/upgrading.md`), so the listener also serves a database still at an
/// older schema version, without what that version lacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schema {
    /// The subscription row keeps the delivered snapshot and recovery state (schema 0.2.0):
    /// a lost slot can be recovered from without a gap.
    pub lost_slot_recovery: bool,
}

/// Fails with [`Error::MissingExtension`] unless `domain_events.event` and
/// `domain_events.subscription` exist in the connected database; says what its schema offers.
pub async fn check_extension(client: &Client, dbname: &str) -> Result<Schema, Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('domain_events.event') IS NOT NULL \
                AND to_regclass('domain_events.subscription') IS NOT NULL, \
                EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
                         WHERE attrelid = to_regclass('domain_events.subscription') \
                           AND attname = 'recovery_started_at' AND NOT attisdropped)",
            &[],
        )
        .await
        .map_err(Error::sql("checking for the pg_domain_events extension"))?;
    if !row.get::<_, bool>(0) {
        return Err(Error::MissingExtension {
            dbname: dbname.to_string(),
        });
    }
    let schema = Schema {
        lost_slot_recovery: row.get(1),
    };
    if !schema.lost_slot_recovery {
        warn!(
            dbname,
            "the extension's schema predates 0.2.0: a lost slot cannot be recovered from \
             automatically; run ALTER EXTENSION pg_domain_events UPDATE"
        );
    }
    Ok(schema)
}

/// Makes sure publication `name` publishes inserts into `domain_events.event` through the
/// partition root, creating it when missing and `create` is set.
///
/// The publication is created with `publish = 'insert'`: events are append-only, so updates,
/// deletes and truncates (which the extension refuses anyway) never need to reach the listener.
pub async fn ensure_publication(client: &Client, name: &str, create: bool) -> Result<(), Error> {
    let problem = |problem: String| Error::Publication {
        name: name.to_string(),
        problem,
    };
    for attempt in 0..2 {
        let row = client
            .query_opt(
                "SELECT p.pubviaroot, p.pubinsert, \
                        p.puballtables OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r \
                            WHERE r.prpubid = p.oid \
                              AND r.prrelid = 'domain_events.event'::regclass) \
                   FROM pg_catalog.pg_publication p WHERE p.pubname = $1",
                &[&name],
            )
            .await
            .map_err(Error::sql("looking up the publication"))?;
        if let Some(row) = row {
            let (via_root, inserts, has_table): (bool, bool, bool) =
                (row.get(0), row.get(1), row.get(2));
            if !has_table {
                return Err(problem(format!(
                    "exists but does not include domain_events.event; run ALTER PUBLICATION \
                     {name} ADD TABLE domain_events.event, or choose another replication.publication"
                )));
            }
            if !inserts {
                return Err(problem(format!(
                    "does not publish inserts; run ALTER PUBLICATION {name} SET (publish = 'insert')"
                )));
            }
            if !via_root {
                return Err(problem(format!(
                    "does not publish through the partition root, so events would arrive as rows \
                     of monthly partitions; run ALTER PUBLICATION {name} SET \
                     (publish_via_partition_root = true)"
                )));
            }
            return Ok(());
        }
        if !create {
            return Err(problem(
                "does not exist and replication.create_publication is false".into(),
            ));
        }
        if attempt > 0 {
            break;
        }
        let sql = format!(
            "CREATE PUBLICATION {name} FOR TABLE domain_events.event \
             WITH (publish_via_partition_root = true, publish = 'insert')"
        );
        match client.batch_execute(&sql).await {
            Ok(()) => {
                info!(publication = name, "created the publication");
                return Ok(());
            }
            // Created concurrently by another listener (duplicate_object, or the catalog's
            // unique index when both inserts race): check it on the next pass.
            Err(err) if matches!(err.code().map(|c| c.code()), Some("42710" | "23505")) => continue,
            Err(err) if err.code().map(|c| c.code()) == Some("42501") => {
                return Err(problem(format!(
                    "cannot be created by this role ({}); ask the owner of domain_events.event \
                     to run: {sql}",
                    err.as_db_error()
                        .map(|e| e.message())
                        .unwrap_or("permission denied")
                )))
            }
            Err(err) => return Err(Error::sql("creating the publication")(err)),
        }
    }
    Err(problem(
        "was created concurrently but cannot be found".into(),
    ))
}
