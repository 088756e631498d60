//! A relay's lifecycle, once for every caller: `txrelay run` starts its one
//! relay through it and the operator starts many. Start: build the relay,
//! migrate, spawn its loop, its LISTEN task and any companion, then serve
//! it. Reconfigure: start the new one, let it take over `/new`, then retire
//! the old one. Stop: no new claims, in-flight sends finish and requests in
//! progress answer within the grace period, what is left is released, then
//! the store closes. That order is what keeps the outbox honest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::registry::{Registry, Running};
use super::settings::{RelayHandle, RelaySettings, StartError};
use crate::auth::TokenSet;
use crate::metrics::Metrics;
use crate::relay::{Relay, listen_for_due_rows, run_loop};
use crate::spec::RelayId;

/// Spawns whatever else lives and dies with a relay (its status publisher).
pub type Companion = Arc<dyn Fn(Arc<Relay>, watch::Receiver<bool>) -> JoinHandle<()> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Started,
    Reconfigured,
    Unchanged,
}

/// The ceiling on migrating (or checking) a relay's database when it starts.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The part of the grace period kept for giving claimed rows back.
const RELEASE_RESERVE: Duration = Duration::from_secs(2);
/// The ceiling on closing a relay's database connections.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Supervisor {
    /// The only record of the relays running: `/new` resolves against it.
    relays: Arc<Registry>,
    metrics: Metrics,
    /// Held while a relay is put into the registry or the process begins
    /// to stop: a relay finishing its start during shutdown is stopped,
    /// never left claiming.
    changes: Mutex<()>,
    companion: Companion,
    /// Connections each relay's main pool may open (`--db-pool-size`),
    /// set here once for every relay this process builds.
    pool_size: u32,
    grace: Duration,
    /// Set by `stop_all`: nothing starts any more.
    closing: std::sync::atomic::AtomicBool,
    /// Apply pending migrations when a relay starts (else only check that
    /// the database answers).
    migrate: bool,
    /// The newest tokens read for each relay, whether it runs yet or not: a
    /// relay that finishes starting (or restarting) after a revocation takes
    /// these, never the older ones its settings were read with.
    tokens: std::sync::Mutex<HashMap<RelayId, LatestTokens>>,
    /// Numbers token reads in the order they started (see [`Self::token_read`]).
    token_reads: std::sync::atomic::AtomicU64,
}

/// Each set as last read, with the number of the read it came from.
#[derive(Debug, Default, Clone)]
struct LatestTokens {
    ingest: Option<(u64, TokenSet)>,
    admin: Option<(u64, TokenSet)>,
}

/// A read of a relay's token Secrets, numbered when it started: of two
/// reads, the one started later saw the Secrets as new or newer, so an
/// earlier read that finishes last never undoes a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenRead(u64);

impl Supervisor {
    pub fn new(relays: Arc<Registry>, metrics: Metrics, companion: Companion, grace: Duration) -> Self {
        Self {
            relays,
            metrics,
            changes: Mutex::new(()),
            companion,
            pool_size: crate::store::DEFAULT_POOL_SIZE,
            grace,
            closing: std::sync::atomic::AtomicBool::new(false),
            migrate: true,
            tokens: std::sync::Mutex::default(),
            token_reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// One process, one relay, nothing beside its loops (`txrelay run`).
    pub fn standalone(relays: Arc<Registry>, metrics: Metrics, grace: Duration, migrate: bool) -> Self {
        let nothing: Companion = Arc::new(|_, _| tokio::spawn(async {}));
        Self { migrate, ..Self::new(relays, metrics, nothing, grace) }
    }

    /// Sets the connections of each relay's main pool (`--db-pool-size`).
    pub fn with_pool_size(self, pool_size: u32) -> Self {
        Self { pool_size, ..self }
    }

    pub fn relays(&self) -> &Arc<Registry> {
        &self.relays
    }

    /// Runs the relay described by `settings`. Nothing happens when it
    /// already runs with the same fingerprint; otherwise a new relay is built
    /// and migrated, takes over `/new`, and only then is the old one stopped,
    /// so ingest never pauses and the two loops overlap safely.
    pub async fn ensure(&self, settings: &RelaySettings) -> Result<(Change, RelayHandle), StartError> {
        let fingerprint = settings.fingerprint();
        let unchanged = self.relays.update(&settings.id, |current| {
            (current.stop.is_some() && current.fingerprint == fingerprint).then(|| {
                // Tokens are not part of the fingerprint: they are applied
                // to the running relay as they are, or as read since.
                current.handle.ingest_tokens = settings.ingest_tokens.clone();
                current.handle.admin_tokens = settings.admin_tokens.clone();
                self.latest_tokens(&mut current.handle);
                current.handle.clone()
            })
        });
        if let Some(handle) = unchanged.flatten() {
            return Ok((Change::Unchanged, handle));
        }
        // Built and migrated without holding the lock: a slow database must
        // not hold up other relays. The controller never reconciles one
        // resource twice at once, so nobody else starts this relay meanwhile.
        let mut handle = settings.build(&self.metrics, self.pool_size).await?;
        let migrate = self.migrate && settings.spec.database.migrate;
        let store = handle.relay.store();
        let ready = async { if migrate { store.migrate().await } else { store.ping().await } };
        // Bounded: a reconcile stuck here would hold up the next one of the
        // same resource (a token revocation, say). Migrations have their own,
        // longer bound (spec.database.migrationTimeout); teams with large
        // tables run them as a job instead (spec.database.migrate: false).
        let bound = if migrate { store.migration_bound() } else { START_TIMEOUT };
        match tokio::time::timeout(bound, ready).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(StartError::Store(crate::store::StoreError::Unavailable(format!(
                    "the database was not ready within {bound:?}"
                ))));
            }
        }
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            handle.relay.store().close().await;
            return Err(StartError::Stopping);
        }
        let (stop, stopped) = watch::channel(false);
        let relay = handle.relay.clone();
        let tasks = vec![
            tokio::spawn(run_loop(relay.drain().clone(), stopped.clone())),
            tokio::spawn(listen_for_due_rows(relay.outbox().clone(), stopped.clone())),
            (self.companion)(relay.clone(), stopped),
        ];
        let new = Running { fingerprint, handle: handle.clone(), stop: Some(stop), tasks };
        let previous = {
            let changes = self.changes.lock().await;
            // Checked under the lock `stop_all` takes: a relay built while
            // the process shuts down is stopped, never left claiming.
            if self.closing.load(std::sync::atomic::Ordering::Acquire) {
                drop(changes);
                self.shut_down_all(vec![new], false).await;
                return Err(StartError::Stopping);
            }
            // A token revoked while this relay was being built (a migration
            // can take minutes) stays revoked.
            self.latest_tokens(&mut handle);
            let mut new = new;
            new.handle = handle.clone();
            let previous = self.relays.put(new);
            self.metrics.relays.set(self.relays.len() as i64);
            previous
        };
        let change = match previous {
            Some(old) => {
                info!(relay = %settings.id, "relay reconfigured");
                self.shut_down(old, false).await;
                Change::Reconfigured
            }
            None => {
                info!(relay = %settings.id, "relay started");
                Change::Started
            }
        };
        Ok((change, handle))
    }

    pub fn get(&self, id: &RelayId) -> Option<RelayHandle> {
        self.relays.get(id)
    }

    pub fn ids(&self) -> Vec<RelayId> {
        self.relays.ids()
    }

    /// Numbers a read of a relay's token Secrets: call it before reading.
    pub fn token_read(&self) -> TokenRead {
        TokenRead(self.token_reads.fetch_add(1, std::sync::atomic::Ordering::AcqRel))
    }

    /// Applies tokens read from the Secrets to a running relay at once, and
    /// keeps them for a relay still starting. An empty set is a revocation
    /// (fail closed: no token accepted); `None` leaves that set as it is
    /// (its Secret could not be read just now). A read older than one
    /// already applied is ignored.
    pub async fn set_tokens(&self, id: &RelayId, read: TokenRead, ingest: Option<TokenSet>, admin: Option<TokenSet>) {
        {
            let mut latest = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            let latest = latest.entry(id.clone()).or_default();
            for (slot, tokens) in [(&mut latest.ingest, ingest), (&mut latest.admin, admin)] {
                if let Some(tokens) = tokens
                    && slot.as_ref().is_none_or(|(seen, _)| *seen <= read.0)
                {
                    *slot = Some((read.0, tokens));
                }
            }
        }
        // Under the lock `ensure` holds from reading the newest tokens to
        // putting its relay in the registry: a read that lands in between
        // is applied to the new relay, never to the one it replaces.
        let _changes = self.changes.lock().await;
        let revoked = self.relays.update(id, |current| {
            let before = (current.handle.ingest_tokens.clone(), current.handle.admin_tokens.clone());
            self.latest_tokens(&mut current.handle);
            let changed = (&current.handle.ingest_tokens, &current.handle.admin_tokens) != (&before.0, &before.1);
            changed && current.handle.ingest_tokens.is_empty()
        });
        if revoked == Some(true) {
            warn!(relay = %id, "ingest tokens revoked: /new refuses every token");
        }
    }

    /// Puts the newest tokens read for the relay into `handle`.
    fn latest_tokens(&self, handle: &mut RelayHandle) {
        let latest = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(latest) = latest.get(handle.relay.id()) {
            if let Some((_, ingest)) = &latest.ingest {
                handle.ingest_tokens = ingest.clone();
            }
            if let Some((_, admin)) = &latest.admin {
                handle.admin_tokens = admin.clone();
            }
        }
    }

    /// Stops every relay for which `keep` is false (its resource is gone).
    pub async fn retain(&self, keep: impl Fn(&RelayId) -> bool) {
        let gone: Vec<Running> = {
            let _changes = self.changes.lock().await;
            self.tokens.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| keep(id));
            let gone = self.relays.take_unless(&keep);
            self.metrics.relays.set(self.relays.len() as i64);
            gone
        };
        for relay in &gone {
            info!(relay = %relay.handle.relay.id(), "stopping relay");
        }
        self.shut_down_all(gone, true).await;
    }

    /// Stops every relay at once, all within one grace period (shutdown);
    /// nothing starts afterwards.
    pub async fn stop_all(&self) {
        self.relays.close();
        {
            let _changes = self.changes.lock().await;
            self.closing.store(true, std::sync::atomic::Ordering::Release);
        }
        self.retain(|_| false).await;
    }

    /// Every relay gets its stop signal first, then all stop in parallel,
    /// each within the same grace period: several busy relays stop in the
    /// time of one, well before Kubernetes' SIGKILL.
    async fn shut_down_all(&self, relays: Vec<Running>, forget: bool) {
        let deadline = tokio::time::Instant::now() + self.grace;
        for relay in &relays {
            if let Some(stop) = &relay.stop {
                let _ = stop.send(true);
            }
            relay.handle.relay.outbox().begin_stopping();
        }
        futures::future::join_all(relays.into_iter().map(|relay| self.shut_down_by(relay, forget, deadline))).await;
    }

    async fn shut_down(&self, relay: Running, forget: bool) {
        self.shut_down_all(vec![relay], forget).await;
    }

    /// Stops one relay's tasks, waiting for its in-flight sends and the
    /// requests it is still answering, then gives back the rows still
    /// claimed and closes its store, all by `deadline`; `forget` also
    /// removes its metrics (it is out of the registry already).
    async fn shut_down_by(&self, relay: Running, forget: bool, deadline: tokio::time::Instant) {
        let id = relay.handle.relay.id().clone();
        if forget {
            relay.handle.relay.metrics().remove();
        }
        if let Some(stop) = &relay.stop {
            let _ = stop.send(true);
        }
        let aborts: Vec<_> = relay.tasks.iter().map(JoinHandle::abort_handle).collect();
        // The last part of the grace period is kept for giving rows back.
        let sends_by = deadline - RELEASE_RESERVE.min(self.grace / 4);
        let finished = tokio::time::timeout_at(sends_by, futures::future::join_all(relay.tasks)).await;
        if finished.is_err() {
            for abort in aborts {
                abort.abort();
            }
            warn!(relay = %id, "grace period over; releasing rows still in flight");
        }
        // Requests in progress finish first, within the same part of the
        // grace: a resend the HTTP API started holds its rows among the
        // relay's claimed rows, and giving them back under it would lose the
        // message id it is about to record (another replica would send the
        // row again).
        let requests_done = relay.handle.relay.outbox().requests_finished_by(sends_by).await;
        // Whatever could not finish goes back now, so no other replica waits
        // a whole lease for it. Bounded like every call.
        match tokio::time::timeout_at(deadline, relay.handle.relay.drain().release_in_flight()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(released)) => info!(relay = %id, released, "released claimed rows for other replicas"),
            Ok(Err(error)) => {
                warn!(relay = %id, %error, "could not release claimed rows; they are retried after the claim lease")
            }
            Err(_) => warn!(relay = %id, "releasing claimed rows timed out; they are retried after the claim lease"),
        }
        // A request that resolved to this relay before it was replaced may
        // still be recording its message id: the store stays open for it.
        if !requests_done && !relay.handle.relay.outbox().requests_finished_by(deadline).await {
            warn!(relay = %id, "grace period over with requests still in progress; closing the store");
        }
        if tokio::time::timeout(CLOSE_TIMEOUT, relay.handle.relay.store().close()).await.is_err() {
            warn!(relay = %id, "closing the database connections timed out");
        }
    }
}
