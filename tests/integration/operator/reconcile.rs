//! The reconciler's own decisions: what a missing Secret, a send-only IAM
//! policy, an unreachable database or an invalid edit make of the status,
//! server-side apply, the janitor, and a Secret change seen by the controller.

use super::*;

#[tokio::test]
async fn a_missing_secret_sets_ready_false_publishes_an_event_and_retries_with_backoff() {
    let db = TestDb::new().await;
    let op = operator(true);
    op.api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN)]);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    let error = reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap_err();
    assert!(matches!(error, Error::SecretNotFound(ref name) if name == "dapp-db"), "{error}");

    let patches = op.api.status_patches();
    assert_eq!(patches.len(), 1);
    let ready = condition(&patches[0]["status"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "SecretNotFound");
    assert!(ready["message"].as_str().unwrap().contains("dapp-db"));
    assert_eq!(ready["observedGeneration"], 1);
    assert_eq!(condition(&patches[0]["status"], "DatabaseReachable")["status"], "Unknown");

    let events = op.api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["reason"], "SecretNotFound");
    assert!(op.relays.is_empty(), "nothing is served");
    assert!(op.api.unexpected().is_empty(), "{:?}", op.api.unexpected());

    let waits: Vec<Duration> = (0..4)
        .map(|_| {
            let action = error_policy(Arc::new(relay.clone()), &error, op.ctx.clone());
            format!("{action:?}")
        })
        .map(|text| parse_requeue(&text))
        .collect();
    assert_eq!(waits, [1, 2, 4, 8].map(Duration::from_secs));
    assert!(op.metrics.render().contains(r#"txrelay_reconcile_errors_total{error="SecretNotFound"} 1"#));
}

fn parse_requeue(action: &str) -> Duration {
    // Action's Debug shows the requeue duration, e.g. `Some(2s)`.
    let start = action.find("Some(").map(|i| i + 5).expect("a requeue");
    let text = &action[start..action[start..].find(')').map(|i| start + i).unwrap()];
    if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().unwrap())
    } else {
        Duration::from_secs_f64(text.trim_end_matches('s').parse().unwrap())
    }
}

#[tokio::test]
async fn a_send_only_iam_policy_reconciles_to_ready_and_sends_tell_the_queue_state() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = crate::common::proxy::SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.send_only_policy = true);
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    put_queue_secret(&op.api, &queue, &proxy.endpoint, None);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.expect("reconciled without GetQueueAttributes");
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("and again");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    assert_eq!(condition(&status, "Ready")["status"], "True", "{status}");
    assert_eq!(proxy.denied(), 1, "asked once, then never again");
    let handle = op.relays.resolve(None).expect("serving");
    let n = unique();
    let submitted = handle.relay.ingest().submit(&new_tx(n, "w")).await.expect("stored");
    assert!(matches!(submitted, txrelay::relay::Submission::Sent(_)), "{submitted:?}");
    assert!(handle.relay.health().borrow().queue_error.is_none());
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn unreachable_database_or_queue_is_reported_without_a_crash() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    op.api.put_secret(NAMESPACE, "dapp-db", &[("url", "postgres://relay:hunter2@127.0.0.1:9/nowhere")]);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    let error = reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap_err();
    assert_eq!(error.reason().as_str(), "DatabaseUnreachable");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    let status = &status;
    assert_eq!(condition(status, "DatabaseReachable")["status"], "False");
    assert_eq!(condition(status, "Ready")["reason"], "DatabaseUnreachable");
    let everything =
        serde_json::to_string(&op.api.requests().iter().map(|r| r.body.clone()).collect::<Vec<_>>()).unwrap();
    assert!(!everything.contains("hunter2"), "the database password never reaches status or Events");

    put_secrets(&op.api, &db, &queue);
    put_queue_secret(&op.api, &queue, "http://127.0.0.1:9", None);
    // An unreachable queue does not fail the reconcile: the relay stores
    // transactions and its sends find out when the queue is back.
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("reconciled");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    let status = &status;
    assert_eq!(condition(status, "QueueReachable")["status"], "False", "{status}");
    assert_eq!(condition(status, "QueueReachable")["reason"], "QueueUnreachable", "{status}");
    assert!(op.api.events().iter().any(|e| e["reason"] == "QueueUnreachable"));
    // The relay runs anyway: transactions are stored and wait for the queue.
    assert_eq!(op.relays.len(), 1);
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn an_invalid_edit_keeps_ready_false_without_flapping_and_does_not_advance_observed_generation() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let (op, good) = with_relay(&db, &queue, "dapp").await;

    let mut bad = good.clone();
    bad.spec.batch_size = 5000;
    bad.metadata.generation = Some(2);
    op.api.put_relay(&bad);
    let error = reconcile(Arc::new(bad.clone()), op.ctx.clone()).await.unwrap_err();
    assert_eq!(error.reason().as_str(), "InvalidSpec");
    let events = op.api.events();
    assert!(
        events.iter().any(|e| e["reason"] == "PreviousConfigurationServing"
            && e["note"].as_str().unwrap_or_default().contains("still serving")),
        "{events:?}"
    );
    // The old configuration keeps serving, and its follower writes status
    // when its health changes: Ready must stay false with the reason.
    let handle = op.relays.resolve(None).expect("the old relay still serves");
    let written = op.api.status_patches().len();
    // A row backing off changes the backlog, which the follower reports.
    // Written backing off from the start, so the relay never sends it.
    db.execute(&raw_insert("waiting", "w", &[("next_attempt_at", "now() + interval '1 hour'")])).await;
    let gauges = handle.relay.outbox().refresh_gauges().await.expect("the backlog is read");
    assert_eq!(gauges.unsent, 1);
    wait_until(Duration::from_secs(30), "the follower writes a status", || async {
        op.api.status_patches().len() > written
    })
    .await;
    for patch in op.api.status_patches().into_iter().skip(written - 1) {
        let status = &patch["status"];
        assert_eq!(condition(status, "Ready")["status"], "False", "{status}");
        assert_eq!(condition(status, "Ready")["reason"], "InvalidSpec");
        assert_eq!(status["observedGeneration"], 1, "generation 2 was not applied: {status}");
    }

    let mut fixed = good.clone();
    fixed.metadata.generation = Some(3);
    op.api.put_relay(&fixed);
    reconcile(Arc::new(fixed), op.ctx.clone()).await.expect("fixed");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(status["observedGeneration"], 3);
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn status_is_written_by_server_side_apply_so_a_cleared_last_error_disappears() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let op = operator(true);
    op.api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN)]);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap_err();
    let failed = op.api.status_patches().last().unwrap()["status"].clone();
    assert!(failed["lastError"].as_str().unwrap_or_default().contains("dapp-db"), "{failed}");

    put_secrets(&op.api, &db, &queue);
    tokio::time::sleep(Duration::from_millis(1100)).await; // the writer's once-a-second spacing
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("recovered");
    let writes: Vec<_> = op.api.requests().into_iter().filter(|r| r.path.ends_with("/status")).collect();
    let last = writes.last().unwrap();
    assert!(last.body["status"].get("lastError").is_none(), "{}", last.body);
    assert_eq!(condition(&last.body["status"], "Ready")["status"], "True");
    for write in &writes {
        assert_eq!(write.content_type, "application/apply-patch+yaml", "server-side apply");
        assert!(write.query.contains("fieldManager=txrelay-operator") && write.query.contains("force=true"));
        assert_eq!(write.body["kind"], "TransactionRelay");
    }
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn the_janitor_forgets_deleted_relays_and_everything_kept_about_them() {
    use kube::runtime::{reflector, watcher};
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    let (running, broken) = (resource(&db, "dapp", 1), resource(&db, "broken", 1));
    let mut broken = broken;
    broken.spec.database.secret_ref.name = "missing".into();
    reconcile(Arc::new(running.clone()), op.ctx.clone()).await.expect("reconciled");
    let error = reconcile(Arc::new(broken.clone()), op.ctx.clone()).await.unwrap_err();
    let _ = error_policy(Arc::new(broken.clone()), &error, op.ctx.clone());
    assert_eq!(op.ctx.backing_off().len(), 1);

    let (store, mut writer) = reflector::store::<TransactionRelay>();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitApply(running.clone()));
    writer.apply_watcher_event(&watcher::Event::InitApply(broken.clone()));
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let (stop, stopped) = watch::channel(false);
    let janitor = tokio::spawn(txrelay::operator::stop_deleted_relays(op.ctx.clone(), store, stopped));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(op.ctx.supervisor.ids().len(), 1, "present relays are kept");

    writer.apply_watcher_event(&watcher::Event::Delete(running.clone()));
    writer.apply_watcher_event(&watcher::Event::Delete(broken.clone()));
    let id = RelayId::new(NAMESPACE, "dapp");
    wait_until(Duration::from_secs(10), "the janitor stops the deleted relay", || async {
        op.ctx.supervisor.ids().is_empty()
    })
    .await;
    wait_until(Duration::from_secs(10), "and forgets its status and backoff", || async {
        op.ctx.status.ids().is_empty() && op.ctx.backing_off().is_empty()
    })
    .await;
    assert!(op.relays.resolve(Some(&id)).is_err());
    let _ = stop.send(true);
    let _ = janitor.await;
}

#[tokio::test]
async fn the_controller_reconfigures_a_relay_when_a_referenced_secret_changes_and_stops_within_the_grace() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let api = FakeApiServer::start();
    put_secrets(&api, &db, &queue);
    api.put_relay(&resource(&db, "dapp", 1));
    let relays = Arc::new(Registry::new(None));
    let options = txrelay::operator::OperatorOptions {
        namespace: None,
        insecure_no_auth: false,
        pool_size: 4,
        grace: Duration::from_secs(5),
        identity: "pod-a".into(),
        lease_namespace: "txrelay-system".into(),
        lease_duration: Duration::from_secs(3),
    };
    let (stop, mut stopped) = watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let operator =
        tokio::spawn(txrelay::operator::run(api.client.clone(), relays.clone(), Metrics::new(), options, shutdown));
    wait_until(Duration::from_secs(20), "the controller starts the relay from the watch", || async {
        relays.resolve(None).is_ok()
    })
    .await;
    let accepts = |token: &str| relays.resolve(None).is_ok_and(|handle| handle.ingest_tokens.accepts(token));
    assert!(accepts(INGEST_TOKEN));

    // Only a Secret changes: the controller's Secret watch must notice. A
    // rotated token applies to the running relay...
    api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", "rotated-ingest-token")]);
    wait_until(Duration::from_secs(10), "the Secret watch applies the rotated token", || async {
        accepts("rotated-ingest-token") && !accepts(INGEST_TOKEN)
    })
    .await;
    // ...and a new queue setting reconfigures it.
    let before = relays.resolve(None).unwrap().relay;
    put_queue_secret(&api, &queue, &queue.endpoint, Some("another-ledger-token"));
    wait_until(Duration::from_secs(10), "the Secret watch reconfigures the relay", || async {
        relays.resolve(None).is_ok_and(|handle| !Arc::ptr_eq(&handle.relay, &before))
    })
    .await;
    wait_until(Duration::from_secs(5), "and says so in an Event", || async {
        api.events().iter().any(|e| e["reason"] == "RelayReconfigured")
    })
    .await;

    let started = std::time::Instant::now();
    let _ = stop.send(true);
    operator.await.unwrap();
    assert!(started.elapsed() <= Duration::from_secs(6), "stopped within the grace period: {:?}", started.elapsed());
    assert!(relays.resolve(None).is_err(), "no relay left serving");
    assert!(api.unexpected().is_empty(), "{:?}", api.unexpected());
}
