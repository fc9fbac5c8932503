//! The `stdout` handler: JSON lines.

use std::io::Write;
use std::sync::Mutex;

use crate::dispatch::{Handler, HandlerError};
use crate::event::Event;

/// Writes each event as one JSON line to standard output.
///
/// Lines are buffered per transaction and written (and flushed) in [`Handler::flush`], on a
/// blocking thread, before the transaction is acknowledged: a line is never lost to a crash after
/// its transaction was confirmed, and a transaction costs one `write` instead of one per event.
#[derive(Debug, Default)]
pub struct StdoutSink {
    buffer: Mutex<Vec<u8>>,
}

impl StdoutSink {
    /// A sink writing to the process's standard output.
    pub fn new() -> StdoutSink {
        StdoutSink::default()
    }
}

#[async_trait::async_trait]
impl Handler for StdoutSink {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let mut line = serde_json::to_vec(event).map_err(|e| {
            HandlerError::definite("cannot serialize the event as JSON").with_source(e)
        })?;
        line.push(b'\n');
        self.buffer
            .lock()
            .map_err(|_| HandlerError::definite("stdout buffer poisoned"))?
            .extend_from_slice(&line);
        Ok(())
    }

    async fn flush(&self) -> Result<(), HandlerError> {
        let pending = std::mem::take(
            &mut *self
                .buffer
                .lock()
                .map_err(|_| HandlerError::definite("stdout buffer poisoned"))?,
        );
        if pending.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(&pending)?;
            out.flush()
        })
        .await
        .map_err(|e| HandlerError::definite("stdout writer task failed").with_source(e))?
        // A closed pipe will not reopen: retrying cannot help.
        .map_err(|e| HandlerError::definite("cannot write to standard output").with_source(e))
    }
}
