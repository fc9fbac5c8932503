#!/usr/bin/env bash
# Builds the extension for the PostgreSQL major PGDE_PG chooses (default 15;
# scripts/pg-major.sh) and installs it into that server's directories: the shared library,
# the control file, the current version's install script, every released install script and
# every upgrade script (pg_domain_events/sql/).
#
#   scripts/install-extension.sh [debug|release]     (default: debug)
#   PGDE_PG=17 scripts/install-extension.sh          (into .pg/17/, see scripts/setup.sh)
#
# Files are written next to their destination and renamed into place: overwriting a shared
# library in place (what `cargo pgrx install` does) crashes every backend that has it loaded.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${1:-debug}"
# shellcheck source=scripts/pg-major.sh
source "$ROOT/scripts/pg-major.sh"
export PATH="$HOME/.cargo/bin:$PATH"
OUT="$ROOT/target/pgrx-package/pg$PGDE_PG-$PROFILE"

flags=()
[ "$PROFILE" = debug ] && flags+=(--debug)
rm -rf "$OUT"
(cd "$ROOT/pg_domain_events" &&
    cargo pgrx package --pg-config "$PG_CONFIG" "${flags[@]}" --out-dir "$OUT" >/dev/null)

# The system's PostgreSQL 15 directories need root; the unpacked majors under .pg/ are ours.
as_root() { if [ "$(id -u)" = 0 ] || [ -w "$PG_INSTALL" ]; then "$@"; else sudo "$@"; fi; }
place() { # place SOURCE_FILE DEST_DIR MODE
    local tmp
    tmp="$2/.$(basename "$1").$$"
    as_root install -m "$3" "$1" "$tmp"
    as_root mv -f "$tmp" "$2/$(basename "$1")"
}

libdir="$("$PG_CONFIG" --pkglibdir)"
extdir="$("$PG_CONFIG" --sharedir)/extension"
place "$OUT$libdir/pg_domain_events.so" "$libdir" 755
for file in "$OUT$extdir"/pg_domain_events*; do
    place "$file" "$extdir" 644
done
# Released install scripts (frozen: databases were created from them) beside the current one,
# so that older versions can still be installed and upgraded from; upgrade scripts come with
# the package already.
for file in "$ROOT"/pg_domain_events/sql/pg_domain_events--*.sql; do
    place "$file" "$extdir" 644
done
echo "installed pg_domain_events ($PROFILE, PostgreSQL $PGDE_PG) into $libdir and $extdir"
