//! The sink: JSON lines on standard output, written whole at each flush.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::delivery::dispatch::{Handler, HandlerError};
use crate::event::Event;

/// Writes a flush's lines to the output, whole, or fails.
type Output = Arc<dyn Fn(&[u8]) -> io::Result<()> + Send + Sync>;

/// Lines not yet written, by the task (worker) that handled their events.
type Pending = HashMap<Option<tokio::task::Id>, Vec<u8>>;

/// Writes each event as one JSON line to standard output.
///
/// Lines are buffered per transaction and written (and flushed) in [`Handler::flush`], on a
/// blocking thread, before the transaction is acknowledged: a line is never lost to a crash after
/// its transaction was confirmed, and a transaction costs one `write` instead of one per event.
///
/// With several workers, each worker's lines are buffered apart (workers are told apart by
/// [`tokio::task::try_id`]) and its flush writes only those: a flush that returns `Ok` wrote all
/// of its worker's lines, and a failed write (its events are dead-lettered) costs no other
/// worker's line. A flush holds the standard output lock for its whole write, so the lines of
/// concurrent flushes never interleave; while the reader does not keep up (a full pipe), the
/// write waits, and so does the acknowledgement.
pub struct StdoutSink {
    pending: Mutex<Pending>,
    output: Output,
}

impl std::fmt::Debug for StdoutSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdoutSink").finish_non_exhaustive()
    }
}

impl Default for StdoutSink {
    fn default() -> StdoutSink {
        StdoutSink::with_output(Arc::new(write_stdout))
    }
}

impl StdoutSink {
    /// A sink writing to the process's standard output.
    pub fn new() -> StdoutSink {
        StdoutSink::default()
    }

    fn with_output(output: Output) -> StdoutSink {
        StdoutSink {
            pending: Mutex::new(HashMap::new()),
            output,
        }
    }

    fn lock_pending(&self) -> Result<std::sync::MutexGuard<'_, Pending>, HandlerError> {
        self.pending
            .lock()
            .map_err(|_| HandlerError::definite("stdout buffer poisoned"))
    }
}

#[async_trait::async_trait]
impl Handler for StdoutSink {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let mut line = serde_json::to_vec(event).map_err(|e| {
            HandlerError::definite("cannot serialize the event as JSON").with_source(e)
        })?;
        line.push(b'\n');
        self.lock_pending()?
            .entry(tokio::task::try_id())
            .or_default()
            .extend_from_slice(&line);
        Ok(())
    }

    async fn flush(&self) -> Result<(), HandlerError> {
        // Only the caller's lines: another worker's are its own flush's to answer for.
        let Some(lines) = self.lock_pending()?.remove(&tokio::task::try_id()) else {
            return Ok(());
        };
        let output = Arc::clone(&self.output);
        tokio::task::spawn_blocking(move || output(&lines))
            .await
            .map_err(|e| HandlerError::definite("stdout writer task failed").with_source(e))?
            // A closed pipe will not reopen: retrying cannot help. The lines are dropped (their
            // events are dead-lettered), not written by a later flush.
            .map_err(|e| HandlerError::definite("cannot write to standard output").with_source(e))
    }
}

/// A write to standard output that failed after part of a line: the next write ends that line
/// first. Read and written under the standard output lock.
static STDOUT_TORN: AtomicBool = AtomicBool::new(false);

/// Writes `lines` to standard output under its lock, held for the whole write.
///
/// The bytes go to the file descriptor directly, not through `std::io::Stdout`: its line buffer
/// may keep part of a failed write for a later one (and count it written), and it takes a
/// closed descriptor for a successful write; writing the descriptor tells exactly what was
/// written.
fn write_stdout(lines: &[u8]) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    // Whatever else was printed goes first.
    stdout.flush()?;
    let mut fd = std::fs::File::from(stdout.as_fd().try_clone_to_owned()?);
    let mut torn = STDOUT_TORN.load(Ordering::Relaxed);
    let result = write_lines(&mut fd, &mut torn, lines);
    STDOUT_TORN.store(torn, Ordering::Relaxed);
    result
}

/// Writes `lines` (whole lines) to `out`, waiting while it would block. When an earlier write
/// left a line `torn` (failed in the middle of it), a newline ends that line first, so that the
/// next lines stay whole; a failure in the middle of a line sets `torn`.
fn write_lines(out: &mut impl Write, torn: &mut bool, lines: &[u8]) -> io::Result<()> {
    if *torn {
        let mut written = 0;
        write_counted(out, b"\n", &mut written)?;
        *torn = false;
    }
    let mut written = 0;
    let result = write_counted(out, lines, &mut written).and_then(|()| out.flush());
    if result.is_err() && written > 0 {
        *torn = lines[written - 1] != b'\n';
    }
    result
}

/// Writes all of `buf` to `out`, counting the bytes written in `written`.
fn write_counted(out: &mut impl Write, buf: &[u8], written: &mut usize) -> io::Result<()> {
    while *written < buf.len() {
        match out.write(&buf[*written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A non-blocking descriptor (inherited from the parent) behaves like a blocking one:
            // a full pipe delays the write, it does not fail it.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{mpsc, oneshot};

    /// An output that accepts `budget` more bytes, then fails each write; `would_block` writes
    /// first answer `WouldBlock`.
    #[derive(Default)]
    struct Sink {
        written: Vec<u8>,
        budget: Option<usize>,
        would_block: usize,
        torn: bool,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.would_block > 0 {
                self.would_block -= 1;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // At most 7 bytes a call: writes are partial.
            let mut n = buf.len().min(7);
            if let Some(budget) = &mut self.budget {
                if *budget == 0 {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                n = n.min(*budget);
                *budget -= n;
            }
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sink_with(target: &Arc<Mutex<Sink>>) -> Arc<StdoutSink> {
        let target = Arc::clone(target);
        Arc::new(StdoutSink::with_output(Arc::new(move |lines| {
            let mut target = target.lock().unwrap();
            let mut torn = target.torn;
            let result = write_lines(&mut *target, &mut torn, lines);
            target.torn = torn;
            result
        })))
    }

    fn event(aggregate_id: &str) -> Event {
        crate::event::sample(serde_json::json!({ "aggregate_id": aggregate_id }))
    }

    fn lines(target: &Arc<Mutex<Sink>>) -> Vec<String> {
        let text = String::from_utf8(target.lock().unwrap().written.clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    fn aggregate_ids(lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a whole JSON line");
                v["aggregate_id"].as_str().unwrap().to_string()
            })
            .collect()
    }

    /// A worker: a task of its own that handles events, then flushes on request.
    struct Worker {
        flushes: mpsc::Sender<oneshot::Sender<Result<(), HandlerError>>>,
        _task: tokio::task::JoinHandle<()>,
    }

    impl Worker {
        /// Handles the events of aggregates `ids` on a new task, without flushing.
        async fn handling(sink: &Arc<StdoutSink>, ids: &'static [&'static str]) -> Worker {
            let (flushes, mut requests) = mpsc::channel::<oneshot::Sender<_>>(1);
            let (ready_tx, ready_rx) = oneshot::channel();
            let sink = Arc::clone(sink);
            let task = tokio::spawn(async move {
                for id in ids {
                    sink.handle(&event(id)).await.unwrap();
                }
                ready_tx.send(()).unwrap();
                while let Some(reply) = requests.recv().await {
                    let _ = reply.send(sink.flush().await);
                }
            });
            ready_rx.await.unwrap();
            Worker {
                flushes,
                _task: task,
            }
        }

        /// Flushes on the worker's task.
        async fn flush(&self) -> Result<(), HandlerError> {
            let (reply, outcome) = oneshot::channel();
            self.flushes.send(reply).await.unwrap();
            outcome.await.unwrap()
        }
    }

    #[tokio::test]
    async fn a_flush_writes_only_its_own_workers_lines() {
        let target = Arc::new(Mutex::new(Sink::default()));
        let sink = sink_with(&target);
        let a = Worker::handling(&sink, &["a1", "a2"]).await;
        let b = Worker::handling(&sink, &["b1"]).await;
        a.flush().await.unwrap();
        assert_eq!(aggregate_ids(&lines(&target)), ["a1", "a2"]);
        b.flush().await.unwrap();
        assert_eq!(aggregate_ids(&lines(&target)), ["a1", "a2", "b1"]);
        // Nothing left: flushing again writes nothing.
        a.flush().await.unwrap();
        assert_eq!(lines(&target).len(), 3);
    }

    #[tokio::test]
    async fn a_failed_write_costs_no_other_workers_line_and_tears_no_later_line() {
        let target = Arc::new(Mutex::new(Sink {
            budget: Some(10),
            ..Sink::default()
        }));
        let sink = sink_with(&target);
        let a = Worker::handling(&sink, &["a1", "a2"]).await;
        let b = Worker::handling(&sink, &["b1", "b2"]).await;
        // The output breaks in the middle of a's first line.
        assert!(!a.flush().await.unwrap_err().is_transient());
        assert_eq!(target.lock().unwrap().written.len(), 10);
        target.lock().unwrap().budget = None;
        // b's lines were not taken: b's flush writes them, each on a line of its own.
        b.flush().await.unwrap();
        let written = lines(&target);
        assert_eq!(written.len(), 3, "{written:?}");
        assert_eq!(aggregate_ids(&written[1..]), ["b1", "b2"]);
        // a's lines were given up (dead-lettered), not written by a later flush.
        a.flush().await.unwrap();
        assert_eq!(lines(&target).len(), 3);
    }

    #[tokio::test]
    async fn a_failure_between_lines_adds_no_newline() {
        let target = Arc::new(Mutex::new(Sink::default()));
        let sink = sink_with(&target);
        let a = Worker::handling(&sink, &["a1", "a2"]).await;
        // The output breaks right after the first line.
        let first = serde_json::to_vec(&event("a1")).unwrap().len() + 1;
        target.lock().unwrap().budget = Some(first);
        assert!(a.flush().await.is_err());
        // And before anything of the next flush.
        let b = Worker::handling(&sink, &["b1"]).await;
        assert!(b.flush().await.is_err());
        target.lock().unwrap().budget = None;
        let c = Worker::handling(&sink, &["c1"]).await;
        c.flush().await.unwrap();
        let text = String::from_utf8(target.lock().unwrap().written.clone()).unwrap();
        assert!(!text.contains("\n\n"), "{text}");
        assert_eq!(aggregate_ids(&lines(&target)), ["a1", "c1"]);
    }

    #[tokio::test]
    async fn a_full_non_blocking_output_is_waited_for() {
        let target = Arc::new(Mutex::new(Sink {
            would_block: 3,
            ..Sink::default()
        }));
        let sink = sink_with(&target);
        let a = Worker::handling(&sink, &["a1"]).await;
        a.flush().await.unwrap();
        assert_eq!(aggregate_ids(&lines(&target)), ["a1"]);
    }
}
