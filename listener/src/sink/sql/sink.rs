//! The handler: the configured function applied to each event exactly once, with the
//! subscription's position row in the same transaction.

use crate::delivery::dispatch::{Handler, HandlerError};
use crate::event::Event;

/// Calls a SQL function `f(event jsonb)` for each event, **exactly once**: the call and the
/// handler's own position (row `<subscription>/<handler>` of `domain_events.subscription`: the
/// commit LSN and position of the last event applied) commit in one transaction, and an event at
/// or before that position is skipped. Redelivery after a crash therefore never applies an event
/// twice, and an event whose transaction rolled back is delivered again.
///
/// Stream order must be total for the position to be meaningful: use it with one worker (the
/// configuration refuses `workers > 1` with a `sql` handler). A redriven event (commit LSN 0/0)
/// is applied in the transaction that deletes its dead letter, so a redrive is exactly-once too.
///
/// A handler built [`SqlHandler::for_replay`] (by `listener replay`) calls the function for every
/// event it is given, whatever its position, and neither reads nor moves the position row nor
/// touches dead letters: a replay is an operator's explicit "apply these again", at least once.
pub struct SqlHandler {
    db: crate::postgres::database::DatabaseConfig,
    /// What each event is applied with.
    target: Target,
    handler: String,
    subscription: String,
    /// `mode` of the position row: the subscription's mode.
    mode: crate::replication::subscription::Mode,
    /// Following the stream, or replaying stored events.
    delivery: Delivery,
    /// The connection and the task driving it (it ends when the client is dropped).
    client: tokio::sync::Mutex<Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>>,
}

/// What a [`SqlHandler`] is given, which decides its bookkeeping. Explicit, because both a
/// redriven and a replayed event carry commit LSN 0/0: the LSN alone cannot tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Events of the stream (exactly once by position) and redriven dead letters (exactly once
    /// by the dead letter's removal).
    #[default]
    Stream,
    /// Stored events replayed by `listener replay`: each one applied, in its own transaction,
    /// regardless of the handler's position, which is left as it is.
    Replay,
}

/// What a [`SqlHandler`] calls with each event.
enum Target {
    /// A configured function, `"schema"."function"` quoted.
    Function(String),
    /// An async handler of the database's registry, through `domain_events.run_async_handler`
    /// (which runs it with the rights of the role that registered it).
    Registered(RegisteredHandler),
}

/// An async handler of the registry, as its lane runs it.
struct RegisteredHandler {
    /// Log failed attempts to `domain_events.handler_log` (its `log_level` is not `off`).
    log_failures: bool,
    /// The attempt after which the dispatcher gives up (the last one is logged as
    /// `dead_lettered`).
    max_attempts: u32,
    /// The event being retried and its attempts so far (one worker: attempts are sequential).
    attempts: std::sync::Mutex<(uuid::Uuid, u32)>,
}

/// Why a `sql` handler's function name is not usable.
#[derive(Debug, thiserror::Error)]
#[error("invalid function {0:?}: use schema.function (unquoted identifiers)")]
pub struct FunctionNameError(String);

/// Quotes `schema.function` for SQL, refusing anything but two plain identifiers.
pub fn quote_function(name: &str) -> Result<String, FunctionNameError> {
    let valid = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part.len() <= 63
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    };
    match name.split_once('.') {
        Some((schema, function)) if valid(schema) && valid(function) => {
            Ok(format!("\"{schema}\".\"{function}\""))
        }
        _ => Err(FunctionNameError(name.to_string())),
    }
}

impl SqlHandler {
    /// A handler named `handler` of subscription `subscription` calling `function`
    /// (`schema.function`) over its own connection to `db` (opened on first use).
    pub fn new(
        db: crate::postgres::database::DatabaseConfig,
        function: &str,
        handler: impl Into<String>,
        subscription: impl Into<String>,
    ) -> Result<SqlHandler, FunctionNameError> {
        Ok(SqlHandler {
            db,
            target: Target::Function(quote_function(function)?),
            handler: handler.into(),
            subscription: subscription.into(),
            mode: crate::replication::subscription::Mode::Replication,
            delivery: Delivery::Stream,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The async registry handler `handler` (a row of `domain_events.handler`) for its lane,
    /// subscription `subscription` (notify mode): each event is applied with
    /// `domain_events.run_async_handler` exactly once; with `log_failures`, each failed
    /// attempt is written to `domain_events.handler_log`.
    pub fn registered(
        db: crate::postgres::database::DatabaseConfig,
        handler: impl Into<String>,
        subscription: impl Into<String>,
        log_failures: bool,
        max_attempts: u32,
    ) -> SqlHandler {
        SqlHandler {
            db,
            target: Target::Registered(RegisteredHandler {
                log_failures,
                max_attempts,
                attempts: std::sync::Mutex::new((uuid::Uuid::nil(), 0)),
            }),
            handler: handler.into(),
            subscription: subscription.into(),
            mode: crate::replication::subscription::Mode::Notify,
            delivery: Delivery::Stream,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// Calls the target with the event `json` on `client` (a connection or a transaction).
    async fn call(
        &self,
        client: &impl tokio_postgres::GenericClient,
        json: &str,
    ) -> Result<(), tokio_postgres::Error> {
        match &self.target {
            Target::Function(function) => {
                let call = format!("SELECT {function}($1::text::jsonb)");
                client.execute(&call, &[&json]).await.map(|_| ())
            }
            Target::Registered(_) => client
                .execute(
                    "SELECT domain_events.run_async_handler($2, $1::text::jsonb)",
                    &[&json, &self.handler],
                )
                .await
                .map(|_| ()),
        }
    }

    /// Records the position row under `mode` (`replication` by default).
    pub fn with_mode(mut self, mode: crate::replication::subscription::Mode) -> SqlHandler {
        self.mode = mode;
        self
    }

    /// Applies every event given, ignoring and keeping the position row: for `listener replay`.
    pub fn for_replay(mut self) -> SqlHandler {
        self.delivery = Delivery::Replay;
        self
    }

    /// What this handler is given.
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The name of the row holding this handler's position.
    pub fn position_row(&self) -> String {
        format!("{}/{}", self.subscription, self.handler)
    }

    async fn apply(
        &self,
        client: &mut tokio_postgres::Client,
        event: &Event,
        json: &str,
    ) -> Result<(), tokio_postgres::Error> {
        if self.delivery == Delivery::Replay {
            // One statement: its own transaction. The commit LSN is meaningless here (0/0 is
            // not a redrive), and the position row belongs to the stream.
            return self.call(client, json).await;
        }
        let row_name = self.position_row();
        let tx = client.transaction().await?;
        if event.commit_lsn == crate::lsn::Lsn::ZERO {
            // A redrive: applied together with the removal of its dead letter, so that a crash
            // before the listener records the success cannot apply it twice.
            let deleted = tx
                .execute(
                    "DELETE FROM domain_events.dead_letter \
                     WHERE subscription = $1 AND handler = $2 AND event_id = $3",
                    &[&self.subscription, &self.handler, &event.id],
                )
                .await?;
            if deleted == 0 {
                // Already redriven by a run that crashed before saying so; or an undecodable
                // row redriven to every handler, which this one never saw.
                let decode: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM domain_events.dead_letter \
                         WHERE subscription = $1 AND handler = $2 AND event_id = $3)",
                        &[
                            &self.subscription,
                            &crate::delivery::dead_letter::DECODE_HANDLER,
                            &event.id,
                        ],
                    )
                    .await?
                    .get(0);
                if !decode {
                    return tx.rollback().await;
                }
            }
            self.call(&tx, json).await?;
            return tx.commit().await;
        }
        let row = tx
            .query_one(
                "SELECT lsn::text, position FROM domain_events.subscription \
                 WHERE name = $1 FOR UPDATE",
                &[&row_name],
            )
            .await?;
        let applied_lsn: crate::lsn::Lsn = row
            .get::<_, Option<String>>(0)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        let applied_position: i64 = row.get(1);
        if (event.commit_lsn, event.position) <= (applied_lsn, applied_position) {
            tracing::debug!(handler = %self.handler, event_id = %event.id, "already applied; skipping");
            return tx.rollback().await;
        }
        self.call(&tx, json).await?;
        tx.execute(
            "UPDATE domain_events.subscription \
             SET lsn = $2::text::pg_lsn, position = $3, updated_at = now() WHERE name = $1",
            &[&row_name, &event.commit_lsn.to_string(), &event.position],
        )
        .await?;
        tx.commit().await
    }
}

#[async_trait::async_trait]
impl Handler for SqlHandler {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let json = serde_json::to_string(event).map_err(|e| {
            HandlerError::definite("cannot serialize the event as JSON").with_source(e)
        })?;
        let mut guard = self.client.lock().await;
        let (client, _) = match &mut *guard {
            Some(connected) => connected,
            None => {
                let (client, connection) = crate::replication::subscription::connect(&self.db)
                    .await
                    .map_err(|e| sql_failure(e.is_transient(), "cannot connect", e))?;
                if self.delivery == Delivery::Stream {
                    client
                        .execute(
                            "INSERT INTO domain_events.subscription (name, mode, position, lsn) \
                         VALUES ($1, $2, 0, '0/0') ON CONFLICT (name) DO NOTHING",
                            &[&self.position_row(), &self.mode.as_str()],
                        )
                        .await
                        .map_err(|e| {
                            let err =
                                crate::error::Error::sql("creating the handler's position row")(e);
                            sql_failure(err.is_transient(), "cannot create the position row", err)
                        })?;
                }
                guard.insert((client, connection))
            }
        };
        let started_at = chrono::Utc::now();
        let started = std::time::Instant::now();
        match self.apply(client, event, &json).await {
            Ok(()) => Ok(()),
            Err(err) => {
                let lost = err.is_closed() || err.code().is_none();
                let message = err
                    .as_db_error()
                    .map_or_else(|| err.to_string(), |e| e.message().to_string());
                let err = crate::error::Error::sql("calling the sql handler's function")(err);
                let transient = err.is_transient();
                if lost {
                    // The connection is gone (or unusable): reconnect on the next attempt.
                    *guard = None;
                } else if let Target::Registered(registered) = &self.target {
                    let failure = Failure {
                        started_at,
                        duration: started.elapsed(),
                        error: message,
                        last: !transient,
                    };
                    self.log_failure(client, registered, event, failure).await;
                }
                Err(sql_failure(transient, "the function failed", err))
            }
        }
    }
}

/// A failed attempt of a registry handler, for `domain_events.handler_log`.
struct Failure {
    started_at: chrono::DateTime<chrono::Utc>,
    duration: std::time::Duration,
    error: String,
    /// A definite error: the dispatcher does not retry it.
    last: bool,
}

impl SqlHandler {
    /// Counts the attempt and, when the handler logs errors, writes it to
    /// `domain_events.handler_log` in a transaction of its own (the failed one rolled back):
    /// `failure`, or `dead_lettered` for the last attempt (a definite error, or out of
    /// attempts). The log is a record, not a
    /// guarantee: a log row that cannot be written is reported and skipped.
    async fn log_failure(
        &self,
        client: &tokio_postgres::Client,
        registered: &RegisteredHandler,
        event: &Event,
        failure: Failure,
    ) {
        let attempt = {
            let mut attempts = registered
                .attempts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if attempts.0 != event.id {
                *attempts = (event.id, 0);
            }
            attempts.1 += 1;
            attempts.1
        };
        if !registered.log_failures {
            return;
        }
        let outcome = if failure.last || attempt >= registered.max_attempts {
            "dead_lettered"
        } else {
            "failure"
        };
        let logged = client
            .execute(
                "INSERT INTO domain_events.handler_log (handler, mode, event_id, position, \
                 event_type, started_at, duration, outcome, attempt, error, subscription) \
                 VALUES ($1, 'async', $2, $3, $4, $5, \
                 pg_catalog.make_interval(secs => $6), $7, $8, $9, $10)",
                &[
                    &self.handler,
                    &event.id,
                    &event.position,
                    &event.event_type,
                    &failure.started_at,
                    &failure.duration.as_secs_f64(),
                    &outcome,
                    &i32::try_from(attempt).unwrap_or(i32::MAX),
                    &failure.error,
                    &self.subscription,
                ],
            )
            .await;
        if let Err(err) = logged {
            tracing::warn!(handler = %self.handler, error = %err, "cannot log a failed attempt");
        }
    }
}

fn sql_failure(
    transient: bool,
    message: &str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> HandlerError {
    let error = if transient {
        HandlerError::transient(message)
    } else {
        HandlerError::definite(message)
    };
    error.with_source(source)
}
