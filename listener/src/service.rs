//! The listener service: connects, streams, dispatches, confirms, and reconnects after transient
//! failures until cancelled.
//!
//! One session = one SQL connection (extension check, publication, subscription row, heartbeats)
//! plus one replication connection. Inside a session three tasks cooperate:
//!
//! ```text
//!  server ──XLogData──▶ stream loop ──Item (bounded)──▶ dispatcher ──▶ handlers
//!     ▲                     │  ▲                             │
//!     └──status updates─────┘  └──────── Ack (watch) ────────┤
//!                                                            ▼
//!                                          checkpointer ──▶ domain_events.subscription
//! ```
//!
//! The stream loop confirms to the server only what the dispatcher acknowledged (a transaction's
//! commit end LSN after all of its events were handled), or, when nothing of ours is in flight,
//! the server's keepalive position, so that WAL is not retained while other tables are busy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::config::{Config, ConfigError, HandlerConfig, HandlerKind, Mode, SlotLostPolicy};
use crate::delivery::dead_letter::DeadLetterStore;
use crate::delivery::dispatch::{jitter, Ack, Dispatcher, Handler, Item, Registry, Undecodable};
use crate::error::{report, Error};
use crate::event::{Decoded, EventDecoder, EventError};
use crate::lsn::Lsn;
use crate::ops::admin::{Health, Phase};
use crate::ops::metrics::Metrics;
use crate::replication::pgoutput::{self, PgOutputMessage};
use crate::replication::stream::{
    ConnectOptions, ReplicationConnection, ReplicationMessage, SlotState,
};
use crate::replication::subscription::{self, SubscriptionStore, HEARTBEAT_PREFIX};
use crate::sink::{KafkaSink, NatsSink, SqlHandler, StdoutSink, WebhookSink};

/// What built-in handlers are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Following the stream (`listener run`).
    Stream,
    /// Running over stored events (`listener replay`): a `sql` handler applies every event,
    /// whatever its position row says ([`SqlHandler::for_replay`]).
    Replay,
}

/// Builds the registry of built-in handlers described by `config.handlers`.
///
/// Secrets named by handlers (`secret_env`, `user_env`, …) are read from the process
/// environment now: a missing variable is a configuration error naming it.
pub fn registry_from_config(config: &Config) -> Result<Registry, Error> {
    build_registry(config, &config.handlers, Purpose::Stream)
}

/// Builds the registry of `handlers` (entries of `config.handlers`), in their order, for
/// `purpose`; the rest of `config` supplies the database and subscription they work for.
pub fn build_registry<'a>(
    config: &Config,
    handlers: impl IntoIterator<Item = &'a HandlerConfig>,
    purpose: Purpose,
) -> Result<Registry, Error> {
    let env = |name: &str| std::env::var(name).ok();
    let invalid = |handler: &HandlerConfig, message: String| ConfigError::Invalid {
        origin: Some(format!("handler {}", handler.name())),
        message,
    };
    let mut registry = Registry::new();
    for handler in handlers {
        let sink: Arc<dyn Handler> = match handler.kind {
            HandlerKind::Stdout => Arc::new(StdoutSink::new()),
            HandlerKind::Sql => {
                let function = handler.function.as_deref().unwrap_or_default();
                let sql = SqlHandler::new(
                    config.database.clone(),
                    function,
                    handler.name(),
                    config.replication.subscription_name(),
                )
                .map_err(|e| invalid(handler, e.to_string()))?
                .with_mode(config.replication.mode);
                match purpose {
                    Purpose::Stream => Arc::new(sql),
                    Purpose::Replay => Arc::new(sql.for_replay()),
                }
            }
            HandlerKind::Webhook => {
                let secret = handler.webhook_secret(env)?;
                let url = handler.url.as_deref().unwrap_or_default();
                Arc::new(
                    WebhookSink::new(url, handler.timeout(), secret)
                        .map_err(|e| invalid(handler, crate::error::report(&e)))?,
                )
            }
            HandlerKind::Nats => Arc::new(NatsSink::new(handler.nats_options(env)?)),
            HandlerKind::Kafka => Arc::new(
                KafkaSink::new(handler.kafka_options()?)
                    .map_err(|e| invalid(handler, e.to_string()))?,
            ),
        };
        registry.register_with(
            handler.name(),
            handler.filters()?,
            handler.retry(),
            handler.on_failure,
            sink,
        );
    }
    Ok(registry)
}

/// A session's dispatcher and redrive tasks (see [`Listener::spawn_dispatch`]).
struct DispatchTasks {
    dispatcher: JoinHandle<Result<(), Error>>,
    redriver: Option<JoinHandle<()>>,
}

impl DispatchTasks {
    /// Waits for both (the dispatcher ends once its queue is closed and drained, or at its next
    /// transaction boundary once the session is aborted) and returns the dispatcher's result. Handler panics are
    /// caught in the dispatcher; a panic of its own is reported, not unwound here.
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
struct SessionTokens {
    stop: CancellationToken,
    abort: CancellationToken,
}

impl SessionTokens {
    /// Tokens for one session of a listener whose shutdown is `cancel` and whose shutdown
    /// timeout fires `abort`.
    fn child_of(cancel: &CancellationToken, abort: &CancellationToken) -> SessionTokens {
        SessionTokens {
            stop: cancel.child_token(),
            abort: abort.child_token(),
        }
    }

    /// Ends the session without draining.
    fn abort_now(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }
}

/// Fires `abort` when `cancel` fired `timeout` ago and the listener is still finishing its work
/// in flight; returns early once `done` fires.
async fn shutdown_deadline(
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

/// A configured listener, ready to [`Listener::run`].
pub struct Listener {
    config: Config,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    health: Health,
}

impl Listener {
    /// Starts a session's dispatcher and, when `redrive_interval_ms` is set, its redrive task
    /// (the same for both modes). Takes the dead-letter store so that its SQL connection closes
    /// once the tasks are done with it.
    ///
    /// The redrive task stops with `session.stop`. The dispatcher drains: it handles whatever
    /// the session's reader hands it until the reader closes the queue (which it does at a
    /// transaction boundary on shutdown), and stops early — at its next transaction boundary or
    /// retry backoff — only on `session.abort`.
    fn spawn_dispatch(
        &self,
        dead_letters: Arc<DeadLetterStore>,
        items: mpsc::Receiver<Item>,
        acks: watch::Sender<Ack>,
        session: &SessionTokens,
    ) -> DispatchTasks {
        let r = &self.config.replication;
        let mut dispatcher = Dispatcher::new(Arc::clone(&self.registry), dead_letters.clone())
            .with_workers(r.workers)
            .with_metrics(Arc::clone(&self.metrics));
        let redriver = if r.redrive_interval_ms > 0 {
            let (jobs_tx, jobs_rx) = mpsc::channel(1);
            dispatcher = dispatcher.with_redrives(jobs_rx);
            Some(tokio::spawn(crate::delivery::redrive::run(
                DeadLetterStore::clone(&dead_letters),
                jobs_tx,
                Duration::from_millis(r.redrive_interval_ms),
                session.stop.clone(),
            )))
        } else {
            None
        };
        let dispatcher = tokio::spawn(dispatcher.run(items, acks, session.abort.clone()));
        DispatchTasks {
            dispatcher,
            redriver,
        }
    }

    /// A listener following `config` and delivering to `registry`'s handlers.
    ///
    /// `config` is validated as `listener run` validates its configuration (slot and publication
    /// names, intervals, `workers`, the entries of `handlers` if any, such as a `sql` handler
    /// needing `workers = 1`): a mistake is an [`Error::Config`] here, not a failure later.
    /// `config.handlers` may be empty: the registry holds the handlers.
    pub fn new(config: Config, registry: Registry) -> Result<Listener, Error> {
        config.validate_embedded().map_err(Error::Config)?;
        Ok(Listener {
            config,
            registry: Arc::new(registry),
            metrics: Arc::new(Metrics::new()),
            health: Health::default(),
        })
    }

    /// This listener's metrics (what `/metrics` renders), e.g. to serve them from an
    /// application's own HTTP server instead of `admin.listen`.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// This listener's phase (what `/health` reports).
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Runs until `cancel` fires or a definite error occurs. Transient failures reconnect with
    /// exponential backoff.
    ///
    /// On `cancel` the listener drains: it receives the rest of the transaction in flight (up to
    /// its commit), lets the handlers finish what was received — retries included — confirms it
    /// and returns `Ok`, within `replication.shutdown_timeout_secs`; after that it stops at once
    /// and the unconfirmed rest is delivered again on the next start.
    ///
    /// With `admin.listen` set, the admin HTTP server runs alongside and stops when this returns.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), Error> {
        let stop = CancellationToken::new();
        let admin = self.start_admin(&cancel, &stop).await?;
        let abort = CancellationToken::new();
        let deadline = tokio::spawn(shutdown_deadline(
            cancel.clone(),
            abort.clone(),
            stop.clone(),
            Duration::from_secs(self.config.replication.shutdown_timeout_secs),
        ));
        let upkeep = tokio::spawn({
            let metrics = Arc::clone(&self.metrics);
            let stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => metrics.upkeep(),
                    }
                }
            }
        });
        let result = self.run_sessions(&cancel, &abort).await;
        stop.cancel();
        let _ = deadline.await;
        if let Some(admin) = admin {
            match admin.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!(error = %err, "the admin HTTP server failed"),
                Err(err) => warn!(error = %err, "the admin HTTP server task failed"),
            }
        }
        let _ = upkeep.await;
        result
    }

    /// Binds `admin.listen` and serves on it until `stop` fires; `None` when not configured.
    async fn start_admin(
        &self,
        cancel: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<Option<JoinHandle<std::io::Result<()>>>, Error> {
        let admin = &self.config.admin;
        let Some(addr) = admin.address() else {
            return Ok(None);
        };
        let config_error = |origin: &str, message: String| {
            Error::Config(crate::config::ConfigError::Invalid {
                origin: Some(origin.to_string()),
                message,
            })
        };
        let token = match admin.token_env.as_deref() {
            None => None,
            // Fail closed: a configured but missing token must not leave the endpoints open.
            Some(name) => match std::env::var(name) {
                Ok(token) if !token.is_empty() => Some(token),
                _ => {
                    return Err(config_error(
                        "admin.token_env",
                        format!("environment variable {name} is not set or empty"),
                    ))
                }
            },
        };
        let socket = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| config_error("admin.listen", format!("cannot listen on {addr}: {e}")))?;
        Ok(Some(tokio::spawn(crate::ops::admin::serve(
            socket,
            self.health.clone(),
            Arc::clone(&self.metrics),
            token,
            cancel.clone(),
            stop.clone(),
        ))))
    }

    async fn run_sessions(
        &self,
        cancel: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<(), Error> {
        let r = &self.config.replication;
        let min = Duration::from_millis(r.reconnect_min_backoff_ms.max(1));
        let max = Duration::from_millis(r.reconnect_max_backoff_ms).max(min);
        let mut backoff = min;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let mut streamed = false;
            let tokens = SessionTokens::child_of(cancel, abort);
            let session = match self.config.replication.mode {
                Mode::Replication => match self.session(&tokens, &mut streamed).await {
                    Err(lost @ Error::SlotLost { .. })
                        if r.on_slot_lost == SlotLostPolicy::Recover =>
                    {
                        warn!(
                            error = %lost,
                            "the replication slot is lost; delivering the events it missed from \
                             the event table, then streaming from a new slot"
                        );
                        let tokens = SessionTokens::child_of(cancel, abort);
                        match self.recover_lost_slot(&tokens).await {
                            Ok(()) => {
                                backoff = min;
                                continue;
                            }
                            Err(err) => Err(err),
                        }
                    }
                    other => other,
                },
                Mode::Notify => self.notify_session(&tokens, &mut streamed).await,
            };
            match session {
                Ok(()) => return Ok(()),
                // A standby lost the race for the slot it saw free: it stands by again.
                Err(err) if err.is_slot_in_use() => {
                    debug!(error = %err, "another listener took the slot first");
                }
                Err(err) if err.is_transient() => {
                    self.health.set(Phase::Reconnecting(err.to_string()));
                    self.metrics.reconnects.increment(1);
                    if streamed {
                        backoff = min;
                    }
                    let delay = jitter(backoff);
                    warn!(
                        error = %report(&err),
                        retry_in_ms = delay.as_millis() as u64,
                        "transient failure; reconnecting"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(max);
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn session(&self, tokens: &SessionTokens, streamed: &mut bool) -> Result<(), Error> {
        let db = &self.config.database;
        let r = &self.config.replication;

        // The replication connection comes first: its authentication errors are the clearest.
        let mut conn = self.replication_connection().await?;
        let (client, sql_task) = subscription::connect(db).await?;
        let schema = crate::replication::publication::check_extension(&client, &db.dbname).await?;
        crate::replication::publication::ensure_publication(
            &client,
            &r.publication,
            r.create_publication,
        )
        .await?;
        let client = Arc::new(client);
        let dead_letters = Arc::new(DeadLetterStore::new(
            Arc::clone(&client),
            r.subscription_name(),
        ));
        let slot_watch = crate::replication::retention::SlotWatch {
            client: Arc::clone(&client),
            slot: r.slot.clone(),
            warn_above: r.slot_wal_warning_bytes,
            every: Duration::from_secs(r.status_interval_secs),
            gauge: self.metrics.slot_retained_wal.clone(),
        };
        // Stand by while another listener streams from the slot (before reading the row, which
        // the active listener keeps moving, and the slot's position).
        let standby_client = Arc::clone(&client);
        let store = SubscriptionStore::new(client, r.subscription_name(), schema);
        let free = crate::replication::standby::wait_for_slot(
            &standby_client,
            &r.slot,
            r.subscription_name(),
            &db.application_name,
            Duration::from_millis(r.standby_check_interval_ms),
            &self.health,
            &tokens.stop,
        )
        .await?;
        drop(standby_client);
        if !free {
            return Ok(());
        }
        let durable = store.load().await?;
        if durable.recovering {
            return Err(crate::replication::retention::slot_lost(
                &r.slot,
                "is being replaced: a recovery from its loss has not finished",
            ));
        }
        let durable = durable.lsn;
        let system = conn.identify_system().await?;
        debug!(system_id = %system.system_id, timeline = system.timeline, xlogpos = %system.xlogpos, "identified the server");
        let slot_error = |problem: String| Error::Slot {
            name: r.slot.clone(),
            problem,
        };
        let start = match conn.find_slot(&r.slot, &db.dbname).await? {
            Some(confirmed) => durable
                .unwrap_or_default()
                .max(confirmed.unwrap_or_default()),
            // Recreating it silently would skip every event committed since it disappeared.
            None if durable.is_some() => {
                return Err(crate::replication::retention::slot_lost(
                    &r.slot,
                    format!(
                        "was dropped, but subscription {:?} has delivered up to {} through it",
                        r.subscription_name(),
                        durable.unwrap_or_default()
                    ),
                ))
            }
            None if !r.create_slot => {
                return Err(slot_error(
                    "does not exist and replication.create_slot is false".into(),
                ))
            }
            None => {
                // The row first: its snapshot is the boundary should this slot be lost early.
                store.start_new().await?;
                match conn.create_slot(&r.slot).await? {
                    SlotState::Created(consistent_point) => consistent_point,
                    SlotState::CreatedConcurrently => {
                        match conn.find_slot(&r.slot, &db.dbname).await? {
                            Some(confirmed) => confirmed.unwrap_or_default(),
                            None => {
                                return Err(slot_error(
                                    "was created concurrently and dropped again".into(),
                                ))
                            }
                        }
                    }
                }
            }
        };
        conn.start_replication(&r.slot, &r.publication, start)
            .await?;
        *streamed = true;
        self.health.set(Phase::Streaming);
        info!(slot = %r.slot, publication = %r.publication, lsn = %start, "streaming");

        let (items_tx, items_rx) = mpsc::channel(r.queue_capacity);
        let (acks_tx, acks_rx) = watch::channel(Ack {
            lsn: start,
            position: 0,
        });
        // The SQL connection closes once its last user is gone (awaited below).
        let dispatch = self.spawn_dispatch(dead_letters, items_rx, acks_tx, tokens);
        let checkpointer = tokio::spawn(checkpoint(
            store,
            acks_rx.clone(),
            durable.unwrap_or_default(),
            Duration::from_millis(r.checkpoint_interval_ms),
            Duration::from_secs(r.heartbeat_interval_secs),
        ));

        // A lost slot stops the session with its own error (the walsender is usually killed at
        // the same moment, which alone would look like a transient connection loss).
        let watcher = tokio::spawn({
            let stop = tokens.stop.clone();
            let abort = tokens.abort.clone();
            async move {
                let result = slot_watch.run(stop.clone()).await;
                if result.is_err() {
                    stop.cancel();
                    abort.cancel();
                }
                result
            }
        });
        let mut stream = StreamState::new(
            start,
            Duration::from_secs(r.status_interval_secs),
            Duration::from_secs(r.server_timeout_secs),
        )
        .with_lag_gauge(self.metrics.replication_lag.clone());
        let streamed_result = stream
            .run(
                &mut conn,
                items_tx,
                acks_rx.clone(),
                &tokens.stop,
                &tokens.abort,
                r.ack_interval_ms,
            )
            .await;
        // A failed stream stops the dispatcher at its next transaction boundary; a shutdown
        // lets it finish what the stream read (the stream stopped at a boundary).
        if streamed_result.is_err() {
            tokens.abort_now();
        }
        tokens.stop.cancel();
        let dispatched = dispatch.join().await;
        let watched = watcher.await.unwrap_or_else(|e| {
            Err(Error::Task {
                task: "slot watch",
                reason: e.to_string(),
            })
        });
        let checkpointed = checkpointer.await;
        if let Err(e) = &checkpointed {
            warn!(error = %e, "the checkpoint task failed");
        }
        let _ = sql_task.await;

        let final_ack = acks_rx.borrow().lsn;
        if streamed_result.is_ok() {
            // Confirm what the dispatcher finished before we close, then end the copy cleanly.
            let confirm = stream.confirmable(final_ack);
            if let Err(err) = conn.send_status(confirm, false).await {
                warn!(error = %report(&err), "could not send the final status update");
            } else {
                info!(lsn = %confirm, "confirmed the last handled transaction");
            }
            conn.close(Duration::from_secs(5)).await;
        }
        // A handler failure explains a stream that stopped because the dispatcher went away; a
        // lost slot explains a stream that was cancelled or cut.
        dispatched?;
        watched?;
        streamed_result
    }
}

impl Listener {
    /// Opens a replication connection to the configured database.
    async fn replication_connection(&self) -> Result<ReplicationConnection, Error> {
        let db = &self.config.database;
        ReplicationConnection::connect(&ConnectOptions {
            host: db.host.clone(),
            port: db.port,
            user: db.user.clone(),
            password: db.password.clone(),
            dbname: db.dbname.clone(),
            application_name: db.application_name.clone(),
            connect_timeout: Duration::from_secs(db.connect_timeout_secs),
            sslmode: db.sslmode,
            tls: crate::postgres::tls::connector(db.sslmode, db.sslrootcert.as_deref())?,
        })
        .await
    }

    /// `listener slot recover`: recovers from the loss of the configured slot (see
    /// [`crate::replication::recovery`]) and returns once the subscription can stream from a new slot.
    /// Refuses (with [`Error::Slot`]) when the slot is not lost and no recovery is pending.
    pub async fn recover_slot(&self, cancel: &CancellationToken) -> Result<(), Error> {
        let r = &self.config.replication;
        let db = &self.config.database;
        let (client, sql_task) = subscription::connect(db).await?;
        let schema = crate::replication::publication::check_extension(&client, &db.dbname).await?;
        let wal_status: Option<String> = client
            .query_opt(
                "SELECT wal_status FROM pg_catalog.pg_replication_slots \
                  WHERE slot_name = $1 AND database = pg_catalog.current_database()",
                &[&r.slot],
            )
            .await
            .map_err(Error::sql("looking up the slot"))?
            .and_then(|row| row.get(0));
        let durable = SubscriptionStore::new(Arc::new(client), r.subscription_name(), schema)
            .load()
            .await;
        let _ = sql_task.await;
        let durable = durable?;
        // Lost: invalidated, or gone while the row says events were delivered through it.
        let lost = match wal_status.as_deref() {
            Some(status) => status == "lost",
            None => durable.lsn.is_some(),
        };
        if !lost && !durable.recovering {
            return Err(Error::Slot {
                name: r.slot.clone(),
                problem: "is not lost and no recovery is pending: nothing to recover".into(),
            });
        }
        // A one-shot command: a signal stops it at the next batch, no draining.
        self.recover_lost_slot(&SessionTokens::child_of(cancel, cancel))
            .await
    }

    /// Delivers what a lost slot missed by snapshot transitions from the subscription's
    /// delivered snapshot, creates a new slot meanwhile, and switches the row to it (see
    /// [`crate::replication::recovery`]). Returns `Ok` when done or cancelled (the row then says where to
    /// resume).
    async fn recover_lost_slot(&self, tokens: &SessionTokens) -> Result<(), Error> {
        use crate::replication::notify::{snapshot_xmin, NotifyStore, Poller};
        use crate::replication::recovery::{Begun, RecoveryStore};

        let db = &self.config.database;
        let r = &self.config.replication;
        let (client, sql_task) = subscription::connect(db).await?;
        let schema = crate::replication::publication::check_extension(&client, &db.dbname).await?;
        if !schema.lost_slot_recovery {
            return Err(Error::SlotLost {
                name: r.slot.clone(),
                how: "is lost".into(),
                remedy: "this database's pg_domain_events schema predates 0.2.0 and keeps no \
                         delivered snapshot to recover from: run ALTER EXTENSION \
                         pg_domain_events UPDATE, `listener slot drop`, and `listener replay` \
                         for the events committed since the slot's last confirmed position"
                    .into(),
            });
        }
        let client = Arc::new(client);
        let recovery = RecoveryStore::new(Arc::clone(&client), r.subscription_name());
        let (base, mut state, new_slot) = match recovery.begin().await? {
            Begun::NothingDelivered => {
                recovery.drop_slot(&r.slot).await?;
                recovery.abandon().await?;
                info!(slot = %r.slot, "the lost slot had delivered nothing: starting with a new slot");
                return Ok(());
            }
            Begun::NoBoundary { lsn } => {
                recovery.abandon().await?;
                return Err(Error::SlotLost {
                    name: r.slot.clone(),
                    how: "is lost".into(),
                    remedy: format!(
                        "subscription {:?} was last saved by a listener older than 0.2.0 and \
                         has no delivered snapshot, so the events the slot missed cannot be \
                         told apart: run `listener slot drop`, start the listener, and \
                         `listener replay` the events committed around and after LSN {lsn}",
                        r.subscription_name()
                    ),
                });
            }
            Begun::CatchingUp {
                base,
                state,
                new_slot,
            } => (base, state, new_slot),
        };
        self.health.set(Phase::Recovering);
        self.metrics.slot_recoveries.increment(1);
        info!(
            slot = %r.slot,
            subscription = %r.subscription_name(),
            from = %state.prev,
            "recovering from the lost slot: delivering from the event table by snapshot transitions"
        );
        let mut store = NotifyStore::for_recovery(Arc::clone(&client), r.subscription_name());
        let mut stream_from = None;
        let mut creation = None;
        match new_slot {
            Some((at, xid)) => {
                store.stream_from_xid(xid);
                stream_from = Some((at, xid));
            }
            None => {
                // Lost, or half made by an interrupted recovery: the new one starts from now.
                recovery.drop_slot(&r.slot).await?;
                let mut conn = self.replication_connection().await?;
                let slot = r.slot.clone();
                creation = Some(tokio::spawn(async move {
                    let created = conn.create_slot(&slot).await;
                    (conn, created)
                }));
            }
        }

        let dead_letters = Arc::new(DeadLetterStore::new(
            Arc::clone(&client),
            r.subscription_name(),
        ));
        let session_cancel = tokens.stop.clone();
        let (items_tx, items_rx) = mpsc::channel(r.queue_capacity);
        let (acks_tx, acks_rx) = watch::channel(Ack::default());
        let dispatch = self.spawn_dispatch(dead_letters, items_rx, acks_tx, tokens);
        let mut poller = Poller {
            store,
            notifications: None,
            items: items_tx,
            acks: acks_rx,
            poll_interval: Duration::from_millis(r.poll_interval_ms),
            batch_size: r.poll_batch_size,
            lsn_base: base.0,
        };
        let caught_up: Result<bool, Error> = async {
            let mut seq = 0u64;
            let mut delivered = 0u64;
            loop {
                if session_cancel.is_cancelled() {
                    return Ok(false);
                }
                if creation.as_ref().is_some_and(|task: &JoinHandle<_>| task.is_finished()) {
                    let (conn, created) = creation.take().expect("checked").await.map_err(|e| {
                        Error::Task {
                            task: "slot creation",
                            reason: e.to_string(),
                        }
                    })?;
                    drop(conn);
                    let at = match created? {
                        SlotState::Created(at) => at,
                        SlotState::CreatedConcurrently => {
                            return Err(Error::Slot {
                                name: r.slot.clone(),
                                problem: "was created by another listener while this one \
                                          recovered from its loss; run one listener per \
                                          subscription"
                                    .into(),
                            })
                        }
                    };
                    let xid = recovery.new_slot(at).await?;
                    poller.store.stream_from_xid(xid);
                    stream_from = Some((at, xid));
                    info!(slot = %r.slot, lsn = %at, first_xid = xid, "created the new slot; catching up to it");
                }
                let Some(n) = poller.transition(&mut state, &mut seq, &session_cancel).await? else {
                    return Ok(false);
                };
                delivered += n;
                if let Some((at, xid)) = stream_from {
                    if snapshot_xmin(&state.prev).is_some_and(|xmin| xmin >= xid) {
                        info!(
                            slot = %r.slot,
                            events = delivered,
                            lsn = %at,
                            "caught up from the event table; streaming from the new slot"
                        );
                        return Ok(true);
                    }
                }
                if n == 0 {
                    poller.wait(&session_cancel).await?;
                }
            }
        }
        .await;
        if caught_up.is_err() {
            tokens.abort_now();
        }
        session_cancel.cancel();
        // Its item sender closes the dispatcher's queue: the dispatcher ends once it is gone.
        drop(poller);
        if let Some(task) = creation {
            // Dropping the connection abandons the creation: the server removes the slot.
            task.abort();
        }
        let dispatched = dispatch.join().await;
        // A handler failure explains a catch-up that stopped because the dispatcher went away.
        dispatched?;
        let finished = if caught_up? {
            recovery.finish().await
        } else {
            Ok(())
        };
        drop(recovery);
        drop(client);
        let _ = sql_task.await;
        finished
    }
}

impl Listener {
    /// A notify-mode session: one SQL connection that listens for wake-ups, polls the event table
    /// by snapshot transitions (see [`crate::replication::notify`]) and saves the position after each batch.
    async fn notify_session(
        &self,
        tokens: &SessionTokens,
        streamed: &mut bool,
    ) -> Result<(), Error> {
        let db = &self.config.database;
        let r = &self.config.replication;
        let (client, sql_task, notifications) = subscription::connect_listening(db).await?;
        crate::replication::publication::check_extension(&client, &db.dbname).await?;
        client
            .batch_execute(&format!("LISTEN {}", crate::replication::notify::CHANNEL))
            .await
            .map_err(Error::sql("listening for notifications"))?;
        let client = Arc::new(client);
        let dead_letters = Arc::new(DeadLetterStore::new(
            Arc::clone(&client),
            r.subscription_name(),
        ));
        let store = crate::replication::notify::NotifyStore::new(client, r.subscription_name());
        let state = store.load_or_start().await?;
        *streamed = true;
        self.health.set(Phase::Streaming);
        info!(
            subscription = %r.subscription_name(),
            transition = state.transition,
            position = state.position,
            poll_interval_ms = r.poll_interval_ms,
            "polling (notify mode)"
        );

        let (items_tx, items_rx) = mpsc::channel(r.queue_capacity);
        let (acks_tx, acks_rx) = watch::channel(Ack::default());
        let dispatch = self.spawn_dispatch(dead_letters, items_rx, acks_tx, tokens);
        let poller = crate::replication::notify::Poller {
            store,
            notifications: Some(notifications),
            items: items_tx,
            acks: acks_rx,
            poll_interval: Duration::from_millis(r.poll_interval_ms),
            batch_size: r.poll_batch_size,
            lsn_base: 0,
        };
        let polled = poller.run(state, tokens.stop.clone()).await;
        if polled.is_err() {
            tokens.abort_now();
        }
        tokens.stop.cancel();
        let dispatched = dispatch.join().await;
        let _ = sql_task.await;
        // A handler failure explains a poller that stopped because the dispatcher went away.
        dispatched?;
        polled
    }
}

/// Periodically saves the dispatcher's progress into the subscription row and emits heartbeats;
/// after the dispatcher finished (its watch sender dropped), saves one last time.
async fn checkpoint(
    store: SubscriptionStore,
    mut acks: watch::Receiver<Ack>,
    mut saved: Lsn,
    every: Duration,
    heartbeat_every: Duration,
) {
    let mut save_tick = tokio::time::interval(every);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeats = !heartbeat_every.is_zero();
    let mut heartbeat_tick = tokio::time::interval(heartbeat_every.max(Duration::from_millis(1)));
    heartbeat_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat_failed = false;
    loop {
        tokio::select! {
            changed = acks.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = save_tick.tick() => {
                let ack = *acks.borrow();
                if ack.lsn > saved {
                    match store.save(ack).await {
                        Ok(()) => saved = ack.lsn,
                        Err(err) => warn!(error = %report(&err), "could not save the subscription position"),
                    }
                }
            }
            _ = heartbeat_tick.tick(), if heartbeats => {
                match store.heartbeat().await {
                    Ok(()) => heartbeat_failed = false,
                    // Log the first failure of a streak only: a missing grant would flood the log.
                    Err(err) if !heartbeat_failed => {
                        heartbeat_failed = true;
                        warn!(error = %report(&err), "heartbeat failed (may the role execute pg_logical_emit_message?)");
                    }
                    Err(_) => {}
                }
            }
        }
    }
    let ack = *acks.borrow();
    if ack.lsn > saved {
        // Bounded: a shutdown must not hang on an unreachable server. The slot's confirmed
        // position (sent separately) and redelivery cover a position that was not saved.
        match tokio::time::timeout(Duration::from_secs(5), store.save(ack)).await {
            Ok(Ok(())) => debug!(lsn = %ack.lsn, "saved the final subscription position"),
            Ok(Err(err)) => {
                warn!(error = %report(&err), "could not save the final subscription position")
            }
            Err(_) => warn!("timed out saving the final subscription position"),
        }
    }
}

/// The stream loop's bookkeeping.
struct StreamState {
    decoder: EventDecoder,
    /// Inside Begin..Commit.
    in_txn: bool,
    /// Commit LSN of the current transaction (from Begin).
    commit_lsn: Lsn,
    /// Inserted rows seen so far in the current transaction.
    rows_in_txn: u64,
    /// End LSN of the last Commit handed to the dispatcher.
    last_commit: Lsn,
    /// Highest keepalive position: all WAL before it has been decoded and sent.
    server_wal_end: Lsn,
    /// Highest server WAL end seen in any message (XLogData included): for the lag metric only,
    /// never confirmed (WAL up to it may not have been decoded yet).
    server_wal_tip: Lsn,
    /// `replication_lag_bytes`.
    lag_gauge: ::metrics::Gauge,
    /// An item the full queue did not take yet; reading pauses until it is delivered.
    pending: Option<Item>,
    /// Last position sent in a status update, and when.
    last_sent: Lsn,
    last_sent_at: Instant,
    status_interval: Duration,
    /// When the server last sent anything (or we last resumed reading after backpressure).
    last_heard: Instant,
    /// Silence after which the connection counts as dead; zero disables the check.
    server_timeout: Duration,
    warned_relations: std::collections::HashSet<u32>,
}

impl StreamState {
    fn new(start: Lsn, status_interval: Duration, server_timeout: Duration) -> StreamState {
        StreamState {
            decoder: EventDecoder::default(),
            in_txn: false,
            commit_lsn: Lsn::ZERO,
            rows_in_txn: 0,
            last_commit: start,
            server_wal_end: start,
            server_wal_tip: start,
            lag_gauge: ::metrics::Gauge::noop(),
            pending: None,
            last_sent: Lsn::ZERO,
            last_sent_at: Instant::now(),
            status_interval,
            last_heard: Instant::now(),
            server_timeout,
            warned_relations: Default::default(),
        }
    }

    /// Reports the replication lag on `gauge`.
    fn with_lag_gauge(mut self, gauge: ::metrics::Gauge) -> StreamState {
        self.lag_gauge = gauge;
        self
    }

    /// Updates the lag metric: server WAL end minus the position last confirmed.
    fn record_lag(&mut self, wal_end: Lsn) {
        self.server_wal_tip = self.server_wal_tip.max(wal_end);
        // Nothing confirmed in this session yet: no meaningful difference to report.
        if self.last_sent > Lsn::ZERO {
            self.lag_gauge
                .set(self.server_wal_tip.0.saturating_sub(self.last_sent.0) as f64);
        }
    }

    /// The position we may confirm given the dispatcher's acknowledgement `acked`: the
    /// acknowledged commit, or, when every transaction received so far is handled and we are not
    /// inside one, the server's keepalive position (any later transaction commits beyond it).
    fn confirmable(&self, acked: Lsn) -> Lsn {
        if !self.in_txn && self.pending.is_none() && acked >= self.last_commit {
            acked.max(self.server_wal_end)
        } else {
            acked
        }
    }

    async fn send_status(
        &mut self,
        conn: &mut ReplicationConnection,
        acked: Lsn,
        reply: bool,
    ) -> Result<(), Error> {
        let lsn = self.confirmable(acked).max(self.last_sent);
        conn.send_status(lsn, reply).await?;
        if lsn > self.last_sent {
            debug!(lsn = %lsn, "confirmed");
        }
        self.last_sent = lsn;
        self.last_sent_at = Instant::now();
        self.record_lag(lsn);
        Ok(())
    }

    /// Reads and forwards until `cancel` fires, then goes on reading up to the commit of a
    /// transaction in progress (so that a shutdown finishes it rather than abandoning it); stops
    /// at once when `abort` fires.
    async fn run(
        &mut self,
        conn: &mut ReplicationConnection,
        items: mpsc::Sender<Item>,
        mut acks: watch::Receiver<Ack>,
        cancel: &CancellationToken,
        abort: &CancellationToken,
        ack_interval_ms: u64,
    ) -> Result<(), Error> {
        let mut tick = tokio::time::interval(Duration::from_millis(ack_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut draining = false;
        loop {
            if draining && !self.in_txn && self.pending.is_none() {
                debug!(lsn = %self.last_commit, "stopped reading at a transaction boundary");
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(()),
                _ = cancel.cancelled(), if !draining => {
                    draining = true;
                    if self.in_txn || self.pending.is_some() {
                        info!(
                            commit_lsn = %self.commit_lsn,
                            "shutting down: receiving the rest of the transaction in flight"
                        );
                    }
                }
                _ = items.closed() => return Ok(()), // the dispatcher stopped; its result says why
                permit = items.reserve(), if self.pending.is_some() => {
                    let Ok(permit) = permit else { return Ok(()) };
                    if let Some(item) = self.pending.take() {
                        permit.send(item);
                    }
                    // We were not reading: the server's silence so far says nothing.
                    self.last_heard = Instant::now();
                }
                _ = tick.tick() => {
                    if !self.server_timeout.is_zero()
                        && self.pending.is_none()
                        && self.last_heard.elapsed() > self.server_timeout
                    {
                        // A half-open TCP connection (a vanished host, a dropped NAT entry)
                        // never errors on its own: give up on it and reconnect.
                        return Err(Error::ConnectionLost(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "no message from the server for {} s",
                                self.last_heard.elapsed().as_secs()
                            ),
                        )));
                    }
                    let acked = acks.borrow_and_update().lsn;
                    let due = self.last_sent_at.elapsed() >= self.status_interval;
                    if self.confirmable(acked) > self.last_sent || due {
                        // The periodic update asks for a reply: a live server answers with a
                        // keepalive, which keeps `last_heard` fresh on an idle stream.
                        self.send_status(conn, acked, due).await?;
                    }
                }
                message = conn.next_message(), if self.pending.is_none() => {
                    self.last_heard = Instant::now();
                    match message? {
                        None => return Err(Error::StreamEnded),
                        Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                            self.server_wal_end = self.server_wal_end.max(wal_end);
                            self.record_lag(wal_end);
                            if reply_requested {
                                let acked = acks.borrow_and_update().lsn;
                                self.send_status(conn, acked, false).await?;
                            }
                        }
                        Some(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                            self.record_lag(wal_end);
                            let decoded = pgoutput::decode(data)
                                .map_err(|source| Error::Decode { lsn: wal_start, source })?;
                            if let Some(item) = self.apply(decoded)? {
                                match items.try_send(item) {
                                    Ok(()) => {}
                                    Err(mpsc::error::TrySendError::Full(item)) => self.pending = Some(item),
                                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Updates the transaction state with one message; returns what to hand to the dispatcher.
    fn apply(&mut self, message: PgOutputMessage) -> Result<Option<Item>, Error> {
        match message {
            PgOutputMessage::Begin(begin) => {
                if self.in_txn {
                    return Err(Error::Protocol("Begin inside a transaction".into()));
                }
                self.in_txn = true;
                self.commit_lsn = begin.final_lsn;
                self.rows_in_txn = 0;
                Ok(None)
            }
            PgOutputMessage::Commit(commit) => {
                if !self.in_txn {
                    return Err(Error::Protocol("Commit outside a transaction".into()));
                }
                self.in_txn = false;
                self.last_commit = commit.end_lsn;
                Ok(Some(Item::Commit {
                    end_lsn: commit.end_lsn,
                }))
            }
            PgOutputMessage::Relation(relation) => {
                self.decoder
                    .relation(&relation)
                    .map_err(|source| Error::Event {
                        commit_lsn: self.commit_lsn,
                        source,
                    })?;
                Ok(None)
            }
            PgOutputMessage::Insert(insert) => {
                if !self.in_txn {
                    return Err(Error::Protocol("Insert outside a transaction".into()));
                }
                let row_index = self.rows_in_txn;
                self.rows_in_txn += 1;
                let decoded =
                    match self
                        .decoder
                        .decode_insert(insert.relation, &insert.new, self.commit_lsn)
                    {
                        Ok(decoded) => decoded,
                        // A bad value in one row: dead-letter that row, keep streaming.
                        Err(source @ EventError::Column { .. }) => {
                            let (id, position) =
                                self.decoder.identify(insert.relation, &insert.new);
                            return Ok(Some(Item::Undecodable(Box::new(Undecodable {
                                // Stable across redeliveries, so a replay updates the same row.
                                event_id: id.unwrap_or_else(|| {
                                    Uuid::from_u64_pair(self.commit_lsn.0, row_index)
                                }),
                                position: position.unwrap_or(0),
                                commit_lsn: self.commit_lsn,
                                error: source.to_string(),
                            }))));
                        }
                        // The relation itself is unknown: the stream is not what we understand.
                        Err(source) => {
                            return Err(Error::Event {
                                commit_lsn: self.commit_lsn,
                                source,
                            })
                        }
                    };
                match decoded {
                    Decoded::Event(event) => Ok(Some(Item::Event(event))),
                    Decoded::NotAnEvent(table) => {
                        if self.warned_relations.insert(insert.relation) {
                            warn!(table = %table, "the publication carries rows of a table that is not the event table; ignoring them");
                        }
                        Ok(None)
                    }
                }
            }
            PgOutputMessage::Update(change) => self.ignored(change.relation, "update"),
            PgOutputMessage::Delete(change) => self.ignored(change.relation, "delete"),
            PgOutputMessage::Truncate(truncate) => {
                debug!(relations = truncate.relations.len(), "ignoring a truncate");
                Ok(None)
            }
            PgOutputMessage::Message(message) => {
                if message.prefix == HEARTBEAT_PREFIX {
                    debug!(lsn = %message.lsn, "heartbeat");
                }
                Ok(None)
            }
            PgOutputMessage::Origin(_) | PgOutputMessage::Type(_) => Ok(None),
        }
    }

    fn ignored(&mut self, relation: u32, what: &'static str) -> Result<Option<Item>, Error> {
        // Events are immutable; an update or delete can only come from a publication that was
        // widened by hand. It carries no new event, so it is skipped, loudly once per table.
        if self.decoder.is_event_relation(relation) && self.warned_relations.insert(relation) {
            warn!(
                change = what,
                "ignoring a change that is not an insert on the event table"
            );
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    //! The stream loop against a scripted fake walsender: behaviour a real server cannot be made
    //! to show on demand (silence, an abrupt end of the copy).

    use super::*;
    use crate::postgres::tls::SslMode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Reads one length-prefixed frontend message (after the optional tag byte).
    async fn read_message(sock: &mut TcpStream, tagged: bool) -> (u8, Vec<u8>) {
        let tag = if tagged {
            sock.read_u8().await.expect("tag")
        } else {
            0
        };
        let len = sock.read_u32().await.expect("length") as usize;
        let mut body = vec![0; len - 4];
        sock.read_exact(&mut body).await.expect("body");
        (tag, body)
    }

    /// Accepts one connection, authenticates it, answers START_REPLICATION with
    /// CopyBothResponse, sends `then` after `delay`, and records the reply-requested flags of the
    /// standby status updates it receives.
    async fn fake_walsender(
        delay: Duration,
        then: Vec<u8>,
    ) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            read_message(&mut sock, false).await; // startup
                                                  // AuthenticationOk, ReadyForQuery(idle).
            sock.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
                .await
                .expect("auth");
            let (tag, _) = read_message(&mut sock, true).await;
            assert_eq!(tag, b'Q', "START_REPLICATION");
            // CopyBothResponse: text format, no columns.
            sock.write_all(&[b'W', 0, 0, 0, 7, 0, 0, 0])
                .await
                .expect("copy both");
            tokio::time::sleep(delay).await;
            sock.write_all(&then).await.expect("script");
            let mut reply_flags = Vec::new();
            while let Ok(tag) = sock.read_u8().await {
                let Ok(len) = sock.read_u32().await else {
                    break;
                };
                let mut body = vec![0; len as usize - 4];
                if sock.read_exact(&mut body).await.is_err() {
                    break;
                }
                if tag == b'd' && body.first() == Some(&b'r') {
                    reply_flags.push(body[33]);
                }
            }
            reply_flags
        });
        (port, task)
    }

    async fn run_against(port: u16, server_timeout: Duration) -> Result<(), Error> {
        let mut conn = ReplicationConnection::connect(&ConnectOptions {
            host: "127.0.0.1".into(),
            port,
            user: "u".into(),
            password: None,
            dbname: "d".into(),
            application_name: "test".into(),
            connect_timeout: Duration::from_secs(5),
            sslmode: SslMode::Disable,
            tls: None,
        })
        .await?;
        conn.start_replication("s", "p", Lsn::ZERO).await?;
        let (items, _items_rx) = mpsc::channel(8);
        let (_acks_tx, acks_rx) = watch::channel(Ack::default());
        let mut state = StreamState::new(Lsn::ZERO, Duration::from_millis(100), server_timeout);
        let never = CancellationToken::new();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            state.run(&mut conn, items, acks_rx, &never, &never, 20),
        )
        .await
        .expect("the stream loop must not hang");
        drop(conn);
        result
    }

    #[tokio::test]
    async fn a_silent_server_is_a_lost_connection_after_asking_for_replies() {
        let (port, server) = fake_walsender(Duration::ZERO, Vec::new()).await;
        let started = Instant::now();
        let err = run_against(port, Duration::from_millis(400))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::ConnectionLost(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(err.is_transient());
        assert!(started.elapsed() >= Duration::from_millis(400));
        let reply_flags = server.await.expect("server");
        assert!(
            reply_flags.contains(&1),
            "periodic status updates must ask for a reply: {reply_flags:?}"
        );
    }

    #[tokio::test]
    async fn command_complete_ends_the_stream_transiently() {
        // A walsender that shuts down sends CommandComplete "COPY 0" instead of CopyDone.
        let mut script = vec![b'C', 0, 0, 0, 11];
        script.extend_from_slice(b"COPY 0\0");
        let (port, server) = fake_walsender(Duration::ZERO, script).await;
        let err = run_against(port, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::StreamEnded), "{err}");
        assert!(err.is_transient());
        server.await.expect("server");
    }

    #[tokio::test]
    async fn keepalives_keep_a_quiet_stream_alive() {
        // A keepalive 300 ms in, with a 400 ms timeout: the connection survives it, so the
        // timeout trips 400 ms after the keepalive, not 400 ms after the start.
        let mut keepalive = vec![b'd', 0, 0, 0, 22, b'k'];
        keepalive.extend_from_slice(&[0; 8]); // wal end
        keepalive.extend_from_slice(&[0; 8]); // server time
        keepalive.push(0); // no reply requested
        let (port, server) = fake_walsender(Duration::from_millis(300), keepalive).await;
        let started = Instant::now();
        let err = run_against(port, Duration::from_millis(400))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ConnectionLost(_)), "{err:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(700),
            "timed out {:?} after the start despite the keepalive",
            started.elapsed()
        );
        server.await.expect("server");
    }

    fn library_config() -> Config {
        let mut config = Config::default();
        config.replication.slot = "app_slot".into();
        config.replication.publication = "app_pub".into();
        config
    }

    fn config_error(result: Result<Listener, Error>) -> (Option<String>, String) {
        match result {
            Err(Error::Config(ConfigError::Invalid { origin, message })) => (origin, message),
            Err(other) => panic!("not a configuration error: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn new_validates_the_config_as_the_binary_does() {
        // Handlers come in the registry: an empty handler list is fine here.
        assert!(Listener::new(library_config(), Registry::new()).is_ok());

        let mut config = library_config();
        config.replication.slot = "Bad-Slot".into();
        let (origin, message) = config_error(Listener::new(config, Registry::new()));
        assert_eq!(origin.as_deref(), Some("replication.slot"));
        assert!(message.contains("Bad-Slot"), "{message}");

        let mut config = library_config();
        config.replication.publication = "1pub".into();
        let (origin, _) = config_error(Listener::new(config, Registry::new()));
        assert_eq!(origin.as_deref(), Some("replication.publication"));

        let mut config = library_config();
        config.replication.workers = 0;
        let (origin, _) = config_error(Listener::new(config, Registry::new()));
        assert_eq!(origin.as_deref(), Some("replication.workers"));

        let mut config = library_config();
        config.replication.workers = 4;
        config.handlers = vec![HandlerConfig {
            kind: HandlerKind::Sql,
            function: Some("app.on_event".into()),
            ..HandlerConfig::default()
        }];
        let (_, message) = config_error(Listener::new(config, Registry::new()));
        assert!(message.contains("workers = 1"), "{message}");
    }
}
