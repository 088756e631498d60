//! The operator against a real kube-apiserver (etcd + kube-apiserver, no
//! nodes, no controllers), started by `scripts/test.sh` or `just
//! test-cluster`: the CRD from `crds/` with its schema and CEL rules, the
//! RBAC from `deploy/` enforced on the operator's ServiceAccount, server-side
//! apply, Events and Leases as the API server really treats them.
//!
//! Each test works in a namespace of its own (nothing deletes them: without
//! a controller-manager a deleted namespace stays Terminating, and the
//! control plane is recreated on every run), with its own schema and queue,
//! and runs the `txrelay operator` binary as that namespace's ServiceAccount.

mod changes;
mod end_to_end;
mod events;
mod inspect;
mod install;
mod leader;
mod outage;
mod ownership;
mod plugin_rbac;
mod validation;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use txrelay::spec::TransactionRelay;

use crate::common::sqs::{ACCESS_KEY, REGION, SECRET_KEY};
use crate::common::{INGEST_TOKEN, TestDb, TestQueue, binary, free_port, unique, wait_until};

pub const CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/transactionrelays.relay.mykobo.io.yaml");
pub const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rbac.yaml");
/// The Role and RoleBinding of the leader-election Lease, in txrelay-system.
pub const LEADER_ELECTION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/leader-election.yaml");
pub const CONTROL_PLANE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/control-plane.sh");
/// The operator's field manager, Event reporting controller and Lease name.
pub const MANAGER: &str = "txrelay-operator";
/// Every kubectl call is bounded by this.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);

fn cluster_env(name: &str) -> String {
    crate::common::init_logs();
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the real-cluster tests with `just test` or `just test-cluster`, which start a \
             kube-apiserver (scripts/control-plane.sh) next to PostgreSQL and moto"
        )
    })
}

/// A running control plane: its admin kubeconfig and kubectl.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
}

/// What a kubectl call printed.
#[derive(Debug)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ControlPlane {
    /// The control plane `scripts/test.sh` started for the whole run.
    pub fn shared() -> Self {
        Self {
            kubeconfig: cluster_env("TXRELAY_TEST_KUBECONFIG").into(),
            kubectl: cluster_env("TXRELAY_TEST_KUBECTL").into(),
        }
    }

    /// An admin client.
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig).await
    }

    /// `kubectl ARGS` as the admin, `stdin` piped in; bounded.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl(&self.kubectl, &self.kubeconfig, args, stdin).await
    }

    /// `kubectl ARGS`, which must succeed; returns its stdout.
    pub async fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin).await;
        assert!(out.ok, "kubectl {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
        out.stdout
    }

    /// The CRD from `crds/` and the ClusterRole from `deploy/`, once per
    /// control plane and process (server-side apply: idempotent, and safe
    /// from several tests at once).
    pub async fn install(&self) {
        static INSTALLED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
        if INSTALLED.lock().unwrap().get_or_insert_with(HashSet::new).contains(&self.kubeconfig) {
            return;
        }
        self.ok(&["apply", "--server-side", "--force-conflicts", "--field-manager=txrelay-tests", "-f", CRD], None)
            .await;
        self.ok(
            &["wait", "--for=condition=Established", "--timeout=30s", "crd/transactionrelays.relay.mykobo.io"],
            None,
        )
        .await;
        let role = rbac_documents().0;
        self.ok(
            &["apply", "--server-side", "--force-conflicts", "--field-manager=txrelay-tests", "-f", "-"],
            Some(&role),
        )
        .await;
        INSTALLED.lock().unwrap().get_or_insert_with(HashSet::new).insert(self.kubeconfig.clone());
    }
}

/// deploy/rbac.yaml's ClusterRole, and its ClusterRoleBinding as a template.
fn rbac_documents() -> (String, String) {
    let text = std::fs::read_to_string(RBAC).unwrap();
    let mut role = None;
    let mut binding = None;
    for doc in text.split("\n---\n") {
        if doc.contains("kind: ClusterRoleBinding") {
            binding = Some(doc.to_owned());
        } else if doc.contains("kind: ClusterRole") {
            role = Some(doc.to_owned());
        }
    }
    (role.expect("deploy/rbac.yaml has a ClusterRole"), binding.expect("deploy/rbac.yaml has a ClusterRoleBinding"))
}

async fn kubectl(program: &Path, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(program);
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=20s")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{} runs: {e}", program.display()));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let output = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {KUBECTL_TIMEOUT:?}"))
        .unwrap();
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub async fn client_for(kubeconfig: &Path) -> Client {
    let config = Kubeconfig::read_from(kubeconfig).expect("a readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

/// One test's namespace on a control plane, with the operator's
/// ServiceAccount bound to deploy/'s ClusterRole and to its Lease Role in
/// this namespace (the operator's POD_NAMESPACE), and a kubeconfig with its
/// token.
pub struct Cluster {
    pub plane: ControlPlane,
    pub namespace: String,
    pub admin: Client,
    /// The operator's kubeconfig: the ServiceAccount `txrelay`'s token.
    pub operator_kubeconfig: PathBuf,
}

impl Cluster {
    pub async fn new() -> Self {
        Self::on(ControlPlane::shared()).await
    }

    pub async fn on(plane: ControlPlane) -> Self {
        plane.install().await;
        let namespace = format!("txr-{}-{}", std::process::id(), unique());
        plane.ok(&["create", "namespace", &namespace], None).await;
        plane.ok(&["create", "serviceaccount", "txrelay", "-n", &namespace], None).await;
        let template = rbac_documents().1;
        let binding = template
            .replacen("name: txrelay-operator\nroleRef", &format!("name: txrelay-operator-{namespace}\nroleRef"), 1)
            .replace("namespace: txrelay-system", &format!("namespace: {namespace}"));
        assert!(
            binding.contains(&format!("txrelay-operator-{namespace}")) && binding.contains("name: txrelay\n"),
            "deploy/rbac.yaml's ClusterRoleBinding changed shape; adapt real_cluster::Cluster::on:\n{template}"
        );
        plane.ok(&["apply", "-f", "-"], Some(&binding)).await;
        let lease_role = std::fs::read_to_string(LEADER_ELECTION)
            .unwrap()
            .replace("namespace: txrelay-system", &format!("namespace: {namespace}"));
        plane.ok(&["apply", "-f", "-"], Some(&lease_role)).await;
        let operator_kubeconfig = token_kubeconfig(&plane, &namespace, "txrelay").await;
        let admin = plane.client().await;
        Self { plane, namespace, admin, operator_kubeconfig }
    }

    pub fn relays(&self) -> Api<TransactionRelay> {
        Api::namespaced(self.admin.clone(), &self.namespace)
    }

    /// `kubectl ARGS -n NAMESPACE` as the admin.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut all = args.to_vec();
        all.extend(["-n", self.namespace.as_str()]);
        self.plane.kubectl(&all, stdin).await
    }

    pub async fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin).await;
        assert!(out.ok, "kubectl {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
        out.stdout
    }

    /// The Secrets a relay on `db` and `queue` needs: `db` (url), `sqs`
    /// (moto) and `tokens` (ingest tokens).
    pub async fn secrets(&self, db: &TestDb, queue: &TestQueue) {
        let secret = |name: &str, data: Value| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "stringData": data});
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [
            secret("db", json!({"url": db.url})),
            secret("sqs", json!({"queueUrl": queue.url, "region": REGION, "endpointUrl": queue.endpoint,
                                 "accessKeyId": ACCESS_KEY, "secretAccessKey": SECRET_KEY})),
            secret("tokens", json!({"tokens": INGEST_TOKEN})),
        ]});
        self.ok(&["apply", "-f", "-"], Some(&list.to_string())).await;
    }

    /// `kubectl apply` (client-side, as most users run it) of a relay
    /// manifest; `spec` is merged over the test's database, queue and
    /// ingest tokens.
    pub async fn apply_relay(&self, name: &str, schema: &str, spec: Value) -> Output {
        self.kubectl(&["apply", "-f", "-"], Some(&relay_manifest(name, schema, spec).to_string())).await
    }

    /// The relay once the API server shows `Ready=True` for the current
    /// generation.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> TransactionRelay {
        self.wait_relay(name, timeout, "Ready=True for the current generation", |relay| {
            ready(relay) == Some("True")
                && relay.status.as_ref().and_then(|s| s.observed_generation) == relay.metadata.generation
        })
        .await
    }

    /// Polls the relay until `condition` holds.
    pub async fn wait_relay(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&TransactionRelay) -> bool,
    ) -> TransactionRelay {
        let api = self.relays();
        let seen = Mutex::new(None);
        let message = format!("relay {}/{name}: {what}", self.namespace);
        wait_until(timeout, &message, || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match api.get_opt(name).await {
                Ok(Some(relay)) if condition(&relay) => {
                    *seen.lock().unwrap() = Some(relay);
                    true
                }
                _ => false,
            }
        })
        .await;
        seen.into_inner().unwrap().unwrap()
    }

    /// Starts `txrelay operator` for this namespace as its ServiceAccount.
    pub async fn operator(&self, identity: &str) -> Operator {
        Operator::start(self, identity).await
    }
}

pub fn ready(relay: &TransactionRelay) -> Option<&str> {
    relay.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.status.as_str())
}

pub fn relay_manifest(name: &str, schema: &str, spec: Value) -> Value {
    let mut base = json!({
        "database": {"secretRef": {"name": "db", "key": "url"}, "schema": schema},
        "queue": {"secretRef": {"name": "sqs"}},
        "ingest": {"tokenSecretRef": {"name": "tokens"}},
        "retryInterval": "1s",
    });
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), spec) {
        base.extend(extra);
    }
    json!({"apiVersion": "relay.mykobo.io/v1alpha1", "kind": "TransactionRelay",
           "metadata": {"name": name}, "spec": base})
}

/// A running `txrelay operator`, killed on drop.
pub struct Operator {
    pub child: Child,
    pub identity: String,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Operator {
    async fn start(cluster: &Cluster, identity: &str) -> Self {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!("txrelay-operator-{}-{identity}.log", cluster.namespace));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", &cluster.operator_kubeconfig)
            .env("POD_NAME", identity)
            .env("POD_NAMESPACE", &cluster.namespace)
            // TXRELAY_TEST_OPERATOR_LOG=info,kube_runtime=debug to see the watches.
            .env("RUST_LOG", std::env::var("TXRELAY_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info".into()))
            .arg("operator")
            .arg("--namespace")
            .arg(&cluster.namespace)
            .arg("--listen")
            .arg(api.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("txrelay operator starts");
        let operator = Self { child, identity: identity.into(), api, metrics, log };
        let address = operator.metrics;
        wait_until(Duration::from_secs(20), "the operator answers on its metrics port", || async move {
            tokio::net::TcpStream::connect(address).await.is_ok()
        })
        .await;
        operator
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `POST /relays/{namespace}/{name}/new` with the test's ingest token.
    pub async fn post_new(&self, namespace: &str, name: &str, body: &Value) -> (StatusCode, String) {
        http(self.api, "POST", &format!("/relays/{namespace}/{name}/new"), Some(INGEST_TOKEN), body).await
    }

    pub fn kill(&mut self) {
        self.child.start_kill().expect("the operator is running");
    }
}

/// The admin kubeconfig with `account`'s token instead, and `namespace` as
/// its default.
pub async fn token_kubeconfig(plane: &ControlPlane, namespace: &str, account: &str) -> PathBuf {
    let token = plane.ok(&["create", "token", account, "-n", namespace, "--duration=2h"], None).await;
    let admin = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    let mut replaced = false;
    let config: String = admin
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("token: ") {
                replaced = true;
                format!("    token: {}", token.trim())
            } else {
                line.replace("namespace: default", &format!("namespace: {namespace}"))
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(replaced, "the control plane's kubeconfig has no token line");
    let path = std::env::temp_dir().join(format!("txrelay-kubeconfig-{namespace}-{account}"));
    std::fs::write(&path, config).unwrap();
    path
}

/// `kubectl-txr ARGS` (the binary under the plugin's name) with nothing
/// but `kubeconfig`: no database URL, queue settings or AWS credentials in
/// its environment; everything comes from the cluster.
pub async fn kubectl_txr(plugin: &Path, kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(plugin);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), crate::common::run_to_end(&mut command))
        .await
        .unwrap_or_else(|_| panic!("kubectl-txr {args:?} did not finish within 60 s"))
}

/// One HTTP/1.1 request, bounded by 15 s.
pub async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> (StatusCode, String) {
    crate::common::http_request(address, method, path, token, &[], body).await
}

/// A control plane of the test's own under `.run/`, stopped on drop, for
/// tests that stop the API server.
pub struct OwnControlPlane {
    pub dir: PathBuf,
    pub plane: ControlPlane,
}

impl OwnControlPlane {
    pub async fn start(name: &str) -> Self {
        cluster_env("TXRELAY_TEST_KUBECONFIG");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".run").join(name);
        script(&["start", dir.to_str().unwrap()]).await;
        let plane = ControlPlane { kubeconfig: dir.join("kubeconfig"), kubectl: dir.join("bin/kubectl") };
        Self { dir, plane }
    }

    pub async fn stop_apiserver(&self) {
        script(&["stop-apiserver", self.dir.to_str().unwrap()]).await;
    }

    pub async fn start_apiserver(&self) {
        script(&["start-apiserver", self.dir.to_str().unwrap()]).await;
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = std::process::Command::new(CONTROL_PLANE_SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn script(args: &[&str]) {
    let run = Command::new(CONTROL_PLANE_SCRIPT).args(args).stdout(Stdio::null()).kill_on_drop(true).output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .unwrap_or_else(|_| panic!("control-plane.sh {args:?} did not finish within 90 s"))
        .unwrap();
    assert!(output.status.success(), "control-plane.sh {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

/// A fresh schema (migrated by the operator) and queue for one test.
pub async fn backends() -> (TestDb, TestQueue) {
    (TestDb::unmigrated().await, TestQueue::standard().await)
}
