#!/usr/bin/env bash
# A private, throwaway PostgreSQL cluster for the demo, the tests and the bench, of the major
# PGDE_PG chooses (default 15; scripts/pg-major.sh). Data lives under
# target/$PGDE_CLUSTER_NAME (default pgde-cluster, or pgde-cluster-<major> for other majors
# than 15); it listens on 127.0.0.1:$PGDE_PORT (default 54329)
# with wal_level=logical, and runs as the `postgres` OS user because Postgres refuses root.
#
#   scripts/cluster.sh start | stop | restart | status | destroy | env | state-dir
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/pg-major.sh
source "$ROOT/scripts/pg-major.sh"
PORT="${PGDE_PORT:-54329}"
RUN_AS="${PGDE_CLUSTER_USER:-postgres}"

as_owner() {
    if [ "$(id -un)" = "$RUN_AS" ]; then "$@"; else runuser -u "$RUN_AS" -- "$@"; fi
}

# Cluster files live under target/, unless the postgres user cannot reach it (a checkout under
# a private home directory): then under a per-checkout directory in /tmp.
state_dir() {
    mkdir -p "$ROOT/target"
    chmod a+rx "$ROOT/target" 2>/dev/null || true
    if as_owner test -x "$ROOT/target" 2>/dev/null; then
        echo "$ROOT/target"
    else
        local dir
        dir="${TMPDIR:-/tmp}/pgde-$(printf '%s' "$ROOT" | md5sum | cut -c1-12)"
        mkdir -p "$dir" && chmod 755 "$dir"
        echo "$dir"
    fi
}

STATE="$(state_dir)"
# One data directory per major: a cluster's files are readable by its own major only.
default_name=pgde-cluster
[ "$PGDE_PG" = 15 ] || default_name="pgde-cluster-$PGDE_PG"
BASE="$STATE/${PGDE_CLUSTER_NAME:-$default_name}"
DATA="$BASE/data"
LOG="$BASE/postgres.log"

init_cluster() {
    mkdir -p "$BASE"
    chmod a+rx "$BASE"
    if ! as_owner test -x "$BASE"; then
        echo "cluster.sh: user $RUN_AS cannot reach $BASE" >&2
        exit 1
    fi
    if [ "$(id -u)" = 0 ]; then chown "$RUN_AS" "$BASE"; fi
    as_owner "$PGBIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >"$BASE/initdb.log"
    cat >>"$DATA/postgresql.conf" <<CONF
# pg_domain_events private cluster
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$BASE'
wal_level = logical
max_replication_slots = 32
max_wal_senders = 32
max_connections = 200
shared_buffers = 256MB
log_min_messages = warning
shared_preload_libraries = '${PGDE_PRELOAD:-}'
CONF
    # The superuser connects without a password over loopback (tests, demo); every other
    # role authenticates with SCRAM, so the listener's password path is exercised for real.
    cat >"$DATA/pg_hba.conf" <<HBA
local   all             all                                     trust
local   replication     all                                     trust
host    all             postgres        127.0.0.1/32            trust
host    replication     postgres        127.0.0.1/32            trust
host    all             all             127.0.0.1/32            scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
HBA
}

running() {
    as_owner "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

start() {
    if [ ! -x "$PGBIN/postgres" ]; then
        echo "cluster.sh: no PostgreSQL $PGDE_PG under $PG_INSTALL; run PGDE_PG=$PGDE_PG scripts/setup.sh" >&2
        exit 1
    fi
    [ -f "$DATA/PG_VERSION" ] || init_cluster
    if [ "$(cat "$DATA/PG_VERSION")" != "$PGDE_PG" ]; then
        echo "cluster.sh: $DATA belongs to PostgreSQL $(cat "$DATA/PG_VERSION"), not $PGDE_PG; choose another PGDE_CLUSTER_NAME or destroy it" >&2
        exit 1
    fi
    if running; then
        # Already up; restarted only if it listens on another port than the one asked for.
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && return 0
        stop fast
    fi
    if "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" 2>/dev/null; then
        echo "cluster.sh: another server already listens on 127.0.0.1:$PORT; stop it or choose another port with PGDE_PORT" >&2
        exit 1
    fi
    # Without the caller's Rust backtrace settings: they would put backtraces into the DETAIL
    # of every error the extension raises. The port is given at every start, so PGDE_PORT wins
    # over the one written at initdb time.
    as_owner env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE \
        "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o "-p $PORT" start >/dev/null
}

stop() {
    if [ -f "$DATA/PG_VERSION" ] && running; then
        as_owner "$PGBIN/pg_ctl" -D "$DATA" -m "${1:-fast}" -w stop >/dev/null
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-fast}" ;;
    restart) stop "${2:-fast}"; start ;;
    status) if running; then echo "PostgreSQL $PGDE_PG running on 127.0.0.1:$PORT"; else echo "stopped"; exit 1; fi ;;
    destroy) stop immediate; rm -rf "$BASE" ;;
    state-dir) echo "$STATE" ;;
    env)
        echo "export PATH=\"$PGBIN:\$PATH\" PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres"
        echo "export PGDE_TEST_DSN='host=127.0.0.1 port=$PORT user=postgres dbname=postgres'"
        ;;
    *) echo "usage: $0 start|stop [fast|immediate]|restart|status|destroy|env|state-dir" >&2; exit 2 ;;
esac
