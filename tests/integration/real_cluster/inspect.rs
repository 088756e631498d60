//! `kubectl txr status` and `kubectl txr report` against a real API server
//! and a relay the operator runs: what an on-call engineer reads first, and
//! what goes into the incident ticket, with no Secret value in it.

use std::time::Duration;

use serde_json::json;

use super::{Cluster, backends, kubectl_txr};
use crate::common::sqs::SECRET_KEY;
use crate::common::{INGEST_TOKEN, binary, body, unique};

#[tokio::test]
async fn status_shows_conditions_backlog_leader_and_events_and_report_archives_them_without_a_secret() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-0").await;
    let ns = cluster.namespace.clone();
    assert!(cluster.apply_relay("dapp", &db.schema, json!({"suspend": true})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;
    let (status, text) = operator.post_new(&ns, "dapp", &body(unique(), "w-status")).await;
    assert!(status.is_success(), "{text}");
    cluster
        .wait_relay("dapp", Duration::from_secs(30), "status.unsent = 1", |r| {
            r.status.as_ref().and_then(|s| s.unsent) == Some(1)
        })
        .await;

    let dir = std::env::temp_dir().join(format!("txrelay-inspect-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("kubectl-txr");
    std::os::unix::fs::symlink(binary(), &plugin).unwrap();
    let relay = format!("{ns}/dapp");
    let kubeconfig = cluster.plane.kubeconfig.clone();

    let (code, stdout, stderr) =
        kubectl_txr(&plugin, &kubeconfig, &["status", &relay, "--operator-namespace", &ns]).await;
    assert_eq!(code, 0, "{stderr}");
    for expected in [
        "SUSPENDED",
        "Ready              True    Suspended",
        "Database: reachable",
        "Backlog:  1 unsent (oldest ",
        "Leader:   op-0 (renewed ",
        "RelayStarted",
    ] {
        assert!(stdout.contains(expected), "status lacks {expected:?}:\n{stdout}\n{}", operator.logs());
    }

    let archive = dir.join("report.tar");
    let (code, stdout, stderr) = kubectl_txr(
        &plugin,
        &kubeconfig,
        &["report", &relay, "--operator-namespace", &ns, "--output", archive.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let unpacked = std::process::Command::new("tar").arg("xf").arg(&archive).current_dir(&dir).status().unwrap();
    assert!(unpacked.success());
    let root = dir.join("txrelay-report");
    let read = |name: &str| std::fs::read_to_string(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(read("status.txt").contains("Leader:   op-0"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&read("transactionrelay.json")).unwrap()["metadata"]["name"],
        "dapp"
    );
    assert!(read("events.json").contains("RelayStarted"));
    assert!(read("lease.json").contains("op-0"));
    assert!(read("doctor.txt").contains("✓ TransactionRelay"), "{}", read("doctor.txt"));
    assert!(read("metrics.txt").contains("txrelay_unsent_transactions"), "{}", read("metrics.txt"));
    assert!(read("resend-audit.json").starts_with('['), "{}", read("resend-audit.json"));

    // No Secret value anywhere in the archive: the database password, the
    // AWS secret key, the ingest token.
    let password = db
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(user, _)| user.split_once(':'))
        .map(|(_, p)| p.to_owned());
    let bytes = std::fs::read(&archive).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    for secret in [Some(SECRET_KEY.to_owned()), Some(INGEST_TOKEN.to_owned()), password].into_iter().flatten() {
        assert!(!text.contains(&secret), "the report holds a secret value ({} chars)", secret.len());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
