//! The install as users apply it, against a real API server: every variant
//! of deploy/ (with the components of deploy/components/) is accepted whole,
//! schemas and admission included; its namespaced part, applied for real,
//! grants the operator's ServiceAccount what it says and no more (`kubectl
//! auth can-i`); the operator runs under the namespaced install's Role alone;
//! and the built-in view and edit roles take in TransactionRelays.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Cluster, ControlPlane, MANAGER, ready, token_kubeconfig};
use crate::common::{unique, wait_until};
use crate::manifests::{CLUSTER_SCOPED, VARIANTS, overlay};

const AGGREGATED_ROLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/aggregated-roles.yaml");
const TRANSACTION_RELAYS: &str = "transactionrelays.relay.mykobo.io";

/// The other projects' kinds the components use. Their CRDs are not on the
/// test API server and only their group, version and kind matter here (the
/// manifests test checks the fields), so minimal structural CRDs stand in.
/// Groups under k8s.io need the API review annotation.
async fn install_foreign_crds(plane: &ControlPlane) {
    let crd = |group: &str, plural: &str, kind: &str| {
        let mut crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema":
                    {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
            },
        });
        if group.ends_with(".k8s.io") {
            crd["metadata"]["annotations"] =
                json!({"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"});
        }
        crd
    };
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        crd("monitoring.coreos.com", "servicemonitors", "ServiceMonitor"),
        crd("monitoring.coreos.com", "prometheusrules", "PrometheusRule"),
        crd("gateway.networking.k8s.io", "httproutes", "HTTPRoute"),
    ]});
    plane
        .ok(
            &["apply", "--server-side", "--force-conflicts", "--field-manager=txrelay-tests", "-f", "-"],
            Some(&list.to_string()),
        )
        .await;
    for name in [
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
        "httproutes.gateway.networking.k8s.io",
    ] {
        plane.ok(&["wait", "--for=condition=Established", "--timeout=30s", &format!("crd/{name}")], None).await;
    }
}

/// A variant rendered for `namespace` by the tier's kubectl.
async fn render(plane: &ControlPlane, variant: &str, components: &[&str], namespace: &str) -> (String, Vec<Value>) {
    let dir = overlay(variant, components, Some(namespace));
    let rendered = plane.ok(&["kustomize", dir.to_str().unwrap()], None).await;
    let _ = std::fs::remove_dir_all(dir);
    let documents: Vec<Value> = serde_saphyr::from_multiple(&rendered).unwrap();
    (rendered, documents)
}

/// The namespaced objects of `documents`, applied for real (the cluster-wide
/// ones have fixed names, shared by every test on this control plane).
async fn apply_namespaced(plane: &ControlPlane, documents: &[Value]) {
    let items: Vec<&Value> =
        documents.iter().filter(|d| !CLUSTER_SCOPED.contains(&d["kind"].as_str().unwrap())).collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    plane.ok(&["apply", "-f", "-"], Some(&list.to_string())).await;
}

/// `kubectl auth can-i WHAT -n NAMESPACE --as WHO`.
async fn can_i(plane: &ControlPlane, who: &str, namespace: &str, what: &[&str]) -> bool {
    let mut args = vec!["auth", "can-i"];
    args.extend(what);
    args.extend(["-n", namespace, "--as", who]);
    let out = plane.kubectl(&args, None).await;
    match out.stdout.trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl {args:?}: {other}\n{}", out.stderr),
    }
}

#[tokio::test]
async fn every_install_variant_is_accepted_by_the_api_server_and_grants_the_operator_what_it_says() {
    let plane = ControlPlane::shared();
    plane.install().await;
    install_foreign_crds(&plane).await;
    for (variant, components) in VARIANTS {
        let namespace = format!("txr-{}-{}", std::process::id(), unique());
        let (rendered, documents) = render(&plane, variant, components, &namespace).await;
        // A dry run creates nothing to put the rest in: the namespace first.
        plane.ok(&["create", "namespace", &namespace, "--save-config"], None).await;
        let out = plane.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered)).await;
        assert!(out.ok, "{variant}: the API server refused the install:\n{}\n{}", out.stdout, out.stderr);
        let accepted = out.stdout.lines().filter(|l| l.ends_with("(server dry run)")).count();
        assert_eq!(accepted, documents.len(), "{variant}:\n{}", out.stdout);
        // The CRD was applied server-side by other tests, so kubectl notes
        // its missing annotation; any other warning (a deprecated API, an
        // unknown field) is news.
        let warnings: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("Warning:") && !l.contains("last-applied-configuration"))
            .collect();
        assert!(warnings.is_empty(), "{variant}: {warnings:?}");

        apply_namespaced(&plane, &documents).await;
        let operator = format!("system:serviceaccount:{namespace}:txrelay");
        let lease = format!("leases.coordination.k8s.io/{MANAGER}");
        let another = "leases.coordination.k8s.io/another";
        for (what, allowed) in [
            (["get", lease.as_str()], true),
            (["update", lease.as_str()], true),
            (["create", "leases.coordination.k8s.io"], true),
            (["delete", lease.as_str()], false),
            (["get", another], false),
            (["update", another], false),
            (["list", "leases.coordination.k8s.io"], false),
        ] {
            assert_eq!(can_i(&plane, &operator, &namespace, &what).await, allowed, "{variant}: {what:?}");
        }
        assert!(
            !can_i(&plane, &operator, "default", &["get", &lease]).await,
            "{variant}: the Lease Role reaches beyond the operator's namespace"
        );
        if components.contains(&"namespaced") {
            for what in [
                ["list", TRANSACTION_RELAYS],
                ["watch", TRANSACTION_RELAYS],
                ["get", "secrets"],
                ["watch", "secrets"],
                ["create", "events.events.k8s.io"],
            ] {
                assert!(can_i(&plane, &operator, &namespace, &what).await, "{variant}: {what:?}");
                assert!(!can_i(&plane, &operator, "default", &what).await, "{variant}: {what:?} in default");
            }
            let status = ["patch", TRANSACTION_RELAYS, "--subresource=status"];
            assert!(can_i(&plane, &operator, &namespace, &status).await, "{variant}");
            assert!(!can_i(&plane, &operator, &namespace, &["patch", TRANSACTION_RELAYS]).await, "{variant}");
        }
    }
}

/// What the namespaced install grants is all the operator needs: it takes
/// the Lease, and writes a relay's status and Events, in its namespace.
#[tokio::test]
async fn the_operator_leads_and_writes_status_under_the_namespaced_installs_role_alone() {
    let plane = ControlPlane::shared();
    plane.install().await;
    let namespace = format!("txr-{}-{}", std::process::id(), unique());
    let (_, documents) = render(&plane, "namespaced", &["namespaced"], &namespace).await;
    plane.ok(&["create", "namespace", &namespace], None).await;
    apply_namespaced(&plane, &documents).await;
    let cluster = Cluster {
        admin: plane.client().await,
        operator_kubeconfig: token_kubeconfig(&plane, &namespace, "txrelay").await,
        namespace,
        plane,
    };
    let operator = cluster.operator("scoped-a").await;
    // Its Secrets do not exist: reconciled, and refused, without a database.
    let out = cluster.apply_relay("scoped", "s_scoped", json!({})).await;
    assert!(out.ok, "{}", out.stderr);
    cluster
        .wait_relay("scoped", Duration::from_secs(30), "Ready=False with SecretNotFound", |relay| {
            ready(relay) == Some("False")
                && relay.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "SecretNotFound"))
        })
        .await;
    let holder = cluster.ok(&["get", "lease", MANAGER, "-o", "jsonpath={.spec.holderIdentity}"], None).await;
    assert_eq!(holder.trim(), "scoped-a", "{}", operator.logs());
    let cluster_ref = &cluster;
    wait_until(Duration::from_secs(30), "a SecretNotFound Event", || async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let text = cluster_ref.ok(&["get", "events.events.k8s.io", "-o", "json"], None).await;
        let list: Value = serde_json::from_str(&text).unwrap();
        list["items"].as_array().into_iter().flatten().any(|e| e["reason"] == "SecretNotFound")
    })
    .await;
    let logs = operator.logs();
    assert!(!logs.contains("forbidden") && !logs.contains("Forbidden"), "{logs}");
}

/// Nothing fills the built-in aggregated roles here (no controller-manager
/// runs): does what its clusterrole-aggregation controller does, with the
/// selectors the API server's own `role` carries.
async fn aggregate(plane: &ControlPlane, role: &str) {
    let built_in: Value =
        serde_json::from_str(&plane.ok(&["get", "clusterrole", role, "-o", "json"], None).await).unwrap();
    let mut rules: Vec<Value> = Vec::new();
    let selectors = built_in["aggregationRule"]["clusterRoleSelectors"].as_array().expect("an aggregated role");
    for selector in selectors {
        let labels: Vec<String> = selector["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(key, value)| format!("{key}={}", value.as_str().unwrap()))
            .collect();
        let matched: Value = serde_json::from_str(
            &plane.ok(&["get", "clusterroles", "-l", &labels.join(","), "-o", "json"], None).await,
        )
        .unwrap();
        for item in matched["items"].as_array().unwrap() {
            for rule in item["rules"].as_array().into_iter().flatten() {
                if !rules.contains(rule) {
                    rules.push(rule.clone());
                }
            }
        }
    }
    plane.ok(&["patch", "clusterrole", role, "--type=merge", "-p", &json!({"rules": rules}).to_string()], None).await;
}

#[tokio::test]
async fn the_built_in_view_and_edit_roles_take_in_transactionrelays() {
    let plane = ControlPlane::shared();
    plane.install().await;
    let roles = std::fs::read_to_string(AGGREGATED_ROLES).unwrap();
    plane
        .ok(&["apply", "--server-side", "--force-conflicts", "--field-manager=txrelay-tests", "-f", "-"], Some(&roles))
        .await;
    // view first: edit takes in view (the API server labels it aggregate-to-edit).
    aggregate(&plane, "view").await;
    aggregate(&plane, "edit").await;

    let namespace = format!("txr-{}-{}", std::process::id(), unique());
    plane.ok(&["create", "namespace", &namespace], None).await;
    let (viewer, editor) = (format!("viewer-{namespace}"), format!("editor-{namespace}"));
    for (binding, role, user) in [("viewer", "view", &viewer), ("editor", "edit", &editor)] {
        plane
            .ok(
                &[
                    "create",
                    "rolebinding",
                    binding,
                    &format!("--clusterrole={role}"),
                    &format!("--user={user}"),
                    "-n",
                    &namespace,
                ],
                None,
            )
            .await;
    }
    for verb in ["get", "list", "watch"] {
        assert!(can_i(&plane, &viewer, &namespace, &[verb, TRANSACTION_RELAYS]).await, "view: {verb}");
    }
    for verb in ["create", "update", "patch", "delete"] {
        assert!(!can_i(&plane, &viewer, &namespace, &[verb, TRANSACTION_RELAYS]).await, "view: {verb}");
    }
    for verb in ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"] {
        assert!(can_i(&plane, &editor, &namespace, &[verb, TRANSACTION_RELAYS]).await, "edit: {verb}");
    }
    // The status is the operator's; and only where the role is bound.
    for user in [&viewer, &editor] {
        assert!(
            !can_i(&plane, user, &namespace, &["patch", TRANSACTION_RELAYS, "--subresource=status"]).await,
            "{user}"
        );
        assert!(!can_i(&plane, user, "default", &["get", TRANSACTION_RELAYS]).await, "{user}");
    }
    // And kubectl get works as the viewer.
    let out = plane.kubectl(&["get", TRANSACTION_RELAYS, "-n", &namespace, "--as", &viewer], None).await;
    assert!(out.ok, "{}", out.stderr);
}
