#!/usr/bin/env bash
# The demo, in one command: builds and installs the extension into a private PostgreSQL
# cluster (15, or the major PGDE_PG chooses), starts the listener, raises the requirement
# documents' events from plain SQL (one unit of work rolls back) and shows the listener
# handling exactly the committed ones.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
export PGDE_PORT="${PGDE_PORT:-54329}"
# shellcheck source=scripts/pg-major.sh
source "$ROOT/scripts/pg-major.sh"
DB=pgde_demo
PSQL=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGDE_PORT" -U postgres)

scripts/setup.sh
echo "== building and installing the extension"
scripts/install-extension.sh debug
cargo build -p listener --quiet
scripts/cluster.sh start

echo "== a fresh database $DB with the extension"
"${PSQL[@]}" -d postgres <<SQL
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$DB';
DROP DATABASE IF EXISTS $DB WITH (FORCE);
CREATE DATABASE $DB;
SQL
"${PSQL[@]}" -d "$DB" -c "CREATE EXTENSION pg_domain_events"

echo "== starting the listener (stdout handler, JSON lines)"
OUT="$ROOT/target/demo-events.jsonl"
LOG="$ROOT/target/demo-listener.log"
target/debug/listener run --config listener/example.toml \
    --port "$PGDE_PORT" --dbname "$DB" --slot "$DB" --publication "$DB" >"$OUT" 2>"$LOG" &
LISTENER=$!
trap 'kill "$LISTENER" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    active=$("${PSQL[@]}" -d "$DB" -tAc "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$DB' AND active")
    [ "$active" = 1 ] && break
    kill -0 "$LISTENER" 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.1
done

echo "== raising events in business transactions (sql/examples/seed_events.sql)"
"${PSQL[@]}" -d "$DB" -f sql/examples/seed_events.sql

expected=$("${PSQL[@]}" -d "$DB" -tAc "SELECT count(*) FROM domain_events.event")
for _ in $(seq 1 100); do
    [ "$(wc -l <"$OUT")" -ge "$expected" ] && break
    sleep 0.1
done
kill -TERM "$LISTENER"
wait "$LISTENER" || true
trap - EXIT

echo "== the listener handled $(wc -l <"$OUT") of $expected committed events (the rolled-back ticket T-1001 never appears):"
cat "$OUT"
echo "== its durable position:"
"${PSQL[@]}" -d "$DB" -c "SELECT name, mode, position, lsn FROM domain_events.subscription"
