-- pg_domain_events 0.1.0 → 0.2.0, run by ALTER EXTENSION pg_domain_events UPDATE.
--
-- Every change this release makes to the extension's SQL surface, so that a database created
-- at 0.1.0 ends up with exactly what CREATE EXTENSION gives at 0.2.0 (tests/tests/upgrade.rs
-- compares the two catalogs). A released script is never edited: mistakes are corrected in
-- the next upgrade script.
--
-- Changes:
--   * domain_events.event: event_type_idx is (event_type, position), was (event_type,
--     occurred_at): a page of one type's events in position order reads one index range.
--   * domain_events.subscription: columns for recovering from a lost replication slot without
--     a gap. Positions are taken at insert, not at commit, so "events after the last
--     position" skips a transaction that took a lower position and committed after the slot
--     was lost; the listener now keeps a delivered snapshot (every transaction visible in it was
--     handled) and the state of a recovery in progress. Added at the end of the table, as a
--     fresh install has them. A listener older than 0.2.0 never reads or writes them.
--   * domain_events.subscription_lag: a `recovering` column (a subscription catching up after
--     losing its slot). Added at the end of the view, so CREATE OR REPLACE keeps its columns.
--   * Event contracts: the role domain_events_admin; the table domain_events.event_schema (one
--     JSON Schema per event type and version; its rows are dumped with the database) with a
--     trigger that keeps registered versions immutable and invalidates every backend's cached
--     validators; the view event_schemas; the functions register_schema, drop_schema and
--     check_schema_compatibility (admin; the last one readers too). Raising checks payloads
--     against the registry per domain_events.schema_validation, a setting of the library.
--   * Handlers in the database: the table domain_events.handler (sync handlers run inside
--     the raising transaction, async ones by the listener; listener-managed rows mirror a
--     listener's TOML handlers), the processing log domain_events.handler_log, the view
--     handler_stats and the functions register_handler, enable_handler, disable_handler,
--     unregister_handler (admin) and handler_counters (readers). Raising runs the matching
--     sync handlers per the library (settings domain_events.handler_max_depth and
--     domain_events.handler_stats).

\echo Use "ALTER EXTENSION pg_domain_events UPDATE TO '0.2.0'" to load this file. \quit

ALTER TABLE domain_events.subscription
    ADD COLUMN delivered_snapshot  pg_snapshot,
    ADD COLUMN pending_snapshot    pg_snapshot,
    ADD COLUMN pending_lsn         pg_lsn,
    ADD COLUMN recovery_started_at timestamptz,
    ADD COLUMN recovery_lsn        pg_lsn,
    ADD COLUMN recovery_until      xid8;

CREATE OR REPLACE VIEW domain_events.subscription_lag AS
SELECT s.name,
       s.mode,
       s.position,
       s.lsn,
       s.updated_at,
       CASE s.mode
           WHEN 'notify' THEN (
               SELECT pg_catalog.count(*) FROM domain_events.event e
                WHERE e.txid >= pg_catalog.pg_snapshot_xmin(s.snapshot_prev)
                  AND NOT pg_catalog.pg_visible_in_snapshot(e.txid, s.snapshot_prev))
           ELSE (SELECT pg_catalog.count(*) FROM domain_events.event e WHERE e.position > s.position)
       END AS events_behind,
       CASE WHEN s.mode = 'replication' AND s.lsn IS NOT NULL
            THEN pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.lsn)::bigint
       END AS bytes_behind,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), r.restart_lsn)::bigint
           AS slot_wal_retained,
       r.active AS slot_active,
       r.wal_status AS slot_wal_status,
       s.recovery_started_at IS NOT NULL AS recovering
  FROM domain_events.subscription s
  LEFT JOIN pg_catalog.pg_replication_slots r
         ON r.slot_name = s.name AND r.database = pg_catalog.current_database();

-- Event contracts.
-- Roles are cluster-wide: another database may have created it already (see bootstrap.sql).
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'domain_events_admin') THEN
        BEGIN
            CREATE ROLE domain_events_admin NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$roles$;

CREATE TABLE domain_events.event_schema (
    event_type    text        NOT NULL,
    event_version integer     NOT NULL CHECK (event_version >= 1),
    schema        jsonb       NOT NULL CHECK (pg_catalog.jsonb_typeof(schema) = 'object'),
    registered_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    registered_by text        NOT NULL DEFAULT SESSION_USER,
    PRIMARY KEY (event_type, event_version)
);
COMMENT ON TABLE domain_events.event_schema IS
    'JSON Schema of each event type and version, checked when events are raised (domain_events.schema_validation). Register with domain_events.register_schema().';
SELECT pg_catalog.pg_extension_config_dump('domain_events.event_schema', '');

CREATE FUNCTION domain_events.register_schema(
    "event_type" text, "event_version" integer, "schema" jsonb
) RETURNS boolean
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'register_schema_wrapper';

CREATE FUNCTION domain_events.drop_schema("event_type" text, "event_version" integer)
RETURNS void
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'drop_schema_wrapper';

CREATE FUNCTION domain_events.check_schema_compatibility("event_type" text, "new_schema" jsonb)
RETURNS TABLE ("location" text, "change" text, "detail" text)
STABLE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'check_schema_compatibility_wrapper';

CREATE FUNCTION domain_events.event_schema_changed()
RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'event_schema_changed_wrapper';

REVOKE ALL ON FUNCTION
    domain_events.register_schema(text, integer, jsonb),
    domain_events.drop_schema(text, integer),
    domain_events.check_schema_compatibility(text, jsonb),
    domain_events.event_schema_changed()
    FROM PUBLIC;

-- ALWAYS: neither immutability nor the backends' cache invalidation may be switched off by
-- session_replication_role = replica.
CREATE TRIGGER event_schema_immutable BEFORE UPDATE ON domain_events.event_schema
    FOR EACH ROW EXECUTE FUNCTION domain_events.event_schema_changed();
CREATE TRIGGER event_schema_invalidate AFTER INSERT OR DELETE OR TRUNCATE
    ON domain_events.event_schema
    FOR EACH STATEMENT EXECUTE FUNCTION domain_events.event_schema_changed();
ALTER TABLE domain_events.event_schema ENABLE ALWAYS TRIGGER event_schema_immutable;
ALTER TABLE domain_events.event_schema ENABLE ALWAYS TRIGGER event_schema_invalidate;

-- How consumers read the contracts: latest marks the newest version of each type.
CREATE VIEW domain_events.event_schemas AS
SELECT s.event_type,
       s.event_version,
       s.schema,
       COALESCE(s.schema ->> '$schema', 'https://json-schema.org/draft/2020-12/schema') AS draft,
       s.event_version = pg_catalog.max(s.event_version) OVER (PARTITION BY s.event_type)
           AS latest,
       s.registered_at,
       s.registered_by
  FROM domain_events.event_schema s;
COMMENT ON VIEW domain_events.event_schemas IS
    'Registered event schemas (JSON Schema), one row per event type and version; latest marks the newest version.';
COMMENT ON FUNCTION domain_events.register_schema(text, integer, jsonb) IS
    'Registers the JSON Schema of an event type and version; true if registered now, false if the identical schema already was. A registered version is immutable.';
COMMENT ON FUNCTION domain_events.drop_schema(text, integer) IS
    'Drops the schema of an event type and version, only while no stored event uses it.';
COMMENT ON FUNCTION domain_events.check_schema_compatibility(text, jsonb) IS
    'Advisory: what a new schema would break for consumers of the latest registered version of the event type.';

-- domain_events_admin registers and drops schemas; readers (and consumers) read them.
GRANT USAGE ON SCHEMA domain_events TO domain_events_admin;
GRANT EXECUTE ON FUNCTION
    domain_events.register_schema(text, integer, jsonb),
    domain_events.drop_schema(text, integer),
    domain_events.check_schema_compatibility(text, jsonb)
    TO domain_events_admin;
GRANT EXECUTE ON FUNCTION domain_events.check_schema_compatibility(text, jsonb)
    TO domain_events_reader;
GRANT SELECT ON domain_events.event_schemas TO domain_events_reader, domain_events_admin;

-- Handlers in the database.
-- Handlers in the database (0.2.0): a registry of SQL functions called with each matching event,
-- either inside the raising transaction (sync) or by the listener after commit (async).
-- Rows are written by register_handler() and friends, never directly.
CREATE TABLE domain_events.handler (
    name        text        PRIMARY KEY,
    mode        text        NOT NULL DEFAULT 'sync' CHECK (mode IN ('sync', 'async')),
    -- The function called with the event, `f(event jsonb)`; NULL only for listener-managed rows
    -- whose handler is not a function (a webhook, a NATS subject, ...).
    function    regprocedure,
    events      text[]      NOT NULL CHECK (pg_catalog.cardinality(events) >= 1),
    priority    integer     NOT NULL DEFAULT 100,
    enabled     boolean     NOT NULL DEFAULT true,
    description text,
    log_level   text        NOT NULL DEFAULT 'errors' CHECK (log_level IN ('off', 'errors', 'all')),
    -- 'sql': registered with register_handler(). 'listener': mirrored from a listener's TOML
    -- configuration by that listener (always async); such a row can be enabled and disabled
    -- from SQL, and is removed by editing the TOML file.
    managed_by  text        NOT NULL DEFAULT 'sql' CHECK (managed_by IN ('sql', 'listener')),
    -- The role whose rights the function runs with: the role that registered it.
    run_as      regrole     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT handler_sync_is_registered CHECK (mode = 'async' OR managed_by = 'sql'),
    CONSTRAINT handler_function_required CHECK (function IS NOT NULL OR managed_by = 'listener')
);
COMMENT ON TABLE domain_events.handler IS
    'Event handlers the database knows about: sync ones run inside the raising transaction, async ones in the listener. Change with register_handler(), enable_handler(), disable_handler(), unregister_handler().';

-- One row per handler execution the handler's log_level keeps; removed by retention with the
-- events. Sync executions are written in the raising transaction (only successes can commit);
-- async ones by the listener, one row per attempt.
CREATE TABLE domain_events.handler_log (
    handler      text        NOT NULL,
    mode         text        NOT NULL CHECK (mode IN ('sync', 'async')),
    event_id     uuid        NOT NULL,
    position     bigint      NOT NULL,
    event_type   text        NOT NULL,
    started_at   timestamptz NOT NULL,
    duration     interval    NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('success', 'failure', 'dead_lettered')),
    attempt      integer     NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    error        text,
    -- Async executions: the listener's subscription that ran the handler.
    subscription text
);
CREATE INDEX handler_log_started_at_idx ON domain_events.handler_log (started_at);
CREATE INDEX handler_log_handler_idx ON domain_events.handler_log (handler, started_at);
CREATE INDEX handler_log_event_idx ON domain_events.handler_log (event_id);
COMMENT ON TABLE domain_events.handler_log IS
    'Handler executions kept per handler log_level (off, errors, all); removed with the events by retention.';

SELECT pg_catalog.pg_extension_config_dump('domain_events.handler', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.handler_log', '');

CREATE FUNCTION domain_events.register_handler_function(
    "name" text, "function" oid, "events" text[], "mode" text, "priority" integer,
    "enabled" boolean, "description" text, "log_level" text
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'register_handler_function_wrapper';

CREATE FUNCTION domain_events.enable_handler("name" text) RETURNS boolean
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'enable_handler_wrapper';

CREATE FUNCTION domain_events.disable_handler("name" text) RETURNS boolean
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'disable_handler_wrapper';

CREATE FUNCTION domain_events.unregister_handler("name" text) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'unregister_handler_wrapper';

CREATE FUNCTION domain_events.handler_counters()
RETURNS TABLE ("handler" text, "calls" bigint, "successes" bigint, "failures" bigint,
               "total_ms" double precision, "max_ms" double precision, "last_error" text,
               "last_error_at" timestamptz)
STABLE STRICT PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'handler_counters_wrapper';

CREATE FUNCTION domain_events.handler_changed()
RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'handler_changed_wrapper';

-- Handlers in the database (0.2.0, docs/handlers.md). domain_events_admin registers them: a
-- sync handler runs inside every writer's transaction. Every change to the registry
-- invalidates the backends' cached copies (ALWAYS: session_replication_role = replica must not
-- leave a backend running a disabled or dropped handler).
CREATE TRIGGER handler_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON domain_events.handler
    FOR EACH STATEMENT EXECUTE FUNCTION domain_events.handler_changed();
ALTER TABLE domain_events.handler ENABLE ALWAYS TRIGGER handler_invalidate;

-- regprocedure and regrole have no Rust type: the typed signature lives here.
CREATE FUNCTION domain_events.register_handler(
    name text, function regprocedure, events text[], mode text DEFAULT 'sync',
    priority integer DEFAULT 100, enabled boolean DEFAULT true, description text DEFAULT NULL,
    log_level text DEFAULT 'errors')
RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT domain_events.register_handler_function($1, $2::oid, $3, $4, $5, $6, $7, $8) $$;
COMMENT ON FUNCTION domain_events.register_handler(text, regprocedure, text[], text, integer, boolean, text, text) IS
    'Registers a handler f(event jsonb) for the events matching the filters (*, Prefix.*, exact types); sync handlers run in the raising transaction with the rights of the registering role.';
COMMENT ON FUNCTION domain_events.enable_handler(text) IS 'Enables a handler; true if it was disabled.';
COMMENT ON FUNCTION domain_events.disable_handler(text) IS 'Disables a handler; true if it was enabled.';
COMMENT ON FUNCTION domain_events.unregister_handler(text) IS 'Removes a handler registered with register_handler().';

-- Calls, successes, failures and timings per handler. Sync counters live in shared memory
-- (shared_preload_libraries = 'pg_domain_events'): they count executions whose transaction rolled
-- back, and no writer waits for another to count. Without preloading they are NULL.
CREATE VIEW domain_events.handler_stats AS
SELECT h.name,
       h.mode,
       h.enabled,
       h.priority,
       c.calls,
       c.successes,
       c.failures,
       pg_catalog.make_interval(secs => c.total_ms / 1000.0) AS total_duration,
       pg_catalog.make_interval(secs => c.max_ms / 1000.0) AS max_duration,
       c.last_error,
       c.last_error_at
  FROM domain_events.handler h
  LEFT JOIN domain_events.handler_counters() c ON c.handler = h.name;
COMMENT ON VIEW domain_events.handler_stats IS
    'Per handler: calls, successes, failures, total and max duration, last error and when (sync handlers: since server start, needs shared_preload_libraries).';

REVOKE ALL ON FUNCTION
    domain_events.register_handler(text, regprocedure, text[], text, integer, boolean, text, text),
    domain_events.register_handler_function(text, oid, text[], text, integer, boolean, text, text),
    domain_events.enable_handler(text),
    domain_events.disable_handler(text),
    domain_events.unregister_handler(text),
    domain_events.handler_counters(),
    domain_events.handler_changed()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    domain_events.register_handler(text, regprocedure, text[], text, integer, boolean, text, text),
    domain_events.register_handler_function(text, oid, text[], text, integer, boolean, text, text),
    domain_events.enable_handler(text),
    domain_events.disable_handler(text),
    domain_events.unregister_handler(text)
    TO domain_events_admin;
GRANT EXECUTE ON FUNCTION domain_events.handler_counters()
    TO domain_events_reader, domain_events_admin;
GRANT SELECT ON domain_events.handler, domain_events.handler_log, domain_events.handler_stats
    TO domain_events_reader, domain_events_admin;
-- The listener records its async executions.
GRANT INSERT ON domain_events.handler_log TO domain_events_listener;

-- Async registry handlers (docs/handlers.md): the listener runs each one through
-- run_async_handler(), which calls the registered function with the registering role's rights;
-- the listener needs no right on the function or on what it touches.
CREATE FUNCTION domain_events.run_async_handler("handler" text, "event" jsonb) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'run_async_handler_wrapper';
REVOKE ALL ON FUNCTION domain_events.run_async_handler(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domain_events.run_async_handler(text, jsonb) TO domain_events_listener;

-- The listener's TOML handlers, mirrored into the registry as listener-managed rows named
-- '<subscription>/<handler>' (docs/handlers.md): operators see every handler in one place and
-- pause any of them with disable_handler(). Called by each listener at start; it replaces the
-- subscription's rows, keeping their enabled flag. Such rows are always async and never run
-- in a writer's transaction (the table's checks).
CREATE FUNCTION domain_events.mirror_listener_handlers("subscription" text, "handlers" jsonb)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
AS $$
BEGIN
    IF subscription IS NULL OR subscription !~ '^[a-z0-9_$]{1,63}$' THEN
        RAISE EXCEPTION 'invalid subscription: %', coalesce(pg_catalog.quote_literal(subscription), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A listener subscription name: lowercase letters, digits, _ and $.';
    END IF;
    IF pg_catalog.jsonb_typeof(handlers) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid handlers: not a JSON array'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass [{"name": ..., "events": [...], "description": ...}, ...].';
    END IF;
    DELETE FROM domain_events.handler h
     WHERE h.managed_by = 'listener'
       AND pg_catalog.left(h.name, pg_catalog.length(subscription) + 1) = subscription || '/'
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(handlers) e
                        WHERE subscription || '/' || (e->>'name') = h.name);
    INSERT INTO domain_events.handler AS h
           (name, mode, function, events, description, managed_by, run_as)
    SELECT subscription || '/' || (e->>'name'), 'async',
           pg_catalog.to_regprocedure((e->>'function') || '(jsonb)'),
           ARRAY(SELECT pg_catalog.jsonb_array_elements_text(e->'events')),
           e->>'description', 'listener', session_user::pg_catalog.regrole
      FROM pg_catalog.jsonb_array_elements(handlers) e
    ON CONFLICT (name) DO UPDATE
       SET function = excluded.function, events = excluded.events,
           description = excluded.description, updated_at = pg_catalog.now()
     WHERE h.managed_by = 'listener'
       AND (h.function, h.events, h.description)
           IS DISTINCT FROM (excluded.function, excluded.events, excluded.description);
END
$$;
REVOKE ALL ON FUNCTION domain_events.mirror_listener_handlers(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domain_events.mirror_listener_handlers(text, jsonb) TO domain_events_listener;

-- ---------------------------------------------------------------------------------------------
-- Raise-side figures: domain_events.raise_stats (events stored per aggregate and event type)
-- and domain_events.store_stats (store operations and their durations), counted in shared
-- memory by raise_counters() and store_counters(), readable by domain_events_reader.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION domain_events.raise_counters()
RETURNS TABLE ("aggregate_type" text, "event_type" text, "events" bigint)
STABLE STRICT PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'raise_counters_wrapper';

CREATE FUNCTION domain_events.store_counters()
RETURNS TABLE ("operations" bigint, "total_seconds" double precision,
               "bucket_le" double precision[], "bucket_operations" bigint[])
STABLE STRICT PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'store_counters_wrapper';

CREATE VIEW domain_events.raise_stats AS
SELECT c.aggregate_type, c.event_type, c.events
  FROM domain_events.raise_counters() c;
COMMENT ON VIEW domain_events.raise_stats IS
    'Events stored per aggregate type and event type in this database since server start (needs shared_preload_libraries).';
CREATE VIEW domain_events.store_stats AS
SELECT c.operations, c.total_seconds, c.bucket_le, c.bucket_operations
  FROM domain_events.store_counters() c;
COMMENT ON VIEW domain_events.store_stats IS
    'Store operations (raise_event, raise_events, capture statements) in this database since server start: count, total seconds, cumulative counts per duration bucket (needs shared_preload_libraries).';
REVOKE ALL ON FUNCTION domain_events.raise_counters(), domain_events.store_counters() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domain_events.raise_counters(), domain_events.store_counters()
    TO domain_events_reader, domain_events_admin;
GRANT SELECT ON domain_events.raise_stats, domain_events.store_stats
    TO domain_events_reader, domain_events_admin;
-- ---------------------------------------------------------------------------------------
-- The index of events by type orders them by position instead of occurred_at (as bootstrap.sql
-- does since 0.2.0): listing one type's events in position order, the console's type filter
-- and events_of_type(), is then one index range per partition. With (event_type, occurred_at)
-- a page either read every event of the type and sorted them, or walked the position index
-- past the other types, which for a rare type or one only recent events have is most of the
-- store. Rebuilding it holds a SHARE lock on the event table (raising waits) for about as long
-- as building an index over the store takes (docs/upgrading.md: pre-building it per partition).
DROP INDEX domain_events.event_type_idx;
CREATE INDEX event_type_idx ON domain_events.event (event_type, position);

-- ---------------------------------------------------------------------------------------
-- The operator console: domain_events.outbox() and an index of dead letters by
-- subscription and position; the role domain_events_console and redrive_dead_letter() (the same
-- as the end of finalize.sql).

-- The outbox of a subscription (0.2.0, docs/console.md): stored events with their delivery
-- status for that subscription's listener. Positions are taken at insert, not at commit, so
-- "position <= the subscription's position" is not "delivered": a transaction that held a lower
-- position and committed later would be shown delivered before it was. Status comes from the
-- snapshots the listener records instead: a transaction visible in a snapshot every event of
-- which was handled is delivered; the transition being delivered counts up to its position.
CREATE INDEX dead_letter_position_idx ON domain_events.dead_letter (subscription, position);

CREATE FUNCTION domain_events.outbox(
    subscription text, status text DEFAULT 'pending', max_entries integer DEFAULT 100,
    after_position bigint DEFAULT NULL)
RETURNS TABLE (
    "position" bigint, id uuid, aggregate_type text, aggregate_id text,
    aggregate_version bigint, event_type text, event_version integer, payload jsonb,
    metadata jsonb, occurred_at timestamptz, recorded_at timestamptz, entry_status text,
    handler text, last_error text, attempts integer, last_failed_at timestamptz,
    redrive_requested_at timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
-- A page is at most 10,000 entries: starting parallel workers costs more than they save (a
-- pending page over 10,000 candidates took twice as long with two).
SET max_parallel_workers_per_gather = 0
AS $outbox$
DECLARE
    sub domain_events.subscription;
    -- Every transaction visible in done is delivered; so is every one visible in also.
    done pg_snapshot;
    also pg_snapshot;
    -- The transition being delivered: visible in cur and at most cur_position.
    cur pg_snapshot;
    cur_position bigint;
    -- A recovering subscription's catch-up delivers transaction ids below this one only.
    below xid8;
    -- The status of event row e for the subscription, from the query's parameters.
    state constant text := $state$
        CASE WHEN EXISTS (SELECT 1 FROM domain_events.dead_letter l
                           WHERE l.subscription = $1 AND l.position = e.position
                             AND l.event_id = e.id)
             THEN 'dead_lettered'
             WHEN ($6 IS NULL OR e.txid < $6)
                  AND (COALESCE(pg_visible_in_snapshot(e.txid, $2), false)
                       OR COALESCE(pg_visible_in_snapshot(e.txid, $3), false)
                       OR (COALESCE(pg_visible_in_snapshot(e.txid, $4), false)
                           AND e.position <= $5))
             THEN 'delivered'
             ELSE 'pending'
        END$state$;
    -- The page: position, recorded_at, id and state of its entries, in position order.
    page text;
BEGIN
    IF outbox.status IS NULL OR outbox.status NOT IN ('pending', 'delivered', 'dead_lettered', 'all') THEN
        RAISE EXCEPTION 'invalid outbox status "%"', outbox.status
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'status must be pending, delivered, dead_lettered or all.',
                  HINT = 'pending: committed and not yet handled by the subscription''s listener.';
    END IF;
    IF outbox.max_entries IS NULL OR outbox.max_entries < 1 OR outbox.max_entries > 10000 THEN
        RAISE EXCEPTION 'invalid max_entries %', COALESCE(outbox.max_entries::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'max_entries must be between 1 and 10000.',
                  HINT = 'Page through longer lists with after_position (the last position of the previous page).';
    END IF;
    SELECT * INTO sub FROM domain_events.subscription s WHERE s.name = outbox.subscription;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription "%" does not exist', outbox.subscription
            USING ERRCODE = 'undefined_object',
                  DETAIL = 'A listener creates its subscription row when it first starts.',
                  HINT = 'SELECT name FROM domain_events.subscription lists the subscriptions.';
    END IF;
    IF sub.mode = 'notify' OR sub.recovery_started_at IS NOT NULL THEN
        -- Snapshot transitions (notify mode, or a replication subscription catching up after
        -- losing its slot): snapshot_prev was delivered, snapshot_cur up to position.
        done := sub.snapshot_prev;
        cur := sub.snapshot_cur;
        cur_position := sub.position;
        below := sub.recovery_until;
    ELSE
        -- Replication: the delivered snapshot, and the pending one once the confirmed LSN
        -- passed the WAL position read after it (the listener promotes it at its next save).
        done := sub.delivered_snapshot;
        IF sub.pending_lsn <= sub.lsn THEN
            also := sub.pending_snapshot;
        END IF;
    END IF;

    -- Pending and dead-lettered entries are few among many events, and known without reading
    -- the rest: pending ones are of transactions done does not show (ids at least done's
    -- xmin), dead-lettered ones have a dead letter. Those candidates are sorted first, without
    -- their payloads, and states are computed in position order only until the page is full
    -- (OFFSET 0 keeps the state filter above the sort). Planned as a whole set, they are read
    -- by those bounds, never by walking the position index from the start of the history in
    -- search of the first match, which for recent pending events read the whole store.
    IF outbox.status IN ('pending', 'dead_lettered') THEN
        page := format($page$
            SELECT s.position, s.recorded_at, s.id, s.state FROM (
                SELECT e.position, e.recorded_at, e.id, %s AS state
                  FROM (SELECT c.position, c.recorded_at, c.id, c.txid
                          FROM domain_events.event c
                         WHERE c.position > COALESCE($8, 0) AND %s
                         ORDER BY c.position OFFSET 0) e
            ) s
             WHERE s.state = $7
             ORDER BY s.position
             LIMIT $9$page$,
            state,
            CASE outbox.status
                WHEN 'pending' THEN $c$c.txid >= COALESCE(pg_snapshot_xmin($2), '0'::xid8)$c$
                ELSE $c$(c.position, c.id) IN (SELECT l.position, l.event_id
                                                FROM domain_events.dead_letter l
                                               WHERE l.subscription = $1)$c$
            END);
    ELSE
        -- Most events are delivered: the position index yields the page after a few reads.
        page := format($page$
            SELECT s.position, s.recorded_at, s.id, s.state FROM (
                SELECT e.position, e.recorded_at, e.id, %s AS state
                  FROM domain_events.event e
                 WHERE e.position > COALESCE($8, 0)
            ) s
             WHERE $7 = 'all' OR s.state = $7
             ORDER BY s.position
             LIMIT $9$page$, state);
    END IF;

    RETURN QUERY EXECUTE format($query$
        SELECT e.position, e.id, e.aggregate_type, e.aggregate_id, e.aggregate_version,
               e.event_type, e.event_version, e.payload, e.metadata, e.occurred_at,
               e.recorded_at, x.state, d.handler, d.error, d.attempts, d.last_failed_at,
               d.redrive_requested_at
          -- The page's positions and states first, then its rows (one partition each, by
          -- recorded_at), then the dead letters of its entries only: joined before the limit,
          -- the lookups ran for every candidate (10,000 pending cost ~140 ms).
          FROM (%s) x
          JOIN domain_events.event e
            ON e.position = x.position AND e.recorded_at = x.recorded_at AND e.id = x.id
          LEFT JOIN LATERAL (
            SELECT l.handler, l.error, l.attempts, l.last_failed_at, l.redrive_requested_at
              FROM domain_events.dead_letter l
             WHERE x.state = 'dead_lettered' AND l.subscription = $1
               AND l.position = x.position AND l.event_id = x.id
             ORDER BY l.last_failed_at DESC, l.handler
             LIMIT 1
          ) d ON true
         ORDER BY x.position
    $query$, page)
    USING outbox.subscription, done, also, cur, cur_position, below, outbox.status,
          outbox.after_position, outbox.max_entries;
END
$outbox$;
COMMENT ON FUNCTION domain_events.outbox(text, text, integer, bigint) IS
    'Stored events with their status for a subscription (pending, delivered, dead_lettered, or all), in position order after after_position; pending is exact: a transaction is delivered once the listener handled it, whatever its position.';
REVOKE ALL ON FUNCTION domain_events.outbox(text, text, integer, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domain_events.outbox(text, text, integer, bigint) TO domain_events_reader;

-- The operator console's role (docs/console.md): it reads what domain_events_reader reads and
-- writes nothing, except a redrive request for one dead letter through
-- redrive_dead_letter(). Roles are cluster-wide: another database may have created it already.
DO $console_role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'domain_events_console') THEN
        BEGIN
            CREATE ROLE domain_events_console NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$console_role$;
GRANT domain_events_reader TO domain_events_console;

CREATE FUNCTION domain_events.redrive_dead_letter(subscription text, event_id uuid)
RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH requested AS (
        UPDATE domain_events.dead_letter d
           SET redrive_requested_at = pg_catalog.now()
         WHERE d.subscription = $1 AND d.event_id = $2
        RETURNING 1
    )
    SELECT pg_catalog.count(*)::integer FROM requested
$$;
COMMENT ON FUNCTION domain_events.redrive_dead_letter(text, uuid) IS
    'Marks the dead letters of one event of a subscription for redelivery (as redrive(), with the extension owner''s rights, for roles that may not update dead_letter); returns how many.';
REVOKE ALL ON FUNCTION domain_events.redrive_dead_letter(text, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domain_events.redrive_dead_letter(text, uuid) TO domain_events_console;
