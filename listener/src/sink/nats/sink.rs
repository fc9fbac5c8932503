//! The sink: pipelined JetStream publishes, settled at each flush.

use std::sync::Mutex;

use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind};
use bytes::Bytes;
use tracing::{info, warn};

use super::options::{NatsCredentials, NatsOptions};
use crate::delivery::dispatch::{Handler, HandlerError};
use crate::event::Event;

/// Publishes whose acks may be outstanding before `handle` waits for them itself: bounded so
/// that a huge transaction neither exhausts the client's in-flight permits nor holds unbounded
/// memory.
const PIPELINE_DEPTH: usize = 1024;

/// One publish whose ack is outstanding or must be sent again.
struct Pending {
    /// The task (dispatcher worker) that handled it, whose flush answers for it.
    owner: Option<tokio::task::Id>,
    subject: String,
    payload: Bytes,
    id: String,
    /// `traceparent` / `tracestate` headers from the event's metadata.
    trace: Vec<(&'static str, String)>,
    /// `None`: not in flight (its last attempt failed): publish again.
    ack: Option<PublishAckFuture>,
    failures: u32,
}

/// Publishes each event to JetStream, with header `Nats-Msg-Id` = the event id, so the
/// stream drops redeliveries within its duplicate window (2 minutes by default).
///
/// Publishes are pipelined: [`Handler::handle`] sends and returns, [`Handler::flush`] (run
/// before the transaction is acknowledged) awaits every outstanding ack and publishes again
/// whatever was not acknowledged, so a transaction is confirmed only once JetStream stored all
/// of its events. One connection serves the handler; publishes on it keep their order, so each
/// aggregate's events are stored in order. The connection (and the stream check) is made on
/// first use: an unreachable server is a transient failure of the event at hand.
pub struct NatsSink {
    options: NatsOptions,
    context: tokio::sync::Mutex<Option<jetstream::Context>>,
    pending: Mutex<Vec<Pending>>,
    /// Held while acks are awaited: with several workers, a flush must not return while
    /// another worker's flush still waits for acks of events this worker handled.
    settling: tokio::sync::Mutex<()>,
}

impl NatsSink {
    /// A sink for `options`; connects on first use.
    pub fn new(options: NatsOptions) -> NatsSink {
        NatsSink {
            options,
            context: tokio::sync::Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            settling: tokio::sync::Mutex::new(()),
        }
    }

    async fn context(&self) -> Result<jetstream::Context, HandlerError> {
        let mut guard = self.context.lock().await;
        if let Some(context) = &*guard {
            return Ok(context.clone());
        }
        let o = &self.options;
        let mut connect = async_nats::ConnectOptions::new()
            .name("pg_domain_events-listener")
            .connection_timeout(o.timeout)
            .request_timeout(Some(o.timeout));
        match &o.credentials {
            Some(NatsCredentials::UserPassword(user, password)) => {
                connect = connect.user_and_password(user.clone(), password.clone())
            }
            Some(NatsCredentials::Token(token)) => connect = connect.token(token.clone()),
            None => {}
        }
        let client = connect.connect(o.servers.as_slice()).await.map_err(|e| {
            let definite = matches!(
                e.kind(),
                async_nats::ConnectErrorKind::ServerParse
                    | async_nats::ConnectErrorKind::Authentication
                    | async_nats::ConnectErrorKind::AuthorizationViolation
            );
            // A refused login is not retried (each event still tries once to connect).
            let error = if definite {
                HandlerError::definite("cannot connect to NATS")
            } else {
                HandlerError::transient("cannot connect to NATS")
            };
            error.with_source(e)
        })?;
        let context = jetstream::ContextBuilder::new()
            .timeout(o.timeout)
            .max_ack_inflight(4 * PIPELINE_DEPTH)
            .build(client);
        if o.create_stream {
            let subject = o.subject.stream_subject().ok_or_else(|| {
                HandlerError::definite("the subject template has no fixed prefix for a stream")
            })?;
            let stream = context
                .get_or_create_stream(jetstream::stream::Config {
                    name: o.stream.clone(),
                    subjects: vec![subject.clone()],
                    // Zero lets the server apply its default.
                    duplicate_window: o.duplicate_window.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    HandlerError::transient(format!("cannot create stream {}", o.stream))
                        .with_source(e)
                })?;
            info!(stream = %o.stream, subjects = ?stream.cached_info().config.subjects, "jetstream stream ready");
        } else {
            context.get_stream(&o.stream).await.map_err(|e| {
                HandlerError::transient(format!("stream {} is not available", o.stream))
                    .with_source(e)
            })?;
        }
        *guard = Some(context.clone());
        Ok(context)
    }

    async fn publish(
        context: &jetstream::Context,
        pending: &Pending,
    ) -> Result<PublishAckFuture, HandlerError> {
        let mut message = jetstream::message::PublishMessage::build()
            .payload(pending.payload.clone())
            .message_id(&pending.id)
            .header("Content-Type", "application/json");
        for (name, value) in &pending.trace {
            message = message.header(*name, value.as_str());
        }
        context
            .send_publish(pending.subject.clone(), message)
            .await
            .map_err(publish_error)
    }

    /// Awaits the acks of everything pending, whichever worker published it (and, when
    /// `resend`, publishes again what is not in flight).
    ///
    /// With `resend` (a flush), the calling task's own publishes that fail count an attempt and
    /// are given up after `max_attempts` (the dispatcher dead-letters them then); the first
    /// failure among the caller's own publishes is returned. Other workers' failed publishes stay
    /// pending without counting: their own worker's flush decides their fate, so a flush never
    /// returns `Ok` after another worker dropped one of its publishes.
    async fn settle(&self, resend: bool) -> Result<(), HandlerError> {
        let _settling = self.settling.lock().await;
        let mut batch = std::mem::take(&mut *self.lock_pending()?);
        if batch.is_empty() {
            return Ok(());
        }
        let context = if resend {
            match self.context().await {
                Ok(context) => Some(context),
                Err(e) => {
                    // Nothing was sent: keep everything for the next attempt.
                    self.lock_pending()?.splice(0..0, batch);
                    return Err(e);
                }
            }
        } else {
            None
        };
        // Why each publish that is not in flight failed to go out.
        let mut unsent: Vec<Option<HandlerError>> = Vec::with_capacity(batch.len());
        for item in batch.iter_mut() {
            let mut error = None;
            if let (Some(context), None) = (&context, &item.ack) {
                match Self::publish(context, item).await {
                    Ok(ack) => item.ack = Some(ack),
                    Err(e) => error = Some(e),
                }
            }
            unsent.push(error);
        }
        // Acks arrive concurrently; waiting for them together bounds a dead server's cost to
        // one timeout, not one per message.
        let acks: Vec<Option<PublishAckFuture>> = batch.iter_mut().map(|p| p.ack.take()).collect();
        let results = futures_util::future::join_all(acks.into_iter().map(|ack| async move {
            match ack {
                Some(ack) => Some(ack.await),
                None => None,
            }
        }))
        .await;
        let caller = tokio::task::try_id();
        let mut own_error = None;
        let mut failed = Vec::new();
        for ((mut item, result), unsent) in batch.into_iter().zip(results).zip(unsent) {
            let error = match result {
                Some(Ok(_)) => continue,
                Some(Err(e)) => publish_error(e),
                None => unsent.unwrap_or_else(|| HandlerError::transient("not published")),
            };
            if resend && item.owner == caller {
                item.failures += 1;
                if item.failures >= self.options.max_attempts {
                    // The dispatcher gives up on this flush now: the event is a dead letter.
                    warn!(subject = %item.subject, event_id = %item.id, error = %crate::error::report(&error), "nats publish given up");
                } else {
                    failed.push(item);
                }
                own_error.get_or_insert(error);
            } else {
                failed.push(item);
            }
        }
        if !failed.is_empty() {
            self.lock_pending()?.splice(0..0, failed);
        }
        match own_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn lock_pending(&self) -> Result<std::sync::MutexGuard<'_, Vec<Pending>>, HandlerError> {
        self.pending
            .lock()
            .map_err(|_| HandlerError::definite("nats pending list poisoned"))
    }
}

/// Classifies a publish failure: too large for the server is definite, the rest (timeouts,
/// no stream for the subject, a broken connection, JetStream errors) transient.
fn publish_error(e: async_nats::jetstream::context::PublishError) -> HandlerError {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            HandlerError::definite("the event is larger than the server's max_payload")
        }
        PublishErrorKind::TimedOut => HandlerError::timeout("no publish ack in time"),
        PublishErrorKind::StreamNotFound => {
            HandlerError::transient("no jetstream stream captures the subject")
        }
        _ => HandlerError::transient("publish failed"),
    }
    .with_source(e)
}

#[async_trait::async_trait]
impl Handler for NatsSink {
    fn target(&self) -> Option<String> {
        Some(self.options.subject.as_str().to_string())
    }

    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let payload = serde_json::to_vec(event).map_err(|e| {
            HandlerError::definite("cannot serialize the event as JSON").with_source(e)
        })?;
        let context = self.context().await?;
        let mut item = Pending {
            owner: tokio::task::try_id(),
            subject: self.options.subject.render(event),
            payload: Bytes::from(payload),
            id: event.id.to_string(),
            trace: crate::sink::trace_context::headers(event),
            ack: None,
            failures: 0,
        };
        item.ack = Some(Self::publish(&context, &item).await?);
        let depth = {
            let mut pending = self.lock_pending()?;
            pending.push(item);
            pending.len()
        };
        if depth >= PIPELINE_DEPTH {
            // Frees the in-flight permits; what failed is published again by `flush`.
            self.settle(false).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), HandlerError> {
        self.settle(true).await
    }
}
