-- pg_domain_events 0.1.0 → 0.2.0, run by ALTER EXTENSION pg_domain_events UPDATE.
--
-- Every change this release makes to the extension's SQL surface, so that a database created
-- at 0.1.0 ends up with exactly what CREATE EXTENSION gives at 0.2.0 (tests/tests/upgrade.rs
-- compares the two catalogs). A released script is never edited: mistakes are corrected in
-- the next upgrade script.
--
-- Changes:
--   (none yet)

\echo Use "ALTER EXTENSION pg_domain_events UPDATE TO '0.2.0'" to load this file. \quit
