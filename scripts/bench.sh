#!/usr/bin/env bash
# Runs a benchmark against the private cluster (scripts/cluster.sh), e.g.
#
#   scripts/bench.sh                 # = scripts/bench.sh store
#   scripts/bench.sh store --rounds 15
#
# The extension must be installed first (cargo pgrx install --release); the bench creates a
# fresh database `pgde_bench` on the cluster each run and drops it at the end.
# PGDE_BENCH_DSN overrides the cluster's connection string.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
cd "$ROOT"

control="$("$PG_CONFIG" --sharedir)/extension/pg_domain_events.control"
if [ ! -f "$control" ]; then
    echo "bench.sh: $control is missing; install the extension first:" >&2
    echo "  cargo pgrx install --release --pg-config $PG_CONFIG" >&2
    exit 1
fi

scripts/cluster.sh start
export PGDE_BENCH_DSN="${PGDE_BENCH_DSN:-host=127.0.0.1 port=${PGDE_PORT:-54329} user=postgres dbname=postgres}"

if [ $# -eq 0 ]; then
    set -- store
fi
exec cargo run --quiet -p bench --release -- "$@"
