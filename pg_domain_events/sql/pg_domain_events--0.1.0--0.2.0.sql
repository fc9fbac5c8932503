-- pg_domain_events 0.1.0 → 0.2.0, run by ALTER EXTENSION pg_domain_events UPDATE.
--
-- Every change this release makes to the extension's SQL surface, so that a database created
-- at 0.1.0 ends up with exactly what CREATE EXTENSION gives at 0.2.0 (tests/tests/upgrade.rs
-- compares the two catalogs). A released script is never edited: mistakes are corrected in
-- the next upgrade script.
--
-- Changes:
--   * domain_events.subscription: columns for recovering from a lost replication slot without
--     a gap. Positions are taken at insert, not at commit, so "events after the last
--     position" skips a transaction that took a lower position and committed after the slot
--     was lost; the listener now keeps a delivered snapshot (every transaction visible in it was
--     handled) and the state of a recovery in progress. Added at the end of the table, as a
--     fresh install has them. A listener older than 0.2.0 never reads or writes them.
--   * domain_events.subscription_lag: a `recovering` column (a subscription catching up after
--     losing its slot). Added at the end of the view, so CREATE OR REPLACE keeps its columns.

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
