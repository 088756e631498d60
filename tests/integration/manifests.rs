//! The checked-in CRD, the deploy/ manifests and the examples: generated,
//! parseable, valid against the schema, and renderable by kustomize.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use txrelay::config::Manifest;

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
    if let (Some(number), Some(min)) = (value.as_f64(), schema["minimum"].as_f64()) {
        if number < min {
            out.push(format!("{path}: below {min}"));
        }
    }
    if let (Some(number), Some(max)) = (value.as_f64(), schema["maximum"].as_f64()) {
        if number > max {
            out.push(format!("{path}: above {max}"));
        }
    }
    if let Some(text) = value.as_str() {
        if schema["pattern"] == txrelay::duration::PATTERN && text.parse::<txrelay::duration::HumanDuration>().is_err()
        {
            out.push(format!("{path}: not a duration"));
        }
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

#[test]
fn kustomize_renders_a_hardened_least_privilege_install() {
    let rendered = kustomize("deploy");
    let kinds: Vec<&str> = rendered.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Ingress",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(&kind), "missing {kind}: {kinds:?}");
    }
    let find = |kind: &str| rendered.iter().find(|d| d["kind"] == kind).unwrap();

    let rules = find("ClusterRole")["rules"].as_array().unwrap().clone();
    let verbs = |resource: &str| -> Vec<String> {
        let rule = rules.iter().find(|r| r["resources"].as_array().unwrap().iter().any(|x| x == resource)).unwrap();
        rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(verbs("transactionrelays"), ["get", "list", "watch"]);
    assert_eq!(verbs("transactionrelays/status"), ["get", "patch"]);
    assert_eq!(verbs("secrets"), ["get", "list", "watch"]);
    assert_eq!(verbs("events"), ["create", "patch"]);
    assert_eq!(verbs("leases"), ["get", "create", "update"]);

    let deployment = find("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert_eq!(container["args"][0], "operator");

    let ingress_paths: Vec<&str> = find("Ingress")["spec"]["rules"][0]["http"]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert!(
        ingress_paths.iter().all(|p| p.ends_with("new") || p.ends_with("new$")),
        "only /new paths: {ingress_paths:?}"
    );

    let prometheus = kustomize("deploy/prometheus");
    let kinds: Vec<&str> = prometheus.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["PrometheusRule", "ServiceMonitor"]);
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
    relay.sweep_duration().observe(0.1);
    relay.send_batch_size(10);
    relay.send_outcome_unknown(1);
    relay.commit_outcome_unknown();
    relay.unsent_drift_repaired(1);
    relay.set_held_wallets(1);
    metrics.observe_http("/new", 201, 0.01);
    let exported = metrics.render();

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/txrelay.json")).unwrap()).unwrap();
    let titles: Vec<String> =
        dashboard["panels"].as_array().unwrap().iter().map(|p| p["title"].as_str().unwrap().to_lowercase()).collect();
    for wanted in ["backlog", "oldest", "send rate", "failure rate", "sweep duration", "http latency"] {
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
            if let Some(name) = word.strip_prefix("txrelay_") {
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .fold(format!("txrelay_{name}"), |n, s| n.strip_suffix(s).map(str::to_owned).unwrap_or(n));
                assert!(exported.contains(&format!("# TYPE {base} ")), "{base} (in `{expression}`) is not exported");
            }
        }
    }
}
