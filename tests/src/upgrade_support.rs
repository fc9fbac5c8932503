//! Helpers for the upgrade suite (`tests/tests/upgrade.rs`): the released install scripts in
//! the repository, the extension's catalog footprint, and a readable difference between two.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio_postgres::Client;

/// The extension's catalog footprint query (`tests/sql/extension_footprint.sql`).
pub const FOOTPRINT_SQL: &str = include_str!("../sql/extension_footprint.sql");

/// Objects of a database that could outlive the extension: everything user-made in the
/// catalogs an extension can write to (OIDs from FirstNormalObjectId on), described by name.
pub const USER_OBJECTS_SQL: &str = "\
    SELECT pg_catalog.pg_describe_object(c.classid, c.objid, 0) FROM ( \
        SELECT 'pg_class'::regclass, oid FROM pg_class WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_proc'::regclass, oid FROM pg_proc WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_type'::regclass, oid FROM pg_type WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_namespace'::regclass, oid FROM pg_namespace WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_trigger'::regclass, oid FROM pg_trigger WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_event_trigger'::regclass, oid FROM pg_event_trigger WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_constraint'::regclass, oid FROM pg_constraint WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_rewrite'::regclass, oid FROM pg_rewrite WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_policy'::regclass, oid FROM pg_policy WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_cast'::regclass, oid FROM pg_cast WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_operator'::regclass, oid FROM pg_operator WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_extension'::regclass, oid FROM pg_extension WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_publication'::regclass, oid FROM pg_publication WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_default_acl'::regclass, oid FROM pg_default_acl WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_attrdef'::regclass, oid FROM pg_attrdef WHERE oid >= 16384 \
        UNION ALL SELECT 'pg_statistic_ext'::regclass, oid FROM pg_statistic_ext WHERE oid >= 16384 \
        UNION ALL SELECT DISTINCT 'pg_class'::regclass, objoid FROM pg_init_privs \
                   WHERE classoid = 'pg_class'::regclass AND objoid >= 16384 \
        UNION ALL SELECT DISTINCT 'pg_proc'::regclass, objoid FROM pg_init_privs \
                   WHERE classoid = 'pg_proc'::regclass AND objoid >= 16384 \
    ) AS c(classid, objid) ORDER BY 1";

/// Directory of the extension's released install scripts and upgrade scripts.
pub fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pg_domain_events/sql")
}

/// Versions with a released install script `pg_domain_events--<version>.sql`, sorted.
pub fn released_versions() -> Vec<String> {
    let mut versions: Vec<String> = std::fs::read_dir(script_dir())
        .expect("read pg_domain_events/sql")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let version = name
                .strip_prefix("pg_domain_events--")?
                .strip_suffix(".sql")?;
            (!version.contains("--")).then(|| version.to_string())
        })
        .collect();
    versions.sort();
    versions
}

/// The extension's catalog footprint as `(kind, name) → detail`.
pub async fn footprint(client: &Client) -> BTreeMap<(String, String), String> {
    let rows = client
        .query(FOOTPRINT_SQL, &[])
        .await
        .expect("read the extension's catalog footprint");
    let mut facts = BTreeMap::new();
    for row in rows {
        let key = (row.get::<_, String>(0), row.get::<_, String>(1));
        let detail: Option<String> = row.get(2);
        let detail = detail.unwrap_or_default();
        // Two facts of one kind and name (e.g. two comments) are kept together.
        facts
            .entry(key)
            .and_modify(|d: &mut String| {
                d.push_str("\n--\n");
                d.push_str(&detail);
            })
            .or_insert(detail);
    }
    facts
}

/// A readable difference between two footprints (empty when they are equal): what only `left`
/// has, what only `right` has, and what both have with another definition.
pub fn difference(
    left_name: &str,
    left: &BTreeMap<(String, String), String>,
    right_name: &str,
    right: &BTreeMap<(String, String), String>,
) -> String {
    let mut out = String::new();
    for ((kind, name), detail) in left {
        match right.get(&(kind.clone(), name.clone())) {
            None => out.push_str(&format!(
                "only in {left_name}: {kind} {name}\n    {}\n",
                indent(detail)
            )),
            Some(other) if other != detail => out.push_str(&format!(
                "differs: {kind} {name}\n  {left_name}:\n    {}\n  {right_name}:\n    {}\n",
                indent(detail),
                indent(other)
            )),
            Some(_) => {}
        }
    }
    for ((kind, name), detail) in right {
        if !left.contains_key(&(kind.clone(), name.clone())) {
            out.push_str(&format!(
                "only in {right_name}: {kind} {name}\n    {}\n",
                indent(detail)
            ));
        }
    }
    out
}

fn indent(text: &str) -> String {
    text.replace('\n', "\n    ")
}

/// Every user-made object of the database, described (see [`USER_OBJECTS_SQL`]).
pub async fn user_objects(client: &Client) -> Vec<String> {
    client
        .query(USER_OBJECTS_SQL, &[])
        .await
        .expect("list user objects")
        .iter()
        .map(|r| r.get(0))
        .collect()
}
