-- pg_domain_events: schema objects created before the Rust functions.
-- The schema itself (domain_events) is created by CREATE EXTENSION from the control file.

-- Roles are cluster-wide and outlive the extension: create them once, reuse them in every database.
-- Two databases may run CREATE EXTENSION at the same moment; the loser of that race sees a
-- unique violation on pg_authid rather than duplicate_object, and both mean "already there".
DO $roles$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['domain_events_writer', 'domain_events_reader', 'domain_events_listener', 'domain_events_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$roles$;

CREATE SEQUENCE domain_events.event_position_seq AS bigint;

CREATE TABLE domain_events.event (
    position          bigint      NOT NULL DEFAULT pg_catalog.nextval('domain_events.event_position_seq'),
    id                uuid        NOT NULL,
    aggregate_type    text        NOT NULL,
    aggregate_id      text        NOT NULL,
    aggregate_version bigint      NOT NULL,
    event_type        text        NOT NULL,
    event_version     integer     NOT NULL DEFAULT 1,
    payload           jsonb       NOT NULL DEFAULT '{}',
    metadata          jsonb       NOT NULL DEFAULT '{}',
    occurred_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    recorded_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    txid              xid8        NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    CONSTRAINT event_payload_is_object CHECK (pg_catalog.jsonb_typeof(payload) = 'object'),
    CONSTRAINT event_metadata_is_object CHECK (pg_catalog.jsonb_typeof(metadata) = 'object'),
    CONSTRAINT event_version_positive CHECK (aggregate_version >= 1 AND event_version >= 1)
) PARTITION BY RANGE (recorded_at);

ALTER SEQUENCE domain_events.event_position_seq OWNED BY domain_events.event.position;

COMMENT ON TABLE domain_events.event IS
    'Append-only event store, one partition per month of recorded_at. Raise events with domain_events.raise_event().';

CREATE INDEX event_position_idx ON domain_events.event (position);
CREATE INDEX event_aggregate_idx ON domain_events.event (aggregate_type, aggregate_id, aggregate_version);
-- Events of one type in position order (the console's type filter, events_of_type): a page is
-- one index range per partition, however rare or recent the type.
CREATE INDEX event_type_idx ON domain_events.event (event_type, position);
-- Notify-mode listeners read the events that became visible between two snapshots by txid range.
CREATE INDEX event_txid_idx ON domain_events.event (txid);

CREATE TABLE domain_events.aggregate (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    version        bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);
COMMENT ON TABLE domain_events.aggregate IS
    'Stream heads: the current version of every aggregate; its row lock serialises writers of one aggregate.';

CREATE TABLE domain_events.subscription (
    name       text        PRIMARY KEY,
    mode       text        NOT NULL CHECK (mode IN ('replication', 'notify')),
    position   bigint      NOT NULL DEFAULT 0,
    lsn        pg_lsn,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Notify mode: events visible in snapshot_cur but not in snapshot_prev are being delivered
    -- (transition number `transition`, up to `position`); snapshot_cur is NULL between transitions.
    snapshot_prev pg_snapshot,
    snapshot_cur  pg_snapshot,
    transition    bigint      NOT NULL DEFAULT 0,
    -- Replication mode (0.2.0): every transaction visible in delivered_snapshot has been handled,
    -- so a lost slot is recovered from without a gap by delivering what it does not see. The
    -- listener proposes pending_snapshot with the WAL insert position read after it and promotes
    -- it once its confirmed lsn reaches pending_lsn. While a recovery runs (recovery_started_at
    -- set), snapshot_prev/snapshot_cur/position track its snapshot transitions, recovery_lsn is
    -- the new slot's consistent point and recovery_until the first transaction id it delivers.
    delivered_snapshot  pg_snapshot,
    pending_snapshot    pg_snapshot,
    pending_lsn         pg_lsn,
    recovery_started_at timestamptz,
    recovery_lsn        pg_lsn,
    recovery_until      xid8
);
COMMENT ON TABLE domain_events.subscription IS
    'One row per listener subscription: its durable high-water mark (position and commit LSN).';

CREATE TABLE domain_events.dead_letter (
    id              bigserial   PRIMARY KEY,
    subscription    text        NOT NULL,
    handler         text        NOT NULL,
    event_id        uuid        NOT NULL,
    position        bigint      NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL,
    first_failed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_failed_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Set by redrive(); the subscription's listener re-delivers the event and clears it.
    redrive_requested_at timestamptz,
    UNIQUE (subscription, handler, event_id)
);
-- The listener looks for the requested rows of its subscription.
CREATE INDEX dead_letter_redrive_idx ON domain_events.dead_letter (subscription)
    WHERE redrive_requested_at IS NOT NULL;
COMMENT ON TABLE domain_events.dead_letter IS
    'Events a listener handler gave up on after its retries; redrive them once the cause is fixed.';

-- Event contracts (0.2.0): one JSON Schema per event type and version, enforced by every raising
-- path. A registered version is immutable (a trigger refuses UPDATE, see finalize.sql).
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

-- Handlers in the database (0.2.0): a registry of SQL functions called with each matching event,
-- either inside the raising transaction (sync) or by the listener after commit (async).
-- Rows are written by register_handler() and friends, never directly (see finalize.sql).
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

-- The safety net for direct INSERTs outside every monthly partition; maintain() moves its rows
-- into their monthly partitions. (Immutability triggers are created in finalize.sql, once the
-- trigger function exists.)
CREATE TABLE domain_events.event_default PARTITION OF domain_events.event DEFAULT;

-- Extension tables are skipped by pg_dump unless registered: keep their rows in backups.
SELECT pg_catalog.pg_extension_config_dump('domain_events.event_default', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.aggregate', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.subscription', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.event_schema', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.handler', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.handler_log', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.event_position_seq', '');
SELECT pg_catalog.pg_extension_config_dump('domain_events.dead_letter_id_seq', '');
