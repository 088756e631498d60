//! What the relay last saw of its database and queue: `/readyz`, the status
//! writer and the loop read it, and nothing there waits on the network.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::{info, warn};

use super::core::Outbox;
use crate::queue::SendFailure;
use crate::store::{Gauges, StoreError};

/// What the relay last saw of its database and queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RelayHealth {
    pub database_error: Option<String>,
    pub queue_error: Option<String>,
    /// Why the queue refused the last call, as a status-condition reason
    /// (`NonExistentQueue`, `AccessDenied`, `QueueUnreachable`...).
    pub queue_error_code: Option<String>,
    pub database_checked: bool,
    pub queue_checked: bool,
    pub gauges: Option<Gauges>,
    pub last_sweep: Option<DateTime<Utc>>,
}

pub(super) struct HealthBoard {
    pub(super) seen: watch::Sender<RelayHealth>,
    queue_up: AtomicBool,
    /// GetQueueAttributes was asked: it is not asked again.
    queue_check_asked: AtomicBool,
}

impl Default for HealthBoard {
    fn default() -> Self {
        Self {
            seen: watch::Sender::new(RelayHealth::default()),
            queue_up: AtomicBool::new(true),
            queue_check_asked: AtomicBool::new(false),
        }
    }
}

/// What an optional look at the queue (GetQueueAttributes) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueCheck {
    Reachable,
    /// The IAM policy does not allow the look (a send-only policy): the
    /// relay's sends will tell.
    NotAllowed,
    /// Asked already: once per relay is enough.
    Skipped,
    Refused(SendFailure),
}

impl Outbox {
    pub fn health(&self) -> watch::Receiver<RelayHealth> {
        self.health.seen.subscribe()
    }

    pub(super) fn queue_is_up(&self) -> bool {
        self.health.queue_up.load(Ordering::Acquire)
    }

    /// What the last call to the queue showed: it took messages, or it
    /// refused a whole call or left it unanswered. While the queue is down,
    /// inline sends stop and the loop probes it by sending the oldest due
    /// batch, once a second; rows whose send went unanswered back off, so
    /// the probe never sends the same rows over and over.
    pub(super) fn mark_queue(&self, up: bool, failure: Option<&SendFailure>) {
        let was_up = self.health.queue_up.swap(up, Ordering::AcqRel);
        if was_up && !up {
            warn!(relay = %self.id, error = failure.map(|e| e.message.as_str()),
                  "queue refused the request; rows stay unsent, without an attempt, until a send goes through");
        } else if !was_up && up {
            info!(relay = %self.id, "queue takes messages again");
        }
        self.metrics.set_queue_reachable(up);
        let error = failure.map(|f| (f.message.clone(), f.reason()));
        self.health.seen.send_if_modified(|h| {
            let (message, code) = error.clone().unzip();
            let changed = !h.queue_checked || h.queue_error != message || h.queue_error_code != code;
            h.queue_checked = true;
            h.queue_error = message;
            h.queue_error_code = code;
            changed
        });
    }

    pub(super) fn mark_database(&self, error: Option<&StoreError>) {
        let error = error.map(ToString::to_string);
        // Called on every request: watchers (the status writer) are woken
        // only when something changed.
        self.health.seen.send_if_modified(|h| {
            let changed = !h.database_checked || h.database_error != error;
            h.database_checked = true;
            h.database_error = error;
            changed
        });
    }

    pub(super) fn mark_swept(&self) {
        self.health.seen.send_modify(|h| h.last_sweep = Some(Utc::now()));
    }

    /// Reads the backlog from the database and publishes it as metrics.
    pub async fn refresh_gauges(&self) -> Result<Gauges, StoreError> {
        let gauges = self.store.gauges().await?;
        self.metrics.set_backlog(gauges.unsent, gauges.failed, gauges.oldest_unsent_age_seconds);
        // Only a FIFO queue holds a wallet behind its dead letter.
        self.metrics.set_held_wallets(if self.is_fifo() { gauges.dead_wallets } else { 0 });
        self.metrics.set_vacuum(gauges.unsent_dead_tuples, gauges.oldest_xmin_age_seconds);
        self.health.seen.send_modify(|h| h.gauges = Some(gauges));
        Ok(gauges)
    }

    /// Looks at the queue without sending, where the IAM policy allows it:
    /// an early word on a missing queue or bad credentials when a relay
    /// starts or is reconfigured. Nothing depends on it: once denied, it is
    /// not asked again, and delivery always learns the truth by sending.
    pub async fn check_queue(&self) -> QueueCheck {
        // Asked once per relay: a later answer could only contradict what
        // its sends have shown since.
        if self.health.queue_check_asked.swap(true, Ordering::AcqRel) {
            return QueueCheck::Skipped;
        }
        let limit = self.config.call_timeout();
        let checked = match tokio::time::timeout(limit, self.queue.check()).await {
            Ok(result) => result,
            Err(_) => Err(SendFailure::unreachable(format!("GetQueueAttributes timed out after {limit:?}"))),
        };
        match checked {
            Ok(()) => {
                // Only a first word: it never overrides what a send showed.
                if !self.health.seen.borrow().queue_checked {
                    self.mark_queue(true, None);
                }
                QueueCheck::Reachable
            }
            Err(failure) if failure.code.as_deref().is_some_and(crate::queue::sqs::is_not_allowed) => {
                info!(relay = %self.id, "GetQueueAttributes is not allowed (a send-only policy); the queue is judged by sends alone");
                QueueCheck::NotAllowed
            }
            Err(failure) => {
                self.mark_queue(false, Some(&failure));
                QueueCheck::Refused(failure)
            }
        }
    }
}
