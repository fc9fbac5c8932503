//! Every SQL statement the extension runs from Rust, and the SPI calls that run them.
//!
//! All names are schema-qualified: the raising functions are `SECURITY DEFINER` with a pinned
//! `search_path`, and nothing here may resolve through the caller's.

use std::cell::RefCell;

use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;

use crate::jsonb::{self, Jsonb};

/// Appends a batch (multi-argument `unnest` only exists unqualified, as `ROWS FROM` sugar;
/// every caller pins `search_path` to `pg_catalog, pg_temp`): upserts the stream heads (one row per aggregate, in sorted order so that
/// concurrent batches lock heads in the same order and cannot deadlock), then inserts the
/// events with versions derived from the new head: `head - count + ordinal`.
pub const INSERT_EVENTS: &str = r#"
WITH head AS (
    INSERT INTO domain_events.aggregate AS a (aggregate_type, aggregate_id, version, updated_at)
    SELECT h.t, h.i, h.n, pg_catalog.now()
      FROM unnest($1::text[], $2::text[], $3::bigint[]) AS h(t, i, n)
    ON CONFLICT (aggregate_type, aggregate_id)
    DO UPDATE SET version = a.version + excluded.version, updated_at = excluded.updated_at
    RETURNING a.aggregate_type, a.aggregate_id, a.version
)
INSERT INTO domain_events.event
    (id, aggregate_type, aggregate_id, aggregate_version, event_type, event_version,
     payload, metadata, occurred_at, recorded_at)
SELECT e.id, e.t, e.i, head.version - e.n + e.k, e.et, e.ev,
       e.p, e.m,
       COALESCE(e.o, pg_catalog.now()), COALESCE(e.r, pg_catalog.now())
  FROM unnest($4::uuid[], $5::text[], $6::text[], $7::bigint[], $8::bigint[],
                         $9::text[], $10::int[], $11::jsonb[], $12::jsonb[],
                         $13::timestamptz[], $14::timestamptz[])
       WITH ORDINALITY AS e(id, t, i, k, n, et, ev, p, m, o, r, ord)
  JOIN head ON head.aggregate_type = e.t AND head.aggregate_id = e.i
 ORDER BY e.ord
RETURNING id, position, aggregate_version, recorded_at
"#;

/// Appends one event: the same two steps as [`INSERT_EVENTS`] with scalar parameters, which
/// plans and runs in a fraction of the batch statement's time (single-event commit latency).
pub const INSERT_ONE: &str = r#"
WITH head AS (
    INSERT INTO domain_events.aggregate AS a (aggregate_type, aggregate_id, version, updated_at)
    VALUES ($1, $2, 1, pg_catalog.now())
    ON CONFLICT (aggregate_type, aggregate_id)
    DO UPDATE SET version = a.version + 1, updated_at = excluded.updated_at
    RETURNING a.version
)
INSERT INTO domain_events.event
    (id, aggregate_type, aggregate_id, aggregate_version, event_type, event_version,
     payload, metadata, occurred_at, recorded_at)
SELECT $3, $1, $2, head.version, $4, $5, $6, $7,
       COALESCE($8, pg_catalog.now()), pg_catalog.now()
  FROM head
RETURNING id, position, aggregate_version, recorded_at
"#;

/// Every registered schema, as text columns (read with a snapshot of its own: see `contract`).
pub const LOAD_SCHEMAS: &std::ffi::CStr = c"SELECT event_type, event_version::text, schema::text \
     FROM domain_events.event_schema";

/// Registers a schema unless its event type and version has one; whether it was inserted.
pub const REGISTER_SCHEMA: &str = "WITH registered AS ( \
       INSERT INTO domain_events.event_schema (event_type, event_version, schema) \
       VALUES ($1, $2, $3::jsonb) ON CONFLICT (event_type, event_version) DO NOTHING \
       RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM registered)";

/// Whether the registered schema of `($1, $2)` equals `$3` (as jsonb: key order and spacing
/// do not count).
pub const SAME_SCHEMA: &str = "SELECT EXISTS (SELECT 1 FROM domain_events.event_schema \
     WHERE event_type = $1 AND event_version = $2 AND schema = $3::jsonb)";

/// Whether a schema is registered for `($1, $2)`.
pub const SCHEMA_REGISTERED: &str = "SELECT EXISTS (SELECT 1 FROM domain_events.event_schema \
     WHERE event_type = $1 AND event_version = $2)";

/// Whether a stored event uses the schema of `($1, $2)`.
pub const SCHEMA_IN_USE: &str = "SELECT EXISTS (SELECT 1 FROM domain_events.event \
     WHERE event_type = $1 AND event_version = $2)";

/// Conflicts with the ROW EXCLUSIVE lock every raising transaction holds on the event table
/// until it ends, and lets readers through.
pub const LOCK_EVENTS_AGAINST_RAISING: &str = "LOCK TABLE domain_events.event IN SHARE MODE";

/// Removes the schema of `($1, $2)`.
pub const DROP_SCHEMA: &str =
    "DELETE FROM domain_events.event_schema WHERE event_type = $1 AND event_version = $2";

/// The latest registered schema of an event type, as text.
pub const LATEST_SCHEMA: &str = "SELECT schema::text FROM domain_events.event_schema \
     WHERE event_type = $1 ORDER BY event_version DESC LIMIT 1";

/// Registers a handler unless one of its name exists; whether it was inserted. An async one
/// also gets its listener subscription `handler:<name>` (a notify-mode row starting at this
/// transaction's snapshot, so the listener delivers every event committed after the
/// registration, however soon it notices it) and loses any position left by an earlier handler
/// of the same name.
pub const REGISTER_HANDLER: &str = "WITH registered AS ( \
       INSERT INTO domain_events.handler \
           (name, mode, function, events, priority, enabled, description, log_level, run_as) \
       VALUES ($1, $2, $3::pg_catalog.regprocedure, $4, $5, $6, $7, $8, $9::pg_catalog.regrole) \
       ON CONFLICT (name) DO NOTHING RETURNING 1), \
     stale AS (DELETE FROM domain_events.subscription \
       WHERE name = 'handler:' || $1 || '/' || $1 \
         AND $2 = 'async' AND EXISTS (SELECT 1 FROM registered)), \
     lane AS (INSERT INTO domain_events.subscription \
           (name, mode, position, snapshot_prev, transition) \
       SELECT 'handler:' || $1, 'notify', 0, pg_catalog.pg_current_snapshot(), 1 \
       FROM registered WHERE $2 = 'async' \
       ON CONFLICT (name) DO UPDATE SET mode = 'notify', position = 0, lsn = NULL, \
         snapshot_prev = excluded.snapshot_prev, snapshot_cur = NULL, transition = 1, \
         updated_at = pg_catalog.now()) \
     SELECT EXISTS (SELECT 1 FROM registered)";

/// Sets a handler's `enabled` to `$2`; one row, whether that changed it, when it exists.
pub const SET_HANDLER_ENABLED: &str = "UPDATE domain_events.handler h \
     SET enabled = $2, updated_at = pg_catalog.now() \
     FROM (SELECT name, enabled FROM domain_events.handler WHERE name = $1 FOR UPDATE) old \
     WHERE h.name = old.name RETURNING old.enabled <> $2";

/// Removes a handler registered in SQL, with its listener subscription (`handler:<name>`,
/// its position row and dead letters); one row, who manages it, when it exists.
pub const UNREGISTER_HANDLER: &str = "WITH target AS ( \
       SELECT name, managed_by FROM domain_events.handler WHERE name = $1 FOR UPDATE), \
     removed AS (DELETE FROM domain_events.handler h USING target t \
       WHERE h.name = t.name AND t.managed_by = 'sql'), \
     lane AS (DELETE FROM domain_events.subscription s USING target t \
       WHERE t.managed_by = 'sql' \
         AND s.name IN ('handler:' || t.name, 'handler:' || t.name || '/' || t.name)), \
     letters AS (DELETE FROM domain_events.dead_letter d USING target t \
       WHERE t.managed_by = 'sql' AND d.subscription = 'handler:' || t.name) \
     SELECT managed_by FROM target";

/// The enabled sync handlers in the order they run (ties by name, byte order).
pub const LOAD_SYNC_HANDLERS: &std::ffi::CStr = c"SELECT name, function::pg_catalog.oid, \
     pg_catalog.array_to_string(events, ' '), log_level, run_as::pg_catalog.oid \
     FROM domain_events.handler WHERE mode = 'sync' AND enabled \
     ORDER BY priority, name COLLATE \"C\"";

/// The async handlers registered in SQL (the listener runs them), in the columns of
/// [`LOAD_SYNC_HANDLERS`]; disabled ones too: the listener pauses them, and an event it was
/// already handling when one was disabled still completes.
pub const LOAD_ASYNC_HANDLERS: &std::ffi::CStr = c"SELECT name, function::pg_catalog.oid, \
     pg_catalog.array_to_string(events, ' '), log_level, run_as::pg_catalog.oid \
     FROM domain_events.handler WHERE mode = 'async' AND managed_by = 'sql' \
     ORDER BY name COLLATE \"C\"";

/// The names of the handlers the extension calls (sync ones, and async ones through
/// `run_async_handler`), for their counters.
pub const COUNTED_HANDLER_NAMES: &str =
    "SELECT name FROM domain_events.handler WHERE managed_by = 'sql' ORDER BY name";

/// Logs one successful execution (`$7`: its mode).
pub const LOG_SUCCESS: &str = "INSERT INTO domain_events.handler_log \
       (handler, mode, event_id, position, event_type, started_at, duration, outcome) \
     VALUES ($1, $7, $2, $3, $4, $5, pg_catalog.make_interval(secs => $6), 'success')";

/// Removes the log of executions older than the retention cut-off `$1`.
pub const PRUNE_HANDLER_LOG: &str =
    "DELETE FROM domain_events.handler_log WHERE started_at < $1::timestamptz";

/// Serialises creators of partitions (`pg_advisory_xact_lock` key: "pgde" + 1).
pub const PARTITION_LOCK: &str = "SELECT pg_catalog.pg_advisory_xact_lock(1885824101, 1)";

/// Whether the default partition holds rows in `[$1, $2)`.
pub const DEFAULT_HAS_ROWS_IN: &str = "SELECT EXISTS (SELECT 1 FROM domain_events.event_default \
     WHERE recorded_at >= $1::timestamptz AND recorded_at < $2::timestamptz)";

/// Whether the default partition holds any row.
pub const DEFAULT_HAS_ROWS: &str = "SELECT EXISTS (SELECT 1 FROM domain_events.event_default)";

/// The distinct months (`YYYYMM`, UTC) of the rows in a table.
pub fn months_of(table: &str) -> String {
    format!(
        "SELECT DISTINCT pg_catalog.to_char(recorded_at AT TIME ZONE 'UTC', 'YYYYMM')::int \
         FROM domain_events.{table}"
    )
}

/// Creates one monthly partition; its own TRUNCATE guard, as statement triggers are not cloned
/// (firing `ALWAYS`, like the cloned row trigger: see `finalize.sql`).
pub fn create_partition(name: &str, from: &str, to: &str) -> String {
    format!(
        "CREATE TABLE domain_events.{name} PARTITION OF domain_events.event \
           FOR VALUES FROM ('{from}') TO ('{to}'); \
         CREATE TRIGGER event_no_truncate BEFORE TRUNCATE ON domain_events.{name} \
           FOR EACH STATEMENT EXECUTE FUNCTION domain_events.refuse_event_change(); \
         ALTER TABLE domain_events.{name} ENABLE ALWAYS TRIGGER event_no_truncate"
    )
}

/// A standalone table shaped like the event table, to fill before attaching it as a partition.
pub fn create_unattached_partition(name: &str) -> String {
    format!(
        "CREATE TABLE domain_events.{name} \
           (LIKE domain_events.event INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
}

/// Moves the default partition's rows in `[$1, $2)` into `target` (a partition or a table
/// about to become one). Only the partition code may delete: see `immutability`.
pub fn move_from_default(target: &str) -> String {
    format!(
        "WITH moved AS (DELETE FROM domain_events.event_default \
           WHERE recorded_at >= $1::timestamptz AND recorded_at < $2::timestamptz RETURNING *) \
         INSERT INTO domain_events.{target} SELECT * FROM moved"
    )
}

/// Attaches a filled table as the partition for `[from, to)`, with its TRUNCATE guard.
pub fn attach_partition(name: &str, from: &str, to: &str) -> String {
    format!(
        "ALTER TABLE domain_events.event ATTACH PARTITION domain_events.{name} \
           FOR VALUES FROM ('{from}') TO ('{to}'); \
         CREATE TRIGGER event_no_truncate BEFORE TRUNCATE ON domain_events.{name} \
           FOR EACH STATEMENT EXECUTE FUNCTION domain_events.refuse_event_change(); \
         ALTER TABLE domain_events.{name} ENABLE ALWAYS TRIGGER event_no_truncate"
    )
}

/// Partitions made while `CREATE EXTENSION` runs would become members of the extension:
/// pg_dump would skip their rows and retention could not drop them.
pub fn disown_partition(name: &str) -> String {
    format!("ALTER EXTENSION pg_domain_events DROP TABLE domain_events.{name}")
}

/// The monthly partitions attached to the event table.
pub const LIST_PARTITIONS: &str = "SELECT c.relname::text FROM pg_catalog.pg_inherits i \
     JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
     WHERE i.inhparent = 'domain_events.event'::regclass ORDER BY 1";

/// The retention cut-off `now() - $1::interval`.
pub const RETENTION_CUTOFF: &str = "SELECT pg_catalog.now() - $1::interval";

/// Drops an expired partition.
pub fn drop_partition(name: &str) -> String {
    format!("DROP TABLE domain_events.{name}")
}

/// Detaches an expired partition and keeps it as `archived_<suffix>`.
pub fn detach_partition(name: &str, archived: &str) -> String {
    format!(
        "ALTER TABLE domain_events.event DETACH PARTITION domain_events.{name}; \
         ALTER TABLE domain_events.{name} RENAME TO {archived}"
    )
}

/// What capture needs to act as `raise_events` would: the function whose EXECUTE privilege the
/// user changing the row must hold, and the extension owner whose rights it runs with.
pub const CAPTURE_RIGHTS: &str =
    "SELECT 'domain_events.raise_events(jsonb)'::pg_catalog.regprocedure::pg_catalog.oid, \
     e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_domain_events'";

/// Whether a table has the capture trigger.
pub const IS_TRACKED: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger \
     WHERE tgrelid = $1 AND tgname = 'domain_events_capture')";

const DESCRIBE_TABLE: &str = "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.oid = $1 AND c.relkind IN ('r', 'p')";

const TABLE_COLUMNS: &str = "SELECT attname::text FROM pg_catalog.pg_attribute \
     WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum";

/// The qualified, quoted name of an ordinary or partitioned table; `None` for anything else.
pub fn describe_table(oid: pg_sys::Oid) -> Option<String> {
    query_column::<String>(DESCRIBE_TABLE, &[oid.into()])
        .into_iter()
        .next()
}

/// The live columns of a table, in order.
pub fn table_columns(oid: pg_sys::Oid) -> Vec<String> {
    query_column::<String>(TABLE_COLUMNS, &[oid.into()])
}

/// Creates the capture trigger; `config` is JSON, passed as the trigger's one argument.
pub fn create_capture_trigger(table: &str, config: &str) -> String {
    let config = pgrx::spi::quote_literal(config);
    format!(
        "CREATE TRIGGER domain_events_capture AFTER INSERT OR UPDATE OR DELETE ON {table} \
           FOR EACH ROW EXECUTE FUNCTION domain_events.capture_row_change({config})"
    )
}

/// Removes the capture trigger.
pub fn drop_capture_trigger(table: &str) -> String {
    format!("DROP TRIGGER domain_events_capture ON {table}")
}

thread_local! {
    /// The saved plan of [`INSERT_EVENTS`], prepared once per backend. Postgres' plan cache
    /// re-plans it by itself when the tables change (even after DROP/CREATE EXTENSION).
    static INSERT_PLAN: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
    /// The saved plan of [`INSERT_ONE`].
    static INSERT_ONE_PLAN: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

/// The columns of one batch, in the parameter order of [`INSERT_EVENTS`].
#[derive(Default)]
pub struct BatchColumns {
    /// Distinct aggregates, sorted: types.
    pub head_types: Vec<String>,
    /// Distinct aggregates, sorted: ids.
    pub head_ids: Vec<String>,
    /// Distinct aggregates, sorted: how many events each gets.
    pub head_counts: Vec<i64>,
    /// Per event: id.
    pub ids: Vec<pgrx::Uuid>,
    /// Per event: aggregate type.
    pub aggregate_types: Vec<String>,
    /// Per event: aggregate id.
    pub aggregate_ids: Vec<String>,
    /// Per event: 1-based ordinal among the batch's events of the same aggregate.
    pub ordinals: Vec<i64>,
    /// Per event: number of the batch's events of the same aggregate.
    pub counts: Vec<i64>,
    /// Per event: event type.
    pub event_types: Vec<String>,
    /// Per event: payload schema version.
    pub event_versions: Vec<i32>,
    /// Per event: payload.
    pub payloads: Vec<Jsonb>,
    /// Per event: metadata.
    pub metadata: Vec<Jsonb>,
    /// Per event: business time, `None` = `now()`.
    pub occurred_at: Vec<Option<TimestampWithTimeZone>>,
    /// Per event: server time, `None` = `now()` (only imports set it).
    pub recorded_at: Vec<Option<TimestampWithTimeZone>>,
}

/// One stored event as returned to the caller.
pub struct Stored {
    /// Event id.
    pub id: pgrx::Uuid,
    /// Global position.
    pub position: i64,
    /// Version within its aggregate.
    pub aggregate_version: i64,
    /// Server time.
    pub recorded_at: TimestampWithTimeZone,
}

fn insert_plan(client: &SpiClient<'_>) -> OwnedPreparedStatement {
    let text = PgOid::from(pg_sys::TEXTARRAYOID);
    let int8 = PgOid::from(pg_sys::INT8ARRAYOID);
    let types = [
        text,
        text,
        int8,
        PgOid::from(pg_sys::UUIDARRAYOID),
        text,
        text,
        int8,
        int8,
        text,
        PgOid::from(pg_sys::INT4ARRAYOID),
        PgOid::from(pg_sys::JSONBARRAYOID),
        PgOid::from(pg_sys::JSONBARRAYOID),
        PgOid::from(pg_sys::TIMESTAMPTZARRAYOID),
        PgOid::from(pg_sys::TIMESTAMPTZARRAYOID),
    ];
    client
        .prepare_mut(INSERT_EVENTS, &types)
        .unwrap_or_else(|e| panic!("preparing the event insert failed: {e}"))
        .keep()
}

fn stored_rows(rows: pgrx::spi::SpiTupleTable<'_>, expected: usize) -> Vec<Stored> {
    let mut stored = Vec::with_capacity(expected);
    for row in rows {
        stored.push(Stored {
            id: row
                .get::<pgrx::Uuid>(1)
                .ok()
                .flatten()
                .expect("RETURNING id"),
            position: row
                .get::<i64>(2)
                .ok()
                .flatten()
                .expect("RETURNING position"),
            aggregate_version: row
                .get::<i64>(3)
                .ok()
                .flatten()
                .expect("RETURNING aggregate_version"),
            recorded_at: row
                .get::<TimestampWithTimeZone>(4)
                .ok()
                .flatten()
                .expect("RETURNING recorded_at"),
        });
    }
    stored
}

/// Runs [`INSERT_EVENTS`] for a batch; rows come back in input order.
pub fn insert_batch(batch: BatchColumns) -> Vec<Stored> {
    let expected = batch.ids.len();
    Spi::connect_mut(|client| {
        INSERT_PLAN.with(|cell| {
            let mut slot = cell.borrow_mut();
            let plan = slot.get_or_insert_with(|| insert_plan(client));
            let args: [DatumWithOid; 14] = [
                batch.head_types.into(),
                batch.head_ids.into(),
                batch.head_counts.into(),
                batch.ids.into(),
                batch.aggregate_types.into(),
                batch.aggregate_ids.into(),
                batch.ordinals.into(),
                batch.counts.into(),
                batch.event_types.into(),
                batch.event_versions.into(),
                jsonb::array(&batch.payloads).into(),
                jsonb::array(&batch.metadata).into(),
                batch.occurred_at.into(),
                batch.recorded_at.into(),
            ];
            let rows = client
                .update(&*plan, None, &args)
                .unwrap_or_else(|e| panic!("inserting events failed: {e}"));
            stored_rows(rows, expected)
        })
    })
}

/// One event's columns, in the parameter order of [`INSERT_ONE`].
pub struct OneEvent {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event id.
    pub id: pgrx::Uuid,
    /// Event type.
    pub event_type: String,
    /// Payload schema version.
    pub event_version: i32,
    /// Payload.
    pub payload: Jsonb,
    /// Metadata.
    pub metadata: Jsonb,
    /// Business time, `None` = `now()`.
    pub occurred_at: Option<TimestampWithTimeZone>,
}

/// Runs [`INSERT_ONE`].
pub fn insert_one(event: OneEvent) -> Stored {
    Spi::connect_mut(|client| {
        INSERT_ONE_PLAN.with(|cell| {
            let mut slot = cell.borrow_mut();
            let plan = slot.get_or_insert_with(|| {
                let text = PgOid::from(pg_sys::TEXTOID);
                let types = [
                    text,
                    text,
                    PgOid::from(pg_sys::UUIDOID),
                    text,
                    PgOid::from(pg_sys::INT4OID),
                    PgOid::from(pg_sys::JSONBOID),
                    PgOid::from(pg_sys::JSONBOID),
                    PgOid::from(pg_sys::TIMESTAMPTZOID),
                ];
                client
                    .prepare_mut(INSERT_ONE, &types)
                    .unwrap_or_else(|e| panic!("preparing the event insert failed: {e}"))
                    .keep()
            });
            let args: [DatumWithOid; 8] = [
                event.aggregate_type.into(),
                event.aggregate_id.into(),
                event.id.into(),
                event.event_type.into(),
                event.event_version.into(),
                event.payload.into(),
                event.metadata.into(),
                event.occurred_at.into(),
            ];
            let rows = client
                .update(&*plan, None, &args)
                .unwrap_or_else(|e| panic!("inserting the event failed: {e}"));
            stored_rows(rows, 1).pop().expect("one stored event")
        })
    })
}

/// Runs utility statements or DML that return nothing of interest.
pub fn run(sql: &str) {
    Spi::connect_mut(|client| {
        client
            .update(sql, None, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    })
}

/// Runs a statement with arguments, ignoring its result rows.
pub fn run_with(sql: &str, args: &[DatumWithOid]) {
    Spi::connect_mut(|client| {
        client
            .update(sql, None, args)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    })
}

/// Runs a query returning one boolean.
pub fn query_bool(sql: &str, args: &[DatumWithOid]) -> bool {
    Spi::connect_mut(|client| {
        client
            .update(sql, Some(1), args)
            .and_then(|t| t.first().get_one::<bool>())
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .unwrap_or(false)
    })
}

/// Runs a query returning one column of `T` per row.
pub fn query_column<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Vec<T> {
    Spi::connect_mut(|client| {
        client
            .update(sql, None, args)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .filter_map(|row| row.get::<T>(1).ok().flatten())
            .collect()
    })
}
