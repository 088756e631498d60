//! The Kubernetes operator: one relay loop per `TransactionRelay`, started,
//! reconfigured and stopped in-process, its status and Events written by the
//! elected leader, and every replica serving `/new` for every relay.

mod leader;
mod reconcile;
mod reference;
mod secrets;
mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::Backoff as _;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use tokio::sync::watch;
use tracing::info;

pub use crate::runtime::lifecycle::{Change, Companion, Supervisor};
pub use leader::LeaderElector;
pub use reconcile::{Context, Error, error_policy, reconcile};
pub use secrets::resolve;
pub use status::{DATABASE_REACHABLE, QUEUE_REACHABLE, READY, StatusWriter};

use crate::metrics::Metrics;
use crate::runtime::registry::Registry;
use crate::spec::RelayId;
use crate::spec::TransactionRelay;

const MANAGER: &str = "txrelay-operator";

/// The CustomResourceDefinition as YAML, as `txrelay crd` prints it.
pub use reference::crd_reference;

pub fn crd_yaml() -> Result<String, String> {
    serde_saphyr::to_string(&TransactionRelay::crd()).map_err(|e| e.to_string())
}

/// Builds the status writer and the supervisor that spawns a status
/// follower next to every relay loop.
pub fn supervisor(
    client: Client,
    relays: Arc<Registry>,
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

/// What the operator needs to know, as plain values (the CLI builds them
/// from flags and the pod's environment).
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// Watch only this namespace (default: all).
    pub namespace: Option<String>,
    /// Relays without `spec.ingest` accept `/new` without a token.
    pub insecure_no_auth: bool,
    /// Database connections per relay.
    pub pool_size: u32,
    /// How long shutdown and reconfiguration wait for in-flight work.
    pub grace: Duration,
    /// This replica's name in the leader Lease.
    pub identity: String,
    /// Where the leader Lease lives.
    pub lease_namespace: String,
    pub lease_duration: Duration,
}

/// The operator, in the shape of controller-rs' `controller::run`: reconciles
/// every `TransactionRelay` into a running relay in `relays` (which the
/// caller serves over HTTP) until `shutdown` resolves, then stops every
/// relay at once and returns within `options.grace`.
pub async fn run(
    client: Client,
    relays: Arc<Registry>,
    metrics: Metrics,
    options: OperatorOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop, stopped) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);
    let elector = LeaderElector::new(
        client.clone(),
        &options.lease_namespace,
        MANAGER,
        &options.identity,
        options.lease_duration,
    );
    let election = tokio::spawn(elector.run(leading_tx, stopped.clone()));

    let (supervisor, writer) = supervisor(client.clone(), relays, metrics.clone(), leading, options.grace);
    let supervisor = supervisor.with_pool_size(options.pool_size);
    let reporter = Reporter { controller: MANAGER.into(), instance: Some(options.identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let context =
        Arc::new(Context::new(client.clone(), supervisor, writer, recorder, metrics, options.insecure_no_auth));

    let (relay_api, secret_api): (Api<TransactionRelay>, Api<PartialObjectMeta<KubeSecret>>) = match &options.namespace
    {
        Some(namespace) => (Api::namespaced(client.clone(), namespace), Api::namespaced(client.clone(), namespace)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (reader, writer) = reflector::store();
    let _ = context.relays.set(reader.clone());
    // Spec changes only: status writes do not wake the reconciler.
    let relay_changes = relist_when_expired(watcher(relay_api, watcher::Config::default()))
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    // A second watch of the same Secrets, for tokens alone (see
    // `apply_token_changes`).
    let token_api = secret_api.clone();
    // Secret metadata only: the operator never caches Secret values.
    let secret_changes = relist_when_expired(watcher(secret_api, watcher::Config::default())).touched_objects();
    let mapper_store = reader.clone();
    let mut stop_controller = stopped.clone();
    let controller = Controller::for_stream(relay_changes, reader.clone())
        // One backoff for both watches (their errors all reach it), capped
        // low so that the operator catches up within seconds of an outage.
        .trigger_backoff(WatchBackoff::default())
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
    let tokens = tokio::spawn(apply_token_changes(context.clone(), token_api, reader.clone()));
    let janitor = tokio::spawn(stop_deleted_relays(context.clone(), reader, stopped.clone()));
    info!(identity = %options.identity, namespace = options.namespace.as_deref().unwrap_or("(all)"), "operator running");

    shutdown.await;
    info!(grace_ms = options.grace.as_millis() as u64, "operator stopping: every relay stops claiming now");
    // Everything is told at once and stops in parallel, all within one
    // grace period, so several busy relays stop in the time of one.
    let _ = stop.send(true);
    janitor.abort();
    tokens.abort();
    let deadline = tokio::time::Instant::now() + options.grace;
    tokio::join!(within(deadline, controller), within(deadline, election), context.supervisor.stop_all());
    info!("operator stopped");
}

/// Applies a change to a token Secret to the relays that use it at once,
/// outside the controller: the controller runs one reconcile of a resource
/// at a time, and one rebuilding the relay (a migration, a database that
/// does not answer) can take minutes, which a revoked token must not wait
/// for. Only tokens are applied here; everything else waits its turn.
async fn apply_token_changes(
    context: Arc<Context>,
    secrets: Api<PartialObjectMeta<KubeSecret>>,
    relays: reflector::Store<TransactionRelay>,
) {
    let changes = relist_when_expired(watcher(secrets, watcher::Config::default())).touched_objects();
    let mut changes = std::pin::pin!(changes);
    let mut backoff = WatchBackoff::default();
    while let Some(change) = changes.next().await {
        let secret = match change {
            Ok(secret) => {
                backoff.reset();
                secret
            }
            Err(error) => {
                tracing::debug!(%error, "token watch failed; retrying");
                if let Some(wait) = backoff.next() {
                    tokio::time::sleep(wait).await;
                }
                continue;
            }
        };
        let (namespace, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
        for relay in relays.state() {
            let uses = |reference: Option<&crate::spec::SecretKeyRef>| reference.is_some_and(|r| r.name == name);
            let spec = &relay.spec;
            if relay.namespace().as_deref() != Some(namespace.as_str())
                || !(uses(spec.ingest.as_ref().map(|i| &i.token_secret_ref))
                    || uses(spec.admin.as_ref().map(|a| &a.token_secret_ref)))
            {
                continue;
            }
            // A relay still starting too: its tokens are kept for it.
            let id = reconcile::relay_id(&relay);
            let reader = secrets::SecretReader::new(context.client.clone(), &namespace);
            let _ = context.refresh_tokens(&reader, &id, &relay).await;
        }
    }
}

/// Drops 410 Gone from a watch ("too old resource version", as a restarted
/// API server answers a watch resumed from before the restart): the watcher
/// lists again on the next poll by itself, and passed on, the error would
/// make the backoff wait first, once per watch.
fn relist_when_expired<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> {
    events.filter(|event| {
        let expired = matches!(event, Err(watcher::Error::WatchError(status)) if status.code == 410);
        if expired {
            tracing::debug!("watch expired (410 Gone); listing again");
        }
        std::future::ready(!expired)
    })
}

/// The retry delay of the watches (the controller's trigger backoff, which
/// every watch error reaches): 0.5 s doubling to 5 s, plus up to half again
/// of jitter, back to 0.5 s once an event arrives. kube's default grows to
/// 30 s (and up to twice that with its jitter), and a restarted API server
/// answers the first watch with 410 Gone, one more failure: after a 15 s
/// outage an edit then waited over a minute to be applied. Two watches per
/// replica are no load worth backing off further for.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay + delay.mul_f64(fastrand::f64() / 2.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
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
    // Asked again every period rather than awaited once: kube's ready
    // signal wakes only the last of several tasks waiting on it (the
    // controller waits on the same store), and a janitor left asleep never
    // stopped a deleted relay (found against a real API server).
    loop {
        tokio::select! {
            ready = tokio::time::timeout(JANITOR_EVERY, store.wait_until_ready()) => match ready {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) => {}
            },
            _ = stop.changed() => return,
        }
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

#[cfg(test)]
mod tests {
    use super::WatchBackoff;
    use kube::runtime::utils::Backoff;
    use std::time::Duration;

    #[test]
    fn the_watch_backoff_doubles_to_five_seconds_with_jitter_and_resets() {
        let mut backoff = WatchBackoff::default();
        let delays: Vec<Duration> = backoff.by_ref().take(8).collect();
        for (delay, base) in delays.iter().zip([500, 1000, 2000, 4000, 5000, 5000, 5000, 5000]) {
            let base = Duration::from_millis(base);
            assert!(*delay >= base && *delay <= base + base / 2, "{delay:?} for {base:?}");
        }
        backoff.reset();
        assert!(backoff.next().unwrap() <= Duration::from_millis(750));
    }
}
