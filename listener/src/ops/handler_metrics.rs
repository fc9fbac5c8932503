//! One handler's recording handles: outcomes, call durations, errors by type, publications by
//! target, and the events it has not finished yet (for its lag).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ::metrics::{Counter, Gauge, Histogram};
use chrono::{DateTime, Utc};

/// Values of the `outcome` label of `pg_domain_events_events_handled_total`.
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
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::Retried,
        Outcome::DeadLettered,
        Outcome::Failed,
    ];

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

/// Values of the `error_type` label of `pg_domain_events_handler_errors_total`: why one call
/// of `handle` or `flush` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// A transient error other than a timeout (retried).
    Transient,
    /// A definite error (not retried).
    Definite,
    /// The handler panicked (caught; a definite failure).
    Panic,
    /// The call timed out (a transient error).
    Timeout,
}

impl ErrorType {
    /// Every error type, in label order.
    pub const ALL: [ErrorType; 4] = [
        ErrorType::Transient,
        ErrorType::Definite,
        ErrorType::Panic,
        ErrorType::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Transient => "transient",
            ErrorType::Definite => "definite",
            ErrorType::Panic => "panic",
            ErrorType::Timeout => "timeout",
        }
    }
}

/// The `recorded_at` (µs since the epoch) of the events a handler started and has not finished,
/// as a multiset: a handler's lag is the age of the oldest, so it grows while the handler is
/// stalled and is 0 when nothing waits.
#[derive(Debug, Default)]
pub struct Pending {
    since: Mutex<BTreeMap<i64, usize>>,
}

impl Pending {
    fn add(&self, at: i64) {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        *since.entry(at).or_default() += 1;
    }

    fn remove(&self, at: i64) {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = since.get_mut(&at) {
            *count -= 1;
            if *count == 0 {
                since.remove(&at);
            }
        }
    }

    /// Seconds from the oldest unfinished event's `recorded_at` to `now`; 0 when none.
    pub fn lag_at(&self, now: DateTime<Utc>) -> f64 {
        let since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        since.keys().next().map_or(0.0, |&oldest| {
            (now.timestamp_micros() - oldest).max(0) as f64 / 1e6
        })
    }
}

/// The publication counters of a handler that writes to a target (a webhook host, a NATS
/// subject template, a Kafka topic template).
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) ok: Counter,
    pub(crate) error: Counter,
}

/// The handles of one handler.
#[derive(Debug, Clone)]
pub struct HandlerMetrics {
    pub(crate) outcomes: [Counter; 4],
    pub(crate) errors: [Counter; 4],
    pub(crate) published: Option<Published>,
    pub(crate) dead_letters: Counter,
    pub(crate) duration: Histogram,
    pub(crate) pending: Arc<Pending>,
}

impl Default for HandlerMetrics {
    /// Handles that record nothing (a dispatcher without metrics).
    fn default() -> HandlerMetrics {
        HandlerMetrics {
            outcomes: std::array::from_fn(|_| Counter::noop()),
            errors: std::array::from_fn(|_| Counter::noop()),
            published: None,
            dead_letters: Counter::noop(),
            duration: Histogram::noop(),
            pending: Arc::default(),
        }
    }
}

impl HandlerMetrics {
    /// Counts `n` events with `outcome`; a dead letter also counts in `dead_letters_total`, and
    /// an event handled and flushed by a handler with a target counts as published.
    pub fn outcome(&self, outcome: Outcome, n: u64) {
        self.outcomes[outcome as usize].increment(n);
        match outcome {
            Outcome::DeadLettered => self.dead_letters.increment(n),
            Outcome::Ok => {
                if let Some(published) = &self.published {
                    published.ok.increment(n);
                }
            }
            Outcome::Retried | Outcome::Failed => {}
        }
    }

    /// Counts one failed call of `handle` or `flush`, by why it failed; for a handler with a
    /// target, also a publication error.
    pub fn error(&self, error_type: ErrorType) {
        self.errors[error_type as usize].increment(1);
        if let Some(published) = &self.published {
            published.error.increment(1);
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

    /// The handler started on an event recorded at `recorded_at` (until [`Self::finished`]).
    pub fn started(&self, recorded_at: DateTime<Utc>) {
        self.pending.add(recorded_at.timestamp_micros());
    }

    /// The handler is done (flushed or given up) with an event passed to [`Self::started`].
    pub fn finished(&self, recorded_at: DateTime<Utc>) {
        self.pending.remove(recorded_at.timestamp_micros());
    }
}

/// A gauge of one handler's lag and the events it waits on; set from them when rendered.
#[derive(Debug, Clone)]
pub(crate) struct LagGauge {
    pub(crate) gauge: Gauge,
    pub(crate) pending: Arc<Pending>,
}

impl LagGauge {
    pub(crate) fn update(&self, now: DateTime<Utc>) {
        self.gauge.set(self.pending.lag_at(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_unfinished_event() {
        let metrics = HandlerMetrics::default();
        let now = Utc::now();
        let old = now - chrono::Duration::seconds(90);
        let newer = now - chrono::Duration::seconds(5);
        assert_eq!(metrics.pending.lag_at(now), 0.0);
        metrics.started(old);
        metrics.started(newer);
        metrics.started(old);
        assert!((metrics.pending.lag_at(now) - 90.0).abs() < 1e-3);
        // It grows while the oldest waits.
        let later = now + chrono::Duration::seconds(30);
        assert!((metrics.pending.lag_at(later) - 120.0).abs() < 1e-3);
        metrics.finished(old);
        assert!((metrics.pending.lag_at(now) - 90.0).abs() < 1e-3);
        metrics.finished(old);
        assert!((metrics.pending.lag_at(now) - 5.0).abs() < 1e-3);
        metrics.finished(newer);
        assert_eq!(metrics.pending.lag_at(later), 0.0);
    }
}
