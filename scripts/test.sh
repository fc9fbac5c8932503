#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, then for each supported PostgreSQL major
# (15, 16, 17, 18) the extension's backend tests (#[pg_test]) and the end-to-end suites against
# a fresh private cluster of that major (scripts/cluster.sh) — the Kafka and NATS handlers'
# against tansu brokers and nats-servers the tests start themselves on free ports, the TLS and
# crash tests against private clusters of their own — then a short fuzzing run of the stream
# decoders and the configuration loader (scripts/fuzz.sh).
#
#   scripts/test.sh                  # every major: 15, 16, 17 and 18
#   PGDE_PG=17 scripts/test.sh       # one major (or a list: PGDE_PG="16 18")
#
# The first major listed runs every suite; the others run the suites whose outcome depends on
# the server (VERSION_INDEPENDENT below lists the ones that do not, run once).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
export PGDE_PORT="${PGDE_PORT:-54329}"
read -r -a MAJORS <<<"${PGDE_PG:-15 16 17 18}"

# The handlers' own suites (what a sink does with an event does not depend on the server that
# stored it) and the listener crate's own tests (configuration, decoding, no server).
VERSION_INDEPENDENT='binary(kafka) | binary(nats) | binary(webhook) | binary(stdout) | package(listener) | package(bench)'
# The listener's TLS suite needs a server built with OpenSSL; of the registry builds 16 and 18
# have none (the client side it tests is the same against every major).
SERVER_TLS='test(/stream_over_tls/)'

for major in "${MAJORS[@]}"; do
    PGDE_PG="$major" scripts/setup.sh --kafka
done
# For PGRX_HOME (pgrx's configuration of every major set up above).
PGDE_PG="${MAJORS[0]}"
# shellcheck source=scripts/pg-major.sh
source scripts/pg-major.sh

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --exclude pg_domain_events --all-targets --quiet -- -D warnings
# The extension for each major: its version-specific code is behind cfg
# (pg_domain_events/src/pg_major.rs).
for major in "${MAJORS[@]}"; do
    cargo clippy -p pg_domain_events --all-targets --no-default-features \
        --features "pg$major" --quiet -- -D warnings
done

echo "== alert rules: promtool unit tests"
.pg/prometheus/usr/bin/promtool check rules deploy/prometheus/alerts.yml
.pg/prometheus/usr/bin/promtool test rules deploy/prometheus/alerts.test.yml

STATE="$(scripts/cluster.sh state-dir)"
running=""
trap '[ -z "$running" ] || PGDE_PG="$running" scripts/cluster.sh stop immediate || true' EXIT
first=true
for major in "${MAJORS[@]}"; do
    export PGDE_PG="$major"
    started=$SECONDS

    echo "== PostgreSQL $major: extension backend tests"
    pgrx_data="$STATE/pgrx-test-data-$major"
    mkdir -p "$pgrx_data"
    chown postgres "$pgrx_data" 2>/dev/null || true
    (cd pg_domain_events && cargo pgrx test "pg$major" --runas postgres --pgdata "$pgrx_data")

    # Installed after the backend tests, whose build carries the test schema.
    echo "== PostgreSQL $major: build and install the extension"
    scripts/install-extension.sh debug

    echo "== PostgreSQL $major: end-to-end tests against a fresh private cluster"
    scripts/cluster.sh destroy
    running="$major"
    scripts/cluster.sh start
    export PGDE_TEST_DSN="host=127.0.0.1 port=$PGDE_PORT user=postgres dbname=postgres"
    cargo build -p listener --quiet
    filter="all()"
    $first || filter="not ($VERSION_INDEPENDENT)"
    # shellcheck source=scripts/pg-major.sh
    source scripts/pg-major.sh
    if ! "$PG_CONFIG" --configure | grep -q -- --with-openssl; then
        echo "== PostgreSQL $major is built without TLS here: its TLS suite runs on the other majors"
        filter="($filter) and not $SERVER_TLS"
    fi
    cargo nextest run --workspace --exclude pg_domain_events --no-fail-fast -E "$filter"
    scripts/cluster.sh stop
    running=""
    first=false
    echo "== PostgreSQL $major: done in $((SECONDS - started)) s"
done

echo "== fuzzing: a short run of each target over its committed corpus"
scripts/fuzz.sh "${PGDE_FUZZ_SECONDS:-20}"
