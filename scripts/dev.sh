#!/usr/bin/env bash
# `just dev`: PostgreSQL (DATABASE_URL, or one of the clone's own), moto as SQS with a queue,
# migrations, and `txrelay run --config examples/relay.yaml` on :8080.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
: "${CARGO_TARGET_DIR:=$HOME/.cache/txrelay/target}"
export CARGO_TARGET_DIR

# DATABASE_URL when set; otherwise a server at 127.0.0.1:5432, or this
# clone's private cluster (.run/pg), started and left running for the next
# `just dev` until `just down`.
db_note=""
if [ -z "${DATABASE_URL:-}" ]; then
    pg="$(scripts/postgres.sh ensure)"
    admin="${pg% *}"
    DATABASE_URL="${admin%/*}/txrelay"
    if [ "${pg##* }" != external ]; then
        db_note="  (this clone's own PostgreSQL, data in .run/pg; it keeps running after
            this relay stops, for the next \`just dev\`: \`just down\` stops it)"
    fi
fi
database="${DATABASE_URL##*/}"
database="${database%%\?*}"
admin_url="${DATABASE_URL%/*}/postgres"
if ! psql -tAq "$admin_url" -c "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1; then
    psql -q "$admin_url" -c "CREATE DATABASE \"$database\""
fi

moto_port="${TXRELAY_DEV_MOTO_PORT:-4566}"
scripts/moto.sh start "$moto_port"
export AWS_ENDPOINT_URL="http://127.0.0.1:$moto_port"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-dev}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-dev}"
SQS_QUEUE_URL="$(.venv/bin/python - <<PY
import boto3
sqs = boto3.client("sqs", endpoint_url="$AWS_ENDPOINT_URL", region_name="$AWS_REGION")
print(sqs.create_queue(QueueName="txrelay-dev")["QueueUrl"])
PY
)"
export SQS_QUEUE_URL DATABASE_URL
export RELAY_API_TOKENS="${RELAY_API_TOKENS:-dev-ingest-token}"
export RELAY_ADMIN_TOKENS="${RELAY_ADMIN_TOKENS:-dev-admin-token}"

cargo build --locked
cat <<MSG

txrelay is starting on http://127.0.0.1:8080 (metrics on http://127.0.0.1:9090/metrics)
  database: $DATABASE_URL (schema dapp)
$db_note
  queue:    $SQS_QUEUE_URL

Try it:
  curl -i http://127.0.0.1:8080/new -H 'Authorization: Bearer $RELAY_API_TOKENS' \\
       -H 'Content-Type: application/json' -d @examples/new-transaction.json
  curl -s http://127.0.0.1:8080/health/transactions -H 'Authorization: Bearer $RELAY_ADMIN_TOKENS'
  $CARGO_TARGET_DIR/debug/txrelay stats      # with the same environment

MSG
exec "$CARGO_TARGET_DIR/debug/txrelay" run --config examples/relay.yaml --listen 127.0.0.1:8080 --metrics-listen 127.0.0.1:9090
