#!/usr/bin/env bash
# `just bench`: builds what it needs (release txrelay, the rustack SQS
# emulator, wrk), then runs bench/bench.py. See BENCHMARKS.md.
#
# `scripts/bench.sh sustained [--held|--unheld] [--no-steady] [--no-drain]
# [--no-baselines]` (or TXRELAY_BENCH_MODE=sustained): ten minutes of
# POST /new at 32 connections reported per minute, the same with a
# REPEATABLE READ transaction held, a 50,000-row drain with and without it,
# and bench/claim_mark.sql as the drain's baseline; always on this clone's
# private PostgreSQL at the server's defaults unless TXRELAY_BENCH_ADMIN_URL
# is set. TXRELAY_BENCH_SUSTAINED_SECONDS / _WINDOW shorten it (e.g. 30 / 10).
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
mode="${TXRELAY_BENCH_MODE:-}"
[ "${1:-}" = sustained ] && mode=sustained
if [ -z "${TXRELAY_BENCH_ADMIN_URL:-}" ] && [ "$mode" = sustained ]; then
    # Not `ensure`: a server found at DATABASE_URL or :5432 may run with
    # other settings. The private cluster is initdb'd with the defaults.
    started=yes
    scripts/postgres.sh status >/dev/null 2>&1 && started=
    TXRELAY_BENCH_ADMIN_URL="$(scripts/postgres.sh start)"
    export TXRELAY_BENCH_ADMIN_URL
    [ -n "$started" ] && trap 'scripts/postgres.sh stop' EXIT
elif [ -z "${TXRELAY_BENCH_ADMIN_URL:-}" ]; then
    pg="$(scripts/postgres.sh ensure)"
    export TXRELAY_BENCH_ADMIN_URL="${pg% *}"
    [ "${pg##* }" = started ] && trap 'scripts/postgres.sh stop' EXIT
fi
python3 bench/bench.py "$@"
