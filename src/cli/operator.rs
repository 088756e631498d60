//! `txrelay operator`: the process around the operator library: flags and
//! the pod's environment, the Kubernetes client, the HTTP listeners, signals.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;
use tracing::warn;

use super::serve::{Servers, shutdown_signal, wait_for};
use super::{CliError, Global, OperatorArgs};
use crate::http::{AppState, HttpOptions};
use crate::metrics::Metrics;
use crate::operator::OperatorOptions;
use crate::runtime::config::ConfigError;
use crate::runtime::registry::Registry;
use crate::spec::RelayId;

/// How long the leader Lease lasts without renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);

pub async fn run(global: &Global, args: OperatorArgs) -> Result<(), CliError> {
    let default_relay = match &args.default_relay {
        Some(text) => Some(text.parse::<RelayId>().map_err(|error| ConfigError::new("--default-relay", error))?),
        None => None,
    };
    if args.http.insecure_no_auth {
        warn!("--insecure-no-auth: relays without spec.ingest accept /new without a bearer token; never in production");
    }
    let client = Client::try_default().await.map_err(|e| CliError::failed(format!("Kubernetes client: {e}")))?;
    let metrics = Metrics::new();
    let relays = Arc::new(Registry::new(default_relay));
    let options = OperatorOptions {
        namespace: args.namespace.clone(),
        insecure_no_auth: args.http.insecure_no_auth,
        pool_size: global.db_pool_size,
        grace: args.http.grace(),
        identity: std::env::var("POD_NAME").unwrap_or_else(|_| format!("txrelay-{}", fastrand::u64(..))),
        lease_namespace: std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "txrelay-system".into()),
        lease_duration: LEASE_DURATION,
    };
    // One relay's database must not take /new away from the others.
    let http = HttpOptions { ready_needs_databases: false, ..args.http.options() };
    let state = AppState::new(relays.clone(), metrics.clone(), http);
    let (stop, stopped) = watch::channel(false);
    let servers = Servers::start(&args.http, state, stopped.clone()).await?;
    let operator = tokio::spawn(crate::operator::run(client, relays, metrics, options, wait_for(stopped)));

    shutdown_signal().await;
    // Relays and HTTP servers stop together: the operator bounds its own
    // shutdown by the grace period, and the servers drain within it too.
    let deadline = tokio::time::Instant::now() + args.http.grace();
    let _ = stop.send(true);
    let (_, operator) = tokio::join!(servers.drain_by(deadline), operator);
    if let Err(error) = operator {
        warn!(%error, "the operator task ended abnormally");
    }
    Ok(())
}
