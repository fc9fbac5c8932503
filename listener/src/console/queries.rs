//! Every SQL statement of the console. Request values are bind parameters, never SQL text;
//! each statement returns one `jsonb` object per row, shaped as the OpenAPI document says.

use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::error::Error;

/// Run once per read connection.
pub const READ_ONLY_SESSION: &str = "SET default_transaction_read_only = on";

/// One dead letter of one event marked for redelivery, as the extension owner.
pub const REDRIVE: &str = "SELECT domain_events.redrive_dead_letter($1, $2)";

/// An event as JSON; `$payloads` (a boolean parameter) adds payload and metadata.
macro_rules! event_json {
    ($payloads:literal) => {
        concat!(
            "jsonb_build_object('position', e.position, 'id', e.id, ",
            "'aggregate_type', e.aggregate_type, 'aggregate_id', e.aggregate_id, ",
            "'aggregate_version', e.aggregate_version, 'event_type', e.event_type, ",
            "'event_version', e.event_version, 'occurred_at', e.occurred_at, ",
            "'recorded_at', e.recorded_at) || CASE WHEN ",
            $payloads,
            " THEN jsonb_build_object('payload', e.payload, 'metadata', e.metadata) ",
            "ELSE '{}'::jsonb END"
        )
    };
}

/// The filters of an event page besides its type: each is a parameter that is either NULL or
/// compared. Statements are planned with their values, so the NULL tests fold away.
macro_rules! event_filters {
    () => {
        "($1::text IS NULL OR e.aggregate_type = $1) \
         AND ($2::text IS NULL OR e.aggregate_id = $2) \
         AND ($4::timestamptz IS NULL OR e.recorded_at >= $4) \
         AND ($5::timestamptz IS NULL OR e.recorded_at < $5) \
         AND e.position > $6"
    };
}

/// Events by filters without a type (`$3` is NULL), in position order after `$6`.
pub const EVENTS: &str = concat!(
    "SELECT ",
    event_json!("$8"),
    " FROM domain_events.event e WHERE ",
    event_filters!(),
    " AND $3::text IS NULL ORDER BY e.position LIMIT $7"
);

/// Events of type `$3` by the other filters, in position order after `$6`: the rows and order
/// of [`EVENTS`] with `e.event_type = $3`. Written as that equality, the type is a constant of
/// the sort and the planner may walk each partition's position index filtering by type, which
/// reads a whole partition when the type is rare in it or clustered elsewhere (a common type's
/// page took 100+ ms over 1M events). As a range of one value ordered by type then position,
/// only the `(event_type, position)` index yields the order: one index range per partition.
pub const EVENTS_OF_TYPE: &str = concat!(
    "SELECT ",
    event_json!("$8"),
    " FROM domain_events.event e WHERE ",
    event_filters!(),
    " AND e.event_type >= $3 AND e.event_type <= $3 \
     ORDER BY e.event_type, e.position LIMIT $7"
);

/// One aggregate's events in version order after version `$3`.
pub const AGGREGATE: &str = concat!(
    "SELECT ",
    event_json!("$5"),
    " FROM domain_events.event e \
     WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.aggregate_version > $3 \
     ORDER BY e.aggregate_version LIMIT $4"
);

/// Outbox entries of a subscription (`domain_events.outbox`).
pub const OUTBOX: &str = concat!(
    "SELECT ",
    event_json!("true"),
    " || jsonb_build_object('status', e.entry_status, 'handler', e.handler, \
        'last_error', e.last_error, 'attempts', e.attempts, \
        'last_failed_at', e.last_failed_at, 'redrive_requested_at', e.redrive_requested_at) \
     FROM domain_events.outbox($1, $2, ($3::bigint)::integer, $4) e"
);

/// Whether a subscription exists.
pub const SUBSCRIPTION_EXISTS: &str =
    "SELECT to_jsonb(EXISTS (SELECT 1 FROM domain_events.subscription WHERE name = $1))";

/// Dead letters (of one subscription or all) in id order after `$2`, with their event's type
/// and aggregate.
pub const DEAD_LETTERS: &str = "\
    SELECT jsonb_build_object('id', d.id, 'subscription', d.subscription, 'handler', d.handler, \
        'event_id', d.event_id, 'position', d.position, 'error', d.error, \
        'attempts', d.attempts, 'first_failed_at', d.first_failed_at, \
        'last_failed_at', d.last_failed_at, 'redrive_requested_at', d.redrive_requested_at, \
        'event_type', e.event_type, 'aggregate_type', e.aggregate_type, \
        'aggregate_id', e.aggregate_id) \
      FROM domain_events.dead_letter d \
      LEFT JOIN domain_events.event e ON e.position = d.position AND e.id = d.event_id \
     WHERE ($1::text IS NULL OR d.subscription = $1) AND d.id > $2 \
     ORDER BY d.id LIMIT $3";

/// Subscriptions with their lag (`domain_events.subscription_lag`).
pub const SUBSCRIPTIONS: &str = "\
    SELECT jsonb_build_object('name', l.name, 'mode', l.mode, 'position', l.position, \
        'lsn', l.lsn::text, 'updated_at', l.updated_at, 'events_behind', l.events_behind, \
        'bytes_behind', l.bytes_behind, 'slot_wal_retained', l.slot_wal_retained, \
        'slot_active', l.slot_active, 'slot_wal_status', l.slot_wal_status, \
        'recovering', l.recovering) \
      FROM domain_events.subscription_lag l ORDER BY l.name";

/// Handlers with their statistics (`domain_events.handler_stats`); `$1` adds the last error.
pub const HANDLERS: &str = "\
    SELECT jsonb_build_object('name', h.name, 'mode', h.mode, 'enabled', h.enabled, \
        'priority', h.priority, 'calls', h.calls, 'successes', h.successes, \
        'failures', h.failures, \
        'total_ms', (extract(epoch FROM h.total_duration) * 1000)::float8, \
        'max_ms', (extract(epoch FROM h.max_duration) * 1000)::float8, \
        'last_error_at', h.last_error_at) \
        || CASE WHEN $1 THEN jsonb_build_object('last_error', h.last_error) ELSE '{}'::jsonb END \
      FROM domain_events.handler_stats h ORDER BY h.name";

/// The distinct event types (a loose index scan: one index probe per type).
pub const EVENT_TYPES: &str = "\
    WITH RECURSIVE t AS ( \
        (SELECT e.event_type FROM domain_events.event e ORDER BY e.event_type LIMIT 1) \
        UNION ALL \
        SELECT (SELECT e.event_type FROM domain_events.event e \
                 WHERE e.event_type > t.event_type ORDER BY e.event_type LIMIT 1) \
          FROM t WHERE t.event_type IS NOT NULL) \
    SELECT to_jsonb(t.event_type) FROM t WHERE t.event_type IS NOT NULL LIMIT 1000";

/// Runs `sql` and returns its one `jsonb` column; `context` names the query in errors.
pub async fn rows(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    context: &'static str,
) -> Result<Vec<Value>, Error> {
    client
        .query(sql, params)
        .await
        .and_then(|rows| rows.iter().map(|r| r.try_get::<_, Value>(0)).collect())
        .map_err(Error::sql(context))
}
