#!/usr/bin/env bash
# `just bench`: builds what it needs (release txrelay, the rustack SQS
# emulator, wrk), then runs bench/bench.py. See BENCHMARKS.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
: "${CARGO_TARGET_DIR:=$HOME/.cache/txrelay/target}"
export CARGO_TARGET_DIR
tools="$HOME/.cache/txrelay/tools"
export TXRELAY_RUSTACK="$tools/bin/rustack"

scripts/system-packages.sh wrk=wrk pgbench=postgresql-client psql=postgresql-client
if [ ! -x "$TXRELAY_RUSTACK" ]; then
    # Not --locked: the crate's lockfile pins a yanked dependency.
    cargo install rustack-cli --version 0.12.0 --no-default-features --features sqs --root "$tools"
fi
cargo build --release --locked
exec python3 bench/bench.py "$@"
