#!/usr/bin/env bash
# Installs what building, testing and the demo need, each only when missing:
# Debian packages (PostgreSQL 15 server and headers, libclang for pgrx's bindgen, sudo for
# `cargo pgrx test --runas`, OpenSSL headers for the listener's TLS; nats-server, Node.js with
# npm and Python's venv for the suites and examples), cargo-pgrx pinned to the
# pgrx version of the extension crate, pgrx's PG 15 configuration, and cargo-nextest.
# With --kafka, also the tansu Kafka-protocol broker the Kafka handler's tests run against
# (about 13 minutes to build, once; the demo does not need it).
set -euo pipefail

TANSU_VERSION=0.6.0
with_kafka=false
for arg in "$@"; do
    case "$arg" in
        --kafka) with_kafka=true ;;
        *) echo "usage: scripts/setup.sh [--kafka]" >&2; exit 2 ;;
    esac
done

PGRX_VERSION=0.18.1
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
export PATH="$HOME/.cargo/bin:$PATH"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo libssl-dev pkg-config; do
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
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
    cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked --quiet
fi

if ! grep -qs '^pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest (once)"
    cargo install cargo-nextest --locked --quiet
fi

# The in-memory storage engine needs the dynostore feature.
if $with_kafka && [ "$(tansu --version 2>/dev/null | awk '{print $2}')" != "$TANSU_VERSION" ]; then
    echo "setup: installing the tansu broker $TANSU_VERSION for the Kafka tests (about 13 minutes, once)"
    cargo install tansu --version "=$TANSU_VERSION" --locked --features dynostore --quiet
fi
