//! The checked-in CRD, the deploy/ manifests and the examples: generated,
//! parseable, valid against the schema, and renderable by kustomize.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use txrelay::runtime::config::Manifest;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn crd_schema() -> Value {
    let crd = documents(&root().join("crds/transactionrelays.relay.mykobo.io.yaml")).remove(0);
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// A structural check against an OpenAPI v3 schema: types, required
/// fields, unknown fields, numeric bounds and string patterns we use.
fn violations(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !ok {
        out.push(format!("{path}: expected {}", schema["type"]));
        return;
    }
    if let (Some(number), Some(min)) = (value.as_f64(), schema["minimum"].as_f64())
        && number < min
    {
        out.push(format!("{path}: below {min}"));
    }
    if let (Some(number), Some(max)) = (value.as_f64(), schema["maximum"].as_f64())
        && number > max
    {
        out.push(format!("{path}: above {max}"));
    }
    if let Some(text) = value.as_str()
        && schema["pattern"] == txrelay::duration::PATTERN
        && text.parse::<txrelay::duration::HumanDuration>().is_err()
    {
        out.push(format!("{path}: not a duration"));
    }
    if let Some(object) = value.as_object() {
        let properties = schema["properties"].as_object();
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                out.push(format!("{path}.{}: required", required.as_str().unwrap()));
            }
        }
        for (key, child) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(child_schema) => violations(child, child_schema, &format!("{path}.{key}"), out),
                None if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") => {}
                None if properties.is_some() => out.push(format!("{path}.{key}: unknown field")),
                None => {}
            }
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            violations(item, &schema["items"], &format!("{path}[{i}]"), out);
        }
    }
}

#[test]
fn the_checked_in_crd_is_what_the_code_generates() {
    let generated = txrelay::operator::crd_yaml().unwrap();
    let checked_in = std::fs::read_to_string(root().join("crds/transactionrelays.relay.mykobo.io.yaml")).unwrap();
    assert!(generated == checked_in, "crds/ is stale: run `just generate`");
}

#[test]
fn the_checked_in_crd_reference_is_what_the_code_generates() {
    let generated = txrelay::operator::crd_reference();
    let checked_in = std::fs::read_to_string(root().join("docs/reference/crd.md")).unwrap_or_default();
    assert!(generated == checked_in, "docs/reference/crd.md is stale: run `just generate`");
    for field in ["spec.queue.roleArn", "spec.claimLease", "status.oldestUnsentTime", "status.conditions[].reason"] {
        assert!(generated.contains(&format!("`{field}`")), "{field} is missing from the reference");
    }
}

#[test]
fn every_manifest_and_example_parses() {
    let mut count = 0;
    for dir in ["deploy", "examples", "crds"] {
        for file in yaml_files(&root().join(dir)) {
            for document in documents(&file) {
                if file.ends_with("rules_test.yaml") {
                    continue;
                }
                assert!(document["apiVersion"].is_string(), "{}: no apiVersion", file.display());
                assert!(document["kind"].is_string(), "{}: no kind", file.display());
                count += 1;
            }
        }
    }
    assert!(count > 15, "{count} documents");
}

#[test]
fn the_examples_validate_against_the_generated_crd_schema() {
    let schema = crd_schema();
    let mut relays = 0;
    for file in yaml_files(&root().join("examples")) {
        for document in documents(&file) {
            if document["kind"] != "TransactionRelay" {
                continue;
            }
            let mut problems = Vec::new();
            violations(&document, &schema, "", &mut problems);
            assert!(problems.is_empty(), "{}: {problems:?}", file.display());
            let text = serde_json::to_string(&document).unwrap();
            Manifest::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            relays += 1;
        }
    }
    assert_eq!(relays, 2);

    // The checker itself catches what the API server would refuse.
    let mut bad: Value = serde_json::from_str(
        r#"{"apiVersion":"relay.mykobo.io/v1alpha1","kind":"TransactionRelay","metadata":{"name":"x"},
            "spec":{"batchSize":5000,"retryInterval":"soon","typo":1,"database":{"secretRef":{"name":"d"}}}}"#,
    )
    .unwrap();
    let mut problems = Vec::new();
    violations(&bad, &schema, "", &mut problems);
    problems.sort();
    assert_eq!(
        problems,
        [
            ".spec.batchSize: above 1000",
            ".spec.queue: required",
            ".spec.retryInterval: not a duration",
            ".spec.typo: unknown field"
        ]
    );
    bad["spec"] = Value::Null;
    assert!(Manifest::parse(&bad.to_string()).is_err());
}

fn kustomize(dir: &str) -> Vec<Value> {
    let output =
        Command::new("kubectl").args(["kustomize", dir]).current_dir(root()).output().expect("kubectl is installed");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_saphyr::from_multiple(&String::from_utf8(output.stdout).unwrap()).unwrap()
}

/// The install's variants: deploy/ with these components of
/// deploy/components/, as docs/install.md shows them combined.
pub const VARIANTS: &[(&str, &[&str])] = &[
    ("default", &[]),
    ("namespaced", &["namespaced"]),
    ("monitoring", &["monitoring"]),
    ("gateway", &["gateway"]),
    ("everything", &["namespaced", "monitoring", "gateway"]),
];

/// Kinds without a namespace in the install.
pub const CLUSTER_SCOPED: [&str; 4] = ["Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"];

/// Writes a user's overlay of deploy/ with `components` (and `namespace`),
/// under .run/ (kustomize refuses an overlay inside the base it names, and
/// absolute paths to it); returns its absolute directory.
pub fn overlay(variant: &str, components: &[&str], namespace: Option<&str>) -> PathBuf {
    let dir =
        root().join(".run/kustomize").join(format!("{variant}-{}-{}", std::process::id(), crate::common::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::from(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../../deploy\n",
    );
    if !components.is_empty() {
        text.push_str("components:\n");
        for component in components {
            text.push_str(&format!("  - ../../../deploy/components/{component}\n"));
        }
    }
    if let Some(namespace) = namespace {
        text.push_str(&format!("namespace: {namespace}\n"));
    }
    std::fs::write(dir.join("kustomization.yaml"), text).unwrap();
    dir
}

/// Each variant, rendered by kustomize: (name, components, documents).
fn rendered_variants() -> Vec<(&'static str, &'static [&'static str], Vec<Value>)> {
    VARIANTS
        .iter()
        .map(|(variant, components)| {
            let dir = overlay(variant, components, None);
            let rendered = kustomize(dir.to_str().unwrap());
            let _ = std::fs::remove_dir_all(dir);
            (*variant, *components, rendered)
        })
        .collect()
}

fn find<'a>(rendered: &'a [Value], kind: &str, name: &str) -> &'a Value {
    rendered
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn has(rendered: &[Value], kind: &str, name: &str) -> bool {
    rendered.iter().any(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// What every variant keeps: least privilege, a hardened pod, only the /new
/// paths exposed, everything in one namespace and labelled as txrelay's.
fn assert_hardened(variant: &str, components: &[&str], rendered: &[Value]) {
    let namespace = "txrelay-system";
    let namespaced = components.contains(&"namespaced");
    let kinds: Vec<&str> = rendered.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Ingress",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(&kind), "{variant}: missing {kind}: {kinds:?}");
    }

    // The operator's rules: a ClusterRole, or a Role of its namespace.
    let (role_kind, binding_kind) =
        if namespaced { ("Role", "RoleBinding") } else { ("ClusterRole", "ClusterRoleBinding") };
    let role = find(rendered, role_kind, "txrelay-operator");
    assert_eq!(has(rendered, "ClusterRole", "txrelay-operator"), !namespaced, "{variant}");
    assert_eq!(has(rendered, "ClusterRoleBinding", "txrelay-operator"), !namespaced, "{variant}");
    assert_eq!(has(rendered, "Role", "txrelay-operator"), namespaced, "{variant}");
    let rules = role["rules"].as_array().unwrap().clone();
    let verbs = |resource: &str| -> Vec<String> {
        let rule = rules.iter().find(|r| r["resources"].as_array().unwrap().iter().any(|x| x == resource)).unwrap();
        rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(verbs("transactionrelays"), ["get", "list", "watch"], "{variant}");
    assert_eq!(verbs("transactionrelays/status"), ["get", "patch"], "{variant}");
    assert_eq!(verbs("secrets"), ["get", "list", "watch"], "{variant}");
    assert_eq!(verbs("events"), ["create", "patch"], "{variant}");
    assert_eq!(rules.len(), 4, "{variant}: the Lease has a Role of its own: {rules:?}");
    let binding = find(rendered, binding_kind, "txrelay-operator");
    assert_eq!(binding["roleRef"]["kind"], role_kind, "{variant}");
    assert_eq!(binding["roleRef"]["name"], "txrelay-operator", "{variant}");
    for binding in rendered.iter().filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding") {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "txrelay", "namespace": namespace}]),
            "{variant}: {}",
            binding["metadata"]["name"]
        );
    }

    let deployment = find(rendered, "Deployment", "txrelay");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "txrelay");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert_eq!(container["args"][0], "operator");
    // The Lease's namespace, and the watched one in a namespaced install.
    let env = container["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "POD_NAMESPACE" && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"),
        "{variant}: {env:?}"
    );
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args.contains(&"--namespace=$(POD_NAMESPACE)"), namespaced, "{variant}: {args:?}");

    let ingress_paths: Vec<&str> = find(rendered, "Ingress", "txrelay")["spec"]["rules"][0]["http"]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert!(
        ingress_paths.iter().all(|p| p.ends_with("new") || p.ends_with("new$")),
        "{variant}: only /new paths: {ingress_paths:?}"
    );

    for document in rendered {
        let (kind, name) = (document["kind"].as_str().unwrap(), &document["metadata"]["name"]);
        if CLUSTER_SCOPED.contains(&kind) {
            assert!(document["metadata"]["namespace"].is_null(), "{variant}: {kind} {name} has a namespace");
        } else {
            assert_eq!(document["metadata"]["namespace"], namespace, "{variant}: {kind} {name}");
        }
        assert_eq!(
            document["metadata"]["labels"]["app.kubernetes.io/part-of"], "txrelay",
            "{variant}: {kind} {name} is not labelled as txrelay's"
        );
    }

    let service = find(rendered, "Service", "txrelay");
    let service_port = |name: &str| {
        service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["port"].clone()
    };
    let monitoring = components.contains(&"monitoring");
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert_eq!(has(rendered, kind, "txrelay"), monitoring, "{variant}: {kind}");
    }
    if monitoring {
        // The ServiceMonitor scrapes the Service's metrics port.
        let monitor = find(rendered, "ServiceMonitor", "txrelay");
        for (label, value) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&service["metadata"]["labels"][label], value, "{variant}: the ServiceMonitor selects {label}");
        }
        assert!(service_port(monitor["spec"]["endpoints"][0]["port"].as_str().unwrap()).is_u64(), "{variant}");
        // The dashboard, whole, where Grafana's sidecar looks.
        let dashboard = find(rendered, "ConfigMap", "txrelay-dashboard");
        assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1", "{variant}");
        let shipped: Value = serde_json::from_str(dashboard["data"]["txrelay.json"].as_str().unwrap()).unwrap();
        let file: Value =
            serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/txrelay.json")).unwrap())
                .unwrap();
        assert!(shipped == file, "{variant}: the ConfigMap's dashboard is not deploy/grafana/txrelay.json");
    }
    let gateway = components.contains(&"gateway");
    assert_eq!(has(rendered, "HTTPRoute", "txrelay"), gateway, "{variant}");
    if gateway {
        for rule in find(rendered, "HTTPRoute", "txrelay")["spec"]["rules"].as_array().unwrap() {
            for matched in rule["matches"].as_array().unwrap() {
                let path = matched["path"]["value"].as_str().unwrap();
                assert!(path.ends_with("/new"), "{variant}: the HTTPRoute exposes {path}");
            }
            for backend in rule["backendRefs"].as_array().unwrap() {
                assert_eq!(backend["name"], "txrelay", "{variant}");
                assert_eq!(backend["port"], service_port("http"), "{variant}: the HTTPRoute's port is not the API's");
            }
        }
        let policy = find(rendered, "NetworkPolicy", "txrelay-gateway");
        assert_eq!(policy["spec"]["ingress"][0]["ports"], json!([{"protocol": "TCP", "port": 8080}]), "{variant}");
    }
}

#[test]
fn kustomize_renders_a_hardened_least_privilege_install() {
    assert_hardened("deploy", &[], &kustomize("deploy"));
    let prometheus = kustomize("deploy/prometheus");
    let kinds: Vec<&str> = prometheus.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["PrometheusRule", "ServiceMonitor"]);
    let grafana = kustomize("deploy/grafana");
    let kinds: Vec<&str> = grafana.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap"]);
}

#[test]
fn every_install_variant_renders_and_stays_hardened() {
    for (variant, components, rendered) in rendered_variants() {
        assert_hardened(variant, components, &rendered);
    }
}

/// install.yaml is deploy/ as kustomize renders it now, for this version.
#[test]
fn install_yaml_is_deploy_rendered_for_this_version() {
    let version = env!("CARGO_PKG_VERSION");
    let text = std::fs::read_to_string(root().join("install.yaml")).unwrap();
    assert!(
        text.starts_with(&format!("# txrelay {version}:")),
        "install.yaml is not for version {version}: run scripts/render-install.sh"
    );
    let checked_in: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let rendered = kustomize("deploy");
    assert_eq!(checked_in.len(), rendered.len(), "install.yaml is stale: run scripts/render-install.sh");
    for (old, new) in checked_in.iter().zip(&rendered) {
        assert!(
            old == new,
            "install.yaml is stale at {} {}: run scripts/render-install.sh",
            new["kind"],
            new["metadata"]["name"]
        );
    }
    let image = &find(&rendered, "Deployment", "txrelay")["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(
        image,
        &json!(format!("ghcr.io/mykobo/txrelay:{version}")),
        "deploy/kustomization.yaml's image tag is not the crate's version"
    );
}

/// The leader-election Lease is no cluster-wide grant: a Role of the
/// operator's namespace, by name wherever RBAC allows it.
#[test]
fn the_lease_is_a_role_of_the_operators_namespace_limited_to_its_lease() {
    let lease = crate::real_cluster::MANAGER;
    for (variant, _, rendered) in rendered_variants() {
        let grants_leases = |d: &&Value| {
            d["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["resources"].as_array().unwrap().iter().any(|x| x == "leases"))
        };
        let holders: Vec<&Value> = rendered.iter().filter(grants_leases).collect();
        assert_eq!(holders.len(), 1, "{variant}: {holders:?}");
        let role = holders[0];
        assert_eq!(role["kind"], "Role", "{variant}: leases are granted by a {}", role["kind"]);
        let deployment = find(&rendered, "Deployment", "txrelay");
        assert_eq!(role["metadata"]["namespace"], deployment["metadata"]["namespace"], "{variant}");
        let mut verbs = Vec::new();
        for rule in role["rules"].as_array().unwrap() {
            assert_eq!(rule["apiGroups"], json!(["coordination.k8s.io"]), "{variant}");
            assert_eq!(rule["resources"], json!(["leases"]), "{variant}");
            let rule_verbs: Vec<&str> = rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            if rule_verbs == ["create"] {
                // RBAC authorizes a create before the object has a name.
                assert!(rule["resourceNames"].is_null(), "{variant}: {rule}");
            } else {
                assert_eq!(rule["resourceNames"], json!([lease]), "{variant}: {rule}");
            }
            verbs.extend(rule_verbs);
        }
        verbs.sort_unstable();
        assert_eq!(verbs, ["create", "get", "update"], "{variant}");
        let name = role["metadata"]["name"].as_str().unwrap();
        let binding = rendered
            .iter()
            .find(|d| d["kind"] == "RoleBinding" && d["roleRef"]["kind"] == "Role" && d["roleRef"]["name"] == name)
            .unwrap_or_else(|| panic!("{variant}: nothing binds the Role {name}"));
        assert_eq!(binding["metadata"]["namespace"], role["metadata"]["namespace"], "{variant}");
        let account = &deployment["spec"]["template"]["spec"]["serviceAccountName"];
        assert_eq!(binding["subjects"][0]["name"], *account, "{variant}");
    }
}

/// As cert-manager ships them: the built-in view, edit and admin roles take
/// in TransactionRelays; the status stays the operator's.
#[test]
fn aggregated_view_and_edit_roles_open_transactionrelays_to_the_built_in_roles() {
    let crd = documents(&root().join("crds/transactionrelays.relay.mykobo.io.yaml")).remove(0);
    let (group, plural) = (crd["spec"]["group"].clone(), crd["spec"]["names"]["plural"].clone());
    for (variant, _, rendered) in rendered_variants() {
        let aggregates_to = |name: &str| -> Vec<String> {
            let labels = find(&rendered, "ClusterRole", name)["metadata"]["labels"].as_object().unwrap().clone();
            let mut roles: Vec<String> = labels
                .iter()
                .filter(|(_, value)| *value == "true")
                .filter_map(|(key, _)| key.strip_prefix("rbac.authorization.k8s.io/aggregate-to-").map(str::to_owned))
                .collect();
            roles.sort();
            roles
        };
        assert_eq!(aggregates_to("txrelay-view"), ["admin", "edit", "view"], "{variant}");
        assert_eq!(aggregates_to("txrelay-edit"), ["admin", "edit"], "{variant}");
        assert_eq!(
            find(&rendered, "ClusterRole", "txrelay-view")["rules"],
            json!([{"apiGroups": [group], "resources": [plural], "verbs": ["get", "list", "watch"]}]),
            "{variant}"
        );
        assert_eq!(
            find(&rendered, "ClusterRole", "txrelay-edit")["rules"],
            json!([{"apiGroups": [group], "resources": [plural],
                    "verbs": ["create", "update", "patch", "delete", "deletecollection"]}]),
            "{variant}"
        );
    }
}

/// The krew manifest installs this version's binary as kubectl-txr, the name
/// under which it takes the relay as kubectl takes a resource; the release
/// script fills in each archive's sha256, or refuses without it.
#[test]
fn the_krew_manifest_installs_this_version_as_kubectl_txr() {
    let version = env!("CARGO_PKG_VERSION");
    let manifest = documents(&root().join("deploy/krew/txr.yaml")).remove(0);
    assert_eq!(manifest["apiVersion"], "krew.googlecontainertools.github.com/v1alpha2");
    assert_eq!(manifest["kind"], "Plugin");
    assert_eq!(manifest["metadata"]["name"], "txr");
    assert_eq!(manifest["spec"]["version"], format!("v{version}"), "deploy/krew/txr.yaml is not for {version}");
    let platforms = manifest["spec"]["platforms"].as_array().unwrap();
    assert!(platforms.len() >= 2, "{platforms:?}");
    let archive = |platform: &Value| platform["uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    for platform in platforms {
        assert_eq!(platform["bin"], "kubectl-txr");
        assert_eq!(platform["files"], json!([{"from": "txrelay", "to": "kubectl-txr"}]));
        let uri = platform["uri"].as_str().unwrap();
        assert!(uri.starts_with(&format!("https://github.com/mykobo/txrelay/releases/download/v{version}/")), "{uri}");
        assert!(
            platform["selector"]["matchLabels"]["os"].is_string()
                && platform["selector"]["matchLabels"]["arch"].is_string()
        );
    }

    let dir = std::env::temp_dir().join(format!("txrelay-krew-{}-{}", std::process::id(), crate::common::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    for platform in platforms {
        std::fs::write(dir.join(archive(platform)), archive(platform)).unwrap();
    }
    let script = root().join("scripts/krew-manifest.sh");
    let output = Command::new(&script).arg(&dir).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let filled = documents(&dir.join("txr.yaml")).remove(0);
    let filled_platforms = filled["spec"]["platforms"].as_array().unwrap();
    assert_eq!(filled_platforms.len(), platforms.len());
    for (platform, template) in filled_platforms.iter().zip(platforms) {
        let sum = Command::new("sha256sum").arg(dir.join(archive(template))).output().unwrap();
        let expected = String::from_utf8(sum.stdout).unwrap().split_whitespace().next().unwrap().to_owned();
        assert_eq!(platform["sha256"], expected, "{}", archive(template));
        assert_eq!(platform["uri"], template["uri"]);
    }

    std::fs::remove_file(dir.join("txr.yaml")).unwrap();
    std::fs::remove_file(dir.join(archive(&platforms[0]))).unwrap();
    let output = Command::new(script).arg(&dir).output().unwrap();
    assert!(!output.status.success(), "a manifest without an archive's sha256 was written");
    assert!(!dir.join("txr.yaml").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Every metric a dashboard panel or an alert uses is one the relay exports.
#[test]
fn the_dashboard_and_alerts_use_only_exported_metrics() {
    let metrics = txrelay::metrics::Metrics::new();
    let relay = metrics.relay("ns/name");
    relay.set_backlog(1, 1, 1.0);
    relay.accepted(txrelay::metrics::Accepted::Created);
    relay.sent(txrelay::metrics::SendPath::Inline, 1);
    relay.send_failures(txrelay::metrics::FailureLabel::Permanent, 1);
    relay.set_queue_reachable(true);
    relay.set_ready(true);
    relay.sweep_duration().observe(0.1);
    relay.send_batch_size(10);
    relay.send_outcome_unknown(1);
    relay.commit_outcome_unknown();
    relay.unsent_drift_repaired(1);
    relay.set_held_wallets(1);
    relay.set_vacuum(1, 1.0);
    metrics.observe_http("/new", 201, 0.01);
    metrics.observe_http("/new", 401, 0.01);
    metrics.reconcile_total.inc();
    metrics.reconcile_errors.with_label_values(&["SecretNotFound"]).inc();
    let exported = metrics.render();

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/txrelay.json")).unwrap()).unwrap();
    let titles: Vec<String> =
        dashboard["panels"].as_array().unwrap().iter().map(|p| p["title"].as_str().unwrap().to_lowercase()).collect();
    for wanted in [
        "backlog",
        "oldest",
        "send rate",
        "failure rate",
        "sweep duration",
        "http latency",
        "queue reachable",
        "ready",
        "reconcile",
        "memory",
    ] {
        assert!(titles.iter().any(|t| t.contains(wanted)), "no {wanted} panel in {titles:?}");
    }
    let mut expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    let rules = documents(&root().join("deploy/prometheus/rules.yaml")).remove(0);
    expressions.extend(
        rules["spec"]["groups"][0]["rules"].as_array().unwrap().iter().map(|r| r["expr"].as_str().unwrap().to_owned()),
    );
    for expression in &expressions {
        for word in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            // process_* (memory against the limit) come from the process
            // collector, on Linux only; kube_* from kube-state-metrics.
            if word.starts_with("process_") && cfg!(target_os = "linux") {
                assert!(exported.contains(&format!("# TYPE {word} ")), "{word} (in `{expression}`) is not exported");
            }
            if let Some(name) = word.strip_prefix("txrelay_") {
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .fold(format!("txrelay_{name}"), |n, s| n.strip_suffix(s).map(str::to_owned).unwrap_or(n));
                assert!(exported.contains(&format!("# TYPE {base} ")), "{base} (in `{expression}`) is not exported");
            }
        }
    }
}

/// `rust-version` is what the dependencies really need: the highest
/// `rust-version` among the crates built on Linux (the platform txrelay
/// ships for), so neither a stale floor nor one nobody needs.
// The platform txrelay ships for, whose crates the build has fetched.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn rust_version_is_the_highest_the_dependencies_declare() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let version = |text: &str| -> Vec<u64> { text.split('.').map(|part| part.parse().unwrap()).collect() };
    let resolved: std::collections::HashSet<&str> =
        metadata["resolve"]["nodes"].as_array().unwrap().iter().filter_map(|n| n["id"].as_str()).collect();
    let packages = metadata["packages"].as_array().unwrap();
    let (needed, by) = packages
        .iter()
        .filter(|p| resolved.contains(p["id"].as_str().unwrap_or_default()) && p["name"] != "txrelay")
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?.to_owned())))
        .max()
        .expect("dependencies declare a rust-version");
    let ours = packages.iter().find(|p| p["name"] == "txrelay").unwrap()["rust_version"].as_str().unwrap();
    let mut ours = version(ours);
    ours.resize(3, 0);
    let mut needed_full = needed.clone();
    needed_full.resize(3, 0);
    assert_eq!(ours, needed_full, "Cargo.toml's rust-version; {by} needs {needed:?}");
}

/// The vendored sqlx-core (`[patch.crates-io]`) is in the build: once an
/// upgrade stops using it, Cargo only warns, and the copy would linger.
#[test]
fn the_vendored_sqlx_core_patch_is_used() {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    assert!(
        !lock.contains("[[patch.unused]]"),
        "Cargo.lock lists an unused patch: remove it from Cargo.toml and vendor/"
    );
    let entry = lock.split("[[package]]").find(|p| p.contains("name = \"sqlx-core\"")).expect("sqlx-core is locked");
    assert!(!entry.contains("source ="), "sqlx-core comes from a registry, not vendor/sqlx-core:{entry}");
    let vendored = std::fs::read_to_string(root().join("vendor/sqlx-core/Cargo.toml")).unwrap();
    let version = entry.lines().find_map(|l| l.strip_prefix("version = ")).unwrap();
    assert!(
        vendored.contains(&format!("version = {version}")),
        "the lock's sqlx-core {version} is not the vendored one"
    );
}
