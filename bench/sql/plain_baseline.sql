-- Baseline (b) of the store benchmark: the same rows in an equivalent table, written with a
-- plain multi-row INSERT. Same columns, types and defaults as domain_events.event and the same
-- four indexes, but one unpartitioned table, no stream heads, no validation: the client
-- supplies the aggregate versions. This is the floor the extension is compared with.
CREATE SCHEMA bench_plain;

CREATE SEQUENCE bench_plain.event_position_seq;

CREATE TABLE bench_plain.event (
    position          bigint      NOT NULL DEFAULT nextval('bench_plain.event_position_seq'),
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
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
);

CREATE INDEX event_position_idx ON bench_plain.event (position);
CREATE INDEX event_stream_idx ON bench_plain.event (aggregate_type, aggregate_id, aggregate_version);
CREATE INDEX event_type_idx ON bench_plain.event (event_type, position);
CREATE INDEX event_txid_idx ON bench_plain.event (txid);
