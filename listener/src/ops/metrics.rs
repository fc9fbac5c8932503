//! The listener's Prometheus metrics: names, descriptions, buckets and the recording handles, in
//! one place.
//!
//! Every [`crate::Listener`] owns its own recorder instead of installing the `metrics` crate's
//! global one: several listeners can run in one process (tests, or an application following two
//! databases) without adding up each other's counters, an application that installed a global
//! recorder of its own keeps it, and the hot path records through handles registered once (no
//! key lookup per event except the event type's counter, cached here). The admin server renders
//! the recorder with [`Metrics::render`].
//!
//! Labels are limited to `event_type`, `handler` and `outcome`: never ids, which would make the
//! series unbounded.

use std::collections::HashMap;
use std::sync::Mutex;

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// `events_received_total{event_type}`.
pub const EVENTS_RECEIVED: &str = "events_received_total";
/// `events_handled_total{handler,outcome}`.
pub const EVENTS_HANDLED: &str = "events_handled_total";
/// `handler_duration_seconds{handler}` (histogram).
pub const HANDLER_DURATION: &str = "handler_duration_seconds";
/// `handler_lag_seconds{handler}`.
pub const HANDLER_LAG: &str = "handler_lag_seconds";
/// `dead_letters_total{handler}`.
pub const DEAD_LETTERS: &str = "dead_letters_total";
/// `replication_lag_bytes`.
pub const REPLICATION_LAG: &str = "replication_lag_bytes";
/// `slot_retained_wal_bytes`.
pub const SLOT_RETAINED_WAL: &str = "slot_retained_wal_bytes";
/// `reconnects_total`.
pub const RECONNECTS: &str = "reconnects_total";
/// `slot_recoveries_total`.
pub const SLOT_RECOVERIES: &str = "slot_recoveries_total";
/// `transactions_confirmed_total`.
pub const TRANSACTIONS_CONFIRMED: &str = "transactions_confirmed_total";

/// Upper bounds of the `handler_duration_seconds` buckets: from sub-millisecond in-process
/// handlers to webhooks near their timeout.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Values of the `outcome` label of `events_handled_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handled and flushed: the event counts towards its transaction's acknowledgement.
    Ok,
    /// One more call after a transient failure (counted per retry, not per event).
    Retried,
    /// Given up on and recorded in `domain_events.dead_letter`.
    DeadLettered,
    /// Given up on by a handler with `on_failure = "block"`: the listener stops.
    Failed,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Failed => "failed",
        }
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// One listener's metrics and the recorder that holds them.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    received: Mutex<HashMap<String, Counter>>,
    /// `replication_lag_bytes`.
    pub replication_lag: Gauge,
    /// `slot_retained_wal_bytes`.
    pub slot_retained_wal: Gauge,
    /// `reconnects_total`.
    pub reconnects: Counter,
    /// `slot_recoveries_total`.
    pub slot_recoveries: Counter,
    /// `transactions_confirmed_total`.
    pub transactions_confirmed: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh recorder with every metric described.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HANDLER_DURATION.into()), &DURATION_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let describe_counter = |name: &'static str, text: &'static str| {
            recorder.describe_counter(name.into(), None, text.into())
        };
        describe_counter(
            EVENTS_RECEIVED,
            "Events handed to the dispatcher, by event type (redeliveries after a reconnect count again).",
        );
        describe_counter(
            EVENTS_HANDLED,
            "Handler outcomes: ok (handled and flushed), retried (one per retry), dead_lettered, failed (blocking handler gave up).",
        );
        describe_counter(
            DEAD_LETTERS,
            "Dead letters recorded, by handler (decode: rows that could not be decoded).",
        );
        describe_counter(
            RECONNECTS,
            "Sessions ended by a transient failure and retried.",
        );
        describe_counter(
            SLOT_RECOVERIES,
            "Recoveries from a lost replication slot started (or resumed) by this listener.",
        );
        describe_counter(
            TRANSACTIONS_CONFIRMED,
            "Transactions (poll batches in notify mode) fully handled and acknowledged.",
        );
        recorder.describe_histogram(
            HANDLER_DURATION.into(),
            Some(::metrics::Unit::Seconds),
            "Duration of each handler call (each attempt).".into(),
        );
        recorder.describe_gauge(
            HANDLER_LAG.into(),
            Some(::metrics::Unit::Seconds),
            "Time from recorded_at to the moment the handler finished its latest event.".into(),
        );
        recorder.describe_gauge(
            REPLICATION_LAG.into(),
            Some(::metrics::Unit::Bytes),
            "Server WAL end minus the position last confirmed to the server.".into(),
        );
        recorder.describe_gauge(
            SLOT_RETAINED_WAL.into(),
            Some(::metrics::Unit::Bytes),
            "WAL retained by the replication slot (current WAL position minus restart_lsn).".into(),
        );
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_name(name), &METADATA);
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_name(name), &METADATA);
        Metrics {
            replication_lag: gauge(REPLICATION_LAG),
            slot_retained_wal: gauge(SLOT_RETAINED_WAL),
            reconnects: counter(RECONNECTS),
            slot_recoveries: counter(SLOT_RECOVERIES),
            transactions_confirmed: counter(TRANSACTIONS_CONFIRMED),
            handle: recorder.handle(),
            received: Mutex::new(HashMap::new()),
            recorder,
        }
    }

    /// Counts one event of type `event_type` handed to the dispatcher.
    pub fn event_received(&self, event_type: &str) {
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        match received.get(event_type) {
            Some(counter) => counter.increment(1),
            None => {
                let key = Key::from_parts(
                    EVENTS_RECEIVED,
                    vec![Label::new("event_type", event_type.to_string())],
                );
                let counter = self.recorder.register_counter(&key, &METADATA);
                counter.increment(1);
                received.insert(event_type.to_string(), counter);
            }
        }
    }

    /// The handles of handler `name`, registered once per session.
    pub fn handler(&self, name: &str) -> HandlerMetrics {
        let labelled = |metric: &'static str, outcome: Option<Outcome>| {
            let mut labels = vec![Label::new("handler", name.to_string())];
            if let Some(outcome) = outcome {
                labels.push(Label::new("outcome", outcome.as_str()));
            }
            Key::from_parts(metric, labels)
        };
        let handled = |o: Outcome| {
            self.recorder
                .register_counter(&labelled(EVENTS_HANDLED, Some(o)), &METADATA)
        };
        HandlerMetrics {
            ok: handled(Outcome::Ok),
            retried: handled(Outcome::Retried),
            dead_lettered: handled(Outcome::DeadLettered),
            failed: handled(Outcome::Failed),
            dead_letters: self
                .recorder
                .register_counter(&labelled(DEAD_LETTERS, None), &METADATA),
            duration: self
                .recorder
                .register_histogram(&labelled(HANDLER_DURATION, None), &METADATA),
            lag: self
                .recorder
                .register_gauge(&labelled(HANDLER_LAG, None), &METADATA),
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets, so that memory stays bounded when
    /// nobody scrapes; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// The handles of one handler.
#[derive(Debug, Clone)]
pub struct HandlerMetrics {
    ok: Counter,
    retried: Counter,
    dead_lettered: Counter,
    failed: Counter,
    dead_letters: Counter,
    duration: Histogram,
    lag: Gauge,
}

impl Default for HandlerMetrics {
    /// Handles that record nothing (a dispatcher without metrics).
    fn default() -> HandlerMetrics {
        HandlerMetrics {
            ok: Counter::noop(),
            retried: Counter::noop(),
            dead_lettered: Counter::noop(),
            failed: Counter::noop(),
            dead_letters: Counter::noop(),
            duration: Histogram::noop(),
            lag: Gauge::noop(),
        }
    }
}

impl HandlerMetrics {
    /// Counts `n` events with `outcome`; a dead letter also counts in `dead_letters_total`.
    pub fn outcome(&self, outcome: Outcome, n: u64) {
        match outcome {
            Outcome::Ok => self.ok.increment(n),
            Outcome::Retried => self.retried.increment(n),
            Outcome::DeadLettered => {
                self.dead_lettered.increment(n);
                self.dead_letters.increment(n);
            }
            Outcome::Failed => self.failed.increment(n),
        }
    }

    /// A dead letter recorded outside the normal flow (an undecodable row, or a failed
    /// redelivery of one): counted in `dead_letters_total` only.
    pub fn dead_letter(&self) {
        self.dead_letters.increment(1);
    }

    /// Records the duration of one call.
    pub fn call_took(&self, elapsed: std::time::Duration) {
        self.duration.record(elapsed.as_secs_f64());
    }

    /// The handler finished (handled and flushed) an event recorded at `recorded_at`.
    pub fn finished(&self, recorded_at: chrono::DateTime<chrono::Utc>) {
        let lag = (chrono::Utc::now() - recorded_at)
            .num_microseconds()
            .unwrap_or(0);
        self.lag.set(lag.max(0) as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series_and_explicit_buckets() {
        let metrics = Metrics::new();
        metrics.event_received("Loan.Funded");
        metrics.event_received("Loan.Funded");
        let handler = metrics.handler("stdout");
        handler.outcome(Outcome::Ok, 2);
        handler.outcome(Outcome::DeadLettered, 1);
        handler.call_took(std::time::Duration::from_millis(3));
        let text = metrics.render();
        assert!(
            text.contains("events_received_total{event_type=\"Loan.Funded\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("events_handled_total{handler=\"stdout\",outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("dead_letters_total{handler=\"stdout\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("handler_duration_seconds_bucket{handler=\"stdout\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("handler_duration_seconds_count{handler=\"stdout\"} 1"),
            "{text}"
        );
        // Two recorders do not share series.
        assert!(!Metrics::new().render().contains("Loan.Funded"));
    }
}
