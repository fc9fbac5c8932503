-- The events of the requirement documents, raised from plain SQL in business transactions.
-- Run against a database with the extension: psql -f sql/examples/seed_events.sql

CREATE TABLE IF NOT EXISTS app_user (id uuid PRIMARY KEY, email text NOT NULL, name text NOT NULL);
CREATE TABLE IF NOT EXISTS loan (id bigint PRIMARY KEY, status text NOT NULL, amount numeric NOT NULL);
CREATE TABLE IF NOT EXISTS ticket (id text PRIMARY KEY, status text NOT NULL);

-- A user signs up: the row and its UserCreated event commit together.
BEGIN;
INSERT INTO app_user VALUES ('7b0c4a52-3d39-4a39-9a4b-2f7c1d1e0b11', 'ada@example.com', 'Ada');
SELECT position, aggregate_version FROM domain_events.raise_event(
    'User', '7b0c4a52-3d39-4a39-9a4b-2f7c1d1e0b11'::uuid, 'UserCreated',
    '{"email": "ada@example.com", "name": "Ada"}', '{"actor": "signup-form", "source": "web"}');
COMMIT;

-- A loan is approved then funded; expected_version guards against a concurrent change.
BEGIN;
INSERT INTO loan VALUES (42, 'approved', 100000);
SELECT position, aggregate_version FROM domain_events.raise_event(
    'Loan', 42, 'LoanStatusChanged', '{"old_status": "submitted", "new_status": "approved"}',
    expected_version => 0);
COMMIT;

BEGIN;
UPDATE loan SET status = 'funded' WHERE id = 42;
SELECT position, aggregate_version FROM domain_events.raise_events('[
  {"aggregate_type": "Loan", "aggregate_id": 42, "event_type": "Loan.StatusChanged",
   "payload": {"old_status": "approved", "new_status": "funded"}, "expected_version": 1},
  {"aggregate_type": "Loan", "aggregate_id": 42, "event_type": "Loan.Funded",
   "payload": {"amount": 100000, "rate": 7.5, "term_months": 12}}
]');
COMMIT;

-- A ticket is created; the unit of work fails afterwards, so neither the row nor the event exists.
BEGIN;
INSERT INTO ticket VALUES ('T-1001', 'submitted');
SELECT position FROM domain_events.raise_event('ticket', 'T-1001', 'ticket.created',
    '{"status": "submitted"}', '{"actor": "dev-1", "source": "core"}');
ROLLBACK;

BEGIN;
INSERT INTO ticket VALUES ('T-1002', 'submitted');
SELECT position FROM domain_events.raise_event('ticket', 'T-1002', 'ticket.created',
    '{"status": "submitted"}', '{"actor": "dev-1", "source": "core"}');
COMMIT;

SELECT position, aggregate_type, aggregate_id, aggregate_version, event_type, payload
  FROM domain_events.event ORDER BY position;
