//! Leader election on a real `coordination.k8s.io` Lease: with two operator
//! processes exactly one leads; SIGKILL it and the other takes over within a
//! lease duration and writes status and Events.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::{Value, json};

use super::{Cluster, MANAGER, backends};
use crate::common::wait_until;

/// The operator's lease duration (src/cli/operator.rs).
const LEASE_DURATION: Duration = Duration::from_secs(15);

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt(MANAGER).await.ok().flatten()?.spec?.holder_identity
}

async fn event_instances(cluster: &Cluster, reason: &str) -> Vec<String> {
    let text = cluster.ok(&["get", "events.events.k8s.io", "-o", "json"], None).await;
    let list: Value = serde_json::from_str(&text).unwrap();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["reportingInstance"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn one_of_two_operators_leads_and_the_other_takes_over_within_a_lease_after_the_leader_is_killed() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let mut operators = vec![cluster.operator("op-a").await, cluster.operator("op-b").await];
    let leases: Api<Lease> = Api::namespaced(cluster.admin.clone(), &cluster.namespace);

    let leader = std::sync::Mutex::new(String::new());
    wait_until(Duration::from_secs(30), "one operator holds the Lease", || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match holder(&leases).await {
            Some(h) if h == "op-a" || h == "op-b" => {
                *leader.lock().unwrap() = h;
                true
            }
            _ => false,
        }
    })
    .await;
    let leader = leader.into_inner().unwrap();
    let lease = leases.get(MANAGER).await.unwrap().spec.unwrap();
    assert_eq!(lease.lease_duration_seconds, Some(15));

    assert!(cluster.apply_relay("dapp", &db.schema, json!({})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;
    // Both replicas run the relay, but only the leader publishes.
    wait_until(Duration::from_secs(20), "the RelayStarted Event", || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        !event_instances(&cluster, "RelayStarted").await.is_empty()
    })
    .await;
    assert_eq!(event_instances(&cluster, "RelayStarted").await, std::slice::from_ref(&leader));
    assert_eq!(holder(&leases).await.as_deref(), Some(leader.as_str()), "the leader keeps its Lease");

    // SIGKILL: no release, the Lease must expire.
    let index = operators.iter().position(|o| o.identity == leader).unwrap();
    let mut killed = operators.remove(index);
    let follower = operators.pop().unwrap();
    killed.kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), killed.child.wait()).await.expect("the leader dies");
    let killed_at = Instant::now();
    // The follower judges expiry from when it last saw the Lease change
    // (up to one renewal period before the kill) and tries every third of
    // a lease: it must lead by a lease duration plus one period.
    let bound = LEASE_DURATION + LEASE_DURATION / 3 + Duration::from_secs(2);
    wait_until(bound, "the follower holds the Lease", || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder(&leases).await.as_deref() == Some(follower.identity.as_str())
    })
    .await;
    let took = killed_at.elapsed();
    let lease = leases.get(MANAGER).await.unwrap().spec.unwrap();
    assert!(lease.lease_transitions.unwrap_or(0) >= 1, "{lease:?}");

    // The new leader writes status for an edit made now, and its Events.
    assert!(cluster.apply_relay("dapp", &db.schema, json!({"batchSize": 9})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;
    wait_until(Duration::from_secs(20), "a RelayReconfigured Event from the new leader", || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        event_instances(&cluster, "RelayReconfigured").await.contains(&follower.identity)
    })
    .await;
    eprintln!("leader {leader} killed; {} took over after {took:?}", follower.identity);
}
