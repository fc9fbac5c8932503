-- pg_domain_events from plain SQL: a business change and its event commit together, and a
-- failed transaction leaves neither. Every expectation is checked; a broken one stops the script
-- with an error (exit status 3).
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f examples/psql/demo.sql

\set ON_ERROR_STOP 1
\set QUIET 1
-- Checks print as plain "ok: ..." lines.
\pset tuples_only on
\pset format unaligned
SET client_min_messages = warning;

CREATE EXTENSION IF NOT EXISTS pg_domain_events;

CREATE TABLE IF NOT EXISTS loan_application (
    id        uuid PRIMARY KEY,
    applicant text NOT NULL,
    amount    numeric NOT NULL CHECK (amount > 0),
    status    text NOT NULL
);

-- check(condition, what): raises, and so ends the script, unless condition is true.
-- pg_temp: lives and dies with this session, leaves nothing in the database.
CREATE FUNCTION pg_temp.check(ok boolean, what text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'check failed: %', what;
    END IF;
    RETURN 'ok: ' || what;
END $$;

-- Fresh ids on every run, so the script can run again on the same database.
SELECT gen_random_uuid() AS loan_id, gen_random_uuid() AS doomed_id \gset

\echo '1. Ada applies for a loan: the row and LoanApplied commit together'
BEGIN;
-- Who did it: fills metadata.actor of this transaction's events (their own metadata lacks it).
SET LOCAL domain_events.actor = 'loan-officer-7';
INSERT INTO loan_application VALUES (:'loan_id', 'Ada', 100000, 'submitted');
SELECT aggregate_version AS applied_version
  FROM domain_events.raise_event('Loan', :'loan_id'::uuid, 'LoanApplied',
           jsonb_build_object('applicant', 'Ada', 'amount', 100000),
           '{"source": "psql-demo"}',
           expected_version => 0) \gset
COMMIT;

\echo '2. The loan is approved: expected_version guards against a concurrent change'
BEGIN;
SET LOCAL domain_events.actor = 'loan-officer-7';
UPDATE loan_application SET status = 'approved' WHERE id = :'loan_id';
SELECT aggregate_version AS approved_version
  FROM domain_events.raise_event('Loan', :'loan_id'::uuid, 'Loan.StatusChanged',
           '{"old_status": "submitted", "new_status": "approved"}',
           '{"source": "psql-demo"}',
           expected_version => :applied_version) \gset
COMMIT;

SELECT pg_temp.check(:applied_version = 1 AND :approved_version = 2, 'raise_event returned versions 1 and 2');
SELECT pg_temp.check(
           array_agg(event_type || ' v' || aggregate_version ORDER BY aggregate_version)
               = ARRAY['LoanApplied v1', 'Loan.StatusChanged v2'],
           'both events are committed, in order')
  FROM domain_events.aggregate_events('Loan', :'loan_id');
SELECT pg_temp.check(payload = '{"applicant": "Ada", "amount": 100000}'
                     AND metadata = '{"actor": "loan-officer-7", "source": "psql-demo"}',
                     'LoanApplied payload, and metadata stamped with the actor')
  FROM domain_events.aggregate_events('Loan', :'loan_id') WHERE aggregate_version = 1;
SELECT pg_temp.check(payload = '{"old_status": "submitted", "new_status": "approved"}',
                     'Loan.StatusChanged payload')
  FROM domain_events.aggregate_events('Loan', :'loan_id') WHERE aggregate_version = 2;
SELECT pg_temp.check(status = 'approved', 'the row is committed with its events')
  FROM loan_application WHERE id = :'loan_id';

\echo '3. Grace applies, then a later statement of the same transaction fails'
BEGIN;
INSERT INTO loan_application VALUES (:'doomed_id', 'Grace', 50000, 'submitted');
SELECT position AS doomed_position
  FROM domain_events.raise_event('Loan', :'doomed_id'::uuid, 'LoanApplied',
                                 '{"applicant": "Grace", "amount": 50000}') \gset
SELECT pg_temp.check(domain_events.aggregate_version('Loan', :'doomed_id') = 1,
                     'inside the transaction, the event exists');
-- The failure is the point here, so it must not stop the script; :ERROR tells whether it came.
\set ON_ERROR_STOP 0
\echo '(the ERROR below is expected)'
UPDATE loan_application SET amount = -1 WHERE id = :'doomed_id';   -- violates CHECK (amount > 0)
\set ON_ERROR_STOP 1
\if :ERROR
    \echo 'the UPDATE failed, as intended: the transaction is aborted'
\else
    SELECT pg_temp.check(false, 'the UPDATE should have failed on the CHECK constraint');
\endif
-- COMMIT of an aborted transaction is a ROLLBACK: the row and the event go together.
COMMIT;
\echo 'the failed application' as Loan/:doomed_id 'was rolled back'

SELECT pg_temp.check(count(*) = 0, 'no row of the failed application')
  FROM loan_application WHERE id = :'doomed_id';
SELECT pg_temp.check(count(*) = 0, 'no event of the failed application')
  FROM domain_events.aggregate_events('Loan', :'doomed_id');
SELECT pg_temp.check(domain_events.aggregate_version('Loan', :'doomed_id') = 0,
                     'no stream head either');

\echo
\pset tuples_only off
\pset format aligned
\pset footer off
SELECT aggregate_version AS v, event_type, payload, metadata
  FROM domain_events.aggregate_events('Loan', :'loan_id');
\echo 'psql example: all checks passed'
