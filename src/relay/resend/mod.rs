//! Resends by hand (`retry-all`, `retry`, `skip`): audited, paced, and run
//! through the drain's sweeps, so they share its permits and claims and
//! never take a row a running relay holds.

mod one;
mod run;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::core::Outbox;
use super::drain::Drain;
use crate::store::{ClaimMode, ResendAudit, ResendFilter, ResendRow, StoreError};

pub use one::RetryError;
use run::ResendRun;
pub use run::pace;

type ResendHook = Box<dyn Fn(&ResendNotice) + Send + Sync>;

/// The resend flow of one relay.
pub struct Resend {
    core: Arc<Outbox>,
    drain: Arc<Drain>,
    /// Told of each resend by hand when it ends (see [`Resend::on_end`]).
    hook: OnceLock<ResendHook>,
}

/// A resend by hand that ended, as its audit record has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResendNotice {
    pub audit_id: i64,
    pub actor: String,
    pub via: &'static str,
    pub command: &'static str,
    pub rows: usize,
    pub succeeded: u64,
    pub failed: u64,
    pub outcome: String,
}

impl ResendNotice {
    /// One line for a Kubernetes Event or a log.
    pub fn note(&self) -> String {
        format!(
            "{} by {} via {} (audit record {}): {} rows, {} sent, {} failed; {}",
            self.command, self.actor, self.via, self.audit_id, self.rows, self.succeeded, self.failed, self.outcome
        )
    }
}

/// What `retry-all` is asked to do (CLI or HTTP).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResendRequest {
    pub filter: ResendFilter,
    /// At most this many rows.
    pub limit: Option<u64>,
    /// At most this many messages per second.
    pub rate: Option<f64>,
    /// Only say which rows would be resent.
    pub dry_run: bool,
    /// No round starts after this long (an HTTP request's share of its
    /// timeout); the report says the run stopped there.
    pub budget: Option<Duration>,
}

/// A resend request that cannot be taken, naming the field (as the HTTP
/// body names it; the CLI turns `dead_only` into `--dead-only`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RequestError {
    pub field: &'static str,
    pub message: String,
}

impl ResendRequest {
    /// The one check of a request, for every way in (HTTP and CLI), before
    /// anything is read, stored or sent.
    pub fn validate(&self) -> Result<(), RequestError> {
        let invalid = |field, message: &str| Err(RequestError { field, message: message.to_owned() });
        for (field, value) in [("wallet", &self.filter.wallet), ("error", &self.filter.error)] {
            // PostgreSQL text cannot hold one: the query would fail halfway.
            if value.as_deref().is_some_and(|v| v.contains('\0')) {
                return invalid(field, "must not contain a NUL character");
            }
        }
        if self.filter.include_dead && self.filter.dead_only {
            return invalid("dead_only", "include_dead and dead_only exclude each other");
        }
        if self.rate.is_some_and(|rate| !(rate.is_finite() && rate > 0.0)) {
            return invalid("rate", "must be a positive number of messages per second");
        }
        if self.limit == Some(0) {
            return invalid("limit", "must be at least 1");
        }
        Ok(())
    }
}

/// Why a resend by hand was refused before it began.
#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    /// `spec.suspend`: nothing is sent, by the loop or by hand.
    #[error("relay {0} is suspended (spec.suspend): nothing is sent, not even by hand; resume it first")]
    Suspended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetryAllReport {
    /// The audit record of this resend (none for a dry run or no rows).
    pub audit_id: Option<i64>,
    /// Rows the filter chose.
    pub selected: usize,
    pub revived: u64,
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Chosen rows this run could not take: held by a running relay (which
    /// sends them), or behind an older unsent row of their wallet.
    pub not_taken: usize,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// The rows chosen, for a dry run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<ResendRow>,
}

impl Resend {
    pub fn new(drain: Arc<Drain>) -> Self {
        Self { core: drain.core().clone(), drain, hook: OnceLock::new() }
    }

    /// Calls `hook` whenever a resend by hand (`retry`, `retry-all`, `skip`)
    /// ends: how the operator makes each one a Kubernetes Event on its
    /// resource. Set once per relay.
    pub fn on_end(&self, hook: impl Fn(&ResendNotice) + Send + Sync + 'static) {
        let _ = self.hook.set(Box::new(hook));
    }

    fn ended(&self, notice: &ResendNotice) {
        if let Some(hook) = self.hook.get() {
            hook(notice);
        }
    }

    /// Sends every unsent row now, ignoring backoff but never a row a running
    /// relay holds (`txrelay retry-all`). On FIFO queues wallets keep their
    /// order. Candidates are read a page at a time, and each page's ids join
    /// the audit record before any of them is revived or sent. When `stop`
    /// turns true (a signal, the relay stopping) or the request's time
    /// budget runs out, the round in flight finishes and records its
    /// results, no further row is claimed, and the audit record says why it
    /// stopped.
    pub async fn retry_all(
        &self,
        request: &ResendRequest,
        audit: &ResendAudit,
        stop: &watch::Receiver<bool>,
        mut progress: impl FnMut(&RetryAllReport),
    ) -> Result<RetryAllReport, ResendError> {
        if self.core.config.suspend && !request.dry_run {
            return Err(ResendError::Suspended(self.core.id.to_string()));
        }
        let mut report = RetryAllReport::default();
        let mut run = ResendRun {
            request,
            stop: stop.clone(),
            budget_ends: request.budget.map(|budget| Instant::now() + budget),
            started: Instant::now(),
            attempted: 0,
            audit_id: None,
            ids: 0,
        };
        let result = self.resend_pages(&mut run, audit, &mut report, &mut progress).await;
        report.audit_id = run.audit_id;
        let Some(audit_id) = run.audit_id else {
            return result.map(|()| report).map_err(ResendError::from);
        };
        report.not_taken = report.selected.saturating_sub(report.total);
        let outcome = match (&result, &report.stopped) {
            (Err(error), _) => format!("stopped: {error}"),
            (Ok(()), Some(reason)) => format!("stopped: {reason}"),
            (Ok(()), None) if report.not_taken > 0 => format!(
                "completed; {} chosen rows not taken: held by a running relay, or behind an older unsent row of \
                 their wallet",
                report.not_taken
            ),
            (Ok(()), None) => "completed".to_owned(),
        };
        let (succeeded, failed) = (report.succeeded as u64, report.failed as u64);
        self.resend_finished(audit_id, audit, run.ids, succeeded, failed, outcome).await;
        if succeeded > 0 {
            self.core.wallet_may_move().await;
        }
        result.map(|()| report).map_err(ResendError::from)
    }

    /// Reads the candidates a page at a time and resends each page.
    async fn resend_pages(
        &self,
        run: &mut ResendRun<'_>,
        audit: &ResendAudit,
        report: &mut RetryAllReport,
        progress: &mut impl FnMut(&RetryAllReport),
    ) -> Result<(), StoreError> {
        const PAGE: u64 = 1000;
        let limit = run.request.limit.unwrap_or(u64::MAX);
        let upto = self.core.store.last_transaction_id().await?;
        let mut after = 0_i64;
        loop {
            if let Some(reason) = run.why_stop() {
                report.stopped = Some(reason);
                return Ok(());
            }
            let want = PAGE.min(limit.saturating_sub(report.selected as u64));
            if want == 0 {
                return Ok(());
            }
            let page = self.core.store.resend_candidates(&run.request.filter, after, upto, want as i64).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = last.id;
            report.selected += page.len();
            if run.request.dry_run {
                report.rows.extend(page);
                continue;
            }
            let ids: Vec<i64> = page.iter().map(|row| row.id).collect();
            match run.audit_id {
                // The record exists before any row is revived or sent.
                None => {
                    let mut filter = serde_json::to_value(&run.request.filter).unwrap_or_default();
                    filter["limit"] = serde_json::json!(run.request.limit);
                    filter["rate"] = serde_json::json!(run.request.rate);
                    let audit_id = self.core.store.begin_resend(audit, &filter, &ids).await?;
                    run.audit_id = Some(audit_id);
                    info!(target: "txrelay::audit", relay = %self.core.id, audit_id, actor = %audit.actor, via = audit.via,
                          command = audit.command, %filter, first_ids = ?&ids[..ids.len().min(20)],
                          "resend started");
                }
                Some(audit_id) => self.core.store.extend_resend(audit_id, &ids).await?,
            }
            run.ids += ids.len();
            self.resend_rows(&page, run, report, progress).await?;
            if report.stopped.is_some() {
                return Ok(());
            }
        }
    }

    /// Sends one page of chosen rows, dead-lettered ones revived as they are
    /// claimed, at most `rate` per second.
    async fn resend_rows(
        &self,
        rows: &[ResendRow],
        run: &mut ResendRun<'_>,
        report: &mut RetryAllReport,
        progress: &mut impl FnMut(&RetryAllReport),
    ) -> Result<(), StoreError> {
        let dead: Vec<i64> = rows.iter().filter(|row| row.dead_lettered).map(|row| row.id).collect();
        let unsent: Vec<i64> = rows.iter().filter(|row| !row.dead_lettered).map(|row| row.id).collect();
        let mut skip: Vec<i64> = Vec::new();
        for (ids, revive) in [(&dead, true), (&unsent, false)] {
            if ids.is_empty() {
                continue;
            }
            loop {
                let mut round = self.core.config.batch_size.max(10) as usize;
                if let Some(rate) = run.request.rate {
                    // About ten rounds a second, each started on time.
                    round = round.min(((rate / 10.0).ceil() as usize).max(1));
                    run.pace(rate).await;
                }
                if let Some(reason) = run.why_stop() {
                    report.stopped = Some(reason);
                    return Ok(());
                }
                let mode = if revive {
                    ClaimMode::Revive { skip: &skip, only: ids }
                } else {
                    ClaimMode::Force { skip: &skip, only: ids }
                };
                // A stop during the round: its calls in flight finish and
                // are recorded, the rest of its rows are given back.
                let sweep = self.drain.sweep(mode, round as u32, &run.stop).await?;
                if sweep.claimed == 0 {
                    break;
                }
                run.attempted += sweep.claimed;
                report.revived += if revive { sweep.claimed as u64 } else { 0 };
                report.total += sweep.sent + sweep.failed;
                report.succeeded += sweep.sent;
                report.failed += sweep.failed;
                skip.extend(&sweep.failed_ids);
                skip.extend(&sweep.released_ids);
                progress(report);
                if let Some(error) = sweep.queue_error {
                    report.stopped = Some(format!("queue unreachable: {error}"));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Adds the outcome to a resend's audit record, logs it and tells the
    /// hook (the operator's Event).
    async fn resend_finished(
        &self,
        audit_id: i64,
        audit: &ResendAudit,
        rows: usize,
        succeeded: u64,
        failed: u64,
        outcome: String,
    ) {
        if let Err(error) = self.core.store.finish_resend(audit_id, succeeded, failed, &outcome).await {
            warn!(relay = %self.core.id, audit_id, %error, "could not record the outcome of the resend");
        }
        info!(target: "txrelay::audit", relay = %self.core.id, audit_id, succeeded, failed, %outcome, "resend finished");
        self.ended(&ResendNotice {
            audit_id,
            actor: audit.actor.clone(),
            via: audit.via,
            command: audit.command,
            rows,
            succeeded,
            failed,
            outcome,
        });
    }
}
