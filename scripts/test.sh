#!/usr/bin/env bash
# The whole suite: unit tests, integration tests against the local
# PostgreSQL and a private moto server, and the alert-rule tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/system-packages.sh promtool=prometheus kubectl=kubernetes-client psql=postgresql-client
: "${CARGO_TARGET_DIR:=$HOME/.cache/txrelay/target}"
export CARGO_TARGET_DIR

# The server: TXRELAY_TEST_ADMIN_URL, else DATABASE_URL's, else one at
# 127.0.0.1:5432, else this clone's private cluster, started (and stopped
# again at the end) when it is not running.
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT
if [ -n "${TXRELAY_TEST_ADMIN_URL:-}" ]; then
    admin_url="$TXRELAY_TEST_ADMIN_URL"
else
    pg="$(scripts/postgres.sh ensure)"
    admin_url="${pg% *}"
    [ "${pg##* }" = started ] && cleanup+=("scripts/postgres.sh stop")
fi
test_db="${TXRELAY_TEST_DATABASE:-txrelay_test}"
psql -q -v ON_ERROR_STOP=1 "$admin_url" -c "DROP DATABASE IF EXISTS $test_db WITH (FORCE)" -c "CREATE DATABASE $test_db"
export TXRELAY_TEST_DATABASE_URL="${admin_url%/*}/$test_db"

moto_port="${TXRELAY_TEST_MOTO_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
scripts/moto.sh start "$moto_port"
cleanup+=("scripts/moto.sh stop $moto_port")
export TXRELAY_TEST_SQS_ENDPOINT="http://127.0.0.1:$moto_port"

# A real kube-apiserver (etcd + kube-apiserver, no nodes) for the
# real_cluster:: tests; each test works in a namespace of its own.
control_plane="$root/.run/control-plane"
scripts/control-plane.sh start "$control_plane"
cleanup+=("scripts/control-plane.sh stop '$control_plane'")
export TXRELAY_TEST_KUBECONFIG="$control_plane/kubeconfig"
export TXRELAY_TEST_KUBECTL="$control_plane/bin/kubectl"

cargo test --all-targets --locked -- "$@"
scripts/test-rules.sh
