//! What a replay reports: per-handler counts, the failures collected instead of dead letters,
//! and how it ended.

use std::sync::Mutex;
use std::time::Duration;

use crate::delivery::dead_letter::{DeadLetter, DeadLetterSink};
use crate::error::{report, Error};

/// One event a handler failed on for good during a replay.
pub type Failure = DeadLetter;

/// Collects failures instead of writing dead letters: a replay reports them.
#[derive(Default)]
pub(super) struct Failures(pub(super) Mutex<Vec<Failure>>);

#[async_trait::async_trait]
impl DeadLetterSink for Failures {
    async fn record(&self, letter: &DeadLetter) -> Result<(), Error> {
        self.0
            .lock()
            .map_err(|_| Error::Task {
                task: "replay",
                reason: "failure list poisoned".into(),
            })?
            .push(letter.clone());
        Ok(())
    }
}

/// How a replay ended.
#[derive(Debug)]
pub enum Ending {
    /// Every selected event was read and given to its handlers.
    Complete,
    /// Stopped on request (SIGINT/SIGTERM) at a batch boundary.
    Interrupted,
    /// Stopped by an error: a blocking handler's failure, or the database.
    Stopped(Error),
}

/// What one handler did in a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerCount {
    /// Handler name.
    pub name: String,
    /// Events routed to it (its filters matched) in the finished batches.
    pub routed: u64,
    /// Of those, events it failed on for good.
    pub failed: u64,
}

impl HandlerCount {
    /// Events handled successfully.
    pub fn handled(&self) -> u64 {
        self.routed.saturating_sub(self.failed)
    }
}

/// The outcome of [`Replay::run`].
#[derive(Debug)]
pub struct Summary {
    /// Events read and handed to the handlers in finished batches.
    pub read: u64,
    /// Highest position handled (every selected event up to it was given to its handlers).
    pub last_position: Option<i64>,
    /// Per handler, in registration order.
    pub handlers: Vec<HandlerCount>,
    /// Events a handler failed on for good (and rows that could not be decoded, under handler
    /// `decode`), in the order they failed.
    pub failures: Vec<Failure>,
    /// Wall time from the first query to the end.
    pub elapsed: Duration,
    /// How it ended.
    pub ending: Ending,
}

impl Summary {
    /// Whether every selected event was handled by every handler it was routed to.
    pub fn succeeded(&self) -> bool {
        matches!(self.ending, Ending::Complete) && self.failures.is_empty()
    }

    /// Events read per second.
    pub fn rate(&self) -> f64 {
        self.read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A human-readable report (never payloads): totals, a line per handler, one per failure.
    pub fn render(&self) -> String {
        let mut out = format!(
            "replay: {} event(s) read in {:.2} s ({:.0} events/s)",
            self.read,
            self.elapsed.as_secs_f64(),
            self.rate()
        );
        if let Some(p) = self.last_position {
            out.push_str(&format!(", up to position {p}"));
        }
        out.push('\n');
        out.push_str("handler\tevents\thandled\tfailed\n");
        for h in &self.handlers {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                h.name,
                h.routed,
                h.handled(),
                h.failed
            ));
        }
        for f in &self.failures {
            out.push_str(&format!(
                "failed: handler {} event {} position {} after {} attempt(s): {}\n",
                f.handler,
                f.event_id,
                if f.position > 0 {
                    f.position.to_string()
                } else {
                    "-".into()
                },
                f.attempts,
                f.error.replace(['\n', '\t'], " ")
            ));
        }
        let resume = |out: &mut String| match self.last_position {
            Some(p) => out.push_str(&format!(
                "events after position {p} were not replayed: resume with --from-position {}\n",
                p + 1
            )),
            None => out.push_str("no event was replayed\n"),
        };
        match &self.ending {
            Ending::Complete => {}
            Ending::Interrupted => {
                out.push_str("interrupted: ");
                resume(&mut out);
            }
            Ending::Stopped(err) => {
                out.push_str(&format!("stopped: {}\n", report(err)));
                resume(&mut out);
            }
        }
        out
    }
}
