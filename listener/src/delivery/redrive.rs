//! Redelivery of dead letters requested with `domain_events.redrive()` (or
//! `listener dead-letters redrive`).
//!
//! At the start of every session and then periodically, the listener reads the requested dead
//! letters of its subscription, loads each event by id from `domain_events.event` and hands it to
//! the dispatcher, which runs the handler again between two transactions of the stream. Success
//! removes the dead letter; failure records the new error and attempts and clears the request.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::delivery::dead_letter::{DeadLetterStore, RedriveRequest};
use crate::delivery::dispatch::{RedriveJob, RedriveOutcome};
use crate::error::{report, Error};

/// Requests read per query.
const BATCH: i64 = 100;

/// Whether a pass may go on.
enum Flow {
    Continue,
    Stop,
}

/// Runs redrive passes every `every` (the first one at once) until `cancel` fires or the
/// dispatcher stops taking jobs.
pub(crate) async fn run(
    store: DeadLetterStore,
    jobs: mpsc::Sender<RedriveJob>,
    every: Duration,
    cancel: CancellationToken,
) {
    match store.supports_redrive().await {
        Ok(true) => {}
        Ok(false) => {
            warn!(
                "the installed pg_domain_events has no dead_letter.redrive_requested_at column; \
                 redrive is off until the extension is upgraded"
            );
            return;
        }
        Err(err) => {
            warn!(error = %report(&err), "cannot check for redrive support; redrive is off for this session");
            return;
        }
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        match pass(&store, &jobs, &cancel).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => return,
            // The next tick tries again: the requests stay in the table.
            Err(err) => warn!(error = %report(&err), "redrive pass failed"),
        }
    }
}

/// Redelivers every requested dead letter of the subscription.
async fn pass(
    store: &DeadLetterStore,
    jobs: &mpsc::Sender<RedriveJob>,
    cancel: &CancellationToken,
) -> Result<Flow, Error> {
    loop {
        let requests = store.requested(BATCH).await?;
        if requests.is_empty() {
            return Ok(Flow::Continue);
        }
        debug!(count = requests.len(), "redriving dead letters");
        for request in &requests {
            if let Flow::Stop = redrive(store, jobs, cancel, request).await? {
                return Ok(Flow::Stop);
            }
        }
    }
}

async fn redrive(
    store: &DeadLetterStore,
    jobs: &mpsc::Sender<RedriveJob>,
    cancel: &CancellationToken,
    request: &RedriveRequest,
) -> Result<Flow, Error> {
    let event = match store.load_event(request.event_id, request.position).await? {
        Ok(Some(event)) => event,
        Ok(None) => {
            let error = "the event is no longer in domain_events.event (retention?)";
            warn!(handler = %request.handler, event_id = %request.event_id, error, "cannot redrive a dead letter");
            store.redrive_failed(request, 0, error).await?;
            return Ok(Flow::Continue);
        }
        Err(reason) => {
            let error = format!("cannot load the event: {reason}");
            warn!(handler = %request.handler, event_id = %request.event_id, error = %error, "cannot redrive a dead letter");
            store.redrive_failed(request, 0, &error).await?;
            return Ok(Flow::Continue);
        }
    };
    let (reply, outcome) = oneshot::channel();
    let job = RedriveJob {
        event: Box::new(event),
        handler: request.handler.clone(),
        reply,
    };
    tokio::select! {
        sent = jobs.send(job) => if sent.is_err() { return Ok(Flow::Stop) },
        _ = cancel.cancelled() => return Ok(Flow::Stop),
    }
    let outcome = tokio::select! {
        outcome = outcome => match outcome {
            Ok(outcome) => outcome,
            // The dispatcher stopped before running it: the request stays for next time.
            Err(_) => return Ok(Flow::Stop),
        },
        _ = cancel.cancelled() => return Ok(Flow::Stop),
    };
    match outcome {
        RedriveOutcome::Delivered => {
            store.resolve(request.id).await?;
            info!(handler = %request.handler, event_id = %request.event_id, "dead letter redriven");
        }
        RedriveOutcome::Failed { attempts, error } => {
            store.redrive_failed(request, attempts, &error).await?;
        }
        RedriveOutcome::Cancelled => return Ok(Flow::Stop),
    }
    Ok(Flow::Continue)
}
