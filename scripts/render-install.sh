#!/usr/bin/env bash
# render-install.sh [--check]: renders deploy/ with kustomize into
# install.yaml, the single-file install of this version (the image tag in
# deploy/kustomization.yaml is Cargo.toml's version). --check writes nothing
# and exits 1 when install.yaml is stale. The manifests test checks it too.
# KUBECTL picks the kubectl (default: the one on PATH, as the tests use).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
kubectl="${KUBECTL:-kubectl}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ -n "$version" ] || { echo "render-install.sh: no version in Cargo.toml" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
    echo "# txrelay $version: the CRD and the operator in txrelay-system, rendered from"
    echo "# deploy/ by scripts/render-install.sh (do not edit by hand)."
    echo "#   kubectl apply -f install.yaml"
    echo "# Variants (one namespace, monitoring, Gateway API): docs/install.md."
    "$kubectl" kustomize deploy
} >"$work/install.yaml"
if [ "${1:-}" = "--check" ]; then
    if ! diff -u install.yaml "$work/install.yaml" >&2; then
        echo "install.yaml is stale: run scripts/render-install.sh" >&2
        exit 1
    fi
    exit 0
fi
mv "$work/install.yaml" install.yaml
echo "wrote install.yaml (txrelay $version)" >&2
