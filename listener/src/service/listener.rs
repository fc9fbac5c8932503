//! The `Listener`: configuration, metrics and health, the admin server, and the loop that runs
//! sessions, reconnecting after transient failures, until cancelled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{Config, Mode, SlotLostPolicy};
use crate::delivery::dead_letter::DeadLetterStore;
use crate::delivery::dispatch::{jitter, Ack, Dispatcher, Item, Registry};
use crate::error::{report, Error};
use crate::ops::admin::{Health, Phase};
use crate::ops::metrics::Metrics;
use crate::ops::traces::{Telemetry, Tracing};
use crate::replication::stream::{ConnectOptions, ReplicationConnection};
use crate::service::session::{shutdown_deadline, DispatchTasks, SessionTokens};

/// A configured listener, ready to [`Listener::run`].
pub struct Listener {
    pub(super) config: Config,
    pub(super) registry: Arc<Registry>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Health,
    /// A lane of a registry handler (see `registry_lanes`): runs no lanes of its own.
    pub(super) is_lane: bool,
    /// Spans of the handler calls (`[telemetry]`; lanes share their listener's).
    pub(super) tracing: Tracing,
    /// The exporter, flushed when [`Listener::run`] returns; `None` when off, and in lanes.
    pub(super) telemetry: Option<Arc<Telemetry>>,
}

impl Listener {
    /// Starts a session's delivery, the same for every kind of session: the queue its reader
    /// feeds (returned), the acknowledgements starting at `first_ack` (returned), the dispatcher
    /// and, when `redrive_interval_ms` is set, its redrive task, with the subscription's dead letters
    /// on the session's SQL connection `sql` (which closes once its last user is gone). End it with
    /// [`DispatchTasks::finish`].
    ///
    /// The redrive task stops with `session.stop`. The dispatcher drains: it handles whatever
    /// the session's reader hands it until the reader closes the queue (which it does at a
    /// transaction boundary on shutdown), and stops early — at its next transaction boundary or
    /// retry backoff — only on `session.abort`.
    pub(super) fn start_delivery(
        &self,
        sql: Arc<Client>,
        first_ack: Ack,
        session: &SessionTokens,
    ) -> (mpsc::Sender<Item>, watch::Receiver<Ack>, DispatchTasks) {
        let r = &self.config.replication;
        let dead_letters = Arc::new(DeadLetterStore::new(sql, r.subscription_name()));
        let (items_tx, items) = mpsc::channel(r.queue_capacity);
        let (acks, acks_rx) = watch::channel(first_ack);
        let mut dispatcher = Dispatcher::new(Arc::clone(&self.registry), dead_letters.clone())
            .with_workers(r.workers)
            .with_metrics(Arc::clone(&self.metrics))
            .with_tracing(self.tracing.clone());
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
        let tasks = DispatchTasks {
            dispatcher,
            redriver,
        };
        (items_tx, acks_rx, tasks)
    }

    /// A listener following `config` and delivering to `registry`'s handlers.
    ///
    /// `config` is validated as `listener run` validates its configuration (slot and publication
    /// names, intervals, `workers`, the entries of `handlers` if any, such as a `sql` handler
    /// needing `workers = 1`): a mistake is an [`Error::Config`] here, not a failure later.
    /// `config.handlers` may be empty: the registry holds the handlers.
    ///
    /// With `telemetry.enabled`, the span exporter starts here (it sends nothing until the
    /// first spans end) and is flushed when [`Listener::run`] returns.
    pub fn new(config: Config, registry: Registry) -> Result<Listener, Error> {
        config.validate_embedded().map_err(Error::Config)?;
        let telemetry = Telemetry::start(&config.telemetry)?.map(Arc::new);
        let tracing = telemetry
            .as_ref()
            .map_or_else(Tracing::off, |t| t.tracing());
        Ok(Listener {
            config,
            registry: Arc::new(registry),
            metrics: Arc::new(Metrics::new()),
            health: Health::default(),
            is_lane: false,
            tracing,
            telemetry,
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
        // The database figures are read only for a scraped listener: a connection of its own.
        let figures_watch = admin.is_some().then(|| {
            tokio::spawn(crate::service::figures_watch::run(
                self.config.database.clone(),
                Arc::clone(&self.metrics),
                Duration::from_secs(self.config.replication.status_interval_secs.max(1)),
                stop.clone(),
            ))
        });
        // The registry's async handlers run beside the sessions, in lanes of their own, and
        // stop with them (on shutdown, or when the main session ends with an error).
        let lanes_stop = cancel.child_token();
        let (result, ()) = tokio::join!(
            async {
                let result = self.run_sessions(&cancel, &abort).await;
                lanes_stop.cancel();
                result
            },
            self.run_registry_lanes(lanes_stop.clone()),
        );
        stop.cancel();
        if let Some(figures_watch) = figures_watch {
            let _ = figures_watch.await;
        }
        let _ = deadline.await;
        if let Some(admin) = admin {
            match admin.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!(error = %err, "the admin HTTP server failed"),
                Err(err) => warn!(error = %err, "the admin HTTP server task failed"),
            }
        }
        let _ = upkeep.await;
        if let Some(telemetry) = &self.telemetry {
            // Blocks until the queued spans are sent (or the export times out).
            let telemetry = Arc::clone(telemetry);
            let _ = tokio::task::spawn_blocking(move || telemetry.flush()).await;
        }
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
        let console = crate::console::router(&self.config, |name| std::env::var(name).ok())
            .map_err(Error::Config)?;
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
            console,
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

    /// Opens a replication connection to the configured database.
    pub(super) async fn replication_connection(&self) -> Result<ReplicationConnection, Error> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, HandlerConfig};

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
        config.handlers = vec![HandlerConfig::new(crate::sink::SqlConfig::new(
            "app.on_event",
        ))];
        let (_, message) = config_error(Listener::new(config, Registry::new()));
        assert!(message.contains("workers = 1"), "{message}");
    }
}
