//! The Kubernetes operator: one relay loop per `TransactionRelay`, started,
//! reconfigured and stopped in-process, its status and Events written by the
//! elected leader, and every replica serving `/new` for every relay.

mod leader;
mod reconcile;
mod secrets;
mod status;
mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub use leader::LeaderElector;
pub use reconcile::{Context, Error, error_policy, reconcile};
pub use status::{DATABASE_REACHABLE, QUEUE_REACHABLE, READY, StatusWriter};
pub use supervisor::{Change, Companion, Supervisor};

use crate::cli::{CliError, Global, OperatorArgs};
use crate::config::ConfigError;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::relay::RelayId;
use crate::relay::directory::Relays;
use crate::spec::TransactionRelay;

const MANAGER: &str = "txrelay-operator";

/// The CustomResourceDefinition as YAML, as `txrelay crd` prints it.
pub fn crd_yaml() -> Result<String, String> {
    serde_saphyr::to_string(&TransactionRelay::crd()).map_err(|e| e.to_string())
}

/// Builds the status writer and the supervisor that spawns a status
/// follower next to every relay loop.
pub fn supervisor(
    client: Client,
    relays: Arc<Relays>,
    metrics: Metrics,
    leading: watch::Receiver<bool>,
    grace: Duration,
) -> (Supervisor, Arc<StatusWriter>) {
    let writer = Arc::new(StatusWriter::new(client, leading));
    let follower = writer.clone();
    let companion: Companion = Arc::new(move |relay, stop| tokio::spawn(follower.clone().follow(relay, stop)));
    (Supervisor::new(relays, metrics, companion, grace), writer)
}

/// The relays whose secret is `secret`: they are reconciled when it changes.
fn relays_using(store: &Store<TransactionRelay>, namespace: &str, secret: &str) -> Vec<ObjectRef<TransactionRelay>> {
    store
        .state()
        .into_iter()
        .filter(|relay| relay.namespace().as_deref() == Some(namespace))
        .filter(|relay| {
            let spec = &relay.spec;
            spec.database.secret_ref.name == secret
                || spec.queue.secret_ref.name == secret
                || spec.ingest.as_ref().is_some_and(|i| i.token_secret_ref.name == secret)
                || spec.admin.as_ref().is_some_and(|a| a.token_secret_ref.name == secret)
        })
        .map(|relay| ObjectRef::from_obj(&*relay))
        .collect()
}

pub async fn run(global: &Global, args: OperatorArgs) -> Result<(), CliError> {
    let default_relay = match &args.default_relay {
        Some(text) => {
            let (namespace, name) = text
                .split_once('/')
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
                .ok_or_else(|| ConfigError::new("--default-relay", "must be namespace/name"))?;
            Some(RelayId::new(namespace, name))
        }
        None => None,
    };
    if args.http.insecure_no_auth {
        warn!("--insecure-no-auth: relays without spec.ingest accept /new without a bearer token; never in production");
    }
    let client = Client::try_default().await.map_err(|e| CliError::failed(format!("Kubernetes client: {e}")))?;
    let metrics = Metrics::new();
    let relays = Arc::new(Relays::new(default_relay));
    let (stop, stopped) = watch::channel(false);

    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("txrelay-{}", fastrand::u64(..)));
    let lease_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "txrelay-system".into());
    let (leading_tx, leading) = watch::channel(false);
    let elector = LeaderElector::new(client.clone(), &lease_namespace, MANAGER, &identity, Duration::from_secs(15));
    let election = tokio::spawn(elector.run(leading_tx, stopped.clone()));

    let (supervisor, writer) = supervisor(client.clone(), relays.clone(), metrics.clone(), leading, args.http.grace());
    let reporter = Reporter { controller: MANAGER.into(), instance: Some(identity) };
    let recorder = Recorder::new(client.clone(), reporter);
    let mut context =
        Context::new(client.clone(), supervisor, writer, recorder, metrics.clone(), args.http.insecure_no_auth);
    context.pool_size = global.db_pool_size;
    let context = Arc::new(context);

    let (relay_api, secret_api): (Api<TransactionRelay>, Api<PartialObjectMeta<KubeSecret>>) = match &args.namespace {
        Some(namespace) => (Api::namespaced(client.clone(), namespace), Api::namespaced(client.clone(), namespace)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (reader, writer) = reflector::store();
    // Spec changes only: status writes do not wake the reconciler.
    let relay_changes = watcher(relay_api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    // Secret metadata only: the operator never caches Secret values.
    let secret_changes = watcher(secret_api, watcher::Config::default()).default_backoff().touched_objects();
    let mapper_store = reader.clone();
    let mut stop_controller = stopped.clone();
    let controller = Controller::for_stream(relay_changes, reader.clone())
        .watches_stream(secret_changes, move |secret| {
            relays_using(&mapper_store, &secret.namespace().unwrap_or_default(), &secret.name_any())
        })
        .graceful_shutdown_on(async move {
            let _ = stop_controller.wait_for(|stop| *stop).await;
        })
        .run(reconcile, error_policy, context.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile attempt failed");
            }
        });
    let controller = tokio::spawn(controller);
    let janitor = tokio::spawn(stop_deleted_relays(context.clone(), reader, stopped.clone()));

    let options = crate::http::HttpOptions { ready_needs_databases: false, ..args.http.options() };
    let state = AppState::new(relays, metrics, options.clone());
    let api = TcpListener::bind(args.http.listen)
        .await
        .map_err(|e| CliError::failed(format!("{}: {e}", args.http.listen)))?;
    let ops = TcpListener::bind(args.http.metrics_listen)
        .await
        .map_err(|e| CliError::failed(format!("{}: {e}", args.http.metrics_listen)))?;
    let wait = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let api_server =
        tokio::spawn(http::serve(api, http::api_router(state.clone()), options.clone(), wait(stopped.clone())));
    let ops_server = tokio::spawn(http::serve(ops, http::ops_router(state), options, wait(stopped.clone())));
    info!(api = %args.http.listen, metrics = %args.http.metrics_listen, "txrelay operator running");

    crate::cli::shutdown_signal().await;
    let grace = args.http.grace();
    info!(grace_ms = grace.as_millis() as u64, "shutting down: every relay stops claiming now");
    // Everything is told at once and stops in parallel, all within one grace
    // period: the relays finish their sends while the HTTP servers drain,
    // so several busy relays stop in the time of one.
    let _ = stop.send(true);
    janitor.abort();
    let deadline = tokio::time::Instant::now() + grace;
    tokio::join!(
        within(deadline, api_server),
        within(deadline, controller),
        within(deadline, election),
        context.supervisor.stop_all(),
    );
    ops_server.abort();
    info!("stopped");
    Ok(())
}

/// Waits for `task` until `deadline`, then aborts it.
async fn within<T>(deadline: tokio::time::Instant, task: tokio::task::JoinHandle<T>) {
    let abort = task.abort_handle();
    if tokio::time::timeout_at(deadline, task).await.is_err() {
        abort.abort();
    }
}

/// The janitor: relays whose resource is gone are stopped within seconds,
/// and everything kept about them is forgotten. (Deletion needs no
/// finalizer, so the operator needs no write access to the resources.)
pub async fn stop_deleted_relays(ctx: Arc<Context>, store: Store<TransactionRelay>, mut stop: watch::Receiver<bool>) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        let present: std::collections::HashSet<RelayId> =
            store.state().iter().map(|r| RelayId::new(r.namespace().unwrap_or_default(), r.name_any())).collect();
        ctx.forget_deleted(&present).await;
        tokio::select! {
            () = tokio::time::sleep(JANITOR_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How often the janitor looks for deleted relays.
pub const JANITOR_EVERY: Duration = Duration::from_secs(2);
