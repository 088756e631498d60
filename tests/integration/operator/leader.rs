//! Leader election and what moves with it: status and Events are written
//! by the leader only, expiry is judged by the local clock, and a replica cut
//! off from the API server keeps relaying.

use super::*;

#[tokio::test]
async fn only_the_leader_writes_status_and_events() {
    let db = TestDb::new().await;
    let op = operator(false);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay), op.ctx.clone()).await.unwrap_err();
    assert!(op.api.status_patches().is_empty());
    assert!(op.api.events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn leader_election_judges_expiry_by_the_local_clock_not_the_holders() {
    let api = FakeApiServer::start();
    let elector = |id: &str| {
        LeaderElector::new(api.client.clone(), "txrelay-system", "txrelay-operator", id, Duration::from_secs(15))
    };
    let (one, two, three) = (elector("pod-a"), elector("pod-b"), elector("pod-c"));
    assert!(one.try_lead().await.unwrap(), "the first replica creates and takes the lease");
    assert!(!two.try_lead().await.unwrap(), "a held lease is respected");
    assert!(one.try_lead().await.unwrap(), "the holder renews");
    let lease = api.lease("txrelay-system", "txrelay-operator").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "pod-a");

    // The holder's clock is years behind: its renewTime looks ancient, but it
    // keeps renewing, so it keeps the lease.
    let mut behind = lease.clone();
    behind["spec"]["renewTime"] = Value::String("2020-01-01T00:00:00.000000Z".into());
    api.set_lease("txrelay-system", "txrelay-operator", behind.clone());
    assert!(!two.try_lead().await.unwrap(), "a skewed clock does not hand the lease over");
    tokio::time::advance(Duration::from_secs(10)).await;
    api.set_lease("txrelay-system", "txrelay-operator", behind);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!two.try_lead().await.unwrap(), "renewed 10 s ago by this replica's clock");

    // The holder stops renewing: a lease duration later by *this* replica's
    // clock, another takes over.
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(two.try_lead().await.unwrap(), "unchanged for longer than the lease duration");
    let lease = api.lease("txrelay-system", "txrelay-operator").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "pod-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert!(!one.try_lead().await.unwrap(), "the old holder sees it moved and follows");

    // A dead holder whose clock ran ahead (renewTime in the future) is
    // still replaced once its lease stops changing.
    let mut ahead = lease.clone();
    ahead["spec"]["holderIdentity"] = Value::String("pod-gone".into());
    ahead["spec"]["renewTime"] = Value::String("2100-01-01T00:00:00.000000Z".into());
    api.set_lease("txrelay-system", "txrelay-operator", ahead);
    assert!(!three.try_lead().await.unwrap());
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(three.try_lead().await.unwrap(), "a future renewTime does not hold the lease forever");
    three.release().await;
    assert!(one.try_lead().await.unwrap(), "a released lease is free at once");
}

#[tokio::test]
async fn leadership_moves_status_writing_with_it_and_a_replica_without_the_api_server_keeps_relaying() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let (leading_tx, leading) = watch::channel(false);
    let Operator { api, ctx, relays, .. } = operator_following(FakeApiServer::start(), leading);
    let elector =
        LeaderElector::new(api.client.clone(), "txrelay-system", "txrelay-operator", "pod-a", Duration::from_secs(3));
    let (stop, stopped) = watch::channel(false);
    let election = tokio::spawn(elector.run(leading_tx, stopped));
    let mut leading = ctx.status.leading();
    wait_until(Duration::from_secs(5), "pod-a leads", || {
        let l = *leading.borrow_and_update();
        async move { l }
    })
    .await;

    put_secrets(&api, &db, &queue);
    let relay = resource(&db, "dapp", 1);
    api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), ctx.clone()).await.expect("reconciled");
    assert!(!api.status_patches().is_empty(), "the leader writes status");

    // Another replica takes the lease (its renewals change the record).
    let mut taken = api.lease("txrelay-system", "txrelay-operator").unwrap();
    taken["spec"]["holderIdentity"] = Value::String("pod-b".into());
    api.set_lease("txrelay-system", "txrelay-operator", taken);
    wait_until(Duration::from_secs(2), "pod-a follows within one renew period (1 s)", || {
        let l = *leading.borrow_and_update();
        async move { !l }
    })
    .await;
    let written = api.status_patches().len();
    let events = api.events().len();
    let handle = relays.resolve(None).unwrap();
    handle.relay.ingest().submit(&new_tx(unique(), "w")).await.unwrap();
    reconcile(Arc::new(relay.clone()), ctx.clone()).await.expect("reconciled as a follower");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(api.status_patches().len(), written, "a follower writes no status");
    assert_eq!(api.events().len(), events, "nor Events");

    // pod-b gives the lease up: pod-a leads again and its follower writes.
    api.set_lease("txrelay-system", "txrelay-operator", serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "txrelay-operator", "namespace": "txrelay-system"}, "spec": {}}));
    wait_until(Duration::from_secs(3), "pod-a leads again", || {
        let l = *leading.borrow_and_update();
        async move { l }
    })
    .await;
    handle.relay.ingest().submit(&new_tx(unique(), "w")).await.unwrap();
    wait_until(Duration::from_secs(30), "the status follower writes again", || async {
        api.status_patches().len() > written
    })
    .await;

    // The API server goes away: no leadership, but /new and sweeps go on.
    api.set_down(true);
    wait_until(Duration::from_secs(3), "no leader without the API server", || {
        let l = *leading.borrow_and_update();
        async move { !l }
    })
    .await;
    let submitted = handle.relay.ingest().submit(&new_tx(unique(), "w")).await.expect("/new keeps working");
    assert!(matches!(submitted, txrelay::relay::Submission::Sent(_)), "{submitted:?}");
    let id = insert_created(&db, &new_tx(unique(), "w")).await.id;
    handle.relay.outbox().wake();
    wait_until(Duration::from_secs(10), "the loop keeps sweeping", || async {
        db.store.find_by_id(id).await.unwrap().unwrap().message_id.is_some()
    })
    .await;
    let _ = stop.send(true);
    let _ = election.await;
    ctx.supervisor.stop_all().await;
}
