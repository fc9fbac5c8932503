-- pg_domain_events: objects that need the Rust functions, then privileges.

CREATE TRIGGER event_immutable BEFORE UPDATE OR DELETE ON domain_events.event
    FOR EACH ROW EXECUTE FUNCTION domain_events.refuse_event_change();
CREATE TRIGGER event_no_truncate BEFORE TRUNCATE ON domain_events.event
    FOR EACH STATEMENT EXECUTE FUNCTION domain_events.refuse_event_change();
-- Statement triggers are not cloned to partitions: each partition gets its own.
CREATE TRIGGER event_no_truncate BEFORE TRUNCATE ON domain_events.event_default
    FOR EACH STATEMENT EXECUTE FUNCTION domain_events.refuse_event_change();
-- ALWAYS: they fire with session_replication_role = replica too, the switch that silences
-- ordinary triggers (restore and replication tools set it; so can a superuser). The row trigger's
-- setting is carried to every partition, existing and future; each TRUNCATE guard gets its own.
ALTER TABLE domain_events.event ENABLE ALWAYS TRIGGER event_immutable;
ALTER TABLE domain_events.event ENABLE ALWAYS TRIGGER event_no_truncate;
ALTER TABLE domain_events.event_default ENABLE ALWAYS TRIGGER event_no_truncate;

-- The current month and domain_events.premake_months ahead exist from the start, so the first
-- raise_event of a new database does not create a partition inside the caller's transaction
-- (which would lock the event table until that transaction ends).
SELECT count(*) FROM domain_events.maintain();

-- raise_event for uuid and bigint aggregate ids: ids are stored as text.
CREATE FUNCTION domain_events.raise_event(
    aggregate_type text, aggregate_id uuid, event_type text,
    payload jsonb DEFAULT '{}', metadata jsonb DEFAULT '{}', expected_version bigint DEFAULT NULL,
    occurred_at timestamptz DEFAULT now(), event_version integer DEFAULT 1)
RETURNS TABLE (id uuid, "position" bigint, aggregate_version bigint, recorded_at timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM domain_events.raise_event($1, $2::text, $3, $4, $5, $6, $7, $8) $$;

CREATE FUNCTION domain_events.raise_event(
    aggregate_type text, aggregate_id bigint, event_type text,
    payload jsonb DEFAULT '{}', metadata jsonb DEFAULT '{}', expected_version bigint DEFAULT NULL,
    occurred_at timestamptz DEFAULT now(), event_version integer DEFAULT 1)
RETURNS TABLE (id uuid, "position" bigint, aggregate_version bigint, recorded_at timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM domain_events.raise_event($1, $2::text, $3, $4, $5, $6, $7, $8) $$;

-- Reads run with the caller's rights: domain_events_reader may read the tables.
CREATE FUNCTION domain_events.aggregate_events(
    aggregate_type text, aggregate_id text, from_version bigint DEFAULT 1)
RETURNS SETOF domain_events.event
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM domain_events.event e
     WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.aggregate_version >= $3
     ORDER BY e.aggregate_version
$$;

CREATE FUNCTION domain_events.events_after(after_position bigint, max_events integer DEFAULT 1000)
RETURNS SETOF domain_events.event
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM domain_events.event e WHERE e.position > $1 ORDER BY e.position LIMIT $2
$$;

CREATE FUNCTION domain_events.events_of_type(event_type text, since timestamptz DEFAULT '-infinity')
RETURNS SETOF domain_events.event
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM domain_events.event e
     WHERE e.event_type = $1 AND e.occurred_at >= $2
     ORDER BY e.position
$$;

-- Writers need the current version for optimistic concurrency but no table privilege.
CREATE FUNCTION domain_events.aggregate_version(aggregate_type text, aggregate_id text)
RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT COALESCE((SELECT a.version FROM domain_events.aggregate a
                      WHERE a.aggregate_type = $1 AND a.aggregate_id = $2), 0)
$$;

-- Dead letters: ask the subscription's listener to deliver them again (all, or one event).
-- Runs with the caller's rights: it needs UPDATE on dead_letter (domain_events_listener).
CREATE FUNCTION domain_events.redrive(subscription text, event_id uuid DEFAULT NULL)
RETURNS integer
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    WITH requested AS (
        UPDATE domain_events.dead_letter d
           SET redrive_requested_at = pg_catalog.now()
         WHERE d.subscription = $1 AND ($2 IS NULL OR d.event_id = $2)
        RETURNING 1
    )
    SELECT pg_catalog.count(*)::integer FROM requested
$$;
COMMENT ON FUNCTION domain_events.redrive(text, uuid) IS
    'Marks dead letters of a subscription (all, or those of one event) for redelivery by its listener; returns how many.';

-- Least privilege: nothing is executable by PUBLIC; each role gets exactly its functions.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA domain_events FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA domain_events FROM PUBLIC;
GRANT USAGE ON SCHEMA domain_events
    TO domain_events_writer, domain_events_reader, domain_events_listener;

GRANT EXECUTE ON FUNCTION
    domain_events.raise_event(text, text, text, jsonb, jsonb, bigint, timestamptz, integer),
    domain_events.raise_event(text, uuid, text, jsonb, jsonb, bigint, timestamptz, integer),
    domain_events.raise_event(text, bigint, text, jsonb, jsonb, bigint, timestamptz, integer),
    domain_events.raise_events(jsonb),
    domain_events.aggregate_version(text, text)
    TO domain_events_writer;

GRANT SELECT ON domain_events.event, domain_events.aggregate, domain_events.subscription,
    domain_events.dead_letter TO domain_events_reader;
GRANT EXECUTE ON FUNCTION
    domain_events.aggregate_events(text, text, bigint),
    domain_events.events_after(bigint, integer),
    domain_events.events_of_type(text, timestamptz),
    domain_events.aggregate_version(text, text)
    TO domain_events_reader;

GRANT domain_events_reader TO domain_events_listener;
GRANT INSERT, UPDATE ON domain_events.subscription TO domain_events_listener;
-- DELETE: a dead letter redriven successfully is removed.
GRANT INSERT, UPDATE, DELETE ON domain_events.dead_letter TO domain_events_listener;
GRANT EXECUTE ON FUNCTION domain_events.redrive(text, uuid) TO domain_events_listener;
GRANT USAGE ON SEQUENCE domain_events.dead_letter_id_seq TO domain_events_listener;

-- Table capture: the trigger requires the changing user's EXECUTE on raise_events, so tracking
-- grants nothing; track() also needs the table's TRIGGER privilege. Tracking is a way of
-- raising, so it belongs to domain_events_writer.
CREATE VIEW domain_events.tracked_tables AS
SELECT t.tgrelid::regclass AS table_name,
       -- tgargs holds the one argument, NUL-terminated
       pg_catalog.convert_from(pg_catalog.substr(t.tgargs, 1, pg_catalog.length(t.tgargs) - 1),
                               'UTF8')::jsonb AS config
  FROM pg_catalog.pg_trigger t
 WHERE t.tgname = 'domain_events_capture' AND NOT t.tgisinternal;
GRANT SELECT ON domain_events.tracked_tables TO domain_events_reader;
CREATE FUNCTION domain_events.track(
    tbl regclass, aggregate_type text, id_column name DEFAULT 'id', columns name[] DEFAULT NULL,
    ignore_columns name[] DEFAULT '{}', column_events jsonb DEFAULT '{}', id_columns name[] DEFAULT NULL)
RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT domain_events.track_relation($1::oid, $2, $3::text, $4::text[], $5::text[], $6, $7::text[]) $$;

CREATE FUNCTION domain_events.untrack(tbl regclass) RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT domain_events.untrack_relation($1::oid) $$;

GRANT EXECUTE ON FUNCTION
    domain_events.track(regclass, text, name, name[], name[], jsonb, name[]),
    domain_events.track_relation(oid, text, text, text[], text[], jsonb, text[]),
    domain_events.untrack_relation(oid),
    domain_events.untrack(regclass),
    domain_events.capture_row_change()
    TO domain_events_writer;
REVOKE ALL ON FUNCTION domain_events.track(regclass, text, name, name[], name[], jsonb, name[]),
    domain_events.untrack(regclass) FROM PUBLIC;

-- Operations views, readable by domain_events_reader.
-- Events per type and hour. It aggregates the whole table: filter on `hour` (and expect a scan
-- of the partitions involved) rather than reading it unfiltered on a large store.
CREATE VIEW domain_events.stats AS
SELECT e.event_type,
       pg_catalog.date_trunc('hour', e.recorded_at) AS hour,
       pg_catalog.count(*) AS events,
       pg_catalog.sum(pg_catalog.pg_column_size(e.payload))::bigint AS payload_bytes
  FROM domain_events.event e
 GROUP BY 1, 2;

-- How far each subscription is behind. Replication mode: WAL bytes between the server's
-- current position and the subscription's confirmed commit LSN, the WAL its slot retains, and
-- (as an estimate: positions are not commit-ordered) events past its last handled position.
-- Notify mode: exactly the committed events its next snapshot transition will deliver.
-- recovering: a replication-mode subscription is catching up after losing its slot.
CREATE VIEW domain_events.subscription_lag AS
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

GRANT SELECT ON domain_events.stats, domain_events.subscription_lag TO domain_events_reader;

-- Event contracts (0.2.0): a JSON Schema per event type and version (docs/schemas.md).
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

-- Raise-side figures (0.2.0): events stored per aggregate and event type, and the duration of
-- store operations, counted in shared memory (shared_preload_libraries = 'pg_domain_events')
-- at statement time: events of transactions that roll back afterwards count too, and no writer
-- waits for another to count. Without preloading the views are empty / zero. The listener
-- exports them as metrics; postgres_exporter users can query them directly.
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
