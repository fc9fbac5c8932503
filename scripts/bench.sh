#!/usr/bin/env bash
# Runs a benchmark against the private cluster (scripts/cluster.sh), e.g.
#
#   scripts/bench.sh                 # = scripts/bench.sh store
#   scripts/bench.sh store --rounds 15
#   scripts/bench.sh console         # the operator console's reads over 1M events
#
# It installs the release build of the extension first; the bench creates a
# fresh database `pgde_bench` on the cluster each run and drops it at the end.
# PGDE_BENCH_DSN overrides the cluster's connection string; PGDE_PG chooses the PostgreSQL major
# (default 15; scripts/pg-major.sh), whose pg_recvlogical the pipeline bench compares against.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/pg-major.sh
source "$ROOT/scripts/pg-major.sh"
export PGDE_PG_RECVLOGICAL="${PGDE_PG_RECVLOGICAL:-$PGBIN/pg_recvlogical}"

# The bench measures the optimised build: install it (atomically) before every run.
scripts/setup.sh
scripts/install-extension.sh release
scripts/cluster.sh start
export PGDE_BENCH_DSN="${PGDE_BENCH_DSN:-host=127.0.0.1 port=${PGDE_PORT:-54329} user=postgres dbname=postgres}"

if [ $# -eq 0 ]; then
    set -- store
fi
# The store bench's peer column: message-db, fetched at a pinned version with its checksum
# (scripts/fetch-message-db.sh); PGDE_MESSAGE_DB_SQL names another copy's database/ directory.
if [ "$1" = store ] && [ -z "${PGDE_MESSAGE_DB_SQL:-}" ]; then
    PGDE_MESSAGE_DB_SQL="$(scripts/fetch-message-db.sh)"
    export PGDE_MESSAGE_DB_SQL
fi
exec cargo run --quiet -p bench --release -- "$@"
