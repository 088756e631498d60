//! The relay's upkeep between sweeps: the backlog gauges, the drift
//! reconciliation of `unsent_transactions`, retention, and the database
//! health check. Each keeps its own schedule.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::core::Outbox;

const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// The drift reconciliation looks at this many rows of `transactions`, by
/// primary key, at the loop's start and then every [`DRIFT_EVERY`]: a row
/// missing from `unsent_transactions` is listed again within one minute per
/// 100,000 rows of the table (docs/delivery.md), at the cost of one index
/// range scan of that many ids a minute.
const DRIFT_BATCH: u32 = 100_000;
const DRIFT_EVERY: Duration = Duration::from_secs(60);
const RETENTION_BATCH: u32 = 500;
/// The relay checks its database this often, on a connection of its own,
/// and counts it unreachable when it does not answer within the timeout:
/// `/readyz` and the status read this, and never wait on the database.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
const HEALTH_TIMEOUT: Duration = Duration::from_millis(800);

/// When each upkeep task last ran, and where the drift scan goes on from.
pub struct Upkeep {
    core: Arc<Outbox>,
    gauges_at: Option<Instant>,
    retention_at: Option<Instant>,
    drift_at: Option<Instant>,
    /// Where the drift reconciliation goes on from (an id of `transactions`).
    drift_after: i64,
}

impl Upkeep {
    pub fn new(core: Arc<Outbox>) -> Self {
        Self { core, gauges_at: None, retention_at: None, drift_at: None, drift_after: 0 }
    }

    /// Everything due after a sweep.
    pub async fn after_sweep(&mut self, gauge_min_age: Duration) {
        self.refresh_gauges_if_older_than(gauge_min_age).await;
        self.apply_retention().await;
        self.repair_drift().await;
    }

    pub async fn refresh_gauges_if_older_than(&mut self, age: Duration) {
        if self.gauges_at.is_some_and(|at| at.elapsed() < age) {
            return;
        }
        match self.core.refresh_gauges().await {
            Ok(_) => {
                self.gauges_at = Some(Instant::now());
                self.core.mark_database(None);
            }
            Err(error) => {
                warn!(relay = %self.core.id, %error, "could not read the backlog");
                self.core.mark_database(Some(&error));
            }
        }
    }

    /// One bounded step of the drift reconciliation (see [`DRIFT_BATCH`]):
    /// an unsent row that a writer left out of `unsent_transactions` would
    /// otherwise never be sent, counted or alerted on.
    pub async fn repair_drift(&mut self) {
        if self.drift_at.is_some_and(|at| at.elapsed() < DRIFT_EVERY) {
            return;
        }
        self.drift_at = Some(Instant::now());
        match self.core.store.repair_unsent_drift(self.drift_after, DRIFT_BATCH).await {
            Ok(scan) => {
                // Past the newest row: the next step starts over.
                self.drift_after = scan.last_id.unwrap_or(0);
                if !scan.repaired.is_empty() {
                    self.core.metrics.unsent_drift_repaired(scan.repaired.len() as u64);
                    warn!(relay = %self.core.id, rows = scan.repaired.len(), ids = ?&scan.repaired[..scan.repaired.len().min(20)],
                          "unsent transactions were missing from unsent_transactions (a writer bypassed its triggers); listed again, they are sent now");
                    self.core.wake();
                }
            }
            Err(error) => warn!(relay = %self.core.id, %error, "drift reconciliation failed; retried in a minute"),
        }
    }

    /// Deletes old sent rows in small batches, so the table stays small
    /// without long locks. Unsent and dead-lettered rows are never deleted.
    pub async fn apply_retention(&mut self) {
        if self.retention_at.is_some_and(|at| at.elapsed() < RETENTION_EVERY) {
            return;
        }
        self.retention_at = Some(Instant::now());
        let window = self.core.config.idempotency_window;
        // Records of keys whose window ended, whether or not retention is
        // still on (it may have been turned off since).
        for _ in 0..100 {
            match self.core.store.expire_retired_older_than(window, RETENTION_BATCH).await {
                Ok(count) if count == u64::from(RETENTION_BATCH) => {}
                Ok(_) => break,
                Err(error) => {
                    warn!(relay = %self.core.id, %error, "expiring idempotency records stopped");
                    break;
                }
            }
        }
        let Some(age) = self.core.config.retention else {
            return;
        };
        let mut deleted = 0;
        for _ in 0..100 {
            match self.core.store.delete_sent_older_than(age, window, RETENTION_BATCH).await {
                Ok(count) => {
                    deleted += count;
                    if count < u64::from(RETENTION_BATCH) {
                        break;
                    }
                }
                Err(error) => {
                    warn!(relay = %self.core.id, %error, "retention stopped");
                    break;
                }
            }
        }
        if deleted > 0 {
            info!(relay = %self.core.id, deleted, "retention deleted old sent transactions");
        }
    }
}

/// Keeps the relay's view of its database fresh, whatever the loop is
/// doing (a sweep can wait on a stalled database for up to its call bound).
pub(super) async fn keep_health_fresh(relay: Arc<Outbox>, mut stop: watch::Receiver<bool>) {
    loop {
        let checked = relay.store.ping_within(HEALTH_TIMEOUT).await;
        if let Err(error) = &checked {
            debug!(relay = %relay.id, %error, "database health check failed");
        }
        relay.mark_database(checked.as_ref().err());
        tokio::select! {
            () = tokio::time::sleep(HEALTH_EVERY) => {}
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
        }
    }
}
