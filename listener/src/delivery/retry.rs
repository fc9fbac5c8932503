//! Retry and failure policies of a handler: how transient failures are retried, and what happens
//! after the last attempt.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a handler's transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Calls per event, first one included (at least 1).
    pub max_attempts: u32,
    /// Delay before the second call; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of the delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1` (exponential, with up to 50 % jitter so that
    /// many listeners do not hammer a recovering downstream in step).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.initial_backoff.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        jitter(exp.min(self.max_backoff))
    }
}

/// Scales `d` by a pseudo-random factor in [0.5, 1.0].
pub(crate) fn jitter(d: Duration) -> Duration {
    // Jitter needs no cryptographic quality: the clock's nanoseconds are spread enough.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.5 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}

/// What happens to an event once a handler failed on it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Record it in `domain_events.dead_letter` and move on (redrive it later).
    #[default]
    DeadLetter,
    /// Stop the listener without acknowledging the transaction: the event is delivered again
    /// after a restart, and nothing after it is delivered before.
    Block,
}
