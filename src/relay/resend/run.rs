//! The state of one `retry-all` run across its pages: why it stops (a
//! signal, the relay stopping, its time budget) and its pace.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::ResendRequest;

/// The state of one `retry-all` run across its pages.
pub(super) struct ResendRun<'a> {
    pub(super) request: &'a ResendRequest,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) budget_ends: Option<Instant>,
    pub(super) started: Instant,
    /// Rows claimed so far, for the rate.
    pub(super) attempted: usize,
    pub(super) audit_id: Option<i64>,
    /// Ids written to the audit record.
    pub(super) ids: usize,
}

impl ResendRun<'_> {
    pub(super) fn why_stop(&self) -> Option<String> {
        if *self.stop.borrow() {
            return Some(
                "interrupted (a signal, or the relay is stopping); the rows not yet taken were left as they were \
                 (a dead-lettered row revived in the last round stays revived, and the relay sends it)"
                    .to_owned(),
            );
        }
        let budget = self.request.budget.unwrap_or_default();
        self.budget_ends.filter(|end| Instant::now() >= *end).map(|_| {
            format!(
                "the time budget of {} s was used up at the rate asked; the rows not yet taken were left as they \
                 were (the relay sends unsent ones itself; call again or use the CLI for the rest)",
                budget.as_secs()
            )
        })
    }

    /// Waits for the rate, or less when a stop or the end of the budget
    /// comes first.
    pub(super) async fn pace(&mut self, rate: f64) {
        let wait = pace(rate, self.attempted, self.started.elapsed());
        // An absurdly low rate waits "forever": only a stop or the budget ends it.
        let until = match (Instant::now().checked_add(wait), self.budget_ends) {
            (Some(paced), Some(budget)) => Some(paced.min(budget)),
            (paced, budget) => paced.or(budget),
        };
        let mut stop = self.stop.clone();
        let waited = async {
            match until {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = waited => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }
}

/// How long to wait before the next message so that `sent` messages in
/// `elapsed` stay within `rate` per second.
pub fn pace(rate: f64, sent: usize, elapsed: Duration) -> Duration {
    if !(rate.is_finite() && rate > 0.0) {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(sent as f64 / rate).unwrap_or(Duration::MAX).saturating_sub(elapsed)
}

#[cfg(test)]
mod pace_tests {
    use super::pace;
    use std::time::Duration;

    #[test]
    fn a_rate_spaces_messages_evenly_from_the_start() {
        assert_eq!(pace(2.0, 0, Duration::ZERO), Duration::ZERO, "the first goes at once");
        assert_eq!(pace(2.0, 4, Duration::from_millis(500)), Duration::from_millis(1500));
        assert_eq!(pace(2.0, 4, Duration::from_secs(3)), Duration::ZERO, "behind schedule: no wait");
        assert_eq!(pace(0.5, 1, Duration::ZERO), Duration::from_secs(2));
        assert_eq!(pace(0.0, 10, Duration::ZERO), Duration::ZERO, "no rate: no pacing");
        assert_eq!(pace(f64::NAN, 10, Duration::ZERO), Duration::ZERO);
        assert_eq!(pace(1e-300, 10, Duration::ZERO), Duration::MAX, "no panic on an absurd rate");
    }
}
