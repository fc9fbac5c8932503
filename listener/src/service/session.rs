//! What every session shares: its two cancellations, its dispatcher's tasks, and the deadline
//! that bounds a shutdown.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::Error;

/// A session's dispatcher and redrive tasks (see `Listener::start_delivery`).
pub(super) struct DispatchTasks {
    pub(super) dispatcher: JoinHandle<Result<(), Error>>,
    pub(super) redriver: Option<JoinHandle<()>>,
}

impl DispatchTasks {
    /// Ends a session, the same way whatever its kind, once its reader returned `read`: a
    /// failed reader aborts the dispatcher (it stops at its next transaction boundary or retry
    /// backoff), a reader stopped by the shutdown lets it drain what was read (the reader closed
    /// the queue at a transaction boundary). Returns the dispatcher's result.
    pub(super) async fn finish<R>(
        self,
        tokens: &SessionTokens,
        read: &Result<R, Error>,
    ) -> Result<(), Error> {
        if read.is_err() {
            tokens.abort_now();
        }
        tokens.stop.cancel();
        self.join().await
    }

    /// Waits for both (the dispatcher ends once its queue is closed and drained, or at its next
    /// transaction boundary once the session is aborted) and returns the dispatcher's result.
    /// Handler panics are caught in the dispatcher; a panic of its own is reported, not unwound
    /// here.
    async fn join(self) -> Result<(), Error> {
        let dispatched = self.dispatcher.await.unwrap_or_else(|e| {
            Err(Error::Task {
                task: "dispatcher",
                reason: e.to_string(),
            })
        });
        if let Some(redriver) = self.redriver {
            if let Err(e) = redriver.await {
                warn!(error = %e, "the redrive task failed");
            }
        }
        dispatched
    }
}

/// A session's two cancellations. `stop` is the shutdown: the session stops reading at the next
/// transaction boundary and its dispatcher finishes what was read, so the transaction in flight
/// is handled and confirmed instead of abandoned. `abort` ends the session at once (the shutdown
/// timeout passed, or the session failed): the transaction in flight is delivered again later.
pub(super) struct SessionTokens {
    pub(super) stop: CancellationToken,
    pub(super) abort: CancellationToken,
}

impl SessionTokens {
    /// Tokens for one session of a listener whose shutdown is `cancel` and whose shutdown
    /// timeout fires `abort`.
    pub(super) fn child_of(cancel: &CancellationToken, abort: &CancellationToken) -> SessionTokens {
        SessionTokens {
            stop: cancel.child_token(),
            abort: abort.child_token(),
        }
    }

    /// Ends the session without draining.
    pub(super) fn abort_now(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }
}

/// Fires `abort` when `cancel` fired `timeout` ago and the listener is still finishing its work
/// in flight; returns early once `done` fires.
pub(super) async fn shutdown_deadline(
    cancel: CancellationToken,
    abort: CancellationToken,
    done: CancellationToken,
    timeout: Duration,
) {
    tokio::select! {
        _ = done.cancelled() => return,
        _ = cancel.cancelled() => {}
    }
    tokio::select! {
        _ = done.cancelled() => {}
        _ = tokio::time::sleep(timeout) => {
            warn!(
                shutdown_timeout_secs = timeout.as_secs(),
                "the shutdown timeout passed: abandoning the transaction in flight (it is \
                 delivered again on the next start)"
            );
            abort.cancel();
        }
    }
}

/// A session's result from its dispatcher's and its reader's: a handler failure explains a
/// reader that stopped because the dispatcher went away, so it comes first.
pub(super) fn outcome<R>(
    dispatched: Result<(), Error>,
    read: Result<R, Error>,
) -> Result<R, Error> {
    dispatched?;
    read
}
