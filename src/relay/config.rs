//! The parts of a `TransactionRelay` spec a relay works with, as plain
//! durations and counts, fixed when the relay is built.

use std::time::Duration;

use crate::spec::TransactionRelaySpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    pub retry_interval: Duration,
    pub batch_size: u32,
    pub max_attempts: u32,
    pub suspend: bool,
    pub claim_lease: Duration,
    pub concurrency: usize,
    pub inline_send_timeout: Duration,
    pub retention: Option<Duration>,
    pub idempotency_window: Duration,
    pub unsent_warning_threshold: u64,
}

impl From<&TransactionRelaySpec> for RelayConfig {
    fn from(spec: &TransactionRelaySpec) -> Self {
        Self {
            retry_interval: spec.retry_interval.get(),
            batch_size: spec.batch_size,
            max_attempts: spec.max_attempts,
            suspend: spec.suspend,
            claim_lease: spec.claim_lease.get(),
            concurrency: usize::try_from(spec.concurrency).unwrap_or(1).max(1),
            inline_send_timeout: spec.inline_send_timeout.get(),
            retention: spec.retention.map(|r| r.get()),
            idempotency_window: spec.idempotency_window.get(),
            unsent_warning_threshold: spec.unsent_warning_threshold,
        }
    }
}

impl RelayConfig {
    /// How long a new row is held for its inline send: the send's timeout,
    /// and as much again for committing its result.
    pub fn inline_lease(&self) -> Duration {
        self.inline_send_timeout * 2 + Duration::from_secs(1)
    }

    /// The ceiling on one call to the queue: a third of the claim lease
    /// (1-10 s), so a hung connection cannot outlive the claim.
    pub fn call_timeout(&self) -> Duration {
        (self.claim_lease / 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// What a claim must still have left for a call to start: the call's
    /// timeout, and as long again to record its result.
    pub fn lease_needed_per_call(&self) -> Duration {
        self.call_timeout() * 2
    }
}
