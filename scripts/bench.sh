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
# TXRELAY_BENCH_ADMIN_URL, else DATABASE_URL's server, else one at
# 127.0.0.1:5432, else this clone's private cluster with the server's
# defaults, stopped again at the end if this run started it.
if [ -z "${TXRELAY_BENCH_ADMIN_URL:-}" ]; then
    pg="$(scripts/postgres.sh ensure)"
    export TXRELAY_BENCH_ADMIN_URL="${pg% *}"
    [ "${pg##* }" = started ] && trap 'scripts/postgres.sh stop' EXIT
fi
python3 bench/bench.py "$@"
