//! A relay: one outbox table, one queue. Its flows each own their state
//! beside a shared core ([`Outbox`]): ingest (`/new`: group commit, then the
//! inline send), the drain (the loop's sweeps), resends by hand, and upkeep
//! (gauges, drift, retention, health). A flow is built from the core alone
//! (the resend flow from the drain it sends through), so each can be tested
//! without the others.

pub mod backoff;
mod config;
mod core;
mod drain;
mod health;
mod in_flight;
mod ingest;
pub mod message;
mod recorder;
mod resend;
mod run;
mod upkeep;

use std::fmt;
use std::sync::Arc;

pub use self::config::RelayConfig;
pub use self::core::{Outbox, RequestGuard};
pub use drain::{Drain, SweepReport};
pub use health::{QueueCheck, RelayHealth};
pub use ingest::{GROUP_PATIENCE, GROUPS_IN_FLIGHT, Ingest, MAX_GROUP, Submission};
pub use resend::{Resend, ResendError, ResendNotice, ResendRequest, RetryAllReport, RetryError, pace};
pub use run::{listen_for_due_rows, run_loop};
pub use upkeep::Upkeep;

use crate::metrics::RelayMetrics;
use crate::queue::Queue;
use crate::secret::Secret;
use crate::spec::RelayId;
use crate::store::Store;

/// One relay's flows, built together from one core.
pub struct Relay {
    core: Arc<Outbox>,
    ingest: Arc<Ingest>,
    drain: Arc<Drain>,
    resend: Resend,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.core, f)
    }
}

impl Relay {
    pub fn new(
        id: RelayId,
        config: RelayConfig,
        store: Store,
        queue: Arc<dyn Queue>,
        ledger_token: Option<Secret>,
        metrics: RelayMetrics,
    ) -> Self {
        let core = Arc::new(Outbox::new(id, config, store, queue, ledger_token, metrics));
        let drain = Arc::new(Drain::new(core.clone()));
        Self { ingest: Arc::new(Ingest::new(core.clone())), resend: Resend::new(drain.clone()), drain, core }
    }

    /// Fixes the jitter sequence, for tests of the backoff schedule.
    pub fn with_seed(self, seed: u64) -> Self {
        self.core.seed(seed);
        self
    }

    /// The core the flows share: identity, store, queue, metrics, health.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.core
    }

    /// `/new`: group commit, then the inline send.
    pub fn ingest(&self) -> &Arc<Ingest> {
        &self.ingest
    }

    /// The sweeps that deliver whatever is unsent.
    pub fn drain(&self) -> &Arc<Drain> {
        &self.drain
    }

    /// `retry-all`, `retry`, `skip`.
    pub fn resend(&self) -> &Resend {
        &self.resend
    }

    pub fn id(&self) -> &RelayId {
        self.core.id()
    }

    pub fn config(&self) -> &RelayConfig {
        self.core.config()
    }

    pub fn store(&self) -> &Store {
        self.core.store()
    }

    pub fn metrics(&self) -> &RelayMetrics {
        self.core.metrics()
    }

    pub fn health(&self) -> tokio::sync::watch::Receiver<RelayHealth> {
        self.core.health()
    }

    /// Marks an HTTP request in progress until the guard is dropped.
    pub fn enter(&self) -> RequestGuard {
        self.core.enter()
    }
}
