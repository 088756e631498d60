//! `kubectl txr` under exactly the Roles of docs/kubectl-plugin-roles.yaml,
//! against a real API server: each command works with its Role, and one
//! short of it is refused with the missing permission named.

use std::path::PathBuf;

use serde_json::json;

use super::{Cluster, kubectl_txr, token_kubeconfig};
use crate::common::{TestDb, TestQueue, binary, unique};

const ROLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/kubectl-plugin-roles.yaml");

/// A ServiceAccount bound to `role` alone, and a kubeconfig with its token.
async fn as_role(cluster: &Cluster, role: &str) -> PathBuf {
    let account = format!("as-{role}");
    cluster.ok(&["create", "serviceaccount", &account], None).await;
    let subject = format!("--serviceaccount={}:{account}", cluster.namespace);
    cluster.ok(&["create", "rolebinding", &account, &format!("--role={role}"), &subject], None).await;
    token_kubeconfig(&cluster.plane, &cluster.namespace, &account).await
}

#[tokio::test]
async fn each_kubectl_txr_command_works_with_exactly_its_documented_role() {
    let cluster = Cluster::new().await;
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    cluster.secrets(&db, &queue).await;
    let out = cluster.apply_relay("dapp", &db.schema, json!({})).await;
    assert!(out.ok, "{}", out.stderr);

    // The documented Roles, for this namespace and this test's Secrets (db,
    // sqs, tokens; no admin tokens).
    let documented = std::fs::read_to_string(ROLES).unwrap();
    let mut roles = documented.clone();
    for (from, to) in [
        ("namespace: payments", format!("namespace: {}", cluster.namespace)),
        // The operator's namespace: here, the test's own.
        ("namespace: txrelay-system", format!("namespace: {}", cluster.namespace)),
        ("\"dapp-db\"", "\"db\"".to_owned()),
        ("\"dapp-sqs\"", "\"sqs\"".to_owned()),
        ("\"dapp-tokens\"", "\"tokens\"".to_owned()),
    ] {
        assert!(roles.contains(from), "docs/kubectl-plugin-roles.yaml has no {from}; adapt this test:\n{documented}");
        roles = roles.replace(from, &to);
    }
    cluster.ok(&["apply", "-f", "-"], Some(&roles)).await;

    let dir = std::env::temp_dir().join(format!("txrelay-plugin-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("kubectl-txr");
    std::os::unix::fs::symlink(binary(), &plugin).unwrap();
    let relay = format!("{}/dapp", cluster.namespace);

    // get: list in the namespace, and nothing more.
    let lister = as_role(&cluster, "txr-get").await;
    let (code, stdout, stderr) = kubectl_txr(&plugin, &lister, &["get", "-n", &cluster.namespace]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("dapp ")), "{stdout}");
    let (code, _, stderr) = kubectl_txr(&plugin, &lister, &["stats", &relay]).await;
    assert_eq!(code, 2, "stats with txr-get only: {stderr}");
    assert!(stderr.contains("cannot get transactionrelays") && stderr.contains("forbidden"), "{stderr}");

    // The operating commands: the relay, its database and queue Secrets.
    let operator = as_role(&cluster, "txr-operate-dapp").await;
    let relay = relay.as_str();
    let commands: [&[&str]; 3] = [&["stats", relay], &["list", relay], &["migrate", relay, "--status"]];
    for args in commands {
        let (code, stdout, stderr) = kubectl_txr(&plugin, &operator, args).await;
        assert_eq!(code, 0, "{args:?} with txr-operate-dapp:\n{stdout}\n{stderr}");
    }
    // doctor also reads the token Secrets: refused, and the Secret named.
    let (_, stdout, _) = kubectl_txr(&plugin, &operator, &["doctor", relay]).await;
    assert!(stdout.contains("cannot get secrets") && stdout.contains("forbidden (reading tokens)"), "{stdout}");

    let doctor = as_role(&cluster, "txr-doctor-dapp").await;
    let (_, stdout, stderr) = kubectl_txr(&plugin, &doctor, &["doctor", relay]).await;
    assert!(stdout.contains("found and valid") && stdout.contains("resolve"), "{stdout}\n{stderr}");
    assert!(!stdout.contains("forbidden"), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
}
