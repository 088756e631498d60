//! The relay loop: sweep, then sleep until the next row is due (at most
//! `retryInterval`), waking early when told a row became due, in-process or
//! through PostgreSQL LISTEN/NOTIFY from another replica.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::core::Outbox;
use super::drain::{Drain, SweepReport};
use super::upkeep::{Upkeep, keep_health_fresh};
use crate::store::{ClaimMode, DueFloor, StoreError};

/// While the queue refuses calls, the oldest due batch is sent this often
/// as the probe, so delivery resumes within about this long after the
/// cause is fixed. A real send needs no permission beyond `sqs:SendMessage`.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Gauges are read from the database at least this often...
const GAUGE_MAX_AGE: Duration = Duration::from_secs(15);
/// ...and at most this often while a backlog drains.
const GAUGE_MIN_AGE: Duration = Duration::from_secs(1);
/// Backoff while the database is unreachable.
const DB_RETRY_MIN: Duration = Duration::from_millis(250);
const DB_RETRY_MAX: Duration = Duration::from_secs(30);
/// Shortest sleep after a sweep that left due rows behind (held by other
/// processes, or waiting behind an older row of their wallet).
const MIN_SLEEP: Duration = Duration::from_millis(20);
/// Sweeps in flight while draining a backlog: one claims or records while
/// another sends.
const DRAIN_OVERLAP: usize = 2;
/// A drain returns to the loop this often, so gauges and retention run.
const DRAIN_TURN: Duration = GAUGE_MIN_AGE;

struct LoopState {
    /// The last sweep claimed a full batch: a backlog is being drained.
    draining: bool,
    db_retry: Duration,
    /// When the last probe went out while the queue was refusing calls.
    probed_at: Option<Instant>,
    upkeep: Upkeep,
}

/// Runs until `stop` turns true (or its sender is dropped). A sweep that
/// has started finishes its in-flight sends and records them first.
pub async fn run_loop(drain: Arc<Drain>, mut stop: watch::Receiver<bool>) {
    let relay = drain.core().clone();
    info!(relay = %relay.id, suspended = relay.config.suspend, "relay loop started");
    let health = tokio::spawn(keep_health_fresh(relay.clone(), stop.clone()));
    let mut state =
        LoopState { draining: false, db_retry: DB_RETRY_MIN, probed_at: None, upkeep: Upkeep::new(relay.clone()) };
    loop {
        if *stop.borrow() {
            break;
        }
        let sleep = drain.cycle(&stop, &mut state).await;
        if sleep.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = relay.signals.due.notified() => {}
            changed = stop.changed() => if changed.is_err() { break },
        }
    }
    health.abort();
    info!(relay = %relay.id, "relay loop stopped");
}

impl Drain {
    /// One turn of the loop; returns how long to sleep.
    async fn cycle(&self, stop: &watch::Receiver<bool>, state: &mut LoopState) -> Duration {
        if self.core.config.suspend {
            state.upkeep.refresh_gauges_if_older_than(Duration::ZERO).await;
            return GAUGE_MAX_AGE;
        }
        let probing = !self.core.queue_is_up();
        if probing {
            // Woken early (a new row, another replica): the probe still goes
            // out at most once per interval.
            if let Some(wait) = state.probed_at.map(|at| PROBE_INTERVAL.saturating_sub(at.elapsed()))
                && !wait.is_zero()
            {
                return wait;
            }
            state.probed_at = Some(Instant::now());
        }
        let sweep = if probing {
            // The probe is the oldest due batch: one call, whose rows are
            // held without an attempt if the queue still refuses it.
            let limit = self.core.config.batch_size.min(crate::queue::MAX_BATCH_ENTRIES as u32);
            self.sweep(ClaimMode::Due, limit, stop).await
        } else {
            self.sweep_or_drain(std::mem::take(&mut state.draining), stop).await
        };
        let report = match sweep {
            Ok(report) => report,
            Err(error) => {
                let wait = state.db_retry;
                warn!(relay = %self.core.id, %error, retry_in_ms = wait.as_millis() as u64, "sweep failed; retrying");
                state.db_retry = (state.db_retry * 2).min(DB_RETRY_MAX);
                return wait;
            }
        };
        if state.db_retry > DB_RETRY_MIN {
            info!(relay = %self.core.id, "database reachable again");
        }
        state.db_retry = DB_RETRY_MIN;
        self.core.mark_swept();
        state.upkeep.after_sweep(GAUGE_MIN_AGE).await;

        if report.queue_error.is_some() {
            debug!(relay = %self.core.id, error = report.queue_error.as_deref(), "the queue still refuses calls");
            return PROBE_INTERVAL;
        }
        if probing && self.core.queue_is_up() {
            // The probe went through: the rest of the backlog goes now.
            return Duration::ZERO;
        }
        if report.claimed >= self.core.config.batch_size as usize {
            state.draining = true;
            return Duration::ZERO;
        }
        let ceiling = self.core.config.retry_interval.min(GAUGE_MAX_AGE);
        match self.core.store.next_due_in().await {
            Ok(Some(due_in)) => due_in.clamp(MIN_SLEEP, ceiling.max(MIN_SLEEP)),
            Ok(None) => ceiling,
            Err(error) => {
                warn!(relay = %self.core.id, %error, "could not read the next due time");
                state.db_retry
            }
        }
    }

    /// One sweep; or, while draining a backlog (the last sweep was full), a
    /// pipeline of [`DRAIN_OVERLAP`] sweeps: whenever one ends full, the next
    /// starts at once, so claiming and recording overlap sending with no
    /// pause for the slowest of a pair. Calls in flight stay within
    /// `concurrency` (shared permits). The drain hands back to the loop
    /// after [`DRAIN_TURN`] (gauges, retention) or when a sweep comes back
    /// short, refused by the queue, or failed, once every sweep it started
    /// has recorded its results.
    async fn sweep_or_drain(&self, draining: bool, stop: &watch::Receiver<bool>) -> Result<SweepReport, StoreError> {
        let limit = self.core.config.batch_size;
        if !draining {
            return self.sweep(ClaimMode::Due, limit, stop).await;
        }
        let started = Instant::now();
        // This turn's claims each start at the highest first row any of
        // them locked (`DueFloor`), not at the head of the due index, which holds a dead entry for every row
        // drained while a transaction holds back VACUUM. A row left behind
        // (given back, or committed late) waits for the next turn's first
        // claim, which starts at the head: `DRAIN_TURN` plus the sweeps in
        // flight when it ends.
        let floor = DueFloor::default();
        let mut sweeps: FuturesUnordered<_> =
            (0..DRAIN_OVERLAP).map(|_| self.sweep(ClaimMode::Drain(&floor), limit, stop)).collect();
        let mut drained = SweepReport { claimed: limit as usize, ..SweepReport::default() };
        let mut failed = None;
        while let Some(sweep) = sweeps.next().await {
            let report = match sweep {
                Ok(report) => report,
                Err(error) => {
                    // The first is returned (and logged by the loop); any
                    // other is logged here, not lost.
                    if failed.is_some() {
                        warn!(relay = %self.core.id, %error, "another sweep of the drain failed too");
                    }
                    failed.get_or_insert(error);
                    continue;
                }
            };
            drained.claimed = drained.claimed.min(report.claimed);
            drained.queue_error = drained.queue_error.take().or(report.queue_error);
            let go_on = failed.is_none()
                && drained.claimed >= limit as usize
                && drained.queue_error.is_none()
                && !*stop.borrow()
                && started.elapsed() < DRAIN_TURN;
            if go_on {
                sweeps.push(self.sweep(ClaimMode::Drain(&floor), limit, stop));
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(drained),
        }
    }
}

/// Wakes the relay whenever another process says rows became due. Keeps
/// reconnecting while the database is away, and wakes the relay after each
/// reconnect in case a notification was missed meanwhile.
pub async fn listen_for_due_rows(relay: Arc<Outbox>, mut stop: watch::Receiver<bool>) {
    let channel = relay.store.due_channel();
    let mut retry = DB_RETRY_MIN;
    loop {
        if *stop.borrow() {
            return;
        }
        let listener = async {
            let mut listener = PgListener::connect_with(relay.store.pool()).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listener.await {
            Ok(listener) => listener,
            Err(error) => {
                debug!(relay = %relay.id, %error, "LISTEN failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    _ = stop.changed() => return,
                }
                retry = (retry * 2).min(DB_RETRY_MAX);
                continue;
            }
        };
        retry = DB_RETRY_MIN;
        relay.wake();
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => relay.wake(),
                    // The connection dropped; the next call reconnects.
                    Ok(None) => relay.wake(),
                    Err(error) => {
                        debug!(relay = %relay.id, %error, "LISTEN connection lost");
                        break;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }
}
