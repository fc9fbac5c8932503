//! Calling a handler: attempts with backoff under its retry policy, each call timed and its
//! panic caught (a handler's panic is its failure, not the listener's).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::trace::FutureExt as _;
use opentelemetry::Context as TraceContext;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::delivery::registry::Registration;
use crate::error::{report, HandlerError};
use crate::event::Event;
use crate::ops::metrics::{ErrorType, HandlerMetrics, Outcome as Counted};
use crate::ops::traces::{end_call, Tracing};

/// The spans of a handler's calls: each call of `handle` is a span started by `tracing` (a
/// no-op when off), under the event's stored trace context or `batch`.
#[derive(Clone, Copy)]
pub(crate) struct CallTrace<'a> {
    pub(crate) tracing: &'a Tracing,
    pub(crate) batch: &'a TraceContext,
}

/// Whether a retry loop finished or was interrupted by shutdown.
pub(crate) enum Outcome {
    Done,
    Cancelled,
}

/// How a handler call (with its retries) ended.
pub(crate) enum Attempt {
    Succeeded,
    Cancelled,
    /// Failed for good: a definite error, a panic, or out of attempts.
    Failed {
        attempts: u32,
        error: HandlerError,
    },
}

/// Polls a future, turning a panic inside it into an `Err` (a handler's panic is a failure of
/// that handler, not of the listener).
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic_message(panic.as_ref()))),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

/// How often a paused handler's waiting call looks whether it was resumed.
const PAUSED_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// Calls `call` until it succeeds, retrying transient errors with the entry's backoff.
/// Every call of `handle` is timed, and traced under `trace`; every retry is counted.
pub(crate) async fn call_with_retries<'a>(
    entry: &'a Registration,
    metrics: &HandlerMetrics,
    cancel: &CancellationToken,
    event: Option<&'a Event>,
    trace: CallTrace<'_>,
    mut call: impl FnMut() -> HandlerFuture<'a>,
) -> Attempt {
    let mut attempt = 1;
    loop {
        while entry.paused.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::select! {
                _ = tokio::time::sleep(PAUSED_CHECK) => {}
                _ = cancel.cancelled() => return Attempt::Cancelled,
            }
        }
        let span = event.and_then(|event| {
            trace
                .tracing
                .handler_call(trace.batch, event, &entry.name, attempt)
        });
        let started = std::time::Instant::now();
        // The call's span is current while it runs: a sink passes it on as the parent of the
        // consumer's spans.
        let future: HandlerFuture<'a> = match &span {
            Some(span) => Box::pin(call().with_context(span.clone())),
            None => call(),
        };
        let result = CatchUnwind(future).await;
        if event.is_some() {
            metrics.call_took(started.elapsed());
        }
        let (err, error_type) = match result {
            Ok(Ok(())) => {
                if let Some(span) = &span {
                    end_call(span, None);
                }
                return Attempt::Succeeded;
            }
            Ok(Err(err)) => {
                let error_type = if err.is_timeout() {
                    ErrorType::Timeout
                } else if err.is_transient() {
                    ErrorType::Transient
                } else {
                    ErrorType::Definite
                };
                (err, error_type)
            }
            Err(panic) => (
                HandlerError::definite(format!("handler panicked: {panic}")),
                ErrorType::Panic,
            ),
        };
        metrics.error(error_type);
        if let Some(span) = &span {
            end_call(span, Some(error_type.as_str()));
        }
        if !err.is_transient() || attempt >= entry.retry.max_attempts {
            return Attempt::Failed {
                attempts: attempt,
                error: err,
            };
        }
        let delay = entry.retry.backoff(attempt);
        match event {
            Some(event) => warn!(
                handler = %entry.name,
                event_id = %event.id,
                event_type = %event.event_type,
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                error = %report(&err),
                "handler failed, retrying"
            ),
            None => warn!(
                handler = %entry.name,
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                error = %report(&err),
                "handler flush failed, retrying"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Attempt::Cancelled,
        }
        metrics.outcome(Counted::Retried, 1);
        attempt += 1;
    }
}
