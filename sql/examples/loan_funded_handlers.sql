-- Sync handlers in the database, with the seed scenario: funding a loan raises Loan.Funded, and in
-- the same transaction a handler creates its amortised payment schedule; a validation handler
-- refuses a Loan.Funded without an amount. See docs/handlers.md.
--
-- Run it as a superuser against a database with the extension:
--   psql -v ON_ERROR_STOP=1 -f sql/examples/loan_funded_handlers.sql
-- It checks its own results (ASSERT) and leaves the tables and handlers in place.

CREATE SCHEMA IF NOT EXISTS lending;
CREATE TABLE IF NOT EXISTS lending.loan (
    id     bigint  PRIMARY KEY,
    status text    NOT NULL,
    amount numeric NOT NULL
);
CREATE TABLE IF NOT EXISTS lending.payment (
    loan_id   bigint        NOT NULL,
    number    integer       NOT NULL,
    due_month date          NOT NULL,
    payment   numeric(12,2) NOT NULL,
    principal numeric(12,2) NOT NULL,
    interest  numeric(12,2) NOT NULL,
    balance   numeric(12,2) NOT NULL,
    -- The event that created the row: an audit trail back to the funding.
    event_id  uuid          NOT NULL,
    PRIMARY KEY (loan_id, number)
);

-- Validation: a Loan.Funded without a positive amount, rate and term is refused, and so is the
-- whole funding transaction. The SQLSTATE (23514) reaches the application unchanged.
CREATE OR REPLACE FUNCTION lending.require_funding_terms(event jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (event->'payload' ? 'amount') OR (event->'payload'->>'amount')::numeric <= 0 THEN
        RAISE EXCEPTION 'Loan.Funded of loan % has no positive amount', event->>'aggregate_id'
            USING ERRCODE = 'check_violation',
                  DETAIL = 'A funded loan needs amount, rate and term_months in its payload.',
                  HINT = 'Raise Loan.Funded with e.g. {"amount": 100000, "rate": 7.5, "term_months": 12}.';
    END IF;
END
$$;

-- The payment schedule: an annuity, payment = P·r / (1 − (1 + r)^−n) rounded to the cent, the
-- same every month. Interest is rounded each month; the last month's principal is whatever
-- is left, so the principal sums to exactly the amount funded.
CREATE OR REPLACE FUNCTION lending.create_payment_schedule(event jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    loan_id   bigint  := (event->>'aggregate_id')::bigint;
    amount    numeric := (event->'payload'->>'amount')::numeric;
    r         numeric := (event->'payload'->>'rate')::numeric / 100 / 12;
    n         integer := (event->'payload'->>'term_months')::integer;
    payment   numeric;
    balance   numeric := amount;
    interest  numeric;
    principal numeric;
BEGIN
    payment := round(amount * r / (1 - power(1 + r, -n)), 2);
    FOR k IN 1..n LOOP
        IF k < n THEN
            interest := round(balance * r, 2);
            principal := payment - interest;
        ELSE
            principal := balance;
            interest := payment - principal;
        END IF;
        balance := balance - principal;
        INSERT INTO lending.payment
        VALUES (loan_id, k,
                (date_trunc('month', (event->>'occurred_at')::timestamptz) + make_interval(months => k))::date,
                payment, principal, interest, balance, (event->>'id')::uuid);
    END LOOP;
END
$$;

-- Register them (as a member of domain_events_admin, or a superuser): the validation runs
-- first. Handlers run with the rights of the role that registers them.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM domain_events.handler WHERE name = 'require_funding_terms') THEN
        PERFORM domain_events.register_handler('require_funding_terms',
            'lending.require_funding_terms(jsonb)', '{Loan.Funded}', priority => 10,
            description => 'Refuses a Loan.Funded without amount, rate and term.');
        PERFORM domain_events.register_handler('create_payment_schedule',
            'lending.create_payment_schedule(jsonb)', '{Loan.Funded}', priority => 20,
            description => 'Creates the amortised payment schedule of a funded loan.',
            log_level => 'all');
    END IF;
END
$$;

-- Funding: the loan's status, the event and its 12 payments commit together.
BEGIN;
INSERT INTO lending.loan VALUES (42, 'funded', 100000) ON CONFLICT (id) DO NOTHING;
SELECT id, position FROM domain_events.raise_event('Loan', 42, 'Loan.Funded',
    '{"amount": 100000, "rate": 7.5, "term_months": 12}');
COMMIT;

DO $$
BEGIN
    ASSERT (SELECT count(*) FROM lending.payment WHERE loan_id = 42) = 12, '12 payments';
    ASSERT (SELECT sum(principal) FROM lending.payment WHERE loan_id = 42) = 100000.00,
        'the principal sums to the amount funded';
    ASSERT (SELECT count(DISTINCT payment) FROM lending.payment WHERE loan_id = 42) = 1,
        'every payment is the same, to the cent';
    ASSERT (SELECT min(payment) FROM lending.payment WHERE loan_id = 42) = 8675.74, 'the annuity';
END
$$;

-- A funding that is rolled back leaves no event and no schedule.
BEGIN;
INSERT INTO lending.loan VALUES (43, 'funded', 50000);
SELECT id FROM domain_events.raise_event('Loan', 43, 'Loan.Funded',
    '{"amount": 50000, "rate": 5, "term_months": 6}');
ROLLBACK;

-- A Loan.Funded without an amount fails with the validation handler's SQLSTATE: nothing stored.
DO $$
DECLARE
    state text;
BEGIN
    PERFORM domain_events.raise_event('Loan', 44, 'Loan.Funded', '{"rate": 7.5}');
    RAISE EXCEPTION 'the validation handler did not refuse the event';
EXCEPTION WHEN check_violation THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
    RAISE NOTICE 'refused as expected (SQLSTATE %): %', state, SQLERRM;
END
$$;

DO $$
BEGIN
    ASSERT NOT EXISTS (SELECT 1 FROM lending.payment WHERE loan_id IN (43, 44)), 'no schedule';
    ASSERT NOT EXISTS (SELECT 1 FROM domain_events.event
                        WHERE aggregate_type = 'Loan' AND aggregate_id IN ('43', '44')), 'no event';
END
$$;

SELECT number, due_month, payment, principal, interest, balance
  FROM lending.payment WHERE loan_id = 42 ORDER BY number;
