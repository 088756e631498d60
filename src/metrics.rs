//! Prometheus metrics. One registry per process; every relay series carries
//! `relay="namespace/name"`. Labels are bounded: outcome, path, kind, route
//! and status class, never an error text.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    unsent: IntGaugeVec,
    dead_lettered: IntGaugeVec,
    oldest_unsent_age: prometheus::GaugeVec,
    unsent_dead_tuples: IntGaugeVec,
    oldest_xmin_age: prometheus::GaugeVec,
    accepted: IntCounterVec,
    sent: IntCounterVec,
    send_failures: IntCounterVec,
    send_outcome_unknown: IntCounterVec,
    commit_outcome_unknown: IntCounterVec,
    unsent_drift_repaired: IntCounterVec,
    held_wallets: IntGaugeVec,
    trace_context_invalid: IntCounterVec,
    queue_reachable: IntGaugeVec,
    relay_ready: IntGaugeVec,
    sweep_duration: HistogramVec,
    send_batch_size: HistogramVec,
    ingest_group_size: HistogramVec,
    http_duration: HistogramVec,
    http_requests: IntCounterVec,
    pub reconcile_total: IntCounter,
    pub reconcile_duration: prometheus::Histogram,
    pub reconcile_errors: IntCounterVec,
    pub relays: IntGauge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Created,
    Replayed,
    Rejected,
}

/// How a failed send counts, as the `kind` label of
/// `txrelay_send_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureLabel {
    /// The queue refused the whole call (missing, denied, throttled,
    /// unreachable): the message was held without an attempt.
    Queue,
    /// The message failed this time and will be retried.
    Transient,
    /// The message was refused for good and dead-lettered.
    Permanent,
    /// The call went out and no answer came: the queue may have taken it.
    Unknown,
}

impl FailureLabel {
    const ALL: [Self; 4] = [Self::Queue, Self::Transient, Self::Permanent, Self::Unknown];

    fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPath {
    Inline,
    Sweep,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let relay = &["relay"];
        let metrics = Self {
            unsent: IntGaugeVec::new(
                Opts::new("txrelay_unsent_transactions", "Transactions neither sent nor dead-lettered"),
                relay,
            )
            .expect("valid metric"),
            dead_lettered: IntGaugeVec::new(
                Opts::new("txrelay_dead_lettered_transactions", "Transactions given up on until retried by hand"),
                relay,
            )
            .expect("valid metric"),
            oldest_unsent_age: prometheus::GaugeVec::new(
                Opts::new("txrelay_oldest_unsent_age_seconds", "Age of the oldest unsent transaction (0 when none)"),
                relay,
            )
            .expect("valid metric"),
            unsent_dead_tuples: IntGaugeVec::new(
                Opts::new(
                    "txrelay_unsent_table_dead_tuples",
                    "Dead tuples in unsent_transactions, as PostgreSQL's statistics last counted them",
                ),
                relay,
            )
            .expect("valid metric"),
            oldest_xmin_age: prometheus::GaugeVec::new(
                Opts::new(
                    "txrelay_database_oldest_xmin_age_seconds",
                    "Age of the oldest transaction holding back VACUUM's horizon in the relay's database (0 when none)",
                ),
                relay,
            )
            .expect("valid metric"),
            accepted: IntCounterVec::new(
                Opts::new("txrelay_transactions_accepted_total", "POST /new requests by outcome"),
                &["relay", "outcome"],
            )
            .expect("valid metric"),
            sent: IntCounterVec::new(
                Opts::new("txrelay_messages_sent_total", "Messages accepted by the queue, by path"),
                &["relay", "path"],
            )
            .expect("valid metric"),
            send_failures: IntCounterVec::new(
                Opts::new("txrelay_send_failures_total", "Messages the queue did not accept, by kind"),
                &["relay", "kind"],
            )
            .expect("valid metric"),
            send_outcome_unknown: IntCounterVec::new(
                Opts::new(
                    "txrelay_send_outcome_unknown_total",
                    "Messages sent in a call that got no answer (timeout, reset, lost reply): the queue may hold them",
                ),
                relay,
            )
            .expect("valid metric"),
            commit_outcome_unknown: IntCounterVec::new(
                Opts::new(
                    "txrelay_commit_outcome_unknown_total",
                    "POST /new answered 503 outcome_unknown: the commit was sent and its answer never came",
                ),
                relay,
            )
            .expect("valid metric"),
            unsent_drift_repaired: IntCounterVec::new(
                Opts::new(
                    "txrelay_unsent_drift_repaired_total",
                    "Unsent transactions found missing from unsent_transactions and listed again",
                ),
                relay,
            )
            .expect("valid metric"),
            held_wallets: IntGaugeVec::new(
                Opts::new(
                    "txrelay_fifo_held_wallets",
                    "FIFO wallets whose later transactions wait behind a dead-lettered one (retry or skip it)",
                ),
                relay,
            )
            .expect("valid metric"),
            trace_context_invalid: IntCounterVec::new(
                Opts::new(
                    "txrelay_trace_context_invalid_total",
                    "Malformed traceparent or tracestate headers on /new, ignored (the request was taken without them)",
                ),
                &["relay", "header"],
            )
            .expect("valid metric"),
            queue_reachable: IntGaugeVec::new(
                Opts::new(
                    "txrelay_queue_reachable",
                    "1 while the queue takes messages, 0 after it refused a whole call until a send succeeds",
                ),
                relay,
            )
            .expect("valid metric"),
            relay_ready: IntGaugeVec::new(
                Opts::new(
                    "txrelay_relay_ready",
                    "1 while the relay's Ready condition, as this replica computes it, is True; 0 while False",
                ),
                relay,
            )
            .expect("valid metric"),
            sweep_duration: HistogramVec::new(
                HistogramOpts::new("txrelay_sweep_duration_seconds", "Duration of one sweep: claim, send, record")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                relay,
            )
            .expect("valid metric"),
            send_batch_size: HistogramVec::new(
                HistogramOpts::new("txrelay_send_batch_size", "Entries per SendMessageBatch call")
                    .buckets(vec![1.0, 2.0, 3.0, 5.0, 8.0, 10.0]),
                relay,
            )
            .expect("valid metric"),
            ingest_group_size: HistogramVec::new(
                HistogramOpts::new("txrelay_ingest_group_size", "/new requests committed together in one INSERT")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0]),
                relay,
            )
            .expect("valid metric"),
            http_duration: HistogramVec::new(
                HistogramOpts::new("txrelay_http_request_duration_seconds", "HTTP request duration")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                &["route", "status_class"],
            )
            .expect("valid metric"),
            http_requests: IntCounterVec::new(
                Opts::new("txrelay_http_requests_total", "HTTP requests answered, by route and exact status code"),
                &["route", "code"],
            )
            .expect("valid metric"),
            reconcile_total: IntCounter::new("txrelay_reconcile_total", "Reconciliations of TransactionRelays")
                .expect("valid metric"),
            reconcile_duration: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "txrelay_reconcile_duration_seconds",
                    "Duration of one reconcile: tokens, settings, start or reconfigure, status",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            )
            .expect("valid metric"),
            reconcile_errors: IntCounterVec::new(
                Opts::new("txrelay_reconcile_errors_total", "Failed reconciliations, by error"),
                &["error"],
            )
            .expect("valid metric"),
            relays: IntGauge::new("txrelay_relays", "TransactionRelays this process runs").expect("valid metric"),
            registry,
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.unsent.clone()),
            Box::new(self.dead_lettered.clone()),
            Box::new(self.oldest_unsent_age.clone()),
            Box::new(self.unsent_dead_tuples.clone()),
            Box::new(self.oldest_xmin_age.clone()),
            Box::new(self.accepted.clone()),
            Box::new(self.sent.clone()),
            Box::new(self.send_failures.clone()),
            Box::new(self.send_outcome_unknown.clone()),
            Box::new(self.commit_outcome_unknown.clone()),
            Box::new(self.unsent_drift_repaired.clone()),
            Box::new(self.held_wallets.clone()),
            Box::new(self.trace_context_invalid.clone()),
            Box::new(self.queue_reachable.clone()),
            Box::new(self.relay_ready.clone()),
            Box::new(self.sweep_duration.clone()),
            Box::new(self.send_batch_size.clone()),
            Box::new(self.ingest_group_size.clone()),
            Box::new(self.http_duration.clone()),
            Box::new(self.http_requests.clone()),
            Box::new(self.reconcile_total.clone()),
            Box::new(self.reconcile_duration.clone()),
            Box::new(self.reconcile_errors.clone()),
            Box::new(self.relays.clone()),
            #[cfg(target_os = "linux")]
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            // Names are fixed and distinct, so registration cannot collide.
            let _ = self.registry.register(collector);
        }
    }

    pub fn relay(&self, relay: &str) -> RelayMetrics {
        RelayMetrics { metrics: self.clone(), relay: relay.to_owned() }
    }

    pub fn observe_http(&self, route: &str, status: u16, seconds: f64) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_duration.with_label_values(&[route, class]).observe(seconds);
        // The exact code: the alerts tell 401s (a rotated or revoked token)
        // from other 4xx.
        self.http_requests.with_label_values(&[route, &status.to_string()]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec only fails on malformed metric families, which
        // the fixed definitions above cannot produce.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The series of one relay.
#[derive(Clone)]
pub struct RelayMetrics {
    metrics: Metrics,
    relay: String,
}

impl RelayMetrics {
    pub fn set_backlog(&self, unsent: i64, dead_lettered: i64, oldest_unsent_age_seconds: f64) {
        let m = &self.metrics;
        m.unsent.with_label_values(&[&self.relay]).set(unsent);
        m.dead_lettered.with_label_values(&[&self.relay]).set(dead_lettered);
        m.oldest_unsent_age.with_label_values(&[&self.relay]).set(oldest_unsent_age_seconds);
    }

    /// What VACUUM can reclaim in the bookkeeping table, and how long the
    /// oldest open transaction has been stopping it.
    pub fn set_vacuum(&self, unsent_dead_tuples: i64, oldest_xmin_age_seconds: f64) {
        let m = &self.metrics;
        m.unsent_dead_tuples.with_label_values(&[&self.relay]).set(unsent_dead_tuples);
        m.oldest_xmin_age.with_label_values(&[&self.relay]).set(oldest_xmin_age_seconds);
    }

    pub fn accepted(&self, outcome: Accepted) {
        let label = match outcome {
            Accepted::Created => "created",
            Accepted::Replayed => "replayed",
            Accepted::Rejected => "rejected",
        };
        self.metrics.accepted.with_label_values(&[self.relay.as_str(), label]).inc();
    }

    pub fn sent(&self, path: SendPath, count: usize) {
        let label = match path {
            SendPath::Inline => "inline",
            SendPath::Sweep => "sweep",
        };
        self.metrics.sent.with_label_values(&[self.relay.as_str(), label]).inc_by(count as u64);
    }

    pub fn send_failures(&self, kind: FailureLabel, count: usize) {
        if count > 0 {
            self.metrics.send_failures.with_label_values(&[self.relay.as_str(), kind.as_str()]).inc_by(count as u64);
        }
    }

    pub fn send_outcome_unknown(&self, count: usize) {
        self.metrics.send_outcome_unknown.with_label_values(&[&self.relay]).inc_by(count as u64);
    }

    pub fn commit_outcome_unknown(&self) {
        self.metrics.commit_outcome_unknown.with_label_values(&[&self.relay]).inc();
    }

    pub fn unsent_drift_repaired(&self, count: u64) {
        self.metrics.unsent_drift_repaired.with_label_values(&[&self.relay]).inc_by(count);
    }

    pub fn set_held_wallets(&self, wallets: i64) {
        self.metrics.held_wallets.with_label_values(&[&self.relay]).set(wallets);
    }

    pub fn trace_context_invalid(&self, header: crate::transaction::trace::Malformed) {
        let header = match header {
            crate::transaction::trace::Malformed::Traceparent => "traceparent",
            crate::transaction::trace::Malformed::Tracestate => "tracestate",
        };
        self.metrics.trace_context_invalid.with_label_values(&[&self.relay, header]).inc();
    }

    pub fn set_ready(&self, ready: bool) {
        self.metrics.relay_ready.with_label_values(&[&self.relay]).set(i64::from(ready));
    }

    pub fn set_queue_reachable(&self, reachable: bool) {
        self.metrics.queue_reachable.with_label_values(&[&self.relay]).set(i64::from(reachable));
    }

    pub fn sweep_duration(&self) -> Histogram {
        self.metrics.sweep_duration.with_label_values(&[&self.relay])
    }

    pub fn send_batch_size(&self, entries: usize) {
        self.metrics.send_batch_size.with_label_values(&[&self.relay]).observe(entries as f64);
    }

    pub fn ingest_group(&self, rows: usize) {
        self.metrics.ingest_group_size.with_label_values(&[&self.relay]).observe(rows as f64);
    }

    /// Forgets this relay's series (the relay was deleted).
    pub fn remove(&self) {
        let m = &self.metrics;
        let relay = [self.relay.as_str()];
        let _ = m.unsent.remove_label_values(&relay);
        let _ = m.dead_lettered.remove_label_values(&relay);
        let _ = m.oldest_unsent_age.remove_label_values(&relay);
        let _ = m.unsent_dead_tuples.remove_label_values(&relay);
        let _ = m.oldest_xmin_age.remove_label_values(&relay);
        let _ = m.queue_reachable.remove_label_values(&relay);
        let _ = m.relay_ready.remove_label_values(&relay);
        let _ = m.send_outcome_unknown.remove_label_values(&relay);
        let _ = m.commit_outcome_unknown.remove_label_values(&relay);
        let _ = m.unsent_drift_repaired.remove_label_values(&relay);
        let _ = m.held_wallets.remove_label_values(&relay);
        for header in ["traceparent", "tracestate"] {
            let _ = m.trace_context_invalid.remove_label_values(&[self.relay.as_str(), header]);
        }
        let _ = m.sweep_duration.remove_label_values(&relay);
        let _ = m.send_batch_size.remove_label_values(&relay);
        let _ = m.ingest_group_size.remove_label_values(&relay);
        for outcome in ["created", "replayed", "rejected"] {
            let _ = m.accepted.remove_label_values(&[self.relay.as_str(), outcome]);
        }
        for path in ["inline", "sweep"] {
            let _ = m.sent.remove_label_values(&[self.relay.as_str(), path]);
        }
        for kind in FailureLabel::ALL {
            let _ = m.send_failures.remove_label_values(&[self.relay.as_str(), kind.as_str()]);
        }
    }
}
