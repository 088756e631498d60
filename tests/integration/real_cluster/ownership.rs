//! Field ownership under server-side apply: the user owns the spec, the
//! operator's field manager owns the status, and neither write conflicts
//! with the other.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use serde_json::json;

use super::{Cluster, MANAGER, backends, relay_manifest};

fn owns(entry: &ManagedFieldsEntry, path: &[&str]) -> bool {
    let mut fields = entry.fields_v1.as_ref().map(|f| &f.0);
    for key in path {
        fields = fields.and_then(|f| f.get(*key));
    }
    fields.is_some()
}

#[tokio::test]
async fn user_applies_of_the_spec_never_conflict_with_the_operators_status_which_it_owns() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-0").await;

    // Server-side apply by a user, as `kubectl apply --server-side` does.
    let manifest = relay_manifest("owned", &db.schema, json!({"batchSize": 10})).to_string();
    cluster.ok(&["apply", "--server-side", "--field-manager=alice", "-f", "-"], Some(&manifest)).await;
    cluster.wait_ready("owned", Duration::from_secs(30)).await;

    // Re-applying the same manifest, and an edit, while the operator keeps
    // writing status: no conflict, no --force-conflicts needed.
    for batch in [10, 11, 12] {
        let manifest = relay_manifest("owned", &db.schema, json!({"batchSize": batch})).to_string();
        let out =
            cluster.kubectl(&["apply", "--server-side", "--field-manager=alice", "-f", "-"], Some(&manifest)).await;
        assert!(out.ok, "apply of batchSize {batch} conflicted:\n{}", out.stderr);
    }
    // Client-side apply (kubectl's default) by another user too.
    let manifest = relay_manifest("owned", &db.schema, json!({"batchSize": 12, "concurrency": 2})).to_string();
    let out = cluster.kubectl(&["apply", "-f", "-"], Some(&manifest)).await;
    assert!(out.ok, "{}", out.stderr);
    let relay = cluster
        .wait_relay(
            "owned",
            Duration::from_secs(30),
            "status of the last generation (batchSize 12, concurrency 2)",
            |r| {
                (r.spec.batch_size, r.spec.concurrency) == (12, 2)
                    && r.status.as_ref().and_then(|s| s.observed_generation) == r.metadata.generation
                    && super::ready(r) == Some("True")
            },
        )
        .await;
    // Created, then 11, 12, and concurrency 2: the same manifest twice is no edit.
    assert_eq!(relay.metadata.generation, Some(4));

    let managed = relay.metadata.managed_fields.clone().unwrap_or_default();
    let summary: Vec<_> =
        managed.iter().map(|m| (m.manager.clone(), m.operation.clone(), m.subresource.clone())).collect();
    let status_owners: Vec<&ManagedFieldsEntry> = managed.iter().filter(|m| owns(m, &["f:status"])).collect();
    assert_eq!(status_owners.len(), 1, "one manager owns the status: {summary:?}");
    let operator_entry = status_owners[0];
    assert_eq!(operator_entry.manager.as_deref(), Some(MANAGER), "{summary:?}");
    assert_eq!(operator_entry.operation.as_deref(), Some("Apply"), "{summary:?}");
    assert_eq!(operator_entry.subresource.as_deref(), Some("status"), "{summary:?}");
    for field in ["f:conditions", "f:unsent", "f:failed", "f:observedGeneration"] {
        assert!(owns(operator_entry, &["f:status", field]), "the operator owns status.{field}: {summary:?}");
    }
    assert!(!owns(operator_entry, &["f:spec"]), "the operator owns no spec field: {summary:?}");
    let alice = managed.iter().find(|m| m.manager.as_deref() == Some("alice")).expect("alice's entry");
    assert!(owns(alice, &["f:spec", "f:database", "f:schema"]), "{summary:?}");
    assert!(!owns(alice, &["f:status"]), "{summary:?}");
    assert!(operator.logs().lines().all(|l| !l.contains("Conflict")), "{}", operator.logs());
}
