#!/usr/bin/env bash
# Runs one example application against a database that has (or may get) pg_domain_events.
#
#   examples/run.sh typeorm|sqlalchemy|psql DATABASE_URL
#
# Installs what the example needs the first time, and again whenever its lock file changes:
#   typeorm     npm ci into examples/typeorm/node_modules (from package-lock.json), then tsc
#   sqlalchemy  a virtualenv in target/examples-venv (from requirements.txt)
#   psql        nothing (the psql of PGDE_PG's PostgreSQL, scripts/pg-major.sh; else from PATH)
# Nothing is installed globally. Exits with the example's status; 64 for bad usage; 69 when
# the installation itself failed (so callers can tell a broken install from a failed check).
set -euo pipefail

EXAMPLES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$EXAMPLES")"
VENV="$ROOT/target/examples-venv"

usage() { echo "usage: $0 typeorm|sqlalchemy|psql DATABASE_URL" >&2; exit 64; }
[ $# -eq 2 ] || usage
NAME="$1"
case "$NAME" in typeorm | sqlalchemy | psql) ;; *) usage ;; esac
export DATABASE_URL="$2"

install_failed() { echo "run.sh: installing the $NAME example failed: $*" >&2; exit 69; }
say() { echo "run.sh: $*" >&2; }
hash_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

# Two runs of the same example (parallel tests, two shells) must not install into one
# directory at once: the install and the build are serialised per example.
mkdir -p "$ROOT/target"
exec 9>"$ROOT/target/examples-$NAME.lock"

case "$NAME" in
typeorm)
    cd "$EXAMPLES/typeorm"
    command -v npm >/dev/null || install_failed "npm not found (Node.js 20.19+ is needed)"
    flock 9
    # node_modules is reinstalled (npm ci) only when the lock file changed since the last install.
    stamp="node_modules/.pgde-installed"
    want="$(hash_of package.json package-lock.json) node $(node --version)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "npm ci in examples/typeorm"
        npm ci --no-audit --no-fund --loglevel=error >&2 || install_failed "npm ci exited with $?"
        echo "$want" >"$stamp"
    fi
    npm run --silent build >&2 || install_failed "tsc exited with $?"
    flock -u 9
    exec node dist/main.js
    ;;
sqlalchemy)
    cd "$EXAMPLES/sqlalchemy"
    PYTHON="${PYTHON:-python3}"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        install_failed "$PYTHON is missing or older than 3.10"
    flock 9
    stamp="$VENV/.pgde-installed"
    want="$(hash_of requirements.txt) $("$PYTHON" --version 2>&1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "creating $VENV from examples/sqlalchemy/requirements.txt"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" || install_failed "python -m venv exited with $? (Debian: apt-get install python3-venv)"
        "$VENV/bin/pip" install --quiet --require-virtualenv -r requirements.txt >&2 ||
            install_failed "pip install exited with $?"
        echo "$want" >"$stamp"
    fi
    flock -u 9
    exec "$VENV/bin/python" main.py
    ;;
psql)
    # shellcheck source=scripts/pg-major.sh
    source "$ROOT/scripts/pg-major.sh"
    PSQL="$PGBIN/psql"
    [ -x "$PSQL" ] || PSQL="$(command -v psql || true)"
    [ -x "$PSQL" ] || install_failed "psql not found"
    exec "$PSQL" "$DATABASE_URL" --no-psqlrc -v ON_ERROR_STOP=1 -f "$EXAMPLES/psql/demo.sql"
    ;;
*) usage ;;
esac
