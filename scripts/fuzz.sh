#!/usr/bin/env bash
# Fuzzes the listener's decoders for a CI-sized time: the replication stream (CopyData framing,
# pgoutput, event decoding) and the configuration loader (TOML, PGDE_* environment, flags),
# each starting from its committed corpus under fuzz/corpus/. Fails on any crash; the input that
# crashed is written under fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [seconds per target]      (default 30)
#   scripts/fuzz.sh 30 pgoutput               (one target)
#
# Runs on the stable toolchain: without a sanitizer (AddressSanitizer needs nightly's -Z flags,
# and safe Rust needs it little), in release mode with debug assertions, so overflows panic.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${1:-30}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(pgoutput config)
# The newest cargo-fuzz that builds with Rust 1.95 and runs on stable with --sanitizer none.
CARGO_FUZZ_VERSION=0.13.1
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

cd "$ROOT/fuzz"
for target in "${TARGETS[@]}"; do
    # New interesting inputs go to a scratch directory; the committed corpus is only read.
    scratch="$ROOT/target/fuzz-corpus/$target"
    mkdir -p "$scratch"
    echo "fuzz.sh: $target for ${SECONDS_PER_TARGET}s"
    cargo fuzz run --sanitizer none -O -a "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1
done
echo "fuzz.sh: no crash in ${TARGETS[*]}"
