//! The upgrade path: released install scripts stay as released, `ALTER EXTENSION ... UPDATE`
//! from every released version gives exactly the schema of a fresh install, data and a
//! streaming listener survive the upgrade, and `DROP EXTENSION` leaves nothing behind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::listener_support::{
    config_for, dead_letters, unique_name, wait_confirmed_past, wait_dead_letters,
    wait_slot_active, InProcess, SlotGuard,
};
use e2e::sink_support::raise;
use e2e::upgrade_support::{difference, footprint, released_versions, script_dir, user_objects};
use e2e::{sqlstate, TestDb};
use sha2::Digest;
use uuid::Uuid;

/// Every released install script with the SHA-256 of its text as released. A released script
/// is never edited (databases were installed from it): fix mistakes in the next upgrade script.
/// Releasing a version adds its line here.
const RELEASED: &[(&str, &str)] = &[(
    "pg_domain_events--0.1.0.sql",
    "e721ce941b79a2a19e8c9719260563e011640047648e19357c3a3d9971c523e9",
)];

/// The default version the installed control file names.
async fn default_version(db: &TestDb) -> String {
    db.client
        .query_one(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_domain_events'",
            &[],
        )
        .await
        .expect("pg_domain_events is installed")
        .get(0)
}

async fn installed_version(db: &TestDb) -> String {
    db.client
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_domain_events'",
            &[],
        )
        .await
        .expect("the extension is created")
        .get(0)
}

#[test]
fn released_install_scripts_are_never_edited() {
    let on_disk: HashSet<String> = released_versions()
        .iter()
        .map(|v| format!("pg_domain_events--{v}.sql"))
        .collect();
    let listed: HashSet<String> = RELEASED.iter().map(|(f, _)| f.to_string()).collect();
    assert_eq!(
        on_disk, listed,
        "pg_domain_events/sql holds exactly the released install scripts listed in RELEASED"
    );
    for (file, sha) in RELEASED {
        let text = std::fs::read(script_dir().join(file)).expect("read released script");
        let actual = hex::encode(sha2::Sha256::digest(&text));
        assert_eq!(
            &actual, sha,
            "{file} was edited after its release; released scripts are frozen: put the change \
             into the next upgrade script instead"
        );
    }
}

#[tokio::test]
async fn every_released_version_is_installed_with_an_update_path_to_the_default() {
    let db = TestDb::without_extension().await;
    let default = default_version(&db).await;
    let available: HashSet<String> = db
        .client
        .query(
            "SELECT version FROM pg_available_extension_versions WHERE name = 'pg_domain_events'",
            &[],
        )
        .await
        .expect("available versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let released = released_versions();
    assert!(
        !released.is_empty(),
        "at least one released install script ships"
    );
    for version in released.iter().filter(|v| **v != default) {
        assert!(
            available.contains(version),
            "released version {version} is not installed next to {default}: {available:?}"
        );
        let path: Option<String> = db
            .client
            .query_one(
                "SELECT path FROM pg_extension_update_paths('pg_domain_events') \
                 WHERE source = $1 AND target = $2",
                &[version, &default],
            )
            .await
            .expect("update paths")
            .get(0);
        assert!(
            path.is_some(),
            "no upgrade script path from {version} to {default}"
        );
    }
}

/// The guard: an upgraded database has exactly the catalog footprint of a fresh install.
/// A change to the SQL surface without a matching upgrade script fails here.
#[tokio::test]
async fn every_released_version_upgrades_to_the_schema_of_a_fresh_install() {
    let fresh = TestDb::new().await;
    let default = installed_version(&fresh).await;
    let fresh_footprint = footprint(&fresh.client).await;
    assert!(
        fresh_footprint.len() > 100,
        "the footprint query sees the extension: {} facts",
        fresh_footprint.len()
    );
    let mut compared = 0;
    for version in released_versions().iter().filter(|v| **v != default) {
        let upgraded = TestDb::without_extension().await;
        upgraded
            .client
            .batch_execute(&format!(
                "CREATE EXTENSION pg_domain_events VERSION '{version}'"
            ))
            .await
            .unwrap_or_else(|e| panic!("CREATE EXTENSION VERSION '{version}': {e}"));
        upgraded
            .client
            .batch_execute("ALTER EXTENSION pg_domain_events UPDATE")
            .await
            .unwrap_or_else(|e| panic!("ALTER EXTENSION UPDATE from {version}: {e}"));
        assert_eq!(installed_version(&upgraded).await, default);
        let upgraded_footprint = footprint(&upgraded.client).await;
        let diff = difference(
            &format!("upgraded from {version}"),
            &upgraded_footprint,
            &format!("fresh {default}"),
            &fresh_footprint,
        );
        assert!(
            diff.is_empty(),
            "the schema upgraded from {version} differs from a fresh install of {default}; \
             every change to the extension's SQL needs its upgrade script:\n{diff}"
        );
        compared += 1;
    }
    assert!(
        compared > 0,
        "no released version older than {default} to upgrade from"
    );
}

/// Raises `per_aggregate` events on each of `aggregates`, each with the expected version;
/// returns the last version of each.
async fn raise_versioned(
    client: &tokio_postgres::Client,
    aggregates: &[&str],
    per_aggregate: i64,
    versions: &mut HashMap<String, i64>,
) {
    for _ in 0..per_aggregate {
        for aggregate in aggregates {
            let expected = versions.get(*aggregate).copied().unwrap_or(0);
            let row = client
                .query_one(
                    "SELECT aggregate_version FROM domain_events.raise_event('Account', $1::text, \
                     'Account.Credited', '{\"amount\": 5}', expected_version => $2)",
                    &[aggregate, &expected],
                )
                .await
                .unwrap_or_else(|e| panic!("raise on {aggregate} at version {expected}: {e}"));
            let version: i64 = row.get(0);
            assert_eq!(version, expected + 1, "versions continue without a gap");
            versions.insert(aggregate.to_string(), version);
        }
    }
}

/// Every stored event as `(position, id, aggregate, version, type, payload, metadata,
/// recorded_at)` text, by position.
async fn stored_rows(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT format('%s %s %s/%s v%s %s %s %s %s', position, id, aggregate_type, \
             aggregate_id, aggregate_version, event_type, payload, metadata, recorded_at) \
             FROM domain_events.event ORDER BY position",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Fails every event of type `Account.Frozen`, so that one dead letter exists before the
/// upgrade.
struct RefusesFrozen;

#[async_trait::async_trait]
impl listener::Handler for RefusesFrozen {
    async fn handle(&self, event: &listener::Event) -> Result<(), listener::HandlerError> {
        if event.event_type == "Account.Frozen" {
            return Err(listener::HandlerError::definite(
                "frozen accounts are refused",
            ));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_a_streaming_listener_survive_the_upgrade() {
    let default = default_version(&TestDb::without_extension().await).await;
    for version in released_versions().iter().filter(|v| **v != default) {
        survive_upgrade_from(version).await;
    }
}

async fn survive_upgrade_from(version: &str) {
    let db = TestDb::without_extension().await;
    db.client
        .batch_execute(&format!(
            "CREATE EXTENSION pg_domain_events VERSION '{version}';
             CREATE TABLE public.accounts (id bigint PRIMARY KEY, owner text NOT NULL,
                                           balance numeric NOT NULL DEFAULT 0);
             SELECT domain_events.track('public.accounts', 'AccountRow');
             INSERT INTO accounts VALUES (1, 'ada', 10), (2, 'grace', 20);"
        ))
        .await
        .expect("install the old version, track a table");

    // At the old version: events on several aggregates, a subscription and a dead letter.
    let aggregates = ["acc-1", "acc-2", "acc-3", "acc-4"];
    let mut versions = HashMap::new();
    raise_versioned(&db.client, &aggregates, 5, &mut versions).await;
    let name = unique_name("upgrade");
    let _slot = SlotGuard(name.clone());
    let mut registry = listener::Registry::new();
    registry.register(
        "refuses_frozen",
        [listener::Filter::All],
        listener::RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(10),
        },
        RefusesFrozen,
    );
    let listener = InProcess::start_with(config_for(&db, &name), registry);
    wait_slot_active(&db.client, &name, Duration::from_secs(60)).await;
    let frozen = raise(&db.client, &[("Account", "acc-9", "Account.Frozen")]).await;
    wait_dead_letters(&db.client, &name, 1, Duration::from_secs(30)).await;
    let before_rows = stored_rows(&db.client).await;

    // A writer keeps committing while the upgrade runs.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let client = db.connect().await;
        let writing = writing.clone();
        tokio::spawn(async move {
            let mut ids: Vec<Uuid> = Vec::new();
            let mut n = 0;
            while writing.load(Ordering::Relaxed) {
                let id = format!("live-{}", n % 5);
                ids.extend(raise(&client, &[("Live", &id, "Live.Ticked")]).await);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.client
        .batch_execute("ALTER EXTENSION pg_domain_events UPDATE")
        .await
        .unwrap_or_else(|e| panic!("ALTER EXTENSION UPDATE from {version}: {e}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    writing.store(false, Ordering::Relaxed);
    let live = writer.await.expect("writer task");
    assert!(live.len() > 10, "the writer committed during the upgrade");
    assert_ne!(installed_version(&db).await, version);

    // Old events read back unchanged; versions go on gap-free; the tracked table still raises.
    let after_rows = stored_rows(&db.client).await;
    assert_eq!(
        &after_rows[..before_rows.len()],
        &before_rows[..],
        "events stored before the upgrade read back unchanged"
    );
    raise_versioned(&db.client, &aggregates, 2, &mut versions).await;
    assert!(versions.values().all(|v| *v == 7), "{versions:?}");
    db.client
        .batch_execute("UPDATE accounts SET balance = 15 WHERE id = 1; INSERT INTO accounts VALUES (3, 'edsger', 0);")
        .await
        .expect("change the tracked table after the upgrade");
    let captured: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM domain_events.event WHERE aggregate_type = 'AccountRow'",
            &[],
        )
        .await
        .expect("count captured events")
        .get(0);
    assert_eq!(
        captured, 4,
        "two inserts before the upgrade, an update and an insert after"
    );
    let letters = dead_letters(&db.client, &name).await;
    assert_eq!(letters.len(), 1, "the dead letter survived: {letters:?}");
    assert_eq!(letters[0].1, frozen[0]);

    // The listener delivered every committed event exactly as committed: all of them, each
    // aggregate's in version order, none lost across the upgrade.
    let stored: Vec<(Uuid, String, i64)> = db
        .client
        .query(
            "SELECT id, aggregate_type || '/' || aggregate_id, aggregate_version \
             FROM domain_events.event ORDER BY position",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let streamed_from = stored
        .iter()
        .position(|(id, _, _)| *id == frozen[0])
        .expect("the frozen event is stored");
    let expected: HashSet<Uuid> = stored[streamed_from..].iter().map(|e| e.0).collect();
    listener
        .collector
        .wait_for(expected.len(), Duration::from_secs(60))
        .await;
    let delivered = listener.collector.events();
    let delivered_ids: HashSet<Uuid> = delivered.iter().map(|e| e.id).collect();
    let lost: Vec<&Uuid> = expected.difference(&delivered_ids).collect();
    assert!(
        lost.is_empty(),
        "{} events lost across the upgrade: {lost:?}",
        lost.len()
    );
    let mut last_version: BTreeMap<String, i64> = BTreeMap::new();
    for event in &delivered {
        let key = format!("{}/{}", event.aggregate_type, event.aggregate_id);
        let previous = last_version.insert(key.clone(), event.aggregate_version);
        assert!(
            previous.is_none_or(|p| p < event.aggregate_version),
            "{key} delivered out of order: v{previous:?} then v{}",
            event.aggregate_version
        );
    }
    let last_commit = delivered.last().expect("delivered events").commit_lsn;
    wait_confirmed_past(&db.client, &name, last_commit, Duration::from_secs(30)).await;
    listener.stop().await.expect("the listener stops cleanly");
}

#[tokio::test]
async fn drop_extension_leaves_nothing_but_the_roles_and_the_empty_schema() {
    let db = TestDb::without_extension().await;
    db.client
        .batch_execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, total numeric NOT NULL)")
        .await
        .expect("a table of the application's own");
    let before = user_objects(&db.client).await;

    db.client
        .batch_execute(
            "CREATE EXTENSION pg_domain_events;
             SELECT domain_events.track('public.orders', 'Order');
             INSERT INTO orders VALUES (1, 10), (2, 20);
             SELECT * FROM domain_events.raise_event('Order', 1, 'Order.Paid');
             SET domain_events.premake_months = 4;
             SELECT count(*) FROM domain_events.maintain();",
        )
        .await
        .expect("use the extension: capture, events, partitions made after CREATE EXTENSION");

    // A tracked table depends on the extension's trigger function: a plain DROP refuses and
    // changes nothing.
    let refused = db
        .client
        .batch_execute("DROP EXTENSION pg_domain_events")
        .await
        .expect_err("DROP EXTENSION with a tracked table needs CASCADE");
    assert_eq!(sqlstate(&refused), "2BP01");
    assert_eq!(db.event_count().await, 3);

    db.client
        .batch_execute("DROP EXTENSION pg_domain_events CASCADE")
        .await
        .expect("DROP EXTENSION ... CASCADE");
    let after = user_objects(&db.client).await;
    let left: Vec<&String> = after.iter().filter(|o| !before.contains(o)).collect();
    let gone: Vec<&String> = before.iter().filter(|o| !after.contains(o)).collect();
    // PostgreSQL creates the control file's schema before the extension exists, so it is never
    // a member: it stays, empty (documented in docs/upgrading.md), and drops without CASCADE.
    assert!(
        left == ["schema domain_events"] && gone.is_empty(),
        "DROP EXTENSION CASCADE left {left:?} behind and removed {gone:?} of the application's"
    );
    db.client
        .batch_execute("DROP SCHEMA domain_events")
        .await
        .expect("the schema left behind is empty");
    let orders: i64 = db
        .client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .expect("the application's table stays")
        .get(0);
    assert_eq!(orders, 2, "the tracked table keeps its rows");
    db.client
        .batch_execute("INSERT INTO orders VALUES (3, 30)")
        .await
        .expect("the tracked table works without its capture trigger");

    // The roles are cluster-wide and documented to stay; a reinstall reuses them.
    let roles: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname IN \
             ('domain_events_writer', 'domain_events_reader', 'domain_events_listener')",
            &[],
        )
        .await
        .expect("roles")
        .get(0);
    assert_eq!(roles, 3);

    // Without tracked tables, a plain DROP works, and leaves nothing else either.
    db.client
        .batch_execute(
            "CREATE EXTENSION pg_domain_events;
             SELECT * FROM domain_events.raise_event('Order', 1, 'Order.Paid');
             DROP EXTENSION pg_domain_events;
             DROP SCHEMA domain_events;",
        )
        .await
        .expect("reinstall, drop without CASCADE, drop the empty schema");
    let again = user_objects(&db.client).await;
    let left: Vec<&String> = again.iter().filter(|o| !before.contains(o)).collect();
    assert!(left.is_empty(), "DROP EXTENSION left {left:?} behind");
}
