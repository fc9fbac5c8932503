#!/usr/bin/env bash
# The long chaos run behind docs/reliability.md: the chaos suite (tests/tests/chaos.rs) with more
# events and kills, against the release build of the listener, on the private cluster.
#
#   scripts/chaos.sh [EVENTS [KILLS [SEED]]]     # defaults: 1000000 events, 50 kills
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/setup.sh
scripts/install-extension.sh release
scripts/cluster.sh start
cargo build -p listener --release --quiet

export PGDE_TEST_DSN="host=127.0.0.1 port=${PGDE_PORT:-54329} user=postgres dbname=postgres"
export PGDE_LISTENER_BIN="$ROOT/target/release/listener"
export PGDE_CHAOS_EVENTS="${1:-1000000}" PGDE_CHAOS_KILLS="${2:-50}"
if [ -n "${3:-}" ]; then export PGDE_CHAOS_SEED="$3"; fi
exec cargo nextest run -p e2e --test chaos --no-capture
