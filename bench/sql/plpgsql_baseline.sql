-- Baseline (c) of the store benchmark: the raise_event / raise_events contract of
-- docs/sql-api.md written in PL/pgSQL, as a careful PL/pgSQL author would write it:
--
--   * the same monthly-partitioned event table (same columns, same four indexes), a partition
--     created on demand under an advisory lock, a default partition as the safety net;
--   * stream heads with one upsert per aggregate: gap-free versions, the row lock serialising
--     the writers of one aggregate, expected_version checked against the version before each
--     event (SQLSTATE 40001, the documented message);
--   * the same validation: names, ids, JSON objects, documented metadata keys, payload size,
--     versions, finite times, unknown/missing keys of batch items, NULLs (22004/22023);
--   * ids from gen_random_uuid() (PostgreSQL 15 has no uuidv7()), position from a sequence,
--     recorded_at = now(), txid = pg_current_xact_id();
--   * the enabled / notify switches, read from settings like the extension's GUCs;
--   * SECURITY DEFINER with a pinned search_path.
--
-- The batch is set-based (one validation query, one statement that upserts the heads and
-- inserts every event), not a loop calling raise_event per item, so the comparison is with
-- the best PL/pgSQL, not a strawman.
CREATE SCHEMA bench_plpgsql;

CREATE SEQUENCE bench_plpgsql.event_position_seq;

CREATE TABLE bench_plpgsql.event (
    position          bigint      NOT NULL DEFAULT nextval('bench_plpgsql.event_position_seq'),
    id                uuid        NOT NULL,
    aggregate_type    text        NOT NULL,
    aggregate_id      text        NOT NULL,
    aggregate_version bigint      NOT NULL,
    event_type        text        NOT NULL,
    event_version     int         NOT NULL DEFAULT 1,
    payload           jsonb       NOT NULL DEFAULT '{}',
    metadata          jsonb       NOT NULL DEFAULT '{}',
    occurred_at       timestamptz NOT NULL DEFAULT now(),
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    txid              xid8        NOT NULL DEFAULT pg_current_xact_id()
) PARTITION BY RANGE (recorded_at);

CREATE INDEX event_position_idx ON bench_plpgsql.event (position);
CREATE INDEX event_stream_idx ON bench_plpgsql.event (aggregate_type, aggregate_id, aggregate_version);
CREATE INDEX event_type_idx ON bench_plpgsql.event (event_type, position);
CREATE INDEX event_txid_idx ON bench_plpgsql.event (txid);

CREATE TABLE bench_plpgsql.event_default PARTITION OF bench_plpgsql.event DEFAULT;

CREATE TABLE bench_plpgsql.aggregate (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    version        bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Names: 1-100 ASCII characters, dot-separated segments, each a letter then letters, digits,
-- '_' or '-'.
CREATE FUNCTION bench_plpgsql.valid_name(n text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN octet_length(n) BETWEEN 1 AND 100
       AND n ~ '^[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z][A-Za-z0-9_-]*)*$';

-- Aggregate ids: 1-200 characters, no control characters.
CREATE FUNCTION bench_plpgsql.valid_id(id text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN char_length(id) BETWEEN 1 AND 200 AND id !~ '[\x01-\x1f\x7f-\x9f]';

-- Metadata: an object whose documented keys, when present, are strings or numbers.
CREATE FUNCTION bench_plpgsql.valid_metadata(m jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN jsonb_typeof(m) = 'object'
       AND coalesce(jsonb_typeof(m -> 'actor'), 'string') IN ('string', 'number')
       AND coalesce(jsonb_typeof(m -> 'correlation_id'), 'string') IN ('string', 'number')
       AND coalesce(jsonb_typeof(m -> 'causation_id'), 'string') IN ('string', 'number')
       AND coalesce(jsonb_typeof(m -> 'tenant_id'), 'string') IN ('string', 'number')
       AND coalesce(jsonb_typeof(m -> 'source'), 'string') IN ('string', 'number');

-- The on/off/read_only switch; like the extension's GUC, off makes raising a no-op.
CREATE FUNCTION bench_plpgsql.enabled() RETURNS text
    LANGUAGE sql STABLE
    RETURN coalesce(nullif(current_setting('bench_plpgsql.enabled', true), ''), 'on');

CREATE FUNCTION bench_plpgsql.max_payload_bytes() RETURNS int
    LANGUAGE sql STABLE
    RETURN coalesce(nullif(current_setting('bench_plpgsql.max_payload_bytes', true), '')::int,
                    1048576);

-- The monthly (UTC) partition holding `ts`, created on demand under an advisory lock.
CREATE FUNCTION bench_plpgsql.ensure_partition(ts timestamptz) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    month_start timestamp := date_trunc('month', ts AT TIME ZONE 'UTC');
    part text := 'event_p' || to_char(month_start, 'YYYYMM');
BEGIN
    IF to_regclass('bench_plpgsql.' || part) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('bench_plpgsql.partition'));
    IF to_regclass('bench_plpgsql.' || part) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE bench_plpgsql.%I PARTITION OF bench_plpgsql.event FOR VALUES FROM (%L) TO (%L)',
            part, month_start AT TIME ZONE 'UTC', (month_start + interval '1 month') AT TIME ZONE 'UTC');
    END IF;
END
$$;

CREATE FUNCTION bench_plpgsql.raise_event(
    aggregate_type   text,
    aggregate_id     text,
    event_type       text,
    payload          jsonb       DEFAULT '{}',
    metadata         jsonb       DEFAULT '{}',
    expected_version bigint      DEFAULT NULL,
    occurred_at      timestamptz DEFAULT now(),
    event_version    int         DEFAULT 1
) RETURNS TABLE (id uuid, "position" bigint, aggregate_version bigint, recorded_at timestamptz)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    switch text := bench_plpgsql.enabled();
    new_id uuid := gen_random_uuid();
    new_version bigint;
    new_position bigint;
BEGIN
    IF raise_event.aggregate_type IS NULL OR raise_event.aggregate_id IS NULL
       OR raise_event.event_type IS NULL OR raise_event.payload IS NULL
       OR raise_event.metadata IS NULL OR raise_event.occurred_at IS NULL
       OR raise_event.event_version IS NULL THEN
        RAISE EXCEPTION 'raise_event: arguments must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF switch = 'off' THEN
        RETURN;
    ELSIF switch = 'read_only' THEN
        RAISE EXCEPTION 'event recording is read-only' USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    IF NOT bench_plpgsql.valid_name(raise_event.aggregate_type) THEN
        RAISE EXCEPTION 'invalid aggregate_type %', quote_literal(raise_event.aggregate_type)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT bench_plpgsql.valid_name(raise_event.event_type) THEN
        RAISE EXCEPTION 'invalid event_type %', quote_literal(raise_event.event_type)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT bench_plpgsql.valid_id(raise_event.aggregate_id) THEN
        RAISE EXCEPTION 'invalid aggregate_id' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(raise_event.payload) <> 'object' THEN
        RAISE EXCEPTION 'payload must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(raise_event.payload::text) > bench_plpgsql.max_payload_bytes() THEN
        RAISE EXCEPTION 'payload is over max_payload_bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT bench_plpgsql.valid_metadata(raise_event.metadata) THEN
        RAISE EXCEPTION 'invalid metadata' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF raise_event.expected_version < 0 OR raise_event.event_version < 1
       OR NOT isfinite(raise_event.occurred_at) THEN
        RAISE EXCEPTION 'invalid version or occurred_at' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    PERFORM bench_plpgsql.ensure_partition(now());

    INSERT INTO bench_plpgsql.aggregate AS a (aggregate_type, aggregate_id, version, updated_at)
    VALUES (raise_event.aggregate_type, raise_event.aggregate_id, 1, now())
    ON CONFLICT (aggregate_type, aggregate_id)
        DO UPDATE SET version = a.version + 1, updated_at = now()
    RETURNING a.version INTO new_version;

    IF raise_event.expected_version IS NOT NULL
       AND raise_event.expected_version <> new_version - 1 THEN
        RAISE EXCEPTION 'aggregate %/% is at version %, expected %', raise_event.aggregate_type,
            raise_event.aggregate_id, new_version - 1, raise_event.expected_version
            USING ERRCODE = 'serialization_failure';
    END IF;

    INSERT INTO bench_plpgsql.event (id, aggregate_type, aggregate_id, aggregate_version,
                                     event_type, event_version, payload, metadata, occurred_at)
    VALUES (new_id, raise_event.aggregate_type, raise_event.aggregate_id, new_version,
            raise_event.event_type, raise_event.event_version, raise_event.payload,
            raise_event.metadata, raise_event.occurred_at)
    RETURNING position INTO new_position;

    IF current_setting('bench_plpgsql.notify', true) = 'on' THEN
        PERFORM pg_notify('bench_plpgsql', '');
    END IF;

    id := new_id;
    "position" := new_position;
    aggregate_version := new_version;
    recorded_at := now();
    RETURN NEXT;
END
$$;

CREATE TYPE bench_plpgsql.raised AS (
    ord bigint, id uuid, "position" bigint, version bigint, expected bigint,
    aggregate_type text, aggregate_id text
);

CREATE FUNCTION bench_plpgsql.raise_events(events jsonb)
    RETURNS TABLE (id uuid, "position" bigint, aggregate_version bigint, recorded_at timestamptz)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    switch text := bench_plpgsql.enabled();
    max_bytes int := bench_plpgsql.max_payload_bytes();
    bad_ord bigint;
    problem text;
    raised bench_plpgsql.raised[];
    r bench_plpgsql.raised;
BEGIN
    IF events IS NULL THEN
        RAISE EXCEPTION 'raise_events: events must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF switch = 'off' THEN
        RETURN;
    ELSIF switch = 'read_only' THEN
        RAISE EXCEPTION 'event recording is read-only' USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    IF jsonb_typeof(events) <> 'array' THEN
        RAISE EXCEPTION 'raise_events expects a JSON array' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Validate every item in one pass; report the first bad one.
    SELECT v.ord, v.problem INTO bad_ord, problem
      FROM (SELECT x.ord, CASE
                WHEN jsonb_typeof(x.e) <> 'object' THEN 'not an object'
                WHEN (x.e - '{aggregate_type,aggregate_id,event_type,payload,metadata,expected_version,occurred_at,event_version}'::text[]) <> '{}'::jsonb
                    THEN 'unknown key'
                WHEN NOT (x.e ? 'aggregate_type' AND x.e ? 'aggregate_id' AND x.e ? 'event_type')
                    THEN 'missing required key'
                WHEN jsonb_typeof(x.e -> 'aggregate_type') <> 'string'
                     OR NOT bench_plpgsql.valid_name(x.e ->> 'aggregate_type') THEN 'invalid aggregate_type'
                WHEN jsonb_typeof(x.e -> 'event_type') <> 'string'
                     OR NOT bench_plpgsql.valid_name(x.e ->> 'event_type') THEN 'invalid event_type'
                WHEN NOT CASE jsonb_typeof(x.e -> 'aggregate_id')
                             WHEN 'string' THEN bench_plpgsql.valid_id(x.e ->> 'aggregate_id')
                             WHEN 'number' THEN (x.e ->> 'aggregate_id') ~ '^-?[0-9]{1,19}$'
                             ELSE false END THEN 'invalid aggregate_id'
                WHEN x.e ? 'payload' AND (jsonb_typeof(x.e -> 'payload') <> 'object'
                     OR octet_length((x.e -> 'payload')::text) > max_bytes) THEN 'invalid payload'
                WHEN x.e ? 'metadata' AND NOT bench_plpgsql.valid_metadata(x.e -> 'metadata')
                    THEN 'invalid metadata'
                WHEN x.e ? 'expected_version' AND (jsonb_typeof(x.e -> 'expected_version') <> 'number'
                     OR (x.e ->> 'expected_version') !~ '^[0-9]{1,18}$') THEN 'invalid expected_version'
                WHEN x.e ? 'event_version' AND (jsonb_typeof(x.e -> 'event_version') <> 'number'
                     OR (x.e ->> 'event_version') !~ '^[0-9]{1,9}$'
                     OR (x.e ->> 'event_version')::int < 1) THEN 'invalid event_version'
                WHEN x.e ? 'occurred_at' AND (jsonb_typeof(x.e -> 'occurred_at') <> 'string'
                     OR (x.e ->> 'occurred_at') !~ '^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$')
                    THEN 'invalid occurred_at'
                END AS problem
              FROM jsonb_array_elements(events) WITH ORDINALITY AS x(e, ord)) v
     WHERE v.problem IS NOT NULL
     ORDER BY v.ord
     LIMIT 1;
    IF bad_ord IS NOT NULL THEN
        RAISE EXCEPTION 'raise_events: item % is invalid: %', bad_ord, problem
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    PERFORM bench_plpgsql.ensure_partition(now());

    -- One statement: upsert every head once (in key order, against deadlocks), number the
    -- items of each aggregate from its new head down, insert the events in input order.
    WITH items AS MATERIALIZED (
        SELECT x.ord,
               x.e ->> 'aggregate_type' AS aggregate_type,
               x.e ->> 'aggregate_id' AS aggregate_id,
               x.e ->> 'event_type' AS event_type,
               coalesce(x.e -> 'payload', '{}') AS payload,
               coalesce(x.e -> 'metadata', '{}') AS metadata,
               (x.e ->> 'expected_version')::bigint AS expected,
               coalesce((x.e ->> 'occurred_at')::timestamptz, now()) AS occurred_at,
               coalesce((x.e ->> 'event_version')::int, 1) AS event_version,
               gen_random_uuid() AS id
          FROM jsonb_array_elements(events) WITH ORDINALITY AS x(e, ord)
    ), heads AS (
        INSERT INTO bench_plpgsql.aggregate AS a (aggregate_type, aggregate_id, version, updated_at)
        SELECT i.aggregate_type, i.aggregate_id, count(*), now()
          FROM items i
         GROUP BY i.aggregate_type, i.aggregate_id
         ORDER BY i.aggregate_type, i.aggregate_id
        ON CONFLICT (aggregate_type, aggregate_id)
            DO UPDATE SET version = a.version + excluded.version, updated_at = now()
        RETURNING a.aggregate_type, a.aggregate_id, a.version
    ), numbered AS (
        SELECT i.*,
               h.version - count(*) OVER w + row_number() OVER (w ORDER BY i.ord) AS version
          FROM items i
          JOIN heads h USING (aggregate_type, aggregate_id)
        WINDOW w AS (PARTITION BY i.aggregate_type, i.aggregate_id)
    ), inserted AS (
        INSERT INTO bench_plpgsql.event (id, aggregate_type, aggregate_id, aggregate_version,
                                         event_type, event_version, payload, metadata, occurred_at)
        SELECT n.id, n.aggregate_type, n.aggregate_id, n.version, n.event_type, n.event_version,
               n.payload, n.metadata, n.occurred_at
          FROM numbered n
         ORDER BY n.ord
        RETURNING id, position
    )
    SELECT array_agg((n.ord, n.id, ins.position, n.version, n.expected, n.aggregate_type,
                      n.aggregate_id)::bench_plpgsql.raised ORDER BY n.ord)
      INTO raised
      FROM numbered n
      JOIN inserted ins USING (id);

    IF raised IS NULL THEN
        RETURN;
    END IF;
    FOREACH r IN ARRAY raised LOOP
        IF r.expected IS NOT NULL AND r.expected <> r.version - 1 THEN
            -- The exception undoes the whole statement: all or nothing.
            RAISE EXCEPTION 'aggregate %/% is at version %, expected %', r.aggregate_type,
                r.aggregate_id, r.version - 1, r.expected USING ERRCODE = 'serialization_failure';
        END IF;
    END LOOP;

    IF current_setting('bench_plpgsql.notify', true) = 'on' THEN
        PERFORM pg_notify('bench_plpgsql', '');
    END IF;

    FOREACH r IN ARRAY raised LOOP
        id := r.id;
        "position" := r."position";
        aggregate_version := r.version;
        recorded_at := now();
        RETURN NEXT;
    END LOOP;
END
$$;

SELECT bench_plpgsql.ensure_partition(now());
