#!/usr/bin/env bash
# Fetches the peer of the store bench, message-db (the npm package @eventide/message-db, MIT),
# at a pinned version, checks the tarball's SHA-256, unpacks it under target/message-db/ once,
# and prints the directory holding its SQL (`database/`), which `bench store --message-db` takes.
# Nothing of it is installed anywhere: the bench runs its SQL files in its own database.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION=1.3.1
SHA256=d7938e108d950e29da1974e3acad05bcf680045d0961f6a12039fb002140840d
DEST="$ROOT/target/message-db/$VERSION"

if [ ! -f "$DEST/.verified" ]; then
    command -v npm >/dev/null 2>&1 || { echo "fetch-message-db: npm is needed (scripts/setup.sh installs it)" >&2; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "@eventide/message-db@$VERSION" >/dev/null)
    tarball="$tmp/eventide-message-db-$VERSION.tgz"
    echo "$SHA256  $tarball" | sha256sum --check --quiet - >&2 ||
        { echo "fetch-message-db: checksum mismatch for @eventide/message-db@$VERSION" >&2; exit 1; }
    rm -rf "$DEST"
    mkdir -p "$DEST"
    tar -xzf "$tarball" -C "$DEST" --strip-components=1
    touch "$DEST/.verified"
fi
echo "$DEST/database"
