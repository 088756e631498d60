//! `txrelay run`: one relay, standalone.

use std::sync::Arc;

use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{CliError, Global, HttpArgs};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::runtime::config::{self, ConfigError, ProcessEnv};
use crate::runtime::lifecycle::Supervisor;
use crate::runtime::registry::Registry;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Do not apply pending migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
    #[command(flatten)]
    pub http: HttpArgs,
}

pub async fn run(global: &Global, args: RunArgs) -> Result<(), CliError> {
    let manifest = global.manifest()?;
    let settings = config::relay_settings(&manifest, &ProcessEnv)?;
    if settings.ingest_tokens.is_empty() {
        if !args.http.insecure_no_auth {
            return Err(ConfigError::new(
                "RELAY_API_TOKENS",
                "is not set: /new needs at least one bearer token (or --insecure-no-auth for local development)",
            )
            .into());
        }
        warn!("--insecure-no-auth: POST /new accepts requests without a bearer token; never do this in production");
    }
    let metrics = Metrics::new();
    let relays = Arc::new(Registry::new(None));
    let grace = args.http.grace();
    // The same lifecycle as every relay of the operator: start, stop in
    // order within the grace period.
    let supervisor = Supervisor::standalone(relays.clone(), metrics.clone(), grace, !args.no_migrate)
        .with_pool_size(global.db_pool_size);
    let (_, handle) = supervisor.ensure(&settings).await?;
    let relay = handle.relay;
    if !relay.config().suspend
        && let crate::relay::QueueCheck::Refused(failure) = relay.outbox().check_queue().await
    {
        warn!(error = %failure, "the queue refused GetQueueAttributes; transactions are stored and wait for it");
    }
    let state = AppState::new(relays, metrics, args.http.options());
    let (stop, stopped) = watch::channel(false);
    let servers = Servers::start(&args.http, state, stopped.clone()).await?;
    info!(relay = %relay.id(), api = %args.http.listen, metrics = %args.http.metrics_listen, "txrelay running");

    shutdown_signal().await;
    info!(grace_ms = grace.as_millis() as u64, "shutting down: no new claims; finishing in-flight sends");
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    tokio::join!(servers.drain_by(deadline), supervisor.stop_all());
    info!("stopped");
    Ok(())
}

/// The two listeners of a process: the API (`/new`, reads) and the ops
/// listener (probes, metrics), served until the stop signal.
pub(super) struct Servers {
    api: JoinHandle<std::io::Result<()>>,
    ops: JoinHandle<std::io::Result<()>>,
}

impl Servers {
    /// Binds both listeners (an error names the address that cannot be
    /// bound) and serves them until `stopped` turns true.
    pub(super) async fn start(
        args: &HttpArgs,
        state: AppState,
        stopped: watch::Receiver<bool>,
    ) -> Result<Self, CliError> {
        let api_listener = bind(args.listen).await?;
        let ops_listener = bind(args.metrics_listen).await?;
        let options = (*state.options).clone();
        let api = tokio::spawn(http::serve(
            api_listener,
            http::api_router(state.clone()),
            options.clone(),
            wait_for(stopped.clone()),
        ));
        let ops = tokio::spawn(http::serve(ops_listener, http::ops_router(state), options, wait_for(stopped)));
        Ok(Self { api, ops })
    }

    /// Lets requests in progress finish until `deadline`, then cuts what is
    /// left. The ops listener answers probes until the end.
    pub(super) async fn drain_by(self, deadline: tokio::time::Instant) {
        let abort = self.api.abort_handle();
        if tokio::time::timeout_at(deadline, self.api).await.is_err() {
            warn!("grace period over with HTTP requests still in progress; closing them");
            abort.abort();
        }
        self.ops.abort();
    }
}

async fn bind(address: std::net::SocketAddr) -> Result<TcpListener, CliError> {
    TcpListener::bind(address).await.map_err(|e| CliError::Failed(format!("cannot listen on {address}: {e}")))
}

pub(super) async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// SIGTERM (Kubernetes) or SIGINT (a terminal).
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
