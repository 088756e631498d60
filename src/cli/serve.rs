//! `txrelay run`: one relay, standalone.

use std::sync::Arc;

use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{CliError, Global, HttpArgs};
use crate::config::{self, ConfigError, ProcessEnv};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::relay::directory::Relays;
use crate::relay::{listen_for_due_rows, run_loop};

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
    let settings = config::relay_settings(&manifest, &ProcessEnv, global.db_pool_size)?;
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
    let handle = settings.build(&metrics).await?;
    let relay = handle.relay.clone();
    if args.no_migrate {
        relay.store().ping().await?;
    } else {
        relay.store().migrate().await?;
    }
    if !relay.config().suspend {
        if let crate::relay::QueueCheck::Refused(failure) = relay.check_queue().await {
            warn!(error = %failure, "the queue refused GetQueueAttributes; transactions are stored and wait for it");
        }
    }
    let api_listener = bind(args.http.listen).await?;
    let ops_listener = bind(args.http.metrics_listen).await?;

    let relays = Arc::new(Relays::new(None));
    relays.insert(handle);
    let options = args.http.options();
    let state = AppState::new(relays, metrics, options.clone());
    let (stop, stopped) = watch::channel(false);
    let engine = tokio::spawn(run_loop(relay.clone(), stopped.clone()));
    let listener = tokio::spawn(listen_for_due_rows(relay.clone(), stopped.clone()));
    let api = tokio::spawn(http::serve(
        api_listener,
        http::api_router(state.clone()),
        options.clone(),
        wait_for(stopped.clone()),
    ));
    let ops = tokio::spawn(http::serve(ops_listener, http::ops_router(state), options, wait_for(stopped.clone())));
    info!(relay = %relay.id(), api = %args.http.listen, metrics = %args.http.metrics_listen, "txrelay running");

    shutdown_signal().await;
    info!("shutting down: no new claims; finishing in-flight sends");
    let _ = stop.send(true);
    let grace = args.http.grace();
    let finished = tokio::time::timeout(grace, async {
        let _ = api.await;
        let _ = engine.await;
    })
    .await;
    if finished.is_err() {
        warn!(grace_ms = grace.as_millis() as u64, "grace period over; releasing rows still in flight");
        match relay.release_in_flight().await {
            Ok(released) => info!(released, "released claimed rows for other replicas"),
            Err(error) => {
                error!(%error, "could not release claimed rows; they are retried after the claim lease")
            }
        }
    }
    listener.abort();
    ops.abort();
    relay.store().close().await;
    info!("stopped");
    Ok(())
}

async fn bind(address: std::net::SocketAddr) -> Result<TcpListener, CliError> {
    TcpListener::bind(address).await.map_err(|e| CliError::Failed(format!("cannot listen on {address}: {e}")))
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
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
