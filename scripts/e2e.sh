#!/usr/bin/env bash
# `just e2e`: the whole flow on a real cluster from KUBECONFIG (kind or k3d):
# build and load the image, install with kustomize, apply the example relay,
# post to /new, and wait for status.unsent to return to 0.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if ! command -v kubectl >/dev/null || ! kubectl cluster-info >/dev/null 2>&1; then
    echo "just e2e: no Kubernetes cluster reachable through KUBECONFIG; nothing to do."
    exit 0
fi
image="${TXRELAY_IMAGE:-txrelay:e2e}"
if [ -z "${TXRELAY_IMAGE:-}" ]; then
    docker build -t "$image" .
    context="$(kubectl config current-context)"
    case "$context" in
        kind-*) kind load docker-image "$image" --name "${context#kind-}" ;;
        k3d-*) k3d image import "$image" -c "${context#k3d-}" ;;
        *) echo "push $image where the cluster can pull it, then rerun with TXRELAY_IMAGE=$image" >&2; exit 1 ;;
    esac
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"; kill %1 2>/dev/null || true' EXIT
cat >"$work/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [$root/deploy]
images: [{name: ghcr.io/mykobo/txrelay, newName: ${image%:*}, newTag: ${image##*:}}]
patches:
  - target: {kind: Deployment, name: txrelay}
    patch: '[{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"}]'
YAML
kubectl apply -k "$work"
kubectl apply -f tests/e2e/backends.yaml
kubectl -n payments rollout status deploy/postgres deploy/moto --timeout=180s
kubectl -n payments run create-queue --rm -i --restart=Never --image=curlimages/curl -- \
    curl -fsS -X POST "http://moto.payments.svc:4566/?Action=CreateQueue&QueueName=ledger-e2e"
kubectl apply -f examples/cluster/transactionrelay.yaml
kubectl -n txrelay-system rollout status deploy/txrelay --timeout=180s
kubectl -n payments wait txr/dapp --for=condition=Ready --timeout=120s
kubectl -n txrelay-system port-forward svc/txrelay 18080:8080 >/dev/null &
sleep 3
curl -fsS -X POST http://127.0.0.1:18080/relays/payments/dapp/new \
    -H 'Authorization: Bearer e2e-ingest-token' -H 'Content-Type: application/json' \
    -d @examples/new-transaction.json
echo
for _ in $(seq 1 60); do
    unsent="$(kubectl -n payments get txr dapp -o jsonpath='{.status.unsent}')"
    if [ "$unsent" = "0" ]; then
        kubectl -n payments get txr dapp
        echo "e2e: the transaction was relayed (status.unsent = 0)"
        exit 0
    fi
    sleep 2
done
echo "e2e: status.unsent is still ${unsent:-unset} after 2 minutes" >&2
kubectl -n payments get txr dapp -o yaml >&2
exit 1
