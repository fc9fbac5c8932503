#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, the extension's backend tests (#[pg_test]),
# then the end-to-end suites against a fresh private cluster (scripts/cluster.sh) — the Kafka
# and NATS handlers' against tansu brokers and nats-servers the tests start themselves on free
# ports, the TLS and crash tests against private clusters of their own — then a short
# fuzzing run of the stream decoders and the configuration loader (scripts/fuzz.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
export PGDE_PORT="${PGDE_PORT:-54329}"

scripts/setup.sh --kafka

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== extension: backend tests"
PGRX_DATA="$(scripts/cluster.sh state-dir)/pgrx-test-data"
mkdir -p "$PGRX_DATA"
chown postgres "$PGRX_DATA" 2>/dev/null || true
(cd pg_domain_events && cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_DATA")

# Installed after the backend tests, whose build carries the test schema.
echo "== extension: build and install into PostgreSQL 15"
scripts/install-extension.sh debug

echo "== end-to-end tests against a fresh private cluster"
scripts/cluster.sh destroy
scripts/cluster.sh start
trap 'scripts/cluster.sh stop immediate || true' EXIT
export PGDE_TEST_DSN="host=127.0.0.1 port=$PGDE_PORT user=postgres dbname=postgres"
cargo build -p listener --quiet
cargo nextest run --workspace --exclude pg_domain_events --no-fail-fast

echo "== fuzzing: a short run of each target over its committed corpus"
scripts/fuzz.sh "${PGDE_FUZZ_SECONDS:-20}"
