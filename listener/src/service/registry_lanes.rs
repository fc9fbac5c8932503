//! The async handlers of the database's registry (`domain_events.handler`, `mode = 'async'`),
//! each in a lane of its own: a notify-mode session of subscription `handler:<name>` whose one
//! handler applies each event with `domain_events.run_async_handler`, exactly once.
//!
//! A lane per handler is what makes `disable_handler` a pause: stopping the lane leaves its
//! snapshot transition and position in its subscription row, and starting it again delivers
//! everything committed meanwhile, nothing skipped, without holding the main stream or a slot.
//! `register_handler` creates the lane's row at the registering transaction's snapshot, so a
//! new handler gets every event committed after its registration, however soon it is noticed.
//!
//! The supervisor reads the registry every `registry.poll_interval_ms` and starts and stops
//! lanes. It also mirrors the listener's own handlers (TOML or library) into the registry as
//! `managed_by = 'listener'` rows `<subscription>/<handler>`, and pauses one whose row is
//! disabled: its next call waits, and with it the subscription's confirmed position (one
//! position per subscription), until the row is enabled again. Where several listeners share a database, a session advisory lock per handler, held
//! by the supervisor's connection, lets one of them run each lane; when that connection is
//! lost, its lanes are stopped before another listener can take them over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{AdminConfig, Mode};
use crate::delivery::dispatch::{Filter, OnFailure, Registry};
use crate::error::Error;
use crate::ops::admin::Health;
use crate::ops::metrics::Metrics;
use crate::service::listener::Listener;
use crate::sink::SqlHandler;

/// The subscription of handler `name`'s lane is `handler:<name>` (the extension's
/// `register_handler` and `unregister_handler` create and remove it under that name).
pub const LANE_PREFIX: &str = "handler:";

/// The async handlers, enabled or not: those registered in SQL and this listener's mirrored
/// ones (`$1`: the subscription's prefix, `<subscription>/`).
const READ_REGISTRY: &str = "SELECT name, enabled, pg_catalog.array_to_string(events, ' '), \
     log_level, managed_by = 'listener' FROM domain_events.handler WHERE mode = 'async' \
     AND (managed_by = 'sql' OR pg_catalog.left(name, pg_catalog.length($1)) = $1)";
/// Replaces this listener's mirrored rows (`<subscription>/<handler>`).
const MIRROR: &str = "SELECT domain_events.mirror_listener_handlers($1, $2::text::jsonb)";
/// First key of the lanes' advisory locks ("pgde" + 2); the second is the name's hash.
const TRY_LOCK: &str =
    "SELECT pg_catalog.pg_try_advisory_lock(1885824102, pg_catalog.hashtext($1))";
const UNLOCK: &str = "SELECT pg_catalog.pg_advisory_unlock(1885824102, pg_catalog.hashtext($1))";

/// A lane that failed is started again after this long (a definite error would otherwise be
/// retried every poll).
const RESTART_DELAY: Duration = Duration::from_secs(30);

/// A handler of the registry as the supervisor reads it.
struct Registered {
    name: String,
    enabled: bool,
    filters: String,
    log_level: String,
    /// One of this listener's own handlers, mirrored from its configuration.
    mirrored: bool,
}

/// A running lane.
struct Lane {
    stop: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Listener {
    /// Follows the database's handler registry until `stop` fires: mirrors this listener's
    /// handlers into it (rows `<subscription>/<handler>`) and pauses the ones disabled there,
    /// and runs the registry's enabled async handlers in lanes (unless `registry.handlers` is
    /// off). Returns once every lane has drained.
    pub(super) async fn run_registry_lanes(&self, stop: CancellationToken) {
        if self.is_lane {
            return;
        }
        let settings = &self.config.registry;
        let prefix = format!("{}/", self.config.replication.subscription_name());
        let mut lanes: HashMap<String, Lane> = HashMap::new();
        let mut failed: HashMap<String, Instant> = HashMap::new();
        let mut connection: Option<(Client, JoinHandle<()>)> = None;
        let mut reported_missing = false;
        let mut tick = tokio::time::interval(Duration::from_millis(settings.poll_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            reap(&mut lanes, &mut failed, connection.as_ref().map(|(c, _)| c)).await;
            if connection
                .as_ref()
                .is_some_and(|(client, _)| client.is_closed())
            {
                // Its advisory locks went with it: another listener may start these lanes now.
                warn!("lost the registry connection; stopping the registry handlers' lanes");
                stop_lanes(lanes.drain().collect()).await;
                connection = None;
            }
            if connection.is_none() {
                match crate::replication::subscription::connect(&self.config.database).await {
                    Ok(connected) => {
                        self.mirror_handlers(&connected.0).await;
                        connection = Some(connected);
                    }
                    Err(err) => {
                        debug!(error = %err, "cannot connect to read the handler registry");
                        continue;
                    }
                }
            }
            let Some((client, _)) = connection.as_ref() else {
                continue;
            };
            let registered = match read_registry(client, &prefix).await {
                Ok(registered) => registered,
                Err(err) if err.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                    if !reported_missing {
                        info!(
                            "the extension has no handler registry (before 0.2.0): registry \
                             handlers start after ALTER EXTENSION pg_domain_events UPDATE"
                        );
                        reported_missing = true;
                    }
                    Vec::new()
                }
                Err(err) => {
                    warn!(error = %err, "cannot read the handler registry");
                    continue;
                }
            };
            for mirrored in registered.iter().filter(|r| r.mirrored) {
                let name = &mirrored.name[prefix.len()..];
                if self.registry.set_paused(name, !mirrored.enabled) {
                    if mirrored.enabled {
                        info!(handler = %name, "handler enabled in the registry: resuming it");
                    } else {
                        warn!(
                            handler = %name,
                            "handler disabled in the registry: pausing it, and with it this \
                             subscription's position (enable_handler resumes it)"
                        );
                    }
                }
            }
            let wanted: HashMap<&str, &Registered> = registered
                .iter()
                .filter(|r| r.enabled && !r.mirrored && settings.handlers)
                .map(|r| (r.name.as_str(), r))
                .collect();
            let leaving: Vec<String> = lanes
                .keys()
                .filter(|name| !wanted.contains_key(name.as_str()))
                .cloned()
                .collect();
            let mut stopping = Vec::new();
            for name in leaving {
                if let Some(lane) = lanes.remove(&name) {
                    info!(handler = %name, "registry handler disabled or removed: pausing it");
                    stopping.push((name, lane));
                }
            }
            for name in stop_lanes(stopping).await {
                let _ = client.execute(UNLOCK, &[&name]).await;
            }
            for (name, registered) in wanted {
                if lanes.contains_key(name) || failed.get(name).is_some_and(|t| *t > Instant::now())
                {
                    continue;
                }
                let locked = client
                    .query_one(TRY_LOCK, &[&name])
                    .await
                    .map(|row| row.get::<_, bool>(0));
                match locked {
                    Ok(true) => {}
                    Ok(false) => continue, // another listener runs it
                    Err(err) => {
                        warn!(handler = %name, error = %err, "cannot lock a registry handler");
                        continue;
                    }
                }
                match self.lane(registered) {
                    Ok(lane) => {
                        info!(handler = %name, subscription = %lane_subscription(name), "running registry handler");
                        let lane_stop = stop.child_token();
                        let task = tokio::spawn(run_lane(lane, lane_stop.clone()));
                        lanes.insert(
                            name.to_string(),
                            Lane {
                                stop: lane_stop,
                                task,
                            },
                        );
                    }
                    Err(err) => {
                        warn!(handler = %name, error = %err, "cannot run a registry handler");
                        failed.insert(name.to_string(), Instant::now() + RESTART_DELAY);
                        let _ = client.execute(UNLOCK, &[&name]).await;
                    }
                }
            }
        }
        stop_lanes(lanes.into_iter().collect()).await;
    }

    /// Mirrors this listener's handlers into the registry (once per connection). A schema
    /// before 0.2.0 has no registry: nothing to do.
    async fn mirror_handlers(&self, client: &Client) {
        let handlers: Vec<serde_json::Value> = self
            .registry
            .names()
            .into_iter()
            .map(|name| {
                let configured = self.config.handlers.iter().find(|h| h.name() == name);
                let function = configured.and_then(|h| match &h.sink {
                    crate::sink::AnySinkConfig::Sql(sql) => sql.function.clone(),
                    _ => None,
                });
                let kind = configured.map_or("library", |h| h.sink.kind());
                serde_json::json!({
                    "name": name,
                    "events": self.registry.filters(name).unwrap_or_default(),
                    "function": function,
                    "description": format!(
                        "kind = {kind:?} of listener subscription {:?}",
                        self.config.replication.subscription_name()
                    ),
                })
            })
            .collect();
        let json = serde_json::Value::Array(handlers).to_string();
        let subscription = self.config.replication.subscription_name();
        match client.execute(MIRROR, &[&subscription, &json]).await {
            Ok(_) => {}
            Err(err) if err.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {}
            Err(err) => warn!(error = %err, "cannot mirror the handlers into the registry"),
        }
    }

    /// The listener of `handler`'s lane: this listener's database and tuning, notify mode,
    /// one worker, no admin server, and the one handler.
    fn lane(&self, handler: &Registered) -> Result<Listener, Error> {
        let subscription = lane_subscription(&handler.name);
        let mut config = self.config.clone();
        config.replication.mode = Mode::Notify;
        config.replication.subscription = Some(subscription.clone());
        config.replication.workers = 1;
        config.admin = AdminConfig::default();
        config.registry.handlers = false;
        config.handlers.clear();
        let filters = handler
            .filters
            .split(' ')
            .map(str::parse::<Filter>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Subscription {
                name: subscription.clone(),
                problem: format!("the handler's filters do not parse: {e}"),
            })?;
        let sql = SqlHandler::registered(
            config.database.clone(),
            handler.name.clone(),
            subscription,
            handler.log_level != "off",
            self.config.registry.max_attempts,
        );
        let mut registry = Registry::new();
        registry.register_with(
            handler.name.clone(),
            filters,
            self.config.registry.retry(),
            OnFailure::DeadLetter,
            Arc::new(sql),
        );
        Ok(Listener {
            config,
            registry: Arc::new(registry),
            // Lanes keep their own: their session figures would overwrite the main session's.
            metrics: Arc::new(Metrics::new()),
            health: Health::default(),
            is_lane: true,
            tracing: self.tracing.clone(),
            telemetry: None,
        })
    }
}

/// Runs a lane until `stop`, boxed: a lane is a listener and a listener runs lanes, so the
/// future's type must not contain itself.
fn run_lane(
    lane: Listener,
    stop: CancellationToken,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send>> {
    Box::pin(async move { lane.run(stop).await })
}

/// The subscription of handler `name`'s lane.
pub fn lane_subscription(name: &str) -> String {
    format!("{LANE_PREFIX}{name}")
}

async fn read_registry(
    client: &Client,
    prefix: &str,
) -> Result<Vec<Registered>, tokio_postgres::Error> {
    Ok(client
        .query(READ_REGISTRY, &[&prefix])
        .await?
        .iter()
        .map(|row| Registered {
            name: row.get(0),
            enabled: row.get(1),
            filters: row.get(2),
            log_level: row.get(3),
            mirrored: row.get(4),
        })
        .collect())
}

/// Forgets lanes that ended by themselves (a definite error), releasing their locks; a failed
/// one is started again after [`RESTART_DELAY`].
async fn reap(
    lanes: &mut HashMap<String, Lane>,
    failed: &mut HashMap<String, Instant>,
    client: Option<&Client>,
) {
    let ended: Vec<String> = lanes
        .iter()
        .filter(|(_, lane)| lane.task.is_finished())
        .map(|(name, _)| name.clone())
        .collect();
    for name in ended {
        let Some(lane) = lanes.remove(&name) else {
            continue;
        };
        match lane.task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(handler = %name, error = %crate::error::report(&err), "a registry handler's lane failed; starting it again later");
                failed.insert(name.clone(), Instant::now() + RESTART_DELAY);
            }
            Err(err) => {
                warn!(handler = %name, error = %err, "a registry handler's lane task failed");
                failed.insert(name.clone(), Instant::now() + RESTART_DELAY);
            }
        }
        if let Some(client) = client {
            let _ = client.execute(UNLOCK, &[&name]).await;
        }
    }
}

/// Stops lanes and waits for each to drain (what it read is handled and saved); returns their
/// names.
async fn stop_lanes(lanes: Vec<(String, Lane)>) -> Vec<String> {
    for (_, lane) in &lanes {
        lane.stop.cancel();
    }
    let mut names = Vec::with_capacity(lanes.len());
    for (name, lane) in lanes {
        match lane.task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(
                handler = %name,
                error = %crate::error::report(&err),
                "a registry handler's lane failed while stopping"
            ),
            Err(err) => {
                warn!(handler = %name, error = %err, "a registry handler's lane task failed")
            }
        }
        names.push(name);
    }
    names
}
