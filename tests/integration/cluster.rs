//! `--relay NAMESPACE/NAME`, `get` and the `kubectl txr` plugin: the CLI
//! reads a relay and its Secrets through the (fake) API server over HTTP,
//! with a kubeconfig, and acts on the real PostgreSQL and moto.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;

use crate::common::kube_api::FakeApiServer;
use crate::common::sqs::SECRET_KEY;
use crate::common::*;
use crate::operator::{NAMESPACE, put_secrets, resource};

struct Cluster {
    api: FakeApiServer,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

/// A cluster holding the relay `payments/dapp` for `db` and `queue`, with
/// its Secrets.
async fn cluster(db: &TestDb, queue: &TestQueue) -> Cluster {
    let api = FakeApiServer::start();
    put_secrets(&api, db, queue);
    api.put_relay(&resource(db, "dapp", 1));
    let dir = std::env::temp_dir().join(format!("txrelay-kube-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = api.kubeconfig(&dir, NAMESPACE).await;
    Cluster { api, dir, kubeconfig }
}

/// Runs `program` with nothing but the kubeconfig: no database URL, no
/// queue settings, no AWS credentials in its environment.
async fn run(program: &Path, cluster: &Cluster, args: &[&str]) -> (i32, String, String) {
    run_to_end(
        Command::new(program)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("RUST_LOG", "trace")
            .args(args),
    )
    .await
}

async fn txrelay(cluster: &Cluster, args: &[&str]) -> (i32, String, String) {
    run(&binary(), cluster, args).await
}

#[tokio::test]
async fn relay_flag_reads_the_relay_and_its_secrets_from_the_cluster_and_acts_as_with_a_manifest() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let cluster = cluster(&db, &queue).await;
    let waiting = insert_unsent(&db, "w").await;
    let dead = insert_unsent(&db, "w2").await;
    db.execute(&format!("UPDATE transactions SET next_attempt_at = now() + interval '1 hour' WHERE id = {waiting}"))
        .await;
    db.execute(&format!("UPDATE transactions SET failed_at = now(), last_error = 'refused' WHERE id = {dead}")).await;

    let (code, stdout, stderr) = txrelay(&cluster, &["stats", "--relay", "payments/dapp", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let stats: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (stats["total"].as_i64(), stats["unsent"].as_i64(), stats["failed"].as_i64()),
        (Some(2), Some(1), Some(1))
    );
    let mut everything = stdout + &stderr;

    let (code, stdout, stderr) = txrelay(&cluster, &["list", "--relay", "payments/dapp"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&format!("{waiting:>8}")) && stdout.contains(&format!("{dead:>8}")), "{stdout}");
    everything += &(stdout + &stderr);

    let (code, stdout, stderr) = txrelay(&cluster, &["migrate", "--status", "--relay", "payments/dapp"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("20261201000002") && !stdout.contains("pending"), "{stdout}");
    everything += &(stdout + &stderr);

    // TXRELAY_RELAY works as the flag does.
    let output = Command::new(binary())
        .env_clear()
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("TXRELAY_RELAY", "payments/dapp")
        .env("RUST_LOG", "trace")
        .args(["retry-all", "--include-dead"])
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("succeeded: 2"), "{stdout}");
    assert_eq!(queue.receive(2, Duration::from_secs(10)).await.len(), 2, "both sent, with the Secret's credentials");
    everything += &(stdout.into_owned() + &stderr);

    for secret in [SECRET_KEY, "ledger-secret-token", db.url.as_str()] {
        assert!(!everything.contains(secret), "a secret value was printed or logged: {secret}");
    }
    let writes: Vec<_> =
        cluster.api.requests().into_iter().filter(|r| r.method != http::Method::GET).map(|r| r.path).collect();
    assert!(writes.is_empty(), "the CLI only reads the cluster: {writes:?}");
    let _ = std::fs::remove_dir_all(&cluster.dir);
}

#[tokio::test]
async fn relay_flag_errors_name_what_is_missing_with_exit_code_2() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let cluster = cluster(&db, &queue).await;
    let expect = |(code, _, stderr): (i32, String, String), wanted: &str| {
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(wanted), "wanted {wanted:?} in: {stderr}");
        assert_eq!(stderr.trim().lines().filter(|l| l.starts_with("error")).count(), 1, "one line: {stderr}");
    };
    expect(
        txrelay(&cluster, &["stats", "--relay", "payments/ghost"]).await,
        "TransactionRelay payments/ghost not found",
    );
    expect(txrelay(&cluster, &["stats", "--relay", "dapp"]).await, "expected NAMESPACE/NAME");
    expect(
        txrelay(&cluster, &["stats", "--relay", "payments/dapp", "--context", "nowhere"]).await,
        "cannot use context \"nowhere\"",
    );

    cluster.api.put_secret(NAMESPACE, "dapp-db", &[("uri", &db.url)]);
    expect(txrelay(&cluster, &["stats", "--relay", "payments/dapp"]).await, "Secret dapp-db has no key url");
    cluster.api.remove_secret(NAMESPACE, "dapp-db");
    expect(txrelay(&cluster, &["list", "--relay", "payments/dapp"]).await, "Secret dapp-db not found");
    cluster.api.put_secret(NAMESPACE, "dapp-db", &[("url", &db.url)]);
    assert_eq!(txrelay(&cluster, &["stats", "--relay", "payments/dapp"]).await.0, 0, "whole again");

    cluster.api.forbid("secrets", NAMESPACE);
    expect(
        txrelay(&cluster, &["retry-all", "--relay", "payments/dapp"]).await,
        "cannot get secrets in namespace payments: forbidden (reading dapp-db)",
    );
    cluster.api.forbid("transactionrelays", NAMESPACE);
    expect(
        txrelay(&cluster, &["stats", "--relay", "payments/dapp"]).await,
        "cannot get transactionrelays in namespace payments: forbidden",
    );
    let _ = std::fs::remove_dir_all(&cluster.dir);
}

#[tokio::test]
async fn installed_as_kubectl_txr_the_binary_takes_the_relay_as_an_argument_and_lists_relays() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let cluster = cluster(&db, &queue).await;
    let plugin = cluster.dir.join("kubectl-txr");
    std::os::unix::fs::symlink(binary(), &plugin).unwrap();
    insert_unsent(&db, "w").await;

    let (code, stdout, stderr) = run(&plugin, &cluster, &["stats", "payments/dapp", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["total"], 1);

    // A relay that failed, with its status as the operator writes it.
    let mut failing = resource(&db, "payouts", 1);
    failing.status = serde_json::from_value(json!({
        "conditions": [{"type": "Ready", "status": "False", "reason": "QueueUnreachable",
                        "message": "queue refused", "lastTransitionTime": "2026-12-01T00:00:00Z"}],
        "unsent": 12, "failed": 3, "oldestUnsentAgeSeconds": 600,
        "lastError": "AccessDenied: not authorized to perform sqs:SendMessage"
    }))
    .unwrap();
    cluster.api.put_relay(&failing);
    let (code, stdout, stderr) = run(&plugin, &cluster, &["get"]).await;
    assert_eq!(code, 0, "{stderr}");
    let header = stdout.lines().next().unwrap_or_default();
    for column in ["NAME", "READY", "UNSENT", "FAILED", "OLDEST", "AGE", "LAST ERROR"] {
        assert!(header.contains(column), "{stdout}");
    }
    assert!(!header.contains("NAMESPACE"), "one namespace: {stdout}");
    let payouts = stdout.lines().find(|l| l.starts_with("payouts")).unwrap_or_else(|| panic!("{stdout}"));
    let cells: Vec<&str> = payouts.split_whitespace().collect();
    assert_eq!(&cells[..5], ["payouts", "False", "12", "3", "10m"], "{stdout}");
    assert!(payouts.ends_with("AccessDenied: not authorized to perform sqs:SendMessage"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("dapp ")), "{stdout}");

    let (code, stdout, _) = run(&plugin, &cluster, &["get", "-A"]).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("NAMESPACE") && stdout.contains("payments"), "{stdout}");
    let (code, stdout, _) = run(&plugin, &cluster, &["--context", "other", "get"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("no TransactionRelays in namespace elsewhere"), "{stdout}");
    let _ = std::fs::remove_dir_all(&cluster.dir);
}

#[tokio::test]
async fn doctor_passes_a_healthy_relay_and_names_each_broken_dependency_with_a_fix() {
    use crate::common::proxy::SqsProxy;
    use crate::common::sqs::{ACCESS_KEY, REGION};
    use crate::operator::put_queue_secret;
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let cluster = cluster(&db, &queue).await;
    let doctor = |extra: &'static [&'static str]| {
        let cluster = &cluster;
        async move {
            let mut args = vec!["doctor", "--relay", "payments/dapp"];
            args.extend_from_slice(extra);
            txrelay(cluster, &args).await
        }
    };

    let (code, stdout, stderr) = doctor(&["--send-test"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for line in [
        "✓ TransactionRelay payments/dapp found and valid",
        "✓ Secrets dapp-db and dapp-sqs resolve",
        "✓ database reachable, ", // over TLS or not, as the server and sslmode decide
        &format!("✓ schema {} exists, every migration applied", db.schema),
        "✓ VACUUM's horizon is ",
        "✓ queue URL well formed",
        "✓ queue answers (GetQueueAttributes)",
        "✓ test message sent, message id ",
        "✓ ingest tokens set (1)",
    ] {
        assert!(stdout.contains(line), "{line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains('✗'), "{stdout}");
    let test_message = queue.receive(1, Duration::from_secs(10)).await.pop().expect("the test message");
    assert!(test_message.body.as_deref().unwrap_or_default().contains("txrelay_doctor"));
    assert!(!(stdout + &stderr).contains(SECRET_KEY));

    // A send-only IAM policy: the look is denied, which is no failure.
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.send_only_policy = true);
    put_queue_secret(&cluster.api, &queue, &proxy.endpoint, None);
    let (code, stdout, _) = doctor(&[]).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("! GetQueueAttributes is denied"), "{stdout}");
    assert!(stdout.contains("SendMessage cannot be checked without sending"), "{stdout}");
    let (code, stdout, _) = doctor(&["--send-test"]).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("✓ test message sent"), "sending is allowed: {stdout}");

    // A queue that does not exist.
    let missing = format!("{}/000000000000/no-such-queue", queue.endpoint);
    cluster.api.put_secret(
        NAMESPACE,
        "dapp-sqs",
        &[
            ("queueUrl", &missing),
            ("region", REGION),
            ("endpointUrl", &queue.endpoint),
            ("accessKeyId", ACCESS_KEY),
            ("secretAccessKey", SECRET_KEY),
        ],
    );
    let (code, stdout, stderr) = doctor(&[]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("✗ queue refused"), "{stdout}");
    assert!(stderr.contains("1 check failed"), "{stderr}");
    put_queue_secret(&cluster.api, &queue, &queue.endpoint, None);

    // A database out of reach.
    cluster.api.put_secret(NAMESPACE, "dapp-db", &[("url", "postgres://postgres@127.0.0.1:1/nowhere")]);
    let (code, stdout, _) = doctor(&[]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("✗ database unreachable") && stdout.contains("fix: "), "{stdout}");
    assert!(stdout.contains("✓ queue answers"), "the other checks still run: {stdout}");

    // A schema with migrations pending.
    let fresh = TestDb::unmigrated().await;
    cluster.api.put_secret(NAMESPACE, "dapp-db", &[("url", &db.url)]);
    cluster.api.put_relay(&resource(&fresh, "fresh", 1));
    let (code, stdout, _) = txrelay(&cluster, &["doctor", "--relay", "payments/fresh"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains(&format!("✗ schema {} does not exist", fresh.schema)), "{stdout}");
    fresh.execute(&format!("CREATE SCHEMA \"{}\"", fresh.schema)).await;
    let (code, stdout, _) = txrelay(&cluster, &["doctor", "--relay", "payments/fresh"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("migrations pending: 20261126000001"), "pending ones are listed: {stdout}");
    assert!(stdout.contains("fix: run `txrelay migrate`"), "{stdout}");

    // No ingest token.
    let mut without_tokens = resource(&db, "dapp", 2);
    without_tokens.spec.ingest = None;
    cluster.api.put_relay(&without_tokens);
    let (code, stdout, _) = doctor(&[]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("✗ no ingest token"), "{stdout}");
    let _ = std::fs::remove_dir_all(&cluster.dir);
}

#[tokio::test]
async fn doctor_with_a_manifest_checks_the_environment_and_names_what_is_wrong() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    db.store.migrate().await.unwrap();
    let doctor = |manifest: Option<&std::path::Path>, without: Option<&str>| {
        let mut command = command(&db.url, &db.schema, &queue.url, &queue.endpoint);
        command.env("RELAY_API_TOKENS", "a-token").arg("doctor");
        if let Some(path) = manifest {
            command.arg("--config").arg(path);
        }
        if let Some(variable) = without {
            command.env_remove(variable);
        }
        async move { run_to_end(&mut command).await }
    };
    let good = manifest_file(&spec(&db.schema));
    let (code, stdout, stderr) = doctor(Some(&*good), None).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for line in ["✓ manifest ", "✓ settings resolve from the environment", "✓ queue answers", "✓ ingest tokens set (1)"]
    {
        assert!(stdout.contains(line), "{line:?} in:\n{stdout}");
    }

    let mut invalid = spec(&db.schema);
    invalid.batch_size = 5000;
    let bad = manifest_file(&invalid);
    let (code, stdout, _) = doctor(Some(&*bad), None).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("✗ manifest: spec.batchSize"), "the field is named: {stdout}");

    let (code, stdout, _) = doctor(Some(&*good), Some("SQS_QUEUE_URL")).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("✗ ") && stdout.contains("SQS_QUEUE_URL"), "the variable is named: {stdout}");
}
