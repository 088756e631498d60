# txrelay: `just dev` runs a local relay, `just test` runs every test.

set shell := ["bash", "-euo", "pipefail", "-c"]

# One build directory outside the clone, shared by every recipe, so tests and
# the binary share artefacts and later clones reuse them.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", home_directory() / ".cache/txrelay/target")

# List the recipes.
default:
    @just --list

# Start moto, create the database and queue, and run a relay on :8080.
dev:
    scripts/dev.sh

# Stop what `just dev` left running: its moto and this clone's PostgreSQL.
down:
    scripts/moto.sh stop "${TXRELAY_DEV_MOTO_PORT:-4566}"
    scripts/postgres.sh stop

# Start this clone's own PostgreSQL (kept running until `just down`); prints its URL.
db:
    scripts/postgres.sh start

# Run the whole test suite (starts what it needs).
test *ARGS:
    scripts/test.sh {{ARGS}}

# Only the operator tests against a real kube-apiserver (started by scripts/test.sh).
test-cluster *ARGS:
    scripts/test.sh real_cluster:: {{ARGS}}

# Format the code.
fmt:
    cargo fmt --all

# Formatting and clippy, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets --locked -- -D warnings

# Regenerate the checked-in CRD and its reference page from the Rust types. (openapi.json is written
# by hand; tests check it against the routes served and the answers given.)
generate:
    cargo run --quiet -- crd > crds/transactionrelays.relay.mykobo.io.yaml
    cargo run --quiet -- crd --reference > docs/reference/crd.md
    scripts/render-install.sh

# Build the release binary.
build:
    cargo build --release --locked

# The whole flow on a real cluster (kind or k3d) from KUBECONFIG; exits 0 without one.
e2e:
    scripts/e2e.sh

# Build the container image (needs a Docker engine).
image:
    docker build -t txrelay:dev .

# schemathesis against a live relay, then the cargo-fuzz target (2 minutes; TXRELAY_FUZZ_SECONDS to change).
fuzz:
    scripts/fuzz.sh

# Measure ingest, drain and recovery beside the machine's limits (BENCHMARKS.md).
bench:
    scripts/bench.sh

# (TXRELAY_BENCH_BINARY=path: that binary, nothing built; the release build otherwise.)
# One operator with 100 TransactionRelays on a real kube-apiserver, moto and PostgreSQL (BENCHMARKS.md).
bench-operator *ARGS:
    scripts/setup.sh
    scripts/system-packages.sh psql=postgresql-client openssl=openssl
    [ -n "${TXRELAY_BENCH_BINARY:-}" ] || cargo build --release --locked
    python3 bench/operator_scale.py {{ARGS}}
