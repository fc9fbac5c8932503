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
//! Every name starts with [`PREFIX`]. Labels are event types, handler names, configured targets
//! and closed sets (`outcome`, `error_type`, `status`): never ids, which would make the series
//! unbounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ::metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::ops::database_figures::DatabaseFigures;
pub use crate::ops::handler_metrics::{ErrorType, HandlerMetrics, Outcome};
use crate::ops::handler_metrics::{LagGauge, Pending, Published};

/// The prefix of every series, by Prometheus convention (the exporter's name).
pub const PREFIX: &str = "pg_domain_events_";
/// `pg_domain_events_events_received_total{event_type}`.
pub const EVENTS_RECEIVED: &str = "pg_domain_events_events_received_total";
/// `pg_domain_events_events_handled_total{handler,outcome}`.
pub const EVENTS_HANDLED: &str = "pg_domain_events_events_handled_total";
/// `pg_domain_events_events_published_total{handler,target,status}`.
pub const EVENTS_PUBLISHED: &str = "pg_domain_events_events_published_total";
/// `pg_domain_events_handler_duration_seconds{handler}` (histogram).
pub const HANDLER_DURATION: &str = "pg_domain_events_handler_duration_seconds";
/// `pg_domain_events_handler_lag_seconds{handler}`.
pub const HANDLER_LAG: &str = "pg_domain_events_handler_lag_seconds";
/// `pg_domain_events_handler_errors_total{handler,error_type}`.
pub const HANDLER_ERRORS: &str = "pg_domain_events_handler_errors_total";
/// `pg_domain_events_dead_letters_total{handler}`.
pub const DEAD_LETTERS: &str = "pg_domain_events_dead_letters_total";
/// `pg_domain_events_replication_lag_bytes`.
pub const REPLICATION_LAG: &str = "pg_domain_events_replication_lag_bytes";
/// `pg_domain_events_slot_retained_wal_bytes`.
pub const SLOT_RETAINED_WAL: &str = "pg_domain_events_slot_retained_wal_bytes";
/// `pg_domain_events_reconnects_total`.
pub const RECONNECTS: &str = "pg_domain_events_reconnects_total";
/// `pg_domain_events_slot_recoveries_total`.
pub const SLOT_RECOVERIES: &str = "pg_domain_events_slot_recoveries_total";
/// `pg_domain_events_transactions_confirmed_total`.
pub const TRANSACTIONS_CONFIRMED: &str = "pg_domain_events_transactions_confirmed_total";

/// Upper bounds of the `handler_duration_seconds` buckets: from sub-millisecond in-process
/// handlers to webhooks near their timeout.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// One listener's metrics and the recorder that holds them.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    received: Mutex<HashMap<String, Counter>>,
    /// Per handler name: the gauge of its lag and the events of its current session it waits
    /// on (a new session replaces them: what an ended one left unfinished is delivered again).
    lags: Mutex<HashMap<String, LagGauge>>,
    /// What only the database knows, last read from it.
    database: Mutex<Option<DatabaseFigures>>,
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
            HANDLER_ERRORS,
            "Failed handler calls (handle or flush), by error_type: transient, definite, panic, timeout.",
        );
        describe_counter(
            EVENTS_PUBLISHED,
            "Events published by handlers with a target (webhook host, subject or topic template): ok once flushed, error per failed call.",
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
            "Now minus recorded_at of the oldest event the handler started and has not finished; 0 when none waits.".into(),
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
            lags: Mutex::new(HashMap::new()),
            database: Mutex::new(None),
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

    /// The handles of handler `name`, registered once per session. `target`: where the
    /// handler publishes (a webhook host, a subject or topic template), when it does.
    pub fn handler(&self, name: &str, target: Option<&str>) -> HandlerMetrics {
        let key = |metric: &'static str, extra: &[(&'static str, &str)]| {
            let mut labels = vec![Label::new("handler", name.to_string())];
            labels.extend(
                extra
                    .iter()
                    .map(|&(label, value)| Label::new(label, value.to_string())),
            );
            Key::from_parts(metric, labels)
        };
        let counter = |metric: &'static str, extra: &[(&'static str, &str)]| {
            self.recorder
                .register_counter(&key(metric, extra), &METADATA)
        };
        let pending = Arc::new(Pending::default());
        let lag = LagGauge {
            gauge: self
                .recorder
                .register_gauge(&key(HANDLER_LAG, &[]), &METADATA),
            pending: Arc::clone(&pending),
        };
        self.lags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), lag);
        HandlerMetrics {
            outcomes: Outcome::ALL.map(|o| counter(EVENTS_HANDLED, &[("outcome", o.as_str())])),
            errors: ErrorType::ALL.map(|t| counter(HANDLER_ERRORS, &[("error_type", t.as_str())])),
            published: target.map(|target| Published {
                ok: counter(EVENTS_PUBLISHED, &[("target", target), ("status", "ok")]),
                error: counter(EVENTS_PUBLISHED, &[("target", target), ("status", "error")]),
            }),
            dead_letters: counter(DEAD_LETTERS, &[]),
            duration: self
                .recorder
                .register_histogram(&key(HANDLER_DURATION, &[]), &METADATA),
            pending,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let now = chrono::Utc::now();
        for lag in self.lags.lock().unwrap_or_else(|e| e.into_inner()).values() {
            lag.update(now);
        }
        let mut text = self.handle.render();
        if let Some(figures) = &*self.database.lock().unwrap_or_else(|e| e.into_inner()) {
            figures.render(&mut text);
        }
        text
    }

    /// Replaces the database figures rendered with the listener's own.
    pub fn set_database_figures(&self, figures: DatabaseFigures) {
        *self.database.lock().unwrap_or_else(|e| e.into_inner()) = Some(figures);
    }

    /// Folds recorded histogram samples into their buckets, so that memory stays bounded when
    /// nobody scrapes; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_labelled_series_and_explicit_buckets() {
        let metrics = Metrics::new();
        metrics.event_received("Loan.Funded");
        metrics.event_received("Loan.Funded");
        let handler = metrics.handler("hook", Some("example.com:443"));
        handler.outcome(Outcome::Ok, 2);
        handler.outcome(Outcome::DeadLettered, 1);
        handler.error(ErrorType::Timeout);
        handler.call_took(std::time::Duration::from_millis(3));
        handler.started(chrono::Utc::now() - chrono::Duration::seconds(75));
        let text = metrics.render();
        for line in [
            "pg_domain_events_events_received_total{event_type=\"Loan.Funded\"} 2",
            "pg_domain_events_events_handled_total{handler=\"hook\",outcome=\"ok\"} 2",
            "pg_domain_events_dead_letters_total{handler=\"hook\"} 1",
            "pg_domain_events_handler_errors_total{handler=\"hook\",error_type=\"timeout\"} 1",
            "pg_domain_events_handler_errors_total{handler=\"hook\",error_type=\"panic\"} 0",
            "pg_domain_events_events_published_total{handler=\"hook\",target=\"example.com:443\",status=\"ok\"} 2",
            "pg_domain_events_events_published_total{handler=\"hook\",target=\"example.com:443\",status=\"error\"} 1",
            "pg_domain_events_handler_duration_seconds_bucket{handler=\"hook\",le=\"0.005\"} 1",
            "pg_domain_events_handler_duration_seconds_count{handler=\"hook\"} 1",
            "pg_domain_events_handler_lag_seconds{handler=\"hook\"} 75",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        for series in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(series.starts_with(PREFIX), "{series}");
        }
        // A handler without a target publishes nothing.
        metrics.handler("stdout", None).outcome(Outcome::Ok, 1);
        assert!(!metrics.render().contains("handler=\"stdout\",target"));
        // Two recorders do not share series.
        assert!(!Metrics::new().render().contains("Loan.Funded"));
    }
}
