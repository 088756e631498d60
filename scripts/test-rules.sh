#!/usr/bin/env bash
# promtool test rules on deploy/prometheus/rules.yaml: the PrometheusRule's
# spec is a plain rule file, extracted next to the tests in a temporary dir.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v promtool >/dev/null; then
    echo "promtool not found: install Debian's prometheus package (apt-get install prometheus)" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$root/.venv/bin/python" - "$root/deploy/prometheus/rules.yaml" "$work/prometheus-rules.yaml" <<'PY'
import sys, yaml
rule = yaml.safe_load(open(sys.argv[1]))
assert rule["kind"] == "PrometheusRule", "rules.yaml must be a PrometheusRule"
yaml.safe_dump(rule["spec"], open(sys.argv[2], "w"))
PY
cp "$root/deploy/prometheus/rules_test.yaml" "$work/"
promtool check rules "$work/prometheus-rules.yaml"
promtool test rules "$work/rules_test.yaml"
